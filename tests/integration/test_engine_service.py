"""The monolithic engine (tandem-decode --mode mixed) served over real gRPC on loopback."""
import random
import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest

from engine_harness import BIN, MODELS, Server, free_port, http_get, load_stubs, offline_run

pb, rpc = load_stubs()
EOS = 1


def prompt(length, seed):
    rng = random.Random(seed)
    return [rng.randrange(2, 129280) for _ in range(length)]


def visible(offline_tokens):
    """The offline run prints the eos it stopped on; the engine does not stream stop tokens."""
    return offline_tokens[:-1] if offline_tokens and offline_tokens[-1] == EOS else offline_tokens


@pytest.fixture(scope="module")
def engine():
    """Deterministic mixed engine with the prefix cache on."""
    server = Server(args=["--mode", "mixed", "--deterministic", "--chunked-prefill-size", "1024"], log_name="engine")
    yield server
    assert server.stop() == 0, server.log_text()


@pytest.fixture(scope="module")
def small_engine():
    """Deterministic mixed engine, prefix cache off, pools far smaller than the work sent to it."""
    server = Server(args=["--mode", "mixed", "--deterministic", "--disable-prefix-cache", "--cache-budget-mb", "12",
                          "--max-running-requests", "8", "--chunked-prefill-size", "256"], log_name="small-engine")
    yield server
    assert server.stop() == 0, server.log_text()


def pool_free(loads):
    return {p.name: p.free for p in loads.pools}


def test_served_tokens_equal_offline_greedy(engine):
    for length, new in [(14, 16), (300, 12), (700, 8)]:
        ids = prompt(length, seed=length)
        tokens, complete = engine.generate(ids, max_new_tokens=new)
        assert tokens == visible(offline_run(ids, new, "--deterministic")), f"prompt of {length} tokens"
        assert complete.prompt_tokens == length
        assert complete.completion_tokens == new or complete.finish_reason == pb.FINISH_REASON_STOP


def test_non_deterministic_engine_matches_offline_on_single_requests():
    server = Server(args=["--mode", "mixed", "--disable-prefix-cache"], log_name="plain-engine")
    try:
        for length in (5, 120):
            ids = prompt(length, seed=1000 + length)
            tokens, _ = server.generate(ids, max_new_tokens=10)
            assert tokens == visible(offline_run(ids, 10))
    finally:
        assert server.stop() == 0


def test_64_concurrent_streams_equal_their_solo_runs(engine):
    rng = random.Random(64)
    lengths = [1, 2, 3, 5, 8, 13, 1200, 900, 600, 300, 257, 255, 129, 127, 65] + [rng.randint(1, 100) for _ in range(49)]
    jobs = [(prompt(n, seed=5000 + i), rng.randint(1, 64)) for i, n in enumerate(lengths)]
    results = [None] * len(jobs)
    errors = []

    def run(i):
        try:
            results[i] = engine.generate(jobs[i][0], max_new_tokens=jobs[i][1], ignore_eos=True)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (ids, new) in enumerate(jobs):
        tokens, complete = results[i]
        assert len(tokens) == new and complete.finish_reason == pb.FINISH_REASON_LENGTH
    # Solo, one at a time: bit-for-bit the same tokens whatever shared the batch before.
    for i, (ids, new) in enumerate(jobs):
        solo, _ = engine.generate(ids, max_new_tokens=new, ignore_eos=True)
        assert solo == results[i][0], f"stream {i} (prompt {len(ids)}, {new} new) differs from its solo run"


def test_prefix_cache_reuses_pages_and_keeps_tokens(engine, small_engine):
    shared = prompt(600, seed=77)
    first, c1 = engine.generate(shared + prompt(20, seed=78), max_new_tokens=8)
    ids = shared + prompt(30, seed=79)
    second, c2 = engine.generate(ids, max_new_tokens=8)
    assert c2.cached_tokens == 512, "the 600-token prefix should be reused up to its last page boundary"
    assert engine.loads().prefix_cached_tokens >= 512
    uncached, c3 = small_engine.generate(ids, max_new_tokens=8)
    assert c3.cached_tokens == 0
    assert second == uncached


