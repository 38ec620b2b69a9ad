#!/usr/bin/env bash
# Runs on the GPU machine (the device tool) with .devcarry/ carried: the GPU tests, compute-sanitizer
# and the benchmarks; logs, CSVs and JUnit XML go to $OUT.
#   tools/scripts/device-run.sh [tests] [sanitize] [bench]     (default: tests)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/.devcarry"
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
      for t in cuda_parity_test gpu_model_test; do
        [ -x "$carry/bin/$t" ] || continue
        "$carry/bin/$t" --gtest_output="xml:$OUT/$t.xml" 2>&1 | tee "$OUT/$t.log" || status=1
      done ;;
    sanitize)
      sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
      if [ -z "$sanitizer" ]; then echo "no compute-sanitizer here" | tee "$OUT/sanitize.log"; status=1; continue; fi
      filter="${SANITIZE_FILTER:-GpuModelTest.DeviceArgmaxMatchesHostArgmax:GpuModelTest.BadInputIsAnErrorNotACrash}"
      for tool in memcheck racecheck; do
        timeout "${SANITIZE_TIMEOUT:-200}" "$sanitizer" --tool "$tool" --error-exitcode 3 "$carry/bin/gpu_model_test" --gtest_filter="$filter" \
          2>&1 | tail -40 | tee "$OUT/sanitize-$tool.log" || status=1
      done ;;
    bench)
      if [ -n "${KERNEL_BENCH:-}" ] && [ -x "$carry/bin/cuda_kernel_bench" ]; then
        "$carry/bin/cuda_kernel_bench" "$OUT" 2>"$OUT/kernel-bench.stderr" | tee "$OUT/kernel-bench.txt" || status=1
      fi
      [ -x "$carry/bin/gpu_layer_bench" ] && { "$carry/bin/gpu_layer_bench" "${LAYER_MODEL:-synthetic}" "$OUT" 2>&1 | tee "$OUT/layer-bench.txt" || status=1; }
      # The PyTorch eager baseline of the same layer step, same shapes, in the same run.
      if [ -z "${NO_TORCH:-}" ]; then
        python3 "$root/bench/gpu/torch_layer.py" --synthetic --out "$OUT/torch-layer.csv" 2>&1 | tail -15 | tee "$OUT/torch-layer.txt" || status=1
      fi ;;
    *) echo "unknown mode $mode"; status=2 ;;
  esac
done
exit $status
