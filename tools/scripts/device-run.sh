#!/usr/bin/env bash
# Runs on the GPU machine (the device tool) with .devcarry/ carried: the GPU tests, compute-sanitizer
# and the benchmarks; logs, CSVs and JUnit XML go to $OUT.
#   tools/scripts/device-run.sh [tests] [sanitize] [bench]     (default: tests)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/.devcarry"
# pack-device.sh's archive: bin/ and lib/ (unpacked once).
if [ -f "$carry/device.tar.xz" ] && [ ! -d "$carry/bin" ]; then tar xJf "$carry/device.tar.xz" -C "$carry"; fi
OUT="${OUT:-/tmp/device-out}"
mkdir -p "$OUT"
cublas_dir=$(dirname "$(ls /usr/local/cuda/lib64/libcublasLt.so.13 2>/dev/null || find / -name 'libcublasLt.so.13' -not -path '/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$carry/lib:$cublas_dir:/usr/local/cuda/lib64"
export TANDEM_TEST_MODELS="${TANDEM_TEST_MODELS:-/tmp/tandem-test-models}"
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(tests)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/nvidia-smi.txt"
status=0
for mode in "${modes[@]}"; do
  case "$mode" in
    tests)
      for t in ${GPU_TESTS:-cuda_parity_test gpu_model_test gpu_engine_test gpu_pd_test}; do
        [ -x "$carry/bin/$t" ] || continue
        "$carry/bin/$t" --gtest_output="xml:$OUT/$t.xml" 2>&1 | tee "$OUT/$t.log" || status=1
      done ;;
    sanitize)
      sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
      if [ -z "$sanitizer" ]; then echo "no compute-sanitizer here" | tee "$OUT/sanitize.log"; status=1; continue; fi
      # memcheck: the whole tiny model's prefill and decode; racecheck: our kernels one by one (the
      # parity tests; cuBLASLt's kernels are not ours to check).
      model_filter="${SANITIZE_FILTER:-GpuModelTest.DeviceArgmaxMatchesHostArgmax:GpuModelTest.BadInputIsAnErrorNotACrash:GpuModelTest.BatchedSequencesMatchSeparateRuns}"
      kernel_filter="${RACECHECK_FILTER:-*Hadamard*:*KvEntries*:*Compressor*:*IndexerTopK*:*SparseAttention*:*MoeRoute*:*MoeGroup*:*GroupedQuantized*:*SwiGlu*:*MoeCombine*:*HcHead*:*HcPre*:*HcPost*:*RmsNorm*:*Rope*:*Argmax*:*SampleRows*:*ApplyLogitEdits*}"
      timeout "${SANITIZE_TIMEOUT:-240}" "$sanitizer" --tool memcheck --error-exitcode 3 "$carry/bin/gpu_model_test" \
        --gtest_filter="$model_filter" > "$OUT/sanitize-memcheck.log" 2>&1 || status=1
      tail -8 "$OUT/sanitize-memcheck.log"
      timeout "${SANITIZE_TIMEOUT:-240}" "$sanitizer" --tool racecheck --error-exitcode 3 "$carry/bin/cuda_parity_test" \
        --gtest_filter="$kernel_filter" > "$OUT/sanitize-racecheck.log" 2>&1 || status=1
      grep -E "FAILED|RACECHECK SUMMARY|Error|PASSED" "$OUT/sanitize-racecheck.log" | tail -12
      # Which kernels the hazards are in (racecheck names the function of each access).
      grep -E "^=========     (Write|Read)|in .*Kernel|Warning" "$OUT/sanitize-racecheck.log" | sort | uniq -c | sort -rn | head -20 ;;
    bench)
      if [ -n "${KERNEL_BENCH:-}" ] && [ -x "$carry/bin/cuda_kernel_bench" ]; then
        "$carry/bin/cuda_kernel_bench" "$OUT" 2>"$OUT/kernel-bench.stderr" | tee "$OUT/kernel-bench.txt" || status=1
      fi
      [ -z "${NO_LAYER:-}" ] && [ -x "$carry/bin/gpu_layer_bench" ] && { "$carry/bin/gpu_layer_bench" "${LAYER_MODEL:-synthetic}" "$OUT" 2>&1 | tee "$OUT/layer-bench.txt" || status=1; }
      # The PyTorch eager baseline of the same layer step, same shapes, in the same run.
      if [ -z "${NO_TORCH:-}" ] && [ -z "${NO_LAYER:-}" ]; then
        python3 "$root/bench/gpu/torch_layer.py" --synthetic --out "$OUT/torch-layer.csv" 2>&1 | tail -15 | tee "$OUT/torch-layer.txt" || status=1
      fi ;;
    *) echo "unknown mode $mode"; status=2 ;;
  esac
done
# Everything in one archive (the device tool brings back only a few files): 0-results.tgz and all.log stay.
tar czf /tmp/0-results.tgz -C "$OUT" . 2>/dev/null && find "$OUT" -mindepth 1 -maxdepth 1 ! -name all.log -exec rm -rf {} + \
  && mv /tmp/0-results.tgz "$OUT/"
exit $status
