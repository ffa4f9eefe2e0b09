"""moec::CachedAttention: the KV-cache export's attention on moec's kernel inside ONNX Runtime (backend="onnxruntime", CPU).

    moec::CachedAttention(q [B, S, H*D], k [B, S, KVH*D], v [B, S, KVH*D], past_k [B, KVH, P, D], past_v,
                    bias [B|1, 1, S, T] additive, sinks [H], cos [B|1, S, D], sin optional;
                    num_heads H, kv_num_heads KVH, scale, rotary_half h optional)
        -> out [B, S, H*D], present_k [B, KVH, T, D], present_v          (T = P + S)
        q, k = per head x*cos + cat(-x[h:], x[:h])*sin   where rotary_half is set (HF's rotate_half: h = D/2)
        K, V = cat(past_k, k), cat(past_v, v)                 # query head h reads kv head h // (H / KVH)
        without present outputs (the cache kept in place, `in_place`): past_k, past_v [B, KVH, R >= T, D] whose
        first P = T - S rows (T: the bias's) are the past; k and v are written into rows P..T-1 and K, V read there
        out = softmax([q K^T * scale + bias | sinks])[..., :T] V   # causal: query s never reads a key t > P + s;
                                                                   # 0 where every such key is masked

what moec::ort_gqa computes (backends/onnx_backend.py), the op moec.export_gqa proves each layer's attention
against and exports as com.microsoft::GroupQueryAttention. `rewrite` turns those nodes into this op in the files
backend="onnxruntime" runs on CPU with moec's kernel library (fp32 models; export_onnx/export_genai files keep
ORT's op), and `fuse_rotary` gives it the rotary that torch.onnx exported as ~10 small nodes for each of q and k
(Reshape, Transpose, two Slices, Neg, Concat, two Muls, Add, Transpose, Reshape): the 4-layer demo model's
decode step ran 190 nodes after ORT's optimizations, 122 with the rotary inside (the step's time is in
docs/benchmarks.md with the session's other changes; this one was not timed alone). `in_place` then keeps the cache
in place: the session's callers give each past room and the step hands back the logits alone.

Why: at decode ORT's GroupQueryAttention took ~22 us a layer for one token over 61 positions (a one-node session:
31 us, this op's 16, an Identity's 8.6), for work of a few microseconds. This kernel:
per (batch, kv head, query) the query heads that share the kv head together: fp32 logits with 8-lane dot products,
8 keys at a time (each key's row read from L1 by every head, the 8 sums reduced at once as a single one would be;
with AVX-512 two heads a register, one in each half), the rows 32 keys on prefetched (at decode the cache comes
from DRAM: the experts' weights pass through the L3 between two steps), the softmax with a vectorised exp
(correctly rounded: ort_kernels' exp8), the weighted sum of values in registers (up to 64 channels (AVX-512; 16
with AVX2) of up to 4 heads per pass over the values, each value row read once for the heads); the past copied into
the present once. The vector widths change which lanes run together, not any number's sequence of operations: for
head sizes that are multiples of 8 the outputs are the same bits with or without AVX-512 (up to which NaN comes out
where NaNs meet: an FMA's operand order), and the same as before these paths (a review compared 4,300 cases and
exp8 on every float). Other head sizes take a scalar tail that gcc compiles differently for each build. A query's numbers do not depend on the other queries of the call (decode and prefill agree
to the bit). Work is split over ORT's pool (KernelContext_ParallelFor) only when it is large enough to
pay for waking a thread (prefill).
Positions whose bias is -inf or below -FLT_MAX/2 (HF's masks use the float minimum) are skipped: their probability
is exactly 0 in fp32 for finite keys (a NaN or inf key or value there, which the reference turns into NaN, is not
read). A query with every causal position so masked (a row of padding) gets zeros, as ORT's op gives (and so HF's
sdpa attention's tokens; eager attention spreads such a row evenly instead: export_gqa's proof skips these rows).
"""

from __future__ import annotations

OP = "CachedAttention"

