// The DSV4 forward on the CPU: any [begin, end) slice of layers over a batch of sequence chunks,
// reading and writing per-request state through SequenceState; embedding on the first stage,
// hc_head + norm + head on the last, and the MTP draft layer.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <memory>
#include <span>
#include <vector>

#include "common/core/status.h"
#include "common/model/state.h"
#include "common/model/weights.h"

namespace tandem::model {

// New tokens of one request; their positions continue from state->length().
struct SequenceChunk {
  SequenceState* state = nullptr;
  std::span<const int32_t> tokens;
  bool all_logits = false;  // logits for every token (else only for the last one)
};

// The mHC streams handed from one pipeline stage to the next: [tokens, hc_mult, hidden_size].
struct HiddenStates {
  int64_t tokens = 0;
  std::vector<float> values;
};

// Discrete decisions the forward took, by name ("layers.3.ffn.experts" [T, k], "layers.1.attn.indexer.topk"
// [T, index_topk] padded with -1, "mtp.0.ffn.experts"), appended row by row across calls. For EPLB's
// expert-load counts and for checking a reference implementation against the same choices.
struct ForwardTrace {
  struct Table {
    int64_t cols = 0;
    std::vector<int32_t> values;
  };
  std::map<std::string, Table> tables;
  void Append(const std::string& name, int64_t cols, std::span<const int32_t> row_major);
};

struct ForwardResult {
  // [rows, vocab]: per chunk, every token's row when all_logits, else its last token's row.
  std::vector<float> logits;
  int64_t rows = 0;
  // [tokens, hc_mult * hidden_size]: the streams before hc_head (the MTP input); last stage only.
  std::vector<float> pre_head_hidden;
};

class Dsv4Model {
 public:
  explicit Dsv4Model(std::shared_ptr<const ModelWeights> weights);

  const ModelConfig& config() const { return weights_->config; }
  const ModelWeights& weights() const { return *weights_; }

  // Runs this stage's layers. The first stage embeds the tokens (input must be null); later stages
  // take the previous stage's hidden states. The last stage fills `result`; earlier ones fill
  // `output`. Every chunk's state advances by its token count.
  absl::Status Forward(std::span<const SequenceChunk> batch, const HiddenStates* input, HiddenStates* output,
                       ForwardResult* result, ForwardTrace* trace = nullptr) const;

  // One MTP step per chunk token: chunk.tokens are the *next* tokens (t_{q+1}); `hidden` holds the
  // target's pre-hc_head streams of positions q ([tokens, hc_mult*hidden]); positions continue from
  // state->mtp_length(). Fills draft logits (rows as in Forward) and the draft's own pre-head streams.
  absl::Status ForwardMtp(std::span<const SequenceChunk> batch, std::span<const float> hidden,
                          ForwardResult* result, ForwardTrace* trace = nullptr) const;

 private:
  struct Rope {
    std::vector<double> plain;       // rope_theta, no YaRN
    std::vector<double> compressed;  // compress_rope_theta with YaRN
  };
  absl::Status CheckBatch(std::span<const SequenceChunk> batch, bool mtp, int64_t* total) const;
  void RunLayer(const LayerWeights& layer, std::span<const SequenceChunk> batch, bool mtp, std::vector<float>& x,
                ForwardTrace* trace) const;
  void Head(std::span<const SequenceChunk> batch, const HcHeadWeights& hc_head, const std::vector<float>& norm,
            const std::vector<float>& x, ForwardResult* result) const;

  std::shared_ptr<const ModelWeights> weights_;
  Rope rope_;
};

// What engine::RequestSampler does to one token's logit before its rule, in its order and arithmetic:
// penalize: l = l - subtract (float), then unless repetition is 1, l = float(l < 0 ? double(l) * repetition :
// double(l) / repetition); biased: l = l + bias (float); mask: l = -inf.
struct LogitEdit {
  int32_t token = 0;
  bool penalize = false;
  float subtract = 0.0f;
  double repetition = 1.0;
  bool biased = false;
  float bias = 0.0f;
  bool mask = false;
};

// One logit row to draw the next token from where it lies: the edits (at most one per token), then the
// sampler's rule with the uniform it would have drawn (engine::RequestSampler::PlanDraw).
struct RowDraw {
  int64_t row = 0;  // of the last forward's logit rows
  bool greedy = true;
  double temperature = 1.0;
  int64_t top_k = -1;  // -1: all
  double top_p = 1.0;
  double min_p = 0.0;
  double uniform = 0.0;  // in [0, 1); unused when greedy
  std::vector<LogitEdit> edits;
};

// What a serving engine runs its batches on: the CPU forward or a device backend (whole model, logits
// of each chunk's last token, or every token with all_logits, in the result).
class ForwardRunner {
 public:
  virtual ~ForwardRunner() = default;
  virtual const ModelConfig& config() const = 0;
  virtual absl::Status Forward(std::span<const SequenceChunk> batch, ForwardResult* result) = 0;

  // Optional, for runners whose logits lie on a device, so that only token ids cross to the host.
  // ForwardKeepingLogits is Forward that leaves result->logits empty (result->rows is set) and keeps the
  // logits where they are until the next forward; DrawKept draws `draws` from them (ids[i] for draws[i];
  // the kept logits are not changed) and copies the rows `copy_rows` to `copied` ([copy_rows.size(), vocab]).
  virtual bool keeps_logits() const { return false; }
  virtual absl::Status ForwardKeepingLogits(std::span<const SequenceChunk>, ForwardResult*) {
    return absl::UnimplementedError("this forward runner cannot keep its logits");
  }
  virtual absl::Status DrawKept(std::span<const RowDraw>, std::span<int32_t>, std::span<const int64_t>,
                                std::span<float>) {
    return absl::UnimplementedError("this forward runner cannot keep its logits");
  }
};

// The CPU forward as a runner.
class CpuForwardRunner final : public ForwardRunner {
 public:
  explicit CpuForwardRunner(const Dsv4Model* model) : model_(model) {}
  const ModelConfig& config() const override { return model_->config(); }
  absl::Status Forward(std::span<const SequenceChunk> batch, ForwardResult* result) override {
    return model_->Forward(batch, nullptr, nullptr, result);
  }

 private:
  const Dsv4Model* model_;
};

// RoPE inverse frequencies (NUMERICS.md): rope_dim/2 entries, optionally with YaRN.
std::vector<double> RopeInverseFrequencies(int64_t rope_dim, double base, const RopeScaling* yarn);

}  // namespace tandem::model
