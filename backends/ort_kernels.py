"""moec's kernels inside an ONNX Runtime session: a custom-op library (backend="onnxruntime").

    moec::Int4Experts(x [T, H] fp32, ids [T, k] int64, w [T, k] fp32,
                      q13 u8 [E, 2I, H/2], s13 [E, 2I, H/g] fp32, z13 u8 [E, 2I, H/g] or [0],
                      q2 u8 [E, H, I/2], s2 [E, H, I/g] fp32, z2 u8 [E, H, I/g] or [0];
                      int8_activations, gate_up, tiles) -> y [T, H] fp32
        y[t] = sum_j w[t, j] * W2[e] (silu(gate) * up)(W13[e] x[t]),  e = ids[t, j]

    moec::Int4MatMul(x [..., K] fp32, q u8 [N, K/2], s [N, K/g] fp32, z u8 [N, K/g] or absent; int8_activations, tiles)
        -> y [..., N] = x W^T,  W = (q - z) * s  (z 8 if absent): a dense layer's MatMulNBits (moec.export_dense)

Int4Experts: what moec::experts_int4 computes for gated SiLU experts without biases (Mixtral, Qwen-MoE, DeepSeek, ...), weights
in moec's int4 format as stored (moec.quant), on the kernels of backends/cpu_native.py (the same C source is built
into this library): int8_activations, each GEMM input rounded to int8 per group of the weights (moec_pack_a8) and
int8 dot products; else fp32 rows (AVX-512 builds only). Routing stays in the graph (ids and w are its outputs),
so the op takes any router moec proves. The step: sort the (token, slot) pairs by expert, round (or reorder) each
token's row once, FC1 over (expert, chunk of output channels) work items, SiLU-and-multiply and round each row,
FC2 likewise, then each token's weighted sum in slot order, as moec's torch op (backends/torch_backend.py
`_native_int4`). Threads: ONNX Runtime's own intra-op pool (OrtApi::KernelContext_ParallelFor), so the kernels
and the session's other nodes share one pool. Int4MatMul runs the same phases with one expert taking every row.

Why: measured against ORT's own ops on the same weights (docs/benchmarks.md), the experts op takes 10-20% less
time than QMoE at 64 tokens and the same at one; the dense MatMulNBits stream ~15 GB/s at one row where this
kernel reaches 20-27; whole decode 1.03-1.22x, prefill 1.1-1.3x.

The ABI: the onnxruntime wheel ships no C headers, so the declarations below are ours, from ONNX Runtime's
onnxruntime_c_api.h (API version 20 or later): OrtApi is a table of function pointers that only grows, used here
by index; registration checks one index against a known string (GetBuildInfoString) and fails (the session
refuses the library, moec keeps QMoE) if the table is not laid out as expected. OrtCustomOp version 16: the V2
callbacks, which return a status (shape errors reach the caller as an ORT error, not a crash).

tiles=1 (int8 activations, AVX-512 builds, every matrix's N a multiple of 4): q and s in the tile layout (`tiled`,
the same shapes): a tile of 4 output channels is one sequential stream, each 32-input block of its 4 channels one
64-byte load and each step's 16 scales another, where moec's layout makes 4 loads of 16 bytes from 4 rows apart
(`tile_weights` lays out the session's file so: decode and prefill 1.11-1.15x on the benchmark models,
docs/benchmarks.md). The same numbers: the kernel sums the same products in the same order.

tiles=2 (weight-only, AVX-512 builds, every matrix's N a multiple of 32): q, s and z in panels of 32 channels
(`int4_panels`, the same shapes), run by the fp32 panel kernel below, each weight made (q - z) * s as it is read:
at prefill a panel's part is widened once into L1 and every row block reads it there, so 512 tokens take the fp32
experts' time (the old per-channel kernel unpacked each weight again per 4 rows: 1.65x that on a mix layer),
decode as before or faster. Its own sums (the panels' order), batch-invariant like every panel op.

Weights in panels (AVX-512 builds): one GEMM over panels of 32 output channels, [ceil(N/32), K, 32] (`panels`),
for fp32, bf16 and int8 (a scale per channel) weights:

    moec::Experts(x, ids, w, w13 [E, ceil(2I/32), H, 32], w2 [E, ceil(H/32), I, 32]; gate_up) -> y [T, H]
    moec::ExpertsBf16 (w13, w2 bf16), moec::ExpertsInt8(..., w13 i8, w2 i8, s13 [E, 2I], s2 [E, H])
    moec::Linear(x [..., K], w [ceil(n/32), K, 32]; n) -> y [..., n],  LinearBf16, LinearInt8(x, w i8, s [n])

the same phases as Int4Experts (Linear: one expert taking every row); each output the same sum of its K
products (even k, odd k, then the two) whatever the rows of the call. `panel_weights` lays out the Experts nodes
of the session's file (export_dense.moec_fp32_matmuls the Linear ones), `narrow_bf16` stores weights that are all
bf16 numbers in bf16.

ExpertsBf16 / LinearBf16 with bf16_rows=1 (`round_rows`: a bf16 model's nodes, AVX512-BF16 builds, every K even):
each GEMM input row rounded to bf16 as the bf16 model's activations are (`bf16_row`), the weights in pairs
[ceil(N/32), K/2, 64] (`pair_bf16`) and one vdpbf16ps per 2 inputs of 16 channels: the products exact, fp32 sums. Against the fp32 rows on
the same bf16 weights, one mix layer's experts at 64 and 512 tokens in 0.58x the time (twice the multiply-adds an
instruction); whole prefill at 512 tokens 1.5-2.1x (docs/benchmarks.md).

ExpertsInt8 / LinearInt8 with int8_activations=1 (Int8Experts(activations="int8"), AVX512-VNNI builds): each GEMM
input row rounded to int8 at one step (moec_pack_a8 with one group), the weights in panels of 16 channels
[ceil(N/16), K/4, 64] bytes (`panels_a8`), 4 inputs of 16 channels a 64-byte load and one vpdpbusd a row; exact
int32 sums, then times the channel's scale and the row's step: the torch backend's numbers (to the bit where it
runs moec's kernels; its torch._int_mm path rounds its SiLU by an ulp apart). Against the weight-only panels, one
mix layer's experts (in the L3): 1.16x at one token, 2.1x at 64, 3.6x at 512 (docs/benchmarks.md).

The same library holds moec::CachedAttention (backends/ort_attention.py: its source is built in after these ops),
and export_dense merges the Int4MatMuls of one input (q/k/v) into one node.

Built like cpu_native's library (the system C compiler, moec's cache directory), with that file's kernels;
`library()` is None where it cannot be (no compiler, no AVX2/FMA, MOEC_NATIVE=0, onnxruntime older than 1.20):
lower_onnx then keeps ORT's QMoE.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from moec.log import log

DOMAIN = "moec"
OP = "Int4Experts"
EXPERTS = "Experts"  # fp32 weights in panels (ExpertsBf16: in bf16, narrow_bf16; ExpertsInt8: moec's Int8Experts)
FP32_MATMUL = "Linear"  # one fp32 matrix in panels: a dense layer's MatMul (moec.export_dense.moec_fp32_matmuls)
MATMUL = "Int4MatMul"  # one matrix: a dense layer's MatMulNBits (moec.export_dense.moec_matmuls)
GATE_UP = {"halves": 0, "halves_up_first": 1, "interleave": 2, "interleave_up_first": 3}  # moec.ir.GATE_UPS
MIN_ORT = (1, 20)

OP_SOURCE = r"""
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#define EXPORT __attribute__((visibility("default")))  /* built with -fvisibility=hidden: the kernels stay ours */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TILES  /* moec_int4_tiles is built */
#endif

/* ---- ONNX Runtime's C ABI, as much of it as this op uses (onnxruntime_c_api.h) ---- */
typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtShapeInfo OrtShapeInfo;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef void *const *OrtApiTable;  /* struct OrtApi: function pointers in a fixed order that only grows */
typedef struct { OrtApiTable (*GetApi)(uint32_t); const char *(*GetVersionString)(void); } OrtApiBase;
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2, T_FLOAT = 1, T_UINT8 = 2, T_INT8 = 3, T_INT64 = 7, T_BF16 = 16, REQUIRED = 0,
       OPTIONAL = 1 };
enum { CreateStatus = 0, CreateCustomOpDomain = 26, CustomOpDomain_Add = 27, AddCustomOpDomain = 28,  /* OrtApi */
       GetTensorMutableData = 51, GetDimensionsCount = 61, GetDimensions = 62, GetTensorTypeAndShape = 65,
       KernelInfoGetAttribute_float = 85, KernelInfoGetAttribute_int64 = 86, KernelContext_GetOutputCount = 89, KernelContext_GetInput = 90, KernelContext_GetOutput = 91,
       ReleaseStatus = 93, ReleaseTensorTypeAndShapeInfo = 99, GetBuildInfoString = 254, KernelContext_ParallelFor = 274 };
#define API_VERSION 20  /* GetApi(20): ONNX Runtime 1.20 or later, whose table holds every index above */

typedef struct OrtCustomOp {  /* version 16: the fields up to KernelComputeV2 */
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *, OrtApiTable, const OrtKernelInfo *);
    const char *(*GetName)(const struct OrtCustomOp *);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
    int (*GetInputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
    int (*GetOutputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
    void (*KernelCompute)(void *, OrtKernelContext *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, OrtApiTable, const OrtKernelInfo *, void **);
    OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
} OrtCustomOp;

static OrtApiTable api;
#define CALL(type, index, ...) ((OrtStatus *(*)type)api[index])(__VA_ARGS__)
#define CHECK(expr) do { OrtStatus *status_ = (expr); if (status_) return status_; } while (0)

static OrtStatus *error(const char *op, int code, const char *fmt, ...) {  /* "moec::<op>: ..." */
    char msg[320];
    va_list args;
    va_start(args, fmt);
    int n = snprintf(msg, sizeof msg, "moec::%s: ", op);
    vsnprintf(msg + n, sizeof msg - n, fmt, args);
    va_end(args);
    return ((OrtStatus *(*)(int, const char *))api[CreateStatus])(code, msg);
}

/* e^x of 8 floats, correctly rounded (glibc's expf rounds ~1 in 13000 the other way, near a tie): in double, x = n ln2
   + r with |r| <= ln2/2 (ln2 in two parts: r exact to ~1e-20), e^r to r^13 (~2e-16 relative), times 2^n, rounded
   once to float (denormals, 0 and inf as the float result is); NaN stays NaN */
static const double EXP_C[14] = {1.0 / 6227020800, 1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880,
                                  1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0};
/* one body for 4 doubles (AVX2, __m256d) and 8 (AVX-512, __m512d): W the width in bits; x in [-120, 100] */
#define EXP_D(NAME, W, VD, ROUND) INLINE VD NAME(VD x) { \
    VD n = ROUND(_mm##W##_mul_pd(x, _mm##W##_set1_pd(1.4426950408889634)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); \
    VD r = _mm##W##_fnmadd_pd(n, _mm##W##_set1_pd(6.93147180369123816490e-01), x); \
    r = _mm##W##_fnmadd_pd(n, _mm##W##_set1_pd(1.90821492927058770002e-10), r); \
    VD p = _mm##W##_set1_pd(EXP_C[0]); \
    for (int i = 1; i < 14; i++) p = _mm##W##_fmadd_pd(p, r, _mm##W##_set1_pd(EXP_C[i])); \
    /* 2^n: n + 2^52 + 1023 holds n + 1023 in its low bits, shifted into the exponent */ \
    VD e = _mm##W##_castsi##W##_pd(_mm##W##_slli_epi64(_mm##W##_castpd_si##W(_mm##W##_add_pd(n, _mm##W##_set1_pd(0x1p52 + 1023))), 52)); \
    return _mm##W##_mul_pd(p, e); \
}
EXP_D(exp4d, 256, __m256d, _mm256_round_pd)
#ifdef __AVX512F__
EXP_D(exp8d, 512, __m512d, _mm512_roundscale_pd)
#endif

INLINE __m256 exp8(__m256 x) {
    __m256 c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-120.f)), _mm256_set1_ps(100.f));
#ifdef __AVX512F__  /* the 8 lanes in one register: the same operations on each, 1.7x as fast (checked on every float) */
    __m256 e = _mm512_cvtpd_ps(exp8d(_mm512_cvtps_pd(c)));
