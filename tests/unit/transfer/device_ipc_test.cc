// Device IPC negotiation (device_ipc.h) without a GPU: the new frames round-trip and refuse forged input,
// --pd-transfer parses, and over loopback agents with a fake device peer (memcpy into a buffer standing for
// decode's device pools) a room goes device to device when both sides can, is verified by decode over its
// "device" memory (a flipped byte is DATA_LOSS), and falls back to staged for a peer without the capability
// or when the open fails; --pd-transfer ipc refuses at handshake, naming why.
#include <gtest/gtest.h>

#include <cstring>

#include "common/transfer/checksum.h"
#include "common/transfer/handshake.h"
#include "common/transfer/loopback_transport.h"
#include "tests/unit/transfer/test_util.h"

namespace tandem::transfer {
namespace {

using namespace std::chrono_literals;
using testing::DoneRecorder;

constexpr uint64_t kPage = 4096;
constexpr size_t kPages = 4;

TEST(PdTransferFlag, ParsesTheThreeModesAndRefusesOthers) {
  EXPECT_EQ(*ParsePdTransfer("auto"), PdTransfer::kAuto);
  EXPECT_EQ(*ParsePdTransfer("staged"), PdTransfer::kStaged);
  EXPECT_EQ(*ParsePdTransfer("ipc"), PdTransfer::kIpc);
  for (const char* mode : {"auto", "staged", "ipc"}) EXPECT_STREQ(PdTransferName(*ParsePdTransfer(mode)), mode);
  auto bad = ParsePdTransfer("nccl");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("expected auto, staged or ipc"), std::string::npos) << bad.status();
}

DeviceExport TestExport(size_t regions) {
  DeviceExport e;
  e.host_id = LocalHostId();
  e.process_token = LocalProcessToken() + 1;  // "another process" of this host
  e.location = "GPU 0 (fake)";
  for (size_t i = 0; i < regions; ++i) e.regions.push_back({kPages * kPage, std::string(64, static_cast<char>('a' + i))});
  return e;
}

TEST(DeviceIpcWire, ExportAndReplyRoundTripAndTruncationsAreRefused) {
  const DeviceExport e = TestExport(2);
  auto decoded = DecodeDeviceExport(Encode(e));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->host_id, e.host_id);
  EXPECT_EQ(decoded->process_token, e.process_token);
  EXPECT_EQ(decoded->location, e.location);
  ASSERT_EQ(decoded->regions.size(), 2u);
  EXPECT_EQ(decoded->regions[1].handle, e.regions[1].handle);
  EXPECT_EQ(decoded->regions[1].size, e.regions[1].size);
  const std::string bytes = Encode(e);
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto cut = DecodeDeviceExport(std::string_view(bytes).substr(0, n));
    ASSERT_FALSE(cut.ok()) << "prefix of " << n << " bytes was accepted";
    EXPECT_NE(cut.status().message().find("DEVICE_REGIONS"), std::string::npos) << cut.status();
  }
  EXPECT_FALSE(DecodeDeviceExport(bytes + "x").ok());

  auto reply = DecodeDeviceRegionsReply(Encode(DeviceRegionsReply{false, "cudaIpcOpenMemHandle: invalid"}));
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_FALSE(reply->accepted);
  EXPECT_EQ(reply->reason, "cudaIpcOpenMemHandle: invalid");
  EXPECT_TRUE(DecodeDeviceRegionsReply(Encode(DeviceRegionsReply{true, ""}))->accepted);
  std::string forged = Encode(DeviceRegionsReply{true, ""});
  forged[0] = 7;
  EXPECT_FALSE(DecodeDeviceRegionsReply(forged).ok());
  // The new frame types pass the header check; one past them does not.
  for (FrameType type : {FrameType::kDeviceRegions, FrameType::kDeviceRegionsReply}) {
    const std::string frame = EncodeFrame(type, "");
    auto header = ParseFrameHeader(frame, kDefaultMaxFrameBytes);
    ASSERT_TRUE(header.ok()) << header.status();
    EXPECT_EQ(header->type, type);
  }
  std::string unknown = EncodeFrame(FrameType::kDeviceRegionsReply, "");
  unknown[4] = 13;
  EXPECT_FALSE(ParseFrameHeader(unknown, kDefaultMaxFrameBytes).ok());
}

