// The per-room protocol between a PrefillAgent and a DecodeAgent over loopback sockets: the happy path,
// refusals, aborts both ways, leases, dead peers and checksum failures. Parameterised over transports.
#include <gtest/gtest.h>

#include <thread>

#include "common/transfer/checksum.h"
#include "common/transfer/loopback_transport.h"
#include "tests/unit/transfer/test_util.h"
#ifdef TANDEM_TRANSFER_TEST_UCX
#include "common/transfer/ucx_transport.h"
#endif

namespace tandem::transfer {
namespace {

using namespace std::chrono_literals;
using testing::DoneRecorder;

constexpr uint64_t kPage = 37440;  // a C4 KV page of V4-Flash (64 entries x 585 B)
constexpr size_t kRegionBytes = 64 * kPage;

std::unique_ptr<KvTransport> MakeTransport(const std::string& kind) {
#ifdef TANDEM_TRANSFER_TEST_UCX
  if (kind != "loopback") {
    UcxOptions options;
    options.tls = kind == "ucx-tcp" ? "tcp" : "self,sm";
    if (const char* tls = std::getenv("TANDEM_TEST_SM_TLS"); tls && kind == "ucx-sm") options.tls = tls;
    auto t = UcxTransport::Create(options);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? std::move(*t) : nullptr;
  }
#endif
  (void)kind;
  return std::make_unique<LoopbackTransport>();
}

class RoomTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { Start(testing::FastOptions(), testing::FastOptions()); }

  void Start(const AgentOptions& prefill_options, const AgentOptions& decode_options) {
    decode_agent_.reset();
    prefill_agent_.reset();
    prefill_transport_ = MakeTransport(GetParam());
    decode_transport_ = MakeTransport(GetParam());
    ASSERT_TRUE(prefill_transport_ && decode_transport_);
    src_ = testing::RegisterBuffer(*prefill_transport_, "c4_kv", kRegionBytes, 7);
    dst_ = testing::RegisterBuffer(*decode_transport_, "c4_kv", kRegionBytes, 0);
    auto prefill = PrefillAgent::Create(prefill_transport_.get(), testing::TestHandshake(), prefill_options, "127.0.0.1", 0);
    ASSERT_TRUE(prefill.ok()) << prefill.status();
    prefill_agent_ = std::move(*prefill);
    auto decode = DecodeAgent::Create(decode_transport_.get(), testing::TestHandshake(), decode_options);
    ASSERT_TRUE(decode.ok()) << decode.status();
    decode_agent_ = std::move(*decode);
  }

