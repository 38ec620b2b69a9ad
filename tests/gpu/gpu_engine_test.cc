// The serving engine with --device cuda on the tiny model: the forward on the GPU, the paged pools in
// device memory. Concurrent greedy requests give the CPU engine's tokens (f32 GEMMs on the device, so
// only near-tied logits could differ), every page comes back, and bad input is refused as on the CPU.
// Tokens drawn on the device are the host sampler's on the same logits, for every sampling option.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/engine/device_backend.h"
#include "common/engine/engine.h"
#include "common/engine/paged_state.h"
#include "common/engine/scheduler.h"
#include "common/model/generator.h"
#include "common/model/weights.h"
#include "tests/gpu/tiny_checkpoint.h"
#include "tests/unit/engine/row_draw_reference.h"

namespace tandem::engine {
namespace {

std::string TinyDir() { return ::tandem::testing::TinyCheckpointDir(); }

struct Outcome {
  std::vector<int32_t> tokens;
  absl::Status status;
  bool done = false;
};

// Runs the requests concurrently on one engine; returns each one's tokens.
std::vector<Outcome> RunAll(Engine& engine, const std::vector<std::vector<int32_t>>& prompts, int64_t max_new) {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<Outcome> out(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    NewRequest r;
    r.id = "r" + std::to_string(i);
    r.prompt = prompts[i];
    r.sampling.temperature = 0.0;
    r.sampling.max_new_tokens = max_new;
    r.sampling.ignore_eos = true;
    r.sink = [&, i](RequestUpdate&& u) {
      std::lock_guard lock(mutex);
      for (const auto& t : u.tokens) out[i].tokens.push_back(t.token);
      if (u.finished) {
        out[i].status = u.status;
        out[i].done = true;
        cv.notify_all();
      }
    };
    const absl::Status submitted = engine.Submit(std::move(r));
    EXPECT_TRUE(submitted.ok()) << submitted;
    if (!submitted.ok()) out[i].done = true;
  }
  std::unique_lock lock(mutex);
  const bool all = cv.wait_for(lock, std::chrono::minutes(5), [&] {
    for (const auto& o : out) {
      if (!o.done) return false;
    }
    return true;
  });
  EXPECT_TRUE(all) << "requests did not finish";
  return out;
}

EngineOptions Options(const std::string& device, bool prefix_cache = true) {
  EngineOptions o;
  o.scheduler.enable_prefix_cache = prefix_cache;
  o.model_dir = TinyDir();
  o.device = device;
  o.cuda_dense = CudaDense::kF32;
  o.show_progress = false;
  o.cache_budget_bytes = int64_t{512} << 20;
  return o;
}

std::vector<std::vector<int32_t>> Prompts(uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> prompts;
  for (int64_t n : {1, 5, 64, 127, 128, 129, 250, 300, 513, 700, 3, 90, 200, 400, 31, 1000}) {
    std::vector<int32_t> p(static_cast<size_t>(n));
    for (auto& id : p) id = static_cast<int32_t>(rng() % 129280);
    prompts.push_back(std::move(p));
  }
  return prompts;
}

TEST(GpuEngineTest, ConcurrentGreedyRequestsMatchTheCpuEngineAndFreeEveryPage) {
  const uint32_t seed = std::random_device{}();
  std::printf("[ seed     ] %u\n", seed);
  const auto prompts = Prompts(seed);
  constexpr int64_t kNew = 24;
  std::vector<Outcome> cpu, gpu;
  {
    auto engine = Engine::Create(Options("cpu"));
    ASSERT_TRUE(engine.ok()) << engine.status();
    cpu = RunAll(**engine, prompts, kNew);
  }
  // Without the prefix cache, so that every page must be free once the requests are done (the other
  // test runs with it, which copies boundary snapshots inside the device pools).
  auto engine = Engine::Create(Options("cuda", /*prefix_cache=*/false));
  ASSERT_TRUE(engine.ok()) << engine.status();
  gpu = RunAll(**engine, prompts, kNew);
  int identical = 0, first_equal = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(gpu[i].status.ok()) << "request " << i << ": " << gpu[i].status;
    ASSERT_EQ(static_cast<int64_t>(gpu[i].tokens.size()), kNew) << "request " << i;
    identical += gpu[i].tokens == cpu[i].tokens;
    first_equal += !gpu[i].tokens.empty() && !cpu[i].tokens.empty() && gpu[i].tokens[0] == cpu[i].tokens[0];
  }
  std::printf("[ engine   ] %d/%zu requests identical to the CPU engine over %ld tokens; first token equal in %d\n",
              identical, prompts.size(), static_cast<long>(kNew), first_equal);
  EXPECT_GE(first_equal, static_cast<int>(prompts.size()) - 1);
  EXPECT_GE(identical, static_cast<int>(prompts.size()) * 3 / 4);
  // Every page back, on the device pools too.
  const absl::Status accounting = (*engine)->CheckAccounting();
  EXPECT_TRUE(accounting.ok()) << accounting;
  for (const auto& pool : (*engine)->Load().scheduler.pools) EXPECT_EQ(pool.used, 0) << pool.name;
}

TEST(GpuEngineTest, BadRequestsAreRefusedAndTheEngineKeepsServing) {
  auto engine = Engine::Create(Options("cuda"));
  ASSERT_TRUE(engine.ok()) << engine.status();
  NewRequest bad;
  bad.id = "bad";
  bad.prompt = {0, 129280};
  bad.sink = [](RequestUpdate&&) {};
  const absl::Status refused = (*engine)->Submit(std::move(bad));
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  // Two requests sharing a 600-token prefix: the second resumes from the device pools' cached pages.
  std::vector<int32_t> shared(600);
  for (size_t i = 0; i < shared.size(); ++i) shared[i] = static_cast<int32_t>(7 + i * 31 % 120000);
  const auto first = RunAll(**engine, {shared}, 4);
  auto longer = shared;
  longer.push_back(42);
  const auto second = RunAll(**engine, {longer, {0, 1, 2, 3}}, 4);
  EXPECT_TRUE(first[0].status.ok()) << first[0].status;
  EXPECT_TRUE(second[0].status.ok() && second[1].status.ok()) << second[0].status << second[1].status;
  EXPECT_EQ(second[1].tokens.size(), 4u);
  EXPECT_GT((*engine)->Load().scheduler.prefix_cached_tokens, 0) << "the prefix cache holds the shared pages";
  EXPECT_TRUE((*engine)->CheckAccounting().ok());
}

TEST(GpuEngineTest, UnknownDeviceAndPdRolesWithoutLinksAreClearErrors) {
  auto options = Options("tpu");
  const auto unknown = Engine::Create(options);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("cpu or cuda"), std::string::npos) << unknown.status();
  options = Options("cuda");
  options.role = EngineRole::kDecode;
  const auto pd = Engine::Create(options);
  EXPECT_EQ(pd.status().code(), absl::StatusCode::kInvalidArgument) << pd.status();
  EXPECT_NE(pd.status().message().find("transfer links"), std::string::npos) << pd.status();
}

