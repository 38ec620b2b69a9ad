#include "common/engine/engine.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <future>

#include <spdlog/spdlog.h>

#include "common/engine/device_backend.h"
#include "common/engine/paged_state.h"
#include "common/kernels/kernels.h"

namespace tandem::engine {
namespace {

// An on|off flag's value.
absl::StatusOr<bool> ParseOnOff(const char* flag, std::string_view name) {
  if (name == "on") return true;
  if (name == "off") return false;
  return absl::InvalidArgumentError(absl::StrCat(flag, " ", std::string(name), ": expected on or off"));
}

}  // namespace

absl::StatusOr<CudaDense> ParseCudaDense(std::string_view name) {
  if (name == "bf16x2") return CudaDense::kBf16x2;
  if (name == "bf16") return CudaDense::kBf16;
  if (name == "f32") return CudaDense::kF32;
  return absl::InvalidArgumentError(absl::StrCat("--cuda-dense ", std::string(name), ": expected bf16x2, bf16 or f32"));
}

absl::StatusOr<bool> ParseCudaGraphs(std::string_view name) { return ParseOnOff("--cuda-graphs", name); }

absl::StatusOr<bool> ParseCudaGemmTuning(std::string_view name) { return ParseOnOff("--cuda-gemm-tuning", name); }

absl::StatusOr<bool> ParseCudaAttention(std::string_view name) {
  if (name == "f32") return false;
  if (name == "bf16") return true;
  return absl::InvalidArgumentError(absl::StrCat("--cuda-attention ", std::string(name), ": expected f32 or bf16"));
}
namespace {

int64_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : 0;
}

// What the checkpoint occupies: counted against --mem-fraction-static like sglang counts the weights.
int64_t CheckpointBytes(const std::string& dir) {
  int64_t total = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.path().extension() == ".safetensors") total += static_cast<int64_t>(entry.file_size(ec));
  }
  return total;
}

