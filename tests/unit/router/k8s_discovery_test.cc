// Pod objects → router workers (services/router/discovery_k8s.h): readiness, ports from annotations,
// named container ports and defaults, and malformed objects that must be skipped, never thrown on.
#include <gtest/gtest.h>

#include "services/router/discovery_k8s.h"
#include "services/router/k8s_api.h"

namespace tandem::router {
namespace {

using json = nlohmann::json;
using Kind = PodWorker::Kind;

json Pod() {
  return json::parse(R"({
    "metadata": {"name": "tandem-prefill-0", "namespace": "tandem",
                 "annotations": {"tandem.ai/bootstrap-port": "9000"}},
    "spec": {"containers": [{"name": "prefill", "ports": [{"name": "metrics", "containerPort": 31001},
                                                           {"name": "grpc", "containerPort": 30011}]}]},
    "status": {"phase": "Running", "podIP": "10.1.2.3",
               "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}
  })");
}

TEST(ParsePod, ReadyRunningPodIsAWorkerWithItsPorts) {
  PodWorker pod = ParsePod(Pod(), WorkerRole::kPrefill);
  ASSERT_EQ(pod.kind, Kind::kWorker) << pod.reason;
  EXPECT_EQ(pod.name, "tandem/tandem-prefill-0");
  EXPECT_EQ(pod.address.role, WorkerRole::kPrefill);
  EXPECT_EQ(pod.address.name(), "10.1.2.3:30011");
  EXPECT_EQ(pod.address.bootstrap_port, 9000);
}

TEST(ParsePod, DefaultsWithoutAnnotationsOrNamedPorts) {
  json pod = Pod();
  pod["metadata"].erase("annotations");
  pod["spec"]["containers"][0]["ports"] = json::array();
  PodWorker prefill = ParsePod(pod, WorkerRole::kPrefill);
  ASSERT_EQ(prefill.kind, Kind::kWorker) << prefill.reason;
  EXPECT_EQ(prefill.address.port, kDefaultPrefillGrpcPort);
  EXPECT_EQ(prefill.address.bootstrap_port, kDefaultBootstrapPort);
  PodWorker decode = ParsePod(pod, WorkerRole::kDecode);
  ASSERT_EQ(decode.kind, Kind::kWorker);
  EXPECT_EQ(decode.address.port, kDefaultDecodeGrpcPort);
  EXPECT_EQ(decode.address.bootstrap_port, 0);
  // A container port named "bootstrap" stands in for the annotation.
  pod["spec"]["containers"][0]["ports"] = json::parse(R"([{"name": "bootstrap", "containerPort": 8123}])");
  EXPECT_EQ(ParsePod(pod, WorkerRole::kPrefill).address.bootstrap_port, 8123);
}

TEST(ParsePod, GrpcPortAnnotationOverridesTheContainerPort) {
  json pod = Pod();
  pod["metadata"]["annotations"]["tandem.ai/grpc-port"] = "40000";
  EXPECT_EQ(ParsePod(pod, WorkerRole::kDecode).address.port, 40000);
}

TEST(ParsePod, NotReadyStates) {
  struct Case {
    const char* what;
    std::function<void(json&)> change;
    std::string reason;
  };
  const std::vector<Case> cases = {
      {"pending", [](json& p) { p["status"]["phase"] = "Pending"; }, "phase Pending"},
      {"no phase", [](json& p) { p["status"].erase("phase"); }, "no status.phase yet"},
      {"no status", [](json& p) { p.erase("status"); }, "no status.phase yet"},
      {"not ready", [](json& p) { p["status"]["conditions"][1]["status"] = "False"; }, "not Ready"},
      {"no conditions", [](json& p) { p["status"].erase("conditions"); }, "not Ready"},
      {"terminating", [](json& p) { p["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"; }, "terminating"},
      {"succeeded", [](json& p) { p["status"]["phase"] = "Succeeded"; }, "phase Succeeded"},
  };
  for (const auto& c : cases) {
    json pod = Pod();
    c.change(pod);
    PodWorker parsed = ParsePod(pod, WorkerRole::kPrefill);
    EXPECT_EQ(parsed.kind, Kind::kNotReady) << c.what;
    EXPECT_EQ(parsed.reason, c.reason) << c.what;
    EXPECT_EQ(parsed.name, "tandem/tandem-prefill-0") << c.what;
  }
}

TEST(ParsePod, BadObjectsAreInvalidWithAReason) {
  struct Case {
    const char* what;
    std::function<void(json&)> change;
    std::string reason;
  };
  const std::vector<Case> cases = {
      {"no ip", [](json& p) { p["status"].erase("podIP"); }, "Running and Ready but status.podIP is missing"},
      {"ip not a string", [](json& p) { p["status"]["podIP"] = 7; }, "Running and Ready but status.podIP is missing"},
      {"bootstrap word", [](json& p) { p["metadata"]["annotations"]["tandem.ai/bootstrap-port"] = "eighty"; },
       "annotation tandem.ai/bootstrap-port=\"eighty\" is not a port (1-65535)"},
      {"bootstrap number", [](json& p) { p["metadata"]["annotations"]["tandem.ai/bootstrap-port"] = 8998; },
       "annotation tandem.ai/bootstrap-port=8998 is not a port (1-65535)"},
      {"grpc too big", [](json& p) { p["metadata"]["annotations"]["tandem.ai/grpc-port"] = "70000"; },
       "annotation tandem.ai/grpc-port=\"70000\" is not a port (1-65535)"},
      {"grpc port string", [](json& p) { p["spec"]["containers"][0]["ports"][1]["containerPort"] = "30011"; },
       "container port \"grpc\" has no valid containerPort"},
  };
  for (const auto& c : cases) {
    json pod = Pod();
    c.change(pod);
    PodWorker parsed = ParsePod(pod, WorkerRole::kPrefill);
    EXPECT_EQ(parsed.kind, Kind::kInvalid) << c.what;
    EXPECT_EQ(parsed.reason, c.reason) << c.what;
  }
}

TEST(ParsePod, NothingThrowsOnWrongShapes) {
  for (const char* text : {R"(null)", R"([])", R"("pod")", R"({})", R"({"metadata": 3})", R"({"metadata": {"name": 5}})",
                           R"({"metadata": {"name": "x", "annotations": []}, "status": {"phase": "Running", "podIP": "1.2.3.4",
                               "conditions": [{"type": "Ready", "status": "True"}]}, "spec": {"containers": {"a": 1}}})",
                           R"({"metadata": {"name": "x"}, "status": {"phase": "Running", "conditions": "Ready"}})",
                           R"({"metadata": {"name": "x"}, "status": {"phase": "Running", "podIP": "1.2.3.4",
                               "conditions": [{"type": "Ready", "status": "True"}]}, "spec": {"containers": [{"ports": [7, null]}]}})"}) {
    json pod = json::parse(text);
    PodWorker parsed;
    EXPECT_NO_THROW(parsed = ParsePod(pod, WorkerRole::kPrefill)) << text;
    if (parsed.name.empty()) {
      EXPECT_EQ(parsed.reason, "no metadata.name") << text;
    }
  }
  // Wrong-typed annotations and container lists fall back to the defaults.
  json pod = json::parse(R"({"metadata": {"name": "x", "annotations": []}, "status": {"phase": "Running", "podIP": "1.2.3.4",
                               "conditions": [{"type": "Ready", "status": "True"}]}, "spec": {"containers": {"a": 1}}})");
  PodWorker parsed = ParsePod(pod, WorkerRole::kPrefill);
  ASSERT_EQ(parsed.kind, Kind::kWorker);
  EXPECT_EQ(parsed.address.name(), "1.2.3.4:30001");
}

TEST(ParsePod, Ipv6PodIpIsBracketed) {
  json pod = Pod();
  pod["status"]["podIP"] = "fd00::12";
  EXPECT_EQ(ParsePod(pod, WorkerRole::kDecode).address.name(), "[fd00::12]:30011");
}

TEST(UrlEncode, LabelSelectors) {
  EXPECT_EQ(UrlEncode("app=tandem,role!=prefill"), "app%3Dtandem%2Crole%21%3Dprefill");
  EXPECT_EQ(UrlEncode("app.kubernetes.io/name=tandem"), "app.kubernetes.io%2Fname%3Dtandem");
}

}  // namespace
}  // namespace tandem::router
