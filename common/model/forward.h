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

// What a serving engine runs its batches on: the CPU forward or a device backend (whole model, logits
// of each chunk's last token, or every token with all_logits, in the result).
class ForwardRunner {
 public:
  virtual ~ForwardRunner() = default;
  virtual const ModelConfig& config() const = 0;
  virtual absl::Status Forward(std::span<const SequenceChunk> batch, ForwardResult* result) = 0;
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
