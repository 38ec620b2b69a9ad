// tandem-model run | forward: the offline DSV4 forward, optionally split into chained pipeline slices.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/core/logging.h"
#include "common/kernels/kernels.h"
#include "common/model/forward.h"
#include "common/model/safetensors.h"
#include "tools/model/commands.h"

namespace tandem::tools {
namespace {

struct EngineArgs {
  std::string dir;
  std::string prompt_ids;
  int threads = 0;
  std::string expert_dtype;
  bool drop_cache = false;
  int pp_size = 1;
  int64_t chunk_size = 0;  // 0: the whole prompt at once
  bool deterministic = false;
};

void AddEngineOptions(CLI::App* cmd, EngineArgs& a) {
  cmd->add_option("DIR", a.dir, "model directory")->required();
  cmd->add_option("--prompt-ids", a.prompt_ids, "comma-separated token ids")->required();
  cmd->add_option("--threads", a.threads, "CPU threads (0: all cores)");
  cmd->add_option("--expert-dtype", a.expert_dtype, "run routed experts as fp4 (MXFP4) or fp8")
      ->check(CLI::IsMember({"fp4", "fp8"}));
  cmd->add_flag("--weight-loader-drop-cache-after-load", a.drop_cache, "drop each shard from the page cache once loaded");
  cmd->add_option("--pp-size", a.pp_size, "split the layers into this many chained pipeline slices")->check(CLI::PositiveNumber);
  cmd->add_option("--chunk-size", a.chunk_size, "prefill chunk size in tokens (0: whole prompt)");
  cmd->add_flag("--deterministic", a.deterministic, "batch-invariant fixed-order kernels");
}

absl::StatusOr<std::vector<int32_t>> ParseIds(const std::string& text) {
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(part, &id)) return absl::InvalidArgumentError(absl::StrCat("--prompt-ids: \"", part, "\" is not a token id"));
    ids.push_back(id);
  }
  if (ids.empty()) return absl::InvalidArgumentError("--prompt-ids: no token ids");
  return ids;
}

// The model as a chain of pipeline slices, each with its own per-request state.
class Pipeline {
 public:
  static absl::StatusOr<Pipeline> Load(const EngineArgs& a) {
    kernels::SetThreads(a.threads);
    kernels::SetDeterministic(a.deterministic);
    TANDEM_ASSIGN_OR_RETURN(auto config, model::LoadConfig(a.dir));
    if (a.pp_size > config.num_hidden_layers) {
      return absl::InvalidArgumentError(absl::StrCat("--pp-size ", a.pp_size, " exceeds the model's ", config.num_hidden_layers, " layers"));
    }
    Pipeline p;
    for (int rank = 0; rank < a.pp_size; ++rank) {
      model::LoadOptions options;
      options.begin_layer = static_cast<int>(config.num_hidden_layers * rank / a.pp_size);
      options.end_layer = static_cast<int>(config.num_hidden_layers * (rank + 1) / a.pp_size);
      options.drop_cache_after_load = a.drop_cache;
      if (!a.expert_dtype.empty()) options.expert_dtype = a.expert_dtype == "fp8" ? model::ExpertDType::kFp8 : model::ExpertDType::kFp4;
      TANDEM_ASSIGN_OR_RETURN(auto weights, model::LoadModelWeights(a.dir, options));
      std::shared_ptr<const model::ModelWeights> shared(std::move(weights));
      p.stages_.push_back(std::make_unique<model::Dsv4Model>(shared));
      p.states_.push_back(std::make_unique<model::HostSequenceState>(shared->config, options.begin_layer, options.end_layer,
                                                                     shared->is_last_stage()));
    }
    return p;
  }

  const model::ModelConfig& config() const { return stages_.front()->config(); }
  const model::Dsv4Model& last() const { return *stages_.back(); }
  model::SequenceState& last_state() { return *states_.back(); }

