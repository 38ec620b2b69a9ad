#include "services/router/http_front.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdlib>
#include <functional>

#include <httplib.h>
#include <spdlog/spdlog.h>

#include "common/metrics/metrics.h"
#include "services/router/render.h"
#include "services/router/session.h"

namespace tandem::router {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

void SendJson(httplib::Response& response, int status, const Json& body) {
  response.status = status;
  response.set_content(body.dump(-1, ' ', false, Json::error_handler_t::replace), "application/json");
}

std::string SseEvent(const Json& body) {
  return absl::StrCat("data: ", body.dump(-1, ' ', false, Json::error_handler_t::replace), "\n\n");
}

// cpp-httplib 0.11 keeps its sockets to itself; the router finds the one it needs among this process's
// descriptors by its addresses. `match(fd, local, peer)` (peer null when not connected) picks it.
bool SameAddress(const sockaddr_storage& address, const std::string& host, int port) {
  char text[INET6_ADDRSTRLEN] = {0};
  int actual = -1;
  if (address.ss_family == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(&address);
    inet_ntop(AF_INET, &v4->sin_addr, text, sizeof(text));
    actual = ntohs(v4->sin_port);
  } else if (address.ss_family == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&address);
    inet_ntop(AF_INET6, &v6->sin6_addr, text, sizeof(text));
    actual = ntohs(v6->sin6_port);
  } else {
    return false;
  }
  return actual == port && (host.empty() || host == text);
}

int FindSocketWhere(const std::function<bool(int, const sockaddr_storage&, const sockaddr_storage*)>& match) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int found = -1;
  while (const dirent* entry = readdir(dir)) {
    char* end = nullptr;
    const long number = std::strtol(entry->d_name, &end, 10);
    const int fd = static_cast<int>(number);
    if (end == entry->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    struct stat info;
    if (fstat(fd, &info) != 0 || !S_ISSOCK(info.st_mode)) continue;
    sockaddr_storage local{}, peer{};
    socklen_t local_size = sizeof(local), peer_size = sizeof(peer);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_size) != 0) continue;
    const bool connected = getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_size) == 0;
    if (match(fd, local, connected ? &peer : nullptr)) {
      found = fd;
      break;
    }
  }
  closedir(dir);
  return found;
}

// cpp-httplib 0.11 shows a handler neither its socket nor whether the client is still there (later
// versions have Request::is_connection_closed), and a non-streaming answer writes nothing until it is
// done, so a client that left would keep both engine legs busy to the end. The connection is the one
// descriptor of this process whose (local, peer) addresses are the request's; while its handler runs
// that descriptor is the handler thread's alone. A closed peer shows as POLLRDHUP/POLLHUP on it.
class DisconnectWatch {
 public:
  explicit DisconnectWatch(const httplib::Request& request) : request_(request), start_(Clock::now()) {}

  // Cheap when called per delta: nothing for the first kGrace (short answers never pay the search),
  // then one poll per kInterval.
  bool ClientGone() {
    const auto now = Clock::now();
    if (fd_ == kNotFound || now - start_ < kGrace || now - last_ < kInterval) return false;
    last_ = now;
    if (fd_ == kUnknown) fd_ = FindSocket();
    if (fd_ < 0) return false;
    pollfd entry{fd_, POLLRDHUP, 0};
    return poll(&entry, 1, 0) == 1 && (entry.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
  }

 private:
  static constexpr int kUnknown = -2, kNotFound = -1;
  static constexpr auto kGrace = std::chrono::milliseconds(200);
  static constexpr auto kInterval = std::chrono::milliseconds(100);

  int FindSocket() const {
    if (request_.local_port <= 0 || request_.remote_port <= 0) return kNotFound;
    const int fd = FindSocketWhere([this](int, const sockaddr_storage& local, const sockaddr_storage* peer) {
      return peer != nullptr && SameAddress(local, request_.local_addr, request_.local_port) &&
             SameAddress(*peer, request_.remote_addr, request_.remote_port);
    });
    return fd >= 0 ? fd : kNotFound;
  }

  const httplib::Request& request_;
  Clock::time_point start_;
  Clock::time_point last_{};
  int fd_ = kUnknown;
};

// Everything one streaming response owns while httplib drives it.
struct StreamState {
  Job job;
  ResponseMeta meta;
  std::unique_ptr<Session> session;
  Delta first;
  bool first_ended = false;
  Clock::time_point arrival;
};

}  // namespace

HttpFront::HttpFront(RouterState* state) : state_(state), server_(std::make_unique<httplib::Server>()) {
  // Each open SSE stream holds a pool thread for its whole life.
  const int threads = state->options.http_threads;
  server_->new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  server_->set_payload_max_length(state->options.max_request_bytes);
  // Headers and body (and each SSE event) are separate writes: without this, Nagle holds the second
  // behind the client's delayed ACK (~40 ms per response).
  server_->set_tcp_nodelay(true);
  server_->set_read_timeout(30, 0);
  server_->set_write_timeout(30, 0);
  Routes();
}