# C source, built into backends/ort_kernels.py's library after its ABI and helpers (error, get_input, parallel)
SOURCE = r"""
/* ---- moec::CachedAttention ---- */
#define AT "CachedAttention"
enum { AIN = 9, AOUT = 3 };
static const char *at_names[AIN] = {"q", "k", "v", "past_k", "past_v", "bias", "sinks", "cos", "sin"};
typedef struct { int64_t H, KVH, rotary_half; float scale; } AttnKernel;
typedef struct {
    int64_t B, S, H, KVH, D, P, T, R, bias_rows;  /* R: the rows of ok/ov per (batch row, kv head), T or more */
    float scale;
    const float *q, *k, *v, *pk, *pv, *bias, *sinks;
    float *out, *ok, *ov;
    int failed;
} Attn;

INLINE float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float r = hsum(acc);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* the 8 lanes of a0..a7 summed as hsum sums one vector, the 8 totals in order: the same bits as 8 hsum calls,
   for a fraction of the shuffles (pairs of halves, then of quarters, then of lanes) */
INLINE __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
#define HALVES(x, y) _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31))
    __m256 h0 = HALVES(a0, a4), h1 = HALVES(a1, a5), h2 = HALVES(a2, a6), h3 = HALVES(a3, a7);
#undef HALVES
    __m256 q01 = _mm256_add_ps(_mm256_shuffle_ps(h0, h1, 0x44), _mm256_shuffle_ps(h0, h1, 0xEE));
    __m256 q23 = _mm256_add_ps(_mm256_shuffle_ps(h2, h3, 0x44), _mm256_shuffle_ps(h2, h3, 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(q01, q23, 0x88), _mm256_shuffle_ps(q01, q23, 0xDD));
}

INLINE int masked(float b) { return b <= -FLT_MAX / 2; }  /* -inf too */

#if defined(__AVX512F__) && defined(__AVX512DQ__)  /* insertf32x8, broadcast_f32x8: DQ */
/* hsum8 on each 256-bit half of a0..a7 (two heads' 8 sums at once): the same pairs added in the same order, so the
   same bits as hsum8 on each half */
INLINE __m512 hsum8x2(__m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 a4, __m512 a5, __m512 a6, __m512 a7) {
    /* per half: [x.lo, y.lo] + [x.hi, y.hi] (128-bit quarters), as hsum8's permute2f128 pairs */
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                  hi = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
#define HALVES(x, y) _mm512_add_ps(_mm512_permutex2var_ps(x, lo, y), _mm512_permutex2var_ps(x, hi, y))
    __m512 h0 = HALVES(a0, a4), h1 = HALVES(a1, a5), h2 = HALVES(a2, a6), h3 = HALVES(a3, a7);
#undef HALVES
    __m512 q01 = _mm512_add_ps(_mm512_shuffle_ps(h0, h1, 0x44), _mm512_shuffle_ps(h0, h1, 0xEE));
    __m512 q23 = _mm512_add_ps(_mm512_shuffle_ps(h2, h3, 0x44), _mm512_shuffle_ps(h2, h3, 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(q01, q23, 0x88), _mm512_shuffle_ps(q01, q23, 0xDD));
}
#endif

/* l[r][i] = q_r . K[at[i]] * scale + bias[at[i]] for the rep query heads r (q_r at q + r*D, l[r] at l + r*ld) and
   i < n (D a multiple of 8): 8 keys at a time, their rows read from L1 by every head, each dot summed as dot_f32
   sums it (with AVX-512 two heads at once, one in each half of a register: each half's lanes do what one head's
   AVX2 lanes do) */
#define PF_KEYS 32
static void logits8(const float *q, int64_t rep, const float *K, const int64_t *at, int64_t n, int64_t D,
                    float scale, const float *bias, float *l, int64_t ld) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float *k[8];
        float b[8];
        UNROLL for (int j = 0; j < 8; j++) k[j] = K + at[i + j] * D, b[j] = bias[at[i + j]];
        if (i + PF_KEYS + 8 <= n)  /* the rows PF_KEYS keys on, from memory while these are summed */
            for (int j = 0; j < 8; j++)
                for (int64_t c = 0; c < D; c += 16) _mm_prefetch((const char *)(K + at[i + PF_KEYS + j] * D + c), _MM_HINT_T0);
        int64_t r = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
        for (; r + 2 <= rep; r += 2) {  /* heads r (low half) and r + 1 (high half) */
            __m512 a[8];
            UNROLL for (int j = 0; j < 8; j++) a[j] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                __m512 qv = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(q + r * D + d)),
                                               _mm256_loadu_ps(q + (r + 1) * D + d), 1);
                UNROLL for (int j = 0; j < 8; j++)
                    a[j] = _mm512_fmadd_ps(qv, _mm512_broadcast_f32x8(_mm256_loadu_ps(k[j] + d)), a[j]);
            }
            __m512 dots = hsum8x2(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
            __m512 lr = _mm512_fmadd_ps(dots, _mm512_set1_ps(scale), _mm512_broadcast_f32x8(_mm256_loadu_ps(b)));
            _mm256_storeu_ps(l + r * ld + i, _mm512_castps512_ps256(lr));
            _mm256_storeu_ps(l + (r + 1) * ld + i, _mm512_extractf32x8_ps(lr, 1));
        }
#endif
        for (; r < rep; r++) {
            __m256 a[8];
            UNROLL for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                __m256 qv = _mm256_loadu_ps(q + r * D + d);
                UNROLL for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + d), a[j]);
            }
            __m256 dots = hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
            _mm256_storeu_ps(l + r * ld + i, _mm256_fmadd_ps(dots, _mm256_set1_ps(scale), _mm256_loadu_ps(b)));
        }
    }
    for (; i < n; i++)
        for (int64_t r = 0; r < rep; r++) l[r * ld + i] = dot_f32(q + r * D, K + at[i] * D, D) * scale + bias[at[i]];
}

/* the largest of l[0..n), NaN skipped, -inf if none (as `m = l[i] > m ? l[i] : m` from -inf): maxps keeps its
   second operand where the first is NaN or equal */
INLINE float max_logit(const float *l, int64_t n) {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(_mm256_loadu_ps(l + i), mv);
    float lanes[8], m = -INFINITY;
    _mm256_storeu_ps(lanes, mv);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (; i < n; i++) m = l[i] > m ? l[i] : m;
    return m;
}

/* the value sums' vectors: 16 channels with AVX-512 (up to 4 a pass: a head of 64 in one pass over the values), 8
   with AVX2 (up to 2: registers); a vector's lanes are channels, so each channel's sum is the same sequence of FMAs
   either way */
#ifdef __AVX512F__
typedef __m512 vsum;
#define VW 16
#define VMAX 4
INLINE __mmask16 vmask(int n) { return (__mmask16)((1u << n) - 1); }
#define VLOAD(p, n) _mm512_maskz_loadu_ps(vmask(n), p)
#define VSTORE(p, x, n) _mm512_mask_storeu_ps(p, vmask(n), x)
#define VSET1 _mm512_set1_ps
#define VZERO _mm512_setzero_ps
#define VFMA _mm512_fmadd_ps
#else
typedef __m256 vsum;
#define VW 8
#define VMAX 2
#define VLOAD(p, n) _mm256_loadu_ps(p)  /* n == 8: D is a multiple of 8 */
#define VSTORE(p, x, n) _mm256_storeu_ps(p, x)
#define VSET1 _mm256_set1_ps
#define VZERO _mm256_setzero_ps
#define VFMA _mm256_fmadd_ps
#endif

/* heads r < NH: o_r[d0:d0+dn] = sum over i < n, in order, of p_r[i] * V[at[i]][d0:d0+dn] (p_r at p + r*ld, o_r at
   o + r*D; dn channels in NV vectors, the last one `last` wide): each V row read once for the heads, the sums in
   registers */
INLINE void weighted_rows(const float *p, int64_t ld, const float *V, const int64_t *at, int64_t n, int64_t D,
                          int64_t d0, float *o, const int NH, const int NV, int last) {
    vsum a[4][VMAX];
    UNROLL for (int r = 0; r < NH; r++) UNROLL for (int v = 0; v < NV; v++) a[r][v] = VZERO();
    for (int64_t i = 0; i < n; i++) {
        const float *vi = V + at[i] * D + d0;
        if (i + PF_KEYS < n)
            UNROLL for (int v = 0; v < NV; v += 16 / VW) _mm_prefetch((const char *)(V + at[i + PF_KEYS] * D + d0 + VW * v), _MM_HINT_T0);
        vsum x[VMAX];
        UNROLL for (int v = 0; v < NV; v++) x[v] = VLOAD(vi + VW * v, v == NV - 1 ? last : VW);
        UNROLL for (int r = 0; r < NH; r++) {
            vsum w = VSET1(p[r * ld + i]);
            UNROLL for (int v = 0; v < NV; v++) a[r][v] = VFMA(w, x[v], a[r][v]);
        }
    }
    UNROLL for (int r = 0; r < NH; r++)
        UNROLL for (int v = 0; v < NV; v++) VSTORE(o + r * D + d0 + VW * v, a[r][v], v == NV - 1 ? last : VW);
}

/* the rep = H / KVH query heads of kv head `kv` at query s of batch row b (their q and out rows are adjacent) */
static void attend_item(void *p, size_t item) {
    Attn *a = p;
    int64_t S = a->S, D = a->D, T = a->T, rep = a->H / a->KVH, ld = T + 8;
    int64_t s = item % S, kv = (item / S) % a->KVH, b = item / (S * a->KVH);
    const float *K = a->ok + (b * a->KVH + kv) * a->R * D, *V = a->ov + (b * a->KVH + kv) * a->R * D;
    const float *bias = a->bias + ((a->bias_rows > 1 ? b : 0) * S + s) * T;
    const float *q = a->q + ((b * S + s) * a->H + kv * rep) * D;
    float *out = a->out + ((b * S + s) * a->H + kv * rep) * D;
    float *l = malloc(rep * ld * sizeof(float));  /* each head's logits, then its probabilities */
    int64_t *at = malloc((T + 1) * sizeof(int64_t));
    if (!l || !at) {
        free(l), free(at);
        a->failed = 1;
        return;
    }
    /* the positions attended to: the causal ones (t <= P + s, as ORT's op) that are not masked */
    int64_t n = 0;
    for (int64_t t = 0; t <= a->P + s; t++)
        if (!masked(bias[t])) at[n++] = t;
    if (!n) {  /* nothing to attend to (a row of padding): zeros, as ORT's op */
        memset(out, 0, rep * D * sizeof(float));
        free(l), free(at);
        return;
    }
    if (D % 8 == 0) {
        logits8(q, rep, K, at, n, D, a->scale, bias, l, ld);
    } else {
        for (int64_t r = 0; r < rep; r++)
            for (int64_t i = 0; i < n; i++) l[r * ld + i] = dot_f32(q + r * D, K + at[i] * D, D) * a->scale + bias[at[i]];
    }
    for (int64_t r = 0; r < rep; r++) {  /* softmax: l[r] becomes the probabilities */
        float *lr = l + r * ld, m = max_logit(lr, n), sink = a->sinks ? a->sinks[kv * rep + r] : -INFINITY;
        m = sink > m ? sink : m;
        __m256 acc = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(lr + i), mv));
            _mm256_storeu_ps(lr + i, e);
            acc = _mm256_add_ps(acc, e);
        }
        float sum = hsum(acc);
        for (; i < n; i++) sum += (lr[i] = exp1(lr[i] - m));
        if (a->sinks) sum += exp1(sink - m);
        float inv = 1.f / sum;
        for (i = 0; i < n; i++) lr[i] *= inv;
    }
    if (D % 8 == 0) {  /* up to VMAX vectors of channels of up to 4 heads at a time */
        for (int64_t r = 0; r < rep; r += 4)
            for (int64_t d = 0; d < D; d += VMAX * VW) {
                int64_t dn = D - d < VMAX * VW ? D - d : VMAX * VW;
                int nh = rep - r < 4 ? (int)(rep - r) : 4, nv = (int)((dn + VW - 1) / VW), last = (int)(dn - (nv - 1) * VW);
#define ROWS(NH, NV) weighted_rows(l + r * ld, ld, V, at, n, D, d, out + r * D, NH, NV, last)
#define HEADS(NV) switch (nh) { case 1: ROWS(1, NV); break; case 2: ROWS(2, NV); break; case 3: ROWS(3, NV); break; \
                                default: ROWS(4, NV); }
                switch (nv) {
                case 1: HEADS(1); break;
                case 2: HEADS(2); break;
#if VMAX > 2
                case 3: HEADS(3); break;
                default: HEADS(4);
#endif
                }
#undef HEADS
#undef ROWS
            }
    } else {
        for (int64_t r = 0; r < rep; r++) {
            float *o = out + r * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t j = 0; j < n; j++) {
                const float *vj = V + at[j] * D;
                float w = l[r * ld + j];
                int64_t d = 0;
                __m256 wv = _mm256_set1_ps(w);
                for (; d + 8 <= D; d += 8)
                    _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(o + d)));
                for (; d < D; d++) o[d] += w * vj[d];
            }
        }
    }
    free(l), free(at);
}

static void present_item(void *p, size_t i) {  /* (b, kv head) i: its past (unless in place), then its new rows */
    Attn *a = p;
    int64_t b = i / a->KVH, h = i % a->KVH, D = a->D, P = a->P, S = a->S, R = a->R;
    if (a->ok != a->pk) {
        memcpy(a->ok + i * R * D, a->pk + i * P * D, P * D * sizeof(float));
        memcpy(a->ov + i * R * D, a->pv + i * P * D, P * D * sizeof(float));
    }
    for (int64_t s = 0; s < S; s++) {
        memcpy(a->ok + (i * R + P + s) * D, a->k + ((b * S + s) * a->KVH + h) * D, D * sizeof(float));
        memcpy(a->ov + (i * R + P + s) * D, a->v + ((b * S + s) * a->KVH + h) * D, D * sizeof(float));
    }
}

/* rows x [B, S, heads*D] rotated into y as HF's apply_rotary_pos_emb: per head, x*cos + cat(-x2, x1)*sin with
   x1 = x[:half], x2 = x[half:] (half = D/2: rotate_half) and cos, sin [B or 1, S, D] (each product rounded, then
   the sum: fp-contract off) */
__attribute__((optimize("fp-contract=off")))
static void rotate(const float *x, float *y, int64_t B, int64_t S, int64_t heads, int64_t D, int64_t half,
                   const Input *cos, const Input *sin) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t s = 0; s < S; s++) {
            int64_t row = (cos->dims[0] > 1 ? b : 0) * S + s;
            const float *c = (const float *)cos->data + row * D, *sn = (const float *)sin->data + row * D;
            for (int64_t h = 0; h < heads; h++) {
                const float *u = x + ((b * S + s) * heads + h) * D;
                float *o = y + ((b * S + s) * heads + h) * D;
                for (int64_t d = 0; d < D - half; d++) {
                    float p = u[d] * c[d], r = -u[d + half] * sn[d];
                    o[d] = p + r;
                }
                for (int64_t d = D - half; d < D; d++) {
                    float p = u[d] * c[d], r = u[d - (D - half)] * sn[d];
                    o[d] = p + r;
                }
            }
        }
}

static OrtStatus *attention(void *kernel, OrtKernelContext *ctx) {
    const AttnKernel *kn = kernel;
    Input in[AIN];
    for (size_t i = 0; i < AIN; i++) CHECK(get_input(AT, ctx, i, at_names, in + i));
    int64_t H = kn->H, KVH = kn->KVH;
    if (in[0].rank != 3 || in[3].rank != 4 || H <= 0 || KVH <= 0 || H % KVH || in[0].dims[2] % H)
        return error(AT, ORT_INVALID_ARGUMENT, "takes q [B, S, H*D] and past_k [B, KVH, P, D] with H a multiple of KVH");
    size_t outputs;
    CHECK(CALL((const OrtKernelContext *, size_t *), KernelContext_GetOutputCount, ctx, &outputs));
    const Input *k = in + 1, *v = in + 2, *pk = in + 3, *pv = in + 4, *bias = in + 5, *sinks = in + 6;
    /* in place (no present outputs): past_k/past_v hold R >= T rows of which the bias's T - S are the past, and
       the new rows are written into them */
    int inplace = outputs == 1;
    int64_t B = in[0].dims[0], S = in[0].dims[1], D = in[0].dims[2] / H, R = in[3].dims[2];
    int64_t T = inplace ? (bias->rank == 4 ? bias->dims[3] : -1) : R + S, P = T - S;
    int ok = (outputs == 1 || outputs == AOUT) && P >= 0 && R >= (inplace ? T : P) && k->rank == 3 &&
             v->rank == 3 && k->dims[0] == B && k->dims[1] == S && k->dims[2] == KVH * D &&
             v->dims[0] == B && v->dims[1] == S && v->dims[2] == KVH * D && pk->dims[0] == B &&
             pk->dims[1] == KVH && pk->dims[3] == D && pv->rank == 4 && pv->dims[0] == B && pv->dims[1] == KVH &&
             pv->dims[2] == R && pv->dims[3] == D && bias->rank == 4 && (bias->dims[0] == 1 || bias->dims[0] == B) &&
             bias->dims[1] == 1 && bias->dims[2] == S && bias->dims[3] == T && (!sinks->v || sinks->numel == H);
    const Input *cos = in + 7, *sin = in + 8;
    if (ok && !kn->rotary_half)  /* cos and sin without rotary_half: a malformed node, not ignored */
        ok = !cos->v && !sin->v;
    if (ok && kn->rotary_half)  /* rotary: cos and sin [B or 1, S, D] over whole heads */
        ok = cos->v && sin->v && kn->rotary_half > 0 && kn->rotary_half < D && cos->rank == 3 && sin->rank == 3 &&
             (cos->dims[0] == 1 || cos->dims[0] == B) && cos->dims[1] == S && cos->dims[2] == D &&
             sin->dims[0] == cos->dims[0] && sin->dims[1] == S && sin->dims[2] == D;
    if (!ok)
        return error(AT, ORT_INVALID_ARGUMENT, "q [B, S, H*D], k and v [B, S, KVH*D], past_k and past_v [B, KVH, P, "
                     "D] (P+S rows or more without present outputs), bias [B or 1, 1, S, P+S], sinks [H] and cos, sin "
                     "[B or 1, S, D > rotary_half] do not fit (H %lld, KVH %lld, rotary_half %lld, outputs %zu)",
                     (long long)H, (long long)KVH, (long long)kn->rotary_half, outputs);
    Attn a = {.B = B, .S = S, .H = H, .KVH = KVH, .D = D, .P = P, .T = T, .R = inplace ? R : T,
              .bias_rows = bias->dims[0], .scale = kn->scale, .q = in[0].data, .k = k->data, .v = v->data,
              .pk = pk->data, .pv = pv->data, .bias = bias->data, .sinks = sinks->v ? sinks->data : NULL};
    int64_t od[3] = {B, S, H * D}, pd[4] = {B, KVH, T, D};
    OrtValue *y;
    CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 0, od, 3, &y));
    CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&a.out));
    if (inplace) {
        a.ok = (float *)pk->data, a.ov = (float *)pv->data;
    } else {
        CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 1, pd, 4, &y));
        CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&a.ok));
        CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 2, pd, 4, &y));
        CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&a.ov));
    }
    if (B * T * D == 0)
        return NULL;
    float *rq = NULL, *rk = NULL;  /* rotated q and k: the op's q and k from here on */
    if (kn->rotary_half) {
        rq = malloc(B * S * H * D * sizeof(float) + 1), rk = malloc(B * S * KVH * D * sizeof(float) + 1);  /* S may be 0 */
        if (!rq || !rk) {
            free(rq), free(rk);
            return error(AT, ORT_FAIL, "out of memory");
        }
        rotate(a.q, rq, B, S, H, D, kn->rotary_half, cos, sin);
        rotate(a.k, rk, B, S, KVH, D, kn->rotary_half, cos, sin);
        a.q = rq, a.k = rk;
    }
    /* threads only where the work pays for waking one (~0.5M multiply-adds: a prompt, not a decode step) */
    int wide = B * H * S * T * D > (1 << 19);
    OrtStatus *st = wide ? parallel(ctx, present_item, B * KVH, &a) : (run_all(present_item, B * KVH, &a), NULL);
    if (!st && S) st = wide ? parallel(ctx, attend_item, B * KVH * S, &a) : (run_all(attend_item, B * KVH * S, &a), NULL);
    free(rq), free(rk);
    return st ? st : a.failed ? error(AT, ORT_FAIL, "out of memory") : NULL;
}

static OrtStatus *attention_create(const OrtCustomOp *op, OrtApiTable api_, const OrtKernelInfo *info, void **out) {
    AttnKernel *kn = calloc(1, sizeof *kn);
    if (!kn)
        return error(AT, ORT_FAIL, "out of memory");
    OrtStatus *st = CALL((const OrtKernelInfo *, const char *, int64_t *), KernelInfoGetAttribute_int64, info,
                         "num_heads", &kn->H);
    if (!st)
        st = CALL((const OrtKernelInfo *, const char *, int64_t *), KernelInfoGetAttribute_int64, info,
                  "kv_num_heads", &kn->KVH);
    if (!st)
        st = CALL((const OrtKernelInfo *, const char *, float *), KernelInfoGetAttribute_float, info, "scale",
                  &kn->scale);
    if (!st) {  /* optional, 0 (q and k as they come) where absent */
        OrtStatus *absent = CALL((const OrtKernelInfo *, const char *, int64_t *), KernelInfoGetAttribute_int64,
                                 info, "rotary_half", &kn->rotary_half);
        if (absent) ((void (*)(OrtStatus *))api[ReleaseStatus])(absent), kn->rotary_half = 0;
    }
    if (st) {
        free(kn);
        return st;
    }
    *out = kn;
    return NULL;
}

static const char *at_name(const OrtCustomOp *op) { return "CachedAttention"; }
static int at_input_type(const OrtCustomOp *op, size_t i) { return T_FLOAT; }
static size_t at_inputs(const OrtCustomOp *op) { return AIN; }
static size_t at_outputs(const OrtCustomOp *op) { return AOUT; }
static int at_output_kind(const OrtCustomOp *op, size_t i) { return i ? OPTIONAL : REQUIRED; }
static int at_input_kind(const OrtCustomOp *op, size_t i) { return i >= 6 ? OPTIONAL : REQUIRED; }
"""