#else
    __m256 e = _mm256_set_m128(_mm256_cvtpd_ps(exp4d(_mm256_cvtps_pd(_mm256_extractf128_ps(c, 1)))),
                               _mm256_cvtpd_ps(exp4d(_mm256_cvtps_pd(_mm256_castps256_ps128(c)))));
#endif
    return _mm256_blendv_ps(e, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

INLINE float exp1(float x) {  /* exp8's number for one float (a loop's tail) */
    return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x)));
}

/* ---- the op ---- */
#define OP "Int4Experts"
#define MM "Int4MatMul"
enum { NIN = 9, CH = 64 };  /* inputs; output channels per work item (a multiple of the kernel's tile of 4) */
static const int in_types[NIN] = {T_FLOAT, T_INT64, T_FLOAT, T_UINT8, T_FLOAT, T_UINT8, T_UINT8, T_FLOAT, T_UINT8};
static const char *in_names[NIN] = {"x", "ids", "w", "q13", "s13", "z13", "q2", "s2", "z2"};

enum { WT_F32 = 0, WT_BF16 = 1, WT_I8 = 2, WT_I4 = 3, WT_BF16_ROWS = 4 };  /* BF16_ROWS: bf16 rows on bf16 pairs */
typedef struct { int64_t a8, gate_up, tiles, n, wt; } Kernel;  /* wt: the panels' weight type, WT_* */

typedef struct {  /* one matrix of every expert, moec's int4 format: q [E, N, K/2], s [E, N, G], z [E, N, G] or NULL;
                   tiles: q and s in the tile layout (moec_int4_tiles); or weights in panels f [E, P, K, 32] of type
                   wt (int8: times the channel's scale sc [E, N]) */
    const uint8_t *q; const float *s; const uint8_t *z; int64_t N, K, G; int tiles; const void *f; int wt;
    const float *sc;
} Matrix;

#ifdef __AVX512F__
/* fp32 weights in panels: panel p of a matrix [N, K] holds channels 32p..32p+31 as [K][32] (zeros past N), so a
   panel is one sequential stream and a row's 32 outputs take one broadcast of x[r, k] and two FMAs per k. Each
   output sums its products of even k in order, those of odd k in order, then the two (panel_rows), whatever the
   row count: a token's numbers do not depend on its batch. Rows go MR at a time over KC inputs of the panel
   (32 KB, L1-resident while the row blocks reuse it).
   bf16: the same panels in bf16 (half the bytes), each k's 32 channels stored interleaved (c0, c16, c1, c17, ...:
   narrow_bf16) so that a shift and a mask widen them to fp32 (exact; 1.4x as fast as a widening shuffle on
   weights in the L3), so the products and sums are the fp32 kernel's on the same values. int8 (moec's
   Int8Experts: a scale per channel): the integers widened to fp32 (exact), their products with x summed, the sum
   times the channel's scale. int4 (moec's Int4Experts weight-only, tiles=2: `int4_panels`): each k's 32 channels
   in 16 bytes (channel c in the low nibble of byte c, c + 16 in the high one), the groups' scales (and zero points)
   as [G][32]; each weight made (q - z) * s, moec's dequantized value (one rounding: q - z is exact), then the fp32
   kernel's products and sums. */
enum { PANEL = 32, MR = 6, KC = 256 };
#define PANEL_BYTES(wt, K) ((K) * ((wt) == WT_F32 ? 128 : (wt) == WT_BF16 || (wt) == WT_BF16_ROWS ? 64 : (wt) == WT_I8 ? 32 : 16))
typedef struct { const float *s; const uint8_t *z; int shift; } Groups;  /* int4: a panel's [G][32]; 2^shift k a group */
INLINE void panel_load(const void *w, int64_t k, int wt, Groups g, __m512 *w0, __m512 *w1) {
    if (wt == WT_I4) {
        /* q - 8 looked up by nibble (vpermps reads an index's low 4 bits); with zero points, q, less z */
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 table = g.z ? iota : _mm512_sub_ps(iota, _mm512_set1_ps(8));
        __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)w + k * 16)));
        __m512 lo = _mm512_permutexvar_ps(i, table), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(i, 4), table);
        int64_t at = (k >> g.shift) * PANEL;
        if (g.z) {
            lo = _mm512_sub_ps(lo, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(g.z + at)))));
            hi = _mm512_sub_ps(hi, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(g.z + at + 16)))));
        }
        *w0 = _mm512_mul_ps(lo, _mm512_loadu_ps(g.s + at));
        *w1 = _mm512_mul_ps(hi, _mm512_loadu_ps(g.s + at + 16));
    } else if (wt == WT_BF16) {  /* channels interleaved (c0, c16, c1, c17, ...: narrow_bf16): widened without a shuffle */
        __m512i b = _mm512_loadu_si512((const uint16_t *)w + k * PANEL);
        *w0 = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
        *w1 = _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u)));
    } else if (wt == WT_I8) {
        __m256i b = _mm256_loadu_si256((const __m256i *)((const int8_t *)w + k * PANEL));
        *w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        *w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    } else {
        *w0 = _mm512_loadu_ps((const float *)w + k * PANEL);
        *w1 = _mm512_loadu_ps((const float *)w + k * PANEL + 16);
    }
}

/* rows x [nr, .] (K apart) times nk inputs of a panel w (at those inputs) into o; acc: onto the sums so far.
   Even and odd inputs go to two sets of sums, added at the end: two FMA chains, so that at decode a k step does
   not wait for the last FMA (fp32 experts from the cache 1.2x as fast). Every row count sums the same way. */
INLINE void panel_rows(const float *x, int64_t K, const void *w, int64_t nk, int acc, float *o, int64_t N,
                       int nr, __mmask16 m0, __mmask16 m1, int wt, Groups g) {
    __m512 a[MR][2], b[MR][2];
    UNROLL for (int r = 0; r < nr; r++) {
        a[r][0] = acc ? _mm512_maskz_loadu_ps(m0, o + r * N) : _mm512_setzero_ps();
        a[r][1] = acc ? _mm512_maskz_loadu_ps(m1, o + r * N + 16) : _mm512_setzero_ps();
        b[r][0] = b[r][1] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 2 <= nk; k += 2) {
        __m512 w0, w1, v0, v1;
        panel_load(w, k, wt, g, &w0, &w1);
        panel_load(w, k + 1, wt, g, &v0, &v1);
        UNROLL for (int r = 0; r < nr; r++) {
            __m512 xv = _mm512_set1_ps(x[r * K + k]), yv = _mm512_set1_ps(x[r * K + k + 1]);
            a[r][0] = _mm512_fmadd_ps(xv, w0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(xv, w1, a[r][1]);
            b[r][0] = _mm512_fmadd_ps(yv, v0, b[r][0]);
            b[r][1] = _mm512_fmadd_ps(yv, v1, b[r][1]);
        }
    }
    if (k < nk) {
        __m512 w0, w1;
        panel_load(w, k, wt, g, &w0, &w1);
        UNROLL for (int r = 0; r < nr; r++) {
            __m512 xv = _mm512_set1_ps(x[r * K + k]);
            a[r][0] = _mm512_fmadd_ps(xv, w0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(xv, w1, a[r][1]);
        }
    }
    UNROLL for (int r = 0; r < nr; r++) {
        _mm512_mask_storeu_ps(o + r * N, m0, _mm512_add_ps(a[r][0], b[r][0]));
        _mm512_mask_storeu_ps(o + r * N + 16, m1, _mm512_add_ps(a[r][1], b[r][1]));
    }
}

/* CALL(n) for a block of the remaining `left` rows, at most MR: constant row counts keep the accumulators in
   registers */
#define BY_ROWS(left, CALL) switch ((left) < MR ? (left) : MR) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; default: CALL(6); }

/* rows x [R, K] times inputs k0..k0+nk of a panel w (at k0) into out's 32 columns (masks m0, m1) */
INLINE void row_blocks(const float *x, int64_t R, int64_t K, int64_t k0, const void *w, int64_t nk, float *out,
                       int64_t N, __mmask16 m0, __mmask16 m1, int wt, Groups g) {
    for (int64_t r = 0; r < R; r += MR) {
#define ROWS(NR) panel_rows(x + r * K + k0, K, w, nk, k0 > 0, out + r * N, N, NR, m0, m1, wt, g)
        BY_ROWS(R - r, ROWS);
#undef ROWS
    }
}

/* out[r, j] = x[r] . W[j] for rows r < R of x [R, K], channels j0 <= j < j1 (j0 a multiple of 32), W [N, K] in
   panels w [ceil(N/32), K, 32] of type wt (int8: times sc[j]; int4: sc, z the groups' [ceil(N/32), G, 32], G groups
   of 32, 64 or 128 k); out's rows N apart */
INLINE void panels_any(const float *x, int64_t R, int64_t K, const void *w, float *out, int64_t N, int64_t j0,
                       int64_t j1, int wt, const float *sc, const uint8_t *z, int64_t G) {
    float buf[R > MR && wt != WT_F32 ? KC * PANEL : 1];
    int shift = wt == WT_I4 ? __builtin_ctzll((uint64_t)(K / G)) : 0;
    for (int64_t j = j0; j < j1; j += PANEL) {
        int64_t n = j1 - j < PANEL ? j1 - j : PANEL;
        __mmask16 m0 = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1), m1 = n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
        const char *wp = (const char *)w + j / PANEL * PANEL_BYTES(wt, K);
        for (int64_t k0 = 0; k0 < K; k0 += KC) {  /* KC a multiple of the groups: each part starts a group */
            int64_t nk = (k0 + KC < K ? k0 + KC : K) - k0;
            const void *wk = wp + PANEL_BYTES(wt, k0);
            int64_t at = wt == WT_I4 ? (j / PANEL * G + (k0 >> shift)) * PANEL : 0;
            Groups g = {wt == WT_I4 ? sc + at : NULL, z ? z + at : NULL, shift};
            if (R > MR && wt != WT_F32) {  /* several row blocks: this part of the panel widened once, into L1 */
                for (int64_t k = 0; k < nk; k++) {
                    __m512 w0, w1;
                    panel_load(wk, k, wt, g, &w0, &w1);
                    _mm512_storeu_ps(buf + k * PANEL, w0);
                    _mm512_storeu_ps(buf + k * PANEL + 16, w1);
                }
                row_blocks(x, R, K, k0, buf, nk, out + j, N, m0, m1, WT_F32, g);
            } else {
                row_blocks(x, R, K, k0, wk, nk, out + j, N, m0, m1, wt, g);
            }
        }
        if (wt == WT_I8) {  /* the channels' scales, once their sums are whole */
            __m512 s0 = _mm512_maskz_loadu_ps(m0, sc + j), s1 = _mm512_maskz_loadu_ps(m1, sc + j + 16);
            for (int64_t r = 0; r < R; r++) {
                float *o = out + r * N + j;
                _mm512_mask_storeu_ps(o, m0, _mm512_mul_ps(_mm512_maskz_loadu_ps(m0, o), s0));
                _mm512_mask_storeu_ps(o + 16, m1, _mm512_mul_ps(_mm512_maskz_loadu_ps(m1, o + 16), s1));
            }
        }
    }
}

static void moec_panels(const float *x, int64_t R, int64_t K, const void *w, float *out, int64_t N, int64_t j0,
                        int64_t j1, int wt, const float *sc, const uint8_t *z, int64_t G) {
    if (wt == WT_BF16) panels_any(x, R, K, w, out, N, j0, j1, WT_BF16, sc, z, G);
    else if (wt == WT_I8) panels_any(x, R, K, w, out, N, j0, j1, WT_I8, sc, z, G);
    else if (wt == WT_I4) panels_any(x, R, K, w, out, N, j0, j1, WT_I4, sc, z, G);
    else panels_any(x, R, K, w, out, N, j0, j1, WT_F32, sc, z, G);
}

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#define BF16_ROWS  /* moec_pairs is built */
/* bf16 weights and bf16 rows (a bf16 model's experts and dense layers, bf16_rows=1): the panels' k in pairs,
   [ceil(N/32), K/2, 32, 2] bf16 (`pair_bf16`: channel c's weights of k and k + 1 side by side), each row rounded to
   bf16 (as the model's own activations are: `bf16_row`). A step of 2 inputs is two 64-byte loads and, per row, two
   vdpbf16ps against the row's pair broadcast: each lane adds both products (exact in fp32) to its sum, rounding
   after each (denormal bf16 inputs count as zero), twice the multiply-adds of an fp32 FMA an instruction. Sums of
   even pairs and of odd pairs in two chains, added at the end, whatever the row count (batch-invariant). */
INLINE void pair_rows(const uint16_t *x, int64_t K, const uint16_t *w, int64_t np, int acc, float *o, int64_t N,
                      int nr, __mmask16 m0, __mmask16 m1) {
    __m512 a[MR][2], b[MR][2];
    UNROLL for (int r = 0; r < nr; r++) {
        a[r][0] = acc ? _mm512_maskz_loadu_ps(m0, o + r * N) : _mm512_setzero_ps();
        a[r][1] = acc ? _mm512_maskz_loadu_ps(m1, o + r * N + 16) : _mm512_setzero_ps();
        b[r][0] = b[r][1] = _mm512_setzero_ps();
    }
    int64_t p = 0;
    for (; p + 2 <= np; p += 2) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 64), w1 = (__m512bh)_mm512_loadu_si512(w + p * 64 + 32);
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(w + p * 64 + 64), v1 = (__m512bh)_mm512_loadu_si512(w + p * 64 + 96);
        UNROLL for (int r = 0; r < nr; r++) {
            int32_t x0, x1;
            memcpy(&x0, x + r * K + 2 * p, 4), memcpy(&x1, x + r * K + 2 * p + 2, 4);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(x0), yv = (__m512bh)_mm512_set1_epi32(x1);
            a[r][0] = _mm512_dpbf16_ps(a[r][0], xv, w0);
            a[r][1] = _mm512_dpbf16_ps(a[r][1], xv, w1);
            b[r][0] = _mm512_dpbf16_ps(b[r][0], yv, v0);
            b[r][1] = _mm512_dpbf16_ps(b[r][1], yv, v1);
        }
    }
    if (p < np) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 64), w1 = (__m512bh)_mm512_loadu_si512(w + p * 64 + 32);
        UNROLL for (int r = 0; r < nr; r++) {
            int32_t x0;
            memcpy(&x0, x + r * K + 2 * p, 4);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(x0);
            a[r][0] = _mm512_dpbf16_ps(a[r][0], xv, w0);
            a[r][1] = _mm512_dpbf16_ps(a[r][1], xv, w1);
        }
    }
    UNROLL for (int r = 0; r < nr; r++) {
        _mm512_mask_storeu_ps(o + r * N, m0, _mm512_add_ps(a[r][0], b[r][0]));
        _mm512_mask_storeu_ps(o + r * N + 16, m1, _mm512_add_ps(a[r][1], b[r][1]));
    }
}

