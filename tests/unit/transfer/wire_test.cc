// Wire format, handshake compatibility, checksum and coalescing; forged, truncated and oversize frames sent
// to a live PrefillAgent are refused with a specific error and the server keeps serving.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <random>

#include "common/transfer/checksum.h"
#include "common/transfer/loopback_transport.h"
#include "common/transfer/socket.h"
#include "tests/unit/transfer/test_util.h"

namespace tandem::transfer {
namespace {

using namespace std::chrono_literals;

Handshake FullHandshake() {
  Handshake h = testing::TestHandshake();
  h.transport_kind = "loopback";
  h.transport_address = "loopback:1";
  h.regions = {{"c4_kv", 0x1000, 1 << 20, "key-bytes"}, {"window_kv", 0x2000, 4096, ""}};
  return h;
}

TEST(Wire, HandshakeRoundTrips) {
  const Handshake h = FullHandshake();
  auto decoded = DecodeHandshake(Encode(h));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->descriptor.page_size, 256u);
  EXPECT_EQ(decoded->layout_hash, "layout-abcd");
  ASSERT_EQ(decoded->regions.size(), 2u);
  EXPECT_EQ(decoded->regions[0].key, "key-bytes");
  EXPECT_EQ(decoded->regions[1].size, 4096u);
  EXPECT_EQ(decoded->lease_ms, 0u);
  Handshake leased = FullHandshake();
  leased.lease_ms = 4000;
  auto with_lease = DecodeHandshake(Encode(leased));
  ASSERT_TRUE(with_lease.ok()) << with_lease.status();
  EXPECT_EQ(with_lease->lease_ms, 4000u);
  EXPECT_EQ(with_lease->regions.size(), 2u);
}

// The peer lease is a trailing field: a payload that ends before it (an older peer's) is unknown, 0, and an
// unknown lease is left off, so an older peer's decoder (which refuses trailing bytes) reads the payload.
TEST(Wire, AHandshakeWithoutTheLeaseIsAnOlderPeers) {
  Handshake leased = FullHandshake();
  leased.lease_ms = 4000;
  const std::string old_bytes = Encode(FullHandshake());
  const std::string new_bytes = Encode(leased);
  ASSERT_EQ(new_bytes.size(), old_bytes.size() + 4);
  EXPECT_EQ(new_bytes.substr(0, old_bytes.size()), old_bytes) << "the lease must be the last field";
  auto old_peer = DecodeHandshake(old_bytes);
  ASSERT_TRUE(old_peer.ok()) << old_peer.status();
  EXPECT_EQ(old_peer->lease_ms, 0u);
  EXPECT_EQ(old_peer->layout_hash, "layout-abcd");
  // Part of a lease, or more after it, is still malformed.
  for (size_t extra = 1; extra < 4; ++extra) {
    auto partial = DecodeHandshake(std::string_view(new_bytes).substr(0, old_bytes.size() + extra));
    ASSERT_FALSE(partial.ok()) << extra;
    EXPECT_NE(partial.status().message().find("truncated at field 'lease_ms'"), std::string::npos) << partial.status();
  }
  auto longer = DecodeHandshake(new_bytes + "x");
  ASSERT_FALSE(longer.ok());
  EXPECT_NE(longer.status().message().find("1 trailing bytes"), std::string::npos) << longer.status();
}

TEST(Wire, EveryTruncationIsRefusedNamingTheField) {
  Handshake leased = FullHandshake();
  leased.lease_ms = 4000;
  const std::string bytes = Encode(leased);
  for (size_t n = 0; n < bytes.size(); ++n) {
    if (n == bytes.size() - 4) continue;  // ends where an older peer's does: AHandshakeWithoutTheLeaseIsAnOlderPeers
    auto decoded = DecodeHandshake(std::string_view(bytes).substr(0, n));
    ASSERT_FALSE(decoded.ok()) << "prefix of " << n << " bytes was accepted";
    EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(decoded.status().message().find("field '"), std::string::npos) << decoded.status();
  }
  EXPECT_FALSE(DecodeHandshake(bytes + "x").ok());  // trailing bytes
}

TEST(Wire, RandomMutationsNeverCrash) {
  std::mt19937 rng(5);
  Handshake leased = FullHandshake();
  leased.lease_ms = 4000;
  const std::string hello = Encode(leased);
  const std::string destination = Encode(DestinationMessage{7, {{0, 0, 100}, {1, 64, 32}}});
  const std::string complete = Encode(CompleteMessage{7, 3, 99, "payload"});
  for (int i = 0; i < 20000; ++i) {
    std::string a = hello, b = destination, c = complete;
    for (std::string* s : {&a, &b, &c}) {
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) (*s)[rng() % s->size()] = static_cast<char>(rng());
    }
    (void)DecodeHandshake(a);
    (void)DecodeDestination(b);
    (void)DecodeComplete(c, 1024);
    (void)DecodeRoomStatus(c, "ABORT");
  }
}