def register_schema() -> None:
    """moec::CachedAttention's schema, registered with onnx (onnx.checker checks the rewritten file)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP, "moec"):
        return
    optional = OpSchema.FormalParameterOption.Optional
    onnx.defs.register_schema(OpSchema(
        OP, "moec", 1, "moec's attention kernel (backends/ort_attention.py)",
        inputs=[OpSchema.FormalParameter(n, "tensor(float)", **({"param_option": optional} if i >= 6 else {}))
                for i, n in enumerate(("q", "k", "v", "past_k", "past_v", "bias", "sinks", "cos", "sin"))],
        outputs=[OpSchema.FormalParameter(n, "tensor(float)", **({"param_option": optional} if i else {}))
                 for i, n in enumerate(("out", "present_k", "present_v"))],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "the logits' scale"),
                    OpSchema.Attribute("rotary_half", OpSchema.AttrType.INT, "q and k rotated first (cos, sin)",
                                       required=False)]))


# GroupQueryAttention attributes the op computes (with the value each must have where the op has no such thing)
_ATTRIBUTES = {"num_heads": None, "kv_num_heads": None, "scale": None, "do_rotary": 0, "rotary_interleaved": 0,
               "local_window_size": -1, "softcap": 0.0, "smooth_softmax": 0, "qk_output": 0}


def _why_not(node, a: dict) -> str | None:
    """Why a GroupQueryAttention node is not moec::ort_gqa's computation as this op takes it (None: it is)."""
    inputs = list(node.input) + [""] * (12 - len(node.input))
    if not all(inputs[:5]) or not inputs[10]:
        return "no separate k/v, past or attention bias"
    if any(inputs[7:10]) or any(inputs[12:]) or any(node.output[3:]):
        return "rotary caches, position ids, quantized or normalized q/k, or attention probabilities as an output"
    other = {k: v for k, v in a.items() if k not in _ATTRIBUTES or (_ATTRIBUTES[k] is not None and v != _ATTRIBUTES[k])}
    if other or "scale" not in a:
        return f"attributes {sorted(other) or ['no scale']}"
    return None


