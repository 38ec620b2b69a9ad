// A serving engine: the model, its state pools and the scheduler on a thread of their own, with a
// thread-safe front (submit, abort, loads, drain) for the gRPC service.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "common/cache/pools.h"
#include "common/core/status.h"
#include "common/engine/device_backend.h"
#include "common/engine/scheduler.h"
#include "common/engine/staging.h"
#include "common/model/forward.h"
#include "common/model/weights.h"

namespace tandem::engine {

// The transfer links of a prefill or decode engine.
struct DisaggregationLinks {
  std::unique_ptr<PrefillLink> prefill;
  std::unique_ptr<DecodeLink> decode;
};

// The transfer side of a prefill or decode engine, made in two steps: the setup (its transport) exists
// before the pools, so the pools can live in memory the transport allocated (memory that shared-memory
// transports can map into the peer); the links are made once the pools exist and register their memory.
// The engine keeps the setup until after the pools are gone.
class TransferSetup {
 public:
  virtual ~TransferSetup() = default;
  // Where the pools' memory comes from; empty: the heap.
  virtual cache::RegionAllocator allocator() = 0;
  // `wake` nudges the scheduler thread when the other engine answered. `pools` are what the transport
  // ships from and lands in; when `staged.live` is given, the live state is there instead (device pools
  // of the same shapes) and the links copy each segment between the two on the way, with `staged.copier`.
  virtual absl::StatusOr<DisaggregationLinks> MakeLinks(cache::StatePools& pools, std::function<void()> wake,
                                                        StagedPools staged) = 0;
};
using LinkFactory = std::function<absl::StatusOr<std::unique_ptr<TransferSetup>>()>;

struct EngineOptions {
  std::string model_dir;
  EngineRole role = EngineRole::kMixed;
  LinkFactory links;  // required for the prefill and decode roles
  int64_t page_size = 256;
  SchedulerOptions scheduler;
  // Pool memory: an explicit budget wins; else mem_fraction_static of the device's memory (host RAM on
  // the CPU) minus the weights; else kDefaultCpuBudgetBytes.
  int64_t cache_budget_bytes = 0;
  double mem_fraction_static = 0;
  double swa_full_tokens_ratio = 0.8;
  std::optional<model::ExpertDType> expert_dtype;
  bool drop_cache_after_load = false;
  bool deterministic = false;
  int threads = 0;  // CPU threads for the forward (0: all cores)
  std::string device = "cpu";  // "cpu" or "cuda" (the forward and the cache pools on that device)
  int cuda_device = 0;
  CudaDense cuda_dense = CudaDense::kBf16x2;  // how the device runs the dense layers (device_backend.h)
  bool cuda_graphs = true;  // decode steps replay CUDA graphs (--cuda-graphs on|off)
  bool cuda_attention_bf16 = false;  // --cuda-attention bf16 (device_backend.h); f32 by default
  bool cuda_gemm_tuning = true;  // --cuda-gemm-tuning on|off (device_backend.h)
  // Test only: on the CPU, keep the PD engine's pools apart from the transport's memory and stage the
  // hand-over through a host copy, as a GPU engine does (so CPU tests cover that path).
  bool test_staged_pools = false;
  bool show_progress = true;
  static constexpr int64_t kDefaultCpuBudgetBytes = int64_t{1} << 30;
};

struct EngineLoad {
  SchedulerStats scheduler;
  double generation_throughput = 0;  // tokens/s over the last few seconds
};

class Engine {
 public:
  // Loads the weights, sizes the pools, starts the scheduler thread and runs one warm-up request.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request; its sink gets every update on the scheduler thread, the last one with
  // `finished` set. Errors come back here, before anything is queued: INVALID_ARGUMENT (bad input),
  // ALREADY_EXISTS (a live id), RESOURCE_EXHAUSTED (queue full), UNAVAILABLE (draining).
  absl::Status Submit(NewRequest request);
  // Ends a live request; its sink's final update carries `reason`. False when the id is not live.
  bool Abort(const std::string& id, absl::Status reason = absl::AbortedError("aborted by request"));

  EngineLoad Load() const;
  const model::ModelConfig& config() const { return weights_->config; }
  const EngineOptions& options() const { return options_; }
  const cache::PoolPlan& pool_plan() const { return plan_; }
  int64_t max_context_tokens() const { return scheduler_->max_context_tokens(); }
  std::string expert_dtype_name() const;
  // Called by the transfer links when the other engine answered.
  void Wake();
  // Page accounting of every pool (runs on the scheduler thread).
  absl::Status CheckAccounting();

  // Stops taking requests (Submit answers UNAVAILABLE), lets running ones finish until `timeout`,
  // then aborts what is left with UNAVAILABLE. Returns the number aborted.
  int64_t Drain(std::chrono::milliseconds timeout);
  bool draining() const { return draining_.load(); }

 private:
  Engine() = default;
  void Loop();
  absl::Status WarmUp();
  absl::Status PinStagingPools();

  EngineOptions options_;
  std::shared_ptr<const model::ModelWeights> weights_;
  std::unique_ptr<model::Dsv4Model> model_;
  std::unique_ptr<model::ForwardRunner> runner_;  // the CPU forward or the device backend's
  std::shared_ptr<void> device_memory_;           // device pool regions: outlives pools_
  cache::PoolPlan plan_;
  std::unique_ptr<TransferSetup> transfer_;  // before pools_: it owns their memory for the split roles
  std::unique_ptr<cache::StatePools> pools_;
  std::unique_ptr<cache::StatePools> staging_pools_;  // PD with device pools: the transport's host copy
  std::vector<std::shared_ptr<void>> staging_pins_;   // its regions page-locked (--device cuda)
  std::unique_ptr<StagingCopier> staging_copier_;     // live pools <-> host copy; the links use it
  std::unique_ptr<DeviceIpc> device_ipc_;             // device pools shared with a PD peer of this host; outlives links_
  DisaggregationLinks links_;
  std::unique_ptr<Scheduler> scheduler_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable idle_cv_;
  std::deque<NewRequest> inbox_;
  std::vector<std::pair<std::string, absl::Status>> aborts_;
  std::vector<std::function<void()>> calls_;  // run on the scheduler thread
  absl::flat_hash_set<std::string> live_;
  bool stop_ = false;
  bool scheduler_idle_ = true;
  bool waiting_on_peer_ = false;
  bool woken_ = false;
  EngineLoad load_;
  std::deque<std::pair<std::chrono::steady_clock::time_point, int64_t>> recent_tokens_;
  std::atomic<bool> draining_{false};
  std::thread thread_;
};

}  // namespace tandem::engine