constexpr auto kThroughputWindow = std::chrono::seconds(5);

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  std::unique_ptr<Engine> engine(new Engine());
  engine->options_ = options;
  kernels::SetThreads(options.threads);
  kernels::SetDeterministic(options.deterministic);

  model::LoadOptions load;
  load.expert_dtype = options.expert_dtype;
  load.drop_cache_after_load = options.drop_cache_after_load;
  load.show_progress = options.show_progress;
  TANDEM_ASSIGN_OR_RETURN(auto weights, model::LoadModelWeights(options.model_dir, load));
  engine->weights_ = std::shared_ptr<const model::ModelWeights>(std::move(weights));
  const auto& config = engine->weights_->config;
  engine->model_ = std::make_unique<model::Dsv4Model>(engine->weights_);
  cache::RegionAllocator device_allocator;
  cache::RegionCopy device_copy;
  int64_t device_memory = 0, device_weights = 0;
  if (options.device == "cuda") {
    CudaBackendOptions cuda;
    cuda.dense = options.cuda_dense;
    cuda.graphs = options.cuda_graphs;
    cuda.attention_bf16 = options.cuda_attention_bf16;
    cuda.gemm_tuning = options.cuda_gemm_tuning;
    TANDEM_ASSIGN_OR_RETURN(DeviceBackend backend, MakeCudaBackend(engine->weights_, options.cuda_device, cuda));
    spdlog::info("forward on CUDA device {} ({}), {:.2f} GiB of weights there{}{}{}", options.cuda_device,
                 backend.device_name, static_cast<double>(backend.weight_bytes) / (1 << 30),
                 options.cuda_graphs ? "; decode steps replay CUDA graphs" : "",
                 options.cuda_attention_bf16 ? "; sparse attention in bf16 (--cuda-attention bf16)" : "",
                 options.cuda_gemm_tuning ? "" : "; GEMMs on cuBLASLt's first candidates (--cuda-gemm-tuning off)");
    if (options.deterministic) {
      spdlog::warn("--deterministic on CUDA: cuBLASLt picks kernels per batch shape, so batch invariance is not guaranteed");
    }
    engine->runner_ = std::move(backend.runner);
    engine->device_memory_ = std::move(backend.memory);
    device_allocator = std::move(backend.allocator);
    device_copy = std::move(backend.copy);
    device_memory = backend.device_memory_bytes;
    device_weights = backend.weight_bytes;
  } else if (options.device == "cpu") {
    engine->runner_ = std::make_unique<model::CpuForwardRunner>(engine->model_.get());
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--device must be cpu or cuda, got \"", options.device, "\""));
  }

  for (const int32_t id : options.scheduler.forced_output_ids) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("--test-forced-output-ids: ", id, " is outside the vocabulary [0, ", config.vocab_size, ")"));
    }
  }
  if (options.page_size <= 0 || options.page_size % 128 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--page-size must be a positive multiple of 128 (C128 entries are paged in ",
                                                   "lock-step with tokens), got ", options.page_size));
  }
  const cache::CacheShapes shapes = CacheShapesFor(config, options.page_size);
  TANDEM_ASSIGN_OR_RETURN(const cache::StageLayout layout,
                          StageLayoutFor(config, 0, static_cast<int>(config.num_hidden_layers), /*with_mtp=*/true));
  cache::SizingOptions sizing;
  sizing.swa_full_tokens_ratio = options.swa_full_tokens_ratio;
  sizing.max_running_requests = options.scheduler.max_running_requests;
  if (options.cache_budget_bytes > 0) {
    sizing.budget_bytes = options.cache_budget_bytes;
  } else if (options.mem_fraction_static > 0) {
    sizing.mem_fraction_static = options.mem_fraction_static;
    sizing.memory_total_bytes = device_memory > 0 ? device_memory : PhysicalMemoryBytes();
    sizing.static_bytes = device_memory > 0 ? device_weights : CheckpointBytes(options.model_dir);
  } else {
    sizing.budget_bytes = EngineOptions::kDefaultCpuBudgetBytes;
  }
  TANDEM_ASSIGN_OR_RETURN(engine->plan_, cache::PlanPools(shapes, layout, sizing));
  // The pools: on the device (--device cuda), else in the transport's memory for the split roles (so
  // shared-memory transports map them into the peer), else on the heap. Pools the transport cannot ship
  // from directly get a host copy of the same shapes that the links stage through.
  const bool split = options.role != EngineRole::kMixed;
  if (split) {
    if (!options.links) return absl::InvalidArgumentError("a prefill or decode engine needs its transfer links");
    TANDEM_ASSIGN_OR_RETURN(engine->transfer_, options.links());
    if (engine->transfer_ == nullptr) return absl::InvalidArgumentError("the transfer link factory made no setup");
  }
  const bool staged = split && (device_allocator != nullptr || options.test_staged_pools);
  cache::RegionAllocator allocator = device_allocator;
  cache::RegionCopy copy = device_copy;
  if (split && !staged) allocator = engine->transfer_->allocator();
  if (staged && !device_allocator) {
    copy = [](void* dst, const void* src, size_t bytes) {
      std::memcpy(dst, src, bytes);
      return absl::OkStatus();
    };
  }
  TANDEM_ASSIGN_OR_RETURN(engine->pools_, cache::StatePools::Create(shapes, layout, engine->plan_.counts, allocator, copy));
  if (staged) {
    TANDEM_ASSIGN_OR_RETURN(engine->staging_pools_, cache::StatePools::Create(shapes, layout, engine->plan_.counts,
                                                                              engine->transfer_->allocator()));
    if (device_allocator) {
      TANDEM_RETURN_IF_ERROR(engine->PinStagingPools());
    } else {
      engine->staging_copier_ = MakeDeferredHostCopier();
      spdlog::info("PD hand-over staged through a host copy of the pools (--test-staged-pools)");
    }
  }
  spdlog::info("{}", engine->plan_.Summary());
  engine->scheduler_ = std::make_unique<Scheduler>(engine->runner_.get(), engine->pools_.get(), options.scheduler);
  if (engine->transfer_ != nullptr) {
    cache::StatePools& shipped = engine->staging_pools_ ? *engine->staging_pools_ : *engine->pools_;
    TANDEM_ASSIGN_OR_RETURN(engine->links_,
                            engine->transfer_->MakeLinks(shipped, [e = engine.get()] { e->Wake(); },
                                                         StagedPools{engine->staging_pools_ ? engine->pools_.get() : nullptr,
                                                                     engine->staging_copier_.get(), engine->device_ipc_.get()}));
    engine->scheduler_->SetRole(options.role, engine->links_.prefill.get(), engine->links_.decode.get());
  }
  engine->load_.scheduler = engine->scheduler_->Stats();
  engine->thread_ = std::thread([e = engine.get()] { e->Loop(); });
  TANDEM_RETURN_IF_ERROR(engine->WarmUp());
  return engine;
}

