"""The router's Kubernetes discovery (--discovery k8s) against a fake API server (fake_kube.py).

Behind the router run a real tandem-prefill and tandem-decode pair (tiny model); the pods the fake
serves point at them.
"""
import time

import pytest

import test_pd as pd
from engine_harness import http_get
from fake_kube import NAMESPACE, TOKEN, FakeKube, make_certs, make_pod
from test_router import Router

PREFILL_SELECTOR = "app=tandem,role=prefill"
DECODE_SELECTOR = "app=tandem,role=decode"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("kube-certs"))


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
