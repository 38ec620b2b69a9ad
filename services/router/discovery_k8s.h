// Router workers from Kubernetes pods (--discovery k8s): one LIST + WATCH of pods per label selector
// (prefill, decode, mixed), each Running, Ready, not-terminating pod with an IP becoming a worker.
#pragma once

#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/core/status.h"
#include "services/router/k8s_api.h"
#include "services/router/worker.h"

namespace tandem::router {

// Pod annotations that override what the container ports say.
inline constexpr char kGrpcPortAnnotation[] = "tandem.ai/grpc-port";
inline constexpr char kBootstrapPortAnnotation[] = "tandem.ai/bootstrap-port";
// Without an annotation or a container port of that name: the engines' default ports.
inline constexpr int kDefaultPrefillGrpcPort = 30001;
inline constexpr int kDefaultDecodeGrpcPort = 30002;
inline constexpr int kDefaultBootstrapPort = 8998;

// What one pod object means for the router.
struct PodWorker {
  enum class Kind { kWorker, kNotReady, kInvalid };
  std::string name;  // namespace/name
  Kind kind = Kind::kInvalid;
  std::string reason;  // why it is not a worker
  WorkerAddress address;
};

// gRPC port: annotation tandem.ai/grpc-port, else the container port named "grpc", else the role's
// engine default. Bootstrap port (prefill): annotation tandem.ai/bootstrap-port, else the container
// port named "bootstrap", else 8998. Never throws on any JSON.
PodWorker ParsePod(const nlohmann::json& pod, WorkerRole role);

struct K8sDiscoveryOptions {
  K8sApiOptions api;
  std::string prefill_selector, decode_selector, mixed_selector;
  int watch_timeout_seconds = 300;  // the server ends each watch after this; we re-watch at once
  double initial_backoff_seconds = 0.5;
  double max_backoff_seconds = 30.0;
};

class K8sDiscovery {
 public:
  // Called with every discovered worker whenever the set changes (from the watch threads).
  using Publish = std::function<void(const std::vector<WorkerAddress>&)>;
  static absl::StatusOr<std::unique_ptr<K8sDiscovery>> Create(K8sDiscoveryOptions options, Publish publish);
  ~K8sDiscovery();

  void Start();
  void Stop();
  std::string Describe() const;  // for the startup log line

 private:
  struct Selector {
    WorkerRole role;
    std::string labels;
    std::map<std::string, PodWorker> pods;  // by namespace/name: the last state seen
    std::string resource_version;
    bool streamed = false;  // the current watch has delivered data
  };
  K8sDiscovery(K8sDiscoveryOptions options, std::unique_ptr<K8sApi> api, Publish publish);

  void Run(Selector& selector);
  absl::Status List(Selector& selector);
  // Returns OK when the server ended the watch normally; kOutOfRange when the resource version
  // expired (410 Gone: re-list); another error when the watch failed or dropped.
  absl::Status Watch(Selector& selector);
  absl::Status ApplyEvent(Selector& selector, const std::string& line);
  // Records a pod's new state, logging a change; returns whether the worker set may have changed.
  bool Update(Selector& selector, PodWorker next);
  bool Remove(Selector& selector, const std::string& name, const char* why);
  void PublishAll();
  // Waits up to `seconds` unless stopping; false when stopping.
  bool Pause(double seconds);
  std::string PodsPath(const Selector& selector) const;

  K8sDiscoveryOptions options_;
  std::unique_ptr<K8sApi> api_;
  Publish publish_;
  std::vector<std::unique_ptr<Selector>> selectors_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;  // selectors' pod maps (for PublishAll), published_, stopping_
  std::condition_variable wake_;
  bool stopping_ = false;
  int running_ = 0;
  std::vector<std::string> published_;
};

}  // namespace tandem::router
