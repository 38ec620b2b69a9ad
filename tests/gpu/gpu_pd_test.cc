// Prefill/decode disaggregation with both schedulers on one GPU: the forward on the device, the pools in
// device memory, the hand-over copying the manifest's segments device to device (the in-process stand-in
// for the UCX link, as in tests/unit/engine/pd_scheduler_test.cc). The decoded tokens equal a mixed GPU
// scheduler's, the checksum (read back from device memory) catches a corrupted byte, and every page
// comes back on both sides.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <random>

#include <gtest/gtest.h>

#include "common/engine/device_backend.h"
#include "common/engine/engine.h"
#include "common/engine/paged_state.h"
#include "common/engine/scheduler.h"
#include "common/model/generator.h"
#include "tests/gpu/tiny_checkpoint.h"
#include "common/model/weights.h"

namespace tandem::engine {
namespace {


std::shared_ptr<const model::ModelWeights> Tiny() { return testing::TinyCheckpointWeights(); }

// One side: its own device forward and device pools.
struct Side {
  DeviceBackend backend;
  std::unique_ptr<cache::StatePools> pools;
  std::unique_ptr<Scheduler> scheduler;
};

std::unique_ptr<Side> MakeSide() {
  auto side = std::make_unique<Side>();
  auto backend = MakeCudaBackend(Tiny(), 0, {.dense = CudaDense::kF32});
  if (!backend.ok()) throw std::runtime_error(backend.status().ToString());
  side->backend = std::move(*backend);
  const auto& config = Tiny()->config;
  auto layout = StageLayoutFor(config, 0, static_cast<int>(config.num_hidden_layers), true);
  if (!layout.ok()) throw std::runtime_error(layout.status().ToString());
  auto pools = cache::StatePools::Create(CacheShapesFor(config, 256), *layout,
                                         {.token_pages = 24, .window_pages = 8, .c4_state_slots = 8, .c128_state_slots = 8},
                                         side->backend.allocator, side->backend.copy);
  if (!pools.ok()) throw std::runtime_error(pools.status().ToString());
  side->pools = std::move(*pools);
  SchedulerOptions options{.chunked_prefill_size = 256, .max_running_requests = 8, .enable_prefix_cache = false};
  side->scheduler = std::make_unique<Scheduler>(side->backend.runner.get(), side->pools.get(), options);
  return side;
}

// Both link roles over one room table; Ship copies device bytes from the prefill pools to the decode pools.
class DeviceLinks final : public PrefillLink, public DecodeLink {
 public:
  DeviceLinks(cache::StatePools* prefill, cache::StatePools* decode) : prefill_(prefill), decode_(decode) {}
  struct Room {
    std::optional<StateManifest> destination;
    std::optional<Handoff> handoff;
    std::optional<absl::Status> ack, aborted;
  };
  std::map<uint64_t, Room> rooms;
  bool corrupt_next_ship = false;

  absl::Status Expect(uint64_t) override { return absl::OkStatus(); }
  std::optional<absl::Status> DestinationReady(uint64_t room) override {
    Room& r = rooms[room];
    if (r.aborted) return *r.aborted;
    if (!r.destination) return std::nullopt;
    return absl::OkStatus();
  }
  absl::Status Ship(uint64_t room, const StateManifest& source, std::span<const size_t> segments) override {
    Room& r = rooms[room];
    for (size_t i : segments) {
      const auto& a = source.segments()[i];
      const auto& b = r.destination->segments()[i];
      if (a.length != b.length) return absl::InternalError("segment lengths differ");
      TANDEM_RETURN_IF_ERROR(decode_->Copy(decode_->region(b.pool).data() + b.offset,
                                           prefill_->region(a.pool).data() + a.offset, static_cast<size_t>(a.length)));
    }
    if (corrupt_next_ship && !segments.empty()) {
      corrupt_next_ship = false;
      const auto& b = r.destination->segments()[segments.front()];
      uint8_t* p = decode_->region(b.pool).data() + b.offset;
      uint8_t byte = 0;
      TANDEM_RETURN_IF_ERROR(decode_->Copy(&byte, p, 1));
      byte ^= 0x40;
      TANDEM_RETURN_IF_ERROR(decode_->Copy(p, &byte, 1));
    }
    return absl::OkStatus();
  }
  absl::Status Complete(uint64_t room, const Handoff& handoff) override {
    rooms[room].handoff = handoff;
    return absl::OkStatus();
  }
  std::optional<absl::Status> Acknowledged(uint64_t room) override { return rooms[room].ack; }
  void Abort(uint64_t room, const absl::Status& reason) override { rooms[room].aborted = reason; }
  absl::Status Register(const RoomInfo& room, const StateManifest& destination) override {
    rooms[room.room].destination = destination;
    return absl::OkStatus();
  }
  std::optional<absl::StatusOr<Handoff>> Poll(uint64_t room) override {
    Room& r = rooms[room];
    if (!r.handoff) return std::nullopt;
    return absl::StatusOr<Handoff>(*r.handoff);
  }
  void Acknowledge(uint64_t room, const absl::Status& status) override { rooms[room].ack = status; }