/* out[r, j] = x[r] . W[j] for bf16 rows r < R of x [R, K] (K even), channels j0 <= j < j1 (j0 a multiple of 32), W
   [N, K] in pairs w [ceil(N/32), K/2, 64]; out's rows N apart. Each KC-input part of a panel (16 KB) stays in L1
   while the row blocks read it. */
static void moec_pairs(const uint16_t *x, int64_t R, int64_t K, const uint16_t *w, float *out, int64_t N, int64_t j0,
                       int64_t j1) {
    for (int64_t j = j0; j < j1; j += PANEL) {
        int64_t n = j1 - j < PANEL ? j1 - j : PANEL;
        __mmask16 m0 = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1), m1 = n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
        const uint16_t *wp = w + j / PANEL * K * PANEL;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            int64_t nk = (k0 + KC < K ? k0 + KC : K) - k0;
            for (int64_t r = 0; r < R; r += MR) {
#define ROWS(NR) pair_rows(x + r * K + k0, K, wp + k0 * PANEL, nk / 2, k0 > 0, out + r * N + j, N, NR, m0, m1)
                BY_ROWS(R - r, ROWS);
#undef ROWS
            }
        }
    }
}

/* v [K] rounded to bf16 (to nearest, ties to even, as torch's .bfloat16(): NaN stays NaN) into x [K] */
static void bf16_row(const float *v, int64_t K, uint16_t *x) {
    int64_t i = 0;
    for (; i + 16 <= K; i += 16) {
        __m512i u = _mm512_loadu_si512(v + i);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(_mm512_castsi512_ps(u), _mm512_castsi512_ps(u), _CMP_UNORD_Q);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
        _mm256_storeu_si256((__m256i *)(x + i), _mm512_cvtepi32_epi16(r));
    }
    for (; i < K; i++) {
        uint32_t u;
        memcpy(&u, v + i, 4);
        x[i] = v[i] != v[i] ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    }
}
#endif

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define I8A8  /* moec_panels_a8 is built */
/* int8 weights and int8 activations (Int8Experts(activations="int8"): a scale per channel, each row rounded to int8
   at one step, moec_pack_a8 with one group): panels of 16 channels, [ceil(N/16), K/4, 16, 4] bytes of w + 128
   (`panels_a8`; 128 past N), the k of each 32 in moec_pack_a8's order (the evens, then the odds). A step of 4
   inputs is one 64-byte load and, per row, one vpdpbusd against the row's 4 inputs broadcast: the 16 channels' sums
   of (w + 128) x, exact in int32 (|sum| <= K 255 127: K <= 65536), less 128 times the row's sum xi. Then as
   torch_backend._int8_gemm: float(sum) times the channel's scale, times the row's step. */
enum { P8 = 16, MR8 = 4 };
INLINE void a8_rows(const int8_t *x8, int64_t K, const uint8_t *w, const float *sx, const int32_t *xi, __m512 sc,
                    float *o, int64_t N, __mmask16 m, int nr) {
    __m512i a[MR8][2];  /* two chains a row: at decode a step does not wait for the last vpdpbusd */
    UNROLL for (int r = 0; r < nr; r++) a[r][0] = a[r][1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 8) {  /* K: a multiple of 32 */
        __m512i w0 = _mm512_loadu_si512(w + k * P8), w1 = _mm512_loadu_si512(w + (k + 4) * P8);
        UNROLL for (int r = 0; r < nr; r++) {
            int32_t x0, x1;
            memcpy(&x0, x8 + r * K + k, 4), memcpy(&x1, x8 + r * K + k + 4, 4);
            a[r][0] = _mm512_dpbusd_epi32(a[r][0], w0, _mm512_set1_epi32(x0));
            a[r][1] = _mm512_dpbusd_epi32(a[r][1], w1, _mm512_set1_epi32(x1));
        }
    }
    UNROLL for (int r = 0; r < nr; r++) {
        __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(a[r][0], a[r][1]), _mm512_set1_epi32(128 * xi[r]));
        __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), sc), _mm512_set1_ps(sx[r]));
        _mm512_mask_storeu_ps(o + r * N, m, y);
    }
}

/* out[r, j] for rows r < R of x8 [R, K] (steps sx [R], sums xi [R]), channels j0 <= j < j1 (j0 a multiple of 16) of
   panels w [ceil(N/16), K/4, 64] with scales s [N]; out's rows N apart */
static void moec_panels_a8(const int8_t *x8, const float *sx, const int32_t *xi, int64_t R, int64_t K,
                           const uint8_t *w, const float *s, float *out, int64_t N, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j += P8) {
        int64_t n = j1 - j < P8 ? j1 - j : P8;
        __mmask16 m = n == P8 ? 0xFFFF : (__mmask16)((1u << n) - 1);
        __m512 sc = _mm512_maskz_loadu_ps(m, s + j);
        const uint8_t *wp = w + j / P8 * K * P8;
        for (int64_t r = 0; r < R; r += MR8) {
#define ROWS(NR) a8_rows(x8 + r * K, K, wp, sx + r, xi + r, sc, out + r * N + j, N, m, NR)
            switch (R - r < MR8 ? R - r : MR8) {  /* constant row counts: the accumulators stay in registers */
            case 1: ROWS(1); break;
            case 2: ROWS(2); break;
            case 3: ROWS(3); break;
            default: ROWS(4);
            }
#undef ROWS
        }
    }
}
#endif
#endif

typedef struct {  /* one call */
    int a8, gate_up;
    int64_t T, k, H, I;
    const float *x, *w;
    Matrix m13, m2;
    int64_t *first, *active, *row_of, *token;  /* expert e's rows first[e]..first[e+1]; pair t*k+j's row; row's token */
    void *x1, *x2; float *s1, *s2; int32_t *i1, *i2;  /* FC1's and FC2's input rows (int8 + steps + sums, or fp32) */
    float *h, *a, *o, *y;  /* FC1's output [R, 2I]; an activation row per row [R, I]; FC2's output [R, H]; [T, H] */
    const Matrix *m; const void *in; const float *in_s; const int32_t *in_i; float *out;  /* the GEMM that runs */
} Step;

static int64_t row_bytes(const Step *s) {  /* an input row's element: int8, bf16 or fp32 */
    return s->a8 ? 1 : s->m13.wt == WT_BF16_ROWS ? 2 : 4;
}

static void gemm_item(void *p, size_t item) {  /* (active expert, CH output channels) of s->m */
    Step *s = p;
    const Matrix *m = s->m;
    int64_t chunks = (m->N + CH - 1) / CH, e = s->active[item / chunks], j0 = (int64_t)(item % chunks) * CH;
    int64_t r0 = s->first[e], G = m->G, j1 = j0 + CH < m->N ? j0 + CH : m->N;
#ifdef __AVX512F__
    if (m->f) {
#ifdef I8A8
        if (s->a8) {  /* int8 weights and rows (G = 1: a step and a sum a row) */
            moec_panels_a8((const int8_t *)s->in + r0 * m->K, s->in_s + r0, s->in_i + r0, s->first[e + 1] - r0, m->K,
                           (const uint8_t *)m->f + e * ((m->N + P8 - 1) / P8) * m->K * P8, m->sc + e * m->N,
                           s->out + r0 * m->N, m->N, j0, j1);
            return;
        }
#endif
#ifdef BF16_ROWS
        if (m->wt == WT_BF16_ROWS) {
            moec_pairs((const uint16_t *)s->in + r0 * m->K, s->first[e + 1] - r0, m->K,
                       (const uint16_t *)m->f + e * ((m->N + PANEL - 1) / PANEL) * m->K * PANEL, s->out + r0 * m->N,
                       m->N, j0, j1);
            return;
        }
#endif
        moec_panels((const float *)s->in + r0 * m->K, s->first[e + 1] - r0, m->K,
                    (const char *)m->f + e * ((m->N + PANEL - 1) / PANEL) * PANEL_BYTES(m->wt, m->K),
                    s->out + r0 * m->N, m->N, j0, j1, m->wt,
                    m->wt == WT_I4 ? m->s + e * m->N * G : m->sc ? m->sc + e * m->N : NULL,
                    m->wt == WT_I4 && m->z ? m->z + e * m->N * G : NULL, G);
        return;
    }
#endif
    const void *x = s->a8 ? (const void *)((const int8_t *)s->in + r0 * m->K) : (const void *)((const float *)s->in + r0 * m->K);
    const uint8_t *q = m->q + e * m->N * (m->K / 2), *z = m->z ? m->z + e * m->N * G : NULL;
#ifdef TILES
    if (m->tiles) {
        moec_int4_tiles(x, s->in_s + r0 * G, s->in_i + r0 * G, s->first[e + 1] - r0, m->K, q, m->s + e * m->N * G, z,
                        G, s->out + r0 * m->N, m->N, j0, j1);
        return;
    }
#endif
    moec_int4(x, s->a8 ? s->in_s + r0 * G : NULL, s->a8 ? s->in_i + r0 * G : NULL, s->first[e + 1] - r0, m->K, q,
              m->s + e * m->N * G, z, G, s->out + r0 * m->N, m->N, j0, j1);
}

/* fp32 row v [K] into the kernel's input row: int8 per group (a8: x8 [K], steps sx [K/g], sums xi [K/g]), or each
   32 inputs as (the evens | the odds) */
static void kernel_row(const Step *s, const float *v, int64_t K, int64_t G, void *x, float *sx, int32_t *xi) {
#ifdef BF16_ROWS
    if (s->m13.wt == WT_BF16_ROWS) {  /* bf16 rows on bf16 pairs */
        bf16_row(v, K, x);
        return;
    }
#endif
    if (s->m13.f && !s->a8) {  /* weights in panels, fp32 rows: the row as it is */
        if (x != v) memcpy(x, v, K * sizeof(float));
        return;
    }
    if (s->a8) {
        moec_pack_a8(v, K, K / G, (int8_t *)x, sx, xi, 0, 1);
        return;
    }
    float *o = x;
    for (int64_t b = 0; b < K; b += 32)
        for (int i = 0; i < 16; i++) o[b + i] = v[b + 2 * i], o[b + 16 + i] = v[b + 2 * i + 1];
}

