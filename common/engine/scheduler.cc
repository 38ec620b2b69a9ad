#include "common/engine/scheduler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <spdlog/spdlog.h>

#include "common/engine/pd_trace.h"

namespace tandem::engine {

struct Scheduler::Sequence {
  Sequence(NewRequest r, SamplingConfig config, std::vector<int32_t> eos)
      : request(std::move(r)), sampler(std::move(config), std::move(eos)) {
    tokens = request.prompt;
    prompt_length = static_cast<int64_t>(tokens.size());
  }
  NewRequest request;
  std::vector<int32_t> tokens;  // the prompt, then the visible output
  int64_t prompt_length = 0;
  RequestSampler sampler;
  std::unique_ptr<PagedSequenceState> state;  // null while waiting
  int64_t cached_tokens = 0;
  int64_t retractions = 0;
  uint64_t admission = 0;
  bool admitted_once = false;
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();
  std::optional<double> queue_seconds;  // reported with the next update
  // Disaggregation. Decode role: awaiting_state from admission until the hand-over arrived.
  // Prefill role: the manifest of the prompt's state, pages shipped so far, the hand-over once the
  // prompt is done, and whether decode was told.
  bool awaiting_state = false;
  bool state_received = false;
  bool destination_ready = false;
  std::optional<StateManifest> manifest;
  int64_t shipped_pages = 0;
  std::optional<Handoff> handoff;
  bool completed_sent = false;
  bool pd_done = false;  // the room needs no abort any more

