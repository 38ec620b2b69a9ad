"""Plots bench/results/transfer/transfer.csv: tandem vs ucx_perftest put bandwidth per transport, and prints
the ratio table. Usage: plot.py transfer.csv transfer.png"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(csv_path, png_path):
    series = defaultdict(dict)
    requests = []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row["kind"] == "message":
                series[(row["source"], row["transport"])][int(row["bytes"])] = float(row["mib_per_s"])
            else:
                requests.append(row)
    transports = sorted({t for _, t in series})
    fig, axes = plt.subplots(1, len(transports), figsize=(6 * len(transports), 4), squeeze=False)
    print(f"{'tls':<5} {'bytes':>10} {'tandem MiB/s':>13} {'perftest MiB/s':>15} {'ratio':>6}")
    for ax, transport in zip(axes[0], transports):
        for source, style in (("tandem", "o-"), ("ucx_perftest", "s--")):
            points = sorted(series.get((source, transport), {}).items())
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=source)
        ours, theirs = series.get(("tandem", transport), {}), series.get(("ucx_perftest", transport), {})
        for size in sorted(ours):
            ratio = ours[size] / theirs[size] if theirs.get(size) else float("nan")
            print(f"{transport:<5} {size:>10} {ours[size]:>13.1f} {theirs.get(size, float('nan')):>15.1f} {ratio:>6.2f}")
        for row in requests:
            if row["transport"] == transport:
                ax.axhline(float(row["mib_per_s"]), linestyle=":", color="gray" if "scattered" in row["kind"] else "green",
                           label=f"{row['kind']} ({int(row['bytes']) / 1e6:.1f} MB, {row['puts']} puts)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message bytes")
        ax.set_ylabel("MiB/s")
        ax.set_title(f"UCX put bandwidth, UCX_TLS={transport}")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    for row in requests:
        print(f"{row['transport']:<5} {row['kind']:<20} {int(row['bytes']):>10} B {row['segments']:>6} segments "
              f"{row['puts']:>6} puts {float(row['mib_per_s']):>9.1f} MiB/s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
