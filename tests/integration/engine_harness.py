"""Starts real engine binaries on loopback and talks to them over gRPC (stubs generated at test time)."""
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("TANDEM_BIN", ROOT / "build" / "bin"))
MODELS = Path(os.environ.get("TANDEM_TEST_MODELS", ROOT / "build" / "test-models"))


def load_stubs():
    """Generates the Python stubs of proto/tandem/v1/engine.proto once per process."""
    if "tandem.v1.engine_pb2" in sys.modules:
        return sys.modules["tandem.v1.engine_pb2"], sys.modules["tandem.v1.engine_pb2_grpc"]
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="tandem-stubs-")
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}",
                      str(ROOT / "proto/tandem/v1/engine.proto")])
    assert rc == 0, "protoc failed on engine.proto"
    sys.path.insert(0, out)
    return importlib.import_module("tandem.v1.engine_pb2"), importlib.import_module("tandem.v1.engine_pb2_grpc")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=5):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    """A tandem-decode/tandem-prefill process on free loopback ports."""

    def __init__(self, binary="tandem-decode", model=None, args=(), log_name=None, env=None):
        import grpc

        self.pb, self.rpc = load_stubs()
        self.grpc_port, self.http_port = free_port(), free_port()
        model = model or MODELS / "tiny"
        self.log_path = Path(tempfile.mkdtemp(prefix="tandem-log-")) / f"{log_name or binary}.log"
        self.log = open(self.log_path, "w")
        cmd = [str(BIN / binary), "--model", str(model), "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
               "--http-port", str(self.http_port), "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ | (env or {}))
        self.wait_ready()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.stub = self.rpc.EngineStub(self.channel)

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if http_get(self.http_port, "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_text()}")

    def log_text(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def generate(self, ids, max_new_tokens=16, timeout=600, **sampling):
        """Runs one request to its end: (token ids, complete message)."""
        request = self.pb.GenerateRequest(input_ids=ids, sampling=self.pb.SamplingParams(
            max_new_tokens=max_new_tokens, **({"temperature": 0.0} | sampling)))
        tokens, complete = [], None
        for response in self.stub.Generate(request, timeout=timeout):
            if response.HasField("chunk"):
                tokens += list(response.chunk.token_ids)
            else:
                complete = response.complete
        assert complete is not None, "stream ended without a complete message"
        return tokens, complete

    def metrics(self):
        status, body = http_get(self.http_port, "/metrics")
        assert status == 200
        return body

    def loads(self):
        return self.stub.GetLoads(self.pb.GetLoadsRequest())

    def wait_idle(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            loads = self.loads()
            if loads.running_requests == 0 and loads.waiting_requests == 0:
                return loads
            time.sleep(0.05)
        raise AssertionError(f"engine not idle after {timeout} s: {self.loads()}")

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.channel.close()
        self.log.close()
        return self.proc.returncode


def offline_run(ids, max_new_tokens, *extra):
    """Greedy tokens from `tandem-model run` (the offline forward)."""
    out = subprocess.run([str(BIN / "tandem-model"), "run", str(MODELS / "tiny"), "--prompt-ids", ",".join(map(str, ids)),
                          "--max-new-tokens", str(max_new_tokens), "--threads", "1", *extra],
                         capture_output=True, text=True, check=True)
    return [int(t) for t in out.stdout.split()]
