#!/usr/bin/env python3
"""Compares the machine code (SASS) of every CUDA kernel in two sets of object files, to check that a refactor
of kernel code changed no instruction. Kernels are matched by mangled name with the anonymous-namespace tag
(which depends on the file name) removed, so kernels that moved between files still pair up; instruction
addresses and column padding are ignored.

  tools/scripts/sass-diff.py [--cuobjdump PATH] BEFORE.o [...] -- AFTER.o [...]

Objects: build each version (for example `ninja -C build-cuda` before and after, copying
build-cuda/common/kernels/cuda/CMakeFiles/tandem_kernels_cuda.dir/<file>.cu.o aside in between). cuobjdump
comes with the CUDA toolkit, or the PyPI wheel nvidia-cuda-cuobjdump. Exit status 0 when every kernel is the
same and none is missing on either side, 1 otherwise.
"""
import argparse
import re
import shutil
import subprocess
import sys

_ANON = re.compile(r"\d+_GLOBAL__N__[0-9a-f]+_\d+_\w+?_cu_[0-9a-f]+")
_INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]{4,}\*/")


def kernels(cuobjdump, objects):
    found = {}
    for path in objects:
        dump = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
        for part in dump.split("Function : ")[1:]:
            head, _, body = part.partition("\n")
            name = _ANON.sub("ANON", head.strip())
            found[name] = [" ".join(re.sub(r"/\*[0-9a-fx]+\*/", "", line).split())
                           for line in body.split("\n") if _INSTRUCTION.match(line)]
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump")
    parser.add_argument("objects", nargs="+", help="BEFORE objects, then --, then AFTER objects")
    args = parser.parse_args()
    argv = sys.argv[1:]
    if "--" not in argv:
        parser.error("separate the two sets with --")
    split = argv.index("--")
    before_objects = [a for a in argv[:split] if a in args.objects]
    after_objects = argv[split + 1:]
    if not before_objects or not after_objects:
        parser.error("need objects on both sides of --")
    before, after = kernels(args.cuobjdump, before_objects), kernels(args.cuobjdump, after_objects)
    status = 0
    for name in sorted(set(before) | set(after)):
        if name not in after or name not in before:
            print(f"only {'before' if name in before else 'after'}: {name}")
            status = 1
        elif before[name] != after[name]:
            print(f"differs ({len(before[name])} -> {len(after[name])} instructions): {name}")
            status = 1
    print(f"{len(before)} kernels before, {len(after)} after: {'same machine code' if status == 0 else 'NOT the same'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
