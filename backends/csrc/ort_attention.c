/* moec::CachedAttention (backends/ort_attention.py describes it), built into ort_kernels's library after ort_experts.c,
   with ort_api.c's helpers (error, get_input, parallel) */
#define AT "CachedAttention"
enum { AIN = 10, AOUT = 3, AT_MASK = 9 };
static const char *at_names[AIN] = {"q", "k", "v", "past_k", "past_v", "bias", "sinks", "cos", "sin", "mask"};
typedef struct { int64_t H, KVH, rotary_half; float scale; } AttnKernel;
typedef struct {
    int64_t B, S, H, KVH, D, P, T, R;  /* R: the rows of ok/ov per (batch row, kv head), T or more */
    int64_t bias_b, bias_s;  /* the bias row of (b, s): bias + b * bias_b + s * bias_s (T floats) */
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
    const float *bias = a->bias + b * a->bias_b + s * a->bias_s;
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
    const Input *k = in + 1, *v = in + 2, *pk = in + 3, *pv = in + 4, *bias = in + 5, *sinks = in + 6,
                *mask = in + AT_MASK;
    /* in place (no present outputs): past_k/past_v hold R >= T rows of which the bias's (or mask's) T - S are the
       past, and the new rows are written into them */
    int inplace = outputs == 1;
    int64_t B = in[0].dims[0], S = in[0].dims[1], D = in[0].dims[2] / H, R = in[3].dims[2];
    const Input *width = mask->v ? mask : bias;  /* T: its last dimension */
    int64_t T = inplace ? (width->rank >= 2 ? width->dims[width->rank - 1] : -1) : R + S, P = T - S;
    int ok = (outputs == 1 || outputs == AOUT) && P >= 0 && R >= (inplace ? T : P) && k->rank == 3 &&
             v->rank == 3 && k->dims[0] == B && k->dims[1] == S && k->dims[2] == KVH * D &&
             v->dims[0] == B && v->dims[1] == S && v->dims[2] == KVH * D && pk->dims[0] == B &&
             pk->dims[1] == KVH && pk->dims[3] == D && pv->rank == 4 && pv->dims[0] == B && pv->dims[1] == KVH &&
             pv->dims[2] == R && pv->dims[3] == D && (!sinks->v || sinks->numel == H) &&
             (mask->v ? !bias->v && mask->rank == 2 && mask->dims[0] == B && mask->dims[1] == T
                      : bias->v && bias->rank == 4 && (bias->dims[0] == 1 || bias->dims[0] == B) && bias->dims[1] == 1 &&
                        bias->dims[2] == S && bias->dims[3] == T);
    const Input *cos = in + 7, *sin = in + 8;
    if (ok && !kn->rotary_half)  /* cos and sin without rotary_half: a malformed node, not ignored */
        ok = !cos->v && !sin->v;
    if (ok && kn->rotary_half)  /* rotary: cos and sin [B or 1, S, D] over whole heads */
        ok = cos->v && sin->v && kn->rotary_half > 0 && kn->rotary_half < D && cos->rank == 3 && sin->rank == 3 &&
             (cos->dims[0] == 1 || cos->dims[0] == B) && cos->dims[1] == S && cos->dims[2] == D &&
             sin->dims[0] == cos->dims[0] && sin->dims[1] == S && sin->dims[2] == D;
    if (!ok)
        return error(AT, ORT_INVALID_ARGUMENT, "q [B, S, H*D], k and v [B, S, KVH*D], past_k and past_v [B, KVH, P, "
                     "D] (P+S rows or more without present outputs), bias [B or 1, 1, S, P+S] or else mask [B, P+S], "
                     "sinks [H] and cos, sin [B or 1, S, D > rotary_half] do not fit (H %lld, KVH %lld, rotary_half "
                     "%lld, outputs %zu)",
                     (long long)H, (long long)KVH, (long long)kn->rotary_half, outputs);
    Attn a = {.B = B, .S = S, .H = H, .KVH = KVH, .D = D, .P = P, .T = T, .R = inplace ? R : T,
              .bias_b = mask->v ? T : bias->dims[0] > 1 ? S * T : 0, .bias_s = mask->v ? 0 : T, .scale = kn->scale,
              .q = in[0].data, .k = k->data, .v = v->data, .pk = pk->data, .pv = pv->data,
              .sinks = sinks->v ? sinks->data : NULL};
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
    /* a mask [B, T] (the padding; the op is causal anyway): each row's bias, 0 where set and -inf where not, read
       by every query of the row */
    float *rows = mask->v ? malloc(B * T * sizeof(float)) : NULL, *rq = NULL, *rk = NULL;
    if (mask->v && rows)
        for (int64_t i = 0; i < B * T; i++) rows[i] = ((const uint8_t *)mask->data)[i] ? 0.f : -INFINITY;
    a.bias = mask->v ? rows : bias->data;
    if (kn->rotary_half) {  /* rotated q and k: the op's q and k from here on */
        rq = malloc(B * S * H * D * sizeof(float) + 1), rk = malloc(B * S * KVH * D * sizeof(float) + 1);  /* S may be 0 */
    }
    if ((mask->v && !rows) || (kn->rotary_half && (!rq || !rk))) {
        free(rows), free(rq), free(rk);
        return error(AT, ORT_FAIL, "out of memory");
    }
    if (kn->rotary_half) {
        rotate(a.q, rq, B, S, H, D, kn->rotary_half, cos, sin);
        rotate(a.k, rk, B, S, KVH, D, kn->rotary_half, cos, sin);
        a.q = rq, a.k = rk;
    }
    /* threads only where the work pays for waking one (~0.5M multiply-adds: a prompt, not a decode step) */
    int wide = B * H * S * T * D > (1 << 19);
    OrtStatus *st = wide ? parallel(ctx, present_item, B * KVH, &a) : (run_all(present_item, B * KVH, &a), NULL);
    if (!st && S) st = wide ? parallel(ctx, attend_item, B * KVH * S, &a) : (run_all(attend_item, B * KVH * S, &a), NULL);
    free(rows), free(rq), free(rk);
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
static int at_input_type(const OrtCustomOp *op, size_t i) { return i == AT_MASK ? T_BOOL : T_FLOAT; }
static size_t at_inputs(const OrtCustomOp *op) { return AIN; }
static size_t at_outputs(const OrtCustomOp *op) { return AOUT; }
static int at_output_kind(const OrtCustomOp *op, size_t i) { return i ? OPTIONAL : REQUIRED; }
static int at_input_kind(const OrtCustomOp *op, size_t i) { return i >= 5 ? OPTIONAL : REQUIRED; }
