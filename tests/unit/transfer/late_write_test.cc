// Decode's quarantine of a room's pages when the room ends while prefill may still be writing them, over
// loopback agents with a fake device peer whose copy the test holds in flight, and a fake clock for the grace:
// the room fails at once, its pages are not reusable before late_write_grace (nor before prefill's late
// acknowledgement) and are after it; clean ends (ack, acknowledged abort, prefill's own abort) free at once.
// A prefill that advertises a peer lease longer than the grace is held until its lease + kLateWriteCopyMargin.
#include <gtest/gtest.h>

#include <condition_variable>
#include <cstring>
#include <set>
#include <thread>

#include "common/transfer/checksum.h"
#include "common/transfer/loopback_transport.h"
#include "tests/unit/transfer/test_util.h"

namespace tandem::transfer {
namespace {

using namespace std::chrono_literals;
using testing::DoneRecorder;

constexpr uint64_t kPage = 4096;
constexpr size_t kPages = 4;
constexpr auto kGrace = 5s;

// Time that moves only when the test says so.
class FakeClock {
 public:
  Clock::time_point Now() const {
    std::lock_guard lock(mutex_);
    return now_;
  }
  void Advance(Clock::duration by) {
    std::lock_guard lock(mutex_);
    now_ += by;
  }

 private:
  mutable std::mutex mutex_;
  Clock::time_point now_ = Clock::now();
};

// Decode's "device" pools and a gate that holds prefill's copy into them in flight until the test opens it.
struct HeldDevice {
  std::vector<uint8_t> prefill_live;
  std::vector<uint8_t> decode_live = std::vector<uint8_t>(kPages * kPage);
  std::mutex mutex;
  std::condition_variable changed;
  bool hold = false;
  bool copying = false;  // a copy is waiting at the gate
};

class HeldPeer final : public DevicePeer {
 public:
  explicit HeldPeer(HeldDevice* device) : device_(device) {}
  absl::Status Copy(std::span<const Segment> src, std::span<const Segment> dst) override {
    std::unique_lock lock(device_->mutex);
    device_->copying = true;
    device_->changed.notify_all();
    device_->changed.wait(lock, [&] { return !device_->hold; });
    for (size_t i = 0; i < src.size(); ++i) {
      std::memcpy(device_->decode_live.data() + dst[i].offset, device_->prefill_live.data() + src[i].offset, src[i].length);
    }
    device_->copying = false;
    return absl::OkStatus();
  }
  absl::Status InvertByte(const Segment&) override { return absl::OkStatus(); }

 private:
  HeldDevice* device_;
};

class LateWriteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = testing::RegisterBuffer(prefill_transport_, "c4_kv", kPages * kPage, 3);
    dst_ = testing::RegisterBuffer(decode_transport_, "c4_kv", kPages * kPage, 0);
    device_.prefill_live = src_.bytes;  // as after staging: the registered copy holds the live bytes
  }
  void TearDown() override {
    LetCopyLand();
    decode_.reset();
    prefill_.reset();
  }

  void Start(AgentOptions prefill_options) {
    PrefillDeviceIpc prefill_ipc;
    prefill_ipc.mode = PdTransfer::kIpc;
    prefill_ipc.open = [this](const DeviceExport&) -> absl::StatusOr<std::shared_ptr<DevicePeer>> {
      return std::shared_ptr<DevicePeer>(std::make_shared<HeldPeer>(&device_));
    };
    DecodeDeviceIpc decode_ipc;
    decode_ipc.mode = PdTransfer::kIpc;
    decode_ipc.local = DeviceExport{LocalHostId(), LocalProcessToken() + 1, "GPU 0 (fake)", {{kPages * kPage, std::string(64, 'a')}}};
    decode_ipc.device_checksum = [this](std::span<const Segment> segments) -> absl::StatusOr<uint64_t> {
      MemoryRegion live{"c4_kv", device_.decode_live.data(), device_.decode_live.size()};
      return ChecksumSegments(std::span<const MemoryRegion>(&live, 1), segments);
    };
    AgentOptions decode_options = testing::FastOptions();
    decode_options.control.lease = 1500ms;  // time enough to start the copy before a silent prefill is dropped
    decode_options.late_write_grace = kGrace;
    decode_options.clock = [this] { return clock_.Now(); };
    auto prefill = PrefillAgent::Create(&prefill_transport_, testing::TestHandshake(), prefill_options, "127.0.0.1", 0,
                                        std::move(prefill_ipc));
    ASSERT_TRUE(prefill.ok()) << prefill.status();
    prefill_ = std::move(*prefill);
    auto decode = DecodeAgent::Create(&decode_transport_, testing::TestHandshake(), decode_options, std::move(decode_ipc));
    ASSERT_TRUE(decode.ok()) << decode.status();
    decode_ = std::move(*decode);
    decode_->set_on_pages_reusable([this](RoomId room) {
      std::lock_guard lock(reusable_mutex_);
      reusable_.insert(room);
      reusable_changed_.notify_all();
    });
  }

