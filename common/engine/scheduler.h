// The continuous-batching scheduler of one engine: admission by free pages, chunked prefill mixed with
// decode steps, retraction under memory pressure, abort, the prefix cache, per-request updates, and (decode
// role) the quarantine of a failed transfer's pages.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "common/cache/pools.h"
#include "common/cache/radix_cache.h"
#include "common/core/status.h"
#include "common/engine/disaggregation.h"
#include "common/engine/page_quarantine.h"
#include "common/engine/paged_state.h"
#include "common/engine/sampler.h"
#include "common/model/forward.h"

namespace tandem::engine {

struct SchedulerOptions {
  int64_t chunked_prefill_size = 8192;  // prompt tokens per step, over all prefilling requests
  int64_t max_running_requests = 64;
  int64_t max_queued_requests = 4096;
  int64_t max_new_tokens_limit = 32768;
  bool enable_prefix_cache = true;
  // With a runner that keeps its logits (a GPU): draw the next tokens there and bring back only the ids.
  // Requests that need the row itself (logprobs) or whose edits it cannot take get their row copied and
  // are sampled on the host as before; the tokens are the same either way.
  bool sample_on_device = true;
  // Test only (--test-forced-output-ids): every request's i-th generated token is replaced by the i-th
  // id here (the forward and the draw still run); past the list, sampling is normal. The finish rules
  // (stop ids, eos, max tokens) apply to the forced tokens as to sampled ones.
  std::vector<int32_t> forced_output_ids;
};

struct TopLogprob {
  int32_t token = 0;
  float logprob = 0;
};

struct TokenOutput {
  int32_t token = 0;
  float logprob = 0;           // of the raw logits (before penalties and temperature); when asked for
  std::vector<TopLogprob> top;  // the top_logprobs most likely tokens
};

// What a request's sink receives: new tokens, or the end (finished, with an OK status and a reason,
// or with the error that ended it: ABORTED, UNAVAILABLE, INTERNAL).
struct RequestUpdate {
  std::vector<TokenOutput> tokens;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;
  int64_t retractions = 0;
  std::optional<double> queue_seconds;  // on the first update after the request was first admitted
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  std::optional<int32_t> matched_stop;
  absl::Status status;
};

// Called on the scheduler's thread; must not block.
using UpdateSink = std::function<void(RequestUpdate&&)>;

struct NewRequest {
  std::string id;
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  bool return_logprobs = false;
  int32_t top_logprobs = 0;  // 0..20
  UpdateSink sink;
  EngineRole role = EngineRole::kMixed;  // must be the engine's own role
  RoomInfo room;                         // prefill and decode roles
  bool room_expected = false;            // prefill role: PrefillLink::Expect already ran (Engine::Submit)
};

struct SchedulerStats {
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t waiting_uncached_tokens = 0;
  int64_t retractions_total = 0;
  int64_t prefix_cached_tokens = 0;  // held by the prefix cache
  int64_t max_total_tokens = 0;
  int64_t awaiting_state = 0;  // decode role: pages reserved, state in flight from prefill
  int64_t handing_over = 0;    // prefill role: prompt done, shipping or waiting for decode's ack
  int64_t quarantined_pages = 0;  // decode role: token pages of failed requests prefill may still be writing
  double token_usage = 0;
  std::vector<cache::PoolUsage> pools;
};

// Single-threaded: the owner calls everything from one thread (Engine runs it on its own).
class Scheduler {
 public:
  Scheduler(const model::Dsv4Model* model, cache::StatePools* pools, SchedulerOptions options);
  // Runs the batches on `runner` (the CPU forward or a device backend; not owned).
  Scheduler(model::ForwardRunner* runner, cache::StatePools* pools, SchedulerOptions options);
  ~Scheduler();

  // Makes this a prefill or decode engine of a disaggregated pair; the link must outlive the scheduler.
  void SetRole(EngineRole role, PrefillLink* prefill, DecodeLink* decode);
  EngineRole role() const { return role_; }

  // Checks a request against the model and the pools without touching any state (thread-safe):
  // INVALID_ARGUMENT with the field and the limit.
  absl::Status Validate(const NewRequest& request) const;
  // Validates and queues. ALREADY_EXISTS for a live id, RESOURCE_EXHAUSTED when the queue is full.
  absl::Status Add(NewRequest request);
  // Ends a live request with `reason` (its sink gets the final update) and frees what it held.
  bool Abort(const std::string& id, const absl::Status& reason);
  void AbortAll(const absl::Status& reason);

  // One step: admit what fits, run one forward over the batch, sample, emit. Returns false when
  // there was nothing to do. An error (a failed forward) ends every request in the batch with it.
  absl::StatusOr<bool> Step();
  // True while requests wait only on the other engine (nothing to compute until it answers, or until
  // quarantined pages come back for the queued ones).
  bool waiting_on_peer() const;

  bool idle() const { return running_.empty() && waiting_.empty(); }
  // Longest prompt + output the pools can hold for one request.
  int64_t max_context_tokens() const { return max_context_; }
  SchedulerStats Stats() const;
  // Every page of every pool is free or accounted for by a live request, the prefix cache or the quarantine.
  absl::Status CheckAccounting() const { return pools_->CheckAccounting(); }
  cache::RadixCache* prefix_cache() { return prefix_cache_.get(); }

 private:
  struct Sequence;
  struct Planned {
    Sequence* seq = nullptr;
    int64_t count = 0;
  };

  // True when admitted, false when it does not fit yet; an error ends the request.
  absl::StatusOr<bool> Admit(Sequence& seq);
  void ServeHandovers();
  void ReceiveState(Sequence& seq, const Handoff& handoff);
  absl::Status ShipFinishedPages(Sequence& seq, int64_t end_page, bool tail);
  void Fail(Sequence& seq, const absl::Status& status);
  Sequence* NewestRetractable();
  bool EnsureReserved(Sequence& seq, int64_t length);
  void Retract(Sequence* victim);
  int64_t PrefillChunk(const Sequence& seq, int64_t budget) const;
  struct KeptDraws;
  absl::Status DrawKept(const std::vector<Planned>& plan, KeptDraws* out);
  void Emit(Sequence& seq, RequestUpdate update);
  void Finish(Sequence& seq, RequestUpdate update);
  void ReleaseState(Sequence& seq, bool cache_it);
  void QuarantineIfWritable(Sequence& seq);
  std::unique_ptr<Sequence> Take(const std::string& id);

  void Init();
  std::unique_ptr<model::ForwardRunner> own_runner_;  // the CPU runner of the first constructor
  model::ForwardRunner* model_;
  cache::StatePools* pools_;
  SchedulerOptions options_;
  std::unique_ptr<cache::RadixCache> prefix_cache_;
  PageQuarantine quarantine_;
  std::vector<int32_t> eos_token_ids_;
  int64_t max_context_ = 0;
  // Running in admission order (the newest is retracted first); waiting in FIFO order, retracted at the front.
  std::vector<std::unique_ptr<Sequence>> running_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  absl::flat_hash_map<std::string, Sequence*> live_;
  EngineRole role_ = EngineRole::kMixed;
  PrefillLink* prefill_link_ = nullptr;
  DecodeLink* decode_link_ = nullptr;
  uint64_t next_admission_ = 0;
  int64_t retractions_total_ = 0;
};

}  // namespace tandem::engine
