#include "common/engine/server/serve.h"

#include <signal.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "common/engine/server/engine_metrics.h"
#include "common/engine/server/engine_service.h"
#include "common/metrics/metrics.h"
#include "common/metrics/side_port.h"

namespace tandem::engine {
namespace {

constexpr const char* kServiceName = "tandem.v1.Engine";

const char* RoleName(v1::Role role) {
  switch (role) {
    case v1::ROLE_PREFILL: return "prefill";
    case v1::ROLE_DECODE: return "decode";
    default: return "mixed";
  }
}

// FNV-1a over config.json: engines and routers compare it to be sure they serve one model.
std::string ConfigHash(const std::string& model_dir) {
  std::ifstream in(std::filesystem::path(model_dir) / "config.json", std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char c : text.str()) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return fmt::format("{:016x}", hash);
}

}  // namespace

void AddServeFlags(CLI::App& app, ServeOptions& o) {
  auto& e = o.engine;
  auto& s = e.scheduler;
  app.add_option("--model", e.model_dir, "model directory (config.json, *.safetensors)")->required()->check(CLI::ExistingDirectory);
  app.add_option("--host", o.host, "address to listen on")->capture_default_str();
  app.add_option("--grpc-port", o.grpc_port, "gRPC port (engine API, health, reflection)")->capture_default_str()->check(CLI::Range(0, 65535));
  app.add_option("--http-port", o.http_port, "HTTP side port (/health, /metrics)")->capture_default_str()->check(CLI::Range(0, 65535));
  app.add_option("--served-model-name", o.served_model_name, "model name in metrics and model info (default: the directory's name)");
  app.add_option("--page-size", e.page_size, "tokens per KV page (multiple of 128)")->capture_default_str();
  app.add_option("--chunked-prefill-size", s.chunked_prefill_size, "prompt tokens per scheduler step")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-running-requests", s.max_running_requests, "requests decoding at once")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-queued-requests", s.max_queued_requests, "requests waiting before RESOURCE_EXHAUSTED")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-new-tokens-limit", s.max_new_tokens_limit, "largest max_new_tokens a request may ask for")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--mem-fraction-static", e.mem_fraction_static,
                 "fraction of device memory (host RAM on the CPU) for weights and KV pools")->check(CLI::Range(0.0, 1.0));
  app.add_option("--cache-budget-mb", o.cache_budget_mb, "explicit KV/state pool budget in MiB (default 1024 on the CPU)")
      ->check(CLI::PositiveNumber);
  app.add_option("--swa-full-tokens-ratio", e.swa_full_tokens_ratio, "window-resident tokens per cacheable token")
      ->capture_default_str()->check(CLI::Range(0.0, 1.0));
  app.add_option("--expert-dtype", [&e](const std::vector<std::string>& v) {
       e.expert_dtype = v.front() == "fp8" ? model::ExpertDType::kFp8 : model::ExpertDType::kFp4;
       return true;
     }, "run routed experts as fp4 (MXFP4) or fp8")->check(CLI::IsMember({"fp4", "fp8"}));
  app.add_flag("--weight-loader-drop-cache-after-load", e.drop_cache_after_load, "drop each shard from the page cache once loaded");
  app.add_flag("--deterministic", e.deterministic, "batch-invariant kernels: a request's tokens never depend on its batch");
  app.add_flag("--disable-prefix-cache", o.disable_prefix_cache, "no radix prefix cache");
  app.add_option("--threads", e.threads, "CPU threads for the forward (0: all cores)")->capture_default_str();
  app.add_option("--device", e.device, "where the forward and the cache pools run: cpu or cuda")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--cuda-device", e.cuda_device, "CUDA device index for --device cuda")->capture_default_str();
  app.add_option("--cuda-dense", [&e](const std::vector<std::string>& v) {
       auto dense = ParseCudaDense(v.front());
       if (dense.ok()) e.cuda_dense = *dense;
       return dense.ok();
     }, "dense layers on the GPU: bf16x2 (bf16 weights, activations as a bf16 hi+lo pair; default), bf16 "
        "(one bf16 activation: faster prefill, less exact) or f32 (closest to the CPU, slowest)")
      ->check(CLI::IsMember({"bf16x2", "bf16", "f32"}));
  app.add_option("--cuda-graphs", [&e](const std::vector<std::string>& v) {
       auto graphs = ParseCudaGraphs(v.front());
       if (graphs.ok()) e.cuda_graphs = *graphs;
       return graphs.ok();
     }, "decode steps on the GPU replay CUDA graphs of their launches: on or off")
      ->default_str("on")
      ->check(CLI::IsMember({"on", "off"}));
  app.add_option("--cuda-attention", [&e](const std::vector<std::string>& v) {
       auto bf16 = ParseCudaAttention(v.front());
       if (bf16.ok()) e.cuda_attention_bf16 = *bf16;
       return bf16.ok();
     }, "sparse attention on the GPU: f32 (f32-exact products; default) or bf16 (q and the softmax probabilities "
        "rounded to bf16 as in the reference model, one read of each cache entry for all 64 heads: faster)")
      ->default_str("f32")
      ->check(CLI::IsMember({"f32", "bf16"}));
  app.add_option("--cuda-gemm-tuning", [&e](const std::vector<std::string>& v) {
       auto tuning = ParseCudaGemmTuning(v.front());
       if (tuning.ok()) e.cuda_gemm_tuning = *tuning;
       return tuning.ok();
     }, "cuBLASLt GEMMs on the GPU: on (each shape times its candidate algorithms on first use and keeps the fastest; "
        "default) or off (cuBLASLt's first candidate for every shape: every engine with this GPU model and library "
        "runs the same kernels for the same batch shape, so the same batch gives bit-identical logits)")
      ->default_str("on")
      ->check(CLI::IsMember({"on", "off"}));
  app.add_flag("--test-staged-pools", e.test_staged_pools,
               "TEST ONLY: PD on the CPU with the pools apart from the transport's memory, staged through a host copy as "
               "with --device cuda");
  app.add_option("--pd-transfer", [&o](const std::vector<std::string>& v) {
       auto mode = transfer::ParsePdTransfer(v.front());
       if (mode.ok()) o.pd_transfer = *mode;
       return mode.ok();
     }, "PD: how --device cuda pools reach the peer: auto (device to device over CUDA IPC when both sides can and share "
        "a host, else staged), staged (through page-locked host copies) or ipc (refuse a peer that cannot)")
      ->default_str("auto")
      ->check(CLI::IsMember({"auto", "staged", "ipc"}));
  app.add_option("--drain-timeout", o.drain_timeout_seconds, "seconds SIGTERM waits for running requests")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--heartbeat-interval", o.heartbeat_interval_seconds, "PD: seconds between heartbeats to the peer")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--peer-lease", o.lease_seconds, "PD: a peer silent this long is dead and its rooms fail")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--room-lease", o.room_lease_seconds, "PD: seconds from a room's arrival (queueing included) after which it is aborted; dead peers are caught sooner by --peer-lease")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--pd-late-write-grace", o.late_write_grace_seconds,
                 "PD decode: seconds the pages of a transfer that ended unclean (prefill's connection lost, abort not "
                 "acknowledged) stay out of the pool, since a copy prefill had in flight may still land in them; the "
                 "request itself fails at once. They are held at least the prefill's own --peer-lease + 1 s, which it "
                 "advertises in the handshake (an older prefill does not: then this grace alone)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--test-forced-output-ids", s.forced_output_ids,
                 "TEST ONLY, never in production: comma-separated token ids every request outputs in order "
                 "(the model still runs; stop ids, eos and max tokens still end it; sampling resumes after the list)")
      ->delimiter(',');
  app.add_option("--log-level", o.log_level, "trace, debug, info, warn, error")
      ->capture_default_str()->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
}