  std::vector<Segment> Source() { return testing::PageSegments(src_.region, kPages, kPage, 1, 0); }
  std::vector<Segment> Dest() { return testing::PageSegments(dst_.region, kPages, kPage, 1, 0); }

  void Open(RoomId room) {
    ASSERT_TRUE(prefill_->ExpectRoom(room, prefill_done_.Callback()).ok());
    ASSERT_TRUE(decode_->Register(room, "127.0.0.1", prefill_->port(), Dest(), decode_done_.Callback()).ok());
    ASSERT_TRUE(prefill_->WaitDestination(room, 10s).ok());
  }
  // Opens `room` and starts prefill's copy of it, held at the gate; returns once the copy is in flight.
  void ShipHeld(RoomId room) {
    Open(room);
    {
      std::lock_guard lock(device_.mutex);
      device_.hold = true;
    }
    shipper_ = std::thread([this, room] { (void)prefill_->Ship(room, 0, Source()); });
    std::unique_lock lock(device_.mutex);
    ASSERT_TRUE(device_.changed.wait_for(lock, 10s, [&] { return device_.copying; })) << "the copy never started";
  }
  void LetCopyLand() {
    {
      std::lock_guard lock(device_.mutex);
      device_.hold = false;
    }
    device_.changed.notify_all();
    if (shipper_.joinable()) shipper_.join();
  }
  bool CopyInFlight() {
    std::lock_guard lock(device_.mutex);
    return device_.copying;
  }
  // Whether the agent said (on its tick, or on prefill's late ack) that `room` came out of quarantine.
  bool WaitReusableCallback(RoomId room) {
    std::unique_lock lock(reusable_mutex_);
    return reusable_changed_.wait_for(lock, 10s, [&] { return reusable_.contains(room); });
  }

  FakeClock clock_;
  HeldDevice device_;
  LoopbackTransport prefill_transport_, decode_transport_;
  testing::Buffer src_, dst_;
  DoneRecorder prefill_done_, decode_done_;
  std::mutex reusable_mutex_;
  std::condition_variable reusable_changed_;
  std::set<RoomId> reusable_;
  std::unique_ptr<PrefillAgent> prefill_;
  std::unique_ptr<DecodeAgent> decode_;
  std::thread shipper_;
};

TEST_F(LateWriteTest, ConnectionLostMidCopyFailsAtOnceAndHoldsThePagesForTheGrace) {
  // A prefill that is alive but silent: decode drops the connection at its lease (real time), mid-copy.
  AgentOptions prefill = testing::FastOptions();
  prefill.control.send_heartbeats = false;
  Start(prefill);
  ShipHeld(1);
  EXPECT_FALSE(decode_->PagesReusable(1)) << "a live room's pages are the peer's to write";
  auto ended = decode_done_.Wait(1);
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(ended->code(), absl::StatusCode::kUnavailable) << *ended;
  EXPECT_TRUE(CopyInFlight()) << "the room must fail without waiting for prefill's copy";
  EXPECT_EQ(decode_->WaitCompletion(1, 0ms).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(decode_->PagesReusable(1));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 1u);

  LetCopyLand();  // the late write the quarantine is for: it lands after the room ended
  EXPECT_EQ(device_.decode_live, device_.prefill_live);
  clock_.Advance(kGrace - 1ms);
  EXPECT_FALSE(decode_->PagesReusable(1));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 1u);
  // The id stays taken while quarantined: a new room under it would share the old one's quarantine entry.
  const absl::Status reused = decode_->Register(1, "127.0.0.1", prefill_->port(), Dest(), decode_done_.Callback());
  EXPECT_EQ(reused.code(), absl::StatusCode::kAlreadyExists) << reused;
  clock_.Advance(1ms);
  EXPECT_TRUE(decode_->PagesReusable(1));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 0u);
  EXPECT_TRUE(WaitReusableCallback(1));
}

TEST_F(LateWriteTest, AnUnacknowledgedAbortHoldsThePagesUntilPrefillAcknowledgesAfterAll) {
  Start(testing::FastOptions());
  ShipHeld(2);
  ASSERT_TRUE(decode_->Abort(2, "client went away").ok());
  EXPECT_FALSE(decode_->PagesReusable(2)) << "aborting, not acknowledged: prefill's copy is in flight";
  EXPECT_EQ(decode_done_.calls(2), 0);
  clock_.Advance(testing::FastOptions().abort_ack_timeout + 1ms);  // the tick gives up on the ack
  auto ended = decode_done_.Wait(2);
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(ended->code(), absl::StatusCode::kAborted) << *ended;
  EXPECT_FALSE(decode_->PagesReusable(2));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 1u);
  // The copy drains; prefill's ABORT_ACK follows it and lifts the quarantine before the grace is over.
  LetCopyLand();
  EXPECT_TRUE(WaitReusableCallback(2));
  EXPECT_TRUE(decode_->PagesReusable(2));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 0u);
}