HttpFront::~HttpFront() { Stop(); }

void HttpFront::Routes() {
  RouterState* state = state_;
  server_->set_error_handler([state](const httplib::Request&, httplib::Response& response) {
    if (!response.body.empty()) return;
    std::string message = absl::StrCat("HTTP ", response.status);
    absl::Status status = absl::UnknownError(message);
    if (response.status == 413) {
      status = InvalidParam("", absl::StrCat("the request body exceeds the limit of ", state->options.max_request_bytes, " bytes"),
                            "request_too_large");
    } else if (response.status == 404) {
      status = absl::NotFoundError("no such route");
    } else if (response.status == 400) {
      status = InvalidParam("", "malformed HTTP request");
    }
    const int code = response.status;
    SendJson(response, code, ErrorBody(status));
  });

  server_->Get("/health", [](const httplib::Request&, httplib::Response& response) {
    response.set_content("{\"status\":\"ok\"}", "application/json");
  });
  server_->Get("/readiness", [state](const httplib::Request&, httplib::Response& response) {
    const bool ready = state->registry->Ready();
    Json body = Json::object();
    body["status"] = ready ? "ready" : "not ready";
    Json workers = Json::array();
    for (const auto& worker : state->registry->all()) {
      Json w = Json::object();
      w["worker"] = worker->name();
      w["role"] = RoleName(worker->address().role);
      w["healthy"] = worker->healthy();
      w["breaker"] = static_cast<int>(worker->breaker().state());
      workers.push_back(std::move(w));
    }
    body["workers"] = std::move(workers);
    SendJson(response, ready ? 200 : 503, body);
  });
  server_->Get("/metrics", [state](const httplib::Request&, httplib::Response& response) {
    response.set_content(state->metrics->Scrape(*state->registry), metrics::kExpositionContentType);
  });

  auto authorized = [state](const httplib::Request& request, httplib::Response& response) {
    if (state->Authorized(request.get_header_value("Authorization"))) return true;
    absl::Status status = absl::UnauthenticatedError("missing or invalid API key: send Authorization: Bearer <key>");
    status.SetPayload("tandem/code", absl::Cord("invalid_api_key"));
    SendJson(response, 401, ErrorBody(status));
    return false;
  };

  server_->Get("/v1/models", [state, authorized](const httplib::Request& request, httplib::Response& response) {
    if (!authorized(request, response)) return;
    Json model = Json::object();
    model["id"] = state->options.served_model_name;
    model["object"] = "model";
    model["created"] = state->created;
    model["owned_by"] = "tandem";
    model["max_model_len"] = state->registry->MaxContextTokens();
    Json body = Json::object();
    body["object"] = "list";
    body["data"] = Json::array({model});
    SendJson(response, 200, body);
    state->metrics->Request("http", "models", 200);
  });

  auto generate = [state, authorized](bool chat) {
    return [state, authorized, chat](const httplib::Request& request, httplib::Response& response) {
      const char* endpoint = chat ? "chat" : "completion";
      const auto arrival = Clock::now();
      auto fail = [&](const absl::Status& status) {
        const int code = HttpStatusOf(status);
        SendJson(response, code, ErrorBody(status));
        state->metrics->Request("http", endpoint, code);
      };
      if (!authorized(request, response)) {
        state->metrics->Request("http", endpoint, 401);
        return;
      }
      absl::StatusOr<Job> parsed = ParseRequestBody(request.body, chat, state->Context());
      if (!parsed.ok()) {
        fail(parsed.status());
        return;
      }
      auto stream = std::make_shared<StreamState>();
      stream->job = std::move(*parsed);
      stream->arrival = arrival;
      stream->meta = {NewResponseId(chat ? "chatcmpl" : "cmpl"),
                      static_cast<int64_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                               std::chrono::system_clock::now().time_since_epoch()).count()),
                      state->options.served_model_name};
      stream->session = std::make_unique<Session>(stream->job, *state->tokenizer, state->generator->Open(stream->job.request));
      // Nothing reaches the client before the first delta, so dispatch errors (and retries) stay plain HTTP.
      if (absl::Status status = stream->session->Next(stream->first, stream->first_ended); !status.ok()) {
        fail(status);
        return;
      }
      const text::Tokenizer& tokenizer = *state->tokenizer;
      if (!stream->job.stream) {
        Accumulated all;
        all.Add(stream->first);
        bool ended = stream->first_ended;
        bool first_seen = !stream->first.empty();
        if (first_seen) state->metrics->FirstToken(Since(arrival));
        DisconnectWatch watch(request);
        while (!ended) {
          Delta delta;
          if (absl::Status status = stream->session->Next(delta, ended); !status.ok()) {
            fail(status);
            return;
          }
          if (!ended && watch.ClientGone()) {
            stream->session->Cancel();  // nobody will read the answer: end both legs now
            state->metrics->Request("http", endpoint, 499);
            return;
          }
          if (!first_seen && !delta.empty()) {
            first_seen = true;
            state->metrics->FirstToken(Since(arrival));
          }
          all.Add(delta);
        }
        SendJson(response, 200, FullResponse(stream->job, stream->meta, tokenizer, *stream->session, all));
        state->metrics->Request("http", endpoint, 200);
        state->metrics->EndToEnd(Since(arrival));
        state->metrics->Tokens(stream->session->usage().prompt_tokens, stream->session->usage().completion_tokens);
        return;
      }
      response.set_header("Cache-Control", "no-cache");
      response.set_chunked_content_provider(
          "text/event-stream", [state, stream, endpoint](size_t, httplib::DataSink& sink) {
            const text::Tokenizer& tokenizer = *state->tokenizer;
            Session& session = *stream->session;
            auto write = [&](const std::string& event) {
              if (sink.write(event.data(), event.size())) return true;
              session.Cancel();  // the client went away: end both legs now
              return false;
            };
            Clock::time_point last = Clock::now();
            bool any = false;
            auto send_delta = [&](const Delta& delta, bool first) {
              if (delta.empty() && !first) return true;
              if (!delta.empty()) {
                const auto now = Clock::now();
                if (!any) state->metrics->FirstToken(Since(stream->arrival));
                else state->metrics->InterToken(std::chrono::duration<double>(now - last).count());
                any = true;
                last = now;
              }
              Json chunk = StreamChunk(stream->job, stream->meta, tokenizer, delta, first);
              if (stream->job.continuous_usage) chunk["usage"] = UsageJson(session.usage());
              return write(SseEvent(chunk));
            };
            // Chat opens with the role alone ({"role":"assistant","content":""}), then the deltas.
            if ((stream->job.chat && !send_delta(Delta(), true)) || !send_delta(stream->first, false)) {
              state->metrics->Request("http", endpoint, 499);
              return false;
            }
            bool ended = stream->first_ended;
            while (!ended) {
              Delta delta;
              absl::Status status = session.Next(delta, ended);
              if (!status.ok()) {
                Json error = ErrorBody(status)["error"];
                error["object"] = "error";
                write(SseEvent(error));
                write("data: [DONE]\n\n");
                sink.done();
                state->metrics->Request("http", endpoint, HttpStatusOf(status));
                return true;
              }
              if (!send_delta(delta, false)) {
                state->metrics->Request("http", endpoint, 499);
                return false;
              }
            }
            if (!write(SseEvent(FinishChunk(stream->job, stream->meta, session)))) return false;
            if (stream->job.include_usage && !write(SseEvent(UsageChunk(stream->job, stream->meta, session)))) return false;
            if (!write("data: [DONE]\n\n")) return false;
            sink.done();
            state->metrics->Request("http", endpoint, 200);
            state->metrics->EndToEnd(Since(stream->arrival));
            state->metrics->Tokens(session.usage().prompt_tokens, session.usage().completion_tokens);
            return true;
          });
    };
  };
  server_->Post("/v1/chat/completions", generate(true));
  server_->Post("/v1/completions", generate(false));
}