static void input_item(void *p, size_t r) {  /* FC1's input row r: its token's */
    Step *s = p;
    int64_t H = s->H, G = s->m13.G, size = row_bytes(s);
    kernel_row(s, s->x + s->token[r] * H, H, G, (char *)s->x1 + r * H * size, s->s1 + r * G, s->i1 + r * G);
}

static void act_item(void *p, size_t r) {  /* FC1's output row r -> silu(gate) * up -> FC2's input row r */
    Step *s = p;
    int64_t I = s->I, G = s->m2.G, size = row_bytes(s), gu = s->gate_up;
    const float *h = s->h + r * 2 * I;
    float *a = s->a + r * I;
    /* gate_up: 0 halves (gate, up), 1 halves up first, 2 interleaved (g0 u0 g1 u1 ...), 3 interleaved up first */
    int64_t step = gu & 2 ? 2 : 1, g0 = gu & 2 ? gu & 1 : (gu & 1) * I, u0 = gu & 2 ? 1 - (gu & 1) : (1 - (gu & 1)) * I;
    for (int64_t i = 0; i < I; i += 8) {
        int n = I - i < 8 ? (int)(I - i) : 8;
        float g[8] = {0}, u[8] = {0}, y[8];
        for (int j = 0; j < n; j++) g[j] = h[g0 + (i + j) * step], u[j] = h[u0 + (i + j) * step];
        __m256 gv = _mm256_loadu_ps(g), e = exp8(_mm256_xor_ps(gv, _mm256_set1_ps(-0.f)));
        /* F.silu(gate) * up, in fp32: gate / (1 + e^-gate) * up, e^-gate correctly rounded */
        _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)), _mm256_loadu_ps(u)));
        memcpy(a + i, y, n * sizeof(float));
    }
    kernel_row(s, a, I, G, (char *)s->x2 + r * I * size, s->s2 + r * G, s->i2 + r * G);
}

static void combine_item(void *p, size_t t) {  /* token t: its slots' outputs times their weights, in slot order */
    Step *s = p;
    int64_t H = s->H, k = s->k;
    float *y = s->y + t * H;
    memset(y, 0, H * sizeof(float));
    for (int64_t j = 0; j < k; j++) {
        const float *o = s->o + s->row_of[t * k + j] * H;
        float wj = s->w[t * k + j];
        for (int64_t h = 0; h < H; h++) y[h] += wj * o[h];
    }
}

static void run_all(void (*fn)(void *, size_t), size_t n, void *s) {  /* on this thread */
    for (size_t i = 0; i < n; i++) fn(s, i);
}

static OrtStatus *parallel(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t n, void *s) {
    if (n == 1) {
        fn(s, 0);
        return NULL;
    }
    return CALL((const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *), KernelContext_ParallelFor,
                ctx, fn, n, 0, s);
}

enum { MAX_RANK = 8 };
typedef struct { const OrtValue *v; void *data; int64_t dims[MAX_RANK]; size_t rank; int64_t numel; } Input;

static OrtStatus *get_input(const char *op, OrtKernelContext *ctx, size_t i, const char **names, Input *in) {
    memset(in, 0, sizeof *in);
    CHECK(CALL((const OrtKernelContext *, size_t, const OrtValue **), KernelContext_GetInput, ctx, i, &in->v));
    if (!in->v)
        return NULL;  /* an optional input left out */
    OrtShapeInfo *info;
    CHECK(CALL((const OrtValue *, OrtShapeInfo **), GetTensorTypeAndShape, in->v, &info));
    OrtStatus *st = CALL((const OrtShapeInfo *, size_t *), GetDimensionsCount, info, &in->rank);
    if (!st && in->rank > MAX_RANK)
        st = error(op, ORT_INVALID_ARGUMENT, "%s has %zu dimensions", names[i], in->rank);
    if (!st)
        st = CALL((const OrtShapeInfo *, int64_t *, size_t), GetDimensions, info, in->dims, in->rank);
    ((void (*)(OrtShapeInfo *))api[ReleaseTensorTypeAndShapeInfo])(info);
    CHECK(st);
    in->numel = 1;
    for (size_t d = 0; d < in->rank; d++) in->numel *= in->dims[d];
    return CALL((const OrtValue *, void **), GetTensorMutableData, in->v, &in->data);
}

static int shape_is(const Input *in, int64_t a, int64_t b, int64_t c) {
    return in->rank == 3 && in->dims[0] == a && in->dims[1] == b && in->dims[2] == c;
}

static OrtStatus *matrix(const char *op, Input *in, int i, const char **names, int64_t E, int64_t N, int64_t K,
                         int tiles, Matrix *m) {
    /* inputs i, i+1, i+2: q [E, N, K/2], s [E, N, G], z (absent, empty or [E, N, G]); groups of 32, 64 or 128.
       Matrices of rank 2 are one expert's ([N, K/2] = [1, N, K/2]). */
    Input *q = in + i, *s = in + i + 1, *z = in + i + 2;
    for (Input *t = q; t <= z; t++)
        if (t->rank == 2) t->dims[2] = t->dims[1], t->dims[1] = t->dims[0], t->dims[0] = 1, t->rank = 3;
    int64_t G = s->rank == 3 ? s->dims[2] : 0;
    if (K % 32 || !shape_is(q, E, N, K / 2) || G <= 0 || K % G || (K / G != 32 && K / G != 64 && K / G != 128) ||
        !shape_is(s, E, N, G) || (z->v && z->numel && !shape_is(z, E, N, G)))
        return error(op, ORT_INVALID_ARGUMENT, "%s/%s/%s are not moec's int4 format of [%lld, %lld, %lld] in groups of "
                     "32, 64 or 128", names[i], names[i + 1], names[i + 2], (long long)E, (long long)N,
                     (long long)K);
    if (N % (tiles == 2 ? 32 : tiles ? 4 : 1))
        return error(op, ORT_INVALID_ARGUMENT, "%s/%s/%s has %lld rows: the %s layout takes a multiple of %d",
                     names[i], names[i + 1], names[i + 2], (long long)N, tiles == 2 ? "panel" : "tile",
                     tiles == 2 ? 32 : 4);
    /* tiles=2: q, s and z in panels (int4_panels), the same shapes; moec_panels runs them */
    *m = (Matrix){q->data, s->data, z->v && z->numel ? z->data : NULL, N, K, G, tiles == 1,
                  tiles == 2 ? q->data : NULL, WT_I4};
    return NULL;
}

static OrtStatus *run(const char *op, Step *s, OrtKernelContext *ctx, int64_t E, const int64_t *ids);

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const Kernel *kn = kernel;
    Input in[NIN];
    for (size_t i = 0; i < NIN; i++) CHECK(get_input(OP, ctx, i, in_names, in + i));
    const Input *x = in, *ids = in + 1, *w = in + 2;
    if (x->rank != 2 || ids->rank != 2 || ids->dims[0] != x->dims[0] || w->rank != 2 || w->dims[0] != ids->dims[0] ||
        w->dims[1] != ids->dims[1] || in[3].rank != 3 || in[3].dims[1] % 2)
        return error(OP, ORT_INVALID_ARGUMENT, "x [T, H], ids [T, k], w [T, k] and q13 [E, 2I, H/2] do not fit");
    Step s = {.a8 = (int)kn->a8, .gate_up = (int)kn->gate_up, .T = x->dims[0], .k = ids->dims[1], .H = x->dims[1],
              .I = in[3].dims[1] / 2, .x = x->data, .w = w->data};
    int64_t E = in[3].dims[0];
    CHECK(matrix(OP, in, 3, in_names, E, 2 * s.I, s.H, (int)kn->tiles, &s.m13));
    CHECK(matrix(OP, in, 6, in_names, E, s.H, s.I, (int)kn->tiles, &s.m2));
#ifndef __AVX512F__
    if (!s.a8)
        return error(OP, ORT_FAIL, "fp32 rows need the AVX-512 build of the kernels");
#endif
    int64_t dims[2] = {s.T, s.H};
    OrtValue *y;
    CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 0,
               dims, 2, &y));
    CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&s.y));
    if (s.T == 0)
        return NULL;
    return run(OP, &s, ctx, E, ids->data);
}

/* the experts op's work buffer, kept from one call to the next: a prompt's rows need tens of MB (57 for the demo
   model's 1024 tokens), which malloc maps afresh each call past its 32 MB threshold and the kernel then zeroes page
   by page (the op at 1024 tokens took 1.9x as long in a session). A call that finds it in use (another run at the
   same time) gets its own. Kept up to 1 GB, until the process ends. */
static pthread_mutex_t work_lock = PTHREAD_MUTEX_INITIALIZER;
static char *work_buf;
static size_t work_size;
static char *work_get(size_t n, int *kept) {
    *kept = 0;
    if (n > (1ull << 30) || pthread_mutex_trylock(&work_lock)) return malloc(n);
    if (n > work_size) {
        free(work_buf);
        work_buf = malloc(n), work_size = work_buf ? n : 0;
    }
    if (!work_buf) {
        pthread_mutex_unlock(&work_lock);
        return NULL;
    }
    *kept = 1;
    return work_buf;
}
static void work_put(char *buf, int kept) {
    if (kept) pthread_mutex_unlock(&work_lock);
    else free(buf);
}

static OrtStatus *run(const char *op, Step *s, OrtKernelContext *ctx, int64_t E, const int64_t *ids) {
    int64_t T = s->T, k = s->k, R = T * k, H = s->H, I = s->I, G1 = s->m13.G, G2 = s->m2.G, size = row_bytes(s);
    for (int64_t p = 0; p < R; p++)
        if (ids[p] < 0 || ids[p] >= E)
            return error(op, ORT_INVALID_ARGUMENT, "expert id %lld out of [0, %lld)", (long long)ids[p], (long long)E);
    int64_t *idx = calloc(2 * (E + 1) + E + 2 * R, sizeof(int64_t));
    s->first = idx, s->active = idx + 2 * (E + 1), s->row_of = s->active + E, s->token = s->row_of + R;
    int64_t *next = idx + E + 1;
    int kept;
    char *buf = work_get(R * (H * size + 2 * I * 4 + I * 4 + I * size + H * 4) + R * (G1 + G2) * 8 + 64, &kept);
    if (!idx || !buf) {
        free(idx), work_put(buf, kept);
        return error(op, ORT_FAIL, "out of memory");
    }
    /* the pairs sorted by expert, each expert's in (token, slot) order */
    for (int64_t p = 0; p < R; p++) s->first[ids[p] + 1]++;
    int64_t nact = 0;
    for (int64_t e = 0; e < E; e++) {
        if (s->first[e + 1]) s->active[nact++] = e;
        s->first[e + 1] += s->first[e];
        next[e] = s->first[e];
    }
    for (int64_t p = 0; p < R; p++) {
        int64_t r = next[ids[p]]++;
        s->row_of[p] = r, s->token[r] = p / k;
    }
    char *b = buf;
    s->h = (float *)b, b += R * 2 * I * 4;
    s->a = (float *)b, b += R * I * 4;
    s->o = (float *)b, b += R * H * 4;
    s->s1 = (float *)b, b += R * G1 * 4;
    s->i1 = (int32_t *)b, b += R * G1 * 4;
    s->s2 = (float *)b, b += R * G2 * 4;
    s->i2 = (int32_t *)b, b += R * G2 * 4;
    s->x1 = b, b += R * H * size;
    s->x2 = size == 4 && s->m13.f ? (void *)s->a : b;  /* panels, fp32 rows: FC2 reads the activation rows as they are */
    OrtStatus *st = parallel(ctx, input_item, R, s);
    if (!st) {
        s->m = &s->m13, s->in = s->x1, s->in_s = s->s1, s->in_i = s->i1, s->out = s->h;
        st = parallel(ctx, gemm_item, nact * ((2 * I + CH - 1) / CH), s);
    }
    if (!st) st = parallel(ctx, act_item, R, s);
    if (!st) {
        s->m = &s->m2, s->in = s->x2, s->in_s = s->s2, s->in_i = s->i2, s->out = s->o;
        st = parallel(ctx, gemm_item, nact * ((H + CH - 1) / CH), s);
    }
    if (!st) st = parallel(ctx, combine_item, T, s);
    free(idx), work_put(buf, kept);
    return st;
}

