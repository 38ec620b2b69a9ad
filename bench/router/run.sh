#!/usr/bin/env bash
# The latency the router adds and its maximum requests/s, on the tiny model (CPU):
#   1. starts tandem-decode --mode mixed and tandem-router (--mixed) on free loopback ports;
#   2. sends the same requests to the engine directly, through the router's OpenAI HTTP API (SSE) and
#      through its gRPC API, in one interleaved run (request i goes to all three in turn);
#   3. a max-throughput pass per API: many concurrent 1-token requests, with the router's CPU time;
#   4. pairs the passes request by request (added_latency.py): CSV + PNG under OUT.
#   bench/router/run.sh [OUT]     (default bench/results/router-tiny-cpu)
# Env: BUILD (default build), MODEL_DIR (default build/test-models/tiny, else models/tiny),
# REQUESTS (latency pass, default 200), CONCURRENCY (latency pass, default 1), THROUGHPUT_CONCURRENCY
# (default 32), THROUGHPUT_SECONDS (default 20), THREADS (engine forward threads, default 1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
BUILD=${BUILD:-build}
OUT=${1:-bench/results/router-tiny-cpu}
MODEL_DIR=${MODEL_DIR:-$([ -d "$BUILD/test-models/tiny" ] && echo "$BUILD/test-models/tiny" || echo models/tiny)}
REQUESTS=${REQUESTS:-200}
CONCURRENCY=${CONCURRENCY:-1}
THROUGHPUT_CONCURRENCY=${THROUGHPUT_CONCURRENCY:-32}
THROUGHPUT_SECONDS=${THROUGHPUT_SECONDS:-20}
THREADS=${THREADS:-1}
PY=${TANDEM_PYTHON:-$root/.venv/bin/python}
bench="$BUILD/bin/tandem-bench"
for binary in tandem-decode tandem-router tandem-bench; do
  [ -x "$BUILD/bin/$binary" ] || { echo "run.sh: $BUILD/bin/$binary missing (build it first)" >&2; exit 1; }
done
[ -f "$MODEL_DIR/config.json" ] || { echo "run.sh: no model at $MODEL_DIR (make run or ctest -R fixture_tiny_model makes one)" >&2; exit 1; }

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
engine_grpc=$(free_port) engine_http=$(free_port) router_http=$(free_port) router_grpc=$(free_port)
logs="$(mktemp -d -t tandem-router-bench.XXXXXX)"
mkdir -p "$OUT"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_http() {  # name port path pid
  for _ in $(seq 1 1200); do
    kill -0 "$4" 2>/dev/null || { echo "$1 exited; see $logs/$1.log" >&2; tail -5 "$logs/$1.log" >&2; exit 1; }
    curl -sf "http://127.0.0.1:$2$3" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$1 not ready after 120 s; see $logs/$1.log" >&2
  exit 1
}

"$BUILD/bin/tandem-decode" --mode mixed --model "$MODEL_DIR" --host 127.0.0.1 --grpc-port "$engine_grpc" \
  --http-port "$engine_http" --threads "$THREADS" --disable-prefix-cache >"$logs/engine.log" 2>&1 &
pids+=($!)
wait_http engine "$engine_http" /health "${pids[-1]}"
"$BUILD/bin/tandem-router" --model "$MODEL_DIR" --host 127.0.0.1 --http-port "$router_http" --grpc-port "$router_grpc" \
  --mixed "127.0.0.1:$engine_grpc" >"$logs/router.log" 2>&1 &
pids+=($!)
wait_http router "$router_http" /readiness "${pids[-1]}"

# Router CPU seconds (user + system) so far: the throughput passes are engine-bound here, so the
# router's own cost per request says how far it would go with more engines behind it.
router_pid=${pids[-1]}
router_cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$router_pid/stat"; }

declare -A where=([engine]="--api engine --target 127.0.0.1:$engine_grpc"
                  [http]="--api http --url http://127.0.0.1:$router_http"
                  [grpc]="--api grpc --url 127.0.0.1:$router_grpc")
echo "== latency: the same $REQUESTS requests to the engine, router HTTP and router gRPC, interleaved, concurrency $CONCURRENCY"
"$bench" serve --api engine,http,grpc --target "127.0.0.1:$engine_grpc" --url "http://127.0.0.1:$router_http" \
  --grpc-url "127.0.0.1:$router_grpc" --prompt-len 16..64 --max-new-tokens 8 --ignore-eos --seed 7 --warmup 3 --no-plot \
  --concurrency "$CONCURRENCY" --requests "$REQUESTS" --out "$OUT/latency" --requests-csv "$OUT/latency/requests.csv"
echo "api,router_cpu_s,requests" >"$OUT/router-cpu.csv"
for api in engine http grpc; do
  echo "== max throughput: $api, 1-token requests at concurrency $THROUGHPUT_CONCURRENCY for $THROUGHPUT_SECONDS s"
  before=$(router_cpu)
  # shellcheck disable=SC2086
  "$bench" serve ${where[$api]} --prompt-len 8 --max-new-tokens 1 --seed 11 --warmup 3 --no-plot \
    --concurrency "$THROUGHPUT_CONCURRENCY" --duration "$THROUGHPUT_SECONDS" --out "$OUT/throughput-$api"
  after=$(router_cpu)
  completed=$(awk -F, 'NR == 2 {print $3}' "$OUT/throughput-$api/serve.csv")
  echo "$api,$(awk -v a="$after" -v b="$before" 'BEGIN {print a - b}'),$completed" >>"$OUT/router-cpu.csv"
done

"$PY" bench/router/added_latency.py "$OUT"
{
  echo "# machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# engine --threads $THREADS --disable-prefix-cache; model $MODEL_DIR; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "# latency: $REQUESTS requests, concurrency $CONCURRENCY; throughput: concurrency $THROUGHPUT_CONCURRENCY, $THROUGHPUT_SECONDS s"
} >"$OUT/machine.txt"
