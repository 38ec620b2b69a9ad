#include "services/router/k8s_api.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <httplib.h>
#include <openssl/x509.h>
#include <spdlog/spdlog.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"

namespace tandem::router {

namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream file(path);
  if (!file) return absl::NotFoundError(absl::StrCat(what, " ", path, ": cannot read"));
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

void SetTimeout(httplib::ClientImpl& client, bool read, double seconds) {
  const auto whole = static_cast<time_t>(seconds);
  const auto micros = static_cast<time_t>((seconds - static_cast<double>(whole)) * 1e6);
  if (read) client.set_read_timeout(whole, micros);
  else client.set_connection_timeout(whole, micros);
}

}  // namespace

std::string UrlEncode(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += absl::StrFormat("%%%02X", c);
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<K8sApi>> K8sApi::Create(K8sApiOptions options) {
  std::unique_ptr<K8sApi> api(new K8sApi());
  std::string server = options.server;
  if (server.empty()) {
    const char* host = std::getenv("KUBERNETES_SERVICE_HOST");
    const char* port = std::getenv("KUBERNETES_SERVICE_PORT");
    if (host == nullptr || *host == '\0' || port == nullptr || *port == '\0') {
      return absl::FailedPreconditionError(
          "--discovery k8s: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are unset (not running in a pod?); "
          "give --k8s-api-server https://HOST:PORT");
    }
    const std::string host_text = absl::StrContains(host, ':') ? absl::StrCat("[", host, "]") : std::string(host);
    server = absl::StrCat("https://", host_text, ":", port);
  }
  if (!absl::StartsWith(server, "https://")) {
    return absl::InvalidArgumentError(absl::StrCat("--k8s-api-server ", server, ": must be https://HOST[:PORT]"));
  }
  std::string authority = server.substr(8);
  while (!authority.empty() && authority.back() == '/') authority.pop_back();
  std::string port_text;
  if (!authority.empty() && authority[0] == '[') {  // [IPv6]:port
    const size_t close = authority.find(']');
    if (close == std::string::npos) return absl::InvalidArgumentError(absl::StrCat("--k8s-api-server ", server, ": bad IPv6 address"));
    api->host_ = authority.substr(1, close - 1);
    if (close + 1 < authority.size()) {
      if (authority[close + 1] != ':') return absl::InvalidArgumentError(absl::StrCat("--k8s-api-server ", server, ": bad address"));
      port_text = authority.substr(close + 2);
    }
  } else {
    const size_t colon = authority.rfind(':');
    api->host_ = authority.substr(0, colon);
    if (colon != std::string::npos) port_text = authority.substr(colon + 1);
  }
  if (!port_text.empty() && (!absl::SimpleAtoi(port_text, &api->port_) || api->port_ <= 0 || api->port_ > 65535)) {
    return absl::InvalidArgumentError(absl::StrCat("--k8s-api-server ", server, ": bad port"));
  }
  if (api->host_.empty()) return absl::InvalidArgumentError(absl::StrCat("--k8s-api-server ", server, ": no host"));
  api->server_url_ = server;

  api->namespace_ = options.namespace_name;
  if (api->namespace_.empty()) {
    auto text = ReadFile(options.namespace_file, "--k8s-namespace-file");
    if (!text.ok()) {
      return absl::NotFoundError(absl::StrCat(text.status().message(), " (give --k8s-namespace NS outside a pod)"));
    }
    api->namespace_ = std::string(absl::StripAsciiWhitespace(*text));
    if (api->namespace_.empty()) return absl::InvalidArgumentError(absl::StrCat("--k8s-namespace-file ", options.namespace_file, ": empty"));
  }
  // Checked once here so a pod without its service-account mount says so at start; both files are
  // read again for every request (the token rotates, the CA bundle can be updated in place).
  TANDEM_RETURN_IF_ERROR(ReadFile(options.ca_file, "--k8s-ca-file").status());
  api->options_ = std::move(options);
  TANDEM_RETURN_IF_ERROR(api->ReadToken().status());
  return api;
}

K8sApi::~K8sApi() = default;

absl::StatusOr<std::string> K8sApi::ReadToken() {
  TANDEM_ASSIGN_OR_RETURN(std::string text, ReadFile(options_.token_file, "--k8s-token-file"));
  std::string token(absl::StripAsciiWhitespace(text));
  if (token.empty()) return absl::InvalidArgumentError(absl::StrCat("--k8s-token-file ", options_.token_file, ": empty"));
  std::lock_guard lock(mutex_);
  if (!last_token_.empty() && token != last_token_) {
    spdlog::info("router: k8s: service-account token {} changed; using the new one", options_.token_file);
  }
  last_token_ = token;
  return token;
}

absl::StatusOr<std::unique_ptr<httplib::ClientImpl>> K8sApi::NewClient(double extra_read_seconds) {
  if (shutdown_.load()) return absl::CancelledError("kubernetes API client stopped");
  TANDEM_ASSIGN_OR_RETURN(std::string token, ReadToken());
  // A fresh client (and TLS context) per request, so a rotated CA bundle is picked up too.
  auto client = std::make_unique<httplib::SSLClient>(host_, port_);
  client->set_ca_cert_path(options_.ca_file.c_str());
  client->enable_server_certificate_verification(true);
  client->set_bearer_token_auth(token.c_str());
  client->set_keep_alive(false);
  client->set_follow_location(false);
  SetTimeout(*client, false, options_.connect_timeout_seconds);
  SetTimeout(*client, true, options_.read_timeout_seconds + extra_read_seconds);
  return std::unique_ptr<httplib::ClientImpl>(std::move(client));
}

void K8sApi::Track(httplib::ClientImpl* client, bool add) {
  std::lock_guard lock(mutex_);
  if (add) {
    in_flight_.push_back(client);
  } else {
    in_flight_.erase(std::remove(in_flight_.begin(), in_flight_.end(), client), in_flight_.end());
  }
}

void K8sApi::Shutdown() {
  shutdown_.store(true);
  std::lock_guard lock(mutex_);
  for (httplib::ClientImpl* client : in_flight_) client->stop();
}

absl::Status K8sApi::TransportError(int error, long verify_result) const {
  const auto code = static_cast<httplib::Error>(error);
  switch (code) {
    case httplib::Error::SSLServerVerification:
      return absl::UnavailableError(absl::StrCat("kubernetes API ", server_url_, ": TLS: the server certificate does not verify against CA ",
                                                 options_.ca_file, " (", X509_verify_cert_error_string(verify_result),
                                                 "; check --k8s-ca-file and that the certificate names ", host_, ")"));
    case httplib::Error::SSLLoadingCerts:
      return absl::UnavailableError(absl::StrCat("kubernetes API ", server_url_, ": TLS: cannot load CA ", options_.ca_file));
    case httplib::Error::SSLConnection:
      return absl::UnavailableError(absl::StrCat("kubernetes API ", server_url_, ": TLS handshake failed",
                                                 verify_result != X509_V_OK ? absl::StrCat(" (", X509_verify_cert_error_string(verify_result), ")") : "",
                                                 "; is it an HTTPS server whose certificate verifies against CA ", options_.ca_file, "?"));
    case httplib::Error::Connection:
    case httplib::Error::ConnectionTimeout:
      return absl::UnavailableError(absl::StrCat("kubernetes API ", server_url_, ": cannot connect"));
    case httplib::Error::Read:
      return absl::UnavailableError(absl::StrCat("kubernetes API ", server_url_, ": connection dropped"));
    case httplib::Error::Canceled:
      return absl::CancelledError(absl::StrCat("kubernetes API ", server_url_, ": request cancelled"));
    default:
      return absl::UnavailableError(absl::StrCat("kubernetes API ", server_url_, ": ", httplib::to_string(code)));
  }
}

absl::StatusOr<K8sResponse> K8sApi::Get(const std::string& path) {
  TANDEM_ASSIGN_OR_RETURN(auto client, NewClient(0));
  Track(client.get(), true);
  httplib::Result result = client->Get(path.c_str(), httplib::Headers{{"Accept", "application/json"}});
  Track(client.get(), false);
  if (!result) {
    return TransportError(static_cast<int>(result.error()), static_cast<httplib::SSLClient*>(client.get())->get_openssl_verify_result());
  }
  return K8sResponse{result->status, result->body};
}

absl::StatusOr<K8sResponse> K8sApi::Stream(const std::string& path, double extra_read_seconds,
                                           const std::function<bool(const char*, size_t)>& on_data) {
  TANDEM_ASSIGN_OR_RETURN(auto client, NewClient(extra_read_seconds));
  K8sResponse response;
  Track(client.get(), true);
  httplib::Result result = client->Get(
      path.c_str(), httplib::Headers{{"Accept", "application/json"}},
      [&](const httplib::Response& head) {
        response.status = head.status;
        return true;
      },
      [&](const char* data, size_t size) {
        if (response.status != 200) {
          response.body.append(data, std::min<size_t>(size, 64 << 10));
          return true;
        }
        return !shutdown_.load() && on_data(data, size);
      });
  Track(client.get(), false);
  if (!result) {
    if (result.error() == httplib::Error::Canceled && response.status == 200) return response;  // on_data ended it
    return TransportError(static_cast<int>(result.error()), static_cast<httplib::SSLClient*>(client.get())->get_openssl_verify_result());
  }
  return response;
}

}  // namespace tandem::router
