"""TTFT of a disaggregated pair (tandem-prefill + tandem-decode over UCX) vs the mixed engine on one model.

Sequential requests (no queueing), random prompts (no prefix-cache hits), one output token each, so TTFT is
prefill + hand-over. The hand-over time comes from the prefill engine's transfer histogram (first put to COMPLETE); the
remainder (TTFT_pd - TTFT_mixed - transfer) is the disaggregation overhead. Writes CSV + PNG.

  .venv/bin/python bench/pd/ttft.py --out bench/results/pd-ttft-tiny-cpu [--lengths 64,256,1024,2000] [--repeat 5]
"""
import argparse
import csv
import re
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from engine_harness import Server, free_port, load_stubs  # noqa: E402

pb, _ = load_stubs()
FLAGS = ["--disable-prefix-cache"]  # the harness runs every engine with --threads 1


def histogram_sum_count(metrics, name):
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "_sum"):
            total = float(line.split()[-1])
        elif line.startswith(name + "_count"):
            count = float(line.split()[-1])
    return total, count


def mixed_ttft(server, ids):
    request = pb.GenerateRequest(input_ids=ids, sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=1))
    start = time.perf_counter()
    for response in server.stub.Generate(request):
        if response.HasField("chunk") and response.chunk.token_ids:
            return time.perf_counter() - start
    raise RuntimeError("no token")


def pd_ttft(prefill, decode, bootstrap_port, ids, room):
    def prefill_leg():
        request = pb.GenerateRequest(input_ids=ids, sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=1),
                                     disaggregation=pb.DisaggregationParams(role=pb.ROLE_PREFILL, room=room))
        list(prefill.stub.Generate(request))

    thread = threading.Thread(target=prefill_leg)
    request = pb.GenerateRequest(input_ids=ids, sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=1),
                                 disaggregation=pb.DisaggregationParams(role=pb.ROLE_DECODE, room=room,
                                                                        bootstrap_host="127.0.0.1",
                                                                        bootstrap_port=bootstrap_port))
    start = time.perf_counter()
    thread.start()
    ttft = None
    for response in decode.stub.Generate(request):
        if ttft is None and response.HasField("chunk") and response.chunk.token_ids:
            ttft = time.perf_counter() - start
    thread.join()
    return ttft


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pd-ttft-tiny-cpu"))
    parser.add_argument("--lengths", default="64,256,1024,2000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import random
    rng = random.Random(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    mixed = Server(args=["--mode", "mixed", *FLAGS], log_name="bench-mixed")
    rows = []
    try:
        for transport in ["tcp", "posix,sysv,cma,self"]:
            bootstrap = free_port()
            env = {"UCX_TLS": transport}
            prefill = Server(binary="tandem-prefill", args=["--bootstrap-port", str(bootstrap), *FLAGS], env=env,
                             log_name="bench-prefill")
            decode = Server(binary="tandem-decode", args=["--mode", "decode", *FLAGS], env=env, log_name="bench-decode")
            try:
                warm = [rng.randrange(2, 129000) for _ in range(8)]
                pd_ttft(prefill, decode, bootstrap, warm, rng.getrandbits(63) + 1)
                for n in lengths:
                    mixed_times, pd_times = [], []
                    # Prefill's histogram: first put to COMPLETE sent (the prompt is one chunk here, so that is the
                    # data movement itself); decode's would also count the prefill compute it waited through.
                    before = histogram_sum_count(prefill.metrics(), "tandem_kv_transfer_latency_seconds")
                    bytes_before = float(re.search(r"tandem_kv_transfer_bytes_total\{[^}]*\} (\S+)", prefill.metrics()).group(1))
                    for _ in range(args.repeat):
                        ids = [rng.randrange(2, 129000) for _ in range(n)]
                        mixed_times.append(mixed_ttft(mixed, ids))
                        pd_times.append(pd_ttft(prefill, decode, bootstrap, ids, rng.getrandbits(63) + 1))
                    after = histogram_sum_count(prefill.metrics(), "tandem_kv_transfer_latency_seconds")
                    bytes_after = float(re.search(r"tandem_kv_transfer_bytes_total\{[^}]*\} (\S+)", prefill.metrics()).group(1))
                    transfer = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    moved = (bytes_after - bytes_before) / args.repeat
                    m, p = statistics.median(mixed_times), statistics.median(pd_times)
                    rows.append({"transport": transport.split(",")[0] if transport == "tcp" else "shm", "prompt_tokens": n,
                                 "ttft_mixed_ms": round(m * 1e3, 2), "ttft_pd_ms": round(p * 1e3, 2),
                                 "transfer_ms": round(transfer * 1e3, 3), "state_mb": round(moved / 1e6, 3),
                                 "overhead_ms": round((p - m - transfer) * 1e3, 2)})
                    print(rows[-1], flush=True)
            finally:
                prefill.stop()
                decode.stop()
    finally:
        mixed.stop()
    with open(out / "pd_ttft.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for transport in sorted({r["transport"] for r in rows}):
        sel = [r for r in rows if r["transport"] == transport]
        ax.plot([r["prompt_tokens"] for r in sel], [r["ttft_pd_ms"] - r["ttft_mixed_ms"] for r in sel], "o-",
                label=f"TTFT pd - mixed ({transport})")
        ax.plot([r["prompt_tokens"] for r in sel], [r["transfer_ms"] for r in sel], "x--", label=f"transfer ({transport})")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms")
    ax.set_title("Disaggregation cost on tiny (CPU): TTFT difference vs hand-over time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pd_ttft.png", dpi=110)
    print(f"wrote {out / 'pd_ttft.csv'} and {out / 'pd_ttft.png'}")


if __name__ == "__main__":
    main()