/* moec::Experts(x [T, H] fp32, ids [T, k] int64, w [T, k] fp32, w13 [E, ceil(2I/32), H, 32] fp32,
   w2 [E, ceil(H/32), I, 32] fp32; gate_up) -> y [T, H]: fp32 experts, weights in panels (moec_panels;
   `panel_weights` lays out the session's file), the same phases as Int4Experts. moec::ExpertsBf16: w13 and w2 in
   bf16 (`narrow_bf16`). moec::ExpertsInt8(..., w13 int8, w2 int8, s13 [E, 2I], s2 [E, H]): moec's Int8Experts,
   weight-only (a scale per channel). */
#define XP "Experts"
enum { XIN = 5, XIN8 = 7 };
static const int xp_types[XIN] = {T_FLOAT, T_INT64, T_FLOAT, T_FLOAT, T_FLOAT};
static const int xb_types[XIN] = {T_FLOAT, T_INT64, T_FLOAT, T_BF16, T_BF16};
static const int x8_types[XIN8] = {T_FLOAT, T_INT64, T_FLOAT, T_INT8, T_INT8, T_FLOAT, T_FLOAT};
static const char *xp_names[XIN8] = {"x", "ids", "w", "w13", "w2", "s13", "s2"};

static OrtStatus *experts_panels(void *kernel, OrtKernelContext *ctx) {
    const Kernel *kn = kernel;
    Input in[XIN8] = {0};
    size_t n = kn->wt == WT_I8 ? XIN8 : XIN;
    for (size_t i = 0; i < n; i++) CHECK(get_input(XP, ctx, i, xp_names, in + i));
    const Input *x = in, *ids = in + 1, *w = in + 2, *w13 = in + 3, *w2 = in + 4, *s13 = in + 5, *s2 = in + 6;
    if (x->rank != 2 || ids->rank != 2 || ids->dims[0] != x->dims[0] || w->rank != 2 || w->dims[0] != ids->dims[0] ||
        w->dims[1] != ids->dims[1])
        return error(XP, ORT_INVALID_ARGUMENT, "x [T, H], ids [T, k] and w [T, k] do not fit");
    /* panels of pc channels, kd inputs a row of the panel: [E, ceil(N/32), K, 32], int8 rows [E, ceil(N/16), K/4, 64],
       bf16 rows [E, ceil(N/32), K/2, 64] */
    int64_t pc = kn->a8 ? 16 : 32, kd = kn->a8 ? 4 : kn->wt == WT_BF16_ROWS ? 2 : 1, last = pc * kd;
    int64_t H = x->dims[1], E = w13->dims[0], I = w2->rank == 4 ? w2->dims[2] * kd : 0;
    if (w13->rank != 4 || w2->rank != 4 || w13->dims[3] != last || w2->dims[3] != last ||
        w2->dims[0] != E || w13->dims[1] != (2 * I + pc - 1) / pc || w13->dims[2] * kd != H ||
        w2->dims[1] != (H + pc - 1) / pc || I == 0)
        return error(XP, ORT_INVALID_ARGUMENT, kn->a8
                     ? "w13 [E, ceil(2I/16), H/4, 64] and w2 [E, ceil(H/16), I/4, 64] (int8 weights in panels for int8 "
                       "rows: ort_kernels.panel_weights) do not fit x [T, %lld]"
                     : kd == 2 ? "w13 [E, ceil(2I/32), H/2, 64] and w2 [E, ceil(H/32), I/2, 64] (bf16 weights in pairs "
                                 "for bf16 rows: ort_kernels.pair_bf16) do not fit x [T, %lld]"
                     : "w13 [E, ceil(2I/32), H, 32] and w2 [E, ceil(H/32), I, 32] (weights in panels: "
                       "ort_kernels.panel_weights) do not fit x [T, %lld]", (long long)H);
    if (kn->a8 && (H % 32 || I % 32 || H > 65536 || I > 65536))
        return error(XP, ORT_INVALID_ARGUMENT, "int8 rows take H and I multiples of 32, at most 65536 (int32 sums): "
                     "H %lld, I %lld", (long long)H, (long long)I);
    if (n == XIN8 && (s13->rank != 2 || s13->dims[0] != E || s13->dims[1] != 2 * I || s2->rank != 2 ||
                      s2->dims[0] != E || s2->dims[1] != H))
        return error(XP, ORT_INVALID_ARGUMENT, "s13 [E, 2I] and s2 [E, H] (the channels' scales) do not fit");
#ifdef __AVX512F__
    Step s = {.a8 = (int)kn->a8, .gate_up = (int)kn->gate_up, .T = x->dims[0], .k = ids->dims[1], .H = H, .I = I,
              .x = x->data, .w = w->data,
              .m13 = {.N = 2 * I, .K = H, .G = kn->a8, .f = w13->data, .wt = (int)kn->wt, .sc = s13->data},
              .m2 = {.N = H, .K = I, .G = kn->a8, .f = w2->data, .wt = (int)kn->wt, .sc = s2->data}};
    int64_t dims[2] = {s.T, H};
    OrtValue *y;
    CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 0,
               dims, 2, &y));
    CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&s.y));
    return s.T ? run(XP, &s, ctx, E, ids->data) : NULL;
#else
    return error(XP, ORT_FAIL, "fp32 weights in panels need the AVX-512 build of the kernels");
#endif
}

/* moec::Int4MatMul(x [..., K] fp32, q u8 [N, K/2], s [N, G] fp32, z u8 [N, G] or absent; int8_activations)
   -> y [..., N]: one matrix (a dense layer's MatMulNBits, moec.export_dense), the experts' phases with one expert
   taking every row */
enum { MIN = 4 };
static const int mm_types[MIN] = {T_FLOAT, T_UINT8, T_FLOAT, T_UINT8};
static const char *mm_names[MIN] = {"x", "q", "s", "z"};

/* y [R, N] (s->out) = s->m13 times the rows s->x [R = s->T, K = s->H], each first made the kernel's input row
   (input_item: int8, or each 32 inputs reordered) */
static OrtStatus *one_matrix(const char *op, Step *s, OrtKernelContext *ctx) {
    int64_t R = s->T, K = s->H, G = s->m13.G, size = row_bytes(s), first[2] = {0, R}, active[1] = {0};
    s->first = first, s->active = active;
    s->token = malloc(R * sizeof(int64_t));
    char *buf = malloc(R * (K * size + G * 8) + 64);
    if (!s->token || !buf) {
        free(s->token), free(buf);
        return error(op, ORT_FAIL, "out of memory");
    }
    for (int64_t r = 0; r < R; r++) s->token[r] = r;
    s->s1 = (float *)buf, s->i1 = (int32_t *)(buf + R * G * 4), s->x1 = buf + R * G * 8;
    OrtStatus *st = parallel(ctx, input_item, R, s);
    if (!st) {
        s->m = &s->m13, s->in = s->x1, s->in_s = s->s1, s->in_i = s->i1;
        st = parallel(ctx, gemm_item, (s->m13.N + CH - 1) / CH, s);
    }
    free(s->token), free(buf);
    return st;
}

static OrtStatus *matmul(void *kernel, OrtKernelContext *ctx) {
    const Kernel *kn = kernel;
    Input in[MIN];
    for (size_t i = 0; i < MIN; i++) CHECK(get_input(MM, ctx, i, mm_names, in + i));
    const Input *x = in;
    if (x->rank < 1 || in[1].rank != 2)
        return error(MM, ORT_INVALID_ARGUMENT, "takes x [..., K] and q [N, K/2]");
    int64_t K = x->dims[x->rank - 1], N = in[1].dims[0], R = K ? x->numel / K : 0;
    Step s = {.a8 = (int)kn->a8, .T = R, .k = 1, .H = K, .x = x->data};
    CHECK(matrix(MM, in, 1, mm_names, 1, N, K, (int)kn->tiles, &s.m13));
#ifndef __AVX512F__
    if (!s.a8)
        return error(MM, ORT_FAIL, "fp32 rows need the AVX-512 build of the kernels");
#endif
    int64_t dims[MAX_RANK];
    memcpy(dims, x->dims, sizeof dims);
    dims[x->rank - 1] = N;
    OrtValue *y;
    CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 0,
               dims, x->rank, &y));
    CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&s.out));
    return R ? one_matrix(MM, &s, ctx) : NULL;
}

/* moec::Linear(x [..., K] fp32, w [ceil(N/32), K, 32] fp32; n) -> y [..., N] = x W^T: a dense layer's fp32 weights
   in panels (moec.export_dense.moec_fp32_matmuls), every row on moec_panels. moec::LinearBf16: w in bf16;
   moec::LinearInt8(x, w int8, s [N]): int8 weights, a scale per channel. */
#define FM "Linear"
enum { FIN = 2, FIN8 = 3 };
static const int fm_types[FIN] = {T_FLOAT, T_FLOAT};
static const int fb_types[FIN] = {T_FLOAT, T_BF16};
static const int f8_types[FIN8] = {T_FLOAT, T_INT8, T_FLOAT};
static const char *fm_names[FIN8] = {"x", "w", "s"};

static OrtStatus *linear(void *kernel, OrtKernelContext *ctx) {
    const Kernel *kn = kernel;
    Input in[FIN8] = {0};
    size_t n = kn->wt == WT_I8 ? FIN8 : FIN;
    for (size_t i = 0; i < n; i++) CHECK(get_input(FM, ctx, i, fm_names, in + i));
    const Input *x = in, *w = in + 1, *sc = in + 2;
    int64_t K = x->rank ? x->dims[x->rank - 1] : 0, N = kn->n, R = K ? x->numel / K : 0;
    int64_t pc = kn->a8 ? 16 : 32, kd = kn->a8 ? 4 : kn->wt == WT_BF16_ROWS ? 2 : 1;  /* as experts_panels' */
    if (x->rank < 1 || w->rank != 3 || w->dims[0] != (N + pc - 1) / pc || w->dims[1] * kd != K ||
        w->dims[2] != pc * kd || N <= 0)
        return error(FM, ORT_INVALID_ARGUMENT, kn->a8
                     ? "x [..., K] and w [ceil(n/16), K/4, 64] (int8 weights in panels for int8 rows: "
                       "ort_kernels.panel_weights) do not fit, n = %lld"
                     : kd == 2 ? "x [..., K] and w [ceil(n/32), K/2, 64] (bf16 weights in pairs for bf16 rows: "
                                 "ort_kernels.pair_bf16) do not fit, n = %lld"
                     : "x [..., K] and w [ceil(n/32), K, 32] (weights in panels: ort_kernels.panel_weights) do not "
                       "fit, n = %lld", (long long)N);
    if (kn->a8 && (K % 32 || K > 65536))
        return error(FM, ORT_INVALID_ARGUMENT, "int8 rows take K a multiple of 32, at most 65536 (int32 sums): K %lld",
                     (long long)K);
    if (n == FIN8 && (sc->rank != 1 || sc->dims[0] != N))
        return error(FM, ORT_INVALID_ARGUMENT, "s [n] (the channels' scales) does not fit n = %lld", (long long)N);
#ifdef __AVX512F__
    int64_t dims[MAX_RANK], first[2] = {0, R}, active[1] = {0};
    memcpy(dims, x->dims, sizeof dims);
    dims[x->rank - 1] = N;
    Step s = {.a8 = (int)kn->a8, .T = R, .k = 1, .H = K, .x = x->data, .first = first, .active = active,
              .in = x->data, .m13 = {.N = N, .K = K, .G = kn->a8, .f = w->data, .wt = (int)kn->wt, .sc = sc->data}};
    OrtValue *y;
    CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 0,
               dims, x->rank, &y));
    CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&s.out));
    if (R && (s.a8 || kn->wt == WT_BF16_ROWS))  /* each row rounded to int8 (or bf16) first */
        return one_matrix(FM, &s, ctx);
    s.m = &s.m13;  /* fp32 rows: read as they are */
    return R ? parallel(ctx, gemm_item, (N + CH - 1) / CH, &s) : NULL;
#else
    return error(FM, ORT_FAIL, "fp32 weights in panels need the AVX-512 build of the kernels");
#endif
}

