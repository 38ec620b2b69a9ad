// The serving engine with --device cuda on the tiny model: the forward on the GPU, the paged pools in
// device memory. Concurrent greedy requests give the CPU engine's tokens (f32 GEMMs on the device, so
// only near-tied logits could differ), every page comes back, and bad input is refused as on the CPU.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "common/engine/engine.h"
#include "common/model/generator.h"
#include "tests/gpu/tiny_checkpoint.h"

namespace tandem::engine {
namespace {

std::string TinyDir() { return testing::TinyCheckpointDir(); }

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

}  // namespace
}  // namespace tandem::engine
