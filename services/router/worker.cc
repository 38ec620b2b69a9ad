#include "services/router/worker.h"

#include <algorithm>
#include <fstream>
#include <future>
#include <sstream>

#include <grpcpp/generic/generic_stub.h>
#include <spdlog/spdlog.h>

#include "absl/strings/numbers.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"

namespace tandem::router {

const char* RoleName(WorkerRole role) {
  switch (role) {
    case WorkerRole::kPrefill: return "prefill";
    case WorkerRole::kDecode: return "decode";
    case WorkerRole::kMixed: return "mixed";
  }
  return "unknown";
}

absl::StatusOr<WorkerAddress> ParseWorkerAddress(WorkerRole role, const std::string& text) {
  WorkerAddress address;
  address.role = role;
  std::vector<std::string> parts = absl::StrSplit(text, ',');
  if (parts.size() > (role == WorkerRole::kPrefill ? 2u : 1u)) {
    return absl::InvalidArgumentError(absl::StrCat("worker \"", text, "\": expected host:port",
                                                   role == WorkerRole::kPrefill ? "[,bootstrap_port]" : ""));
  }
  const size_t colon = parts[0].rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat("worker \"", text, "\": expected host:port"));
  }
  address.host = parts[0].substr(0, colon);
  if (!absl::SimpleAtoi(parts[0].substr(colon + 1), &address.port) || address.port <= 0 || address.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("worker \"", text, "\": bad port"));
  }
  if (role == WorkerRole::kPrefill) {
    address.bootstrap_port = 8998;
    if (parts.size() == 2 && (!absl::SimpleAtoi(parts[1], &address.bootstrap_port) || address.bootstrap_port <= 0 ||
                              address.bootstrap_port > 65535)) {
      return absl::InvalidArgumentError(absl::StrCat("worker \"", text, "\": bad bootstrap port"));
    }
  }
  return address;
}

// --- CircuitBreaker ---------------------------------------------------------------------------

void CircuitBreaker::Move(State next) {
  if (state_ != next) transitions_.fetch_add(1);
  state_ = next;
  if (next == State::kOpen) {
    open_until_ = std::chrono::steady_clock::now() +
                  std::chrono::milliseconds(static_cast<int64_t>(options_.open_seconds * 1000));
  }
  probe_in_flight_ = false;
  half_open_successes_ = 0;
}

bool CircuitBreaker::Allow() {
  std::lock_guard lock(mutex_);
  if (state_ == State::kClosed) return true;
  if (state_ == State::kOpen) {
    if (std::chrono::steady_clock::now() < open_until_) return false;
    Move(State::kHalfOpen);
  }
  if (probe_in_flight_) return false;
  probe_in_flight_ = true;
  return true;
}

bool CircuitBreaker::WouldAllow() const {
  std::lock_guard lock(mutex_);
  if (state_ == State::kClosed) return true;
  if (state_ == State::kOpen) return std::chrono::steady_clock::now() >= open_until_;
  return !probe_in_flight_;
}

void CircuitBreaker::RecordSuccess() {
  std::lock_guard lock(mutex_);
  consecutive_failures_ = 0;
  if (state_ == State::kHalfOpen) {
    probe_in_flight_ = false;
    if (++half_open_successes_ >= options_.success_threshold) Move(State::kClosed);
  }
}

void CircuitBreaker::RecordFailure() {
  std::lock_guard lock(mutex_);
  ++consecutive_failures_;
  if (state_ == State::kHalfOpen || (state_ == State::kClosed && consecutive_failures_ >= options_.failure_threshold)) {
    Move(State::kOpen);
  }
}

CircuitBreaker::State CircuitBreaker::state() const {
  std::lock_guard lock(mutex_);
  return state_;
}

// --- Worker -----------------------------------------------------------------------------------

Worker::Worker(WorkerAddress address, BreakerOptions breaker)
    : address_(std::move(address)), name_(address_.name()), breaker_(breaker) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Reconnect quickly after a worker restarts, so it rejoins within a few health intervals.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  channel_ = grpc::CreateCustomChannel(name_, grpc::InsecureChannelCredentials(), args);
  stub_ = v1::Engine::NewStub(channel_);
}

std::string Worker::config_hash() const {
  std::lock_guard lock(info_mutex_);
  return config_hash_;
}