  bool pd() const { return request.role != EngineRole::kMixed; }
  int64_t computed() const { return state ? state->length() : 0; }
  int64_t total() const { return static_cast<int64_t>(tokens.size()); }
  bool decoding() const { return state && !awaiting_state && computed() + 1 == total() && total() > prompt_length; }
  bool prefilling() const { return state && !awaiting_state && !handoff && computed() < total() && !decoding(); }
  bool retractable() const { return state && !awaiting_state && request.role != EngineRole::kPrefill; }
  int64_t remaining_new_tokens() const { return sampler.config().max_new_tokens - sampler.generated(); }
};

namespace {

int64_t PagesFor(int64_t tokens, int64_t page_size) { return (tokens + page_size - 1) / page_size; }

// log-softmax of the raw row: the sampled token's logprob and the `top` most likely tokens.
TokenOutput Logprobs(std::span<const float> row, int32_t token, int32_t top) {
  const float max = *std::max_element(row.begin(), row.end());
  double sum = 0;
  for (float v : row) sum += std::exp(static_cast<double>(v - max));
  const double lse = static_cast<double>(max) + std::log(sum);
  TokenOutput out;
  out.token = token;
  out.logprob = static_cast<float>(row[static_cast<size_t>(token)] - lse);
  if (top > 0) {
    std::vector<int32_t> order(row.size());
    std::iota(order.begin(), order.end(), 0);
    const auto k = std::min<size_t>(static_cast<size_t>(top), order.size());
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(),
                      [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    for (size_t i = 0; i < k; ++i) out.top.push_back({order[i], static_cast<float>(row[order[i]] - lse)});
  }
  return out;
}

}  // namespace

Scheduler::Scheduler(const model::Dsv4Model* model, cache::StatePools* pools, SchedulerOptions options)
    : own_runner_(std::make_unique<model::CpuForwardRunner>(model)), model_(own_runner_.get()), pools_(pools),
      options_(std::move(options)) {
  Init();
}

Scheduler::Scheduler(model::ForwardRunner* runner, cache::StatePools* pools, SchedulerOptions options)
    : model_(runner), pools_(pools), options_(std::move(options)) {
  Init();
}

void Scheduler::Init() {
  if (options_.enable_prefix_cache) prefix_cache_ = std::make_unique<cache::RadixCache>(pools_);
  eos_token_ids_ = {static_cast<int32_t>(model_->config().eos_token_id)};
  max_context_ = pools_->token_pages().total() * pools_->page_size();
}

const char* EngineRoleName(EngineRole role) {
  switch (role) {
    case EngineRole::kPrefill: return "prefill";
    case EngineRole::kDecode: return "decode";
    case EngineRole::kMixed: break;
  }
  return "mixed";
}

void Scheduler::SetRole(EngineRole role, PrefillLink* prefill, DecodeLink* decode) {
  role_ = role;
  prefill_link_ = prefill;
  decode_link_ = decode;
}

Scheduler::~Scheduler() {
  AbortAll(absl::UnavailableError("engine stopped"));
  quarantine_.Clear();  // the engine is going: no request takes these pages again
  prefix_cache_.reset();
}

absl::Status Scheduler::Validate(const NewRequest& request) const {
  const int64_t vocab = model_->config().vocab_size;
  if (request.role != role_) {
    return absl::FailedPreconditionError(absl::StrCat("this engine serves the ", EngineRoleName(role_), " role; the request is for ",
                                                      EngineRoleName(request.role)));
  }
  if (request.role != EngineRole::kMixed && request.room.room == 0) {
    return absl::InvalidArgumentError("disaggregation.room is missing (0 is not a room)");
  }
  if (request.role == EngineRole::kDecode && (request.room.bootstrap_host.empty() || request.room.bootstrap_port <= 0)) {
    return absl::InvalidArgumentError("disaggregation.bootstrap_host/bootstrap_port of the prefill worker are missing");
  }
  if (request.prompt.empty()) return absl::InvalidArgumentError("input_ids is empty: a prompt needs at least one token");
  for (size_t i = 0; i < request.prompt.size(); ++i) {
    const int32_t id = request.prompt[i];
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("input_ids[", i, "] = ", id, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  if (request.top_logprobs < 0 || request.top_logprobs > 20) {
    return absl::InvalidArgumentError(absl::StrCat("top_logprobs must be in [0, 20], got ", request.top_logprobs));
  }
  TANDEM_ASSIGN_OR_RETURN(const SamplingConfig config,
                          ValidateSampling(request.sampling, vocab, options_.max_new_tokens_limit));
  const int64_t prompt = static_cast<int64_t>(request.prompt.size());
  if (prompt + config.max_new_tokens > max_context_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt, " tokens plus max_new_tokens ", config.max_new_tokens, " exceeds the engine's maximum context of ",
        max_context_, " tokens (", pools_->token_pages().total(), " token pages of ", pools_->page_size(), ")"));
  }
  return absl::OkStatus();
}

absl::Status Scheduler::Add(NewRequest request) {
  TANDEM_RETURN_IF_ERROR(Validate(request));
  if (live_.contains(request.id)) {
    return absl::AlreadyExistsError(absl::StrCat("request id \"", request.id, "\" is already live on this engine"));
  }
  if (static_cast<int64_t>(waiting_.size()) >= options_.max_queued_requests) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the engine's queue is full (", options_.max_queued_requests, " waiting requests)"));
  }
  TANDEM_ASSIGN_OR_RETURN(SamplingConfig config,
                          ValidateSampling(request.sampling, model_->config().vocab_size, options_.max_new_tokens_limit));
  if (request.role == EngineRole::kPrefill) {
    if (!prefill_link_) return absl::FailedPreconditionError("prefill role without a transfer link");
    if (!request.room_expected) TANDEM_RETURN_IF_ERROR(prefill_link_->Expect(request.room.room));
    request.room_expected = true;
  }
  if (request.role == EngineRole::kDecode && !decode_link_) {
    return absl::FailedPreconditionError("decode role without a transfer link");
  }
  auto seq = std::make_unique<Sequence>(std::move(request), std::move(config), eos_token_ids_);
  seq->sampler.ForceOutput(options_.forced_output_ids);
  live_[seq->request.id] = seq.get();
  waiting_.push_back(std::move(seq));
  return absl::OkStatus();
}

std::unique_ptr<Scheduler::Sequence> Scheduler::Take(const std::string& id) {
  auto it = live_.find(id);
  if (it == live_.end()) return nullptr;
  Sequence* target = it->second;
  live_.erase(it);
  auto take_from = [target](auto& list) -> std::unique_ptr<Sequence> {
    for (auto i = list.begin(); i != list.end(); ++i) {
      if (i->get() == target) {
        auto owned = std::move(*i);
        list.erase(i);
        return owned;
      }
    }
    return nullptr;
  };
  if (auto seq = take_from(running_)) return seq;
  return take_from(waiting_);
}

bool Scheduler::Abort(const std::string& id, const absl::Status& reason) {
  auto seq = Take(id);
  if (!seq) return false;
  if (seq->pd() && !seq->pd_done) {
    seq->pd_done = true;
    if (seq->request.role == EngineRole::kPrefill) prefill_link_->Abort(seq->request.room.room, reason);
    if (seq->request.role == EngineRole::kDecode) decode_link_->Abort(seq->request.room.room, reason);
  }
  QuarantineIfWritable(*seq);
  ReleaseState(*seq, /*cache_it=*/false);
  RequestUpdate update;
  update.finished = true;
  update.status = reason;
  Emit(*seq, std::move(update));
  return true;
}

void Scheduler::AbortAll(const absl::Status& reason) {
  std::vector<std::string> ids;
  for (const auto& seq : running_) ids.push_back(seq->request.id);
  for (const auto& seq : waiting_) ids.push_back(seq->request.id);
  for (const auto& id : ids) Abort(id, reason);
}

void Scheduler::Emit(Sequence& seq, RequestUpdate update) {
  update.prompt_tokens = seq.prompt_length;
  update.completion_tokens = seq.sampler.generated();
  update.cached_tokens = seq.cached_tokens;
  update.retractions = seq.retractions;
  if (seq.queue_seconds) {
    update.queue_seconds = seq.queue_seconds;
    seq.queue_seconds.reset();
  }
  if (seq.request.sink) seq.request.sink(std::move(update));
}

void Scheduler::ReleaseState(Sequence& seq, bool cache_it) {
  if (!seq.state) return;
  if (cache_it && prefix_cache_ && seq.state->length() >= pools_->page_size()) {
    auto inserted = seq.state->InsertInto(prefix_cache_.get(), seq.tokens);
    if (!inserted.ok()) spdlog::warn("prefix cache: request {}: {}", seq.request.id, std::string(inserted.status().message()));
  }
  seq.state->Release();
  seq.state.reset();
}

// A decode request whose state was still on its way: a copy prefill started before the room ended may land
// after it, so its pages stay out of the pool until the link says none can (a clean end frees them at once).
void Scheduler::QuarantineIfWritable(Sequence& seq) {
  if (seq.request.role != EngineRole::kDecode || !seq.awaiting_state || !seq.state) return;
  const uint64_t room = seq.request.room.room;
  if (decode_link_->PagesReusable(room)) return;
  quarantine_.Hold(room, std::move(seq.state));
}

absl::StatusOr<bool> Scheduler::Admit(Sequence& seq) {
  if (static_cast<int64_t>(running_.size()) >= options_.max_running_requests) return false;
  const bool needs_state = seq.request.role == EngineRole::kDecode && !seq.state_received;
  const int64_t page = pools_->page_size();
  seq.state = std::make_unique<PagedSequenceState>(pools_);
  int64_t cached = 0;
  if (prefix_cache_ && seq.total() > 1 && !needs_state) {
    const auto match = prefix_cache_->MatchPrefix(std::span<const int32_t>(seq.tokens).first(seq.tokens.size() - 1));
    if (match.tokens > 0) {
      if (auto status = seq.state->AdoptPrefix(prefix_cache_.get(), match); status.ok()) {
        cached = match.tokens;
      } else {
        spdlog::warn("prefix cache: request {}: {}", seq.request.id, std::string(status.message()));
        seq.state->Release();
      }
    }
  }
  // The whole prompt, plus up to a page of output so that admitted requests can start decoding
  // (a prefill-role request never decodes here).
  const int64_t headroom = seq.request.role == EngineRole::kPrefill ? 0 : std::min(seq.remaining_new_tokens(), page);
  const int64_t want = std::min(seq.total() + headroom, max_context_);
  auto status = seq.state->Reserve(want);
  if (!status.ok() && prefix_cache_) {
    const int64_t pages = PagesFor(want, page) - PagesFor(cached, page);
    prefix_cache_->Evict(pages, 1);
    status = seq.state->Reserve(want);
  }
  if (!status.ok()) {
    seq.state->Release();
    seq.state.reset();
    return false;
  }
  if (seq.pd() && !seq.manifest) {
    // Both legs describe the prompt's state in the same canonical order (state_manifest.h).
    TANDEM_ASSIGN_OR_RETURN(auto manifest, StateManifest::Build(*pools_, *seq.state, seq.prompt_length));
    seq.manifest = std::move(manifest);
    if (needs_state) {
      seq.awaiting_state = true;
      TANDEM_RETURN_IF_ERROR(decode_link_->Register(seq.request.room, *seq.manifest));
    }
  }
  if (!seq.admitted_once) {
    seq.admitted_once = true;
    seq.cached_tokens = std::min(cached, seq.prompt_length);
    seq.queue_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - seq.arrival).count();
  }
  seq.admission = next_admission_++;
  return true;
}

