"""Prefill/decode disaggregation: real tandem-prefill and tandem-decode processes moving KV over UCX."""
import os
import random
import shutil
import signal
import threading
import time

import grpc
import pytest

from engine_harness import MODELS, Server, free_port, load_stubs

pb, rpc = load_stubs()
# The late-write grace stays above the peer lease, as in production, but short enough for the tests to wait out.
LATE_WRITE_GRACE = 3
PD_FLAGS = ["--deterministic", "--disable-prefix-cache", "--peer-lease", "2", "--heartbeat-interval", "0.5",
            "--room-lease", "300", "--chunked-prefill-size", "512", "--pd-late-write-grace", str(LATE_WRITE_GRACE)]
_rooms = iter(range(1, 1 << 62))


def new_room():
    # Rooms use all 64 bits.
    return (0x8000000000000000 | next(_rooms) << 8 | random.getrandbits(8))


def prompt(length, seed):
    rng = random.Random(seed)
    return [rng.randrange(2, 129280) for _ in range(length)]


class Pair:
    """One tandem-prefill and one tandem-decode on loopback."""

    def __init__(self, transport="tcp", prefill_env=None, prefill_model=None, decode_args=(), prefill_args=()):
        env = {"UCX_TLS": transport}
        self.bootstrap_port = free_port()
        self.prefill = Server(binary="tandem-prefill", model=prefill_model, log_name="prefill",
                              args=["--bootstrap-port", str(self.bootstrap_port), *PD_FLAGS, *prefill_args],
                              env=env | (prefill_env or {}))
        self.decode = Server(binary="tandem-decode", log_name="decode", args=["--mode", "decode", *PD_FLAGS, *decode_args],
                             env=env)
        self.initial = {"prefill": pools(self.prefill), "decode": pools(self.decode)}

    def legs(self, ids, room=None, max_new_tokens=8, timeout=120, bootstrap_port=None, **sampling):
        """Both legs at once, as the router sends them: {"prefill": result, "decode": result}."""
        room = room or new_room()
        out = {}

        def run(name, server, role, host="", port=0):
            request = pb.GenerateRequest(input_ids=ids, sampling=pb.SamplingParams(
                max_new_tokens=max_new_tokens, **({"temperature": 0.0} | sampling)),
                disaggregation=pb.DisaggregationParams(role=role, room=room, bootstrap_host=host, bootstrap_port=port))
            try:
                tokens, complete = [], None
                for response in server.stub.Generate(request, timeout=timeout):
                    if response.HasField("chunk"):
                        tokens += list(response.chunk.token_ids)
                    else:
                        complete = response.complete
                out[name] = (tokens, complete)
            except grpc.RpcError as error:
                out[name] = error

        threads = [threading.Thread(target=run, args=("prefill", self.prefill, pb.ROLE_PREFILL)),
                   threading.Thread(target=run, args=("decode", self.decode, pb.ROLE_DECODE, "127.0.0.1",
                                                      bootstrap_port or self.bootstrap_port))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def expect_all_free(self, *sides):
        # A failed transfer's decode pages come back after prefill's abort ack, or after the late-write grace.
        for side in sides or ("prefill", "decode"):
            server = getattr(self, side)
            server.wait_idle()
            deadline = time.time() + LATE_WRITE_GRACE + 10
            while pools(server) != self.initial[side] and time.time() < deadline:
                time.sleep(0.05)
            assert pools(server) == self.initial[side], f"{side} did not get every page back"

    def stop(self):
        codes = [s.stop() for s in (self.prefill, self.decode)]
        return codes


def pools(server):
    return {p.name: p.free for p in server.loads().pools}


def quarantined_pages(server):
    for line in server.metrics().splitlines():
        if line.startswith("tandem_kv_quarantined_pages{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no tandem_kv_quarantined_pages in /metrics")


def code_of(result):
    return result.code() if isinstance(result, grpc.RpcError) else grpc.StatusCode.OK


@pytest.fixture(scope="module")
def mixed():
    server = Server(args=["--mode", "mixed", "--deterministic", "--disable-prefix-cache", "--chunked-prefill-size", "512"],
                    log_name="mixed")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair():
    p = Pair()
    yield p
    p.stop()


def test_64_concurrent_requests_equal_the_mixed_engine(pair, mixed):
    lengths = [1, 2, 3, 4, 5, 7, 8, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300, 511, 512, 513, 1000, 2000]
    rng = random.Random(7)
    lengths += [rng.randint(1, 64) for _ in range(64 - len(lengths))]
    jobs = [(prompt(n, 100 + i), rng.randint(1, 8)) for i, n in enumerate(lengths)]
    fleet, reference = [None] * len(jobs), [None] * len(jobs)

    def run_pd(i):
        fleet[i] = pair.legs(jobs[i][0], max_new_tokens=jobs[i][1], ignore_eos=True)

    def run_mixed(i):
        reference[i] = mixed.generate(jobs[i][0], max_new_tokens=jobs[i][1], ignore_eos=True)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(len(jobs)) for f in (run_pd, run_mixed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (ids, new) in enumerate(jobs):
        legs = fleet[i]
        assert code_of(legs["decode"]) == grpc.StatusCode.OK, (i, legs["decode"])
        assert code_of(legs["prefill"]) == grpc.StatusCode.OK, (i, legs["prefill"])
        tokens, complete = legs["decode"]
        assert tokens == reference[i][0], f"request {i}: prompt {len(ids)}, {new} new tokens"
        assert complete.prompt_tokens == len(ids)
        ptokens, pcomplete = legs["prefill"]
        assert pcomplete.finish_reason == pb.FINISH_REASON_TRANSFERRED and ptokens == tokens[:1]
    pair.expect_all_free()
    metrics = pair.decode.metrics()
    assert "tandem_kv_transfer_bytes_total" in metrics and "tandem_kv_transfer_latency_seconds_count" in metrics


def test_shared_memory_transport_gives_the_same_tokens(mixed):
    shm = Pair(transport="posix,sysv,cma,self")
    try:
        ids = prompt(700, 5)
        legs = shm.legs(ids, max_new_tokens=6, ignore_eos=True)
        assert legs["decode"][0] == mixed.generate(ids, max_new_tokens=6, ignore_eos=True)[0]
        shm.expect_all_free()
    finally:
        shm.stop()


def test_staged_pools_give_the_same_tokens_and_catch_corruption(mixed):
    # The path of a GPU engine: the live pools apart from the transport's memory, each chunk copied into
    # the registered host copy before its puts, and into the live pools when the state has landed.
    room = new_room()
    staged = Pair(prefill_env={"TANDEM_TEST_CORRUPT_ROOM": str(room)}, prefill_args=["--test-staged-pools"],
                  decode_args=["--test-staged-pools"])
    try:
        for length, seed in ((1, 11), (300, 12), (700, 13)):
            ids = prompt(length, seed)
            legs = staged.legs(ids, max_new_tokens=6, ignore_eos=True)
            assert legs["decode"][0] == mixed.generate(ids, max_new_tokens=6, ignore_eos=True)[0], length
        bad = staged.legs(prompt(300, 14), room=room)
        assert code_of(bad["decode"]) == grpc.StatusCode.DATA_LOSS, bad["decode"]
        staged.expect_all_free()
    finally:
        staged.stop()


def test_corrupted_transfer_fails_that_request_only(mixed):
    room = new_room()
    bad = Pair(prefill_env={"TANDEM_TEST_CORRUPT_ROOM": str(room)})
    try:
        legs = bad.legs(prompt(300, 6), room=room)
        assert code_of(legs["decode"]) == grpc.StatusCode.DATA_LOSS, legs["decode"]
        assert "checksum" in legs["decode"].details()
        assert code_of(legs["prefill"]) != grpc.StatusCode.OK
        ids = prompt(200, 7)
        good = bad.legs(ids, max_new_tokens=4, ignore_eos=True)
        assert good["decode"][0] == mixed.generate(ids, max_new_tokens=4, ignore_eos=True)[0]
        bad.expect_all_free()
    finally:
        bad.stop()


def test_client_abort_on_either_leg_reaches_the_other(pair):
    for cancelled in ("decode", "prefill"):
        room = new_room()
        ids = prompt(1500, 8)
        streams = {
            "prefill": pair.prefill.stub.Generate(pb.GenerateRequest(
                input_ids=ids, sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=50),
                disaggregation=pb.DisaggregationParams(role=pb.ROLE_PREFILL, room=room))),
            "decode": pair.decode.stub.Generate(pb.GenerateRequest(
                input_ids=ids, sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=50),
                disaggregation=pb.DisaggregationParams(role=pb.ROLE_DECODE, room=room, bootstrap_host="127.0.0.1",
                                                       bootstrap_port=pair.bootstrap_port)))}
        deadline = time.time() + 30
        while pair.prefill.loads().running_requests == 0 and time.time() < deadline:
            time.sleep(0.01)
        streams[cancelled].cancel()
        other = "prefill" if cancelled == "decode" else "decode"
        with pytest.raises(grpc.RpcError) as error:
            list(streams[other])
        assert error.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED), error.value
        assert "cancel" in error.value.details() or "abort" in error.value.details(), error.value.details()
        pair.expect_all_free()