static OrtStatus *create(const OrtCustomOp *op, OrtApiTable a, const OrtKernelInfo *info, void **out) {
    Kernel *kn = calloc(1, sizeof *kn);
    if (!kn)
        return error(OP, ORT_FAIL, "out of memory");
    size_t n = op->GetInputTypeCount(op);  /* NIN: Int4Experts, MIN: Int4MatMul; XIN(8), FIN(8): panels */
    OrtStatus *st = n == XIN || n == FIN ? NULL  /* fp32 and bf16 panels: fp32 rows */
        : CALL((const OrtKernelInfo *, const char *, int64_t *), KernelInfoGetAttribute_int64, info,
               "int8_activations", &kn->a8);
    if (st && (n == XIN8 || n == FIN8))  /* int8 panels: optional, weight-only where absent */
        ((void (*)(OrtStatus *))api[ReleaseStatus])(st), st = NULL, kn->a8 = 0;
    kn->wt = strstr(op->GetName(op), "Bf16") ? WT_BF16 : strstr(op->GetName(op), "Int8") ? WT_I8 : WT_F32;
    if (!st && kn->wt == WT_BF16) {  /* optional, fp32 rows where absent */
        int64_t rows = 0;
        OrtStatus *absent = CALL((const OrtKernelInfo *, const char *, int64_t *), KernelInfoGetAttribute_int64, info,
                                 "bf16_rows", &rows);
        if (absent) ((void (*)(OrtStatus *))api[ReleaseStatus])(absent), rows = 0;
        if (rows < 0 || rows > 1)
            st = error(op->GetName(op), ORT_INVALID_ARGUMENT, "bf16_rows %lld is not 0 or 1", (long long)rows);
        kn->wt = rows ? WT_BF16_ROWS : WT_BF16;
#ifndef BF16_ROWS
        if (!st && rows)
            st = error(op->GetName(op), ORT_FAIL, "bf16 rows need the AVX512-BF16 build of the kernels");
#endif
    }
#ifndef I8A8
    if (!st && kn->a8 && (n == XIN8 || n == FIN8))
        st = error(op->GetName(op), ORT_FAIL, "int8 rows on int8 weights need the AVX512-VNNI build of the kernels");
#endif
    if (!st && (n == FIN || n == FIN8))  /* Linear: its channels */
        st = CALL((const OrtKernelInfo *, const char *, int64_t *), KernelInfoGetAttribute_int64, info, "n", &kn->n);
    if (!st && (n == NIN || n == XIN || n == XIN8))  /* the experts' ops: FC1's row order */
        st = CALL((const OrtKernelInfo *, const char *, int64_t *), KernelInfoGetAttribute_int64, info, "gate_up",
                  &kn->gate_up);
    if (!st && (kn->gate_up < 0 || kn->gate_up > 3))
        st = error(op->GetName(op), ORT_INVALID_ARGUMENT, "gate_up %lld is not 0-3", (long long)kn->gate_up);
    if (!st) {  /* optional, 0 (moec's layout) where absent */
        OrtStatus *absent = CALL((const OrtKernelInfo *, const char *, int64_t *), KernelInfoGetAttribute_int64, info,
                                 "tiles", &kn->tiles);
        if (absent) ((void (*)(OrtStatus *))api[ReleaseStatus])(absent), kn->tiles = 0;
    }
#ifndef TILES
    if (!st && kn->tiles)
        st = error(op->GetName(op), ORT_FAIL, "the tile layout needs the AVX-512 build of the kernels");
#endif
    if (!st && (kn->tiles < 0 || kn->tiles > 2))
        st = error(op->GetName(op), ORT_INVALID_ARGUMENT, "tiles %lld is not 0-2", (long long)kn->tiles);
    if (!st && kn->tiles && kn->a8 != (kn->tiles == 1))
        st = error(op->GetName(op), ORT_INVALID_ARGUMENT, kn->a8 ? "int4 panels (tiles=2) take fp32 rows, not int8 activations"
                                                                 : "the tile layout takes int8 activations");
    if (st) {
        free(kn);
        return st;
    }
    *out = kn;
    return NULL;
}

"""

# the ops' tables and the entry point ORT calls, after every op's source (ort_attention.SOURCE included)
REGISTER_SOURCE = r"""
static void destroy(void *kernel) { free(kernel); }
static const char *name(const OrtCustomOp *op) { return "Int4Experts"; }
static const char *provider(const OrtCustomOp *op) { return "CPUExecutionProvider"; }
static int input_type(const OrtCustomOp *op, size_t i) { return in_types[i]; }
static size_t inputs(const OrtCustomOp *op) { return NIN; }
static int output_type(const OrtCustomOp *op, size_t i) { return T_FLOAT; }
static size_t outputs(const OrtCustomOp *op) { return 1; }
static int input_kind(const OrtCustomOp *op, size_t i) { return i == 5 || i == 8 ? OPTIONAL : REQUIRED; }
static int output_kind(const OrtCustomOp *op, size_t i) { return REQUIRED; }
static int memory(const OrtCustomOp *op, size_t i) { return 0; }  /* OrtMemTypeDefault */
static int one(const OrtCustomOp *op) { return 1; }

static const char *xp_name(const OrtCustomOp *op) { return "Experts"; }
static int xp_input_type(const OrtCustomOp *op, size_t i) { return xp_types[i]; }
static const char *xb_name(const OrtCustomOp *op) { return "ExpertsBf16"; }
static int xb_input_type(const OrtCustomOp *op, size_t i) { return xb_types[i]; }
static size_t xp_inputs(const OrtCustomOp *op) { return XIN; }
static int xp_input_kind(const OrtCustomOp *op, size_t i) { return REQUIRED; }

static const char *xi_name(const OrtCustomOp *op) { return "ExpertsInt8"; }
static int xi_input_type(const OrtCustomOp *op, size_t i) { return x8_types[i]; }
static size_t xi_inputs(const OrtCustomOp *op) { return XIN8; }
static const char *fm_name(const OrtCustomOp *op) { return "Linear"; }
static int fm_input_type(const OrtCustomOp *op, size_t i) { return fm_types[i]; }
static const char *fb_name(const OrtCustomOp *op) { return "LinearBf16"; }
static const char *fi_name(const OrtCustomOp *op) { return "LinearInt8"; }
static int fi_input_type(const OrtCustomOp *op, size_t i) { return f8_types[i]; }
static size_t fi_inputs(const OrtCustomOp *op) { return FIN8; }
static int fb_input_type(const OrtCustomOp *op, size_t i) { return fb_types[i]; }
static size_t fm_inputs(const OrtCustomOp *op) { return FIN; }

static const char *mm_name(const OrtCustomOp *op) { return "Int4MatMul"; }
static int mm_input_type(const OrtCustomOp *op, size_t i) { return mm_types[i]; }
static size_t mm_inputs(const OrtCustomOp *op) { return MIN; }
static int mm_input_kind(const OrtCustomOp *op, size_t i) { return i == 3 ? OPTIONAL : REQUIRED; }

#define OP_FIELDS .version = 16, .GetExecutionProviderType = provider, .GetOutputType = output_type, \
    .GetOutputTypeCount = outputs, .KernelDestroy = destroy, .GetOutputCharacteristic = output_kind, \
    .GetInputMemoryType = memory, .GetVariadicInputMinArity = one, .GetVariadicInputHomogeneity = one, \
    .GetVariadicOutputMinArity = one, .GetVariadicOutputHomogeneity = one, .CreateKernelV2 = create
static const OrtCustomOp op = {OP_FIELDS, .GetName = name, .GetInputType = input_type, .GetInputTypeCount = inputs,
                               .GetInputCharacteristic = input_kind, .KernelComputeV2 = compute};
/* moec's ops on weights in panels: every input required, one compute for the experts' and one for Linear */
#define PANEL_OP(NAME, TYPES, COUNT, COMPUTE) {OP_FIELDS, .GetName = NAME, .GetInputType = TYPES, \
    .GetInputTypeCount = COUNT, .GetInputCharacteristic = xp_input_kind, .KernelComputeV2 = COMPUTE}
static const OrtCustomOp xp_op = PANEL_OP(xp_name, xp_input_type, xp_inputs, experts_panels);
static const OrtCustomOp xb_op = PANEL_OP(xb_name, xb_input_type, xp_inputs, experts_panels);
static const OrtCustomOp xi_op = PANEL_OP(xi_name, xi_input_type, xi_inputs, experts_panels);
static const OrtCustomOp fm_op = PANEL_OP(fm_name, fm_input_type, fm_inputs, linear);
static const OrtCustomOp fb_op = PANEL_OP(fb_name, fb_input_type, fm_inputs, linear);
static const OrtCustomOp fi_op = PANEL_OP(fi_name, fi_input_type, fi_inputs, linear);
static const OrtCustomOp mm_op = {OP_FIELDS, .GetName = mm_name, .GetInputType = mm_input_type,
                                  .GetInputTypeCount = mm_inputs, .GetInputCharacteristic = mm_input_kind,
                                  .KernelComputeV2 = matmul};
static const OrtCustomOp at_op = {OP_FIELDS, .GetName = at_name, .GetInputType = at_input_type,
                                  .GetInputTypeCount = at_inputs, .GetOutputTypeCount = at_outputs,
                                  .GetInputCharacteristic = at_input_kind, .GetOutputCharacteristic = at_output_kind,
                                  .CreateKernelV2 = attention_create,
                                  .KernelComputeV2 = attention};

/* SessionOptions.register_custom_ops_library calls this */
EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    api = base->GetApi(API_VERSION);
    if (!api)
        return NULL;  /* too old to make a status: the session then fails on the unknown op, naming it */
    const char *info = ((const char *(*)(void))api[GetBuildInfoString])();
    if (!info || strncmp(info, "ORT Build Info", 14))
        return error("RegisterCustomOps", ORT_FAIL, "this onnxruntime's C API is not laid out as the library expects");
    OrtCustomOpDomain *domain;
    CHECK(CALL((const char *, OrtCustomOpDomain **), CreateCustomOpDomain, "moec", &domain));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &xp_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &fm_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &xb_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &fb_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &xi_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &fi_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &mm_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &at_op));
    return CALL((OrtSessionOptions *, OrtCustomOpDomain *), AddCustomOpDomain, options, domain);
}
"""


def _ort_version() -> tuple[int, ...]:
    import onnxruntime

    return tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())


def build(flags: tuple[str, ...] = ()) -> str:
    """The custom-op library built for this CPU, with the compiler `flags` added (tests build narrower ones, e.g.
    -mno-avx512f: the AVX2 paths), unchecked; RuntimeError where it cannot be built."""
    from moec.backends import cpu_native, ort_attention

    source = cpu_native.SOURCE + OP_SOURCE + ort_attention.SOURCE + REGISTER_SOURCE
    return str(cpu_native.build(cpu_native.FLAGS + ("-fvisibility=hidden", *flags), source, "moec_ort"))


@functools.cache
def library() -> str | None:
    """The custom-op library's path, built and checked once per process (tiny sessions against moec's torch ops),
    or None where it cannot be (the reason logged once): the exports then keep ORT's QMoE, MatMulNBits and
    GroupQueryAttention."""
    from moec.backends import cpu_native, ort_attention

    if cpu_native.library() is None:  # no compiler or CPU support, or MOEC_NATIVE=0 (logged there)
        return None
    try:
        if _ort_version() < MIN_ORT:
            raise RuntimeError(f"onnxruntime {'.'.join(map(str, _ort_version()))} is older than "
                               f"{'.'.join(map(str, MIN_ORT))}")
        path = build()
        _self_test(path)
        ort_attention.self_test(path)
    except Exception as e:  # noqa: BLE001 (a failed build or check of an optional kernel: QMoE runs instead)
        log.warning("moec: moec's kernels for onnxruntime are not available (%s): backend='onnxruntime' runs ONNX "
                    "Runtime's own ops (QMoE, MatMulNBits, GroupQueryAttention)", e)
        return None
    return path


def register_schema() -> None:
    """The ops' schemas, registered with onnx (onnxscript builds the nodes, onnx.checker checks them)."""
    import onnx
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    a8 = OpSchema.Attribute("int8_activations", OpSchema.AttrType.INT, "GEMM inputs rounded to int8")
    tiles = OpSchema.Attribute("tiles", onnx.helper.make_attribute("tiles", 0),
                               "1: q and s in the tile layout (ort_kernels.tiled, int8 activations); 2: q, s and z "
                               "in panels (ort_kernels.int4_panels, fp32 rows)")
    rows8 = OpSchema.Attribute("int8_activations", onnx.helper.make_attribute("int8_activations", 0),
                               "1: each input row rounded to int8 at one step, weights in panels_a8")
    rows16 = OpSchema.Attribute("bf16_rows", onnx.helper.make_attribute("bf16_rows", 0),
                                "1: each input row rounded to bf16, weights in pairs (pair_bf16)")
    for op, types, attrs in (
            (OP, {"x": "float", "ids": "int64", "w": "float", "q13": "uint8", "s13": "float", "z13": "uint8",
                  "q2": "uint8", "s2": "float", "z2": "uint8"},
             [a8, tiles, OpSchema.Attribute("gate_up", OpSchema.AttrType.INT, "FC1's row order, GATE_UP")]),
            (EXPERTS, {"x": "float", "ids": "int64", "w": "float", "w13": "float", "w2": "float"},
             [OpSchema.Attribute("gate_up", OpSchema.AttrType.INT, "FC1's row order, GATE_UP")]),
            (FP32_MATMUL, {"x": "float", "w": "float"},
             [OpSchema.Attribute("n", OpSchema.AttrType.INT, "output channels")]),
            (EXPERTS + "Bf16", {"x": "float", "ids": "int64", "w": "float", "w13": "bfloat16", "w2": "bfloat16"},
             [rows16, OpSchema.Attribute("gate_up", OpSchema.AttrType.INT, "FC1's row order, GATE_UP")]),
            (FP32_MATMUL + "Bf16", {"x": "float", "w": "bfloat16"},
             [rows16, OpSchema.Attribute("n", OpSchema.AttrType.INT, "output channels")]),
            (EXPERTS + "Int8", {"x": "float", "ids": "int64", "w": "float", "w13": "int8", "w2": "int8",
                                "s13": "float", "s2": "float"},
             [rows8, OpSchema.Attribute("gate_up", OpSchema.AttrType.INT, "FC1's row order, GATE_UP")]),
            (FP32_MATMUL + "Int8", {"x": "float", "w": "int8", "s": "float"},
             [rows8, OpSchema.Attribute("n", OpSchema.AttrType.INT, "output channels")]),
            (MATMUL, {"x": "float", "q": "uint8", "s": "float", "z": "uint8"}, [a8, tiles])):
        if onnx.defs.has(op, DOMAIN):
            continue
        onnx.defs.register_schema(OpSchema(
            op, DOMAIN, 1, "moec's kernels (backends/ort_kernels.py)",
            inputs=[OpSchema.FormalParameter(n, f"tensor({t})", **({"param_option": optional} if n[0] == "z" else {}))
                    for n, t in types.items()],
            outputs=[OpSchema.FormalParameter("y", "tensor(float)")], attributes=attrs))