def test_pressure_more_work_than_pages(small_engine):
    info = small_engine.stub.GetModelInfo(pb.GetModelInfoRequest())
    initial = pool_free(small_engine.wait_idle())
    jobs = [(prompt(200 + 37 * i, seed=900 + i), 48) for i in range(12)]
    total = sum(len(ids) + new for ids, new in jobs)
    assert total > info.max_context_tokens, "the test must ask for more than the pools hold"
    results = [None] * len(jobs)

    def run(i):
        results[i] = small_engine.generate(jobs[i][0], max_new_tokens=jobs[i][1], ignore_eos=True)

    seen_waiting = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen_waiting.append(small_engine.loads().waiting_requests)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    retractions_before = small_engine.loads().total_retractions
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert all(r is not None for r in results)
    # More work than pages: requests had to queue (and, once decoding outgrew the pages, be retracted).
    assert max(seen_waiting) > 0
    retracted = sum(r[1].retractions for r in results)
    assert small_engine.loads().total_retractions - retractions_before == retracted
    print(f"pressure: max waiting {max(seen_waiting)}, retractions {retracted}")
    for i, (ids, new) in enumerate(jobs):
        solo, _ = small_engine.generate(ids, max_new_tokens=new, ignore_eos=True)
        assert results[i][0] == solo, f"request {i} changed under pressure"
    assert pool_free(small_engine.wait_idle()) == initial


def test_pages_return_after_complete_abort_and_cancel(small_engine):
    initial = pool_free(small_engine.wait_idle())
    # Completes.
    small_engine.generate(prompt(300, seed=1), max_new_tokens=4)
    # Aborted mid-prefill: 1200 tokens at 256 per step take several steps.
    long_request = pb.GenerateRequest(request_id="abort-prefill", input_ids=prompt(1200, seed=2),
                                      sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=8))
    stream = small_engine.stub.Generate(long_request)
    deadline = time.time() + 30
    while small_engine.loads().running_requests == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert small_engine.stub.Abort(pb.AbortRequest(request_id="abort-prefill")).found
    with pytest.raises(grpc.RpcError) as aborted:
        list(stream)
    assert aborted.value.code() == grpc.StatusCode.ABORTED
    # Aborted mid-decode, after its first tokens arrived.
    decode_request = pb.GenerateRequest(request_id="abort-decode", input_ids=prompt(50, seed=3),
                                        sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=200, ignore_eos=True))
    stream = small_engine.stub.Generate(decode_request)
    first = next(stream)
    assert first.HasField("chunk") and len(first.chunk.token_ids) > 0
    assert small_engine.stub.Abort(pb.AbortRequest(request_id="abort-decode")).found
    with pytest.raises(grpc.RpcError) as aborted:
        list(stream)
    assert aborted.value.code() == grpc.StatusCode.ABORTED
    # The client cancels its call mid-decode.
    cancel_request = pb.GenerateRequest(request_id="client-cancel", input_ids=prompt(40, seed=4),
                                        sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=200, ignore_eos=True))
    stream = small_engine.stub.Generate(cancel_request)
    next(stream)
    stream.cancel()
    assert pool_free(small_engine.wait_idle()) == initial
    assert not small_engine.stub.Abort(pb.AbortRequest(request_id="client-cancel")).found


