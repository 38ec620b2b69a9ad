#!/usr/bin/env bash
# On the GPU machine, with .devcarry/stack.tar.xz carried (tools/scripts/pack-stack.sh): the real serving
# stack on one GPU — tandem-prefill and tandem-decode with --device cuda, disaggregated over UCX (their
# state staged through host copies of the device pools), behind tandem-router — against a mixed GPU engine
# behind a second router: the same completions, token for token, and the transfer counters.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-/tmp/device-out}"
S=/tmp/tandem-stack
mkdir -p "$S" "$OUT"
tar xJf "$root/.devcarry/stack.tar.xz" -C "$S"
cublas_dir=$(dirname "$(ls /usr/local/cuda/lib64/libcublasLt.so.13 2>/dev/null || find / -name 'libcublasLt.so.13' -not -path '/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$S/lib:$cublas_dir:/usr/local/cuda/lib64" UCX_MODULE_DIR="$S/ucx" UCX_TLS="${UCX_TLS:-tcp}"
"$S/bin/tandem-model" generate --preset tiny --seed 1 --tokenizer-dir "$S/tokenizer" --out /tmp/tiny --quiet || exit 1
gpu=(--device cuda --cuda-dense f32 --cache-budget-mb 512)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done' EXIT
"$S/bin/tandem-prefill" --model /tmp/tiny --host 127.0.0.1 --grpc-port 30001 --http-port 31001 --bootstrap-port 8998 "${gpu[@]}" >"$OUT/prefill.log" 2>&1 & pids+=($!)
"$S/bin/tandem-decode" --mode decode --model /tmp/tiny --host 127.0.0.1 --grpc-port 30002 --http-port 31002 "${gpu[@]}" >"$OUT/decode.log" 2>&1 & pids+=($!)
"$S/bin/tandem-decode" --mode mixed --model /tmp/tiny --host 127.0.0.1 --grpc-port 30003 --http-port 31003 "${gpu[@]}" >"$OUT/mixed.log" 2>&1 & pids+=($!)
"$S/bin/tandem-router" --model /tmp/tiny --host 127.0.0.1 --http-port 8000 --grpc-port 50051 --prefill 127.0.0.1:30001,8998 --decode 127.0.0.1:30002 >"$OUT/router-pd.log" 2>&1 & pids+=($!)
"$S/bin/tandem-router" --model /tmp/tiny --host 127.0.0.1 --http-port 8001 --grpc-port 50052 --mixed 127.0.0.1:30003 >"$OUT/router-mixed.log" 2>&1 & pids+=($!)
python3 - "$OUT" <<'PY'
import json, sys, time, urllib.request
out = sys.argv[1]
def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()
def wait(url):
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if get(url)[0] == 200: return
        except Exception:
            time.sleep(0.5)
    sys.exit(f"not ready: {url}")
for port in (8000, 8001):
    wait(f"http://127.0.0.1:{port}/readiness")
def complete(port, prompt):
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=120) as r:
        answer = json.loads(r.read())
    return answer["choices"][0]["text"], answer["usage"], time.time() - t0
words = "the quick brown fox jumps over the lazy dog while a cache of keys moves between two GPUs".split()
same = 0
prompts = [" ".join(words[i % len(words)] for i in range(n)) for n in (1, 5, 40, 130, 300, 600, 900, 1500)]
for p in prompts:
    pd, usage, pd_s = complete(8000, p)
    mixed, _, mixed_s = complete(8001, p)
    same += pd == mixed
    print(f"prompt {usage['prompt_tokens']:5d} tokens: PD {pd_s*1000:7.1f} ms, mixed {mixed_s*1000:7.1f} ms, same text: {pd == mixed}")
print(f"{same}/{len(prompts)} completions identical (PD on the GPU vs mixed on the GPU)")
metrics = get("http://127.0.0.1:31002/metrics")[1]
for line in metrics.splitlines():
    if line.startswith(("tandem_kv_transfer_bytes_total", "tandem_kv_transfer_failures", "tandem_kv_transfer_latency_seconds_sum",
                        "tandem_kv_transfer_latency_seconds_count")):
        print(line)

# TTFT through each router (SSE, time to the first chunk with text), alternating, and prefill's own
# transfer latency (first put to decode's acknowledgement) over the same requests.
def ttft(port, prompt):
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and '"text"' in line and '"text":""' not in line.replace(" ", ""):
                first = time.time() - t0
                for _ in r:
                    pass
                return first
    return float("nan")
def prefill_transfer():
    total = count = 0.0
    for line in get("http://127.0.0.1:31001/metrics")[1].splitlines():
        if line.startswith("tandem_kv_transfer_latency_seconds_sum"): total = float(line.split()[-1])
        if line.startswith("tandem_kv_transfer_latency_seconds_count"): count = float(line.split()[-1])
    return total, count
import statistics
for p in prompts[2::2]:
    before = prefill_transfer()
    pd_t, mixed_t = [], []
    for _ in range(7):
        pd_t.append(ttft(8000, p))
        mixed_t.append(ttft(8001, p))
    after = prefill_transfer()
    transfer = (after[0] - before[0]) / max(after[1] - before[1], 1)
    d = statistics.median(pd_t) - statistics.median(mixed_t)
    print(f"TTFT {len(p.split()):5d} words: PD {statistics.median(pd_t)*1000:6.2f} ms, mixed {statistics.median(mixed_t)*1000:6.2f} ms, "
          f"difference {d*1000:6.2f} ms, prefill's transfer {transfer*1000:6.2f} ms, difference - transfer {(d - transfer)*1000:6.2f} ms")
sys.exit(0 if same == len(prompts) else 1)
PY
status=$?
grep -h "staged\|CUDA device\|error\|Error" "$OUT/prefill.log" "$OUT/decode.log" | head -8
exit $status
