#include "services/router/discovery_k8s.h"

#include <algorithm>
#include <chrono>

#include <spdlog/spdlog.h>

#include "absl/strings/numbers.h"

namespace tandem::router {

namespace {

using json = nlohmann::json;

const json* Member(const json& object, const char* key) {
  if (!object.is_object()) return nullptr;
  auto it = object.find(key);
  return it == object.end() || it->is_null() ? nullptr : &*it;
}

std::string StringMember(const json& object, const char* key) {
  const json* value = Member(object, key);
  return value != nullptr && value->is_string() ? value->get<std::string>() : std::string();
}

// A port from an annotation: absent → 0 (use the next source); present but bad → error.
absl::StatusOr<int> AnnotationPort(const json* annotations, const char* key) {
  if (annotations == nullptr) return 0;
  const json* value = Member(*annotations, key);
  if (value == nullptr) return 0;
  int port = 0;
  if (!value->is_string() || !absl::SimpleAtoi(value->get<std::string>(), &port) || port <= 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("annotation ", key, "=", value->dump(), " is not a port (1-65535)"));
  }
  return port;
}

// The containerPort of the first container port called `name`: 0 when there is none.
absl::StatusOr<int> NamedContainerPort(const json& pod, const char* name) {
  const json* spec = Member(pod, "spec");
  const json* containers = spec != nullptr ? Member(*spec, "containers") : nullptr;
  if (containers == nullptr || !containers->is_array()) return 0;
  for (const json& container : *containers) {
    const json* ports = Member(container, "ports");
    if (ports == nullptr || !ports->is_array()) continue;
    for (const json& port : *ports) {
      if (StringMember(port, "name") != name) continue;
      const json* number = Member(port, "containerPort");
      if (number == nullptr || !number->is_number_integer() || number->get<int64_t>() <= 0 || number->get<int64_t>() > 65535) {
        return absl::InvalidArgumentError(absl::StrCat("container port \"", name, "\" has no valid containerPort"));
      }
      return static_cast<int>(number->get<int64_t>());
    }
  }
  return 0;
}

absl::StatusOr<int> PodPort(const json& pod, const json* annotations, const char* annotation, const char* port_name, int fallback) {
  TANDEM_ASSIGN_OR_RETURN(int port, AnnotationPort(annotations, annotation));
  if (port != 0) return port;
  TANDEM_ASSIGN_OR_RETURN(port, NamedContainerPort(pod, port_name));
  return port != 0 ? port : fallback;
}

bool IsReady(const json& status) {
  const json* conditions = Member(status, "conditions");
  if (conditions == nullptr || !conditions->is_array()) return false;
  for (const json& condition : *conditions) {
    if (StringMember(condition, "type") == "Ready") return StringMember(condition, "status") == "True";
  }
  return false;
}

std::string Where(WorkerRole role, const std::string& labels) { return absl::StrCat(RoleName(role), " pods (", labels, ")"); }

std::string ResourceVersion(const json& object) {
  const json* metadata = Member(object, "metadata");
  return metadata != nullptr ? StringMember(*metadata, "resourceVersion") : std::string();
}

}  // namespace

