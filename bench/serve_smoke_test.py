"""Smoke test of `tandem-bench serve` against a real `tandem-decode --mode mixed` on the tiny model.

Usage: serve_smoke_test.py TANDEM_BENCH TANDEM_DECODE MODEL_DIR OUT_DIR

Picks two free ports (tandem-decode does not report a port 0 back), starts the server, waits for
GET /health to answer 200, runs a two-level sweep, checks serve.csv's columns and rows (never its
timings), then stops the server with SIGTERM and expects a clean exit.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

COLUMNS = ("concurrency,requests,completed,errors,wall_s,request_throughput,output_tokens_per_s,mean_prompt_tokens,"
           "mean_output_tokens,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,itl_p50_ms,itl_p90_ms,itl_p99_ms,e2e_p50_ms,"
           "e2e_p99_ms,error_summary").split(",")
START_TIMEOUT_S = 120


def free_port():
    # Bound and released: another process could take it in between, so a failed start is retried.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(http_port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_server(decode, model, log):
    """Returns (process, grpc_port) once /health says 200; None when the process exited first."""
    grpc_port, http_port = free_port(), free_port()
    server = subprocess.Popen([decode, "--mode", "mixed", "--model", model, "--host", "127.0.0.1",
                               "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--threads", "1",
                               "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return None
        if healthy(http_port):
            return server, grpc_port
        time.sleep(0.2)
    server.kill()
    server.wait()
    sys.exit(f"serve_smoke_test: tandem-decode did not get healthy within {START_TIMEOUT_S} s")


def stop(server):
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        return None


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    bench, decode, model, out = sys.argv[1:]
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "tandem-decode.log")
    with open(log_path, "w") as log:
        started = None
        for _ in range(3):
            started = start_server(decode, model, log)
            if started:
                break
        if not started:
            sys.exit(f"serve_smoke_test: tandem-decode exited before it got healthy; see {log_path}")
        server, grpc_port = started
        try:
            run = subprocess.run([bench, "serve", "--target", f"127.0.0.1:{grpc_port}", "--concurrency", "1,2",
                                  "--requests", "4", "--max-new-tokens", "4", "--prompt-len", "8..40", "--ignore-eos",
                                  "--no-plot", "--out", out], capture_output=True, text=True, timeout=240)
        finally:
            server_status = stop(server)
    print(run.stdout)
    print(run.stderr, file=sys.stderr)
    failures = []
    if run.returncode != 0:
        failures.append(f"tandem-bench serve exited with {run.returncode}")
    csv_path = os.path.join(out, "serve.csv")
    if not os.path.exists(csv_path):
        failures.append(f"{csv_path} was not written")
    else:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            if reader.fieldnames != COLUMNS:
                failures.append(f"serve.csv columns are {reader.fieldnames}, want {COLUMNS}")
        if [r.get("concurrency") for r in rows] != ["1", "2"]:
            failures.append(f"serve.csv rows are for concurrency {[r.get('concurrency') for r in rows]}, want 1 and 2")
        for r in rows:
            if (r.get("requests"), r.get("completed"), r.get("errors")) != ("4", "4", "0"):
                failures.append(f"concurrency {r.get('concurrency')}: requests/completed/errors "
                                f"{r.get('requests')}/{r.get('completed')}/{r.get('errors')}, want 4/4/0 "
                                f"({r.get('error_summary')})")
            if r.get("mean_output_tokens") != "4":
                failures.append(f"concurrency {r.get('concurrency')}: mean_output_tokens {r.get('mean_output_tokens')}, "
                                "want 4 (ignore_eos)")
    if server_status != 0:
        failures.append(f"tandem-decode exited with {server_status} after SIGTERM (see {log_path})")
    if failures:
        sys.exit("serve_smoke_test: " + "; ".join(failures))
    print("serve_smoke_test: ok")


if __name__ == "__main__":
    main()
