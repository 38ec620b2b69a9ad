#include "common/engine/server/engine_service.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>

#include <spdlog/spdlog.h>

#include "common/engine/pd_trace.h"

namespace tandem::engine {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Updates handed from the scheduler thread to the call's thread.
class UpdateChannel {
 public:
  void Push(RequestUpdate&& update) {
    {
      std::lock_guard lock(mutex_);
      updates_.push_back(std::move(update));
    }
    ready_.notify_one();
  }
  // Everything queued, waiting up to `timeout` for the first one.
  std::deque<RequestUpdate> Take(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    ready_.wait_for(lock, timeout, [&] { return !updates_.empty(); });
    std::deque<RequestUpdate> out;
    out.swap(updates_);
    return out;
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<RequestUpdate> updates_;
};

v1::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case FinishReason::kTransferred: return v1::FINISH_REASON_TRANSFERRED;
    case FinishReason::kNone: break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

SamplingParams FromProto(const v1::SamplingParams& p) {
  SamplingParams s;
  if (p.has_temperature()) s.temperature = p.temperature();
  if (p.has_top_p()) s.top_p = p.top_p();
  if (p.has_top_k()) s.top_k = p.top_k();
  if (p.has_min_p()) s.min_p = p.min_p();
  if (p.has_repetition_penalty()) s.repetition_penalty = p.repetition_penalty();
  if (p.has_frequency_penalty()) s.frequency_penalty = p.frequency_penalty();
  if (p.has_presence_penalty()) s.presence_penalty = p.presence_penalty();
  if (p.has_seed()) s.seed = p.seed();
  if (p.has_max_new_tokens()) s.max_new_tokens = p.max_new_tokens();
  if (p.has_min_new_tokens()) s.min_new_tokens = p.min_new_tokens();
  s.ignore_eos = p.has_ignore_eos() && p.ignore_eos();
  s.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  for (const auto& bias : p.logit_bias()) s.logit_bias.emplace_back(bias.token_id(), bias.bias());
  return s;
}

EngineService::EngineService(Engine* engine, EngineMetrics* metrics, ServiceInfo info)
    : engine_(engine), metrics_(metrics), info_(std::move(info)) {}

grpc::Status EngineService::Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                                     grpc::ServerWriter<v1::GenerateResponse>* writer) {
  const auto start = Clock::now();
  const auto& pd = request->disaggregation();
  // An unspecified role means this engine's own role.
  const v1::Role role = !request->has_disaggregation() || pd.role() == v1::ROLE_UNSPECIFIED ? info_.role : pd.role();
  if (role != info_.role) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("this engine serves the ", v1::Role_Name(info_.role), " role, the request is for ", v1::Role_Name(role)));
  }
  auto channel = std::make_shared<UpdateChannel>();
  NewRequest r;
  r.role = role == v1::ROLE_PREFILL ? EngineRole::kPrefill : role == v1::ROLE_DECODE ? EngineRole::kDecode : EngineRole::kMixed;
  r.room = {pd.room(), pd.bootstrap_host(), pd.bootstrap_port()};
  r.id = request->request_id().empty() ? absl::StrCat("req-", next_id_.fetch_add(1)) : request->request_id();
  r.prompt.assign(request->input_ids().begin(), request->input_ids().end());
  r.sampling = FromProto(request->sampling());
  r.return_logprobs = request->return_logprobs() || request->has_top_logprobs();
  r.top_logprobs = request->has_top_logprobs() ? request->top_logprobs() : 0;
  r.sink = [channel](RequestUpdate&& update) { channel->Push(std::move(update)); };
  const std::string id = r.id;
  // The hand-over's timeline (pd_trace.h), closed however the call ends.
  const uint64_t room = r.role != EngineRole::kMixed ? r.room.room : 0;
  if (room != 0) pd_trace::Begin(room, r.role);
  struct CloseTrace {
    uint64_t room;
    ~CloseTrace() {
      if (room != 0) pd_trace::Finish(room);
    }
  } close_trace{room};
  if (auto status = engine_->Submit(std::move(r)); !status.ok()) return ToGrpcStatus(status);
  metrics_->RequestStarted();

  bool abort_sent = false;
  auto abort = [&](absl::Status reason) {
    if (!abort_sent) {
      abort_sent = true;
      engine_->Abort(id, std::move(reason));
    }
  };
  std::optional<Clock::time_point> last_token;
  while (true) {
    // A short wait, so that a cancelled client is noticed even while its request sits in the queue.
    auto updates = channel->Take(std::chrono::milliseconds(50));
    if (updates.empty()) {
      if (context->IsCancelled()) abort(absl::CancelledError("the client cancelled the call"));
      continue;
    }
    v1::GenerateResponse response;
    response.set_request_id(id);
    auto* chunk = response.mutable_chunk();
    const RequestUpdate* last = nullptr;
    for (const auto& update : updates) {
      if (update.queue_seconds) metrics_->Queued(*update.queue_seconds);
      for (const auto& token : update.tokens) {
        chunk->add_token_ids(token.token);
        if (request->return_logprobs() || request->has_top_logprobs()) {
          auto* lp = chunk->add_logprobs();
          lp->set_token_id(token.token);
          lp->set_logprob(token.logprob);
          for (const auto& top : token.top) {
            auto* t = lp->add_top();
            t->set_token_id(top.token);
            t->set_logprob(top.logprob);
          }
        }
      }
      last = &update;
    }
    chunk->set_prompt_tokens(last->prompt_tokens);
    chunk->set_completion_tokens(last->completion_tokens);
    chunk->set_cached_tokens(last->cached_tokens);
    if (chunk->token_ids_size() > 0) {
      const auto now = Clock::now();
      if (!last_token) {
        if (room != 0) pd_trace::Mark(room, "first_token");
        metrics_->FirstToken(Seconds(now - start));
      } else {
        metrics_->InterToken(Seconds(now - *last_token) / chunk->token_ids_size());
      }
      last_token = now;
      if (!abort_sent && !writer->Write(response)) abort(absl::CancelledError("the client went away"));
    }
    if (!last->finished) continue;

    metrics_->RequestFinished(*last, Seconds(Clock::now() - start));
    if (!last->status.ok()) return ToGrpcStatus(last->status);
    if (abort_sent) return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the call");
    v1::GenerateResponse done;
    done.set_request_id(id);
    auto* complete = done.mutable_complete();
    complete->set_finish_reason(ToProto(last->finish_reason));
    if (last->matched_stop) complete->set_matched_stop_token_id(*last->matched_stop);
    complete->set_prompt_tokens(last->prompt_tokens);
    complete->set_completion_tokens(last->completion_tokens);
    complete->set_cached_tokens(last->cached_tokens);
    complete->set_retractions(last->retractions);
    writer->Write(done);
    return grpc::Status::OK;
  }
}

