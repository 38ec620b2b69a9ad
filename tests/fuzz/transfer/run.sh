#!/usr/bin/env bash
# Builds the PD transfer wire-decoder libFuzzer target with clang (ASan + UBSan when it links, libFuzzer),
# writes its seeds with the real encoders (make_seeds.cc) and runs it.
#   tests/fuzz/transfer/run.sh [RUNS]     RUNS: executions (default 20000)
# Env: FUZZ_BUILD (build dir, default build-fuzz-transfer), CXX_FUZZ (default clang++), FUZZ_JOBS (compile
# jobs, default 2), FUZZ_MAX_LEN (longest input, default 8192), FUZZ_SECONDS (also stop after this long).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
source "$here/../lib.sh"
runs="${1:-20000}"
target=wire_fuzz
build="${FUZZ_BUILD:-$root/build-fuzz-transfer}"
mkdir -p "$build/obj" "$build/seeds"
cxx="${CXX_FUZZ:-clang++}"
command -v "$cxx" >/dev/null || { echo "run.sh: $cxx not found (apt-get install clang libclang-rt-14-dev)"; exit 1; }

# UBSan too when this clang links it; undefined behaviour then aborts like an ASan report.
sanitize=address
probe="$build/ubsan_probe"
if [ ! -f "$probe.result" ]; then
  printf '#include <cstddef>\n#include <cstdint>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n' >"$probe.cc"
  if "$cxx" -fsanitize=fuzzer,address,undefined "$probe.cc" -o "$probe" 2>/dev/null; then echo yes >"$probe.result"; else echo no >"$probe.result"; fi
fi
[ "$(cat "$probe.result")" = yes ] && sanitize=address,undefined

flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -fno-sanitize-recover=all -I"$root")
libs=($(pkg-config --libs absl_status absl_statusor absl_strings))

# The decoders and what runs on their results, compiled once and rebuilt when a source or a header of
# theirs changes (or the sanitizers do).
sources=("$root"/common/transfer/{wire,handshake,device_ipc,transport}.cc)
newest_header="$(ls -t "$root"/common/transfer/{wire,handshake,device_ipc,transport}.h "$root/common/core/status.h" "$probe.result" | head -1)"
compile_objects "$sanitize" "$newest_header" "${sources[@]}"

stale() {  # stale BINARY SOURCE: the binary is missing or older than its source or an object
  [ ! -f "$1" ] || [ "$2" -nt "$1" ] || [ -n "$(find "$build/obj" -newer "$1" -name '*.o' | head -1)" ]
}
binary="$build/$target"
if stale "$binary" "$here/$target.cc"; then
  "$cxx" "${flags[@]}" -fsanitize=fuzzer,"$sanitize" "$here/$target.cc" "${objects[@]}" "${libs[@]}" -o "$binary"
fi
seeder="$build/make_seeds"
if stale "$seeder" "$here/make_seeds.cc"; then
  "$cxx" "${flags[@]}" -fsanitize="$sanitize" "$here/make_seeds.cc" "${objects[@]}" "${libs[@]}" -o "$seeder"
fi
"$seeder" "$build/seeds" >/dev/null

corpus="$build/corpus"
mkdir -p "$corpus"
echo "== $target ($sanitize): $runs runs"
if ! "$binary" -runs="$runs" -max_total_time="${FUZZ_SECONDS:-0}" -max_len="${FUZZ_MAX_LEN:-8192}" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 \
     -print_final_stats=1 -artifact_prefix="$build/$target-" "$corpus" "$build/seeds" 2>"$build/$target.log"; then
  tail -40 "$build/$target.log"
  exit 1
fi
grep -E "cov: " "$build/$target.log" | tail -1
grep -E "stat::number_of_executed_units|stat::average_exec_per_sec|Done" "$build/$target.log" | tail -3