namespace {

// grpc.health.v1.Health/Check with an empty service name, without generated health stubs: the
// request is the empty message and the response's field 1 (varint) is the serving status.
bool HealthCheckServing(const std::shared_ptr<grpc::Channel>& channel, double timeout_seconds) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
  grpc::Slice empty_message(std::string{});
  grpc::ByteBuffer request(&empty_message, 1);  // a default ByteBuffer is not a valid message
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status status) { done.set_value(std::move(status)); });
  const grpc::Status status = done.get_future().get();
  if (!status.ok()) return false;
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return false;
  std::string bytes;
  for (const auto& slice : slices) bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return bytes.size() >= 2 && bytes[0] == 0x08 && bytes[1] == 0x01;  // status = SERVING
}

}  // namespace

void Worker::CheckHealth(const HealthOptions& options) {
  bool ok = HealthCheckServing(channel_, options.timeout_seconds);
  if (ok) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(static_cast<int64_t>(options.timeout_seconds * 1000)));
    v1::GetLoadsResponse loads;
    if (stub_->GetLoads(&context, v1::GetLoadsRequest(), &loads).ok()) {
      engine_load_.store(loads.running_requests() + loads.waiting_requests());
    }
    if (max_context_tokens_.load() == 0) {
      grpc::ClientContext info_context;
      info_context.set_deadline(context.deadline());
      v1::GetModelInfoResponse info;
      if (stub_->GetModelInfo(&info_context, v1::GetModelInfoRequest(), &info).ok()) {
        max_new_tokens_limit_.store(info.max_new_tokens_limit());
        max_context_tokens_.store(info.max_context_tokens());
        std::lock_guard lock(info_mutex_);
        config_hash_ = info.config_hash();
      }
    }
  }
  if (ok) {
    failures_ = 0;
    ++passes_;
    // The first pass after start makes a worker healthy at once; later recoveries need the threshold.
    if (!healthy_.load() && (!ever_healthy_ || passes_ >= options.success_threshold)) {
      healthy_.store(true);
      ever_healthy_ = true;
      spdlog::info("router: worker {} ({}) is healthy", name_, RoleName(address_.role));
    }
  } else {
    passes_ = 0;
    ++failures_;
    if (healthy_.load() && failures_ >= options.failure_threshold) {
      healthy_.store(false);
      spdlog::warn("router: worker {} ({}) is unhealthy", name_, RoleName(address_.role));
    }
  }
}

// --- WorkerRegistry ---------------------------------------------------------------------------

absl::StatusOr<std::vector<WorkerAddress>> ParseWorkerFile(const std::string& text) {
  std::vector<WorkerAddress> out;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> fields = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 2) return absl::InvalidArgumentError(absl::StrCat("worker file line ", line_number, ": expected \"ROLE ADDRESS\""));
    WorkerRole role;
    if (fields[0] == "prefill") role = WorkerRole::kPrefill;
    else if (fields[0] == "decode") role = WorkerRole::kDecode;
    else if (fields[0] == "mixed") role = WorkerRole::kMixed;
    else return absl::InvalidArgumentError(absl::StrCat("worker file line ", line_number, ": role must be prefill, decode or mixed"));
    auto address = ParseWorkerAddress(role, fields[1]);
    if (!address.ok()) return absl::InvalidArgumentError(absl::StrCat("worker file line ", line_number, ": ", address.status().message()));
    out.push_back(std::move(*address));
  }
  return out;
}

WorkerRegistry::WorkerRegistry(std::vector<WorkerAddress> addresses, BreakerOptions breaker, HealthOptions health)
    : breaker_(breaker), health_(health) {
  for (auto& address : addresses) workers_.push_back(std::make_unique<Worker>(std::move(address), breaker));
}

void WorkerRegistry::WatchWorkerFile(std::string path, std::vector<WorkerAddress> fixed) {
  worker_file_ = std::move(path);
  fixed_ = std::move(fixed);
  MaybeReloadFile();
}

