#!/usr/bin/env bash
# On the GPU machine, with .devcarry/stack.tar.xz carried (tools/scripts/pack-stack.sh): the real serving
# stack on one GPU — tandem-prefill and tandem-decode with --device cuda, disaggregated over UCX (their
# state staged through host copies of the device pools), behind tandem-router — against a mixed GPU engine
# behind a second router: the same completions, token for token, and the transfer counters.
# PD_TRANSFER (default ipc) is their --pd-transfer: ipc (device to device over CUDA IPC, or refuse), auto or
# staged; with ipc/auto the run fails unless the bytes went path="ipc". DECODE_GPU (default 0) puts decode on
# another GPU of the host. A third router fronts a second prefill started with TANDEM_TRANSFER_CORRUPT_PUTS=1:
# its first transfer lands with one byte inverted, which decode must catch (checksum mismatch, DATA_LOSS), and
# its next request must still give the mixed engine's text.
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
PD_TRANSFER="${PD_TRANSFER:-ipc}"
DECODE_GPU="${DECODE_GPU:-0}"
pd=(--pd-transfer "$PD_TRANSFER")
echo "device-stack: --pd-transfer $PD_TRANSFER, prefill on GPU 0, decode on GPU $DECODE_GPU"
nvidia-smi --query-gpu=index,name,pci.bus_id --format=csv,noheader 2>/dev/null || true
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done' EXIT
"$S/bin/tandem-prefill" --model /tmp/tiny --host 127.0.0.1 --grpc-port 30001 --http-port 31001 --bootstrap-port 8998 "${gpu[@]}" "${pd[@]}" >"$OUT/prefill.log" 2>&1 & pids+=($!)
TANDEM_TRANSFER_CORRUPT_PUTS=1 "$S/bin/tandem-prefill" --model /tmp/tiny --host 127.0.0.1 --grpc-port 30004 --http-port 31004 --bootstrap-port 8999 "${gpu[@]}" "${pd[@]}" >"$OUT/prefill-corrupt.log" 2>&1 & pids+=($!)
"$S/bin/tandem-decode" --mode decode --model /tmp/tiny --host 127.0.0.1 --grpc-port 30002 --http-port 31002 "${gpu[@]}" "${pd[@]}" --cuda-device "$DECODE_GPU" >"$OUT/decode.log" 2>&1 & pids+=($!)
"$S/bin/tandem-decode" --mode mixed --model /tmp/tiny --host 127.0.0.1 --grpc-port 30003 --http-port 31003 "${gpu[@]}" >"$OUT/mixed.log" 2>&1 & pids+=($!)
"$S/bin/tandem-router" --model /tmp/tiny --host 127.0.0.1 --http-port 8000 --grpc-port 50051 --prefill 127.0.0.1:30001,8998 --decode 127.0.0.1:30002 >"$OUT/router-pd.log" 2>&1 & pids+=($!)
"$S/bin/tandem-router" --model /tmp/tiny --host 127.0.0.1 --http-port 8001 --grpc-port 50052 --mixed 127.0.0.1:30003 >"$OUT/router-mixed.log" 2>&1 & pids+=($!)
"$S/bin/tandem-router" --model /tmp/tiny --host 127.0.0.1 --http-port 8002 --grpc-port 50053 --prefill 127.0.0.1:30004,8999 --decode 127.0.0.1:30002 >"$OUT/router-corrupt.log" 2>&1 & pids+=($!)
PD_TRANSFER="$PD_TRANSFER" python3 - "$OUT" <<'PY'
import os
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
for port in (8000, 8001, 8002):
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
failures = [] if same == len(prompts) else [f"{len(prompts) - same} PD completions differ from the mixed engine's"]
def path_bytes(http_port):
    """tandem_kv_transfer_bytes_total by path label on one engine."""
    out = {}
    for line in get(f"http://127.0.0.1:{http_port}/metrics")[1].splitlines():
        if line.startswith("tandem_kv_transfer_bytes_total{") and 'path="' in line:
            path = line.split('path="', 1)[1].split('"', 1)[0]
            out[path] = out.get(path, 0) + float(line.split()[-1])
    return out