 private:
  cache::StatePools* prefill_;
  cache::StatePools* decode_;
};

struct Seen {
  std::vector<int32_t> tokens;
  bool finished = false;
  absl::Status status;
};

class GpuPdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    prefill_ = MakeSide();
    decode_ = MakeSide();
    mixed_ = MakeSide();
    links_ = std::make_unique<DeviceLinks>(prefill_->pools.get(), decode_->pools.get());
    prefill_->scheduler->SetRole(EngineRole::kPrefill, links_.get(), nullptr);
    decode_->scheduler->SetRole(EngineRole::kDecode, nullptr, links_.get());
    for (Side* s : {prefill_.get(), decode_.get()}) {
      for (const auto& u : s->pools->Usage()) initial_free_[s][u.name] = u.free;
    }
  }
  NewRequest Request(const std::string& id, EngineRole role, uint64_t room, std::vector<int32_t> prompt) {
    NewRequest r;
    r.id = id;
    r.role = role;
    r.room = {room, role == EngineRole::kDecode ? "127.0.0.1" : "", role == EngineRole::kDecode ? 8998 : 0};
    r.prompt = std::move(prompt);
    r.sampling.temperature = 0.0;
    r.sampling.max_new_tokens = 12;
    r.sampling.ignore_eos = true;
    const std::string key = std::string(EngineRoleName(role)) + ":" + id;
    r.sink = [this, key](RequestUpdate&& u) {
      Seen& s = seen_[key];
      for (const auto& t : u.tokens) s.tokens.push_back(t.token);
      if (u.finished) {
        s.finished = true;
        s.status = u.status;
      }
    };
    return r;
  }
  void RunAll() {
    for (int i = 0; i < 100000; ++i) {
      if (prefill_->scheduler->idle() && decode_->scheduler->idle() && mixed_->scheduler->idle()) return;
      ASSERT_TRUE(prefill_->scheduler->Step().ok());
      ASSERT_TRUE(decode_->scheduler->Step().ok());
      ASSERT_TRUE(mixed_->scheduler->Step().ok());
    }
    FAIL() << "schedulers did not go idle";
  }
  void ExpectAllPagesBack() {
    for (Side* s : {prefill_.get(), decode_.get()}) {
      for (const auto& u : s->pools->Usage()) EXPECT_EQ(u.free, initial_free_[s][u.name]) << u.name;
      EXPECT_TRUE(s->pools->CheckAccounting().ok());
    }
  }
  std::vector<int32_t> Prompt(int64_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (auto& id : ids) id = static_cast<int32_t>(2 + rng() % 129000);
    return ids;
  }

  std::unique_ptr<Side> prefill_, decode_, mixed_;
  std::unique_ptr<DeviceLinks> links_;
  std::map<Side*, std::map<std::string, int64_t>> initial_free_;
  std::map<std::string, Seen> seen_;
};

TEST_F(GpuPdTest, DisaggregatedTokensEqualTheMixedSchedulerOnTheGpu) {
  const std::vector<int64_t> lengths = {1, 127, 128, 300, 513, 700};
  for (size_t i = 0; i < lengths.size(); ++i) {
    const auto prompt = Prompt(lengths[i], static_cast<uint32_t>(i) + 17);
    const std::string id = "r" + std::to_string(i);
    const uint64_t room = 0x8000000000000000ull + i;
    ASSERT_TRUE(prefill_->scheduler->Add(Request(id, EngineRole::kPrefill, room, prompt)).ok());
    ASSERT_TRUE(decode_->scheduler->Add(Request(id, EngineRole::kDecode, room, prompt)).ok());
    ASSERT_TRUE(mixed_->scheduler->Add(Request(id, EngineRole::kMixed, 0, prompt)).ok());
  }
  RunAll();
  int identical = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const std::string id = "r" + std::to_string(i);
    const Seen& p = seen_["prefill:" + id];
    const Seen& d = seen_["decode:" + id];
    const Seen& m = seen_["mixed:" + id];
    ASSERT_TRUE(p.finished && d.finished && m.finished) << id;
    ASSERT_TRUE(p.status.ok()) << id << ": " << p.status;
    ASSERT_TRUE(d.status.ok()) << id << ": " << d.status;
    ASSERT_EQ(d.tokens.size(), 12u) << id;
    ASSERT_FALSE(m.tokens.empty());
    EXPECT_EQ(d.tokens.front(), m.tokens.front()) << id << ": the first token comes from the same prefill";
    identical += d.tokens == m.tokens;
  }
  std::printf("[ pd-gpu   ] %d/%zu requests decode exactly the mixed scheduler's tokens\n", identical, lengths.size());
  // Decode batches differ from the mixed scheduler's, so an f32 GEMM may sum in another order; only a
  // near-tie can flip a greedy token.
  EXPECT_GE(identical, static_cast<int>(lengths.size()) - 1);
  ExpectAllPagesBack();
}

