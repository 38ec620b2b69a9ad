#include "services/router/router.h"

#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "absl/strings/ascii.h"
#include "services/router/grpc_front.h"
#include "services/router/http_front.h"

namespace tandem::router {

ServingContext RouterState::Context() const {
  ServingContext context;
  context.tokenizer = tokenizer.get();
  context.model_name = options.served_model_name;
  context.max_context_tokens = registry->MaxContextTokens();
  if (options.max_prompt_tokens > 0 && (context.max_context_tokens == 0 || options.max_prompt_tokens < context.max_context_tokens)) {
    context.max_context_tokens = options.max_prompt_tokens;
  }
  context.max_new_tokens_limit = registry->MaxNewTokensLimit();
  context.effort_profile = effort_profile;
  return context;
}

bool RouterState::Authorized(const std::string& header) const {
  if (api_keys.empty()) return true;
  constexpr std::string_view kBearer = "Bearer ";
  if (header.size() <= kBearer.size() || header.compare(0, kBearer.size(), kBearer) != 0) return false;
  return api_keys.contains(header.substr(kBearer.size()));
}

absl::StatusOr<std::unique_ptr<RouterState>> MakeRouterState(RouterOptions options) {
  auto state = std::make_unique<RouterState>();
  if (options.model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required (the directory's tokenizer.json)");
  if (!std::filesystem::exists(std::filesystem::path(options.model_dir) / "tokenizer.json")) {
    return absl::NotFoundError(absl::StrCat("model dir ", options.model_dir, ": tokenizer.json missing"));
  }
  TANDEM_ASSIGN_OR_RETURN(state->tokenizer, text::Tokenizer::Load(options.model_dir));
  if (options.served_model_name.empty()) {
    options.served_model_name = std::filesystem::path(options.model_dir).lexically_normal().filename().string();
    if (options.served_model_name.empty()) {
      options.served_model_name = std::filesystem::path(options.model_dir).lexically_normal().parent_path().filename().string();
    }
  }
  if (options.effort_profile == "official") state->effort_profile = text::EffortProfile::kOfficial;
  else if (options.effort_profile == "preview") state->effort_profile = text::EffortProfile::kPreview;
  else return absl::InvalidArgumentError("--effort-profile must be official or preview");

  std::vector<WorkerAddress> addresses;
  for (const auto& [role, list] : {std::pair{WorkerRole::kPrefill, &options.prefill}, std::pair{WorkerRole::kDecode, &options.decode},
                                   std::pair{WorkerRole::kMixed, &options.mixed}}) {
    for (const auto& text : *list) {
      TANDEM_ASSIGN_OR_RETURN(auto address, ParseWorkerAddress(role, text));
      addresses.push_back(std::move(address));
    }
  }
  const std::vector<WorkerAddress> fixed = addresses;
  if (!options.worker_file.empty()) {
    std::ifstream file(options.worker_file);
    if (!file) return absl::NotFoundError(absl::StrCat("--worker-file ", options.worker_file, ": cannot read"));
    std::stringstream text;
    text << file.rdbuf();
    TANDEM_ASSIGN_OR_RETURN(auto more, ParseWorkerFile(text.str()));
    addresses.insert(addresses.end(), more.begin(), more.end());
  }
  const bool k8s = options.discovery == "k8s";
  if (!k8s && options.discovery != "static") return absl::InvalidArgumentError("--discovery must be static or k8s");
  if (!k8s && !(options.k8s.prefill_selector.empty() && options.k8s.decode_selector.empty() && options.k8s.mixed_selector.empty())) {
    return absl::InvalidArgumentError("--prefill-selector/--decode-selector/--mixed-selector need --discovery k8s");
  }
  if (k8s && !options.worker_file.empty()) return absl::InvalidArgumentError("give --worker-file or --discovery k8s, not both");
  if (addresses.empty() && options.worker_file.empty() && !k8s) {
    return absl::InvalidArgumentError("no workers: give --prefill and --decode, or --mixed (or --worker-file, or --discovery k8s)");
  }
  if (options.prefill.empty() != options.decode.empty()) {
    spdlog::warn("router: prefill workers need decode workers and vice versa; the lone side stays unused");
  }
  if (!options.api_key_file.empty()) {
    std::ifstream file(options.api_key_file);
    if (!file) return absl::NotFoundError(absl::StrCat("--api-key-file ", options.api_key_file, ": cannot read"));
    std::string line;
    while (std::getline(file, line)) {
      std::string key(absl::StripAsciiWhitespace(line));
      if (!key.empty() && key[0] != '#') state->api_keys.insert(key);
    }
    if (state->api_keys.empty()) return absl::InvalidArgumentError(absl::StrCat("--api-key-file ", options.api_key_file, ": no keys"));
  }
  TANDEM_ASSIGN_OR_RETURN(auto prefill_policy, MakePolicy(options.prefill_policy, options.cache));
  TANDEM_ASSIGN_OR_RETURN(auto decode_policy, MakePolicy(options.decode_policy, options.cache));
  TANDEM_ASSIGN_OR_RETURN(auto mixed_policy, MakePolicy(options.mixed_policy, options.cache));
  state->registry = std::make_unique<WorkerRegistry>(std::move(addresses), options.breaker, options.health);
  if (!options.worker_file.empty()) state->registry->WatchWorkerFile(options.worker_file, fixed);
  if (k8s) {
    WorkerRegistry* registry = state->registry.get();
    // Workers from flags stay; the pods' workers replace the previous pods' set on every change.
    TANDEM_ASSIGN_OR_RETURN(state->discovery, K8sDiscovery::Create(options.k8s, [registry, fixed](const std::vector<WorkerAddress>& pods) {
      std::vector<WorkerAddress> all = fixed;
      all.insert(all.end(), pods.begin(), pods.end());
      registry->Reload(all);
      registry->CheckSoon();
    }));
  }
  state->metrics = std::make_unique<RouterMetrics>(options.served_model_name);
  state->owned_generator = std::make_unique<FleetGenerator>(state->registry.get(), std::move(prefill_policy), std::move(decode_policy),
                                                            std::move(mixed_policy), state->metrics.get(), options.retry);
  state->generator = state->owned_generator.get();
  state->created = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  state->options = std::move(options);
  return state;
}

Router::Router(std::unique_ptr<RouterState> state) : state_(std::move(state)) {}
Router::~Router() { Stop(); }

absl::Status Router::Start() {
  state_->registry->StartHealthChecks();
  if (state_->discovery) {
    spdlog::info("router: k8s: watching {}", state_->discovery->Describe());
    state_->discovery->Start();
  }
  http_ = std::make_unique<HttpFront>(state_.get());
  TANDEM_RETURN_IF_ERROR(http_->Start(state_->options.host, state_->options.http_port));
  grpc_ = std::make_unique<GrpcFront>(state_.get());
  TANDEM_RETURN_IF_ERROR(grpc_->Start(state_->options.host, state_->options.grpc_port));
  return absl::OkStatus();
}

void Router::Stop() {
  if (grpc_) grpc_->Stop();
  if (http_) http_->Stop();
  if (state_ && state_->discovery) state_->discovery->Stop();
  if (state_ && state_->registry) state_->registry->Stop();
}

int Router::http_port() const { return http_ ? http_->port() : 0; }
int Router::grpc_port() const { return grpc_ ? grpc_->port() : 0; }

int RunRouter(RouterOptions options) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  auto state = MakeRouterState(std::move(options));
  if (!state.ok()) {
    spdlog::error("tandem-router: {}", std::string(state.status().message()));
    return 2;
  }
  Router router(std::move(*state));
  if (absl::Status status = router.Start(); !status.ok()) {
    spdlog::error("tandem-router: {}", std::string(status.message()));
    return 1;
  }
  const auto& o = router.state().options;
  spdlog::info("tandem-router serving {}: http {}:{} (OpenAI API), grpc {}:{}; {} workers; policies prefill={} decode={} mixed={}",
               o.served_model_name, o.host, router.http_port(), o.host, router.grpc_port(), router.state().registry->all().size(),
               o.prefill_policy, o.decode_policy, o.mixed_policy);
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  spdlog::info("tandem-router: {} received; stopping", signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
  router.Stop();
  return 0;
}

}  // namespace tandem::router