metrics = get("http://127.0.0.1:31002/metrics")[1]
for line in metrics.splitlines():
    if line.startswith(("tandem_kv_transfer_bytes_total", "tandem_num_transfer_failed", "tandem_kv_transfer_latency_seconds_sum",
                        "tandem_kv_transfer_latency_seconds_count")):
        print("decode:", line)
mode = os.environ.get("PD_TRANSFER", "ipc")
for side, port in (("prefill", 31001), ("decode", 31002)):
    paths = path_bytes(port)
    print(f"{side} bytes by path: {paths}")
    if mode in ("ipc", "auto") and (paths.get("ipc", 0) <= 0 or paths.get("staged", 0) > 0):
        failures.append(f"{side}: --pd-transfer {mode} on one host should move every byte path=ipc, got {paths}")
    if mode == "staged" and paths.get("ipc", 0) > 0:
        failures.append(f"{side}: --pd-transfer staged moved bytes over ipc: {paths}")
def log(name):
    with open(os.path.join(out, name), errors="replace") as f:
        return f.read()
for name in ("prefill.log", "decode.log"):
    for line in log(name).splitlines():
        if "PD transfer" in line or "device IPC" in line:
            print(f"{name}: {line}")

# A corrupted transfer (the second prefill inverts one byte of its first put or IPC copy): decode's checksum
# over its device pools must catch it (DATA_LOSS: the router does not retry it), and only that request fails.
def try_complete(port, prompt):
    try:
        return complete(port, prompt)[0], None
    except urllib.error.HTTPError as e:
        return None, f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"
    except Exception as e:
        return None, repr(e)
import urllib.error
failed_before = sum(float(l.split()[-1]) for l in get("http://127.0.0.1:31002/metrics")[1].splitlines()
                    if l.startswith("tandem_num_transfer_failed_reqs_total"))
text, error = try_complete(8002, prompts[4])
print(f"corrupted transfer: text {text!r}, error {error}")
failed_after = sum(float(l.split()[-1]) for l in get("http://127.0.0.1:31002/metrics")[1].splitlines()
                   if l.startswith("tandem_num_transfer_failed_reqs_total"))
mismatch = [l for name in ("decode.log", "prefill-corrupt.log", "router-corrupt.log") for l in log(name).splitlines()
            if "checksum mismatch" in l]
for l in mismatch[:3]:
    print("log:", l[:300])
print(f"decode transfer failures {failed_before:.0f} -> {failed_after:.0f}; corrupting prefill's paths {path_bytes(31004)}")
if not mismatch and not (error and "checksum" in error.lower()):
    failures.append("the corrupted transfer was not caught as a checksum mismatch (DATA_LOSS)")
if error is None:
    print("note: the client got a completion for the corrupted transfer (a retry?); decode's catch is what counts")
if failed_after <= failed_before:
    failures.append("decode's tandem_num_transfer_failed_reqs_total did not grow for the corrupted transfer")
text, error = try_complete(8002, prompts[3])
mixed_text = complete(8001, prompts[3])[0]
print(f"after the corruption: same text as mixed: {text == mixed_text} (error {error})")
if text != mixed_text:
    failures.append("the request after the corrupted one did not give the mixed engine's text")

# TTFT through each router (SSE, time to the first chunk with text), alternating TTFT_REPS times (default 7), and prefill's own
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
    for _ in range(int(os.environ.get("TTFT_REPS", "7"))):
        pd_t.append(ttft(8000, p))
        mixed_t.append(ttft(8001, p))
    after = prefill_transfer()
    transfer = (after[0] - before[0]) / max(after[1] - before[1], 1)
    d = statistics.median(pd_t) - statistics.median(mixed_t)
    print(f"TTFT {len(p.split()):5d} words: PD {statistics.median(pd_t)*1000:6.2f} ms, mixed {statistics.median(mixed_t)*1000:6.2f} ms, "
          f"difference {d*1000:6.2f} ms, prefill's transfer {transfer*1000:6.2f} ms, difference - transfer {(d - transfer)*1000:6.2f} ms")
for f in failures:
    print("FAIL:", f)
print("device-stack: OK" if not failures else f"device-stack: {len(failures)} failure(s)")
sys.exit(0 if not failures else 1)
PY
status=$?
grep -h "staged\|device IPC\|PD transfer\|CUDA device\|error\|Error" "$OUT/prefill.log" "$OUT/decode.log" "$OUT/prefill-corrupt.log" | head -16
exit $status