def node_args(x, ids, w, q13, s13, z13, q2, s2, z2, int8_activations: bool, gate_up: str) -> tuple[tuple, dict]:
    """Inputs and attributes of the node for moec::experts_int4's arguments (moec's layout: tile_weights may then
    lay the weights out in tiles)."""
    return (x, ids, w, q13, s13, z13, q2, s2, z2), {"int8_activations": int(int8_activations),
                                                    "gate_up": GATE_UP[gate_up], "tiles": 0}


def round_rows(proto, base_dir: str = "") -> int:
    """Each moec::ExpertsBf16 / LinearBf16 node (narrow_bf16's layout) whose every K is even takes bf16_rows=1: its
    input rows rounded to bf16 as a bf16 model's own are, its weights re-laid in pairs (`pair_bf16`, vdpbf16ps;
    AVX512-BF16 builds: cpu_native.has_bf16). Returns how many nodes."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    weights = {EXPERTS + "Bf16": (3, 4), FP32_MATMUL + "Bf16": (1,)}
    done, count = {}, 0
    for n in proto.graph.node:
        if (n.domain != DOMAIN or n.op_type not in weights or any(a.name == "bf16_rows" for a in n.attribute)
                or any(inits[n.input[i]].dims[-2] % 2 for i in weights[n.op_type])):  # panels [..., K, 32]
            continue
        for name in (n.input[i] for i in weights[n.op_type] if n.input[i] not in done):
            a = numpy_helper.to_array(inits[name], base_dir).view(np.uint16)
            a = pair_bf16(a.reshape(*a.shape[:-1], 16, 2).swapaxes(-1, -2).reshape(a.shape))  # channels in order
            t = onnx.TensorProto(name=f"{name}_pairs", data_type=onnx.TensorProto.BFLOAT16, dims=a.shape,
                                 raw_data=a.astype("<u2").tobytes())
            proto.graph.initializer.append(t)
            done[name] = t.name
        for i in weights[n.op_type]:
            n.input[i] = done[n.input[i]]
        n.attribute.append(helper.make_attribute("bf16_rows", 1))
        count += 1
    used = {i for n in proto.graph.node for i in n.input} | {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for t in [t for t in proto.graph.initializer if t.name in set(done) - used]:
        proto.graph.initializer.remove(t)
    return count


def round_rows_file(path: str) -> int:
    """round_rows on the ONNX file at `path`, in place (as lay_out_file: weights in external data are read only where
    re-laid, their new copies written beside the model); how many nodes."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    count = round_rows(proto, os.path.dirname(path))
    if count:
        onnx.save(proto, path, save_as_external_data=any(t.data_location == onnx.TensorProto.EXTERNAL
                                                         for t in proto.graph.initializer))
    return count


def panels(w: np.ndarray) -> np.ndarray:
    """fp32 weights [E, N, K] -> panels [E, ceil(N/32), K, 32] (moec_f32_panels): panel p holds channels
    32p..32p+31, zeros past N."""
    E, N, K = w.shape
    w = np.pad(w, ((0, 0), (0, -N % 32), (0, 0)))
    return np.ascontiguousarray(w.reshape(E, -1, 32, K).swapaxes(-1, -2))