TEST(Wire, ForgedCountsAreRefusedBeforeAllocating) {
  std::string forged = Encode(DestinationMessage{7, {}});
  const uint32_t huge = 0xffffffffu;
  std::memcpy(forged.data() + 8, &huge, 4);
  auto decoded = DecodeDestination(forged);
  ASSERT_FALSE(decoded.ok());
  EXPECT_NE(decoded.status().message().find("elements but only"), std::string::npos) << decoded.status();
  std::string long_string = Encode(StatusMessage{absl::StatusCode::kAborted, "x"});
  const uint32_t claimed = 100;
  std::memcpy(long_string.data() + 4, &claimed, 4);
  EXPECT_NE(DecodeStatus(long_string).status().message().find("truncated at field 'message'"), std::string::npos);
  EXPECT_FALSE(DecodeComplete(Encode(CompleteMessage{1, 2, 3, std::string(2000, 'p')}), 1024).ok());
}

TEST(Wire, FrameHeadersAreChecked) {
  const std::string frame = EncodeFrame(FrameType::kAck, Encode(RoomMessage{1}));
  auto ok = ParseFrameHeader(frame, 1024);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->type, FrameType::kAck);
  EXPECT_EQ(ok->length, 8u);
  std::string bad_magic = frame;
  bad_magic[0] = 'G';
  EXPECT_NE(ParseFrameHeader(bad_magic, 1024).status().message().find("bad frame magic"), std::string::npos);
  std::string bad_type = frame;
  bad_type[4] = 99;
  EXPECT_NE(ParseFrameHeader(bad_type, 1024).status().message().find("unknown frame type 99"), std::string::npos);
  std::string bad_flags = frame;
  bad_flags[6] = 1;
  EXPECT_NE(ParseFrameHeader(bad_flags, 1024).status().message().find("flags"), std::string::npos);
  EXPECT_NE(ParseFrameHeader(frame, 4).status().message().find("exceeds the 4-byte limit"), std::string::npos);
  EXPECT_NE(ParseFrameHeader(frame.substr(0, 5), 1024).status().message().find("truncated"), std::string::npos);
}

// --- handshake compatibility ---------------------------------------------------------------------------

struct Mismatch {
  const char* name;
  void (*apply)(Handshake&);
  const char* message;
};

TEST(Handshake, CompatiblePeersPass) {
  EXPECT_TRUE(CheckCompatible(FullHandshake(), FullHandshake()).ok());
}