  absl::Status Step(std::span<const int32_t> tokens, bool all_logits, model::ForwardResult* result,
                    model::ForwardTrace* trace = nullptr) {
    model::HiddenStates hidden, next;
    for (size_t s = 0; s < stages_.size(); ++s) {
      model::SequenceChunk chunk{states_[s].get(), tokens, all_logits};
      const bool last = s + 1 == stages_.size();
      TANDEM_RETURN_IF_ERROR(stages_[s]->Forward({&chunk, 1}, s == 0 ? nullptr : &hidden, last ? nullptr : &next,
                                                 last ? result : nullptr, trace));
      std::swap(hidden, next);
    }
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<model::Dsv4Model>> stages_;
  std::vector<std::unique_ptr<model::HostSequenceState>> states_;
};

absl::Status WriteNpy(const std::string& path, const std::vector<float>& values, int64_t rows, int64_t cols) {
  std::ofstream out(path, std::ios::binary);
  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", rows, cols);
  header.append(63 - (10 + header.size()) % 64, ' ');
  header.push_back('\n');
  const uint16_t length = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(&length), 2);
  out << header;
  out.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(rows * cols * sizeof(float)));
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

int Fail(const char* command, const absl::Status& status) {
  std::cerr << "tandem-model " << command << ": " << status.message() << "\n";
  return status.code() == absl::StatusCode::kInvalidArgument || status.code() == absl::StatusCode::kNotFound ? 2 : 1;
}

// Prefills `ids` (chunked), appending every token's logits when all_logits; returns the last row.
absl::Status Prefill(Pipeline& p, const std::vector<int32_t>& ids, int64_t chunk_size, bool all_logits,
                     std::vector<float>* logits, std::vector<float>* hidden, model::ForwardTrace* trace = nullptr) {
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t step = chunk_size > 0 ? chunk_size : n;
  for (int64_t begin = 0; begin < n; begin += step) {
    const int64_t count = std::min(step, n - begin);
    model::ForwardResult result;
    TANDEM_RETURN_IF_ERROR(
        p.Step({ids.data() + begin, static_cast<size_t>(count)}, all_logits || begin + count == n, &result, trace));
    if (all_logits || begin + count == n) logits->insert(logits->end(), result.logits.begin(), result.logits.end());
    if (hidden) hidden->insert(hidden->end(), result.pre_head_hidden.begin(), result.pre_head_hidden.end());
  }
  return absl::OkStatus();
}

absl::Status WriteTrace(const std::string& path, const model::ForwardTrace& trace) {
  model::SafetensorsWriter writer;
  for (const auto& [name, table] : trace.tables) {
    std::vector<uint8_t> bytes(table.values.size() * sizeof(int32_t));
    std::memcpy(bytes.data(), table.values.data(), bytes.size());
    writer.Add(name, DType::kI32, {static_cast<int64_t>(table.values.size()) / table.cols, table.cols}, std::move(bytes));
  }
  return writer.Write(path);
}

int32_t Argmax(const float* row, int64_t n) { return static_cast<int32_t>(std::max_element(row, row + n) - row); }

}  // namespace