absl::Status HttpFront::Start(const std::string& host, int port) {
  if (port == 0) {
    port_ = server_->bind_to_any_port(host.c_str());
    if (port_ <= 0) return absl::UnavailableError(absl::StrCat("http: cannot bind ", host));
  } else {
    if (!server_->bind_to_port(host.c_str(), port)) {
      return absl::UnavailableError(absl::StrCat("http: cannot bind ", host, ":", port, " (in use?)"));
    }
    port_ = port;
  }
  // httplib listens with a backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG, fixed when Debian built the library):
  // a burst of new connections past that has its SYNs dropped and waits a 1 s retransmission. Listening
  // again on the bound socket raises the backlog.
  const int listener = FindSocketWhere([this](int fd, const sockaddr_storage& local, const sockaddr_storage* peer) {
    int accepting = 0;
    socklen_t size = sizeof(accepting);
    return peer == nullptr && getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &size) == 0 && accepting == 1 &&
           SameAddress(local, "", port_);
  });
  if (listener < 0 || ::listen(listener, SOMAXCONN) != 0) {
    spdlog::warn("http: could not raise the listen backlog of port {} (bursts of new connections may wait 1 s)", port_);
  }
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return absl::OkStatus();
}

void HttpFront::Stop() {
  if (thread_.joinable()) {
    server_->stop();
    thread_.join();
  }
}

}  // namespace tandem::router
