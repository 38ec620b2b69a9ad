#!/usr/bin/env bash
# Runs tandem-transfer-bench and `ucx_perftest -t ucp_put_bw` on the same transports and message sizes,
# writing bench/results/transfer/transfer.csv and transfer.png. Usage: bench/transfer/run.sh [build-dir]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
out=$root/bench/results/transfer
bench=$build/bin/tandem-transfer-bench
[ -x "$bench" ] || { echo "run.sh: $bench not built (cmake --build $build --target tandem-transfer-bench)"; exit 1; }
command -v ucx_perftest >/dev/null || { echo "run.sh: ucx_perftest missing (apt-get install ucx-utils)"; exit 1; }
mkdir -p "$out"
csv=$out/transfer.csv
rm -f "$csv"
sizes=(65536 262144 1048576 4194304 16777216 67108864)
port=${PERFTEST_PORT:-13370}
for transport in tcp sm; do
  tls=$transport; [ "$transport" = sm ] && tls=self,sm
  "$bench" --tls "$transport" --csv "$csv" --sizes "$(IFS=,; echo "${sizes[*]}")"
  for size in "${sizes[@]}"; do
    iterations=$(( (2 * 1024 * 1024 * 1024) / size )); [ $iterations -lt 20 ] && iterations=20; [ $iterations -gt 5000 ] && iterations=5000
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
    echo "ucx_perftest,$transport,message,$size,1,1,$iterations,$seconds,$mibs" >> "$csv"
    printf "%-6s ucx_perftest %10s B  %10s MiB/s\n" "$transport" "$size" "$mibs"
  done
done
"$root/.venv/bin/python" "$root/bench/transfer/plot.py" "$csv" "$out/transfer.png"