TEST(DeviceIpcNegotiation, PrefillAsksOnlyWhenBothSidesCan) {
  const uint64_t offered = kRequiredCapabilities | kCapabilityDeviceIpc, old_peer = kRequiredCapabilities;
  EXPECT_TRUE(*WantDeviceRegions(PdTransfer::kAuto, true, offered));
  EXPECT_FALSE(*WantDeviceRegions(PdTransfer::kAuto, true, old_peer));  // old or CPU decode: staged
  EXPECT_FALSE(*WantDeviceRegions(PdTransfer::kAuto, false, offered));  // CPU prefill: staged
  EXPECT_FALSE(*WantDeviceRegions(PdTransfer::kStaged, true, offered));
  EXPECT_TRUE(*WantDeviceRegions(PdTransfer::kIpc, true, offered));
  auto no_offer = WantDeviceRegions(PdTransfer::kIpc, true, old_peer);
  ASSERT_FALSE(no_offer.ok());
  EXPECT_EQ(no_offer.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(no_offer.status().message().find("--pd-transfer ipc: decode offers no device IPC"), std::string::npos) << no_offer.status();
  auto cannot = WantDeviceRegions(PdTransfer::kIpc, false, offered);
  ASSERT_FALSE(cannot.ok());
  EXPECT_NE(cannot.status().message().find("needs --device cuda"), std::string::npos) << cannot.status();
  // The optional bit never makes peers incompatible.
  Handshake prefill = testing::TestHandshake(), decode = testing::TestHandshake();
  decode.capabilities |= kCapabilityDeviceIpc;
  EXPECT_TRUE(CheckCompatible(prefill, decode).ok());
}

TEST(DeviceIpcNegotiation, OnlyAnotherProcessOfThisHostIsMappable) {
  const std::vector<RemoteRegion> hello = {{"c4_kv", 0, kPages * kPage, ""}};
  EXPECT_TRUE(CheckMappable(TestExport(1), hello).ok());
  DeviceExport other_host = TestExport(1);
  other_host.host_id = "another-boot-id/elsewhere";
  auto s = CheckMappable(other_host, hello);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("another host"), std::string::npos) << s;
  DeviceExport self = TestExport(1);
  self.process_token = LocalProcessToken();
  EXPECT_NE(CheckMappable(self, hello).message().find("this very process"), std::string::npos);
  EXPECT_FALSE(CheckMappable(TestExport(2), hello).ok());  // region count
  DeviceExport smaller = TestExport(1);
  smaller.regions[0].size -= 1;
  EXPECT_NE(CheckMappable(smaller, hello).message().find("has"), std::string::npos);
  EXPECT_FALSE(LocalHostId().empty());
}

// Stands for decode's device pools: prefill "maps" it and copies from its own "device" pools into it.
struct FakeDevice {
  std::vector<uint8_t> prefill_live = std::vector<uint8_t>(kPages * kPage);
  std::vector<uint8_t> decode_live = std::vector<uint8_t>(kPages * kPage);
  int opens = 0, copies = 0, closes = 0;
};

class FakePeer final : public DevicePeer {
 public:
  explicit FakePeer(FakeDevice* device) : device_(device) {}
  ~FakePeer() override { ++device_->closes; }
  absl::Status Copy(std::span<const Segment> src, std::span<const Segment> dst) override {
    for (size_t i = 0; i < src.size(); ++i) {
      std::memcpy(device_->decode_live.data() + dst[i].offset, device_->prefill_live.data() + src[i].offset, src[i].length);
    }
    ++device_->copies;
    return absl::OkStatus();
  }
  absl::Status InvertByte(const Segment& dst) override {
    device_->decode_live[dst.offset] = static_cast<uint8_t>(~device_->decode_live[dst.offset]);
    return absl::OkStatus();
  }

 private:
  FakeDevice* device_;
};

class DeviceIpcAgentsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // The registered (host) regions: prefill's holds the same bytes as its live pools, as after staging.
    src_ = testing::RegisterBuffer(prefill_transport_, "c4_kv", kPages * kPage, 3);
    dst_ = testing::RegisterBuffer(decode_transport_, "c4_kv", kPages * kPage, 0);
    device_.prefill_live = src_.bytes;
  }
  void TearDown() override {
    decode_.reset();
    prefill_.reset();
  }

  PrefillDeviceIpc PrefillSide(PdTransfer mode, bool open_fails = false) {
    PrefillDeviceIpc ipc;
    ipc.mode = mode;
    ipc.open = [this, open_fails](const DeviceExport& peer) -> absl::StatusOr<std::shared_ptr<DevicePeer>> {
      ++device_.opens;
      EXPECT_EQ(peer.regions.size(), 1u);
      if (open_fails) return absl::InternalError("cudaIpcOpenMemHandle: invalid resource handle (fake)");
      return std::shared_ptr<DevicePeer>(std::make_shared<FakePeer>(&device_));
    };
    return ipc;
  }
  DecodeDeviceIpc DecodeSide(PdTransfer mode) {
    DecodeDeviceIpc ipc;
    ipc.mode = mode;
    ipc.local = TestExport(1);
    ipc.device_checksum = [this](std::span<const Segment> segments) -> absl::StatusOr<uint64_t> {
      ++device_checksums_;
      MemoryRegion live{"c4_kv", device_.decode_live.data(), device_.decode_live.size()};
      return ChecksumSegments(std::span<const MemoryRegion>(&live, 1), segments);
    };
    return ipc;
  }
  void Start(PrefillDeviceIpc prefill_ipc, DecodeDeviceIpc decode_ipc) {
    auto prefill = PrefillAgent::Create(&prefill_transport_, testing::TestHandshake(), testing::FastOptions(), "127.0.0.1", 0,
                                        std::move(prefill_ipc));
    ASSERT_TRUE(prefill.ok()) << prefill.status();
    prefill_ = std::move(*prefill);
    auto decode = DecodeAgent::Create(&decode_transport_, testing::TestHandshake(), testing::FastOptions(), std::move(decode_ipc));
    ASSERT_TRUE(decode.ok()) << decode.status();
    decode_ = std::move(*decode);
    prefill_->set_on_room_transferred([this](RoomId, uint64_t, std::chrono::nanoseconds, bool ipc) { prefill_saw_ipc_ = ipc; });
  }
  std::vector<Segment> Source() { return testing::PageSegments(src_.region, kPages, kPage, 1, 0); }
  std::vector<Segment> Dest() { return testing::PageSegments(dst_.region, kPages, kPage, 1, 0); }

  // One room through Ship + Complete; returns decode's WaitCompletion.
  absl::StatusOr<Completion> RunRoom(RoomId room) {
    EXPECT_TRUE(prefill_->ExpectRoom(room, prefill_done_.Callback()).ok());
    TANDEM_RETURN_IF_ERROR(decode_->Register(room, "127.0.0.1", prefill_->port(), Dest(), decode_done_.Callback()));
    TANDEM_RETURN_IF_ERROR(prefill_->WaitDestination(room, 10s).status());
    const auto source = Source();
    TANDEM_RETURN_IF_ERROR(prefill_->Ship(room, 0, source));
    TANDEM_ASSIGN_OR_RETURN(const uint64_t checksum, ChecksumSegments(prefill_transport_.regions(), source));
    TANDEM_RETURN_IF_ERROR(prefill_->Complete(room, Completion{5, checksum, ""}));
    return decode_->WaitCompletion(room, 10s);
  }
  bool HostCopyUntouched() const {
    return std::all_of(dst_.bytes.begin(), dst_.bytes.end(), [](uint8_t b) { return b == 0; });
  }

  LoopbackTransport prefill_transport_, decode_transport_;
  testing::Buffer src_, dst_;
  FakeDevice device_;
  int device_checksums_ = 0;
  std::atomic<bool> prefill_saw_ipc_{false};
  DoneRecorder prefill_done_, decode_done_;
  std::unique_ptr<PrefillAgent> prefill_;
  std::unique_ptr<DecodeAgent> decode_;
};

TEST_F(DeviceIpcAgentsTest, BothSidesAbleGoesDeviceToDeviceAndDecodeVerifiesItsDeviceMemory) {
  Start(PrefillSide(PdTransfer::kAuto), DecodeSide(PdTransfer::kAuto));
  auto completion = RunRoom(1);
  ASSERT_TRUE(completion.ok()) << completion.status();
  EXPECT_TRUE(completion->device_ipc);
  EXPECT_TRUE(decode_->device_ipc("127.0.0.1", prefill_->port()));
  EXPECT_EQ(device_.opens, 1);
  EXPECT_GE(device_.copies, 1);
  EXPECT_EQ(device_checksums_, 1);
  EXPECT_EQ(device_.decode_live, src_.bytes);
  EXPECT_TRUE(HostCopyUntouched()) << "an IPC room must not go through the transport";
  EXPECT_EQ(prefill_transport_.stats().put_calls, 0u);
  ASSERT_TRUE(decode_->Ack(1).ok());
  EXPECT_EQ(prefill_done_.Wait(1), absl::OkStatus());
  EXPECT_TRUE(prefill_saw_ipc_.load());
  // A second room reuses the mapping of the cached connection.
  ASSERT_TRUE(RunRoom(2).ok());
  EXPECT_EQ(device_.opens, 1);
  ASSERT_TRUE(decode_->Ack(2).ok());
  // The mapping is closed when the peer goes away.
  decode_.reset();
  prefill_.reset();
  EXPECT_EQ(device_.closes, 1);
}