PodWorker ParsePod(const json& pod, WorkerRole role) {
  PodWorker out;
  out.kind = PodWorker::Kind::kInvalid;
  const json* metadata = Member(pod, "metadata");
  const std::string name = metadata != nullptr ? StringMember(*metadata, "name") : std::string();
  if (name.empty()) {
    out.reason = "no metadata.name";
    return out;
  }
  const std::string space = StringMember(*metadata, "namespace");
  out.name = space.empty() ? name : absl::StrCat(space, "/", name);

  out.kind = PodWorker::Kind::kNotReady;
  if (Member(*metadata, "deletionTimestamp") != nullptr) {
    out.reason = "terminating";
    return out;
  }
  const json* status = Member(pod, "status");
  const std::string phase = status != nullptr ? StringMember(*status, "phase") : std::string();
  if (phase != "Running") {
    out.reason = phase.empty() ? "no status.phase yet" : absl::StrCat("phase ", phase);
    return out;
  }
  if (!IsReady(*status)) {
    out.reason = "not Ready";
    return out;
  }

  out.kind = PodWorker::Kind::kInvalid;
  const std::string ip = StringMember(*status, "podIP");
  if (ip.empty()) {
    out.reason = "Running and Ready but status.podIP is missing";
    return out;
  }
  const json* annotations = Member(*metadata, "annotations");
  if (annotations != nullptr && !annotations->is_object()) annotations = nullptr;
  const int default_grpc = role == WorkerRole::kPrefill ? kDefaultPrefillGrpcPort : kDefaultDecodeGrpcPort;
  auto grpc_port = PodPort(pod, annotations, kGrpcPortAnnotation, "grpc", default_grpc);
  if (!grpc_port.ok()) {
    out.reason = std::string(grpc_port.status().message());
    return out;
  }
  out.address.role = role;
  // gRPC target syntax wants IPv6 literals in brackets.
  out.address.host = ip.find(':') != std::string::npos ? absl::StrCat("[", ip, "]") : ip;
  out.address.port = *grpc_port;
  if (role == WorkerRole::kPrefill) {
    auto bootstrap = PodPort(pod, annotations, kBootstrapPortAnnotation, "bootstrap", kDefaultBootstrapPort);
    if (!bootstrap.ok()) {
      out.reason = std::string(bootstrap.status().message());
      return out;
    }
    out.address.bootstrap_port = *bootstrap;
  }
  out.kind = PodWorker::Kind::kWorker;
  return out;
}

// --- K8sDiscovery ------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<K8sDiscovery>> K8sDiscovery::Create(K8sDiscoveryOptions options, Publish publish) {
  if (options.prefill_selector.empty() && options.decode_selector.empty() && options.mixed_selector.empty()) {
    return absl::InvalidArgumentError("--discovery k8s needs --prefill-selector and --decode-selector, or --mixed-selector");
  }
  if (options.prefill_selector.empty() != options.decode_selector.empty()) {
    spdlog::warn("router: k8s: only one of --prefill-selector/--decode-selector given; prefill workers need decode workers");
  }
  if (options.watch_timeout_seconds <= 0) return absl::InvalidArgumentError("--k8s-watch-timeout must be positive");
  TANDEM_ASSIGN_OR_RETURN(auto api, K8sApi::Create(options.api));
  return std::unique_ptr<K8sDiscovery>(new K8sDiscovery(std::move(options), std::move(api), std::move(publish)));
}

K8sDiscovery::K8sDiscovery(K8sDiscoveryOptions options, std::unique_ptr<K8sApi> api, Publish publish)
    : options_(std::move(options)), api_(std::move(api)), publish_(std::move(publish)) {
  for (const auto& [role, labels] : {std::pair{WorkerRole::kPrefill, &options_.prefill_selector},
                                     std::pair{WorkerRole::kDecode, &options_.decode_selector},
                                     std::pair{WorkerRole::kMixed, &options_.mixed_selector}}) {
    if (labels->empty()) continue;
    auto selector = std::make_unique<Selector>();
    selector->role = role;
    selector->labels = *labels;
    selectors_.push_back(std::move(selector));
  }
}

K8sDiscovery::~K8sDiscovery() { Stop(); }

std::string K8sDiscovery::Describe() const {
  std::string out = absl::StrCat("pods in namespace ", api_->namespace_name(), " at ", api_->server());
  for (const auto& selector : selectors_) absl::StrAppend(&out, "; ", RoleName(selector->role), " '", selector->labels, "'");
  return out;
}

void K8sDiscovery::Start() {
  std::lock_guard lock(mutex_);
  for (auto& selector : selectors_) {
    ++running_;
    threads_.emplace_back([this, s = selector.get()] {
      Run(*s);
      std::lock_guard done(mutex_);
      --running_;
      wake_.notify_all();
    });
  }
}