int RunServer(ServeOptions o, const char* binary) {
  spdlog::set_level(spdlog::level::from_str(o.log_level));
  o.engine.scheduler.enable_prefix_cache = !o.disable_prefix_cache;
  if (o.cache_budget_mb > 0) o.engine.cache_budget_bytes = o.cache_budget_mb << 20;
  o.engine.show_progress = true;
  if (o.served_model_name.empty()) {
    o.served_model_name = std::filesystem::path(o.engine.model_dir).lexically_normal().filename().string();
    if (o.served_model_name.empty()) o.served_model_name = std::filesystem::path(o.engine.model_dir).parent_path().filename().string();
  }
  const char* role = RoleName(o.role);
  if (o.engine.test_staged_pools) {
    spdlog::warn("--test-staged-pools is set: the PD hand-over is staged through a host copy (a test path)");
  }
  if (!o.engine.scheduler.forced_output_ids.empty()) {
    spdlog::warn("{}: --test-forced-output-ids is set: every request outputs the same {} forced tokens first "
                 "(a test-only flag; this engine does not serve the model's own answers)",
                 binary, o.engine.scheduler.forced_output_ids.size());
  }

  // Signals go to one waiting thread, not to whichever thread happens to run.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::atomic<bool> serving{false};
  EngineMetrics engine_metrics(o.served_model_name, role);
  std::unique_ptr<Engine> engine;
  std::atomic<Engine*> engine_ptr{nullptr};
  metrics::SidePort http;
  http.AddGet("/health", [&serving] {
    return serving.load() ? metrics::HttpReply{200, "{\"status\":\"ok\"}"}
                          : metrics::HttpReply{503, "{\"status\":\"starting or draining\"}"};
  });
  http.AddGet("/metrics", [&engine_metrics, &engine_ptr] {
    Engine* e = engine_ptr.load();
    return metrics::HttpReply{200, engine_metrics.Scrape(e ? e->Load() : EngineLoad{}), metrics::kExpositionContentType};
  });
  if (auto status = http.Start(o.host, o.http_port); !status.ok()) {
    spdlog::error("{}: {}", binary, std::string(status.message()));
    return 1;
  }

  int bootstrap_port = 0;
  if (o.role != v1::ROLE_MIXED) {
    o.engine.role = o.role == v1::ROLE_PREFILL ? EngineRole::kPrefill : EngineRole::kDecode;
    TransferLinkOptions transfer;
    transfer.model_config_hash = ConfigHash(o.engine.model_dir);
    transfer.dtype = absl::StrCat("kv-fp8/experts-", o.engine.expert_dtype == model::ExpertDType::kFp8 ? "fp8" : "default");
    transfer.bootstrap_host = o.host;
    transfer.bootstrap_port = o.bootstrap_port;
    transfer.pd_transfer = o.pd_transfer;
    transfer.agent.control.heartbeat_interval = std::chrono::milliseconds(static_cast<int64_t>(o.heartbeat_interval_seconds * 1000));
    transfer.agent.control.lease = std::chrono::milliseconds(static_cast<int64_t>(o.lease_seconds * 1000));
    transfer.agent.room_lease = std::chrono::milliseconds(static_cast<int64_t>(o.room_lease_seconds * 1000));
    transfer.agent.late_write_grace = std::chrono::milliseconds(static_cast<int64_t>(o.late_write_grace_seconds * 1000));
    // Both legs are dispatched at once; a destination may beat its Generate leg by a loaded moment.
    transfer.agent.unknown_room_grace = std::chrono::milliseconds(10000);
    const EngineRole role = o.engine.role;
    o.engine.links = [role, transfer, &engine_metrics, &bootstrap_port]() -> absl::StatusOr<std::unique_ptr<TransferSetup>> {
      return MakeTransferSetup(
          role, transfer,
          [&engine_metrics](uint64_t bytes, double seconds, std::string_view path) { engine_metrics.Transferred(bytes, seconds, path); },
          [&engine_metrics](std::function<TransferStats()> stats) { engine_metrics.set_transfer_stats(std::move(stats)); },
          &bootstrap_port);
    };
  }
  pd_trace::SetObserver([&engine_metrics](EngineRole, std::span<const pd_trace::Stage> stages) { engine_metrics.Stages(stages); });
  struct StopObserving {
    ~StopObserving() { pd_trace::SetObserver({}); }
  } stop_observing;
  auto created = Engine::Create(o.engine);
  if (!created.ok()) {
    spdlog::error("{}: {}", binary, std::string(created.status().message()));
    return created.status().code() == absl::StatusCode::kInvalidArgument || created.status().code() == absl::StatusCode::kNotFound ? 2 : 1;
  }
  engine = std::move(*created);
  engine_ptr.store(engine.get());

  ServiceInfo info{o.engine.model_dir, o.served_model_name, o.role, ConfigHash(o.engine.model_dir)};
  EngineService service(engine.get(), &engine_metrics, info);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int grpc_port = 0;
  builder.AddListeningPort(absl::StrCat(o.host, ":", o.grpc_port), grpc::InsecureServerCredentials(), &grpc_port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(64 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || grpc_port == 0) {
    spdlog::error("{}: cannot listen on {}:{} for gRPC (in use?)", binary, o.host, o.grpc_port);
    return 1;
  }
  auto* health = server->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(kServiceName, true);
  serving.store(true);
  spdlog::info("{} ({}) serving {}: grpc {}:{}, http {}:{}{}", binary, role, o.served_model_name, o.host, grpc_port, o.host,
               http.port(), o.role == v1::ROLE_PREFILL ? absl::StrCat(", bootstrap ", o.host, ":", bootstrap_port) : "");

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  spdlog::info("{}: {} received; draining (up to {} s)", binary, signal_number == SIGTERM ? "SIGTERM" : "SIGINT",
               o.drain_timeout_seconds);
  serving.store(false);
  health->SetServingStatus("", false);
  health->SetServingStatus(kServiceName, false);
  const int64_t aborted = engine->Drain(std::chrono::milliseconds(static_cast<int64_t>(o.drain_timeout_seconds * 1000)));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  http.Stop();
  engine_ptr.store(nullptr);
  engine.reset();
  spdlog::info("{}: stopped ({} requests aborted by the drain)", binary, aborted);
  return 0;
}

}  // namespace tandem::engine