// ---- Drawing the next tokens on the device ----

std::shared_ptr<const model::ModelWeights> TinyWeights() { return ::tandem::testing::TinyCheckpointWeights(); }

// The CUDA runner, with every device draw checked where it happens: the drawn row is also copied back and
// the same model::RowDraw made on the host (the contract's host statement); disagreements are recorded.
class CheckingRunner final : public model::ForwardRunner {
 public:
  explicit CheckingRunner(model::ForwardRunner* device) : device_(device) {}
  const model::ModelConfig& config() const override { return device_->config(); }
  absl::Status Forward(std::span<const model::SequenceChunk> batch, model::ForwardResult* result) override {
    return device_->Forward(batch, result);
  }
  bool keeps_logits() const override { return device_->keeps_logits(); }
  absl::Status ForwardKeepingLogits(std::span<const model::SequenceChunk> batch, model::ForwardResult* result) override {
    ++step_;
    return device_->ForwardKeepingLogits(batch, result);
  }
  absl::Status DrawKept(std::span<const model::RowDraw> draws, std::span<int32_t> ids, std::span<const int64_t> copy_rows,
                        std::span<float> copied) override {
    const size_t vocab = static_cast<size_t>(config().vocab_size);
    std::vector<int64_t> rows(copy_rows.begin(), copy_rows.end());
    for (const auto& d : draws) rows.push_back(d.row);
    std::vector<float> all(rows.size() * vocab);
    TANDEM_RETURN_IF_ERROR(device_->DrawKept(draws, ids, rows, all));
    std::copy_n(all.begin(), copied.size(), copied.begin());
    rows_copied += static_cast<int64_t>(copy_rows.size());
    int64_t edited_here = 0;
    for (size_t k = 0; k < draws.size(); ++k) {
      const model::RowDraw& d = draws[k];
      std::vector<float> row(all.begin() + static_cast<int64_t>((copy_rows.size() + k) * vocab),
                             all.begin() + static_cast<int64_t>((copy_rows.size() + k + 1) * vocab));
      const int32_t host = testing::DrawOnHost(d, row);
      ++drawn;
      edited_here += d.edits.empty() ? 0 : 1;
      if (host != ids[k]) mismatches.push_back(Describe(d, row, ids[k], host));
    }
    edited += edited_here;
    most_edited = std::max(most_edited, edited_here);
    return absl::OkStatus();
  }

