"""TTFT of a disaggregated pair (tandem-prefill + tandem-decode over UCX) vs the mixed engine on one model, and
where the pair's extra time goes.

Sequential requests (no queueing), random prompts (no prefix-cache hits), one output token each, so TTFT is
prefill + hand-over. The engines run at --log-level debug and log one `pd-trace` line per room and side
(common/engine/pd_trace.h: steady-clock timestamps, one clock for both processes); this script merges the two
sides of each room into one timeline and reports the median of every stage on the TTFT path, from the
prefill's last forward to decode handing the first token to gRPC. `transfer` is the puts themselves (prefill's
last Ship call to its puts returning); the rest of the hand-over is overhead. Variants: UCX over tcp and over
shared memory, each with the pools shipped directly and staged through a host copy (--test-staged-pools, the
path of --device cuda engines). Writes pd_ttft.csv, pd_stages.csv and pd_ttft.png.

  .venv/bin/python bench/pd/ttft.py --out bench/results/pd-ttft-tiny-cpu [--lengths 64,256,1024] [--repeat 5]
"""
import argparse
import csv
import random
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
FLAGS = ["--disable-prefix-cache", "--log-level", "debug"]  # the harness runs every engine with --threads 1

# The TTFT path of a room, as (stage, side of the event that starts it, event, side of the event that ends it, event).
STAGES = [
    ("checksum (prefill)", "p", "prompt_done", "p", "checksummed"),
    ("ship call", "p", "checksummed", "p", "shipped"),
    ("transfer (puts)", "p", "shipped", "p", "puts_done"),
    ("COMPLETE ready", "p", "puts_done", "p", "complete_sent"),
    ("COMPLETE on the wire", "p", "complete_sent", "d", "completion_arrived"),
    ("decode wakes", "d", "completion_arrived", "d", "polled"),
    ("verify (wire checksum)", "d", "polled", "d", "verified"),
    ("stage into live pools", "d", "verified", "d", "staged"),
    ("checksum (decode)", "d", "staged|verified", "d", "checked"),
    ("first token to gRPC", "d", "checked|staged|verified", "d", "first_token"),
]


def traces(text, role):
    """room -> {event: steady-clock microseconds} from one engine's pd-trace lines."""
    out = {}
    for line in text.splitlines():
        m = re.search(r"pd-trace (\w+) room=(\d+) t0_ns=(\d+) (.*)$", line)
        if not m or m.group(1) != role:
            continue
        t0 = int(m.group(3)) / 1000
        out[int(m.group(2))] = {k: t0 + int(v) for k, v in (kv.split("=") for kv in m.group(4).split())}
    return out


def stage_times(prefill, decode):
    """Stage -> microseconds for one room (its two merged timelines); None where an event is missing."""
    sides = {"p": prefill, "d": decode}
    out = {}
    for name, a_side, a, b_side, b in STAGES:
        start = next((sides[a_side][e] for e in a.split("|") if e in sides[a_side]), None)
        end = sides[b_side].get(b)
        out[name] = None if start is None or end is None else end - start
    begin, end = prefill.get("prompt_done"), decode.get("first_token")
    out["hand-over total"] = None if begin is None or end is None else end - begin
    transfer = out["transfer (puts)"]
    out["hand-over - transfer"] = None if transfer is None or out["hand-over total"] is None else out["hand-over total"] - transfer
    return out


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


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pd-ttft-tiny-cpu"))
    parser.add_argument("--lengths", default="64,256,1024")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--variants", default="tcp,tcp-staged,shm,shm-staged")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    mixed = Server(args=["--mode", "mixed", *FLAGS], log_name="bench-mixed")
    rows, stage_rows = [], []
    try:
        for variant in args.variants.split(","):
            transport = "tcp" if variant.startswith("tcp") else "posix,sysv,cma,self"
            staged = ["--test-staged-pools"] if variant.endswith("staged") else []
            bootstrap = free_port()
            env = {"UCX_TLS": transport}
            prefill = Server(binary="tandem-prefill", args=["--bootstrap-port", str(bootstrap), *FLAGS, *staged], env=env,
                             log_name="bench-prefill")
            decode = Server(binary="tandem-decode", args=["--mode", "decode", *FLAGS, *staged], env=env,
                            log_name="bench-decode")
            try:
                warm = [rng.randrange(2, 129000) for _ in range(8)]
                pd_ttft(prefill, decode, bootstrap, warm, rng.getrandbits(63) + 1)
                for n in lengths:
                    mixed_times, pd_times, rooms = [], [], []
                    for _ in range(args.repeat):
                        ids = [rng.randrange(2, 129000) for _ in range(n)]
                        mixed_times.append(mixed_ttft(mixed, ids))
                        room = rng.getrandbits(63) + 1
                        pd_times.append(pd_ttft(prefill, decode, bootstrap, ids, room))
                        rooms.append(room)
                    time.sleep(0.2)  # the prefill leg's last log line
                    p_traces, d_traces = traces(prefill.log_text(), "prefill"), traces(decode.log_text(), "decode")
                    per_room = [stage_times(p_traces.get(r, {}), d_traces.get(r, {})) for r in rooms]
                    stages = {name: median([s[name] for s in per_room]) for name in per_room[0]}
                    for name, us in stages.items():
                        stage_rows.append({"variant": variant, "prompt_tokens": n, "stage": name, "median_us": round(us, 1)})
                    m, p = statistics.median(mixed_times), statistics.median(pd_times)
                    rows.append({"variant": variant, "prompt_tokens": n, "ttft_mixed_ms": round(m * 1e3, 2),
                                 "ttft_pd_ms": round(p * 1e3, 2),
                                 "transfer_ms": round(stages["transfer (puts)"] / 1e3, 3),
                                 "handover_ms": round(stages["hand-over total"] / 1e3, 3),
                                 "handover_minus_transfer_ms": round(stages["hand-over - transfer"] / 1e3, 3)})
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
    with open(out / "pd_stages.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(stage_rows[0]))
        writer.writeheader()
        writer.writerows(stage_rows)
    # The stage table: median microseconds, one column per variant and prompt length.
    columns = sorted({(r["variant"], r["prompt_tokens"]) for r in stage_rows},
                     key=lambda c: (args.variants.split(",").index(c[0]), c[1]))
    names = list(dict.fromkeys(r["stage"] for r in stage_rows))
    value = {(r["variant"], r["prompt_tokens"], r["stage"]): r["median_us"] for r in stage_rows}
    print("\nmedian us | " + " | ".join(f"{v} {n}" for v, n in columns))
    for name in names:
        print(f"{name} | " + " | ".join(f"{value[(v, n, name)]:.0f}" for v, n in columns))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    overhead = [name for name in names if name not in ("transfer (puts)", "hand-over total", "hand-over - transfer")]
    bottom = [0.0] * len(columns)
    for name in overhead:
        heights = [max(value[(v, n, name)], 0) / 1e3 if value[(v, n, name)] == value[(v, n, name)] else 0 for v, n in columns]
        ax.bar(range(len(columns)), heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(columns)), [f"{v}\n{n}" for v, n in columns], fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.set_title("PD hand-over on tiny (CPU): the time beyond the puts, by stage")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "pd_ttft.png", dpi=110)
    print(f"wrote {out / 'pd_ttft.csv'}, {out / 'pd_stages.csv'} and {out / 'pd_ttft.png'}")


if __name__ == "__main__":
    main()