def rewrite(proto) -> int:
    """Each com.microsoft::GroupQueryAttention of `proto` (an fp32 onnx.ModelProto, in place) that computes
    moec::ort_gqa (separate q/k/v, past, additive bias, optional sinks; no rotary, window or softcap) becomes
    moec::CachedAttention; the nodes that only fed the removed seqlens_k/total_sequence_length inputs go too. Returns
    how many."""
    from onnx import helper

    register_schema()
    count, dropped = 0, set()
    for n in proto.graph.node:
        if n.op_type != "GroupQueryAttention" or n.domain != "com.microsoft":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if _why_not(n, a) is not None:
            continue
        inputs = list(n.input) + [""] * (12 - len(n.input))
        dropped.update(inputs[5:7])
        new = helper.make_node(OP, [*inputs[:5], inputs[10], inputs[11]], list(n.output)[:3], name=n.name,
                               domain="moec", num_heads=a["num_heads"], kv_num_heads=a["kv_num_heads"],
                               scale=float(a["scale"]))
        n.CopyFrom(new)
        count += 1
    if count:
        _prune(proto.graph, dropped - {""})
        if not any(o.domain == "moec" for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid("moec", 1))
    return count


def fuse_rotary(proto) -> int:
    """Each moec::CachedAttention whose q and k come out of HF's rotate-half rotary as torch.onnx exports it
    takes the rotation in (inputs cos, sin; attribute rotary_half = h), and the ~20 small nodes that computed it go:

        x = Transpose(Reshape(lin [B, S, H*D], [B, S, H, D]), [0, 2, 1, 3])                 # [B, H, S, D]
        rot = Add(Mul(x, Unsqueeze(cos [B, S, D], 1)),
                  Mul(Concat(Neg(Slice(x, h:)), Slice(x, :h), axis=-1), Unsqueeze(sin, 1)))     # h = D/2
        q = Reshape(Transpose(rot, [0, 2, 1, 3]), [B, S, H*D])     ->     CachedAttention(lin, ..., cos, sin)

    (either operand order of Add and Mul; the op computes this for any 0 < h < D). What the graph cannot say
    statically, the op checks when it runs (cos and sin [B or 1, S, D]); the session is then checked against the
    eager model like every session. Returns how many nodes."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    if any(a.HasField("g") or a.graphs for n in graph.node for a in n.attribute):
        return 0  # readers inside subgraphs: not counted here

    def index():
        prod = {o: n for n in graph.node for o in n.output}
        readers: dict[str, int] = {o.name: 1 for o in graph.output}
        for n in graph.node:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        return prod, readers

    prod, readers = index()
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_location != 1}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def node(name, op, n_readers=1):
        n = prod.get(name)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") and \
            readers.get(name, 0) == n_readers else None

    def const(name):
        v = consts.get(name)
        return None if v is None else [int(i) for i in v.reshape(-1)]

    def transposed(n):
        return n is not None and [int(p) for a in n.attribute if a.name == "perm" for p in a.ints] == [0, 2, 1, 3]

    def unsqueezed(name):  # Unsqueeze(t, [1]) -> t
        n = prod.get(name)
        if n is None or n.op_type != "Unsqueeze" or len(n.input) != 2 or const(n.input[1]) != [1]:
            return None
        return n.input[0]

    def half_of(sl, x):  # Slice(x, a, b, axes [-1] or [3], steps 1) -> (a, b)
        if sl is None or sl.input[0] != x or len(sl.input) < 4:
            return None
        starts, ends, axes = const(sl.input[1]), const(sl.input[2]), const(sl.input[3])
        steps = const(sl.input[4]) if len(sl.input) > 4 and sl.input[4] else [1]
        if None in (starts, ends, axes, steps) or axes not in ([-1], [3]) or steps != [1]:
            return None
        return starts[0], ends[0]

    def match(name):
        r1 = node(name, "Reshape")
        t1 = r1 and node(r1.input[0], "Transpose")
        add = transposed(t1) and node(t1.input[0], "Add")
        if not add:
            return None
        muls = [node(i, "Mul") for i in add.input]
        if None in muls:
            return None
        for plain, turned in (muls, muls[::-1]):
            for ci in (0, 1):
                cat = node(turned.input[ci], "Concat")
                sin = unsqueezed(turned.input[1 - ci])
                if cat is None or sin is None or len(cat.input) != 2 or \
                        [a.i for a in cat.attribute if a.name == "axis"] not in ([-1], [3]):
                    continue
                neg = node(cat.input[0], "Neg")
                hi = neg and node(neg.input[0], "Slice")
                x = hi.input[0] if hi else None
                lo = node(cat.input[1], "Slice")
                for xi in (0, 1):
                    cos = unsqueezed(plain.input[1 - xi])
                    if plain.input[xi] != x or cos is None:
                        continue
                    a, b = half_of(lo, x) or (None, None), half_of(hi, x) or (None, None)
                    if a[0] != 0 or a[1] is None or a[1] <= 0 or b[0] != a[1] or b[1] < 2 ** 31 or readers.get(x) != 3:
                        continue
                    t0 = node(x, "Transpose", 3)
                    r0 = transposed(t0) and node(t0.input[0], "Reshape")
                    if r0:
                        return r0.input[0], cos, sin, a[1]
        return None

    count, before = 0, _used(graph)
    for n in graph.node:
        if n.op_type != OP or n.domain != "moec" or any(a.name == "rotary_half" for a in n.attribute):
            continue
        q, k = match(n.input[0]), match(n.input[1])
        if q is None or k is None or q[1:] != k[1:]:
            continue
        dropped = {n.input[0], n.input[1]}
        inputs = list(n.input) + [""] * (7 - len(n.input))
        inputs[0], inputs[1] = q[0], k[0]
        del n.input[:]
        n.input.extend([*inputs[:7], q[1], q[2]])
        n.attribute.append(helper.make_attribute("rotary_half", q[3]))
        count += 1
        _prune(graph, dropped)
        prod, readers = index()
    gone = before - _used(graph)  # the Slices' constants
    for t in [t for t in graph.initializer if t.name in gone]:
        graph.initializer.remove(t)
    return count


def in_place(proto) -> int:
    """The KV cache kept in place: where every past input of `proto` (the KV-cache session's file) is a
    moec::CachedAttention's past_k or past_v and is otherwise only measured by Shape nodes, each such node loses its
    present outputs and writes its new keys and values into its past instead (the caller gives each past room for
    the new rows; the past length P is now the mask's width minus the new tokens'):

        out, present_k, present_v = CachedAttention(q, k, v, past_k [B, KVH, P, D], past_v, ...)
        ->  out = CachedAttention(q, k, v, past_k [B, KVH, R >= P + S, D], past_v, ...)    # rows P..P+S-1 written
        Shape(past_k)[2] = P   ->   Shape(attention_mask)[1] - Shape(input_ids)[1]

    A decode step then hands no cache back to Python and copies no past: mix bf16 after a 1024-token prompt decoded
    1.09x as fast, after 16 tokens within the noise (docs/benchmarks.md). Returns how many nodes (0: left as it
    was)."""
    from onnx import helper

    graph = proto.graph
    names = {i.name for i in graph.input}
    attention = [n for n in graph.node if n.op_type == OP and n.domain == "moec"]
    read = [p for n in attention for p in n.input[3:5]]
    pasts, presents = set(read), {p for n in attention for p in n.output[1:3]}
    plain = {"input_ids", "attention_mask", "position_ids"}
    if (not attention or "input_ids" not in names or "attention_mask" not in names or names - plain != pasts
            or len(read) != len(pasts)  # a past two nodes read (layers sharing a cache) would get both's rows
            or {o.name for o in graph.output} != presents | {graph.output[0].name} or graph.output[0].name in presents
            or any(a.HasField("g") or a.graphs for n in graph.node for a in n.attribute)):
        return 0  # other state (recurrent layers, another attention) or an odd graph: as it was
    shapes = []
    for n in graph.node:
        reads = [i for i in n.input if i in pasts]
        if reads and not (n.op_type == OP and n.domain == "moec" and list(n.input).count(reads[0]) == 1
                          and set(reads) <= set(n.input[3:5])) and n.op_type != "Shape":
            return 0
        if any(o in presents for o in n.output) and not (n.op_type == OP and n.domain == "moec"):
            return 0
        if reads and n.op_type == "Shape":
            shapes.append(n)
    if any(i in presents for n in graph.node for i in n.input):
        return 0
    length = "moec_past_length"  # [1]: the mask's width minus the new tokens'
    nodes = [helper.make_node("Shape", ["attention_mask"], [length + "_total"], start=1, end=2),
             helper.make_node("Shape", ["input_ids"], [length + "_new"], start=1, end=2),
             helper.make_node("Sub", [length + "_total", length + "_new"], [length])]
    for n in shapes:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        start, end = a.get("start", 0), a.get("end", 4)
        start, end = (min(max(d + 4 if d < 0 else d, 0), 4) for d in (start, end))
        parts = []
        for d in range(start, end):
            parts.append(length if d == 2 else f"{n.output[0]}_dim{d}")
            if d != 2:
                nodes.append(helper.make_node("Shape", [n.input[0]], [parts[-1]], start=d, end=d + 1))
        nodes.append(helper.make_node("Concat", parts, [n.output[0]], axis=0) if parts else
                     helper.make_node("Constant", [], [n.output[0]], value_ints=[]))
        graph.node.remove(n)
    for n in attention:
        del n.output[1:]
    for o in [o for o in graph.output if o.name in presents]:
        graph.output.remove(o)
    for i, n in enumerate(nodes):
        graph.node.insert(i, n)
    return len(attention)


def _used(graph) -> set[str]:
    """The names the graph's nodes read, inside their subgraphs too, and its outputs."""
    names = {o.name for o in graph.output}
    for n in graph.node:
        names.update(n.input)
        for attr in n.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _used(g)
    return names


def _prune(graph, dropped: set[str]) -> None:
    """Drop the nodes that made the `dropped` values (seqlens_k, total_sequence_length) and that nothing reads now,
    and so on up the chain that fed them."""
    while dropped:
        used = _used(graph)
        dead = [n for n in graph.node if any(o in dropped for o in n.output) and not any(o in used for o in n.output)]
        dropped = {i for n in dead for i in n.input if i}  # checked against the next pass's readers
        for n in dead:
            graph.node.remove(n)


def rotate_half(x, cos, sin, heads: int):
    """HF's apply_rotary_pos_emb on rows x [B, S, heads*D] with cos, sin [B or 1, S, D]: what rotary_dim computes."""
    import torch

    B, S, _ = x.shape
    x = x.reshape(B, S, heads, -1)
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), -1)
    return (x * cos[:, :, None] + turned * sin[:, :, None]).reshape(B, S, -1)


