"""C kernels for int4 experts (csrc/native.c), built at first use: with int8 activations
(Int4Experts(activations="int8")), and weight-only (fp32 rows).

    int4_a8(x8 [R, K] int8, sx [R, G] fp32, xi [R, G] int32, q [N, K/2] u8, s [N, G], z [N, G] u8 or none)
        -> out [R, N] fp32
    out[r, j] = sum_g (s[j, g] * sx[r, g]) * (sum_{k in g} x8[r, k] q[j, k]  -  z[j, g] * xi[r, g])

where x8 are the rows rounded to int8 per group of the weights' group size (steps sx, moec.quant.int8_quantized_rows)
and xi[r, g] = sum_{k in g} x8[r, k]; z is 8 for symmetric groups. Each group's sum, zero point included, is an
exact integer (int32, and exact in fp32: below 15 * 127 * 128 < 2^24), so nothing cancels in floating point (a
row whose group holds one large input and small ones is no less accurate); it meets its two scales in vector
lanes, 8 groups at a time.

Layout: moec's int4 format as stored (byte i of a row holds k = 2i in its low nibble, 2i + 1 in its high one),
so 16 bytes unpack into 32 nibbles as (the low ones | the high ones) with a shift and a mask: the rows x8 come
with each 32 inputs in the same order (evens, then odds; `pack`, in C as well: the serial numba loop it replaced
took 20-25% of the experts op at prefill). The nibbles are unsigned
and x8 signed, which is what vpdpbusd multiplies (AVX512-VNNI); without VNNI, vpmaddubsw + vpmaddwd (the int16
pair sums stay below 2 * 15 * 127, no saturation). With AVX-512, tiles of 4 channels x up to 4 rows: a vector
holds 16 bytes of each of the 4 channels, so the products need no horizontal sums until each group's (tile_a8;
1.4-1.5x the per-channel kernel at 2-16 rows an expert, the same at one row, where the weights' reading sets the
time). moec_int4_tiles: the same tiles on weights laid out so that a tile of 4 channels is one sequential
stream (ort_layouts.tiled; the ONNX Runtime ops use it, 1.11-1.15x at decode). AVX2 only, or a thread's last
chunk of fewer than 4 channels: one channel at a time (row_dot), each channel's nibbles unpacked once into a buffer of K bytes that every row reads. Why C: LLVM does not emit either instruction from numba's
loops, and this kernel runs 4-5x faster than the numba int4 kernel at one token, at the memory bound; it takes
every row at prefill too (torch_backend.NATIVE_MIN_ROWS; docs/benchmarks.md).

    int4_f32(x [R, K] fp32, q, s, z) -> out [R, N] fp32,   out[r, j] = sum_k x[r, k] * (s[j, g(k)] * (q[j, k] - z[j, g(k)]))

Weight-only: each group's 16 possible weights s * (i - z) (moec.quant.dequantize's numbers to the bit) sit in one
vector and each nibble looks its weight up (vpermps), so a product is the input times the dequantized weight,
summed in fp32 as a plain dot product would (the numba kernel takes the zero point off a group's sum, which
cancels). Rows 4 at a time share each lookup; 1.2-2.3x the numba kernel at one row, 3.7-4.9x at 8, and it
takes every row at prefill too (NATIVE_MIN_ROWS). AVX2 only (vpermps reads 8 lanes): each weight computed as
read, s * (q - z), the same number as the lookup's; the sums in 8 lanes, so not the AVX-512 build's bits.

Threads: a numba prange over chunks of output channels calls the C function (one thread pool in the
process, numba's, as for the other kernels); numba finds the function by its symbol in the library, loaded
before any launcher runs, so the launcher stays in numba's disk cache.

Built with the system C compiler (`cc -O3 -march=native`) into moec's cache directory, keyed by the source,
the compiler and the CPU's flags; not available (None from `library()`, reason logged once) without a compiler,
on a CPU without AVX2 and FMA, or with MOEC_NATIVE=0: grouped_qmm then multiplies the rounded rows by each
expert's dequantized weights (fp32 GEMMs: the same numbers up to the order of fp32 sums, slower at decode).
The library also holds greedy search's step between two session runs (csrc/greedy.c, ort_generate's `loop`
calls it through ctypes; numpy does the same without it).
CC may hold a command with arguments (e.g. "ccache gcc").
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import llvmlite.binding as llvm
import numpy as np
from numba import prange, types

from moec.backends import c_source
from moec.backends.cpu_quant import CHUNK, _jit
from moec.log import log

SOURCE = c_source("native.c")  # the kernels, in this library and ort_kernels' custom-op library
LIBRARY = SOURCE + c_source("greedy.c")  # and greedy search's step (ort_generate)

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
_I64 = types.int64
# pointers travel as int64 (the x86-64 calling convention passes both in the same registers)
_int4 = types.ExternalFunction("moec_int4", types.void(*[_I64] * 13))
_pack_a8 = types.ExternalFunction("moec_pack_a8", types.void(*[_I64] * 8))
_NO_SX, _NO_XI = np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32)  # fp32 rows: no steps


def _cache_dirs():
    """Where a built library may live: beside this file (as numba's cache), then the user's cache directory."""
    yield Path(__file__).parent / "__pycache__"
    yield Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moec"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(flags: tuple[str, ...] = FLAGS, source: str = SOURCE, stem: str = "moec_native") -> Path:
    """The library for (source, compiler, flags, CPU), compiled once into the first writable cache directory
    (csrc/native.c; backends/ort_kernels.py adds its ops to them). RuntimeError where it cannot be (no
    compiler for x86-64, the compiler failed, nowhere to write)."""
    cc = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not cc or sys.platform == "win32" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError("no C compiler for x86-64 found (install gcc or clang)")
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{' '.join(cc)} --version failed: {e}") from None
    key = "\n".join([source, *cc, version, " ".join(flags), _cpu_flags()])
    name = f"{stem}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    for d in _cache_dirs():
        if (d / name).exists():
            return d / name
    errors = []
    for d in _cache_dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                src, lib = Path(tmp) / f"{stem}.c", Path(tmp) / name
                src.write_text(source)
                subprocess.run([*cc, *flags, "-o", str(lib), str(src)], check=True, capture_output=True, text=True,
                               timeout=120)
                os.replace(lib, d / name)  # atomic: a concurrent build writes the same bytes
            return d / name
        except subprocess.CalledProcessError as e:
            err = e.stderr.strip().splitlines()  # the first error names its file and line in csrc/
            first = next((line for line in err if "error" in line), err[-1] if err else e)
            raise RuntimeError(f"{' '.join(cc)} failed: {first}") from None
        except (OSError, subprocess.SubprocessError) as e:  # not writable (or a hung compiler): the next directory
            errors.append(f"{d}: {e}")
    raise RuntimeError("could not build in any cache directory (" + "; ".join(errors) + ")")


@functools.cache
def library() -> Path | None:
    """The built library (kernels and greedy.c), loaded into the process (numba's launchers call into it), or
    None where it cannot be built or MOEC_NATIVE=0: the reason is logged once."""
    if os.environ.get("MOEC_NATIVE", "1") == "0":
        return None
    try:
        path = build(source=LIBRARY)
        llvm.load_library_permanently(str(path))
    except (RuntimeError, OSError) as e:
        log.warning("moec: the native kernels are not built (%s): int4 experts with int8 activations multiply "
                    "their rounded rows by dequantized weights instead (fp32 GEMMs), weight-only int4 runs moec's "
                    "numba kernels, greedy search on onnxruntime picks its tokens in numpy (all slower)", e)
        return None
    return path


@_jit(parallel=True)
def _int4_kernel(x, sx, xi, first, last, q, s, z, out):
    """Rows first[e]:last[e] of expert e: x [R, K] int8 with sx [R, G] fp32 and xi [R, G] int32 (`pack`), or fp32 in
    the kernel's order with sx and xi empty (`int4_f32`); q [E, N, K/2] u8, s [E, N, G] fp32, z [E, N, G] u8 or empty
    (symmetric) -> out [R, N] fp32. The arrays are the caller's: numba frees an array it made after its last use,
    which here is taking its address."""
    E, N, G = s.shape
    R, K = x.shape
    K2 = q.shape[2]
    a8 = sx.size > 0
    # addresses as int64 (numba widens uintp + int64 to float64)
    px, psx, pxi = np.int64(x.ctypes.data), np.int64(sx.ctypes.data), np.int64(xi.ctypes.data)
    pq, ps, pz, po = np.int64(q.ctypes.data), np.int64(s.ctypes.data), np.int64(z.ctypes.data), np.int64(out.ctypes.data)
    for c in prange((N + CHUNK - 1) // CHUNK):
        for e in range(E):
            n = last[e] - first[e]
            if n == 0:
                continue
            zp = np.int64(0) if z.size == 0 else pz + e * N * G
            _int4(px + first[e] * K * x.itemsize, psx + first[e] * G * 4 if a8 else np.int64(0),
                  pxi + first[e] * G * 4 if a8 else np.int64(0), n, K, pq + e * N * K2, ps + e * N * G * 4, zp, G,
                  po + first[e] * N * 4, N, c * CHUNK, min(N, c * CHUNK + CHUNK))


def has_tiles() -> bool:
    """Whether the loaded library has the tile-layout kernel (moec_int4_tiles: AVX-512 F/BW/VL builds; the ONNX
    Runtime library is built from the same source with the same flags)."""
    lib = library()
    return lib is not None and _has_symbol(lib, "moec_int4_tiles")


def has_vnni512() -> bool:
    """Whether the loaded library was built with AVX512-VNNI (the ONNX Runtime library, built from the same source
    with the same flags, then has moec_panels_a8: int8 rows on int8 weights)."""
    lib = library()
    return lib is not None and _has_symbol(lib, "moec_vnni512")


def has_bf16() -> bool:
    """Whether the loaded library was built with AVX512-BF16 (the ONNX Runtime library, built from the same source
    with the same flags, then has moec_pairs: bf16 rows on bf16 weights)."""
    lib = library()
    return lib is not None and _has_symbol(lib, "moec_bf16")


@functools.cache
def _has_symbol(lib: Path, name: str) -> bool:
    """Whether `name` is loaded (looked up once per library: the op asks at every call)."""
    return llvm.address_of_symbol(name) is not None


def int4_f32(x: np.ndarray, first: np.ndarray, last: np.ndarray, q: np.ndarray, s: np.ndarray, z: np.ndarray,
             out: np.ndarray) -> None:
    """Weight-only int4 (fp32 rows x [R, K]) on the C kernel: rows first[e]:last[e] of expert e
    -> out [R, N]. Every product is a row's input times the dequantized weight (moec.quant.dequantize's numbers),
    summed in fp32. Shapes as `int4_a8`, with groups of 32, 64 or 128 inputs."""
    R, K = x.shape
    if (not all(a.flags.c_contiguous for a in (q, s, z, out)) or x.dtype != np.float32
            or K // s.shape[-1] not in (32, 64, 128) or out.shape != (R, q.shape[1])):  # kept under python -O
        raise ValueError("moec: cpu_native.int4_f32 takes C-contiguous arrays, fp32 rows and groups of 32/64/128")
    xk = np.ascontiguousarray(x.reshape(R, K // 32, 16, 2).swapaxes(2, 3).reshape(R, K))  # each 32: evens, odds
    _int4_kernel(xk, _NO_SX, _NO_XI, first, last, q, s, z, out)


PACK_ROWS = 8  # rows per parallel work item of `pack`


@_jit(parallel=True)
def _pack_kernel(x, g, x8, sx, xi):
    R, K = x.shape
    px, p8, psx, pxi = np.int64(x.ctypes.data), np.int64(x8.ctypes.data), np.int64(sx.ctypes.data), np.int64(xi.ctypes.data)
    for c in prange((R + PACK_ROWS - 1) // PACK_ROWS):
        _pack_a8(px, K, g, p8, psx, pxi, c * PACK_ROWS, min(R, c * PACK_ROWS + PACK_ROWS))


def pack(x: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [R, K] fp32 (C-contiguous) -> x8 [R, K] int8, each group of K/G inputs of a row rounded to int8 (the numbers
    of cpu_quant.group_step and round_int8: moec.quant.int8_quantized_rows) and each 32 inputs stored as (the even
    ones | the odd ones), the kernel's order; sx [R, G] fp32 the steps; xi [R, G] int32 each group's sum. A group
    holding NaN or inf gets a NaN step (its rows' outputs NaN, as the reference's) and zeros. On the C library
    (moec_pack_a8), rows split over the threads."""
    R, K = x.shape
    x8, sx, xi = np.empty((R, K), np.int8), np.empty((R, G), np.float32), np.empty((R, G), np.int32)
    _pack_kernel(x, K // G, x8, sx, xi)
    return x8, sx, xi


def int4_a8(x: np.ndarray, first: np.ndarray, last: np.ndarray, q: np.ndarray, s: np.ndarray, z: np.ndarray,
            out: np.ndarray) -> None:
    """Int8 activations on the C kernel (`_int4_kernel`), once `library()` is loaded. Every array C-contiguous with
    the shapes above (the C code reads raw pointers: the caller checks them, cpu_quant.grouped_qmm)."""
    if not all(a.flags.c_contiguous for a in (x, q, s, z, out)) or x.dtype != np.float32:  # kept under python -O
        raise ValueError("moec: cpu_native.int4_a8 takes C-contiguous arrays and fp32 rows")
    x8, sx, xi = pack(x, s.shape[-1])
    _int4_kernel(x8, sx, xi, first, last, q, s, z, out)