grpc::Status EngineService::Abort(grpc::ServerContext*, const v1::AbortRequest* request, v1::AbortResponse* response) {
  response->set_found(engine_->Abort(request->request_id(), absl::AbortedError("aborted by an Abort call")));
  return grpc::Status::OK;
}

grpc::Status EngineService::GetLoads(grpc::ServerContext*, const v1::GetLoadsRequest*, v1::GetLoadsResponse* response) {
  const EngineLoad load = engine_->Load();
  const auto& s = load.scheduler;
  response->set_role(info_.role);
  response->set_running_requests(s.running);
  response->set_waiting_requests(s.waiting);
  for (const auto& pool : s.pools) {
    auto* p = response->add_pools();
    p->set_name(pool.name);
    p->set_total(pool.total);
    p->set_used(pool.used);
    p->set_free(pool.free);
    p->set_page_bytes(pool.page_bytes);
  }
  response->set_token_usage(s.token_usage);
  response->set_generation_throughput(load.generation_throughput);
  response->set_prefix_cached_tokens(s.prefix_cached_tokens);
  response->set_max_total_tokens(s.max_total_tokens);
  response->set_waiting_uncached_tokens(s.waiting_uncached_tokens);
  response->set_total_retractions(s.retractions_total);
  return grpc::Status::OK;
}

grpc::Status EngineService::GetModelInfo(grpc::ServerContext*, const v1::GetModelInfoRequest*,
                                         v1::GetModelInfoResponse* response) {
  const auto& config = engine_->config();
  const auto& options = engine_->options();
  response->set_model_path(info_.model_path);
  response->set_served_model_name(info_.served_model_name);
  response->set_role(info_.role);
  response->set_vocab_size(config.vocab_size);
  response->set_max_context_tokens(engine_->max_context_tokens());
  response->set_max_new_tokens_limit(options.scheduler.max_new_tokens_limit);
  response->add_eos_token_ids(static_cast<int32_t>(config.eos_token_id));
  response->set_page_size(options.page_size);
  response->set_num_hidden_layers(config.num_hidden_layers);
  response->set_hidden_size(config.hidden_size);
  response->set_expert_dtype(engine_->expert_dtype_name());
  response->set_deterministic(options.deterministic);
  response->set_max_running_requests(options.scheduler.max_running_requests);
  response->set_chunked_prefill_size(options.scheduler.chunked_prefill_size);
  response->set_config_hash(info_.config_hash);
  return grpc::Status::OK;
}

}  // namespace tandem::engine
