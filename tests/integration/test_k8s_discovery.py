"""The router's Kubernetes discovery (--discovery k8s) against a fake API server.

The fake serves LIST and WATCH of pods over HTTPS (a CA and server certificate made with the openssl
CLI at test time), checks the bearer token, and can drop watches, send bookmarks and expire resource
versions (410 Gone). Behind the router run a real tandem-prefill and tandem-decode pair (tiny model);
the pods the fake serves point at them.
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

import pytest

import test_pd as pd
from engine_harness import http_get
from test_router import Router

NAMESPACE = "tandem-test"
TOKEN = "good-token-1"
PREFILL_SELECTOR = "app=tandem,role=prefill"
DECODE_SELECTOR = "app=tandem,role=decode"


# --- certificates ---------------------------------------------------------------------------------

def openssl(*args, cwd):
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory)
    return directory / f"{name}.crt", directory / f"{name}.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.fail("the openssl CLI is missing (tools/scripts/install-deps.sh installs it)")
    directory = tmp_path_factory.mktemp("kube-certs")
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


# --- fixtures and helpers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    p = pd.Pair()
    yield p
    p.stop()


@pytest.fixture
def kube(certs):
    server = FakeKube(certs)
    yield server
    server.stop()


def prefill_pod(pair, **kwargs):
    return make_pod("prefill-0", "prefill", pair.prefill.grpc_port, pair.bootstrap_port, **kwargs)


def decode_pod(pair, name="decode-0", **kwargs):
    return make_pod(name, "decode", pair.decode.grpc_port, **kwargs)


def start_router(kube, certs, tmp_path, token=TOKEN, ca=None, name="router-k8s", extra=()):
    secrets = tmp_path / "serviceaccount"
    secrets.mkdir(exist_ok=True)
    (secrets / "token").write_text(token + "\n")
    (secrets / "namespace").write_text(NAMESPACE)
    router = Router(["--discovery", "k8s", "--prefill-selector", PREFILL_SELECTOR, "--decode-selector", DECODE_SELECTOR,
                     "--k8s-api-server", f"https://127.0.0.1:{kube.port}", "--k8s-token-file", str(secrets / "token"),
                     "--k8s-ca-file", str(ca or certs["ca"]), "--k8s-namespace-file", str(secrets / "namespace"),
                     "--k8s-max-backoff", "0.5", *extra], name=name, wait=False)
    router.token_file = secrets / "token"
    return router


def wait_for(predicate, what, router=None, timeout=30):
    deadline = time.time() + timeout
    while not predicate():
        if router is not None:
            assert router.proc.poll() is None, f"router exited while waiting for {what}:\n{router.log_path.read_text()}"
        assert time.time() < deadline, f"timed out waiting for {what}" + (f"\n{log(router)}" if router else "")
        time.sleep(0.02)


def log(router):
    router.log.flush()
    return router.log_path.read_text()


def wait_log(router, text, timeout=30):
    wait_for(lambda: text in log(router), f"router log line {text!r}", router, timeout)


def readiness(router):
    try:
        return http_get(router.http_port, "/readiness", timeout=2)[0]
    except OSError:  # not listening yet
        return None


def wait_readiness(router, code, timeout=30):
    wait_for(lambda: readiness(router) == code, f"/readiness {code}", router, timeout)


def chat(router):
    return router.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 2})


# --- tests ----------------------------------------------------------------------------------------

def test_ready_pods_become_workers_and_leave_when_not_ready_or_deleted(pair, kube, certs, tmp_path):
    kube.set_pod(prefill_pod(pair, phase="Pending", ready=False))
    kube.set_pod(decode_pod(pair))
    kube.set_pod(make_pod("unrelated", "cache", 1234))  # another role: no selector matches it
    router = start_router(kube, certs, tmp_path)
    try:
        wait_log(router, f"pod {NAMESPACE}/decode-0 (decode) is a worker at 127.0.0.1:{pair.decode.grpc_port}")
        wait_log(router, f"pod {NAMESPACE}/prefill-0 (prefill) not a worker yet: phase Pending")
        assert readiness(router) == 503  # a decode without a prefill is no pair
        assert "unrelated" not in log(router)

        kube.set_pod(prefill_pod(pair, ready=False))
        wait_log(router, f"pod {NAMESPACE}/prefill-0 (prefill) not a worker yet: not Ready")
        assert readiness(router) == 503
        kube.set_pod(prefill_pod(pair))
        wait_readiness(router, 200)
        assert (f"pod {NAMESPACE}/prefill-0 (prefill) is a worker at 127.0.0.1:{pair.prefill.grpc_port} "
                f"(bootstrap port {pair.bootstrap_port})") in log(router)
        status, answer = chat(router)
        assert status == 200, answer
        assert answer["usage"]["completion_tokens"] >= 1

        # Not Ready: the router stops routing to it at once.
        kube.set_pod(decode_pod(pair, ready=False))
        wait_readiness(router, 503)
        wait_log(router, f"pod {NAMESPACE}/decode-0 (decode) dropped: not Ready")
        assert f"worker 127.0.0.1:{pair.decode.grpc_port} (decode) removed" in log(router)
        status, answer = chat(router)
        assert status == 503 and answer["error"]["type"] == "service_unavailable", answer

        kube.set_pod(decode_pod(pair))
        wait_readiness(router, 200)
        assert chat(router)[0] == 200

        # Terminating (deletionTimestamp set) and then deleted.
        kube.set_pod(decode_pod(pair, deleting=True))
        wait_readiness(router, 503)
        wait_log(router, f"pod {NAMESPACE}/decode-0 (decode) dropped: terminating")
        kube.set_pod(decode_pod(pair))
        wait_readiness(router, 200)
        kube.delete_pod("prefill-0")
        wait_readiness(router, 503)
        wait_log(router, f"pod {NAMESPACE}/prefill-0 (prefill) dropped: deleted")

        # One LIST per selector, everything else arrived over the watches, all with the token.
        assert kube.count("LIST", PREFILL_SELECTOR) == 1 and kube.count("LIST", DECODE_SELECTOR) == 1
        assert all(r[3] == f"Bearer {TOKEN}" for r in kube.requests)
        assert router.proc.poll() is None
    finally:
        assert router.stop() == 0


def test_dropped_watch_reconnects_from_the_last_resource_version(pair, kube, certs, tmp_path):
    kube.set_pod(prefill_pod(pair))
    kube.set_pod(decode_pod(pair))
    router = start_router(kube, certs, tmp_path)
    try:
        wait_readiness(router, 200)
        wait_for(lambda: kube.live_watches() == 2, "both watches", router)
        version = kube.bookmark()
        watches = kube.count("WATCH")
        # The bookmark must have arrived before the drop for the reconnect to use it: wait for a
        # state change the watch reports, which comes after it.
        kube.set_pod(make_pod("decode-1", "decode", pair.decode.grpc_port, ready=False))
        wait_log(router, f"pod {NAMESPACE}/decode-1 (decode) not a worker yet: not Ready")
        kube.drop_watches()
        wait_for(lambda: kube.count("WATCH") >= watches + 2 and kube.live_watches() == 2, "the watches to reconnect", router)
        wait_log(router, "connection dropped; reconnecting")
        reconnects = [r for r in kube.requests if r[0] == "WATCH"][watches:]
        prefill_versions = {r[2] for r in reconnects if r[1] == PREFILL_SELECTOR}
        assert prefill_versions == {version}, f"prefill re-watched from {prefill_versions}, the bookmark was {version}"
        assert kube.count("LIST") == 2, "a dropped watch resumes from its version; no re-list"
        assert readiness(router) == 200

        # The new watch delivers.
        kube.set_pod(decode_pod(pair, ready=False))
        wait_readiness(router, 503)
        kube.set_pod(decode_pod(pair))
        wait_readiness(router, 200)
        assert chat(router)[0] == 200
    finally:
        assert router.stop() == 0


def test_gone_resource_version_triggers_a_relist(pair, kube, certs, tmp_path):
    kube.set_pod(prefill_pod(pair))
    kube.set_pod(decode_pod(pair))
    router = start_router(kube, certs, tmp_path)
    try:
        wait_readiness(router, 200)
        wait_for(lambda: kube.live_watches() == 2, "both watches", router)
        # Events the router never saw, then the history is compacted: only a fresh list tells.
        kube.delete_pod("decode-0", notify=False)
        kube.expire()
        wait_log(router, "410 Gone")
        wait_log(router, "re-listing")
        wait_readiness(router, 503)
        wait_log(router, f"pod {NAMESPACE}/decode-0 (decode) dropped: gone (not in the new list)")
        assert kube.count("LIST", DECODE_SELECTOR) >= 2 and kube.count("LIST", PREFILL_SELECTOR) >= 2

        # A watch that reconnects from an expired version (dropped, then compacted) also re-lists.
        wait_for(lambda: kube.live_watches() == 2, "both watches again", router)
        lists = kube.count("LIST")
        kube.set_pod(decode_pod(pair), notify=False)
        kube.compact()
        kube.drop_watches()
        wait_for(lambda: kube.count("LIST") >= lists + 2, "re-lists after the expired reconnect", router)
        wait_readiness(router, 200)
        assert chat(router)[0] == 200
    finally:
        assert router.stop() == 0


def test_wrong_token_is_a_clear_error_and_a_rotated_token_recovers(pair, kube, certs, tmp_path):
    kube.set_pod(prefill_pod(pair))
    kube.set_pod(decode_pod(pair))
    router = start_router(kube, certs, tmp_path, token="stale-token")
    try:
        wait_log(router, "401 Unauthorized: the API server refused the service-account token from")
        assert str(router.token_file) in log(router)
        assert http_get(router.http_port, "/health")[0] == 200
        assert readiness(router) == 503
        # kubelet rotates the projected token in place; the router picks it up on its next attempt.
        router.token_file.write_text(TOKEN + "\n")
        wait_readiness(router, 200)
        wait_log(router, f"service-account token {router.token_file} changed; using the new one")
        assert chat(router)[0] == 200
    finally:
        assert router.stop() == 0


def test_missing_rbac_is_a_clear_error_until_granted(pair, kube, certs, tmp_path):
    kube.set_pod(prefill_pod(pair))
    kube.set_pod(decode_pod(pair))
    kube.forbidden = True
    router = start_router(kube, certs, tmp_path, name="router-k8s-rbac")
    try:
        wait_log(router, f"403 Forbidden: the router's service account may not list/watch pods in namespace {NAMESPACE}")
        assert 'cannot list resource "pods"' in log(router)
        assert readiness(router) == 503 and http_get(router.http_port, "/health")[0] == 200
        kube.forbidden = False  # the RoleBinding is applied
        wait_readiness(router, 200)
    finally:
        assert router.stop() == 0


def test_untrusted_server_certificate_is_a_clear_error(kube, certs, tmp_path):
    router = start_router(kube, certs, tmp_path, ca=certs["other_ca"], name="router-k8s-ca")
    try:
        wait_log(router, "TLS: the server certificate does not verify against CA")
        assert str(certs["other_ca"]) in log(router)
        assert kube.count("LIST") == 0, "no request may reach a server the CA does not vouch for"
        assert http_get(router.http_port, "/health")[0] == 200
        assert readiness(router) == 503
    finally:
        assert router.stop() == 0


def test_bad_pods_are_skipped_with_a_reason(pair, kube, certs, tmp_path):
    kube.set_pod(make_pod("prefill-no-ip", "prefill", pair.prefill.grpc_port, pair.bootstrap_port, ip=None))
    kube.set_pod(make_pod("prefill-bad-annotation", "prefill", pair.prefill.grpc_port, "eighty"))
    kube.set_pod(make_pod("decode-bad-port", "decode", pair.decode.grpc_port, annotations={"tandem.ai/grpc-port": "70000"}))
    kube.set_pod(decode_pod(pair))
    router = start_router(kube, certs, tmp_path)
    try:
        wait_log(router, f"pod {NAMESPACE}/prefill-no-ip (prefill) skipped: Running and Ready but status.podIP is missing")
        wait_log(router, f'pod {NAMESPACE}/prefill-bad-annotation (prefill) skipped: annotation tandem.ai/bootstrap-port="eighty" is not a port')
        wait_log(router, f'pod {NAMESPACE}/decode-bad-port (decode) skipped: annotation tandem.ai/grpc-port="70000" is not a port')
        assert readiness(router) == 503  # no valid prefill
        # Objects that are not pods at all, and a line that is not JSON, must not take the router down.
        kube.set_pod({"metadata": {"name": "prefill-weird", "labels": {"app": "tandem", "role": "prefill"}},
                      "status": "not an object", "spec": [1, 2]})
        wait_log(router, "pod prefill-weird (prefill) not a worker yet: no status.phase yet")
        kube.set_pod(prefill_pod(pair))
        wait_readiness(router, 200)
        lists = kube.count("LIST")
        kube.send_raw_event(b'{"type": "MODIFIED", "object": [\n')
        wait_log(router, "malformed watch event")
        wait_for(lambda: kube.count("LIST") > lists, "a re-list after the malformed event", router)
        wait_readiness(router, 200)
        assert chat(router)[0] == 200
        assert router.proc.poll() is None
    finally:
        assert router.stop() == 0


def test_mixed_selector_and_static_workers_side_by_side(pair, kube, certs, tmp_path):
    """--mixed-selector pods become mixed workers; --prefill/--decode flags stay whatever the pods do."""
    # The router only health-checks these, so the decode engine can stand in for a mixed one.
    kube.set_pod(make_pod("mixed-0", "mixed", annotations={"tandem.ai/grpc-port": str(pair.decode.grpc_port)}))
    router = start_router(kube, certs, tmp_path, name="router-k8s-mixed", extra=[
        "--mixed-selector", "app=tandem,role=mixed", "--prefill", f"127.0.0.1:{pair.prefill.grpc_port},{pair.bootstrap_port}"])
    try:
        wait_log(router, f"pod {NAMESPACE}/mixed-0 (mixed) is a worker at 127.0.0.1:{pair.decode.grpc_port}")
        wait_readiness(router, 200)
        kube.set_pod(decode_pod(pair))
        wait_log(router, f"worker 127.0.0.1:{pair.decode.grpc_port} (decode) added")
        kube.delete_pod("mixed-0")
        wait_log(router, f"pod {NAMESPACE}/mixed-0 (mixed) dropped: deleted")
        # The flag's prefill and the pod's decode still make a pair.
        wait_readiness(router, 200)
        assert f"worker 127.0.0.1:{pair.prefill.grpc_port} (prefill) removed" not in log(router)
        assert chat(router)[0] == 200
    finally:
        assert router.stop() == 0


def test_bad_discovery_flags_fail_at_start(tmp_path):
    cases = [
        (["--discovery", "k8s"], "needs --prefill-selector"),
        (["--prefill-selector", PREFILL_SELECTOR], "need --discovery k8s"),
        (["--discovery", "k8s", "--mixed-selector", "a=b", "--k8s-api-server", "http://127.0.0.1:1"], "must be https://"),
        (["--discovery", "k8s", "--mixed-selector", "a=b", "--k8s-api-server", "https://127.0.0.1:1",
          "--k8s-token-file", str(tmp_path / "missing"), "--k8s-namespace", "x", "--k8s-ca-file", "/dev/null"], "--k8s-token-file"),
    ]
    for args, message in cases:
        router = Router(args, name="router-k8s-flags", wait=False)
        assert router.proc.wait(30) != 0, args
        router.stop()
        assert message in router.log_path.read_text(), (args, router.log_path.read_text())