def pair_bf16(p: np.ndarray) -> np.ndarray:
    """Panels [..., K, 32] (K even) -> the bf16-row kernel's pairs [..., K/2, 64] (moec_pairs): each channel's
    weights of inputs 2i and 2i + 1 side by side, channel c at 2c (what one vdpbf16ps lane reads)."""
    *lead, K, _ = p.shape
    return np.ascontiguousarray(p.reshape(*lead, K // 2, 2, 32).swapaxes(-1, -2)).reshape(*lead, K // 2, 64)


def panels_a8(q: np.ndarray) -> np.ndarray:
    """int8 weights [E, N, K] (K a multiple of 32) -> the int8-row kernel's panels [E, ceil(N/16), K/4, 64]
    (moec_panels_a8): panel p holds channels 16p..16p+15 as [K/4][16 channels][4 inputs] bytes of q + 128 (128 past
    N), each 32 inputs in moec_pack_a8's order (the evens, then the odds); int8 arrays holding those bytes."""
    E, N, K = q.shape
    if K % 32:
        raise ValueError(f"moec: panels_a8 takes K a multiple of 32 (int8 rows of moec_pack_a8), not {K}")
    u = np.pad(q.astype(np.int16) + 128, ((0, 0), (0, -N % 16), (0, 0)), constant_values=128).astype(np.uint8)
    u = u.reshape(E, -1, 16, K // 32, 16, 2).swapaxes(-1, -2)  # [E, P, 16, K/32, 2, 16]: per 32, evens then odds
    u = u.reshape(E, -1, 16, K // 4, 4).swapaxes(2, 3)  # [E, P, K/4, 16, 4]
    return np.ascontiguousarray(u).reshape(E, -1, K // 4, 64).view(np.int8)


def halves(w13: np.ndarray, gate_up: int) -> np.ndarray:
    """FC1 [E, 2I, K] with rows in `gate_up` order (GATE_UP's numbers) -> gate rows then up rows."""
    I = w13.shape[1] // 2
    a, b = (w13[:, 0::2], w13[:, 1::2]) if gate_up & 2 else (w13[:, :I], w13[:, I:])
    return np.concatenate((b, a) if gate_up & 1 else (a, b), axis=1)


def tiled(q: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q [..., N, K/2] and s [..., N, G] in moec's int4 format (N a multiple of 4) -> the same in the tile layout
    (moec_int4_tiles), same shapes: per tile of 4 channels, q as [K/32][4][16 bytes] and s as [G/4][4][4] then
    [4][G % 4]."""
    *lead, N, half = q.shape
    G, full = s.shape[-1], s.shape[-1] // 4 * 4
    q = q.reshape(*lead, N // 4, 4, half // 16, 16).swapaxes(-3, -2)
    s = s.reshape(*lead, N // 4, 4, G)
    steps = s[..., :full].reshape(*lead, N // 4, 4, full // 4, 4).swapaxes(-3, -2)
    s = np.concatenate([steps.reshape(*lead, N // 4, -1), s[..., full:].reshape(*lead, N // 4, -1)], -1)
    return np.ascontiguousarray(q).reshape(*lead, N, half), np.ascontiguousarray(s).reshape(*lead, N, G)


def int4_panels(q: np.ndarray, s: np.ndarray, z: np.ndarray | None):
    """q [..., N, K/2], s [..., N, G], z [..., N, G] or None in moec's int4 format (N a multiple of 32) -> the same
    in panels (moec_panels' int4 weights), same shapes: per panel of 32 channels, q as [K][16 bytes] (channel c's
    nibble for k in the low half of byte c, channel c + 16's in the high half), s and z as [G][32]."""
    *lead, N, half = q.shape
    G = s.shape[-1]
    if N % 32:
        raise ValueError(f"moec: int4_panels takes N a multiple of 32 (panels of 32 channels), not {N}")
    n = np.stack([q & 15, q >> 4], -1).reshape(*lead, N // 32, 2, 16, 2 * half)  # nibbles [.., P, 2, 16, K]
    q = (n[..., 0, :, :] | n[..., 1, :, :] << 4).swapaxes(-1, -2)  # [.., P, K, 16]

    def groups(a):
        return None if a is None else np.ascontiguousarray(a.reshape(*lead, N // 32, 32, G).swapaxes(-1, -2)).reshape(
            *lead, N, G)
    return np.ascontiguousarray(q).reshape(*lead, N, half), groups(s), groups(z)


def lay_out_file(path: str) -> tuple[int, int, int]:
    """tile_weights, panel_weights and narrow_bf16 on the ONNX file at `path`, in place; how many nodes each laid
    out. Weights in external data: only those laid out are read, and their new copies written to a new file beside
    the model (onnx names it); the others stay where they are."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    base = os.path.dirname(path)
    counts = tile_weights(proto, base), panel_weights(proto, base), narrow_bf16(proto, base)
    if any(counts):
        onnx.save(proto, path, save_as_external_data=any(t.data_location == onnx.TensorProto.EXTERNAL
                                                         for t in proto.graph.initializer))
    return counts


def narrow_bf16(proto, base_dir: str = "") -> int:
    """Each moec::Experts / moec::Linear node whose weights are all bf16 numbers (a bf16 model exported in fp32, or
    an fp32 model of bf16 weights) becomes moec::ExpertsBf16 / LinearBf16 with them in bf16: half the bytes, the
    same values (checked here, every weight: the narrowing is exact), the same products and sums. Returns how many
    nodes."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    weights = {EXPERTS: (3, 4), FP32_MATMUL: (1,)}
    done, count = {}, 0
    for n in proto.graph.node:
        if n.domain != DOMAIN or n.op_type not in weights or any(n.input[i] not in inits for i in weights[n.op_type]):
            continue
        arrays = {n.input[i]: numpy_helper.to_array(inits[n.input[i]], base_dir) for i in weights[n.op_type]
                  if n.input[i] not in done}
        if any(a.dtype != np.float32 or (a.view(np.uint32) & 0xFFFF).any() for a in arrays.values()):
            continue
        for name, a in arrays.items():  # each k's 32 channels interleaved, (c0, c16, c1, c17, ...): see panel_load
            a = np.ascontiguousarray(a.reshape(*a.shape[:-1], 2, 16).swapaxes(-1, -2)).reshape(a.shape)
            t = onnx.TensorProto(name=f"{name}_bf16", data_type=onnx.TensorProto.BFLOAT16, dims=a.shape,
                                 raw_data=(a.view(np.uint32) >> 16).astype("<u2").tobytes())
            proto.graph.initializer.append(t)
            done[name] = t.name
        for i in weights[n.op_type]:
            n.input[i] = done[n.input[i]]
        n.op_type += "Bf16"
        count += 1
    used = {i for n in proto.graph.node for i in n.input} | {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for t in [t for t in proto.graph.initializer if t.name in set(done) - used]:
        proto.graph.initializer.remove(t)
    return count


def panel_weights(proto, base_dir: str = "") -> int:
    """Each moec::Experts / ExpertsInt8 node of `proto` gets its weights [E, N, K] in panels (new initializers
    `<name>_panels`, `panels`; with int8_activations `<name>_panels_a8`, `panels_a8`; FC1's rows in halves, its
    scales s13 [E, 2I] too, gate_up 0), the ops' only layout:
    export_onnx makes these nodes only where this CPU's build has the kernel (lower_onnx). Returns how many nodes;
    a node whose weights are not initializers is an error (the op could not run)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    done, count = {}, 0
    for n in proto.graph.node:
        if n.domain != DOMAIN or n.op_type not in (EXPERTS, EXPERTS + "Int8"):
            continue
        a = {x.name: x for x in n.attribute}
        gate_up = a["gate_up"].i
        a8 = "int8_activations" in a and a["int8_activations"].i == 1
        for i in (3, 4, 5)[:3 if len(n.input) > 5 else 2]:  # w13, w2 (and s13)
            name = n.input[i]
            if name not in inits:
                raise RuntimeError(f"moec::Experts node {n.name}: its weight {name} is not a constant of the file")
            key = (name, gate_up if i != 4 else 0, a8 and i < 5)
            if key not in done:
                w = numpy_helper.to_array(inits[name], base_dir)
                w = halves(w, gate_up) if i != 4 else w
                done[key] = f"{name}_panels{'_a8' * key[2]}{gate_up if key[1] else ''}"
                w = w if i == 5 else panels_a8(w) if a8 else panels(w)
                proto.graph.initializer.append(numpy_helper.from_array(w, done[key]))
            n.input[i] = done[key]
        n.attribute.remove(a["gate_up"])
        n.attribute.append(helper.make_attribute("gate_up", 0))
        count += 1
    used = {i for n in proto.graph.node for i in n.input} | {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for t in [t for t in proto.graph.initializer if t.name in {k[0] for k in done} - used]:
        proto.graph.initializer.remove(t)
    return count


def tile_weights(proto, base_dir: str = "") -> int:
    """Each moec::Int4Experts / Int4MatMul node of `proto` with constant weights gets them in the layout of this
    CPU's kernels, where its build has them (AVX-512): with int8 activations and every matrix's rows a multiple of
    4, the tile layout (`tiled`, tiles=1); weight-only and rows multiples of 32, panels (`int4_panels`, tiles=2).
    New initializers `<name>_tiles` / `<name>_panels` (weights in external data are read from `base_dir`, only
    these); the other nodes stay as they are. Returns how many nodes."""
    from onnx import helper, numpy_helper

    from moec.backends import cpu_native

    if not cpu_native.has_tiles():
        return 0
    inits = {t.name: t for t in proto.graph.initializer}
    done, count = {}, 0  # (a weight's name, layout) -> its copy's (each of q, s, z laid out on its own)
    for n in proto.graph.node:
        if n.domain != DOMAIN or n.op_type not in (OP, MATMUL):
            continue
        a = {x.name: x for x in n.attribute}
        a8 = helper.get_attribute_value(a["int8_activations"]) == 1
        layout, suffix, rows = (1, "_tiles", 4) if a8 else (2, "_panels", 32)
        triples = [(i, i + 1, i + 2 if not a8 and len(n.input) > i + 2 and n.input[i + 2] else None)
                   for i in ((3, 6) if n.op_type == OP else (1,))]  # q, s (and z: panels) input indices
        names = [n.input[i] for t in triples for i in t if i is not None]
        if ("tiles" in a and a["tiles"].i != 0
                or any(k not in inits or (k, layout) not in done and f"{k}{suffix}" in inits for k in names)
                or any(inits[n.input[q]].dims[-2] % rows for q, _, _ in triples)):
            continue
        for t in triples:
            if any((n.input[i], layout) not in done for i in t if i is not None):
                arrays = [numpy_helper.to_array(inits[n.input[i]], base_dir) if i is not None else None for i in t]
                laid = tiled(*arrays[:2]) if a8 else int4_panels(*arrays)
                for i, array in zip(t, laid):
                    if i is not None and (n.input[i], layout) not in done:
                        done[n.input[i], layout] = f"{n.input[i]}{suffix}"
                        proto.graph.initializer.append(numpy_helper.from_array(array, done[n.input[i], layout]))
            for i in t:
                if i is not None:
                    n.input[i] = done[n.input[i], layout]
        if "tiles" in a:
            n.attribute.remove(a["tiles"])
        n.attribute.append(helper.make_attribute("tiles", layout))
        count += 1
    used = {i for n in proto.graph.node for i in n.input} | {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for t in [t for t in proto.graph.initializer if t.name in {k for k, _ in done} - used]:
        proto.graph.initializer.remove(t)
    return count


def _self_test(path: str) -> None:
    """A session of one node (3 tokens, 4 experts, top-2, groups of 32 and 64, asymmetric FC1) against
    moec::experts_int4 on the same weights, in moec's layout, in tiles and in panels; RuntimeError where they
    differ."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper, numpy_helper

    from moec.backends import cpu_native
    from moec.backends.torch_backend import quantized_linear
    from moec.quant import Int4Experts, Int8Experts, quantize

    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 3, 64, 64, 4, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.tensor([[0, 2], [2, 1], [3, 0]])
    w = torch.rand(T, k, generator=g)
    t13 = quantize(Int4Experts(32, symmetric=False), torch.randn(E, 2 * I, H, generator=g))
    t2 = quantize(Int4Experts(64), torch.randn(E, H, I, generator=g))
    inputs = {"x": x, "ids": ids, "w": w, "q13": t13["q"], "s13": t13["scale"], "z13": t13["zero"],
              "q2": t2["q"], "s2": t2["scale"]}
    for a8, tiles in ([(True, 0)] + [(True, 1), (False, 2)] * cpu_native.has_tiles()
                      + [(False, 0)] * cpu_native.has_f32()):  # tiles: the layout's attribute
        node = helper.make_node(OP, list(inputs), ["y"], domain=DOMAIN, int8_activations=int(a8), gate_up=2,
                                tiles=tiles)
        weights = dict(inputs)
        for m in ("13", "2") if tiles else ():
            q, s, z = (inputs[f"{n}{m}"].numpy() if f"{n}{m}" in inputs else None for n in "qsz")
            for n, a in zip("qsz", tiled(q, s) if tiles == 1 else int4_panels(q, s, z)):
                if a is not None:
                    weights[f"{n}{m}"] = torch.from_numpy(a)
        graph = helper.make_graph(
            [node], "moec_self_test",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(inputs[n].numpy().dtype), None)
             for n in ("x", "ids", "w")], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weights[n].numpy(), n) for n in list(inputs)[3:]])
        model = helper.make_model(graph, ir_version=10,
                                  opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
        so = ort.SessionOptions()
        so.register_custom_ops_library(path)
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {n: inputs[n].numpy() for n in ("x", "ids", "w")})[0])
        want = torch.ops.moec.experts_int4(x, ids, w, t13["q"], t13["scale"], t13["zero"], None, t2["q"],
                                           t2["scale"], None, None, "silu", True, 1.0, 0.0, False, "interleave", a8)
        err = ((got - want).norm() / want.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"its self-test differs from moec::experts_int4 (int8 activations: {a8}, tiles: "
                               f"{tiles}; relative error {err:.2e})")
        got = matmul_session(path, weights["q13"][1], weights["s13"][1], weights["z13"][1], a8, tiles=tiles).run(
            None, {"x": x.numpy()})[0]
        want = quantized_linear(x, (t13["q"][1:2], t13["scale"][1:2], t13["zero"][1:2]), a8)
        err = ((torch.from_numpy(got) - want).norm() / want.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"its self-test differs from moec's quantized linear layer (int8 activations: {a8}, "
                               f"tiles: {tiles}; relative error {err:.2e})")
    # fp32 and bf16 experts: 2I = 80 and H = 48 end in part-filled panels, 7 rows on expert 0
    for dtype in (torch.float32, torch.bfloat16) if cpu_native.has_f32() else ():
        H, I = 48, 40
        x, ids = torch.randn(7, H, generator=g), torch.tensor([[0, 2], [2, 0], [0, 1], [0, 3], [0, 2], [0, 1], [0, 3]])
        w = torch.rand(7, k, generator=g)
        w13, w2 = (torch.randn(shape, generator=g).to(dtype).float() for shape in ((E, 2 * I, H), (E, H, I)))
        got = torch.from_numpy(experts_session(path, w13.numpy(), w2.numpy(), GATE_UP["interleave"]).run(
            None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
        want = torch.ops.moec.experts(x, ids, w, w13, None, w2, None, "silu", True, 1.0, 0.0, False, "interleave")
        err = ((got - want).norm() / want.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"its self-test differs from moec::experts ({dtype} weights; relative error {err:.2e})")
        if dtype == torch.bfloat16 and cpu_native.has_bf16():  # bf16 rows: FC2's input rounded too (~3e-3)
            got = torch.from_numpy(experts_session(path, w13.numpy(), w2.numpy(), GATE_UP["interleave"],
                                                   bf16_rows=True).run(
                None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
            want = torch.ops.moec.experts(x.bfloat16().float(), ids, w, w13, None, w2, None, "silu", True, 1.0, 0.0,
                                          False, "interleave")
            err = ((got - want).norm() / want.norm()).item()
            if not err < 2e-2:
                raise RuntimeError(f"its self-test differs from moec::experts (bf16 rows; relative error {err:.2e})")
    # int8 weights, a scale per channel; with int8 rows (VNNI builds) H and I multiples of 32: the same numbers
    for a8 in [False] * cpu_native.has_f32() + [True] * cpu_native.has_vnni512():
        if a8:
            H, I = 64, 96
            x, w13, w2 = (torch.randn(shape, generator=g) for shape in ((7, H), (E, 2 * I, H), (E, H, I)))
        t13, t2 = quantize(Int8Experts(), w13), quantize(Int8Experts(), w2)
        got = torch.from_numpy(experts_session(
            path, t13["q"].numpy(), t2["q"].numpy(), GATE_UP["interleave"], s13=t13["scale"].numpy(),
            s2=t2["scale"].numpy(), a8=a8).run(None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
        want = torch.ops.moec.experts_int8(x, ids, w, t13["q"], t13["scale"], None, t2["q"], t2["scale"], None, "silu",
                                           True, 1.0, 0.0, False, "interleave", a8)
        err = ((got - want).norm() / want.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"its self-test differs from moec::experts_int8 (int8 activations: {a8}; relative "
                               f"error {err:.2e})")


def experts_session(path: str, w13: np.ndarray, w2: np.ndarray, gate_up: int, options=None, s13=None, s2=None,
                    a8: bool = False, bf16_rows: bool = False):
    """A session of one moec::Experts node with fp32 weights w13 [E, 2I, H] (rows in `gate_up` order) and w2
    [E, H, I], laid out by panel_weights (and narrow_bf16: ExpertsBf16 where they are bf16 numbers, with bf16 rows
    if `bf16_rows`); with the
    channels' scales s13 [E, 2I] and s2 [E, H], moec::ExpertsInt8 on int8 w13 and w2 (a8: int8 rows). Inputs "x",
    "ids", "w"."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    int8 = s13 is not None
    weights = {"w13": w13, "w2": w2, **({"s13": s13, "s2": s2} if int8 else {})}
    node = helper.make_node(EXPERTS + "Int8" * int8, ["x", "ids", "w", *weights], ["y"], domain=DOMAIN,
                            gate_up=gate_up, **({"int8_activations": 1} if a8 else {}))
    graph = helper.make_graph(
        [node], "moec_experts",
        [helper.make_tensor_value_info(n, t, None) for n, t in (("x", onnx.TensorProto.FLOAT),
                                                                 ("ids", onnx.TensorProto.INT64),
                                                                 ("w", onnx.TensorProto.FLOAT))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.int8 if n[0] == "w" and int8 else np.float32), n)
         for n, v in weights.items()])
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    panel_weights(model)
    narrow_bf16(model)
    if bf16_rows:
        round_rows(model)
    so = options or ort.SessionOptions()
    so.register_custom_ops_library(path)
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def matmul_session(path: str, q, s, z, a8: bool, options=None, tiles: int = 0):
    """A session of one Int4MatMul node with these weights ([N, K/2], [N, G], [N, G] or None; tiles 1: q and s
    `tiled`, 2: q, s and z in `int4_panels`), input "x"."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(t.numpy(), n) for n, t in (("q", q), ("s", s), ("z", z)) if t is not None]
    node = helper.make_node(MATMUL, ["x", "q", "s", "z" if z is not None else ""], ["y"], domain=DOMAIN,
                            int8_activations=int(a8), tiles=int(tiles))
    graph = helper.make_graph([node], "moec_matmul", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    so = options or ort.SessionOptions()
    so.register_custom_ops_library(path)
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