TEST_F(DeviceIpcAgentsTest, AFlippedByteInTheDeviceCopyIsDataLoss) {
  Start(PrefillSide(PdTransfer::kIpc), DecodeSide(PdTransfer::kIpc));
  prefill_transport_.CorruptNextPuts(1);  // the same hook as for puts (TANDEM_TRANSFER_CORRUPT_PUTS)
  auto completion = RunRoom(3);
  ASSERT_FALSE(completion.ok());
  EXPECT_EQ(completion.status().code(), absl::StatusCode::kDataLoss) << completion.status();
  EXPECT_NE(completion.status().message().find("checksum mismatch"), std::string::npos) << completion.status();
  EXPECT_EQ(decode_done_.Wait(3)->code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(prefill_done_.Wait(3)->code(), absl::StatusCode::kAborted);
}

TEST_F(DeviceIpcAgentsTest, AFailedOpenFallsBackToStagedForThatPeer) {
  Start(PrefillSide(PdTransfer::kAuto, /*open_fails=*/true), DecodeSide(PdTransfer::kAuto));
  auto completion = RunRoom(4);
  ASSERT_TRUE(completion.ok()) << completion.status();
  EXPECT_FALSE(completion->device_ipc);
  EXPECT_FALSE(decode_->device_ipc("127.0.0.1", prefill_->port()));
  EXPECT_EQ(device_.opens, 1);
  EXPECT_EQ(device_checksums_, 0);
  EXPECT_EQ(dst_.bytes, src_.bytes);  // through the transport
  ASSERT_TRUE(decode_->Ack(4).ok());
  EXPECT_EQ(prefill_done_.Wait(4), absl::OkStatus());
  EXPECT_FALSE(prefill_saw_ipc_.load());
}

TEST_F(DeviceIpcAgentsTest, APeerWithoutTheCapabilityIsStaged) {
  // An old or CPU decode: no export, no capability bit. The prefill never asks and never opens.
  Start(PrefillSide(PdTransfer::kAuto), DecodeDeviceIpc{});
  auto completion = RunRoom(5);
  ASSERT_TRUE(completion.ok()) << completion.status();
  EXPECT_FALSE(completion->device_ipc);
  EXPECT_EQ(device_.opens, 0);
  EXPECT_EQ(dst_.bytes, src_.bytes);
  ASSERT_TRUE(decode_->Ack(5).ok());
}

TEST_F(DeviceIpcAgentsTest, StagedModeNeverMaps) {
  Start(PrefillSide(PdTransfer::kStaged), DecodeSide(PdTransfer::kAuto));
  auto completion = RunRoom(6);
  ASSERT_TRUE(completion.ok()) << completion.status();
  EXPECT_FALSE(completion->device_ipc);
  EXPECT_EQ(device_.opens, 0);
  ASSERT_TRUE(decode_->Ack(6).ok());
}

TEST_F(DeviceIpcAgentsTest, ForcedIpcPrefillRefusesADecodeWithoutIt) {
  Start(PrefillSide(PdTransfer::kIpc), DecodeDeviceIpc{});
  absl::Status s = decode_->Connect("127.0.0.1", prefill_->port());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("--pd-transfer ipc: decode offers no device IPC"), std::string::npos) << s;
}

TEST_F(DeviceIpcAgentsTest, ForcedIpcDecodeRefusesAPrefillWithoutIt) {
  Start(PrefillDeviceIpc{}, DecodeSide(PdTransfer::kIpc));
  absl::Status s = decode_->Connect("127.0.0.1", prefill_->port());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("does not take device IPC"), std::string::npos) << s;
}

TEST_F(DeviceIpcAgentsTest, ForcedIpcWithAFailingOpenIsRefusedNamingTheError) {
  Start(PrefillSide(PdTransfer::kIpc, /*open_fails=*/true), DecodeSide(PdTransfer::kAuto));
  absl::Status s = decode_->Connect("127.0.0.1", prefill_->port());
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("cudaIpcOpenMemHandle: invalid resource handle"), std::string::npos) << s;
  EXPECT_EQ(decode_->connection_count(), 0u);
}

TEST(DeviceIpcAgents, ForcedIpcWithoutDevicePoolsFailsAtCreate) {
  LoopbackTransport transport;
  auto buffer = testing::RegisterBuffer(transport, "c4_kv", kPage, 0);
  DecodeDeviceIpc decode_ipc;
  decode_ipc.mode = PdTransfer::kIpc;
  auto decode = DecodeAgent::Create(&transport, testing::TestHandshake(), testing::FastOptions(), decode_ipc);
  ASSERT_FALSE(decode.ok());
  EXPECT_NE(decode.status().message().find("needs --device cuda"), std::string::npos) << decode.status();
  PrefillDeviceIpc prefill_ipc;
  prefill_ipc.mode = PdTransfer::kIpc;
  auto prefill = PrefillAgent::Create(&transport, testing::TestHandshake(), testing::FastOptions(), "127.0.0.1", 0, prefill_ipc);
  ASSERT_FALSE(prefill.ok());
  EXPECT_NE(prefill.status().message().find("needs --device cuda"), std::string::npos) << prefill.status();
}

}  // namespace
}  // namespace tandem::transfer
