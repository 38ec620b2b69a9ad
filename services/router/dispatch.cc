#include "services/router/dispatch.h"

#include <chrono>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "absl/strings/str_format.h"

namespace tandem::router {

bool IsRetryable(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kCancelled:  // the server side went away (our own cancels are not retried)
      return true;
    default:
      return false;
  }
}

bool CountsAsWorkerFailure(const absl::Status& status) {
  return IsRetryable(status) && status.code() != absl::StatusCode::kResourceExhausted;
}

namespace {

absl::Status FromGrpc(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

// One leg: a Generate call on one worker.
struct Leg {
  Worker* worker = nullptr;
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
  bool finished = false;

  void Start(const v1::GenerateRequest& request) {
    worker->AddInFlight(1);
    reader = worker->stub().Generate(&context, request);
  }
  // Reads what is left and collects the status (after a cancel this returns quickly).
  absl::Status Finish() {
    if (finished) return absl::OkStatus();
    v1::GenerateResponse ignored;
    while (reader->Read(&ignored)) {
    }
    finished = true;
    worker->AddInFlight(-1);
    return FromGrpc(reader->Finish());
  }
};

// One try on one worker choice. The main leg (decode or mixed) is read by the caller; a prefill
// leg is drained by a thread of its own that cancels the main leg if the prefill fails.
class Attempt {
 public:
  Attempt(FleetGenerator* fleet, FleetGenerator::Choice choice, v1::GenerateRequest request)
      : fleet_(fleet), choice_(choice) {
    const uint64_t room = fleet->NewRoom();
    request.set_request_id(absl::StrFormat("router-%016x", room));
    main_.worker = choice.main;
    if (choice.prefill != nullptr) {
      prefill_.worker = choice.prefill;
      v1::GenerateRequest prefill_request = request;
      auto* p = prefill_request.mutable_disaggregation();
      p->set_role(v1::ROLE_PREFILL);
      p->set_room(room);
      auto* d = request.mutable_disaggregation();
      d->set_role(v1::ROLE_DECODE);
      d->set_room(room);
      d->set_bootstrap_host(choice.prefill->address().host);
      d->set_bootstrap_port(choice.prefill->address().bootstrap_port);
      // Both legs at once: the decode leg reserves pages while the prefill runs the prompt.
      prefill_.Start(prefill_request);
      main_.Start(request);
      prefill_thread_ = std::thread([this] { DrainPrefill(); });
    } else {
      main_.Start(request);
    }
    fleet->metrics()->Selected(*choice.main);
    if (choice.prefill != nullptr) fleet->metrics()->Selected(*choice.prefill);
  }

  ~Attempt() {
    if (!done_) Cancel();
    (void)main_.Finish();
    if (prefill_thread_.joinable()) prefill_thread_.join();
  }

  void Cancel() {
    cancelled_.store(true);
    main_.context.TryCancel();
    if (choice_.prefill != nullptr) prefill_.context.TryCancel();
  }

  absl::Status Next(StreamEvent& event) {
    v1::GenerateResponse response;
    if (main_.reader->Read(&response)) {
      if (response.has_chunk()) {
        event.kind = StreamEvent::Kind::kChunk;
        event.chunk = std::move(*response.mutable_chunk());
        return absl::OkStatus();
      }
      if (response.has_complete()) {
        event.kind = StreamEvent::Kind::kEnd;
        event.complete = std::move(*response.mutable_complete());
        done_ = true;
        const absl::Status status = main_.Finish();
        Settle(main_.worker, status);
        if (prefill_thread_.joinable()) prefill_thread_.join();
        return absl::OkStatus();
      }
    }
    done_ = true;
    absl::Status status = main_.Finish();
    if (status.ok()) status = absl::InternalError("the engine stream ended without a complete message");
    if (cancelled_.load()) return absl::CancelledError("cancelled by the router");
    if (prefill_failed_.load()) {
      // The prefill leg failed first and cancelled this one: its error is the cause.
      if (prefill_thread_.joinable()) prefill_thread_.join();
      return prefill_status_;
    }
    // This leg failed on its own: it alone is blamed; the prefill leg we now cancel is not.
    main_failed_.store(true);
    Settle(main_.worker, status);
    if (choice_.prefill != nullptr) prefill_.context.TryCancel();
    if (prefill_thread_.joinable()) prefill_thread_.join();
    return absl::Status(status.code(), absl::StrCat(RoleName(main_.worker->address().role), " worker ",
                                                    main_.worker->name(), ": ", status.message()));
  }

 private:
  void DrainPrefill() {
    absl::Status status = prefill_.Finish();
    if (status.ok()) {
      Settle(prefill_.worker, status);
      return;
    }
    // Cancelled by us (client gone, stop string, or the decode leg failed first): not its fault.
    if (cancelled_.load() || main_failed_.load()) return;
    prefill_status_ = absl::Status(status.code(), absl::StrCat("prefill worker ", prefill_.worker->name(), ": ",
                                                               status.message()));
    prefill_failed_.store(true);
    main_.context.TryCancel();
    Settle(prefill_.worker, status);
  }

  void Settle(Worker* worker, const absl::Status& status) {
    if (status.ok()) {
      worker->breaker().RecordSuccess();
    } else if (CountsAsWorkerFailure(status) && !cancelled_.load()) {
      worker->breaker().RecordFailure();
      fleet_->metrics()->WorkerFailure(*worker);
    }
  }

  FleetGenerator* fleet_;
  FleetGenerator::Choice choice_;
  Leg main_;
  Leg prefill_;
  std::thread prefill_thread_;
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> prefill_failed_{false};
  std::atomic<bool> main_failed_{false};
  absl::Status prefill_status_;
  bool done_ = false;
};

class FleetStream final : public TokenStream {
 public:
  FleetStream(FleetGenerator* fleet, v1::GenerateRequest request) : fleet_(fleet), request_(std::move(request)) {}

  absl::Status Next(StreamEvent& event) override {
    while (true) {
      if (cancelled_.load()) return absl::CancelledError("cancelled");
      if (attempt_ == nullptr) {
        std::vector<int32_t> prompt(request_.input_ids().begin(), request_.input_ids().end());
        auto choice = fleet_->Choose(prompt, tried_);
        if (!choice.ok()) {
          if (!delivered_ && tries_ < fleet_->retry().max_retries && !tried_.empty()) {
            if (!Backoff()) return absl::CancelledError("cancelled");
            continue;
          }
          return last_error_.ok() ? choice.status() : last_error_;
        }
        ++tries_;
        tried_.push_back(choice->main);
        if (choice->prefill != nullptr) tried_.push_back(choice->prefill);
        std::lock_guard lock(mutex_);
        attempt_ = std::make_unique<Attempt>(fleet_, *choice, request_);
      }
      absl::Status status = attempt_->Next(event);
      if (status.ok()) {
        if (event.kind == StreamEvent::Kind::kChunk) delivered_ = true;
        return status;
      }
      if (cancelled_.load()) return absl::CancelledError("cancelled");
      last_error_ = status;
      {
        std::lock_guard lock(mutex_);
        attempt_.reset();
      }
      if (delivered_ || !IsRetryable(status)) return status;
      if (tries_ > fleet_->retry().max_retries) {
        fleet_->metrics()->RetriesExhausted();
        return status;
      }
      spdlog::warn("router: retrying on a fresh worker pair before the first byte: {}", std::string(status.message()));
      fleet_->metrics()->Retry();
      if (!Backoff()) return absl::CancelledError("cancelled");
    }
  }

  void Cancel() override {
    cancelled_.store(true);
    std::lock_guard lock(mutex_);
    if (attempt_ != nullptr) attempt_->Cancel();
  }

 private:
  // Sleeps the backoff of the current try in small steps; false if cancelled meanwhile.
  bool Backoff() {
    const auto& retry = fleet_->retry();
    double seconds = retry.initial_backoff_seconds;
    for (int i = 1; i < tries_; ++i) seconds *= retry.multiplier;
    seconds = std::min(seconds, retry.max_backoff_seconds) * fleet_->Jitter();
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
    while (std::chrono::steady_clock::now() < until) {
      if (cancelled_.load()) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return true;
  }

  FleetGenerator* fleet_;
  v1::GenerateRequest request_;
  std::mutex mutex_;
  std::unique_ptr<Attempt> attempt_;
  std::vector<Worker*> tried_;
  std::atomic<bool> cancelled_{false};
  bool delivered_ = false;
  int tries_ = 0;
  absl::Status last_error_;
};

// Usable workers of a role, preferring ones this request has not failed on yet.
std::vector<Worker*> Candidates(const std::vector<Worker*>& workers, const std::vector<Worker*>& tried) {
  std::vector<Worker*> fresh, all;
  for (Worker* w : workers) {
    if (!w->Usable()) continue;
    all.push_back(w);
    if (std::find(tried.begin(), tried.end(), w) == tried.end()) fresh.push_back(w);
  }
  return fresh.empty() ? all : fresh;
}

}  // namespace

FleetGenerator::FleetGenerator(WorkerRegistry* registry, std::unique_ptr<Policy> prefill_policy,
                               std::unique_ptr<Policy> decode_policy, std::unique_ptr<Policy> mixed_policy,
                               RouterMetrics* metrics, RetryOptions retry)
    : registry_(registry),
      prefill_policy_(std::move(prefill_policy)),
      decode_policy_(std::move(decode_policy)),
      mixed_policy_(std::move(mixed_policy)),
      metrics_(metrics),
      retry_(retry),
      random_(std::random_device{}()) {}

std::unique_ptr<TokenStream> FleetGenerator::Open(const v1::GenerateRequest& request) {
  return std::make_unique<FleetStream>(this, request);
}

uint64_t FleetGenerator::NewRoom() {
  std::lock_guard lock(random_mutex_);
  uint64_t room = 0;
  while (room == 0) room = random_();
  return room;
}

double FleetGenerator::Jitter() {
  std::lock_guard lock(random_mutex_);
  std::uniform_real_distribution<double> spread(1.0 - retry_.jitter, 1.0 + retry_.jitter);
  return spread(random_);
}

absl::StatusOr<FleetGenerator::Choice> FleetGenerator::Choose(const std::vector<int32_t>& prompt,
                                                              const std::vector<Worker*>& tried) {
  // A disaggregated pair when one is usable, else a mixed worker.
  for (int round = 0; round < 4; ++round) {
    const auto prefills = Candidates(registry_->Workers(WorkerRole::kPrefill), tried);
    const auto decodes = Candidates(registry_->Workers(WorkerRole::kDecode), tried);
    if (!prefills.empty() && !decodes.empty()) {
      Choice choice;
      choice.prefill = prefills[prefill_policy_->Select(prefills, prompt)];
      choice.main = decodes[decode_policy_->Select(decodes, prompt)];
      // Allow() takes a half-open breaker's single probe slot; losing that race means choose again.
      if (choice.prefill->breaker().Allow() && choice.main->breaker().Allow()) return choice;
      continue;
    }
    const auto mixed = Candidates(registry_->Workers(WorkerRole::kMixed), tried);
    if (!mixed.empty()) {
      Choice choice;
      choice.main = mixed[mixed_policy_->Select(mixed, prompt)];
      if (choice.main->breaker().Allow()) return choice;
      continue;
    }
    break;
  }
  return absl::UnavailableError("no healthy workers: need a prefill+decode pair or a mixed worker");
}

}  // namespace tandem::router