def self_test(path: str) -> None:
    """A one-node session against moec::ort_gqa (2 rows, 3 new tokens after 5, 8 heads over 2, a padded row,
    a fully masked row, sinks and none, q and k rotated first; a long row that takes the threaded path), and each
    case again with the cache kept in place (the same output to the bit, the presents' rows written into the pasts);
    RuntimeError where they differ."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper

    import moec.backends.onnx_backend  # noqa: F401 (registers moec::ort_gqa's torch implementation)

    g = torch.Generator().manual_seed(0)
    for B, S, P, H, KVH, D, sinks, rotary in ((2, 3, 5, 8, 2, 16, True, False), (2, 3, 5, 4, 4, 8, False, True),
                                              (1, 40, 300, 8, 2, 64, False, False)):
        T = P + S
        x = {"q": torch.randn(B, S, H * D, generator=g) * 3, "k": torch.randn(B, S, KVH * D, generator=g),
             "v": torch.randn(B, S, KVH * D, generator=g), "past_k": torch.randn(B, KVH, P, D, generator=g),
             "past_v": torch.randn(B, KVH, P, D, generator=g), "bias": torch.zeros(B, 1, S, T)}
        x["bias"][..., P + 1:] = torch.finfo(torch.float32).min  # causal-like, and row 1's first 2 positions padded
        if B > 1:
            x["bias"][1, ..., :2] = float("-inf")
            x["bias"][1, 0, 0] = torch.finfo(torch.float32).min  # a fully masked query row
        x["sinks"] = torch.randn(H, generator=g) if sinks else None
        if rotary:
            angle = torch.randn(B, S, D // 2, generator=g) * 3
            x["cos"], x["sin"] = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        node = helper.make_node(OP, [n if t is not None else "" for n, t in x.items()],
                                ["out", "present_k", "present_v"], domain="moec", num_heads=H, kv_num_heads=KVH,
                                scale=D ** -0.5, **({"rotary_half": D // 2} if rotary else {}))
        x = {n: t for n, t in x.items() if t is not None}

        def run(outputs, feeds):
            graph = helper.make_graph([helper.make_node(OP, list(node.input), outputs, domain="moec")],
                                      "moec_attention_self_test",
                                      [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in x],
                                      [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs])
            graph.node[0].attribute.extend(node.attribute)
            model = helper.make_model(graph, ir_version=10,
                                      opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("moec", 1)])
            so = ort.SessionOptions()
            so.register_custom_ops_library(path)
            so.intra_op_num_threads = 2
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return [torch.from_numpy(o) for o in sess.run(None, feeds)]

        feeds = {n: t.numpy() for n, t in x.items()}
        got = run(["out", "present_k", "present_v"], feeds)
        for name in ("past_k", "past_v"):  # the cache kept in place: pasts with room (2 rows more), written into
            feeds[name] = np.concatenate([feeds[name], np.zeros((B, KVH, S + 2, D), np.float32)], 2)
        kept = run(["out"], feeds)[0]
        if not (torch.equal(kept, got[0]) and all(np.array_equal(feeds[n][:, :, :T], p.numpy())
                                                  for n, p in zip(("past_k", "past_v"), got[1:]))):
            raise RuntimeError(f"moec::CachedAttention's self-test: with the cache kept in place, the output or the "
                               f"rows written differ from those with presents (B={B} S={S} P={P})")
        q, k = x["q"], x["k"]
        if rotary:
            q, k = rotate_half(q, x["cos"], x["sin"], H), rotate_half(k, x["cos"], x["sin"], KVH)
        want = torch.ops.moec.ort_gqa(q, k, x["v"], x["past_k"], x["past_v"], x["bias"], x.get("sinks"), H, KVH,
                                      D ** -0.5)
        for name, a, b in zip(("out", "present_k", "present_v"), got, want):
            err = ((a - b).abs().max() / b.abs().max()).item()
            if not err < 1e-5:
                raise RuntimeError(f"moec::CachedAttention's self-test differs from moec::ort_gqa ({name}, B={B} S={S} "
                                   f"P={P} rotary={rotary}: relative error {err:.2e})")