bool Scheduler::EnsureReserved(Sequence& seq, int64_t length) {
  if (seq.state->reserved() >= length) return true;
  if (seq.state->Reserve(length).ok()) return true;
  if (prefix_cache_) {
    prefix_cache_->Evict(PagesFor(length - seq.state->reserved(), pools_->page_size()), 0);
    if (seq.state->Reserve(length).ok()) return true;
  }
  return false;
}

// The newest running request that can be recomputed locally (not one whose state is in flight, nor a
// prefill-role request whose pages decode is being written from).
Scheduler::Sequence* Scheduler::NewestRetractable() {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    if ((*it)->retractable()) return it->get();
  }
  return nullptr;
}

// Retraction: the request's pages go back, its output so far is kept, and it waits at the front of the
// queue to be recomputed (prompt + output) when pages free up.
void Scheduler::Retract(Sequence* victim) {
  auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& s) { return s.get() == victim; });
  auto seq = std::move(*it);
  running_.erase(it);
  spdlog::info("retracting request {} ({} tokens) to free pages", seq->request.id, seq->total());
  ReleaseState(*seq, /*cache_it=*/false);
  ++seq->retractions;
  ++retractions_total_;
  waiting_.push_front(std::move(seq));
}

void Scheduler::Fail(Sequence& seq, const absl::Status& status) { Abort(seq.request.id, status); }