TEST(Handshake, EveryMismatchIsNamed) {
  const Mismatch cases[] = {
      {"version", [](Handshake& h) { h.protocol_version = 2; }, "protocol_version: prefill 1, decode 2"},
      {"capabilities", [](Handshake& h) { h.capabilities = kCapabilityChecksum; }, "capabilities: prefill lacks none, decode lacks abort_ack,chunked_ship"},
      {"transport", [](Handshake& h) { h.transport_kind = "ucx"; }, "transport: prefill loopback, decode ucx"},
      {"model", [](Handshake& h) { h.descriptor.model_config_hash = "other"; }, "model_config_hash: prefill cfg-1234, decode other"},
      {"page_size", [](Handshake& h) { h.descriptor.page_size = 128; }, "page_size: prefill 256, decode 128"},
      {"dtype", [](Handshake& h) { h.descriptor.dtype = "bf16"; }, "dtype: prefill fp8_e4m3, decode bf16"},
      {"layers", [](Handshake& h) { h.descriptor.layer_end = 22; }, "layer_range: prefill [0, 43), decode [0, 22)"},
      {"layout", [](Handshake& h) { h.layout_hash = "zzz"; }, "layout_hash: prefill layout-abcd, decode zzz"},
  };
  for (const Mismatch& c : cases) {
    Handshake decode = FullHandshake();
    c.apply(decode);
    absl::Status status = CheckCompatible(FullHandshake(), decode);
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << c.name;
    EXPECT_NE(status.message().find(c.message), std::string::npos) << c.name << ": " << status;
  }
}

// A peer's strings reach the error (and the log) escaped and cut to 64 bytes, however long they are.
TEST(Handshake, APeersLongOrBinaryStringsAreShownCut) {
  Handshake decode = FullHandshake();
  decode.descriptor.model_config_hash = std::string(1 << 20, 'x');
  absl::Status status = CheckCompatible(FullHandshake(), decode);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_LT(status.message().size(), 300u) << status.message().substr(0, 400);
  EXPECT_NE(status.message().find(std::string(64, 'x') + "... (1048576 bytes)"), std::string::npos) << status;
  decode = FullHandshake();
  decode.descriptor.dtype = std::string("bf\n16\x01", 6);
  status = CheckCompatible(FullHandshake(), decode);
  EXPECT_NE(status.message().find("decode bf\\n16\\x01"), std::string::npos) << status;
}

// A prefill agent refuses an incompatible decode agent at Connect, with the difference in the message.
TEST(Handshake, AgentsRefuseIncompatiblePeers) {
  LoopbackTransport prefill_transport, decode_transport;
  auto src = testing::RegisterBuffer(prefill_transport, "c4_kv", 4096, 1);
  auto dst = testing::RegisterBuffer(decode_transport, "c4_kv", 4096, 0);
  auto prefill = PrefillAgent::Create(&prefill_transport, testing::TestHandshake(), testing::FastOptions(), "127.0.0.1", 0);
  ASSERT_TRUE(prefill.ok());
  LayoutDescriptor other = testing::TestDescriptor();
  other.page_size = 128;
  auto decode = DecodeAgent::Create(&decode_transport, LocalHandshake(other, "layout-abcd"), testing::FastOptions());
  ASSERT_TRUE(decode.ok());
  absl::Status status = (*decode)->Connect("127.0.0.1", (*prefill)->port());
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_NE(status.message().find("page_size: prefill 256, decode 128"), std::string::npos) << status;
  EXPECT_EQ((*decode)->connection_count(), 0u);
  EXPECT_EQ((*decode)->metrics().bootstrap_failures, 1u);
  const auto deadline = Clock::now() + 5s;
  while ((*prefill)->metrics().bootstrap_failures == 0 && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
  EXPECT_EQ((*prefill)->metrics().bootstrap_failures, 1u);
  // Nobody listening: UNAVAILABLE naming the address.
  const uint16_t closed_port = (*prefill)->port();
  prefill->reset();
  absl::Status gone = (*decode)->Connect("127.0.0.1", closed_port);
  EXPECT_EQ(gone.code(), absl::StatusCode::kUnavailable) << gone;
}

// --- forged frames against a live bootstrap server ------------------------------------------------------

class ForgedFrames : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = testing::RegisterBuffer(transport_, "c4_kv", 4096, 1);
    AgentOptions options = testing::FastOptions();
    options.control.max_frame_bytes = 1 << 16;
    auto prefill = PrefillAgent::Create(&transport_, testing::TestHandshake(), options, "127.0.0.1", 0);
    ASSERT_TRUE(prefill.ok());
    prefill_ = std::move(*prefill);
  }
  // Sends raw bytes and returns the REFUSE message the server answers with.
  std::string SendAndReadRefusal(const std::string& bytes) {
    auto fd = ConnectTcp("127.0.0.1", prefill_->port(), Clock::now() + 2s);
    EXPECT_TRUE(fd.ok());
    if (!fd.ok()) return "";
    EXPECT_TRUE(WriteAll(*fd, bytes, Clock::now() + 2s).ok());
    auto frame = ReadFrame(*fd, Clock::now() + 5s, 1 << 20);
    ::close(*fd);
    if (!frame.ok()) return std::string(frame.status().message());
    EXPECT_EQ(frame->first.type, FrameType::kRefuse);
    auto refusal = DecodeStatus(frame->second);
    return refusal.ok() ? refusal->message : std::string(refusal.status().message());
  }
  LoopbackTransport transport_;
  testing::Buffer src_;
  std::unique_ptr<PrefillAgent> prefill_;
};

