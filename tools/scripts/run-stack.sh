#!/usr/bin/env bash
# `make run`: tandem-prefill + tandem-decode (--mode decode) + tandem-router on localhost. Waits until
# the router is ready, prints the URLs and a curl example; Ctrl-C (or SIGTERM) stops all three.
set -euo pipefail

BUILD=${BUILD:-build}
MODEL_DIR=${MODEL_DIR:-models/tiny}
HOST=${HOST:-127.0.0.1}
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-50051}
PREFILL_GRPC=${PREFILL_GRPC:-30001} PREFILL_HTTP=${PREFILL_HTTP:-31001} BOOTSTRAP=${BOOTSTRAP:-8998}
DECODE_GRPC=${DECODE_GRPC:-30002} DECODE_HTTP=${DECODE_HTTP:-31002}
LOGS=${LOGS:-$BUILD/run-logs}
export UCX_TLS=${UCX_TLS:-tcp}  # loopback; posix/sysv/cma also work on one host

mkdir -p "$LOGS"
pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping tandem-router, tandem-decode, tandem-prefill"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  exit 0
}
trap stop INT TERM EXIT

wait_http() {  # name port path pid
  for _ in $(seq 1 1200); do
    if ! kill -0 "$4" 2>/dev/null; then echo "$1 exited; see $LOGS/$1.log" >&2; tail -5 "$LOGS/$1.log" >&2; exit 1; fi
    if curl -sf "http://$HOST:$2$3" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "$1 not ready after 120 s; see $LOGS/$1.log" >&2
  exit 1
}

"$BUILD/bin/tandem-prefill" --model "$MODEL_DIR" --host "$HOST" --grpc-port "$PREFILL_GRPC" --http-port "$PREFILL_HTTP" \
  --bootstrap-port "$BOOTSTRAP" >"$LOGS/prefill.log" 2>&1 &
pids+=($!); prefill=$!
"$BUILD/bin/tandem-decode" --mode decode --model "$MODEL_DIR" --host "$HOST" --grpc-port "$DECODE_GRPC" \
  --http-port "$DECODE_HTTP" >"$LOGS/decode.log" 2>&1 &
pids+=($!); decode=$!
wait_http prefill "$PREFILL_HTTP" /health "$prefill"
wait_http decode "$DECODE_HTTP" /health "$decode"
"$BUILD/bin/tandem-router" --model "$MODEL_DIR" --host "$HOST" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --prefill "$HOST:$PREFILL_GRPC,$BOOTSTRAP" --decode "$HOST:$DECODE_GRPC" >"$LOGS/router.log" 2>&1 &
pids+=($!); router=$!
wait_http router "$HTTP_PORT" /readiness "$router"

model=$(basename "$(realpath "$MODEL_DIR")")
cat <<INFO

Tandem is up (logs in $LOGS):
  OpenAI API   http://$HOST:$HTTP_PORT/v1   (chat/completions, completions, models)
  router       http://$HOST:$HTTP_PORT/health  /readiness  /metrics   gRPC $HOST:$GRPC_PORT (tandem.v1.Router)
  prefill      gRPC $HOST:$PREFILL_GRPC, bootstrap $BOOTSTRAP, metrics http://$HOST:$PREFILL_HTTP/metrics
  decode       gRPC $HOST:$DECODE_GRPC, metrics http://$HOST:$DECODE_HTTP/metrics

  curl -s http://$HOST:$HTTP_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$model", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'

Ctrl-C stops all three.
INFO

# Stay until Ctrl-C or until one of them dies.
# (`wait` returns at once when a trapped signal arrives, so Ctrl-C goes straight to stop.)
wait -n "$prefill" "$decode" "$router" || true
echo "a service exited; see $LOGS" >&2
exit 1
