"""A fake Kubernetes API server for the router's discovery tests: LIST and WATCH of pods in one
namespace over HTTPS (certificates made with the openssl CLI at test time), bearer-token checks, and
the faults a real one has: dropped watches, bookmarks, expired resource versions (410), 401 and 403.
"""
import copy
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAMESPACE = "tandem-test"
TOKEN = "good-token-1"


# --- certificates ---------------------------------------------------------------------------------

def openssl(*args, cwd):
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory)
    return directory / f"{name}.crt", directory / f"{name}.key"


def make_certs(directory):
    """A CA, a server certificate it signs for 127.0.0.1, and an unrelated CA: {name: path}."""
    assert shutil.which("openssl"), "the openssl CLI is missing (tools/scripts/install-deps.sh installs it)"
    ca, _ = make_ca(directory, "fake-kube-ca")
    other_ca, _ = make_ca(directory, "some-other-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=kubernetes",
            "-keyout", "server.key", "-out", "server.csr", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:kubernetes.default.svc\n"
                                       "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "fake-kube-ca.crt", "-CAkey", "fake-kube-ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=directory)
    return {"ca": ca, "other_ca": other_ca, "cert": directory / "server.crt", "key": directory / "server.key"}


# --- the fake API server --------------------------------------------------------------------------

def selector_matches(selector, labels):
    return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",")))


