// The agents' wake-on-arrival (set_on_progress): prefill's callback runs when a room's destination arrives,
// decode's when its completion arrives, and what the engine then polls for is already there. Without it the
// engines only find the news on their next 5 ms poll, which no functional test would notice.
#include <gtest/gtest.h>

#include <condition_variable>
#include <map>
#include <mutex>

#include "common/transfer/checksum.h"
#include "common/transfer/loopback_transport.h"
#include "tests/unit/transfer/test_util.h"

namespace tandem::transfer {
namespace {

using namespace std::chrono_literals;
using testing::DoneRecorder;

constexpr uint64_t kPage = 4096;
constexpr size_t kPages = 4;

// Counts on_progress calls per room; the test waits for a new one with a generous deadline (a missing
// call fails the wait; nothing here asserts how long anything took).
class ProgressCounter {
 public:
  std::function<void(RoomId)> Callback() {
    return [this](RoomId room) {
      std::lock_guard lock(mutex_);
      ++calls_[room];
      changed_.notify_all();
    };
  }
  int calls(RoomId room) {
    std::lock_guard lock(mutex_);
    return calls_.contains(room) ? calls_[room] : 0;
  }
  // True once `room` has more than `seen` calls; false when `timeout` passed first.
  bool WaitForMore(RoomId room, int seen, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, timeout, [&] { return calls_.contains(room) && calls_[room] > seen; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<RoomId, int> calls_;
};

class ProgressTest : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = testing::RegisterBuffer(prefill_transport_, "c4_kv", kPages * kPage, 3);
    dst_ = testing::RegisterBuffer(decode_transport_, "c4_kv", kPages * kPage, 0);
    auto prefill = PrefillAgent::Create(&prefill_transport_, testing::TestHandshake(), testing::FastOptions(), "127.0.0.1", 0);
    ASSERT_TRUE(prefill.ok()) << prefill.status();
    prefill_ = std::move(*prefill);
    auto decode = DecodeAgent::Create(&decode_transport_, testing::TestHandshake(), testing::FastOptions());
    ASSERT_TRUE(decode.ok()) << decode.status();
    decode_ = std::move(*decode);
    prefill_->set_on_progress(prefill_progress_.Callback());
    decode_->set_on_progress(decode_progress_.Callback());
  }
  void TearDown() override {
    decode_.reset();
    prefill_.reset();
  }

  std::vector<Segment> Source() { return testing::PageSegments(src_.region, kPages, kPage, 1, 0); }
  std::vector<Segment> Dest() { return testing::PageSegments(dst_.region, kPages, kPage, 1, 0); }

  LoopbackTransport prefill_transport_, decode_transport_;
  testing::Buffer src_, dst_;
  DoneRecorder prefill_done_, decode_done_;
  ProgressCounter prefill_progress_, decode_progress_;
  std::unique_ptr<PrefillAgent> prefill_;
  std::unique_ptr<DecodeAgent> decode_;
};

TEST_F(ProgressTest, PrefillIsWokenWhenTheDestinationArrives) {
  constexpr RoomId kRoom = 11;
  ASSERT_TRUE(prefill_->ExpectRoom(kRoom, prefill_done_.Callback()).ok());
  const int before = prefill_progress_.calls(kRoom);
  ASSERT_TRUE(decode_->Register(kRoom, "127.0.0.1", prefill_->port(), Dest(), decode_done_.Callback()).ok());
  ASSERT_TRUE(prefill_progress_.WaitForMore(kRoom, before)) << "prefill's on_progress never ran for the destination";
  // What the woken scheduler polls for is there already: a zero-timeout look finds it.
  auto destination = prefill_->WaitDestination(kRoom, 0ms);
  ASSERT_TRUE(destination.ok()) << destination.status();
  EXPECT_EQ(destination->segments, Dest());
  ASSERT_TRUE(prefill_->Abort(kRoom, "test over").ok());
}

TEST_F(ProgressTest, DecodeIsWokenWhenTheCompletionArrives) {
  constexpr RoomId kRoom = 12;
  ASSERT_TRUE(prefill_->ExpectRoom(kRoom, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_->Register(kRoom, "127.0.0.1", prefill_->port(), Dest(), decode_done_.Callback()).ok());
  ASSERT_TRUE(prefill_->WaitDestination(kRoom, 10s).ok());
  const auto source = Source();
  ASSERT_TRUE(prefill_->Ship(kRoom, 0, source).ok());
  auto checksum = ChecksumSegments(prefill_transport_.regions(), source);
  ASSERT_TRUE(checksum.ok());
  // Counted from here: a call for the registration or the puts does not stand in for the completion's.
  const int before = decode_progress_.calls(kRoom);
  ASSERT_TRUE(prefill_->Complete(kRoom, Completion{7, *checksum, ""}).ok());
  ASSERT_TRUE(decode_progress_.WaitForMore(kRoom, before)) << "decode's on_progress never ran for the completion";
  auto completion = decode_->WaitCompletion(kRoom, 0ms);
  ASSERT_TRUE(completion.ok()) << completion.status();
  EXPECT_EQ(completion->first_token, 7);
  ASSERT_TRUE(decode_->Ack(kRoom).ok());
  EXPECT_EQ(prefill_done_.Wait(kRoom), absl::OkStatus());
}

TEST_F(ProgressTest, EveryRoomOfASharedConnectionIsReported) {
  // Rooms multiplexed on one cached bootstrap connection each get their own wake, with their own id.
  constexpr RoomId kFirst = 20, kRooms = 4;
  for (RoomId room = kFirst; room < kFirst + kRooms; ++room) {
    ASSERT_TRUE(prefill_->ExpectRoom(room, prefill_done_.Callback()).ok());
  }
  for (RoomId room = kFirst; room < kFirst + kRooms; ++room) {
    ASSERT_TRUE(decode_->Register(room, "127.0.0.1", prefill_->port(), Dest(), decode_done_.Callback()).ok());
  }
  for (RoomId room = kFirst; room < kFirst + kRooms; ++room) {
    ASSERT_TRUE(prefill_progress_.WaitForMore(room, 0)) << "room " << room;
    EXPECT_TRUE(prefill_->WaitDestination(room, 0ms).ok()) << "room " << room;
  }
  EXPECT_EQ(decode_->connection_count(), 1u);
  for (RoomId room = kFirst; room < kFirst + kRooms; ++room) ASSERT_TRUE(prefill_->Abort(room, "test over").ok());
}

}  // namespace
}  // namespace tandem::transfer