void K8sDiscovery::Stop() {
  std::unique_lock lock(mutex_);
  stopping_ = true;
  wake_.notify_all();
  // Shutdown breaks requests in flight; one that was just starting is caught by the next round.
  while (running_ > 0) {
    api_->Shutdown();
    wake_.wait_for(lock, std::chrono::milliseconds(100), [this] { return running_ == 0; });
  }
  lock.unlock();
  for (auto& thread : threads_) {
    if (thread.joinable()) thread.join();
  }
  threads_.clear();
}

bool K8sDiscovery::Pause(double seconds) {
  std::unique_lock lock(mutex_);
  wake_.wait_for(lock, std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)), [this] { return stopping_; });
  return !stopping_;
}

std::string K8sDiscovery::PodsPath(const Selector& selector) const {
  return absl::StrCat("/api/v1/namespaces/", UrlEncode(api_->namespace_name()), "/pods?labelSelector=", UrlEncode(selector.labels));
}

namespace {

// A non-200 answer as an error a user can act on; 410 Gone is kOutOfRange (re-list).
absl::Status ApiError(const K8sResponse& response, const std::string& what, const K8sApiOptions& options,
                      const std::string& namespace_name) {
  std::string message;
  json status = json::parse(response.body, nullptr, false);
  if (!status.is_discarded()) message = StringMember(status, "message");
  if (message.empty()) message = response.body.substr(0, 200);
  switch (response.status) {
    case 401:
      return absl::UnauthenticatedError(absl::StrCat(what, ": 401 Unauthorized: the API server refused the service-account token from ",
                                                     options.token_file, " (", message, ")"));
    case 403:
      return absl::PermissionDeniedError(absl::StrCat(what, ": 403 Forbidden: the router's service account may not list/watch pods in namespace ",
                                                      namespace_name, " (it needs a Role with pods: get, list, watch): ", message));
    case 410: return absl::OutOfRangeError(absl::StrCat(what, ": 410 Gone: ", message));
    default: return absl::UnavailableError(absl::StrCat(what, ": HTTP ", response.status, ": ", message));
  }
}

}  // namespace

void K8sDiscovery::Run(Selector& selector) {
  const std::string where = Where(selector.role, selector.labels);
  double backoff = options_.initial_backoff_seconds;
  bool need_list = true;
  auto next_backoff = [&] {
    const double wait = backoff;
    backoff = std::min(backoff * 2, options_.max_backoff_seconds);
    return wait;
  };
  while (Pause(0)) {
    if (need_list) {
      absl::Status status = List(selector);
      if (!status.ok()) {
        if (!Pause(0)) break;
        const double wait = next_backoff();
        spdlog::error("router: k8s: listing {} failed: {}; retrying in {:.1f} s", where, std::string(status.message()), wait);
        Pause(wait);
        continue;
      }
      need_list = false;
      backoff = options_.initial_backoff_seconds;
    }
    selector.streamed = false;
    const auto started = std::chrono::steady_clock::now();
    absl::Status status = Watch(selector);
    if (!Pause(0)) break;
    // A watch that delivered something was a working connection: the next failure starts the backoff over.
    if (selector.streamed) backoff = options_.initial_backoff_seconds;
    if (status.ok()) {
      // The server ended the watch (timeoutSeconds): watch on from the same version, but never spin on
      // a server that ends every watch at once.
      if (std::chrono::steady_clock::now() - started < std::chrono::seconds(1)) Pause(options_.initial_backoff_seconds);
      continue;
    }
    if (absl::IsOutOfRange(status)) {
      spdlog::info("router: k8s: watch of {}: {}; re-listing", where, std::string(status.message()));
      need_list = true;
      continue;
    }
    const double wait = next_backoff();
    spdlog::warn("router: k8s: watch of {}: {}; reconnecting in {:.1f} s", where, std::string(status.message()), wait);
    Pause(wait);
  }
}