bool Scheduler::waiting_on_peer() const {
  for (const auto& seq : running_) {
    if (!seq->awaiting_state && !seq->handoff) return false;
  }
  // Queued requests the last step could not admit wait on the same answers or on quarantined pages (the link
  // wakes the engine when those come back).
  if (!waiting_.empty()) return !quarantine_.empty();
  return !running_.empty();
}

absl::Status Scheduler::ShipFinishedPages(Sequence& seq, int64_t end_page, bool tail) {
  std::vector<size_t> segments = seq.manifest->TokenPageSegments(seq.shipped_pages, end_page);
  if (tail) {
    const auto rest = seq.manifest->TailSegments();
    segments.insert(segments.end(), rest.begin(), rest.end());
  }
  if (segments.empty()) return absl::OkStatus();
  TANDEM_RETURN_IF_ERROR(prefill_link_->Ship(seq.request.room.room, *seq.manifest, segments));
  seq.shipped_pages = std::max(seq.shipped_pages, std::min(end_page, seq.manifest->token_pages()));
  return absl::OkStatus();
}

// The disaggregation side of a step: decode requests whose state arrived start decoding; prefill
// requests ship the pages their prompt has passed, then the rest and the first token, then wait for
// decode's acknowledgement before their pages go back.
void Scheduler::ServeHandovers() {
  if (role_ == EngineRole::kMixed) return;
  std::vector<Sequence*> pd;
  for (auto& seq : running_) {
    if (seq->pd() && !seq->pd_done) pd.push_back(seq.get());
  }
  for (Sequence* seq : pd) {
    const uint64_t room = seq->request.room.room;
    if (seq->request.role == EngineRole::kDecode) {
      if (!seq->awaiting_state) continue;
      auto arrived = decode_link_->Poll(room);
      if (!arrived) continue;
      if (!arrived->ok()) {
        seq->pd_done = true;
        Fail(*seq, arrived->status());
        continue;
      }
      ReceiveState(*seq, **arrived);
      continue;
    }
    if (!seq->destination_ready) {
      auto ready = prefill_link_->DestinationReady(room);
      if (!ready) continue;
      if (!ready->ok()) {
        seq->pd_done = true;
        Fail(*seq, *ready);
        continue;
      }
      seq->destination_ready = true;
    }
    if (!seq->handoff) {
      if (auto shipped = ShipFinishedPages(*seq, seq->computed() / pools_->page_size(), false); !shipped.ok()) Fail(*seq, shipped);
      continue;
    }
    if (!seq->completed_sent) {
      absl::Status status = ShipFinishedPages(*seq, seq->manifest->token_pages(), true);
      if (status.ok()) status = prefill_link_->Complete(room, *seq->handoff);
      if (!status.ok()) {
        Fail(*seq, status);
        continue;
      }
      seq->completed_sent = true;
    }
    auto acked = prefill_link_->Acknowledged(room);
    if (!acked) continue;
    seq->pd_done = true;
    if (!acked->ok()) {
      Fail(*seq, *acked);
      continue;
    }
    auto owned = Take(seq->request.id);
    ReleaseState(*owned, /*cache_it=*/true);
    RequestUpdate update;
    update.tokens.push_back({owned->handoff->first_token, 0, {}});
    update.finished = true;
    update.finish_reason = FinishReason::kTransferred;
    Emit(*owned, std::move(update));
  }
}

