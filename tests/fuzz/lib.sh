# What the fuzz targets' run.sh scripts share (sourced, with build, cxx and flags set).

# compile_objects SANITIZE NEWEST_HEADER SOURCE...: each source into $build/obj/<name>.o with "${flags[@]}" and
# -fsanitize=fuzzer-no-link,SANITIZE, FUZZ_JOBS (default 2) at a time, where the object is missing or older
# than its source or NEWEST_HEADER. Sets objects=(...) in the sources' order.
compile_objects() {
  local sanitize="$1" newest_header="$2" source object pid
  shift 2
  local pids=()
  objects=()
  for source in "$@"; do
    object="$build/obj/$(basename "${source%.cc}").o"
    objects+=("$object")
    if [ ! -f "$object" ] || [ "$source" -nt "$object" ] || [ "$newest_header" -nt "$object" ]; then
      "$cxx" "${flags[@]}" -fsanitize=fuzzer-no-link,"$sanitize" -c "$source" -o "$object" &
      pids+=($!)
      if [ ${#pids[@]} -ge "${FUZZ_JOBS:-2}" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}