  uint16_t port() const { return prefill_agent_->port(); }
  // Source pages 0..n-1 contiguous (so they coalesce where decode's are contiguous too); destination
  // pages in two runs, so the transport must split.
  std::vector<Segment> Source(size_t n) { return testing::PageSegments(src_.region, n, kPage, 1, 0); }
  std::vector<Segment> Dest(size_t n) {
    auto a = testing::PageSegments(dst_.region, n / 2, kPage, 1, 10);
    auto b = testing::PageSegments(dst_.region, n - n / 2, kPage, 1, 40);
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  // Runs a whole room; returns decode's WaitCompletion status.
  absl::StatusOr<Completion> RunRoom(RoomId room, size_t pages) {
    auto src = Source(pages);
    EXPECT_TRUE(prefill_agent_->ExpectRoom(room, prefill_done_.Callback()).ok());
    absl::Status registered = decode_agent_->Register(room, "127.0.0.1", port(), Dest(pages), decode_done_.Callback());
    EXPECT_TRUE(registered.ok()) << registered;
    auto destination = prefill_agent_->WaitDestination(room, 5s);
    EXPECT_TRUE(destination.ok()) << destination.status();
    if (!destination.ok()) return destination.status();
    EXPECT_EQ(destination->segments.size(), pages);
    const size_t half = pages / 2;
    EXPECT_TRUE(prefill_agent_->Ship(room, 0, std::span(src).first(half)).ok());
    EXPECT_TRUE(prefill_agent_->Ship(room, half, std::span(src).subspan(half)).ok());
    auto checksum = ChecksumSegments(prefill_transport_->regions(), src);
    EXPECT_TRUE(checksum.ok());
    EXPECT_TRUE(prefill_agent_->Complete(room, Completion{4242, *checksum, "logprobs"}).ok());
    return decode_agent_->WaitCompletion(room, 5s);
  }

  // Declared so that agents go first: their shutdown still calls the recorders and uses the transports.
  DoneRecorder prefill_done_, decode_done_;
  std::unique_ptr<KvTransport> prefill_transport_, decode_transport_;
  testing::Buffer src_, dst_;
  std::unique_ptr<PrefillAgent> prefill_agent_;
  std::unique_ptr<DecodeAgent> decode_agent_;
};

TEST_P(RoomTest, HappyPathMovesBytesAndAcks) {
  auto completion = RunRoom(1, 8);
  ASSERT_TRUE(completion.ok()) << completion.status();
  EXPECT_EQ(completion->first_token, 4242);
  EXPECT_EQ(completion->payload, "logprobs");
  // Pages 0..3 landed at 10..13, pages 4..7 at 40..43.
  for (size_t p = 0; p < 8; ++p) {
    const size_t to = p < 4 ? 10 + p : 40 + (p - 4);
    ASSERT_EQ(0, std::memcmp(dst_.bytes.data() + to * kPage, src_.bytes.data() + p * kPage, kPage)) << "page " << p;
  }
  EXPECT_EQ(dst_.bytes[9 * kPage], 0);  // nothing outside the destination
  ASSERT_TRUE(decode_agent_->Ack(1).ok());
  EXPECT_EQ(decode_done_.Wait(1), absl::OkStatus());
  EXPECT_EQ(prefill_done_.Wait(1), absl::OkStatus());
  // Two ships, each contiguous on both sides: one put each.
  EXPECT_EQ(prefill_transport_->stats().puts_issued, 2u);
  EXPECT_EQ(prefill_transport_->stats().bytes_put, 8 * kPage);
  const AgentMetrics p = prefill_agent_->metrics();
  EXPECT_EQ(p.bytes_moved, 8 * kPage);
  EXPECT_EQ(p.rooms_completed, 1u);
  EXPECT_EQ(p.live_rooms, 0u);
  EXPECT_EQ(decode_agent_->metrics().rooms_completed, 1u);
  EXPECT_EQ(prefill_done_.calls(1), 1);
  EXPECT_EQ(decode_done_.calls(1), 1);
}

TEST_P(RoomTest, ConnectionIsCachedAcrossRooms) {
  for (RoomId room = 100; room < 105; ++room) {
    ASSERT_TRUE(RunRoom(room, 4).ok());
    ASSERT_TRUE(decode_agent_->Ack(room).ok());
    ASSERT_EQ(prefill_done_.Wait(room), absl::OkStatus());
  }
  EXPECT_EQ(decode_agent_->connection_count(), 1u);
  EXPECT_EQ(prefill_agent_->metrics().connections, 1u);
}

TEST_P(RoomTest, DestinationMayArriveBeforeTheGenerateLeg) {
  ASSERT_TRUE(decode_agent_->Register(5, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  // Wait (polling with a deadline) until prefill holds it as a pending destination.
  const auto deadline = Clock::now() + 5s;
  while (prefill_agent_->metrics().pending_destinations == 0 && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
  ASSERT_EQ(prefill_agent_->metrics().pending_destinations, 1u);
  ASSERT_TRUE(prefill_agent_->ExpectRoom(5, prefill_done_.Callback()).ok());
  auto destination = prefill_agent_->WaitDestination(5, 5s);
  ASSERT_TRUE(destination.ok()) << destination.status();
  EXPECT_EQ(destination->segments, Dest(2));
}

TEST_P(RoomTest, UnknownRoomIsRefusedAndDecodeIsTold) {
  AgentOptions prefill = testing::FastOptions();
  prefill.unknown_room_grace = 0ms;
  Start(prefill, testing::FastOptions());
  ASSERT_TRUE(decode_agent_->Register(77, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  auto status = decode_done_.Wait(77);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(status->code(), absl::StatusCode::kNotFound) << *status;
  EXPECT_NE(status->message().find("does not expect room 77"), std::string::npos) << *status;
  EXPECT_EQ(decode_agent_->WaitCompletion(77, 1s).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(prefill_agent_->metrics().rooms_refused, 1u);
}

TEST_P(RoomTest, UnknownRoomIsRefusedAfterTheGrace) {
  AgentOptions prefill = testing::FastOptions();
  prefill.unknown_room_grace = 50ms;
  Start(prefill, testing::FastOptions());
  ASSERT_TRUE(decode_agent_->Register(78, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  auto status = decode_done_.Wait(78);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(status->code(), absl::StatusCode::kNotFound) << *status;
  EXPECT_EQ(prefill_agent_->metrics().pending_destinations, 0u);
}

TEST_P(RoomTest, DuplicateLiveRoomsAreRefused) {
  ASSERT_TRUE(prefill_agent_->ExpectRoom(9, prefill_done_.Callback()).ok());
  EXPECT_EQ(prefill_agent_->ExpectRoom(9, prefill_done_.Callback()).code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(decode_agent_->Register(9, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  EXPECT_EQ(decode_agent_->Register(9, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).code(),
            absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(prefill_agent_->WaitDestination(9, 5s).ok());
  // A second decode worker claiming the same room is refused; the first keeps it.
  auto other_transport = MakeTransport(GetParam());
  auto other_dst = testing::RegisterBuffer(*other_transport, "c4_kv", kRegionBytes, 0);
  auto other = DecodeAgent::Create(other_transport.get(), testing::TestHandshake(), testing::FastOptions());
  ASSERT_TRUE(other.ok());
  DoneRecorder other_done;
  ASSERT_TRUE((*other)->Register(9, "127.0.0.1", port(), Dest(2), other_done.Callback()).ok());
  auto status = other_done.Wait(9);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(status->code(), absl::StatusCode::kAlreadyExists) << *status;
  EXPECT_EQ(decode_done_.calls(9), 0);
  // After the room ends its id may be used again.
  ASSERT_TRUE(prefill_agent_->Abort(9, "test").ok());
  ASSERT_TRUE(prefill_done_.Wait(9).has_value());
  EXPECT_TRUE(prefill_agent_->ExpectRoom(9, prefill_done_.Callback()).ok());
}

TEST_P(RoomTest, TablesAreBounded) {
  AgentOptions prefill = testing::FastOptions();
  prefill.max_rooms = 2;
  prefill.max_pending_destinations = 1;
  AgentOptions decode = testing::FastOptions();
  decode.max_rooms = 2;
  Start(prefill, decode);
  ASSERT_TRUE(prefill_agent_->ExpectRoom(1, prefill_done_.Callback()).ok());
  ASSERT_TRUE(prefill_agent_->ExpectRoom(2, prefill_done_.Callback()).ok());
  EXPECT_EQ(prefill_agent_->ExpectRoom(3, prefill_done_.Callback()).code(), absl::StatusCode::kResourceExhausted);
  // Unknown rooms: one may wait for its Generate leg, the next is refused at once.
  ASSERT_TRUE(decode_agent_->Register(10, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(11, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  auto status = decode_done_.Wait(11);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(status->code(), absl::StatusCode::kResourceExhausted) << *status;
  EXPECT_EQ(decode_done_.calls(10), 0);
  // Decode's own table: rooms prefill expects stay live, the one past the bound is refused locally.
  Start(testing::FastOptions(), decode);
  for (RoomId room : {12, 13, 14}) ASSERT_TRUE(prefill_agent_->ExpectRoom(room, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(12, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(13, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  EXPECT_EQ(decode_agent_->Register(14, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST_P(RoomTest, DecodeAbortIsAcknowledgedAndEndsBothSides) {
  ASSERT_TRUE(prefill_agent_->ExpectRoom(3, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(3, "127.0.0.1", port(), Dest(4), decode_done_.Callback()).ok());
  ASSERT_TRUE(prefill_agent_->WaitDestination(3, 5s).ok());
  ASSERT_TRUE(decode_agent_->Abort(3, "client went away").ok());
  auto prefill = prefill_done_.Wait(3);
  auto decode = decode_done_.Wait(3);
  ASSERT_TRUE(prefill && decode);
  EXPECT_EQ(prefill->code(), absl::StatusCode::kAborted);
  EXPECT_NE(prefill->message().find("client went away"), std::string::npos) << *prefill;
  EXPECT_EQ(decode->code(), absl::StatusCode::kAborted);
  auto src = Source(4);
  EXPECT_FALSE(prefill_agent_->Ship(3, 0, src).ok());
  EXPECT_EQ(prefill_agent_->metrics().live_rooms, 0u);
  EXPECT_EQ(decode_agent_->metrics().live_rooms, 0u);
}

TEST_P(RoomTest, PrefillAbortReachesDecodeWithTheReason) {
  ASSERT_TRUE(prefill_agent_->ExpectRoom(4, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(4, "127.0.0.1", port(), Dest(4), decode_done_.Callback()).ok());
  ASSERT_TRUE(prefill_agent_->WaitDestination(4, 5s).ok());
  auto src = Source(4);
  ASSERT_TRUE(prefill_agent_->Ship(4, 0, std::span(src).first(2)).ok());
  ASSERT_TRUE(prefill_agent_->Abort(4, "prompt too long").ok());
  auto waited = decode_agent_->WaitCompletion(4, 5s);
  EXPECT_EQ(waited.status().code(), absl::StatusCode::kAborted);
  EXPECT_NE(waited.status().message().find("prompt too long"), std::string::npos) << waited.status();
  ASSERT_TRUE(decode_done_.Wait(4).has_value());
  EXPECT_EQ(prefill_done_.Wait(4)->code(), absl::StatusCode::kAborted);
}

TEST_P(RoomTest, CorruptionIsCaughtByTheChecksumAndFailsThatRoomOnly) {
  prefill_transport_->CorruptNextPuts(1);
  auto bad = RunRoom(20, 6);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss) << bad.status();
  EXPECT_NE(bad.status().message().find("checksum mismatch"), std::string::npos);
  EXPECT_EQ(decode_done_.Wait(20)->code(), absl::StatusCode::kDataLoss);
  auto prefill = prefill_done_.Wait(20);
  ASSERT_TRUE(prefill.has_value());
  EXPECT_EQ(prefill->code(), absl::StatusCode::kAborted);
  EXPECT_NE(prefill->message().find("checksum mismatch"), std::string::npos) << *prefill;
  EXPECT_EQ(decode_agent_->metrics().transfer_failures, 1u);
  auto good = RunRoom(21, 6);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_TRUE(decode_agent_->Ack(21).ok());
}

TEST_P(RoomTest, ShipChecksSegmentLengthsAndRanges) {
  ASSERT_TRUE(prefill_agent_->ExpectRoom(30, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(30, "127.0.0.1", port(), Dest(4), decode_done_.Callback()).ok());
  ASSERT_TRUE(prefill_agent_->WaitDestination(30, 5s).ok());
  auto src = Source(4);
  src[2].length -= 1;
  absl::Status status = prefill_agent_->Ship(30, 0, src);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("segment 2"), std::string::npos) << status;
  EXPECT_EQ(prefill_agent_->Ship(31, 0, src).code(), absl::StatusCode::kNotFound);
}

TEST_P(RoomTest, ShipPastTheDestinationIsRefused) {
  ASSERT_TRUE(prefill_agent_->ExpectRoom(32, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(32, "127.0.0.1", port(), Dest(4), decode_done_.Callback()).ok());
  ASSERT_TRUE(prefill_agent_->WaitDestination(32, 5s).ok());
  auto src = Source(4);
  EXPECT_EQ(prefill_agent_->Ship(32, 2, src).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(RoomTest, RoomLeaseExpiresOnBothSides) {
  AgentOptions options = testing::FastOptions();
  options.room_lease = 150ms;
  Start(options, testing::FastOptions());
  ASSERT_TRUE(prefill_agent_->ExpectRoom(40, prefill_done_.Callback()).ok());
  auto status = prefill_done_.Wait(40);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(status->code(), absl::StatusCode::kDeadlineExceeded) << *status;
  EXPECT_NE(status->message().find("no destination"), std::string::npos);

  AgentOptions decode = testing::FastOptions();
  decode.room_lease = 150ms;
  Start(testing::FastOptions(), decode);
  ASSERT_TRUE(prefill_agent_->ExpectRoom(41, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(41, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  auto waited = decode_agent_->WaitCompletion(41, 5s);
  EXPECT_EQ(waited.status().code(), absl::StatusCode::kDeadlineExceeded) << waited.status();
  EXPECT_EQ(decode_done_.Wait(41)->code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(prefill_done_.Wait(41)->code(), absl::StatusCode::kAborted);  // decode told prefill
}

TEST_P(RoomTest, WaitTimeoutsLeaveTheRoomLive) {
  ASSERT_TRUE(prefill_agent_->ExpectRoom(42, prefill_done_.Callback()).ok());
  EXPECT_EQ(prefill_agent_->WaitDestination(42, 10ms).status().code(), absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(decode_agent_->Register(42, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  EXPECT_EQ(decode_agent_->WaitCompletion(42, 10ms).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(prefill_agent_->WaitDestination(42, 5s).ok());
}

TEST_P(RoomTest, SilentDecodeLosesItsLeaseOnPrefill) {
  AgentOptions decode = testing::FastOptions();
  decode.control.send_heartbeats = false;
  Start(testing::FastOptions(), decode);
  ASSERT_TRUE(prefill_agent_->ExpectRoom(50, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(50, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  auto prefill = prefill_done_.Wait(50);
  ASSERT_TRUE(prefill.has_value());
  EXPECT_EQ(prefill->code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(prefill->message().find("heartbeats"), std::string::npos) << *prefill;
  // Prefill closed the connection, so decode's room fails too.
  EXPECT_EQ(decode_done_.Wait(50)->code(), absl::StatusCode::kUnavailable);
}

TEST_P(RoomTest, SilentPrefillLosesItsLeaseOnDecode) {
  AgentOptions prefill = testing::FastOptions();
  prefill.control.send_heartbeats = false;
  Start(prefill, testing::FastOptions());
  ASSERT_TRUE(prefill_agent_->ExpectRoom(51, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(51, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  auto waited = decode_agent_->WaitCompletion(51, 10s);
  EXPECT_EQ(waited.status().code(), absl::StatusCode::kUnavailable) << waited.status();
  EXPECT_NE(waited.status().message().find("heartbeats"), std::string::npos) << waited.status();
  EXPECT_EQ(prefill_done_.Wait(51)->code(), absl::StatusCode::kUnavailable);
}

TEST_P(RoomTest, PrefillGoingAwayFailsDecodeRoomsFast) {
  ASSERT_TRUE(prefill_agent_->ExpectRoom(60, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(60, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  ASSERT_TRUE(prefill_agent_->WaitDestination(60, 5s).ok());
  prefill_agent_.reset();
  EXPECT_EQ(prefill_done_.Wait(60)->code(), absl::StatusCode::kUnavailable);
  auto decode = decode_done_.Wait(60);
  ASSERT_TRUE(decode.has_value());
  EXPECT_EQ(decode->code(), absl::StatusCode::kUnavailable) << *decode;
  EXPECT_EQ(decode_agent_->connection_count(), 0u);
}

TEST_P(RoomTest, DecodeGoingAwayFailsPrefillRoomsFast) {
  ASSERT_TRUE(prefill_agent_->ExpectRoom(61, prefill_done_.Callback()).ok());
  ASSERT_TRUE(decode_agent_->Register(61, "127.0.0.1", port(), Dest(2), decode_done_.Callback()).ok());
  ASSERT_TRUE(prefill_agent_->WaitDestination(61, 5s).ok());
  decode_agent_.reset();
  auto prefill = prefill_done_.Wait(61);
  ASSERT_TRUE(prefill.has_value());
  EXPECT_EQ(prefill->code(), absl::StatusCode::kUnavailable) << *prefill;
  auto src = Source(2);
  EXPECT_FALSE(prefill_agent_->Ship(61, 0, src).ok());
}

std::vector<std::string> Transports() {
#ifdef TANDEM_TRANSFER_TEST_UCX
  return {"loopback", "ucx-tcp", "ucx-sm"};
#else
  return {"loopback"};
#endif
}

INSTANTIATE_TEST_SUITE_P(Transports, RoomTest, ::testing::ValuesIn(Transports()), [](const auto& info) {
  std::string name = info.param;
  std::erase(name, '-');
  return name;
});

}  // namespace
}  // namespace tandem::transfer