void AddRunCommands(CLI::App& app, int& exit_code) {
  auto run_args = std::make_shared<EngineArgs>();
  auto max_new = std::make_shared<int64_t>(16);
  auto* run = app.add_subcommand("run", "greedy offline generation; prints the generated ids");
  AddEngineOptions(run, *run_args);
  run->add_option("--max-new-tokens", *max_new, "tokens to generate")->check(CLI::NonNegativeNumber);
  run->callback([run_args, max_new, &exit_code] {
    auto ids = ParseIds(run_args->prompt_ids);
    if (!ids.ok()) { exit_code = Fail("run", ids.status()); return; }
    auto pipeline = Pipeline::Load(*run_args);
    if (!pipeline.ok()) { exit_code = Fail("run", pipeline.status()); return; }
    const int64_t vocab = pipeline->config().vocab_size;
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<float> logits;
    if (auto s = Prefill(*pipeline, *ids, run_args->chunk_size, false, &logits, nullptr); !s.ok()) {
      exit_code = Fail("run", s);
      return;
    }
    const auto t1 = std::chrono::steady_clock::now();
    std::vector<int32_t> generated;
    int32_t next = Argmax(logits.data() + logits.size() - vocab, vocab);
    for (int64_t i = 0; i < *max_new; ++i) {
      generated.push_back(next);
      if (next == pipeline->config().eos_token_id || i + 1 == *max_new) break;
      model::ForwardResult result;
      if (auto s = pipeline->Step({&next, 1}, false, &result); !s.ok()) { exit_code = Fail("run", s); return; }
      next = Argmax(result.logits.data(), vocab);
    }
    const auto t2 = std::chrono::steady_clock::now();
    std::string line;
    for (size_t i = 0; i < generated.size(); ++i) line += (i ? " " : "") + std::to_string(generated[i]);
    std::cout << line << "\n";
    const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
    const double decode_s = std::chrono::duration<double>(t2 - t1).count();
    spdlog::info("prefill {} tokens in {:.3f} s ({:.1f} tok/s); decode {} tokens in {:.3f} s", ids->size(), prefill_s,
                 static_cast<double>(ids->size()) / prefill_s, generated.size() > 0 ? generated.size() - 1 : 0, decode_s);
  });

  auto fwd_args = std::make_shared<EngineArgs>();
  auto logits_out = std::make_shared<std::string>();
  auto mtp_out = std::make_shared<std::string>();
  auto decisions_out = std::make_shared<std::string>();
  auto* forward = app.add_subcommand("forward", "one forward over the prompt; writes every position's logits as .npy");
  AddEngineOptions(forward, *fwd_args);
  forward->add_option("--logits-out", *logits_out, "float32 [T, vocab] .npy")->required();
  forward->add_option("--mtp-logits-out", *mtp_out, "float32 [T-1, vocab] .npy of MTP draft logits (next tokens prompt[1:])");
  forward->add_option("--decisions-out", *decisions_out,
                      "safetensors of the discrete choices taken (expert ids, indexer top-k) per layer");
  forward->callback([fwd_args, logits_out, mtp_out, decisions_out, &exit_code] {
    auto ids = ParseIds(fwd_args->prompt_ids);
    if (!ids.ok()) { exit_code = Fail("forward", ids.status()); return; }
    auto pipeline = Pipeline::Load(*fwd_args);
    if (!pipeline.ok()) { exit_code = Fail("forward", pipeline.status()); return; }
    const auto& c = pipeline->config();
    std::vector<float> logits, hidden;
    model::ForwardTrace trace;
    model::ForwardTrace* tracing = decisions_out->empty() ? nullptr : &trace;
    if (auto s = Prefill(*pipeline, *ids, fwd_args->chunk_size, true, &logits, &hidden, tracing); !s.ok()) {
      exit_code = Fail("forward", s);
      return;
    }
    const int64_t T = static_cast<int64_t>(ids->size());
    if (auto s = WriteNpy(*logits_out, logits, T, c.vocab_size); !s.ok()) { exit_code = Fail("forward", s); return; }
    if (!mtp_out->empty() && T >= 2) {
      std::vector<int32_t> next(ids->begin() + 1, ids->end());
      std::vector<float> h(hidden.begin(), hidden.begin() + (T - 1) * c.hc_dim());
      model::SequenceChunk chunk{&pipeline->last_state(), next, true};
      model::ForwardResult draft;
      if (auto s = pipeline->last().ForwardMtp({&chunk, 1}, h, &draft, tracing); !s.ok()) { exit_code = Fail("forward", s); return; }
      if (auto s = WriteNpy(*mtp_out, draft.logits, T - 1, c.vocab_size); !s.ok()) { exit_code = Fail("forward", s); return; }
    }
    if (tracing) {
      if (auto s = WriteTrace(*decisions_out, trace); !s.ok()) { exit_code = Fail("forward", s); return; }
    }
  });
}

}  // namespace tandem::tools