void Scheduler::ReceiveState(Sequence& seq, const Handoff& handoff) {
  const uint64_t room = seq.request.room.room;
  if (!handoff.verified) {
    const absl::StatusOr<uint64_t> computed = seq.manifest->Checksum(*pools_);
    if (!computed.ok()) {
      const absl::Status bad = absl::InternalError(
          absl::StrCat("reading the received state of room ", room, ": ", computed.status().message()));
      decode_link_->Acknowledge(room, bad);
      seq.pd_done = true;
      Fail(seq, bad);
      return;
    }
    const uint64_t checksum = *computed;
    if (checksum != handoff.checksum) {
      const absl::Status bad = absl::DataLossError(absl::StrCat(
          "KV transfer checksum mismatch for room ", room, ": prefill sent ", handoff.checksum, ", decode computed ", checksum));
      decode_link_->Acknowledge(room, bad);
      seq.pd_done = true;
      Fail(seq, bad);
      return;
    }
    pd_trace::Mark(room, "checked");
  }
  // The first token goes out before the ACK: only prefill's page release waits on that, the client on this.
  seq.pd_done = true;
  seq.awaiting_state = false;
  seq.state_received = true;
  seq.state->set_length(seq.prompt_length);
  const int32_t token = handoff.first_token;
  const FinishReason reason = seq.sampler.AcceptSampledElsewhere(token);
  RequestUpdate update;
  if (reason != FinishReason::kStop) {
    seq.tokens.push_back(token);
    update.tokens.push_back({token, 0, {}});
  }
  if (reason == FinishReason::kNone) {
    Emit(seq, std::move(update));
    decode_link_->Acknowledge(room, absl::OkStatus());
    return;
  }
  update.finished = true;
  update.finish_reason = reason;
  update.matched_stop = seq.sampler.matched_stop();
  auto owned = Take(seq.request.id);
  ReleaseState(*owned, /*cache_it=*/true);
  Emit(*owned, std::move(update));
  decode_link_->Acknowledge(room, absl::OkStatus());
}

int64_t Scheduler::PrefillChunk(const Sequence& seq, int64_t budget) const {
  const int64_t begin = seq.computed();
  const int64_t remaining = seq.total() - begin;
  int64_t count = std::min(remaining, budget);
  if (prefix_cache_ && count > 0) {
    // End chunks on page boundaries where possible: only there can the state be kept for reuse.
    const int64_t page = pools_->page_size();
    const int64_t last_boundary = (seq.total() - 1) / page * page;
    if (begin < last_boundary && begin + count > last_boundary) {
      count = last_boundary - begin;
    } else if (count < remaining) {
      const int64_t aligned = (begin + count) / page * page - begin;
      if (aligned > 0) count = aligned;
    }
  }
  return count;
}

// Per planned chunk whose next token is due: the id the runner drew, or the row it copied to the host.
struct Scheduler::KeptDraws {
  std::vector<std::optional<int32_t>> drawn;
  std::vector<int64_t> copied_at;  // index into `copied` rows, -1 when none
  std::vector<float> copied;
};