void WorkerRegistry::MaybeReloadFile() {
  if (worker_file_.empty()) return;
  std::error_code error;
  const auto time = std::filesystem::last_write_time(worker_file_, error);
  if (error || time == worker_file_time_) return;
  worker_file_time_ = time;
  std::ifstream file(worker_file_);
  std::stringstream text;
  text << file.rdbuf();
  auto parsed = ParseWorkerFile(text.str());
  if (!parsed.ok()) {
    spdlog::error("router: worker file {} not applied: {}", worker_file_, std::string(parsed.status().message()));
    return;
  }
  std::vector<WorkerAddress> all = fixed_;
  all.insert(all.end(), parsed->begin(), parsed->end());
  Reload(all);
}

void WorkerRegistry::Reload(const std::vector<WorkerAddress>& addresses) {
  std::lock_guard lock(workers_mutex_);
  std::vector<std::unique_ptr<Worker>> next;
  for (const auto& address : addresses) {
    auto same = std::find_if(workers_.begin(), workers_.end(), [&](const std::unique_ptr<Worker>& w) {
      return w != nullptr && w->name() == address.name() && w->address().role == address.role &&
             w->address().bootstrap_port == address.bootstrap_port;
    });
    if (same != workers_.end()) {
      next.push_back(std::move(*same));
    } else if (std::none_of(next.begin(), next.end(), [&](const auto& w) { return w->name() == address.name() && w->address().role == address.role; })) {
      spdlog::info("router: worker {} ({}) added", address.name(), RoleName(address.role));
      next.push_back(std::make_unique<Worker>(address, breaker_));
    }
  }
  for (auto& old : workers_) {
    if (old == nullptr) continue;
    spdlog::info("router: worker {} ({}) removed", old->name(), RoleName(old->address().role));
    retired_.push_back(std::move(old));
  }
  workers_ = std::move(next);
}

std::vector<Worker*> WorkerRegistry::all() const {
  std::lock_guard lock(workers_mutex_);
  std::vector<Worker*> out;
  for (const auto& worker : workers_) out.push_back(worker.get());
  return out;
}

WorkerRegistry::~WorkerRegistry() { Stop(); }

void WorkerRegistry::CheckAllNow() {
  MaybeReloadFile();
  // Checks run side by side so one dead worker's timeout does not delay the others.
  std::vector<std::thread> checks;
  for (Worker* worker : all()) checks.emplace_back([this, worker] { worker->CheckHealth(health_); });
  for (auto& check : checks) check.join();
}

void WorkerRegistry::StartHealthChecks() {
  thread_ = std::thread([this] {
    std::unique_lock lock(mutex_);
    while (!stopping_) {
      check_soon_ = false;
      lock.unlock();
      CheckAllNow();
      lock.lock();
      wake_.wait_for(lock, std::chrono::milliseconds(static_cast<int64_t>(health_.interval_seconds * 1000)),
                     [this] { return stopping_ || check_soon_; });
    }
  });
}

void WorkerRegistry::CheckSoon() {
  {
    std::lock_guard lock(mutex_);
    check_soon_ = true;
  }
  wake_.notify_all();
}

void WorkerRegistry::Stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::vector<Worker*> WorkerRegistry::Workers(WorkerRole role) const {
  std::vector<Worker*> out;
  for (Worker* worker : all()) {
    if (worker->address().role == role) out.push_back(worker);
  }
  return out;
}

bool WorkerRegistry::Ready() const {
  bool prefill = false, decode = false;
  for (Worker* worker : all()) {
    if (!worker->Usable()) continue;
    switch (worker->address().role) {
      case WorkerRole::kMixed: return true;
      case WorkerRole::kPrefill: prefill = true; break;
      case WorkerRole::kDecode: decode = true; break;
    }
  }
  return prefill && decode;
}

int64_t WorkerRegistry::MaxContextTokens() const {
  int64_t smallest = 0;
  for (Worker* worker : all()) {
    const int64_t context = worker->max_context_tokens();
    if (worker->healthy() && context > 0 && (smallest == 0 || context < smallest)) smallest = context;
  }
  return smallest;
}

int64_t WorkerRegistry::MaxNewTokensLimit() const {
  int64_t smallest = 0;
  for (Worker* worker : all()) {
    const int64_t limit = worker->max_new_tokens_limit();
    if (worker->healthy() && limit > 0 && (smallest == 0 || limit < smallest)) smallest = limit;
  }
  return smallest;
}

}  // namespace tandem::router