@pytest.mark.parametrize("ids,sampling,message", [
    ([], {}, "input_ids is empty"),
    ([5, 129280], {}, "input_ids[1] = 129280 is outside the vocabulary"),
    ([5, -3], {}, "input_ids[1] = -3"),
    ([5], {"max_new_tokens": 0}, "max_new_tokens"),
    ([5], {"max_new_tokens": 10**12}, "max_new_tokens"),
    ([5], {"temperature": -0.5}, "temperature"),
    ([5], {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ([5], {"top_p": 0.0}, "top_p must be in (0, 1]"),
    (list(range(2, 40002)), {"max_new_tokens": 1}, "exceeds the engine's maximum context"),
])
def test_bad_input_is_invalid_argument_and_serving_goes_on(small_engine, ids, sampling, message):
    request = pb.GenerateRequest(input_ids=ids, sampling=pb.SamplingParams(**sampling))
    with pytest.raises(grpc.RpcError) as error:
        list(small_engine.stub.Generate(request))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    tokens, _ = small_engine.generate([5, 6, 7], max_new_tokens=2)
    assert len(tokens) >= 1


def test_duplicate_live_request_id_is_refused(small_engine):
    request = pb.GenerateRequest(request_id="twice", input_ids=prompt(30, seed=9),
                                 sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=100, ignore_eos=True))
    stream = small_engine.stub.Generate(request)
    next(stream)
    with pytest.raises(grpc.RpcError) as error:
        list(small_engine.stub.Generate(request))
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    stream.cancel()
    small_engine.wait_idle()


def test_logprobs_are_log_probabilities(small_engine):
    request = pb.GenerateRequest(input_ids=prompt(20, seed=11), return_logprobs=True, top_logprobs=3,
                                 sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    chunks = [r.chunk for r in small_engine.stub.Generate(request) if r.HasField("chunk")]
    entries = [lp for c in chunks for lp in c.logprobs]
    tokens = [t for c in chunks for t in c.token_ids]
    assert [e.token_id for e in entries] == tokens
    for e in entries:
        assert e.logprob <= 0 and len(e.top) == 3
        assert e.top[0].token_id == e.token_id  # greedy picks the most likely token
        assert e.top[0].logprob >= e.top[1].logprob >= e.top[2].logprob


def test_health_metrics_and_promtool(small_engine):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(small_engine.channel)
    for service in ("", "tandem.v1.Engine"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    assert http_get(small_engine.http_port, "/health")[0] == 200
    small_engine.generate(prompt(10, seed=12), max_new_tokens=3)
    status, body = http_get(small_engine.http_port, "/metrics")
    assert status == 200
    for name in ("tandem_time_to_first_token_seconds_bucket", "tandem_inter_token_latency_seconds_bucket",
                 "tandem_e2e_request_latency_seconds_count", "tandem_num_running_reqs", "tandem_token_usage",
                 "tandem_generation_tokens_total", 'pool="c4_kv"'):
        assert name in body, name
    assert 'model_name="tiny"' in body and 'role="mixed"' in body
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not installed (apt package prometheus; tools/scripts/install-deps.sh installs it)")
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_sigterm_drains_running_requests_then_exits_zero():
    server = Server(args=["--mode", "mixed", "--drain-timeout", "60"], log_name="drain-engine")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel)
    request = pb.GenerateRequest(input_ids=prompt(20, seed=13),
                                 sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True))
    stream = server.stub.Generate(request)
    first = next(stream)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    while http_get(server.http_port, "/health")[0] != 503 and time.time() < deadline:
        time.sleep(0.01)
    assert http_get(server.http_port, "/health")[0] == 503
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.NOT_SERVING
    rest = list(stream)
    tokens = list(first.chunk.token_ids) + [t for r in rest if r.HasField("chunk") for t in r.chunk.token_ids]
    assert len(tokens) == 40 and rest[-1].HasField("complete")
    assert server.proc.wait(30) == 0
    server.stop()


def test_prefill_service_needs_a_room_and_refuses_other_roles():
    server = Server(binary="tandem-prefill", log_name="prefill", args=["--bootstrap-port", str(free_port())])
    try:
        assert server.stub.GetModelInfo(pb.GetModelInfoRequest()).role == pb.ROLE_PREFILL
        with pytest.raises(grpc.RpcError) as error:
            list(server.stub.Generate(pb.GenerateRequest(input_ids=[5, 6], sampling=pb.SamplingParams(max_new_tokens=1))))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "disaggregation.room is missing" in error.value.details()
        mixed = pb.GenerateRequest(input_ids=[5, 6], sampling=pb.SamplingParams(max_new_tokens=1),
                                   disaggregation=pb.DisaggregationParams(role=pb.ROLE_MIXED))
        with pytest.raises(grpc.RpcError) as error:
            list(server.stub.Generate(mixed))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "serves the ROLE_PREFILL role" in error.value.details()
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "Directory does not exist"),
    (["--model", str(MODELS / "tiny"), "--page-size", "100"], "--page-size must be a positive multiple of 128"),
    (["--model", str(MODELS / "tiny"), "--top-secret-flag"], "top-secret-flag"),
])
def test_bad_flags_exit_non_zero_with_a_clear_message(args, message):
    out = subprocess.run([str(BIN / "tandem-decode"), "--http-port", "0", "--grpc-port", "0", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr
