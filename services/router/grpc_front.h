// The gRPC front (tandem.v1.Router): chat and text completion, server-streaming, with the HTTP
// API's semantics (requests become the OpenAI JSON and pass the same parser); health, reflection.
#pragma once

#include <memory>

#include <grpcpp/grpcpp.h>

#include "services/router/router.h"
#include "tandem/v1/router.grpc.pb.h"

namespace tandem::router {

// Proto requests in the OpenAI JSON shape (exposed for tests).
Json ChatRequestToJson(const v1::ChatCompletionRequest& request);
Json CompletionRequestToJson(const v1::CompletionRequest& request);

class GrpcFront {
 public:
  explicit GrpcFront(RouterState* state);
  ~GrpcFront();
  absl::Status Start(const std::string& host, int port);
  void Stop();
  int port() const { return port_; }

 private:
  class Service;
  RouterState* state_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace tandem::router