def status_object(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class Watcher:
    def __init__(self, selector):
        self.selector = selector
        self.queue = []
        self.mode = None  # "drop": close the connection mid-stream; "gone": send a 410 ERROR event


class FakeKube:
    """Pods of one namespace, a resource-version history, and every request it got."""

    def __init__(self, certs, token=TOKEN):
        self.token = token
        self.pods = {}
        self.version = 1000
        self.history = []  # (version, type, pod)
        self.compacted = 0  # watches from an older version get 410 Gone
        self.watchers = set()
        self.requests = []  # (kind, selector, resourceVersion, Authorization)
        self.forbidden = False  # answer 403, as for a service account without the Role
        self.cond = threading.Condition()
        kube = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                kube.handle(self)

        class TLSServer(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request, client_address):
                # The handshake runs in the request's thread, so a client refusing our certificate
                # cannot stall the others.
                try:
                    request = self.context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                Handler(request, client_address, self)

        self.server = TLSServer(("127.0.0.1", 0), Handler)
        self.server.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.context.load_cert_chain(certs["cert"], certs["key"])
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        with self.cond:
            for watcher in self.watchers:
                watcher.mode = "drop"
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # What tests do to the cluster.

    def set_pod(self, pod, notify=True):
        """Creates or updates a pod; notify=False changes it without a watch event (a missed event)."""
        with self.cond:
            self.version += 1
            pod = copy.deepcopy(pod)
            pod["metadata"]["resourceVersion"] = str(self.version)
            name = pod["metadata"]["name"]
            kind = "MODIFIED" if name in self.pods else "ADDED"
            self.pods[name] = pod
            if notify:
                self.emit(kind, pod)

    def delete_pod(self, name, notify=True):
        with self.cond:
            self.version += 1
            pod = self.pods.pop(name)
            pod["metadata"]["resourceVersion"] = str(self.version)
            if notify:
                self.emit("DELETED", pod)

    def emit(self, kind, obj):
        self.history.append((self.version, kind, obj))
        for watcher in self.watchers:
            watcher.queue.append((kind, obj))
        self.cond.notify_all()

    def send_raw_event(self, event):
        """Hands every live watch one event object as is (for malformed events)."""
        with self.cond:
            for watcher in self.watchers:
                watcher.queue.append(("RAW", event))
            self.cond.notify_all()

    def bookmark(self):
        with self.cond:
            self.version += 1
            for watcher in self.watchers:
                watcher.queue.append(("BOOKMARK", {"kind": "Pod", "apiVersion": "v1",
                                                   "metadata": {"resourceVersion": str(self.version)}}))
            self.cond.notify_all()
            return str(self.version)

    def drop_watches(self):
        with self.cond:
            for watcher in self.watchers:
                watcher.mode = "drop"
            self.cond.notify_all()

    def compact(self):
        with self.cond:
            self.compacted = self.version

    def expire(self):
        """Compacts the history (older versions are gone) and ends every watch with 410."""
        with self.cond:
            self.compacted = self.version
            for watcher in self.watchers:
                watcher.mode = "gone"
            self.cond.notify_all()

    def count(self, kind, selector=None):
        with self.cond:
            return sum(1 for r in self.requests if r[0] == kind and selector in (None, r[1]))

    def live_watches(self):
        with self.cond:
            return len(self.watchers)

    # The API.

    def handle(self, request):
        url = urllib.parse.urlparse(request.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        auth = request.headers.get("Authorization", "")
        watch = query.get("watch") in ("1", "true")
        with self.cond:
            self.requests.append(("WATCH" if watch else "LIST", query.get("labelSelector"), query.get("resourceVersion"), auth))
        if auth != f"Bearer {self.token}":
            return self.reply(request, 401, status_object(401, "Unauthorized", "Unauthorized"))
        if self.forbidden:
            verb = "watch" if watch else "list"
            return self.reply(request, 403, status_object(403, "Forbidden", (
                f'pods is forbidden: User "system:serviceaccount:{NAMESPACE}:tandem-router" cannot {verb} resource '
                f'"pods" in API group "" in the namespace "{NAMESPACE}"')))
        if url.path != f"/api/v1/namespaces/{NAMESPACE}/pods":
            return self.reply(request, 404, status_object(404, "NotFound", f"the server could not find {url.path}"))
        selector = query.get("labelSelector", "")
        if not watch:
            with self.cond:
                items = [p for p in self.pods.values() if selector_matches(selector, p["metadata"]["labels"])]
                body = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.version)},
                        "items": copy.deepcopy(items)}
            return self.reply(request, 200, body)
        if query.get("allowWatchBookmarks") != "true":
            return self.reply(request, 400, status_object(400, "BadRequest", "the router should ask for bookmarks"))
        self.stream(request, selector, int(query.get("resourceVersion") or 0), float(query.get("timeoutSeconds", 300)))

    def reply(self, request, code, body):
        data = json.dumps(body).encode()
        request.send_response(code)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def stream(self, request, selector, version, timeout):
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()

        def chunk(obj):
            data = (json.dumps(obj) + "\n").encode()
            request.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            request.wfile.flush()

        watcher = Watcher(selector)
        deadline = time.time() + timeout
        with self.cond:
            if version < self.compacted:
                chunk({"type": "ERROR", "object": status_object(410, "Expired", f"too old resource version: {version}")})
                request.wfile.write(b"0\r\n\r\n")
                return
            watcher.queue = [(kind, obj) for v, kind, obj in self.history if v > version]
            self.watchers.add(watcher)
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: watcher.queue or watcher.mode or time.time() >= deadline,
                                       timeout=max(0.0, deadline - time.time()))
                    events, watcher.queue, mode = watcher.queue, [], watcher.mode
                for kind, obj in events:
                    if kind == "RAW":
                        request.wfile.write(f"{len(obj):x}\r\n".encode() + obj + b"\r\n")
                    elif kind == "BOOKMARK" or selector_matches(selector, obj["metadata"]["labels"]):
                        chunk({"type": kind, "object": obj})
                request.wfile.flush()
                if mode == "drop":
                    request.connection.shutdown(socket.SHUT_RDWR)
                    request.close_connection = True
                    return
                if mode == "gone":
                    chunk({"type": "ERROR", "object": status_object(410, "Expired", "The resourceVersion for the provided watch is too old.")})
                    break
                if time.time() >= deadline:
                    break
            request.wfile.write(b"0\r\n\r\n")
            request.wfile.flush()
        except OSError:
            request.close_connection = True
        finally:
            with self.cond:
                self.watchers.discard(watcher)


def make_pod(name, role, grpc_port=None, bootstrap_port=None, ready=True, phase="Running", ip="127.0.0.1",
             annotations=None, deleting=False):
    ports = [{"name": "metrics", "containerPort": 31000}]
    if grpc_port is not None:
        ports.append({"name": "grpc", "containerPort": grpc_port})
    pod = {"kind": "Pod", "apiVersion": "v1",
           "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}",
                        "labels": {"app": "tandem", "role": role}, "annotations": dict(annotations or {})},
           "spec": {"containers": [{"name": role, "image": "tandem", "ports": ports}]},
           "status": {"phase": phase, "conditions": [{"type": "Initialized", "status": "True"},
                                                     {"type": "Ready", "status": "True" if ready else "False"}]}}
    if ip:
        pod["status"]["podIP"] = ip
    if bootstrap_port is not None:
        pod["metadata"]["annotations"]["tandem.ai/bootstrap-port"] = str(bootstrap_port)
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return pod