absl::Status K8sDiscovery::List(Selector& selector) {
  const std::string what = absl::StrCat("LIST ", Where(selector.role, selector.labels), " in ", api_->namespace_name());
  TANDEM_ASSIGN_OR_RETURN(K8sResponse response, api_->Get(PodsPath(selector)));
  if (response.status != 200) return ApiError(response, what, options_.api, api_->namespace_name());
  json list = json::parse(response.body, nullptr, false);
  const json* items = Member(list, "items");
  if (list.is_discarded() || (items != nullptr && !items->is_array())) {
    return absl::DataLossError(absl::StrCat(what, ": the answer is not a PodList"));
  }
  std::map<std::string, PodWorker> seen;
  int invalid = 0;
  if (items != nullptr) {
    for (const json& item : *items) {
      PodWorker pod = ParsePod(item, selector.role);
      if (pod.name.empty()) {
        ++invalid;
        continue;
      }
      seen[pod.name] = std::move(pod);
    }
  }
  std::lock_guard lock(mutex_);
  std::vector<std::string> gone;
  for (const auto& [name, pod] : selector.pods) {
    if (!seen.contains(name)) gone.push_back(name);
  }
  for (const auto& name : gone) Remove(selector, name, "gone (not in the new list)");
  int workers = 0;
  for (auto& [name, pod] : seen) {
    workers += pod.kind == PodWorker::Kind::kWorker;
    Update(selector, std::move(pod));
  }
  selector.resource_version = ResourceVersion(list);
  spdlog::info("router: k8s: listed {}: {} pods, {} workers{} (resourceVersion {})", Where(selector.role, selector.labels),
               seen.size() + invalid, workers, invalid ? absl::StrCat(", ", invalid, " without a name skipped") : "",
               selector.resource_version);
  PublishAll();
  return absl::OkStatus();
}

absl::Status K8sDiscovery::Watch(Selector& selector) {
  const std::string what = absl::StrCat("WATCH ", Where(selector.role, selector.labels));
  const std::string path = absl::StrCat(PodsPath(selector), "&watch=1&allowWatchBookmarks=true&resourceVersion=",
                                        UrlEncode(selector.resource_version), "&timeoutSeconds=", options_.watch_timeout_seconds);
  constexpr size_t kMaxEventBytes = 16 << 20;
  std::string buffer;
  absl::Status event_status;
  auto response = api_->Stream(path, options_.watch_timeout_seconds, [&](const char* data, size_t size) {
    selector.streamed = true;
    buffer.append(data, size);
    size_t start = 0;
    for (size_t end; (end = buffer.find('\n', start)) != std::string::npos; start = end + 1) {
      event_status = ApplyEvent(selector, buffer.substr(start, end - start));
      if (!event_status.ok()) return false;
    }
    buffer.erase(0, start);
    if (buffer.size() > kMaxEventBytes) {
      event_status = absl::OutOfRangeError(absl::StrCat(what, ": an event is larger than 16 MiB"));
      return false;
    }
    return true;
  });
  if (!event_status.ok()) return event_status;
  if (!response.ok()) return response.status();
  if (response->status != 200) return ApiError(*response, what, options_.api, api_->namespace_name());
  if (!buffer.empty()) return ApplyEvent(selector, buffer);
  return absl::OkStatus();
}