TEST_F(GpuPdTest, CorruptedDeviceTransferIsCaughtByTheChecksum) {
  links_->corrupt_next_ship = true;
  const auto prompt = Prompt(400, 5);
  ASSERT_TRUE(prefill_->scheduler->Add(Request("c", EngineRole::kPrefill, 77, prompt)).ok());
  ASSERT_TRUE(decode_->scheduler->Add(Request("c", EngineRole::kDecode, 77, prompt)).ok());
  RunAll();
  const Seen& d = seen_["decode:c"];
  ASSERT_TRUE(d.finished);
  EXPECT_EQ(d.status.code(), absl::StatusCode::kDataLoss) << d.status;
  ExpectAllPagesBack();
}

// The CUDA side of PD over device IPC (MakeCudaDeviceIpc), in one process: a pool region exports as a
// cudaIpcMemHandle_t; opening one's own export is refused by CUDA (the links never try: another process is
// required, common/transfer/device_ipc.h), and the refusal is a clean status that leaves the device usable;
// the IPC stream's copies land device to device and InvertByte flips one byte. The two-process path itself
// runs in tools/scripts/device-stack.sh.
TEST(GpuDeviceIpc, ExportOpenCopyAndInvert) {
  auto ipc = MakeCudaDeviceIpc(0);
  ASSERT_TRUE(ipc.ok()) << ipc.status();
  std::printf("[ ipc      ] %s\n", (*ipc)->location().c_str());
  constexpr size_t kBytes = 1 << 20;
  void* src = nullptr;
  void* dst = nullptr;
  ASSERT_EQ(cudaMalloc(&src, kBytes), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dst, kBytes), cudaSuccess);
  auto handle = (*ipc)->Export(src);
  ASSERT_TRUE(handle.ok()) << handle.status();
  EXPECT_EQ(handle->size(), sizeof(cudaIpcMemHandle_t));
  const std::vector<std::string> handles = {*handle};
  auto own = (*ipc)->Open(handles);
  std::printf("[ ipc      ] opening this process's own export: %s\n", own.ok() ? "mapped" : std::string(own.status().message()).c_str());
  if (!own.ok()) {
    EXPECT_NE(own.status().message().find("cudaIpcOpenMemHandle"), std::string::npos) << own.status();
  }
  own = absl::InternalError("dropped");  // unmaps, if CUDA mapped it
  auto bad = (*ipc)->Open(std::vector<std::string>{std::string(3, 'x')});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << bad.status();
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "a refused open must not leave a sticky error";

  std::vector<uint8_t> pattern(kBytes), back(kBytes);
  for (size_t i = 0; i < kBytes; ++i) pattern[i] = static_cast<uint8_t>(i * 7 + 3);
  ASSERT_EQ(cudaMemcpy(src, pattern.data(), kBytes, cudaMemcpyHostToDevice), cudaSuccess);
  // From pageable memory cudaMemcpy may return before its DMA lands, and the IPC stream is non-blocking (it
  // does not wait on the legacy stream): without this the copy below raced the upload (failed once on H200).
  // The engines' own copies follow a forward that ends in a stream synchronize.
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_TRUE((*ipc)->copier().Enqueue(dst, src, kBytes).ok());
  auto fence = (*ipc)->copier().Fence();
  ASSERT_TRUE(fence.ok()) << fence.status();
  ASSERT_TRUE((*fence)().ok());
  ASSERT_EQ(cudaMemcpy(back.data(), dst, kBytes, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, pattern);
  ASSERT_TRUE((*ipc)->InvertByte(static_cast<uint8_t*>(dst) + 5).ok());
  ASSERT_EQ(cudaMemcpy(back.data(), dst, kBytes, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back[5], static_cast<uint8_t>(~pattern[5]));
  EXPECT_EQ(back[6], pattern[6]);
  cudaFree(src);
  cudaFree(dst);
}

}  // namespace
}  // namespace tandem::engine