TEST_F(ForgedFrames, AreRefusedWithSpecificErrors) {
  EXPECT_NE(SendAndReadRefusal("GET / HTTP/1.1\r\nHost: x\r\n\r\n").find("bad frame magic"), std::string::npos);
  std::string oversize = EncodeFrame(FrameType::kHello, "");
  const uint32_t huge = 1u << 30;
  std::memcpy(oversize.data() + 8, &huge, 4);
  EXPECT_NE(SendAndReadRefusal(oversize).find("exceeds the 65536-byte limit"), std::string::npos);
  std::string unknown = EncodeFrame(FrameType::kHello, "");
  unknown[4] = 77;
  EXPECT_NE(SendAndReadRefusal(unknown).find("unknown frame type 77"), std::string::npos);
  const std::string hello = Encode(FullHandshake());
  EXPECT_NE(SendAndReadRefusal(EncodeFrame(FrameType::kHello, hello.substr(0, 30))).find("HELLO: truncated at field"),
            std::string::npos);
  EXPECT_NE(SendAndReadRefusal(EncodeFrame(FrameType::kDestination, Encode(DestinationMessage{1, {}}))).find("expected HELLO first"),
            std::string::npos);
  // A decode handshake whose transport address is garbage.
  Handshake bad_address = FullHandshake();
  bad_address.transport_address = "loopback:999999";
  EXPECT_NE(SendAndReadRefusal(EncodeFrame(FrameType::kHello, Encode(bad_address))).find("cannot reach decode's transport"),
            std::string::npos);
  EXPECT_GE(prefill_->metrics().bootstrap_failures, 6u);

  // A forged DESTINATION after a valid handshake: segments outside decode's regions are refused per room.
  LoopbackTransport decode_transport;
  auto dst = testing::RegisterBuffer(decode_transport, "c4_kv", 4096, 0);
  Handshake good = FullHandshake();
  good.transport_address = *decode_transport.LocalAddress();
  good.regions = decode_transport.DescribeRegions();
  auto fd = ConnectTcp("127.0.0.1", prefill_->port(), Clock::now() + 2s);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(WriteAll(*fd, EncodeFrame(FrameType::kHello, Encode(good)), Clock::now() + 2s).ok());
  auto accept = ReadFrame(*fd, Clock::now() + 5s, 1 << 20);
  ASSERT_TRUE(accept.ok()) << accept.status();
  ASSERT_EQ(accept->first.type, FrameType::kHelloAccept);
  ASSERT_TRUE(prefill_->ExpectRoom(5, nullptr).ok());
  ASSERT_TRUE(WriteAll(*fd, EncodeFrame(FrameType::kDestination, Encode(DestinationMessage{5, {{0, 4000, 200}}})), Clock::now() + 2s).ok());
  std::string refusal;
  for (;;) {  // skip heartbeats
    auto frame = ReadFrame(*fd, Clock::now() + 5s, 1 << 20);
    ASSERT_TRUE(frame.ok()) << frame.status();
    if (frame->first.type == FrameType::kHeartbeat) continue;
    ASSERT_EQ(frame->first.type, FrameType::kRoomRefused);
    refusal = DecodeRoomStatus(frame->second, "ROOM_REFUSED")->message;
    break;
  }
  EXPECT_NE(refusal.find("outside region 0"), std::string::npos) << refusal;
  ::close(*fd);

  // The server still serves a well-behaved decode.
  auto decode = DecodeAgent::Create(&decode_transport, testing::TestHandshake(), testing::FastOptions());
  ASSERT_TRUE(decode.ok());
  EXPECT_TRUE((*decode)->Connect("127.0.0.1", prefill_->port()).ok());
}