absl::Status Scheduler::DrawKept(const std::vector<Planned>& plan, KeptDraws* out) {
  const int64_t vocab = model_->config().vocab_size;
  out->drawn.assign(plan.size(), std::nullopt);
  out->copied_at.assign(plan.size(), -1);
  std::vector<model::RowDraw> draws;
  std::vector<size_t> draw_of;
  std::vector<int64_t> copy_rows;
  for (size_t i = 0; i < plan.size(); ++i) {
    Sequence& seq = *plan[i].seq;
    if (seq.computed() != seq.total()) continue;  // mid-prompt: no token due
    const int64_t row = static_cast<int64_t>(i);
    // Logprobs are of the raw row: it comes to the host, and the token is sampled there from it.
    std::optional<model::RowDraw> draw;
    if (!seq.request.return_logprobs) draw = seq.sampler.PlanDraw(row);
    if (draw) {
      draws.push_back(std::move(*draw));
      draw_of.push_back(i);
    } else {
      out->copied_at[i] = static_cast<int64_t>(copy_rows.size());
      copy_rows.push_back(row);
    }
  }
  if (draws.empty() && copy_rows.empty()) return absl::OkStatus();
  std::vector<int32_t> ids(draws.size());
  out->copied.resize(copy_rows.size() * static_cast<size_t>(vocab));
  TANDEM_RETURN_IF_ERROR(model_->DrawKept(draws, ids, copy_rows, out->copied));
  for (size_t k = 0; k < draws.size(); ++k) {
    if (ids[k] < 0 || ids[k] >= vocab) {
      return absl::InternalError(absl::StrCat("the runner drew token ", ids[k], ", outside the vocabulary [0, ", vocab, ")"));
    }
    out->drawn[draw_of[k]] = ids[k];
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> Scheduler::Step() {
  if (!quarantine_.empty()) quarantine_.ReleaseReusable(*decode_link_);  // before admission: it may need them
  if (idle()) return false;
  const int64_t page = pools_->page_size();
  ServeHandovers();

  // Decoding requests need room for one more position; retract the newest ones until they have it.
  for (size_t i = 0; i < running_.size();) {
    Sequence& seq = *running_[i];
    if (!seq.decoding()) {
      ++i;
      continue;
    }
    bool retracted_self = false;
    while (!EnsureReserved(seq, seq.computed() + 1)) {
      Sequence* victim = NewestRetractable();  // never older than `seq`, which is retractable itself
      retracted_self = victim == &seq;
      Retract(victim);
      if (retracted_self) break;
    }
    if (!retracted_self) ++i;
  }

  std::vector<Planned> plan;
  int64_t budget = options_.chunked_prefill_size;
  for (auto& seq : running_) {
    if (seq->decoding()) {
      plan.push_back({seq.get(), 1});
    } else if (budget > 0 && seq->prefilling()) {
      const int64_t count = PrefillChunk(*seq, budget);
      if (count > 0) {
        plan.push_back({seq.get(), count});
        budget -= count;
      }
    }
  }
  while (!waiting_.empty() && budget > 0) {
    Sequence& head = *waiting_.front();
    auto admitted = Admit(head);
    if (!admitted.ok()) {
      Fail(head, admitted.status());
      continue;
    }
    if (!*admitted) break;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    if (!head.prefilling()) continue;  // its state comes from the prefill engine
    const int64_t count = PrefillChunk(head, budget);
    plan.push_back({&head, count});
    budget -= count;
  }
  if (plan.empty()) {
    ServeHandovers();
    if (running_.empty() && !waiting_.empty() && quarantine_.empty()) {
      // Validation guarantees a request fits an empty engine; anything else is a bug, not a hang. (Quarantined
      // pages come back within the link's grace: the request waits for them instead.)
      Abort(waiting_.front()->request.id,
            absl::ResourceExhaustedError("the request does not fit the engine's pools even when it runs alone"));
      return true;
    }
    return false;
  }

  std::vector<model::SequenceChunk> batch;
  batch.reserve(plan.size());
  for (const auto& p : plan) {
    batch.push_back({p.seq->state.get(),
                     std::span<const int32_t>(p.seq->tokens).subspan(static_cast<size_t>(p.seq->computed()),
                                                                    static_cast<size_t>(p.count)),
                     false});
  }
  model::ForwardResult result;
  const bool keep = options_.sample_on_device && model_->keeps_logits();
  KeptDraws kept;
  absl::Status status = keep ? model_->ForwardKeepingLogits(batch, &result) : model_->Forward(batch, &result);
  const char* failed = "forward failed";
  if (status.ok() && keep) {
    status = DrawKept(plan, &kept);
    failed = "drawing the next tokens on the device failed";
  }
  if (!status.ok()) {
    spdlog::error("{}: {}", failed, status.ToString());
    for (const auto& p : plan) Abort(p.seq->request.id, absl::InternalError(absl::StrCat(failed, ": ", status.message())));
    return status;
  }

  const int64_t vocab = model_->config().vocab_size;
  // Finished requests give their pages back before their sink hears of it.
  std::vector<std::pair<std::string, RequestUpdate>> finished;
  for (size_t i = 0; i < plan.size(); ++i) {
    Sequence& seq = *plan[i].seq;
    if (prefix_cache_ && seq.computed() % page == 0) {
      if (auto status = seq.state->CaptureBoundary(); !status.ok()) {
        spdlog::debug("prefix cache: no snapshot for {} at {}: {}", seq.request.id, seq.computed(), std::string(status.message()));
      }
    }
    if (seq.computed() != seq.total()) {
      continue;
    }
    std::vector<float> raw;
    int32_t token = 0;
    if (keep && kept.drawn[i]) {
      token = seq.sampler.TakeDrawn(*kept.drawn[i]);
    } else {
      float* const logits = keep ? kept.copied.data() + kept.copied_at[i] * vocab
                                 : result.logits.data() + static_cast<int64_t>(i) * vocab;
      std::span<float> row(logits, static_cast<size_t>(vocab));
      if (seq.request.return_logprobs) raw.assign(row.begin(), row.end());
      token = seq.sampler.Sample(row);
    }
    const FinishReason reason = seq.sampler.Accept(token);
    if (seq.request.role == EngineRole::kPrefill) {
      // The prompt's state is final: the first token and the checksum go to decode with the rest.
      pd_trace::Mark(seq.request.room.room, "prompt_done");
      absl::StatusOr<uint64_t> checksum = uint64_t{0};
      if (!prefill_link_->checksums_shipped_state()) checksum = seq.manifest->Checksum(*pools_);
      if (!checksum.ok()) {
        Abort(seq.request.id, absl::InternalError(absl::StrCat("reading the prompt's state: ", checksum.status().message())));
        continue;
      }
      pd_trace::Mark(seq.request.room.room, "checksummed");
      seq.handoff = Handoff{token, *checksum};
      continue;
    }
    RequestUpdate update;
    if (reason != FinishReason::kStop) {
      seq.tokens.push_back(token);
      update.tokens.push_back(seq.request.return_logprobs ? Logprobs(raw, token, seq.request.top_logprobs)
                                                          : TokenOutput{token, 0, {}});
    }
    if (reason != FinishReason::kNone) {
      update.finished = true;
      update.finish_reason = reason;
      update.matched_stop = seq.sampler.matched_stop();
      finished.emplace_back(seq.request.id, std::move(update));
      continue;
    }
    Emit(seq, std::move(update));
  }
  for (auto& [id, update] : finished) {
    auto seq = Take(id);
    ReleaseState(*seq, /*cache_it=*/true);
    Emit(*seq, std::move(update));
  }
  ServeHandovers();
  return true;
}

SchedulerStats Scheduler::Stats() const {
  SchedulerStats stats;
  stats.running = static_cast<int64_t>(running_.size());
  stats.waiting = static_cast<int64_t>(waiting_.size());
  for (const auto& seq : waiting_) stats.waiting_uncached_tokens += seq->total();
  stats.retractions_total = retractions_total_;
  for (const auto& seq : running_) {
    stats.awaiting_state += seq->awaiting_state ? 1 : 0;
    stats.handing_over += seq->handoff ? 1 : 0;
  }
  stats.quarantined_pages = quarantine_.pages();
  if (prefix_cache_) stats.prefix_cached_tokens = prefix_cache_->stats().cached_tokens;
  stats.max_total_tokens = max_context_;
  stats.pools = pools_->Usage();
  const auto& tokens = pools_->token_pages();
  stats.token_usage = tokens.total() > 0 ? static_cast<double>(tokens.used()) / static_cast<double>(tokens.total()) : 0.0;
  return stats;
}

}  // namespace tandem::engine
