"""The router's added latency and maximum requests/s from bench/router/run.sh's passes.

Usage: added_latency.py OUT

Reads OUT/latency/requests.csv (one interleaved run: request i went to the engine, router HTTP and router
gRPC in turn), OUT/throughput-{engine,http,grpc}/serve.csv and OUT/router-cpu.csv. For each router API and
request i, the added latency is router − engine for TTFT and for e2e. Writes OUT/added_latency.csv
(p50/p90/p99 per API and metric), OUT/throughput.csv (max requests/s per API, the router's CPU ms per
request) and OUT/router.png, and prints both tables.
"""

import csv
import sys
from pathlib import Path

import numpy as np


def requests(path, api):
    with open(path) as f:
        return {int(r["index"]): r for r in csv.DictReader(f) if r["api"] == api and not r["error"]}


def main(out):
    out = Path(out)
    engine = requests(out / "latency" / "requests.csv", "engine")
    added, rows = {}, []
    for api in ("http", "grpc"):
        router = requests(out / "latency" / "requests.csv", api)
        common = sorted(set(engine) & set(router))
        for metric in ("ttft_ms", "e2e_ms"):
            values = np.array([float(router[i][metric]) - float(engine[i][metric]) for i in common
                               if router[i][metric] and engine[i][metric]])
            added[(api, metric)] = values
            base = np.array([float(engine[i][metric]) for i in common if engine[i][metric]])
            rows.append({"api": api, "metric": metric.replace("_ms", ""), "pairs": len(values),
                         "engine_p50_ms": f"{np.percentile(base, 50):.3f}",
                         "added_p50_ms": f"{np.percentile(values, 50):.3f}",
                         "added_p90_ms": f"{np.percentile(values, 90):.3f}",
                         "added_p99_ms": f"{np.percentile(values, 99):.3f}",
                         "added_mean_ms": f"{values.mean():.3f}"})
    with open(out / "added_latency.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    with open(out / "router-cpu.csv") as f:
        cpu = {r["api"]: r for r in csv.DictReader(f)}
    throughput = []
    for api in ("engine", "http", "grpc"):
        with open(out / f"throughput-{api}" / "serve.csv") as f:
            row = next(csv.DictReader(f))
        throughput.append({"api": api, "concurrency": row["concurrency"], "completed": row["completed"],
                           "errors": row["errors"], "requests_per_s": row["request_throughput"],
                           "ttft_p50_ms": row["ttft_p50_ms"], "ttft_p99_ms": row["ttft_p99_ms"],
                           "router_cpu_ms_per_request": "" if api == "engine" else
                           f"{1000 * float(cpu[api]['router_cpu_s']) / max(int(cpu[api]['requests']), 1):.3f}"})
    with open(out / "throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(throughput[0]))
        writer.writeheader()
        writer.writerows(throughput)

    print(f"{'api':<5} {'metric':<5} {'pairs':>5} {'engine p50':>10} {'added p50':>9} {'p90':>7} {'p99':>7} {'mean':>7}  (ms)")
    for r in rows:
        print(f"{r['api']:<5} {r['metric']:<5} {r['pairs']:>5} {r['engine_p50_ms']:>10} {r['added_p50_ms']:>9} "
              f"{r['added_p90_ms']:>7} {r['added_p99_ms']:>7} {r['added_mean_ms']:>7}")
    print()
    print(f"{'api':<6} {'conc':>4} {'done':>6} {'err':>4} {'req/s':>8} {'TTFT p50/p99 ms':>18} {'router CPU ms/req':>18}")
    for t in throughput:
        print(f"{t['api']:<6} {t['concurrency']:>4} {t['completed']:>6} {t['errors']:>4} {float(t['requests_per_s']):>8.1f} "
              f"{float(t['ttft_p50_ms']):>8.1f}/{float(t['ttft_p99_ms']):<9.1f} {t['router_cpu_ms_per_request']:>18}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("added_latency.py: no matplotlib in this python; wrote the CSVs only")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (api, metric), values in added.items():
        ordered = np.sort(values)
        left.plot(ordered, np.linspace(0, 1, len(ordered)), label=f"{api} {metric.replace('_ms', '')}")
    left.axvline(0, color="grey", linewidth=0.8)
    left.set_xlabel("router − engine, same request (ms)")
    left.set_ylabel("fraction of requests")
    left.set_title("latency the router adds (CDF)")
    left.legend()
    names = [t["api"] for t in throughput]
    rates = [float(t["requests_per_s"]) for t in throughput]
    bars = right.bar(names, rates, color=["#777777", "#1f77b4", "#ff7f0e"])
    for bar, rate in zip(bars, rates):
        right.annotate(f"{rate:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    right.set_ylabel("requests/s")
    right.set_title(f"max throughput: 1-token requests, concurrency {throughput[0]['concurrency']}")
    fig.tight_layout()
    fig.savefig(out / "router.png", dpi=110)
    print(f"wrote {out / 'added_latency.csv'}, {out / 'throughput.csv'}, {out / 'router.png'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