// Prefill answers with its peer lease only a decode that asked (kCapabilityPeerLease); an older decode's
// HELLO gets the HELLO_ACCEPT it always did, without the trailing field it would refuse.
TEST_F(ForgedFrames, PrefillAdvertisesItsLeaseOnlyToADecodeThatAsks) {
  LoopbackTransport decode_transport;
  auto dst = testing::RegisterBuffer(decode_transport, "c4_kv", 4096, 0);
  auto accept_for = [&](uint64_t extra_capabilities) -> absl::StatusOr<std::pair<std::string, Handshake>> {
    Handshake hello = FullHandshake();
    hello.capabilities |= extra_capabilities;
    hello.transport_address = *decode_transport.LocalAddress();
    hello.regions = decode_transport.DescribeRegions();
    TANDEM_ASSIGN_OR_RETURN(int fd, ConnectTcp("127.0.0.1", prefill_->port(), Clock::now() + 2s));
    absl::Status sent = WriteAll(fd, EncodeFrame(FrameType::kHello, Encode(hello)), Clock::now() + 2s);
    auto frame = ReadFrame(fd, Clock::now() + 5s, 1 << 20);
    ::close(fd);
    TANDEM_RETURN_IF_ERROR(sent);
    if (!frame.ok()) return frame.status();
    if (frame->first.type != FrameType::kHelloAccept) return absl::InternalError(FrameTypeName(frame->first.type));
    TANDEM_ASSIGN_OR_RETURN(Handshake accept, DecodeHandshake(frame->second));
    return std::make_pair(frame->second, accept);
  };
  auto old_decode = accept_for(0);
  ASSERT_TRUE(old_decode.ok()) << old_decode.status();
  EXPECT_EQ(old_decode->second.lease_ms, 0u);
  EXPECT_EQ(old_decode->second.capabilities & kCapabilityPeerLease, 0u);
  EXPECT_EQ(old_decode->first, Encode(old_decode->second)) << "no trailing field for a decode that did not ask";
  auto new_decode = accept_for(kCapabilityPeerLease);
  ASSERT_TRUE(new_decode.ok()) << new_decode.status();
  EXPECT_EQ(new_decode->second.lease_ms, static_cast<uint32_t>(testing::FastOptions().control.lease.count()));
  EXPECT_NE(new_decode->second.capabilities & kCapabilityPeerLease, 0u);
}

// --- checksum and coalescing ----------------------------------------------------------------------------

