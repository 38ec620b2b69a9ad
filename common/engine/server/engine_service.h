// The tandem.v1.Engine gRPC service over an Engine: Generate streams, Abort, GetLoads, GetModelInfo.
// A cancelled or vanished client aborts its request; every call ends with tokens or a status.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "common/engine/engine.h"
#include "common/engine/server/engine_metrics.h"
#include "tandem/v1/engine.grpc.pb.h"

namespace tandem::engine {

struct ServiceInfo {
  std::string model_path;
  std::string served_model_name;
  v1::Role role = v1::ROLE_MIXED;
  std::string config_hash;
};

// grpc status from an absl one (same numeric codes).
grpc::Status ToGrpcStatus(const absl::Status& status);
// The request's sampling fields, presence kept.
SamplingParams FromProto(const v1::SamplingParams& proto);

class EngineService final : public v1::Engine::Service {
 public:
  EngineService(Engine* engine, EngineMetrics* metrics, ServiceInfo info);

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Abort(grpc::ServerContext* context, const v1::AbortRequest* request, v1::AbortResponse* response) override;
  grpc::Status GetLoads(grpc::ServerContext* context, const v1::GetLoadsRequest* request,
                        v1::GetLoadsResponse* response) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                            v1::GetModelInfoResponse* response) override;

 private:
  Engine* engine_;
  EngineMetrics* metrics_;
  ServiceInfo info_;
  std::atomic<uint64_t> next_id_{1};
};

}  // namespace tandem::engine
