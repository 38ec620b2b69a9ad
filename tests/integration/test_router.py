"""The router from outside: real tandem-router, tandem-decode (mixed and decode) and tandem-prefill
processes on loopback, driven with the official `openai` client, raw HTTP and grpcio."""
import http.client
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from openai import OpenAI

import test_pd as pd
from engine_harness import BIN, MODELS, ROOT, Server, free_port, http_get, offline_run

MIXED_FLAGS = ["--mode", "mixed", "--deterministic", "--disable-prefix-cache", "--chunked-prefill-size", "512"]
PROMPT_IDS = [0, 19923, 3787, 1030, 260, 5223, 16, 1391, 8421, 331, 1099, 3240, 12, 44]


def router_stubs():
    if "tandem.v1.router_pb2" in sys.modules:
        return sys.modules["tandem.v1.router_pb2"], sys.modules["tandem.v1.router_pb2_grpc"]
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="tandem-router-stubs-")
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(ROOT / "proto/tandem/v1/router.proto")]) == 0
    sys.path.insert(0, out)
    return importlib.import_module("tandem.v1.router_pb2"), importlib.import_module("tandem.v1.router_pb2_grpc")


class Router:
    """A tandem-router process in front of the given workers."""

    def __init__(self, args, name="router", wait=True):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log_path = Path(tempfile.mkdtemp(prefix="tandem-log-")) / f"{name}.log"
        self.log = open(self.log_path, "w")
        cmd = [str(BIN / "tandem-router"), "--model", str(MODELS / "tiny"), "--host", "127.0.0.1",
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--health-interval", "0.2",
               "--health-timeout", "0.5", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.http_port}/v1", api_key="unused", max_retries=0, timeout=120)

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"router exited:\n{self.log_path.read_text()}"
            try:
                if http_get(self.http_port, "/readiness", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"router not ready:\n{self.log_path.read_text()}")

    def post(self, path, body, headers=None):
        """Raw POST: (status, parsed JSON or text)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        connection.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        text = response.read().decode()
        connection.close()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    def metrics(self):
        status, body = http_get(self.http_port, "/metrics")
        assert status == 200
        return body

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def mixed():
    server = Server(args=MIXED_FLAGS, log_name="mixed")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair():
    p = pd.Pair()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def mixed_router(mixed):
    router = Router(["--mixed", f"127.0.0.1:{mixed.grpc_port}", "--max-prompt-tokens", "4096"], name="router-mixed")
    yield router
    assert router.stop() == 0


@pytest.fixture(scope="module")
def pd_router(pair):
    router = Router(["--prefill", f"127.0.0.1:{pair.prefill.grpc_port},{pair.bootstrap_port}",
                     "--decode", f"127.0.0.1:{pair.decode.grpc_port}"], name="router-pd")
    yield router
    assert router.stop() == 0


def chat(router, content="Hello there", **kwargs):
    return router.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                 **({"temperature": 0, "max_tokens": 8} | kwargs))


def test_health_readiness_models(mixed_router):
    assert http_get(mixed_router.http_port, "/health")[0] == 200
    status, body = http_get(mixed_router.http_port, "/readiness")
    assert status == 200 and json.loads(body)["status"] == "ready"
    models = mixed_router.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_non_streaming_with_usage(mixed_router):
    answer = chat(mixed_router, max_tokens=6, extra_body={"ignore_eos": True})
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and choice.message.content
    assert answer.usage.completion_tokens == 6 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 6


def test_streaming_chunk_order_usage_and_same_text(mixed_router):
    whole = chat(mixed_router, max_tokens=6, extra_body={"ignore_eos": True}).choices[0].message.content
    chunks = list(chat(mixed_router, max_tokens=6, stream=True, stream_options={"include_usage": True},
                       extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole


def test_completion_through_pd_equals_mixed_equals_offline(mixed_router, pd_router):
    from tokenizers import Tokenizer

    tokens = offline_run(PROMPT_IDS, 8)
    expected = Tokenizer.from_file(str(MODELS / "tiny" / "tokenizer.json")).decode(tokens, skip_special_tokens=False)
    for router in (mixed_router, pd_router):
        answer = router.client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=8, temperature=0,
                                                  extra_body={"ignore_eos": True, "skip_special_tokens": False})
        assert answer.choices[0].text == expected, router.log_path
        assert answer.usage.completion_tokens == 8 and answer.usage.prompt_tokens == len(PROMPT_IDS)
        streamed = router.client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=8, temperature=0, stream=True,
                                                    extra_body={"ignore_eos": True, "skip_special_tokens": False})
        assert "".join(c.choices[0].text for c in streamed) == expected


def test_chat_through_pd_equals_mixed(mixed_router, pd_router):
    for content in ("Hello there", "Write one line about the sea.", "毕老师好"):
        a = chat(mixed_router, content, max_tokens=10).choices[0].message.content
        b = chat(pd_router, content, max_tokens=10).choices[0].message.content
        assert a == b


def test_stop_strings_trim_and_report(mixed_router, pd_router):
    full = chat(mixed_router, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 8
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    for router in (mixed_router, pd_router):
        answer = chat(router, max_tokens=12, stop=[stop], extra_body={"ignore_eos": True})
        assert answer.choices[0].message.content == cut
        assert answer.choices[0].finish_reason == "stop"
        assert answer.model_extra["choices"][0]["matched_stop"] == stop if answer.model_extra.get("choices") else True
        streamed = chat(router, max_tokens=12, stop=stop, stream=True, extra_body={"ignore_eos": True})
        pieces = list(streamed)
        assert "".join(c.choices[0].delta.content or "" for c in pieces) == cut
        assert pieces[-1].choices[0].finish_reason == "stop"


def test_logprobs_when_asked(mixed_router):
    answer = chat(mixed_router, max_tokens=4, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = answer.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    # Greedy: the sampled token is the most likely one.
    assert all(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-4 for e in content)
    plain = chat(mixed_router, max_tokens=4, extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None


def test_reasoning_effort_max_and_thinking_are_accepted(mixed_router):
    answer = chat(mixed_router, max_tokens=4, reasoning_effort="max")
    message = answer.choices[0].message
    # The prompt ends with <think>: what the model writes is reasoning until it closes it.
    assert message.model_extra.get("reasoning_content") and message.content == ""
    answer = chat(mixed_router, max_tokens=4, extra_body={"chat_template_kwargs": {"thinking": False}})
    assert answer.choices[0].message.model_extra.get("reasoning_content") is None


BAD_REQUESTS = [
    # (path, body, status, type, param)
    ("/v1/chat/completions", "{not json", 400, "invalid_request_error", None),
    ("/v1/chat/completions", "[]", 400, "invalid_request_error", None),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "invalid_request_error", "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_request_error", "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "invalid_request_error", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request_error", "messages"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "invalid_request_error", "model"),
    ("/v1/chat/completions", {"model": 7, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error", "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "invalid_request_error", "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "invalid_request_error", "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "invalid_request_error", "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_k": 0}, 400, "invalid_request_error", "top_k"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10 ** 9}, 400, "invalid_request_error", "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}, 400, "invalid_request_error", "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "invalid_request_error", "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "invalid_request_error", "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": 5}, 400, "invalid_request_error", "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, 400, "invalid_request_error", "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "invalid_request_error", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "invalid_request_error", "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": True}, 400, "invalid_request_error", "reasoning_effort"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, 400, "invalid_request_error", "reasoning_effort"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "invalid_request_error", "tools[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400, "invalid_request_error", "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 5000}]}, 400, "invalid_request_error", "messages"),
    ("/v1/completions", {"prompt": ""}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"prompt": [1, -2]}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"prompt": [10 ** 9]}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {}, 400, "invalid_request_error", "prompt"),
    ("/v1/nothing", {}, 404, "invalid_request_error", None),
]


@pytest.mark.parametrize("path,body,status,kind,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(mixed_router, path, body, status, kind, param):
    got, answer = mixed_router.post(path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == kind and error["param"] == param, error


def test_oversize_body_is_413(mixed):
    router = Router(["--mixed", f"127.0.0.1:{mixed.grpc_port}", "--max-request-bytes", "2000"], name="router-small")
    try:
        status, answer = router.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 5000}]})
        assert status == 413 and answer["error"]["code"] == "request_too_large"
    finally:
        router.stop()


def test_api_keys_on_http_and_grpc(mixed, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# clients\nsecret-one\n")
    router = Router(["--mixed", f"127.0.0.1:{mixed.grpc_port}", "--api-key-file", str(keys)], name="router-keys")
    try:
        status, answer = router.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        status, _ = router.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
                                {"Authorization": "Bearer wrong"})
        assert status == 401
        status, answer = router.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
                                     {"Authorization": "Bearer secret-one"})
        assert status == 200, answer
        assert http_get(router.http_port, "/health")[0] == 200  # probes stay open
        rpb, rrpc = router_stubs()
        with grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}") as channel:
            stub = rrpc.RouterStub(channel)
            request = rpb.ChatCompletionRequest(messages=[rpb.ChatMessage(role="user", content="x")],
                                                sampling=rpb.Sampling(max_tokens=1))
            with pytest.raises(grpc.RpcError) as error:
                list(stub.ChatCompletion(request))
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            chunks = list(stub.ChatCompletion(request, metadata=[("authorization", "Bearer secret-one")]))
            assert chunks[-1].finish_reason in ("length", "stop")
    finally:
        router.stop()


def test_grpc_api_matches_http(mixed_router, pd_router):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rpb, rrpc = router_stubs()
    expected = chat(mixed_router, max_tokens=8, extra_body={"ignore_eos": True})
    for router in (mixed_router, pd_router):
        with grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = rrpc.RouterStub(channel)
            chunks = list(stub.ChatCompletion(rpb.ChatCompletionRequest(
                model="tiny", messages=[rpb.ChatMessage(role="user", content="Hello there")],
                sampling=rpb.Sampling(temperature=0, max_tokens=8, ignore_eos=True))))
            assert chunks[0].role == "assistant"
            assert "".join(c.content for c in chunks) == expected.choices[0].message.content
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8
            done = list(stub.Completion(rpb.CompletionRequest(prompt_ids=rpb.PromptIds(ids=PROMPT_IDS),
                                                              sampling=rpb.Sampling(temperature=0, max_tokens=3, ignore_eos=True))))
            assert done[-1].usage.completion_tokens == 3
            with pytest.raises(grpc.RpcError) as error:
                list(stub.ChatCompletion(rpb.ChatCompletionRequest(model="gpt-9", messages=[rpb.ChatMessage(role="user", content="x")])))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as error:
                list(stub.ChatCompletion(rpb.ChatCompletionRequest(messages=[rpb.ChatMessage(role="user", content="x")],
                                                                   sampling=rpb.Sampling(top_p=5))))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in error.value.details()


def test_client_disconnect_aborts_both_legs(pair, pd_router):
    connection = http.client.HTTPConnection("127.0.0.1", pd_router.http_port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": PROMPT_IDS, "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}),
        headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    assert pair.decode.loads().running_requests == 1
    connection.sock.close()
    connection.close()
    started = time.time()
    pair.expect_all_free()
    assert time.time() - started < 20


def test_grpc_cancel_aborts_both_legs(pair, pd_router):
    rpb, rrpc = router_stubs()
    with grpc.insecure_channel(f"127.0.0.1:{pd_router.grpc_port}") as channel:
        call = rrpc.RouterStub(channel).Completion(rpb.CompletionRequest(
            prompt_ids=rpb.PromptIds(ids=PROMPT_IDS), sampling=rpb.Sampling(max_tokens=3000, ignore_eos=True, temperature=0)))
        next(call)
        next(call)
        assert pair.decode.loads().running_requests == 1
        call.cancel()
    pair.expect_all_free()


def test_metrics_are_promtool_clean(mixed_router, pd_router):
    for router in (mixed_router, pd_router):
        text = router.metrics()
        for name in ("tandem_router_requests_total", "tandem_router_time_to_first_token_seconds_bucket",
                     "tandem_router_inter_token_latency_seconds_bucket", "tandem_router_e2e_request_latency_seconds_bucket",
                     "tandem_router_worker_health", "tandem_router_worker_cb_state", "tandem_router_worker_selections_total",
                     "tandem_router_retries_total"):
            assert name in text, name
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def worker_gauge(text, name, port):
    for line in text.splitlines():
        if line.startswith(name + "{") and f':{port}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for port {port} missing")


def test_killed_worker_opens_its_breaker_and_traffic_moves(mixed):
    doomed = Server(args=MIXED_FLAGS, log_name="mixed-doomed")
    router = Router(["--mixed", f"127.0.0.1:{mixed.grpc_port}", "--mixed", f"127.0.0.1:{doomed.grpc_port}",
                     "--mixed-policy", "round_robin", "--breaker-failure-threshold", "1", "--breaker-open-seconds", "60",
                     "--health-failure-threshold", "100"], name="router-failover")
    try:
        chat(router, max_tokens=2)
        doomed.proc.kill()
        doomed.proc.wait()
        # The health checks are told to tolerate it for a long while: the breaker must catch it.
        answers = [chat(router, f"question {i}", max_tokens=2) for i in range(6)]
        assert all(a.choices[0].finish_reason in ("length", "stop") for a in answers)
        text = router.metrics()
        assert worker_gauge(text, "tandem_router_worker_cb_state", doomed.grpc_port) == 1
        assert worker_gauge(text, "tandem_router_worker_cb_state", mixed.grpc_port) == 0
        retries = [l for l in text.splitlines() if l.startswith("tandem_router_retries_total")]
        assert float(retries[0].rsplit(" ", 1)[1]) >= 1
    finally:
        router.stop()
        doomed.stop()


def test_cache_aware_spreads_one_shared_prefix(mixed):
    other = Server(args=MIXED_FLAGS, log_name="mixed-other")
    router = Router(["--mixed", f"127.0.0.1:{mixed.grpc_port}", "--mixed", f"127.0.0.1:{other.grpc_port}",
                     "--mixed-policy", "cache_aware"], name="router-balance")
    try:
        def one(i):
            chat(router, "the same long shared prefix " * 4, max_tokens=24, extra_body={"ignore_eos": True})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        text = router.metrics()
        picks = [worker_gauge(text, "tandem_router_worker_selections_total", s.grpc_port) for s in (mixed, other)]
        # One shared prefix, yet cache affinity must not pile all eight on one worker.
        assert sum(picks) == 8 and min(picks) >= 2, picks
    finally:
        router.stop()
        other.stop()


def raw_stream(router, body, on_event=None):
    """POSTs a streaming request; returns (HTTP status, [event JSON...], saw [DONE])."""
    connection = http.client.HTTPConnection("127.0.0.1", router.http_port, timeout=120)
    connection.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        return response.status, [json.loads(response.read())], False
    events, done = [], False
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            events.append(json.loads(data))
            if on_event:
                on_event(events[-1])
    connection.close()
    return 200, events, done


def decode_on(ports, **kwargs):
    """A tandem-decode (--mode decode) on fixed ports (to restart it where the router expects it)."""
    import engine_harness

    chosen = iter(ports)
    original = engine_harness.free_port
    engine_harness.free_port = lambda: next(chosen)
    try:
        return Server(binary="tandem-decode", log_name="decode-2", args=["--mode", "decode", *pd.PD_FLAGS],
                      env={"UCX_TLS": "tcp"}, **kwargs)
    finally:
        engine_harness.free_port = original


def test_killed_decode_mid_stream_fails_clearly_retries_the_rest_and_rejoins(pair):
    ports = (free_port(), free_port())
    second = decode_on(ports)
    router = Router(["--prefill", f"127.0.0.1:{pair.prefill.grpc_port},{pair.bootstrap_port}",
                     "--decode", f"127.0.0.1:{pair.decode.grpc_port}", "--decode", f"127.0.0.1:{second.grpc_port}",
                     "--decode-policy", "round_robin", "--health-failure-threshold", "2",
                     "--breaker-open-seconds", "1"], name="router-failover-pd")
    try:
        results = [None] * 8
        started = set()

        def run(i):
            results[i] = raw_stream(router, {"prompt": PROMPT_IDS + [i + 3], "max_tokens": 120, "temperature": 0,
                                             "ignore_eos": True}, on_event=lambda e: started.add(i))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while len(started) < 8 and time.time() < deadline:  # all streaming: half of them on `second`
            time.sleep(0.02)
        assert second.loads().running_requests > 0
        second.proc.kill()
        second.proc.wait()
        # Requests arriving now may be sent to the dead worker first: retried before any byte went out.
        late = [router.client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=2, temperature=0)
                for _ in range(4)]
        assert all(a.choices[0].finish_reason in ("length", "stop") for a in late)
        for t in threads:
            t.join(120)
            assert not t.is_alive(), "a stream hung after its decode worker died"
        failed = [r for r in results if r[1] and r[1][-1].get("object") == "error"]
        finished = [r for r in results if r[1] and r[1][-1].get("choices") and r[1][-1]["choices"][0]["finish_reason"] == "length"]
        assert failed and len(failed) + len(finished) == 8, results
        for status, events, done in failed:
            assert status == 200 and done and events[-1]["message"] and events[-1]["type"], events[-1]
        # Marked unhealthy and skipped.
        deadline = time.time() + 10
        while worker_gauge(router.metrics(), "tandem_router_worker_health", second.grpc_port) != 0:
            assert time.time() < deadline
            time.sleep(0.05)
        for _ in range(4):
            assert router.client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=2).choices[0].text is not None
        pair.expect_all_free()
        # Restarted on the same ports, it rejoins and gets traffic again.
        before = worker_gauge(router.metrics(), "tandem_router_worker_selections_total", ports[0])
        second = decode_on(ports)
        deadline = time.time() + 20
        while worker_gauge(router.metrics(), "tandem_router_worker_health", ports[0]) != 1:
            assert time.time() < deadline
            time.sleep(0.05)
        for _ in range(4):
            router.client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=2)
        assert worker_gauge(router.metrics(), "tandem_router_worker_selections_total", ports[0]) > before
    finally:
        router.stop()
        second.stop()


def test_worker_file_is_reloaded(mixed, tmp_path):
    workers = tmp_path / "workers"
    workers.write_text(f"# the fleet\nmixed 127.0.0.1:{mixed.grpc_port}\n")
    router = Router(["--worker-file", str(workers)], name="router-file")
    try:
        assert chat(router, max_tokens=2).choices[0].finish_reason in ("length", "stop")

        def wait_readiness(code):
            deadline = time.time() + 10
            while http_get(router.http_port, "/readiness")[0] != code:
                assert time.time() < deadline, f"readiness never became {code}"
                time.sleep(0.05)

        time.sleep(0.05)  # a new modification time
        workers.write_text("# nobody\n")
        wait_readiness(503)
        status, answer = router.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
        assert status == 503 and answer["error"]["type"] == "service_unavailable"
        time.sleep(0.05)
        workers.write_text(f"mixed 127.0.0.1:{mixed.grpc_port}\n")
        wait_readiness(200)
        time.sleep(0.05)
        workers.write_text("mixed nonsense\n")  # refused, the fleet stays as it was
        time.sleep(1)
        assert http_get(router.http_port, "/readiness")[0] == 200
    finally:
        router.stop()