  int64_t drawn = 0, edited = 0, most_edited = 0, rows_copied = 0;
  std::vector<std::string> mismatches;

 private:
  // The draw, and both tokens' edited logits and ranks, for a failure message.
  std::string Describe(const model::RowDraw& d, std::vector<float> row, int32_t device, int32_t host) const {
    testing::ApplyEditsOnHost(d, row);
    auto rank = [&](int32_t id) {
      int64_t above = 0;
      for (size_t i = 0; i < row.size(); ++i) above += row[i] > row[static_cast<size_t>(id)] ? 1 : 0;
      return above;
    };
    const float top = *std::max_element(row.begin(), row.end());
    char text[512];
    std::snprintf(text, sizeof text,
                  "step %ld row %ld: device %d (logit %.9g, rank %ld) vs host %d (logit %.9g, rank %ld); greedy %d "
                  "temperature %.17g top_k %ld top_p %.17g min_p %.17g u %.17g, %zu edits, top logit %.9g",
                  static_cast<long>(step_), static_cast<long>(d.row), device,
                  device >= 0 && device < static_cast<int32_t>(row.size()) ? row[static_cast<size_t>(device)] : NAN,
                  static_cast<long>(device >= 0 && device < static_cast<int32_t>(row.size()) ? rank(device) : -1), host,
                  row[static_cast<size_t>(host)], static_cast<long>(rank(host)), d.greedy ? 1 : 0, d.temperature,
                  static_cast<long>(d.top_k), d.top_p, d.min_p, d.uniform, d.edits.size(), top);
    return text;
  }

  model::ForwardRunner* device_;
  int64_t step_ = 0;
};

struct Drawn {
  std::vector<TokenOutput> tokens;
  bool finished = false;
  absl::Status status;
};