def test_unknown_rooms_are_refused_and_a_lonely_prefill_leg_times_out(pair):
    # A decode leg whose room never arrived at prefill (forged or lost): refused, not kept.
    request = pb.GenerateRequest(input_ids=prompt(50, 9), sampling=pb.SamplingParams(max_new_tokens=4),
                                 disaggregation=pb.DisaggregationParams(role=pb.ROLE_DECODE, room=new_room(),
                                                                        bootstrap_host="127.0.0.1",
                                                                        bootstrap_port=pair.bootstrap_port))
    start = time.time()
    with pytest.raises(grpc.RpcError) as error:
        list(pair.decode.stub.Generate(request, timeout=60))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND, error.value
    assert time.time() - start < 15
    # A decode leg for a bootstrap port nobody listens on.
    request.disaggregation.bootstrap_port = free_port()
    with pytest.raises(grpc.RpcError) as error:
        list(pair.decode.stub.Generate(request, timeout=60))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value
    pair.expect_all_free()


def test_peer_with_another_config_is_refused_at_handshake(tmp_path):
    other = tmp_path / "tiny-other"
    other.mkdir()
    for f in (MODELS / "tiny").iterdir():
        if f.name != "config.json":
            os.symlink(f, other / f.name)
    text = (MODELS / "tiny" / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 2e-06')
    assert text != (MODELS / "tiny" / "config.json").read_text(), "config.json layout changed; update the test"
    (other / "config.json").write_text(text)
    mismatched = Pair(prefill_model=other)
    try:
        legs = mismatched.legs(prompt(20, 10))
        assert code_of(legs["decode"]) == grpc.StatusCode.FAILED_PRECONDITION, legs["decode"]
        assert "model" in legs["decode"].details()
        mismatched.expect_all_free()
    finally:
        mismatched.stop()


def start_legs_and_wait_for_prefill(pair, ids, **kwargs):
    """Both legs on a thread; returns (thread, results) once prefill is running the prompt."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(pair.legs(ids, **kwargs)))
    thread.start()
    deadline = time.time() + 30
    while pair.prefill.loads().running_requests == 0 and time.time() < deadline:
        time.sleep(0.01)
    return thread, out


def join_legs(thread):
    thread.join(60)
    assert not thread.is_alive(), "a leg hung after its peer or connection went away"


def test_kill_decode_during_transfer_frees_prefill():
    victim = Pair()
    try:
        thread, out = start_legs_and_wait_for_prefill(victim, prompt(2000, 11), max_new_tokens=4)
        victim.decode.proc.send_signal(signal.SIGKILL)
        join_legs(thread)
        assert code_of(out["prefill"]) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), out["prefill"]
        victim.expect_all_free("prefill")
    finally:
        victim.stop()


def test_kill_prefill_mid_prompt_frees_decode():
    victim = Pair()
    try:
        thread, out = start_legs_and_wait_for_prefill(victim, prompt(2000, 12), max_new_tokens=4)
        victim.prefill.proc.send_signal(signal.SIGKILL)
        join_legs(thread)
        assert code_of(out["decode"]) == grpc.StatusCode.UNAVAILABLE, out["decode"]
        victim.expect_all_free("decode")
    finally:
        victim.stop()


class TcpProxy:
    """Forwards one port to another until `drop()` closes every connection through it."""

    def __init__(self, target_port):
        import socket

        self.target_port = target_port
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.connections = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def drop(self):
        import socket

        self.closed = True
        for s in self.connections + [self.server]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_dropped_bootstrap_connection_fails_both_legs_and_frees_pages():
    pair = Pair()
    try:
        proxy = TcpProxy(pair.bootstrap_port)
        thread, out = start_legs_and_wait_for_prefill(pair, prompt(2000, 13), max_new_tokens=4,
                                                      bootstrap_port=proxy.port)
        # Drop once decode has registered its destination too (it then waits for the state).
        deadline = time.time() + 30
        while time.time() < deadline and \
                "tandem_num_decode_transfer_queue_reqs{model_name=\"tiny\",role=\"decode\"} 1" not in pair.decode.metrics():
            time.sleep(0.01)
        proxy.drop()
        # The request fails at once; prefill may still have been writing its pages, so decode holds them back
        # for the grace, then gives them back. Watched from the drop on: the hold is only LATE_WRITE_GRACE long,
        # and on a loaded machine the prefill leg may take longer than that to finish.
        held = False
        deadline = time.time() + LATE_WRITE_GRACE
        while not held and time.time() < deadline:
            held = quarantined_pages(pair.decode) > 0
            time.sleep(0.01)
        join_legs(thread)
        assert code_of(out["decode"]) == grpc.StatusCode.UNAVAILABLE, out["decode"]
        assert code_of(out["prefill"]) == grpc.StatusCode.UNAVAILABLE, out["prefill"]
        assert held, "decode never held the failed transfer's pages back"
        pair.expect_all_free()
        assert quarantined_pages(pair.decode) == 0
    finally:
        pair.stop()