// The host copy the transport ships from, page-locked so the device copies to and from it are DMA that runs
// asynchronously on the copier's stream. A region the driver refuses to pin is a logged fallback, not a
// startup error: its copies still work from pageable memory, only synchronously and slower.
absl::Status Engine::PinStagingPools() {
  TANDEM_ASSIGN_OR_RETURN(staging_copier_, MakeCudaStagingCopier(options_.cuda_device));
  int64_t pinned = 0, pageable = 0;
  for (cache::PoolKind kind : cache::kAllPools) {
    const std::span<uint8_t> region = staging_pools_->region(kind);
    if (region.empty()) continue;
    auto pin = PinHostMemory(options_.cuda_device, region.data(), region.size());
    if (pin.ok()) {
      staging_pins_.push_back(std::move(*pin));
      pinned += static_cast<int64_t>(region.size());
    } else {
      pageable += static_cast<int64_t>(region.size());
      spdlog::warn("PD staging: cannot page-lock the host copy of pool {} ({:.1f} MiB): {}; its device copies fall back to "
                   "pageable memory (synchronous, slower)",
                   cache::PoolName(kind), static_cast<double>(region.size()) / (1 << 20), std::string(pin.status().message()));
    }
  }
  spdlog::info("PD hand-over staged through a host copy of the device pools: {:.1f} MiB page-locked, {:.1f} MiB pageable",
               static_cast<double>(pinned) / (1 << 20), static_cast<double>(pageable) / (1 << 20));
  // A PD peer on this host may instead map the device pools (CUDA IPC); the links decide per peer.
  if (auto ipc = MakeCudaDeviceIpc(options_.cuda_device); ipc.ok()) {
    device_ipc_ = std::move(*ipc);
  } else {
    spdlog::warn("PD device IPC unavailable: {}; every peer is staged through host memory", std::string(ipc.status().message()));
  }
  return absl::OkStatus();
}

Engine::~Engine() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::string Engine::expert_dtype_name() const {
  return weights_->expert_dtype == model::ExpertDType::kFp8 ? "fp8" : "fp4";
}

absl::Status Engine::Submit(NewRequest request) {
  if (draining_.load()) return absl::UnavailableError("the engine is draining and takes no new requests");
  if (!request.sink) return absl::InvalidArgumentError("a request needs a sink for its updates");
  TANDEM_RETURN_IF_ERROR(scheduler_->Validate(request));
  // A prefill room is admitted the moment its Generate arrives, not when the scheduler next looks up
  // from a long step: decode's destination may already be waiting for it.
  if (request.role == EngineRole::kPrefill && links_.prefill) {
    TANDEM_RETURN_IF_ERROR(links_.prefill->Expect(request.room.room));
    request.room_expected = true;
  }
  std::lock_guard lock(mutex_);
  absl::Status refused;
  if (live_.contains(request.id)) {
    refused = absl::AlreadyExistsError(absl::StrCat("request id \"", request.id, "\" is already live on this engine"));
  } else if (const auto limit = static_cast<size_t>(options_.scheduler.max_queued_requests + options_.scheduler.max_running_requests);
             live_.size() >= limit) {
    refused = absl::ResourceExhaustedError(absl::StrCat("the engine is full (", live_.size(), " live requests)"));
  }
  if (!refused.ok()) {
    if (request.room_expected) links_.prefill->Abort(request.room.room, refused);
    return refused;
  }
  live_.insert(request.id);
  // The wrapper keeps the live set and the throughput window current.
  request.sink = [this, id = request.id, sink = std::move(request.sink)](RequestUpdate&& update) {
    const bool finished = update.finished;
    const auto tokens = static_cast<int64_t>(update.tokens.size());
    sink(std::move(update));
    std::lock_guard lock(mutex_);
    if (tokens > 0) recent_tokens_.emplace_back(std::chrono::steady_clock::now(), tokens);
    if (finished) {
      live_.erase(id);
      if (live_.empty()) idle_cv_.notify_all();
    }
  };
  inbox_.push_back(std::move(request));
  wake_.notify_one();
  return absl::OkStatus();
}

bool Engine::Abort(const std::string& id, absl::Status reason) {
  {
    std::lock_guard lock(mutex_);
    if (!live_.contains(id)) return false;
    aborts_.emplace_back(id, std::move(reason));
  }
  wake_.notify_one();
  return true;
}

EngineLoad Engine::Load() const {
  std::lock_guard lock(mutex_);
  return load_;
}

absl::Status Engine::CheckAccounting() {
  auto done = std::make_shared<std::promise<absl::Status>>();
  auto result = done->get_future();
  {
    std::lock_guard lock(mutex_);
    calls_.push_back([this, done] { done->set_value(scheduler_->CheckAccounting()); });
  }
  wake_.notify_one();
  return result.get();
}

int64_t Engine::Drain(std::chrono::milliseconds timeout) {
  draining_.store(true);
  std::unique_lock lock(mutex_);
  idle_cv_.wait_for(lock, timeout, [&] { return live_.empty(); });
  const auto left = static_cast<int64_t>(live_.size());
  if (left > 0) {
    spdlog::warn("drain: {} requests still running after {} ms; aborting them", left, timeout.count());
    calls_.push_back([this] { scheduler_->AbortAll(absl::UnavailableError("the engine is shutting down")); });
    wake_.notify_one();
    idle_cv_.wait(lock, [&] { return live_.empty(); });
  }
  return left;
}

void Engine::Wake() {
  {
    std::lock_guard lock(mutex_);
    woken_ = true;
  }
  wake_.notify_one();
}

absl::Status Engine::WarmUp() {
  // Disaggregated engines warm up on their first real request (a warm-up needs the other engine).
  if (options_.role != EngineRole::kMixed) return absl::OkStatus();
  auto done = std::make_shared<std::promise<absl::Status>>();
  auto result = done->get_future();
  NewRequest warm;
  warm.id = "tandem-warmup";
  warm.prompt = {static_cast<int32_t>(config().bos_token_id)};
  warm.sampling.temperature = 0.0;
  warm.sampling.max_new_tokens = 1;
  warm.sink = [done](RequestUpdate&& update) {
    if (update.finished) done->set_value(update.status);
  };
  TANDEM_RETURN_IF_ERROR(Submit(std::move(warm)));
  const absl::Status status = result.get();
  if (!status.ok()) return absl::InternalError(absl::StrCat("warm-up step failed: ", status.message()));
  return absl::OkStatus();
}

void Engine::Loop() {
  while (true) {
    std::deque<NewRequest> incoming;
    std::vector<std::pair<std::string, absl::Status>> aborts;
    std::vector<std::function<void()>> calls;
    {
      std::unique_lock lock(mutex_);
      auto ready = [&] {
        return stop_ || !inbox_.empty() || !aborts_.empty() || !calls_.empty() || woken_ || (!scheduler_idle_ && !waiting_on_peer_);
      };
      // Requests that only wait on the other engine are polled on its nudges, and every few ms anyway.
      if (waiting_on_peer_) {
        wake_.wait_for(lock, std::chrono::milliseconds(5), ready);
      } else {
        wake_.wait(lock, ready);
      }
      woken_ = false;
      if (stop_) break;
      incoming.swap(inbox_);
      aborts.swap(aborts_);
      calls.swap(calls_);
    }
    for (auto& request : incoming) {
      UpdateSink sink = request.sink;
      const bool expected = request.room_expected;
      const uint64_t room = request.room.room;
      if (auto status = scheduler_->Add(std::move(request)); !status.ok()) {
        if (expected) links_.prefill->Abort(room, status);
        RequestUpdate update;
        update.finished = true;
        update.status = status;
        sink(std::move(update));
      }
    }
    for (auto& [id, reason] : aborts) scheduler_->Abort(id, reason);
    for (auto& call : calls) call();
    if (auto stepped = scheduler_->Step(); !stepped.ok()) {
      spdlog::error("scheduler step: {}", stepped.status().ToString());
    }
    SchedulerStats stats = scheduler_->Stats();
    std::lock_guard lock(mutex_);
    const auto now = std::chrono::steady_clock::now();
    while (!recent_tokens_.empty() && now - recent_tokens_.front().first > kThroughputWindow) recent_tokens_.pop_front();
    int64_t tokens = 0;
    for (const auto& [when, count] : recent_tokens_) tokens += count;
    load_.generation_throughput =
        recent_tokens_.empty() ? 0.0 : static_cast<double>(tokens) / std::chrono::duration<double>(kThroughputWindow).count();
    load_.scheduler = std::move(stats);
    scheduler_idle_ = scheduler_->idle();
    waiting_on_peer_ = scheduler_->waiting_on_peer();
  }
  scheduler_->AbortAll(absl::UnavailableError("the engine stopped"));
}

}  // namespace tandem::engine