absl::Status K8sDiscovery::ApplyEvent(Selector& selector, const std::string& line) {
  if (line.find_first_not_of(" \t\r") == std::string::npos) return absl::OkStatus();
  json event = json::parse(line, nullptr, false);
  const std::string type = StringMember(event, "type");
  const json* object = Member(event, "object");
  if (event.is_discarded() || type.empty() || object == nullptr || !object->is_object()) {
    // A lost event would leave the set stale: start over from a fresh list.
    return absl::OutOfRangeError(absl::StrCat("malformed watch event \"", line.substr(0, 120), "\""));
  }
  if (type == "ERROR") {
    const json* code = Member(*object, "code");
    const std::string message = StringMember(*object, "message");
    if (code != nullptr && code->is_number_integer() && code->get<int64_t>() == 410) {
      return absl::OutOfRangeError(absl::StrCat("410 Gone (", message, ")"));
    }
    return absl::UnavailableError(absl::StrCat("error event ", code != nullptr ? code->dump() : "", ": ", message));
  }
  const std::string version = ResourceVersion(*object);
  if (type == "BOOKMARK") {
    if (!version.empty()) selector.resource_version = version;
    return absl::OkStatus();
  }
  if (type != "ADDED" && type != "MODIFIED" && type != "DELETED") {
    spdlog::warn("router: k8s: watch of {}: ignoring event type {}", Where(selector.role, selector.labels), type);
    return absl::OkStatus();
  }
  PodWorker pod = ParsePod(*object, selector.role);
  std::lock_guard lock(mutex_);
  if (!version.empty()) selector.resource_version = version;
  if (pod.name.empty()) {
    spdlog::warn("router: k8s: {} event for {} skipped: {}", type, Where(selector.role, selector.labels), pod.reason);
    return absl::OkStatus();
  }
  const bool changed = type == "DELETED" ? Remove(selector, pod.name, "deleted") : Update(selector, std::move(pod));
  if (changed) PublishAll();
  return absl::OkStatus();
}

bool K8sDiscovery::Update(Selector& selector, PodWorker next) {
  const char* role = RoleName(selector.role);
  auto it = selector.pods.find(next.name);
  const PodWorker* previous = it == selector.pods.end() ? nullptr : &it->second;
  const bool was_worker = previous != nullptr && previous->kind == PodWorker::Kind::kWorker;
  const bool same = previous != nullptr && previous->kind == next.kind && previous->reason == next.reason &&
                    previous->address.name() == next.address.name() && previous->address.bootstrap_port == next.address.bootstrap_port;
  if (!same) {
    switch (next.kind) {
      case PodWorker::Kind::kWorker:
        if (selector.role == WorkerRole::kPrefill) {
          spdlog::info("router: k8s: pod {} ({}) is a worker at {} (bootstrap port {})", next.name, role, next.address.name(),
                       next.address.bootstrap_port);
        } else {
          spdlog::info("router: k8s: pod {} ({}) is a worker at {}", next.name, role, next.address.name());
        }
        break;
      case PodWorker::Kind::kNotReady:
        if (was_worker) spdlog::info("router: k8s: pod {} ({}) dropped: {}", next.name, role, next.reason);
        else spdlog::info("router: k8s: pod {} ({}) not a worker yet: {}", next.name, role, next.reason);
        break;
      case PodWorker::Kind::kInvalid:
        spdlog::warn("router: k8s: pod {} ({}) skipped: {}", next.name, role, next.reason);
        break;
    }
  }
  const bool is_worker = next.kind == PodWorker::Kind::kWorker;
  selector.pods[next.name] = std::move(next);
  return !same && (was_worker || is_worker);
}

bool K8sDiscovery::Remove(Selector& selector, const std::string& name, const char* why) {
  auto it = selector.pods.find(name);
  if (it == selector.pods.end()) return false;
  const bool was_worker = it->second.kind == PodWorker::Kind::kWorker;
  if (was_worker) spdlog::info("router: k8s: pod {} ({}) dropped: {}", name, RoleName(selector.role), why);
  selector.pods.erase(it);
  return was_worker;
}

void K8sDiscovery::PublishAll() {
  std::vector<WorkerAddress> workers;
  std::vector<std::string> keys;
  for (const auto& selector : selectors_) {
    for (const auto& [name, pod] : selector->pods) {
      if (pod.kind != PodWorker::Kind::kWorker) continue;
      workers.push_back(pod.address);
      keys.push_back(absl::StrCat(RoleName(pod.address.role), " ", pod.address.name(), ",", pod.address.bootstrap_port));
    }
  }
  if (keys == published_) return;
  published_ = std::move(keys);
  publish_(workers);
}

}  // namespace tandem::router
