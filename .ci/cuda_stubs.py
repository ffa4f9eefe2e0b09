"""Build stub CUDA libraries so a CUDA torch wheel imports on a CPU-only machine.

The torch wheels on PyPI link libtorch_cuda.so against cuBLAS, cuDNN, NCCL, ... (several GB of
nvidia-* wheels). Importing torch needs those files to exist and define the symbols torch uses;
on CPU none of them is ever called. This writes one small library per missing SONAME defining
every unresolved symbol as a function that aborts with a message, into torch/lib (on its RPATH).
Test-only: never install these where a GPU is used. The CUDA runtime (libcudart, found here in
/usr/local/cuda-13.0) should be real: torch.cuda.is_available() calls it (a stub would abort).
usage: VENV/bin/python .ci/cuda_stubs.py  (called by .ci/compat)
"""
import importlib.util
import pathlib
import re
import subprocess
import sys
import tempfile

lib_dir = pathlib.Path(importlib.util.find_spec("torch").origin).parent / "lib"


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def dyn_symbols(path, undefined):
    out = run("nm", "-D", "--undefined-only" if undefined else "--defined-only", str(path))
    syms = set()
    for line in out.splitlines():
        parts = line.split()
        if undefined and parts[0] != "U":  # weak references may stay unresolved
            continue
        syms.add(parts[-1].split("@")[0])
    return syms


libs = sorted(p for p in lib_dir.glob("*.so*") if p.is_file())
missing, present = set(), set(libs)
for lib in libs:
    for line in run("ldd", str(lib)).splitlines():
        m = re.match(r"\s*(\S+) => (not found|(\S+))", line)
        if m and m.group(2) == "not found":
            missing.add(m.group(1))
        elif m and m.group(3):
            present.add(pathlib.Path(m.group(3)).resolve())
missing.discard("libcuda.so.1")  # the driver: torch and triton dlopen it lazily and cope without
if not missing:
    sys.exit(f"nothing missing in {lib_dir}")

defined = set().union(*(dyn_symbols(p, False) for p in present))
needed = set().union(*(dyn_symbols(p, True) for p in libs)) - defined
src = ['#include <stdio.h>', '#include <stdlib.h>',
       'static void stub(void) { fputs("CUDA stub library called: this venv has no CUDA '
       'libraries (cuda_stubs.py)\\n", stderr); abort(); }']
src += [f'void {s}(void) __attribute__((alias("stub")));' for s in sorted(needed)]
with tempfile.TemporaryDirectory() as tmp:
    c = pathlib.Path(tmp) / "stub.c"
    c.write_text("\n".join(src) + "\n")
    for soname in sorted(missing):
        run("gcc", "-shared", "-fPIC", "-o", str(lib_dir / soname), f"-Wl,-soname,{soname}", str(c))
print(f"{len(missing)} stub libraries ({len(needed)} symbols) in {lib_dir}: {' '.join(sorted(missing))}")