TEST(Checksum, StreamingEqualsWholeAndEveryByteFlipIsCaught) {
  std::vector<uint8_t> data(1000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 31 + 7);
  const uint64_t whole = ChecksumBytes(data.data(), data.size());
  for (size_t cut : {0, 1, 7, 31, 32, 33, 500, 999}) {
    Checksum64 c;
    c.Update(data.data(), cut);
    c.Update(data.data() + cut, data.size() - cut);
    EXPECT_EQ(c.Finish(), whole) << cut;
  }
  for (size_t i = 0; i < data.size(); ++i) {
    data[i] ^= 0x01;
    EXPECT_NE(ChecksumBytes(data.data(), data.size()), whole) << "flip at " << i;
    data[i] ^= 0x01;
  }
  EXPECT_NE(ChecksumBytes(data.data(), 999), whole);  // length matters
  std::vector<uint8_t> zeros(64, 0);
  EXPECT_NE(ChecksumBytes(zeros.data(), 32), ChecksumBytes(zeros.data(), 64));
}

TEST(Checksum, SegmentsAreCheckedAgainstTheirRegions) {
  std::vector<uint8_t> a(100, 1);
  std::vector<MemoryRegion> regions = {{"a", a.data(), a.size()}};
  std::vector<Segment> inside = {{0, 10, 20}, {0, 50, 50}};
  EXPECT_TRUE(ChecksumSegments(regions, inside).ok());
  std::vector<Segment> outside = {{0, 90, 20}};
  EXPECT_EQ(ChecksumSegments(regions, outside).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Coalesce, MergesRunsContiguousOnBothSidesOnly) {
  std::vector<Segment> src = {{0, 0, 10}, {0, 10, 10}, {0, 20, 10}, {0, 40, 10}, {1, 50, 10}};
  std::vector<Segment> dst = {{0, 100, 10}, {0, 110, 10}, {0, 200, 10}, {0, 210, 10}, {0, 220, 10}};
  std::vector<Segment> s, d;
  CoalesceSegments(src, dst, s, d);
  // [0,1] merge; 2 breaks on dst; 3 continues dst but not src; 4 switches source region.
  ASSERT_EQ(s.size(), 4u);
  EXPECT_EQ(s[0], (Segment{0, 0, 20}));
  EXPECT_EQ(d[0], (Segment{0, 100, 20}));
  EXPECT_EQ(s[1], (Segment{0, 20, 10}));
  EXPECT_EQ(d[1], (Segment{0, 200, 10}));
}

TEST(Coalesce, PutCountDropsForContiguousPages) {
  LoopbackTransport a, b;
  auto src = testing::RegisterBuffer(a, "c4_kv", 64 * 37440, 3);
  auto dst = testing::RegisterBuffer(b, "c4_kv", 64 * 37440, 0);
  auto peer = a.Connect(*b.LocalAddress(), b.DescribeRegions());
  ASSERT_TRUE(peer.ok()) << peer.status();
  auto contiguous = testing::PageSegments(0, 32, 37440, 1, 0);
  auto scattered = testing::PageSegments(0, 32, 37440, 2, 0);
  ASSERT_TRUE(a.Put(*peer, contiguous, contiguous).ok());
  EXPECT_EQ(a.stats().puts_issued, 1u);
  ASSERT_TRUE(a.Put(*peer, contiguous, scattered).ok());
  EXPECT_EQ(a.stats().puts_issued, 1u + 32u);
  EXPECT_EQ(std::memcmp(dst.bytes.data() + 2 * 37440, src.bytes.data() + 37440, 37440), 0);
  EXPECT_EQ(a.stats().bytes_put, 64u * 37440);
  // Mismatched lengths and out-of-range segments are refused, naming the segment.
  auto short_dst = contiguous;
  short_dst[3].length = 5;
  absl::Status mismatch = a.Put(*peer, contiguous, short_dst);
  EXPECT_NE(mismatch.message().find("segment 3"), std::string::npos) << mismatch;
  std::vector<Segment> beyond = {{0, 64 * 37440 - 10, 20}};
  EXPECT_NE(a.Put(*peer, beyond, beyond).message().find("outside region 0"), std::string::npos);
  EXPECT_EQ(a.stats().put_failures, 2u);
}

}  // namespace
}  // namespace tandem::transfer
