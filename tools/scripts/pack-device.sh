#!/usr/bin/env bash
# Packs the GPU tests and benchmarks of a CUDA build (core-only is enough: `make core-only`) with the shared
# libraries they need into .devcarry/device.tar.xz (git-ignored), for the device tool's `carry`. On the GPU
# machine, tools/scripts/device-run.sh unpacks and runs them.
#   tools/scripts/pack-device.sh [BUILD_DIR] [BINARY...]
set -euo pipefail
build="${1:-build-core}"
shift || true
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then bins=(cuda_parity_test gpu_model_test gpu_engine_test gpu_pd_test gpu_layer_bench cuda_kernel_bench); fi
out=.devcarry
rm -rf "$out/bin" "$out/lib"
mkdir -p "$out/bin" "$out/lib"
for b in "${bins[@]}"; do
  cp "$build/bin/$b" "$out/bin/"
  strip --strip-debug "$out/bin/$b"  # the carry limit is 64 MiB
  # Everything but the C runtime and the driver (the GPU machine has its own) and cuBLAS (in its toolkit).
  ldd "$build/bin/$b" | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libcuda.so*|libcublas*) ;;
      *) cp -n "$lib" "$out/lib/" ;;
    esac
  done
done
# One xz archive (the carry limit is 64 MiB: the four GPU tests and their libraries are ~60 MB plain, ~9 MB
# packed); device-run.sh unpacks it. pack-stack.sh's archive next to it is kept.
tar cJf "$out/device.tar.xz" -C "$out" bin lib
rm -rf "$out/bin" "$out/lib"
du -sh "$out/device.tar.xz"