TEST_F(LateWriteTest, CleanEndsFreeThePagesAtOnce) {
  Start(testing::FastOptions());
  // Acknowledged: the whole room, then ACK.
  Open(3);
  ASSERT_TRUE(prefill_->Ship(3, 0, Source()).ok());
  auto checksum = ChecksumSegments(prefill_transport_.regions(), Source());
  ASSERT_TRUE(checksum.ok());
  ASSERT_TRUE(prefill_->Complete(3, Completion{7, *checksum, ""}).ok());
  ASSERT_TRUE(decode_->WaitCompletion(3, 10s).ok());
  EXPECT_FALSE(decode_->PagesReusable(3));
  ASSERT_TRUE(decode_->Ack(3).ok());
  EXPECT_TRUE(decode_->PagesReusable(3));
  // Decode's abort, acknowledged once no copy is in flight.
  Open(4);
  ASSERT_TRUE(decode_->Abort(4, "client went away").ok());
  ASSERT_EQ(decode_done_.Wait(4)->code(), absl::StatusCode::kAborted);
  EXPECT_TRUE(decode_->PagesReusable(4));
  // Prefill's own abort (sent only once its copies drained).
  Open(5);
  ASSERT_TRUE(prefill_->Abort(5, "prefill shutting down").ok());
  ASSERT_EQ(decode_done_.Wait(5)->code(), absl::StatusCode::kAborted);
  EXPECT_TRUE(decode_->PagesReusable(5));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 0u);
}

TEST(LateWriteHold, IsTheGraceOrThePrefillsLeasePlusTheMarginWhicheverIsLonger) {
  EXPECT_EQ(DecodeAgent::LateWriteHold(10s, 0), 10s) << "an older prefill advertises no lease: the grace alone";
  EXPECT_EQ(DecodeAgent::LateWriteHold(10s, 4000), 10s);
  EXPECT_EQ(DecodeAgent::LateWriteHold(5s, 4000), 5s);
  EXPECT_EQ(DecodeAgent::LateWriteHold(5s, 8000), 8s + kLateWriteCopyMargin);
  EXPECT_EQ(DecodeAgent::LateWriteHold(0s, 400), 400ms + kLateWriteCopyMargin);
}

TEST_F(LateWriteTest, APrefillLeaseLongerThanTheGraceHoldsThePagesUntilTheLeasePlusTheMargin) {
  // Such a prefill may keep writing for its whole lease after it last heard decode, past decode's grace.
  AgentOptions prefill = testing::FastOptions();
  prefill.control.lease = kGrace + 3s;
  Start(prefill);
  ShipHeld(6);
  ASSERT_TRUE(decode_->Abort(6, "client went away").ok());
  clock_.Advance(testing::FastOptions().abort_ack_timeout + 1ms);  // the tick gives up on the ack
  auto ended = decode_done_.Wait(6);
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(ended->code(), absl::StatusCode::kAborted) << *ended;
  ASSERT_TRUE(CopyInFlight());
  clock_.Advance(kGrace);
  EXPECT_FALSE(decode_->PagesReusable(6)) << "released at the grace, while the prefill's lease still runs";
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 1u);
  clock_.Advance(prefill.control.lease + kLateWriteCopyMargin - kGrace - 1ms);
  EXPECT_FALSE(decode_->PagesReusable(6));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 1u);
  clock_.Advance(1ms);
  EXPECT_TRUE(decode_->PagesReusable(6));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 0u);
  EXPECT_TRUE(WaitReusableCallback(6));
}

TEST_F(LateWriteTest, APrefillLeaseShorterThanTheGraceLeavesTheGraceInCharge) {
  AgentOptions prefill = testing::FastOptions();
  ASSERT_LT(prefill.control.lease + kLateWriteCopyMargin, kGrace);
  Start(prefill);
  ShipHeld(7);
  ASSERT_TRUE(decode_->Abort(7, "client went away").ok());
  clock_.Advance(testing::FastOptions().abort_ack_timeout + 1ms);
  auto ended = decode_done_.Wait(7);
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(ended->code(), absl::StatusCode::kAborted) << *ended;
  ASSERT_TRUE(CopyInFlight());
  clock_.Advance(prefill.control.lease + kLateWriteCopyMargin);
  EXPECT_FALSE(decode_->PagesReusable(7)) << "the configured grace is the floor";
  clock_.Advance(kGrace - prefill.control.lease - kLateWriteCopyMargin - 1ms);
  EXPECT_FALSE(decode_->PagesReusable(7));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 1u);
  clock_.Advance(1ms);
  EXPECT_TRUE(decode_->PagesReusable(7));
  EXPECT_EQ(decode_->metrics().quarantined_rooms, 0u);
  EXPECT_TRUE(WaitReusableCallback(7));
}

}  // namespace
}  // namespace tandem::transfer
