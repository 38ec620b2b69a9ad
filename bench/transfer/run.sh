#!/usr/bin/env bash
# Runs tandem-transfer-bench and `ucx_perftest -t ucp_put_bw` on the same transports and message sizes,
# alternating the two REPEATS times (the machine is shared: one run says little), and writes every run to
# bench/results/transfer/transfer_runs.csv, the per-point medians to transfer.csv and the plot to transfer.png.
# Both sides use memory UCX allocated (the bench like the engine's pools, ucx_perftest by default).
# Usage: bench/transfer/run.sh [build-dir]   Environment: REPEATS (3), TRANSPORTS ("tcp sm"),
# VOLUME_tcp / VOLUME_sm (bytes per message size; tcp defaults lower because ucx_perftest is slow there).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
out=$root/bench/results/transfer
bench=$build/bin/tandem-transfer-bench
[ -x "$bench" ] || { echo "run.sh: $bench not built (cmake --build $build --target tandem-transfer-bench)"; exit 1; }
command -v ucx_perftest >/dev/null || { echo "run.sh: ucx_perftest missing (apt-get install ucx-utils)"; exit 1; }
mkdir -p "$out"
runs=$out/transfer_runs.csv
csv=$out/transfer.csv
rm -f "$runs" "$csv"
sizes=(65536 262144 1048576 4194304 16777216 67108864)
repeats=${REPEATS:-3}
port=${PERFTEST_PORT:-13370}
declare -A volume=([tcp]=${VOLUME_tcp:-$((512 * 1024 * 1024))} [sm]=${VOLUME_sm:-$((2 * 1024 * 1024 * 1024))})
for repeat in $(seq 1 "$repeats"); do
  for transport in ${TRANSPORTS:-tcp sm}; do
    tls=$transport; [ "$transport" = sm ] && tls=self,sm
    "$bench" --tls "$transport" --csv "$runs" --volume "${volume[$transport]}" --sizes "$(IFS=,; echo "${sizes[*]}")"
    for size in "${sizes[@]}"; do
      iterations=$(( ${volume[$transport]} / size )); [ $iterations -lt 20 ] && iterations=20; [ $iterations -gt 5000 ] && iterations=5000
      port=$((port + 1))
      UCX_TLS=$tls ucx_perftest -p $port -t ucp_put_bw -s "$size" -n "$iterations" >/dev/null 2>&1 &
      server=$!
      line=""
      for attempt in $(seq 1 50); do  # the server needs a moment to listen
        if line=$(UCX_TLS=$tls ucx_perftest localhost -p $port -t ucp_put_bw -s "$size" -n "$iterations" 2>/dev/null | grep Final:); then break; fi
        sleep 0.1
      done
      wait $server || true
      # Final: iterations, 50%ile, average, overall latency (usec), bandwidth average, overall (MB/s = MiB/s), msgrate
      mibs=$(echo "$line" | awk '{print $7}')
      seconds=$(awk -v s="$size" -v n="$iterations" -v m="$mibs" 'BEGIN{ if (m>0) print s*n/(m*1048576); else print 0 }')
      echo "ucx_perftest,$transport,message,$size,1,1,$iterations,$seconds,$mibs" >> "$runs"
      printf "run %d %-6s ucx_perftest %10s B  %10s MiB/s\n" "$repeat" "$transport" "$size" "$mibs"
    done
  done
done
# One row per (source, transport, kind, bytes): the run with the median bandwidth.
"$root/.venv/bin/python" - "$runs" "$csv" <<'EOF'
import csv, sys
from collections import defaultdict
with open(sys.argv[1]) as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames
    groups = defaultdict(list)
    for row in reader:
        groups[(row["source"], row["transport"], row["kind"], row["bytes"])].append(row)
with open(sys.argv[2], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields + ["runs"])
    writer.writeheader()
    for rows in groups.values():
        rows.sort(key=lambda r: float(r["mib_per_s"] or 0))
        writer.writerow({**rows[len(rows) // 2], "runs": len(rows)})
EOF
"$root/.venv/bin/python" "$root/bench/transfer/plot.py" "$csv" "$out/transfer.png"