// Two schedulers over one CUDA runner (so the same GEMM plans), stepped in lock-step over the same requests:
// one draws on the device, the other copies the logits back and samples on the host. Identical batches give
// identical logits, so every token (and logprob) must agree; CheckingRunner also compares each device draw
// with the host rule on the very row it drew from.
TEST(GpuEngineTest, DeviceSamplingGivesTheHostSamplersTokens) {
  const uint32_t seed = std::random_device{}();
  std::printf("[ seed     ] %u\n", seed);
  auto backend = MakeCudaBackend(TinyWeights(), 0, {.dense = CudaDense::kF32});
  ASSERT_TRUE(backend.ok()) << backend.status();
  ASSERT_TRUE(backend->runner->keeps_logits());
  const auto& config = TinyWeights()->config;
  auto layout = StageLayoutFor(config, 0, static_cast<int>(config.num_hidden_layers), true);
  ASSERT_TRUE(layout.ok()) << layout.status();
  auto make_pools = [&] {
    auto pools = cache::StatePools::Create(CacheShapesFor(config, 256), *layout,
                                           {.token_pages = 96, .window_pages = 96, .c4_state_slots = 96, .c128_state_slots = 96},
                                           backend->allocator, backend->copy);
    if (!pools.ok()) throw std::runtime_error(pools.status().ToString());
    return std::move(*pools);
  };
  auto device_pools = make_pools(), host_pools = make_pools();
  CheckingRunner checking(backend->runner.get());
  SchedulerOptions options{.chunked_prefill_size = 2048, .max_running_requests = 64, .enable_prefix_cache = false};
  SchedulerOptions host_options = options;
  host_options.sample_on_device = false;
  Scheduler on_device(&checking, device_pools.get(), options);
  Scheduler on_host(backend->runner.get(), host_pools.get(), host_options);

  struct Spec {
    std::string id;
    SamplingParams sampling;
    bool logprobs = false;
  };
  std::mt19937 rng(seed);
  std::vector<Spec> specs;
  auto add = [&](std::string id, double temperature) -> SamplingParams& {
    specs.push_back({std::move(id), {}, false});
    SamplingParams& p = specs.back().sampling;
    p.temperature = temperature;
    p.seed = rng();
    p.max_new_tokens = 24;
    p.ignore_eos = true;
    return p;
  };
  add("greedy", 0.0);
  add("top_p", 0.8).top_p = 0.9;
  add("top_k", 1.2).top_k = 40;
  add("min_p", 1.0).min_p = 0.05;
  {
    SamplingParams& p = add("all_cuts", 0.7);
    p.top_p = 0.95;
    p.top_k = 3000;
    p.min_p = 0.01;
  }
  add("flat", 2.0);
  {
    SamplingParams& p = add("penalised", 0.9);
    p.repetition_penalty = 1.3;
    p.frequency_penalty = 0.4;
    p.presence_penalty = 0.2;
  }
  add("penalised_greedy", 0.0).repetition_penalty = 1.8;
  add("biased", 0.7).logit_bias = {{100, 4.0}, {2000, -1e9}, {77777, 2.5}};
  {
    SamplingParams& p = add("min_new", 1.0);
    p.min_new_tokens = 12;
    p.stop_token_ids = {5, 6};
    p.ignore_eos = false;
  }
  add("logprobs", 0.7);
  specs.back().logprobs = true;
  add("bias_twice", 0.9).logit_bias = {{300, 1.0}, {300, 2.0}};  // declined: sampled on the host
  // More penalised rows than one 32-row edit pass.
  for (int i = 0; i < 40; ++i) {
    SamplingParams& p = add("penalised_" + std::to_string(i), 0.5 + 0.05 * i);
    p.frequency_penalty = 0.05 * (i % 7);
    p.presence_penalty = -0.3 + 0.1 * (i % 5);
    p.repetition_penalty = 0.8 + 0.02 * i;
    if (i % 3 == 0) p.top_k = 5 + i;
    if (i % 4 == 0) p.top_p = 0.7 + 0.005 * i;
  }
  std::map<std::string, Drawn> device_seen, host_seen;
  for (const Spec& spec : specs) {
    std::vector<int32_t> prompt(static_cast<size_t>(1 + rng() % 300));
    for (auto& id : prompt) id = static_cast<int32_t>(rng() % 129280);
    for (auto* target : {&device_seen, &host_seen}) {
      NewRequest r;
      r.id = spec.id;
      r.prompt = prompt;
      r.sampling = spec.sampling;
      r.return_logprobs = spec.logprobs;
      r.top_logprobs = spec.logprobs ? 5 : 0;
      r.sink = [target, id = spec.id](RequestUpdate&& update) {
        Drawn& d = (*target)[id];
        for (auto& t : update.tokens) d.tokens.push_back(std::move(t));
        if (update.finished) {
          d.finished = true;
          d.status = update.status;
        }
      };
      const absl::Status added = (target == &device_seen ? on_device : on_host).Add(std::move(r));
      ASSERT_TRUE(added.ok()) << added;
    }
  }
  for (int step = 0; step < 10000 && !(on_device.idle() && on_host.idle()); ++step) {
    auto a = on_device.Step();
    ASSERT_TRUE(a.ok()) << "device-sampling scheduler, step " << step << ": " << a.status();
    auto b = on_host.Step();
    ASSERT_TRUE(b.ok()) << "host-sampling scheduler, step " << step << ": " << b.status();
  }
  ASSERT_TRUE(on_device.idle() && on_host.idle());

  int identical = 0;
  for (const Spec& spec : specs) {
    const Drawn& d = device_seen[spec.id];
    const Drawn& h = host_seen[spec.id];
    ASSERT_TRUE(d.finished && h.finished) << spec.id;
    ASSERT_TRUE(d.status.ok()) << spec.id << ": " << d.status;
    ASSERT_TRUE(h.status.ok()) << spec.id << ": " << h.status;
    size_t first_difference = 0;
    while (first_difference < std::min(d.tokens.size(), h.tokens.size()) &&
           d.tokens[first_difference].token == h.tokens[first_difference].token &&
           d.tokens[first_difference].logprob == h.tokens[first_difference].logprob) {
      ++first_difference;
    }
    const bool same = d.tokens.size() == h.tokens.size() && first_difference == d.tokens.size();
    identical += same;
    if (!same) {
      ADD_FAILURE() << spec.id << ": device and host tokens differ at " << first_difference << " (device "
                    << d.tokens.size() << " tokens, host " << h.tokens.size() << ")"
                    << (first_difference < std::min(d.tokens.size(), h.tokens.size())
                            ? absl::StrCat(": device ", d.tokens[first_difference].token, " vs host ",
                                           h.tokens[first_difference].token)
                            : std::string());
    }
    if (spec.logprobs && same) {
      for (size_t i = 0; i < d.tokens.size(); ++i) {
        ASSERT_EQ(d.tokens[i].top.size(), 5u);
        for (size_t j = 0; j < 5; ++j) {
          EXPECT_EQ(d.tokens[i].top[j].token, h.tokens[i].top[j].token) << "logprobs token " << i << " top " << j;
          EXPECT_EQ(d.tokens[i].top[j].logprob, h.tokens[i].top[j].logprob) << "logprobs token " << i << " top " << j;
        }
      }
    }
  }
  std::printf("[ sampling ] %d/%zu requests identical; %ld device draws (%ld with edits, at most %ld in a step), %ld rows "
              "copied back, %zu draws off the host rule\n",
              identical, specs.size(), static_cast<long>(checking.drawn), static_cast<long>(checking.edited),
              static_cast<long>(checking.most_edited),
              static_cast<long>(checking.rows_copied), checking.mismatches.size());
  for (size_t i = 0; i < std::min<size_t>(checking.mismatches.size(), 10); ++i) {
    std::printf("[ mismatch ] %s\n", checking.mismatches[i].c_str());
  }
  if (identical < static_cast<int>(specs.size()) && checking.mismatches.empty()) {
    std::printf("[ note     ] every device draw matched the host rule on its own row: the schedulers' logits differ "
                "(a nondeterministic forward?), not the draws\n");
  }
  EXPECT_TRUE(checking.mismatches.empty()) << checking.mismatches.size() << " device draws differ from the host rule";
  EXPECT_EQ(identical, static_cast<int>(specs.size()));
  EXPECT_GT(checking.most_edited, 32) << "a step's penalised rows take more than one edit pass";
  EXPECT_EQ(checking.rows_copied, 2 * 24) << "only the logprobs and bias_twice requests bring rows back";
  EXPECT_TRUE(on_device.CheckAccounting().ok());
  EXPECT_TRUE(on_host.CheckAccounting().ok());
}

}  // namespace
}  // namespace tandem::engine
