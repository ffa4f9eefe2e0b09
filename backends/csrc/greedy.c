/* The generate loop's work between two session runs (backends/ort_generate.py: built into cpu_native's library
   and called through ctypes). In numpy it is ~10 small operations, each slow with the caches cold after a step:
   41-61 us a token outside the session on mix int4, 156 on mix bf16 (its rounding too); here one or two calls,
   14-25 and 63 us (docs/benchmarks.md). Sampling's top-k warper and draw too: in torch and numpy ~180 us a token
   with the caches cold at a vocabulary of 1024, ~1 ms at 32000 (exponential_ draws each q alone). With no other
   processor, a sampled step is one call (moec_sample, torch's softmax here too): a ctypes call alone costs ~20-30
   us with the caches cold after a step, and four of them ran before. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

/* Rounded to bf16, to nearest even, as torch's cast; not for NaN (the callers keep those as they are) */
static inline float round_bf16(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    b = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&v, &b, 4);
    return v;
}

static inline f32x16 round_bf16x16(f32x16 v) {
    u32x16 b = (u32x16)v;
    return (f32x16)((b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u);
}

/* The first maximum of x[0..V) (rounded to bf16 first when bf16), or the first NaN where there is one: numpy's
   and torch's argmax. Rounding keeps every NaN a NaN and makes none (the largest float rounds to inf). */
static int64_t first_max(const float *x, int64_t V, int bf16) {
    int64_t i = 0, at = 0;
    float best = -INFINITY;
    int nan = 0;
    if (V >= 16) {  /* 16 lanes, each the first maximum of its indices; then the lanes' largest, lowest index */
        f32x16 b;
        memcpy(&b, x, 64);
        i32x16 idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, ats = idx, nans = b != b;
        if (bf16) b = round_bf16x16(b);
        for (i = 16; i + 16 <= V; i += 16) {
            f32x16 v;
            memcpy(&v, x + i, 64);
            nans |= v != v;
            if (bf16) v = round_bf16x16(v);
            idx += 16;
            i32x16 gt = v > b;
            b = (f32x16)(((i32x16)v & gt) | ((i32x16)b & ~gt));
            ats = (idx & gt) | (ats & ~gt);
        }
        best = b[0], at = ats[0];
        for (int l = 0; l < 16; l++) {
            nan |= nans[l];
            if (b[l] > best || (b[l] == best && ats[l] < at)) best = b[l], at = ats[l];
        }
    } else if (V > 0) {
        nan = isnan(x[0]);
        best = bf16 ? round_bf16(x[0]) : x[0], i = 1;
    }
    for (; i < V && !nan; i++) {  /* the tail: higher indices than every lane's */
        nan = isnan(x[i]);
        float v = bf16 ? round_bf16(x[i]) : x[i];
        if (v > best) best = v, at = i;
    }
    if (nan)
        for (at = 0; !isnan(x[at]); at++) {}
    return at;
}

/* The loop's arrays and sizes (ort_generate._Steps fills it once; every field 8 bytes, as its ctypes mirror) */
typedef struct {
    float *scores;           /* [B, V], row stride ld */
    int64_t B, V, ld, bf16;  /* bf16: the scores rounded to bf16 first, as a bf16 model's forward gives them */
    const int64_t *held;     /* held[0..nheld) at -inf while step < hold_steps (min_new_tokens holding eos back) */
    int64_t nheld, hold_steps;
    const int64_t *stop;     /* a row ends when its token is one of stop[0..nstop) */
    int64_t nstop;
    uint8_t *ended;          /* [B] */
    int64_t pad;             /* the token of a row that has ended */
    int64_t *out, ldo;       /* the call's tokens: step's in out[b * ldo + step] */
    void *next;              /* [B] the next step's input_ids: int32 when ids32, else int64 */
    int64_t ids32;
    int64_t *pos, *count;    /* [B] the next step's position_ids, and each row's tokens so far */
    const int64_t *given;    /* [B] sampling's drawn tokens */
    int64_t step;            /* advanced by each moec_next_tokens */
    int64_t top_k;           /* sampling: the k of HF's top-k warper when it is the first processor, else 0 */
    int64_t *const *rows;    /* NULL, or the addresses of nrows arrays [B], for steps rows_from.. rows_from + nrows - 1:
                                each step's tokens again (the tensors a streamer is given) */
    int64_t rows_from, nrows;
} moec_steps;

int64_t moec_top_k(float *scores, int64_t B, int64_t V, int64_t ld, int64_t k);

/* Sampling's scores before HF's processors, in place: rounded to bf16 when bf16 (NaN left as it is), the held ids
   at -inf, then the first processor when it is a top-k warper (moec_top_k, for 0 < top_k < V). Returns -1 when
   out of memory. */
int64_t moec_prepare(const moec_steps *s) {
    for (int64_t b = 0; b < s->B; b++) {
        float *row = s->scores + b * s->ld;
        int64_t i = 0;
        for (; s->bf16 && i + 16 <= s->V; i += 16) {
            f32x16 v;
            memcpy(&v, row + i, 64);
            i32x16 nan = v != v;
            v = (f32x16)(((i32x16)v & nan) | ((i32x16)round_bf16x16(v) & ~nan));
            memcpy(row + i, &v, 64);
        }
        for (; s->bf16 && i < s->V; i++)
            if (!isnan(row[i])) row[i] = round_bf16(row[i]);
        for (int64_t h = 0; h < s->nheld && s->step < s->hold_steps; h++)
            row[s->held[h]] = -INFINITY;
    }
    return s->top_k > 0 && s->top_k < s->V ? moec_top_k(s->scores, s->B, s->V, s->ld, s->top_k) : 0;
}

/* The step's token of each row b: given[b] when sampled, else greedy search's, the first maximum of the scores
   (rounded, with the held ids at -inf). A row that has ended takes pad instead, and ends when its token is a stop
   id. The token goes to out, next and rows; pos[b] = count[b], then count[b] += 1; step += 1. Returns how many
   rows have not ended. */
int64_t moec_next_tokens(moec_steps *s, int64_t sampled) {
    int64_t going = 0;
    for (int64_t b = 0; b < s->B; b++) {
        float *row = s->scores + b * s->ld;
        for (int64_t h = 0; h < s->nheld && s->step < s->hold_steps && !sampled; h++)
            row[s->held[h]] = -INFINITY;
        int64_t token = s->ended[b] ? s->pad : sampled ? s->given[b] : first_max(row, s->V, (int)s->bf16);
        for (int64_t i = 0; i < s->nstop; i++)
            s->ended[b] |= token == s->stop[i];
        going += !s->ended[b];
        s->out[b * s->ldo + s->step] = token;
        if (s->rows && s->step >= s->rows_from && s->step - s->rows_from < s->nrows)
            s->rows[s->step - s->rows_from][b] = token;
        if (s->ids32)
            ((int32_t *)s->next)[b] = (int32_t)token;
        else
            ((int64_t *)s->next)[b] = token;
        s->pos[b] = s->count[b]++;
    }
    s->step++;
    return going;
}

/* whether a lane of m is not 0: halves folded with OR down to 64 bits */
static inline int any_lane(i32x16 m) {
    i32x8 lo8, hi8;
    memcpy(&lo8, &m, 32), memcpy(&hi8, (char *)&m + 32, 32);
    lo8 |= hi8;
    i32x4 lo4, hi4;
    memcpy(&lo4, &lo8, 16), memcpy(&hi4, (char *)&lo8 + 16, 16);
    lo4 |= hi4;
    uint64_t half[2];
    memcpy(half, &lo4, 16);
    return (half[0] | half[1]) != 0;
}

/* A float's place in torch.topk's order as an unsigned key: NaN above every number, -0 just below +0 (equal as
   floats, and the filter compares floats); 16 at a time */
static inline u32x16 order_keys(f32x16 v) {
    u32x16 b = (u32x16)v, sign = (u32x16)((i32x16)b >> 31);
    return (b ^ (sign | 0x80000000u)) | (u32x16)(v != v);
}

static inline uint32_t order_key(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return isnan(v) ? 0xFFFFFFFFu : b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);
}

static void sift_down(uint32_t *heap, int64_t n, int64_t i) {
    for (int64_t c; (c = 2 * i + 1) < n; i = c) {
        if (c + 1 < n && heap[c + 1] < heap[c]) c++;
        if (heap[i] <= heap[c]) return;
        uint32_t t = heap[i];
        heap[i] = heap[c], heap[c] = t;
    }
}

/* HF's top-k warper in place on scores [B, V] (row stride ld), 1 <= k < V: the scores below each row's k-th
   largest (NaN counted above every number, as torch.topk orders them) set to -inf, as its masked_fill. The k-th
   largest is the root of a min-heap of the k largest keys (k >= V: nothing to do). Returns -1 for k < 1 or when
   out of memory (scores untouched). */
int64_t moec_top_k(float *scores, int64_t B, int64_t V, int64_t ld, int64_t k) {
    if (k >= V) return 0;
    uint32_t *heap = k < 1 ? NULL : malloc(k * sizeof(uint32_t));
    if (heap == NULL) return -1;
    for (int64_t b = 0; b < B; b++) {
        float *row = scores + b * ld;
        for (int64_t i = 0; i < k; i++) heap[i] = order_key(row[i]);
        for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(heap, k, i);
        for (int64_t i = k; i < V;) {
            if (i + 16 <= V) {  /* 16 at a time where none goes into the heap */
                f32x16 v;
                memcpy(&v, row + i, 64);
                if (!any_lane((i32x16)(order_keys(v) > heap[0]))) {
                    i += 16;
                    continue;
                }
            }
            for (int64_t end = i + 16 < V ? i + 16 : V; i < end; i++) {
                uint32_t key = order_key(row[i]);
                if (key > heap[0]) heap[0] = key, sift_down(heap, k, 0);
            }
        }
        uint32_t bits = heap[0] == 0xFFFFFFFFu ? 0x7FC00000u : (heap[0] >> 31) ? heap[0] & 0x7FFFFFFFu : ~heap[0];
        float kth;
        memcpy(&kth, &bits, 4);
        for (int64_t i = 0; i < V; i++)  /* NaN compares false: nothing goes under a NaN k-th, no NaN goes */
            if (row[i] < kth) row[i] = -INFINITY;
    }
    free(heap);
    return 0;
}

/* torch's CPU generator as torch.get_rng_state() lays it out: at::mt19937's words widened to 64 bits */
enum { MT_N = 624, MT_M = 397 };
typedef struct {
    uint64_t seed;
    int32_t left, seeded;
    uint64_t next;
    uint64_t state[MT_N];
} torch_rng;

static inline uint32_t mt_mix(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7FFFFFFFu)) >> 1) ^ (v & 1u ? 0x9908B0DFu : 0u);
}

static void mt_twist(uint32_t *mt) {
    int j = 0;
    for (; j < MT_N - MT_M; j++) mt[j] = mt[j + MT_M] ^ mt_mix(mt[j], mt[j + 1]);
    for (; j < MT_N - 1; j++) mt[j] = mt[j + MT_M - MT_N] ^ mt_mix(mt[j], mt[j + 1]);
    mt[MT_N - 1] = mt[MT_M - 1] ^ mt_mix(mt[MT_N - 1], mt[0]);
}

static inline uint32_t mt_temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9D2C5680u;
    y ^= (y << 15) & 0xEFC60000u;
    return y ^ (y >> 18);
}

/* One element of torch.multinomial's one-sample path: ratio = p / q for the draws raw0, raw1 (see moec_draw),
   then the row's first maximum (NaN first) kept in best, at */
static inline void consider(float p, uint32_t raw0, uint32_t raw1, int64_t i, float *best, int64_t *at,
                            float *q_out) {
    float ratio = 0.0f;
    /* u = 0 only where both draws' 53 bits are 0 (tempering maps 0 to 0): q = 0, and 0 / 0 is NaN */
    if (p > 0.0f || q_out != NULL || (raw1 == 0 && (mt_temper(raw0) & 0x1FFFFFu) == 0)) {
        uint64_t bits = ((uint64_t)mt_temper(raw0) << 32 | mt_temper(raw1)) & ((1ull << 53) - 1);
        float q = (float)(-log1p(-((double)bits * 0x1p-53)));
        ratio = p / q;
        if (q_out != NULL) q_out[i] = q;
    }
    if (*at < 0 || (!isnan(*best) && (ratio > *best || isnan(ratio)))) *best = ratio, *at = i;
}

/* torch.multinomial(probs, 1) for probs [B, V] (rows contiguous), from the generator g: the one-sample path,
   argmax(probs / q) over each row (the first maximum, NaN first), q [B, V] drawn in order by exponential_(1) as
   float32, each q = float(-log1p(-u)), u = (two 32-bit draws as 64 bits, low 53) / 2^53. Where the probability
   is 0 and q > 0 the ratio is 0, which is a row's first maximum only as its first element: there the draws only
   advance the generator (the state's words are tempered only where q is computed). The tokens go to out, every q
   to q_out when not NULL (a check of this against torch). Returns -1, nothing drawn, where torch's multinomial
   would refuse probs (NaN, inf or < 0, a row without a probability > 0), the caller then letting it raise its
   error; and for a state torch's engine never reaches (set_rng_state takes some: words past the state's end to
   read before the next twist). */
int64_t moec_draw(const float *probs, int64_t B, int64_t V, torch_rng *g, int64_t *out, float *q_out) {
    if (g->left < 1 || g->left > MT_N || g->next > MT_N || (g->left > 1 && g->next + g->left - 1 > MT_N)) return -1;
    for (int64_t b = 0; b < B; b++) {
        const float *row = probs + b * V;
        i32x16 positives = {0}, refusals = {0};
        int64_t i = 0;
        for (; i + 16 <= V; i += 16) {
            f32x16 p;
            memcpy(&p, row + i, 64);
            refusals |= ~((p >= 0.0f) & (p < INFINITY));
            positives |= p > 0.0f;
        }
        int positive = any_lane(positives), refused = any_lane(refusals);
        for (; i < V; i++) {
            refused |= !(row[i] >= 0.0f && row[i] < INFINITY);
            positive |= row[i] > 0.0f;
        }
        if (refused || !positive) return -1;
    }
    uint32_t mt[MT_N];
    for (int j = 0; j < MT_N; j++) mt[j] = (uint32_t)g->state[j];
    int64_t left = g->left, next = (int64_t)g->next;  /* a draw: if (--left == 0) twist, left = N, next = 0 */
    for (int64_t b = 0; b < B; b++) {
        const float *row = probs + b * V;
        float *q_row = q_out == NULL ? NULL : q_out + b * V;
        float best = 0.0f;
        int64_t at = -1;
        for (int64_t i = 0; i < V;) {
            if (left == 1) mt_twist(mt), left = MT_N + 1, next = 0;
            int64_t n = (left - 1) / 2 < V - i ? (left - 1) / 2 : V - i;  /* elements whose draws are all here */
            if (n == 0) {  /* one draw here, the other after a twist */
                uint32_t raw0 = mt[next];
                mt_twist(mt), left = MT_N, next = 1;
                consider(row[i], raw0, mt[0], i, &best, &at, q_row);
                i++;
                continue;
            }
            const uint32_t *w = mt + next;
            for (int64_t j = 0; j < n;) {
                if (j + 16 <= n && at >= 0 && q_row == NULL) {  /* 16 at a time where none needs its ratio */
                    f32x16 p;
                    u32x16 even_odd[2];  /* the 16 elements' draws: raw0, raw1 in turn */
                    memcpy(&p, row + i + j, 64);
                    memcpy(even_odd, w + 2 * j, 128);
                    const i32x16 odd = {0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1};
                    if (!any_lane((p > 0.0f) | (((even_odd[0] == 0) | (even_odd[1] == 0)) & odd))) {
                        j += 16;
                        continue;
                    }
                }
                for (int64_t end = j + 16 < n ? j + 16 : n; j < end; j++)
                    if (row[i + j] > 0.0f || w[2 * j + 1] == 0 || at < 0 || q_row != NULL)
                        consider(row[i + j], w[2 * j], w[2 * j + 1], i + j, &best, &at, q_row);
            }
            i += n, next += 2 * n, left -= 2 * n;
        }
        out[b] = at;
    }
    for (int j = 0; j < MT_N; j++) g->state[j] = mt[j];
    g->left = left;
    g->next = next;
    return 0;
}

/* torch.softmax(x, -1) of float32 rows [B, V] (rows ld apart) into p [B, V], the numbers torch computes where its
   kernels run 16-lane (AVX-512) vectors (_vec_softmax_lastdim): m the row's max, each e = exp(x - m) by `exp16`
   (torch's own Sleef_expf16_u10, its Vectorized<float>::exp), their sum in torch's order (reduce_all), then each
   e times 1 / sum. reduce_all: lanes l of the first 16 elements, each further 16 added lane-wise, a partial tail
   onto its lanes; then lane l with l ^ 8, ^ 4, ^ 2, ^ 1 (vec_reduce_all); under 16 elements, in order. Returns -1,
   p unwritten, for a row holding NaN or +inf or no number above -inf (torch's multinomial then raises on its
   NaN); -2 where not built for AVX-512. ort_generate checks these numbers against torch.softmax once. */
#ifdef __AVX512F__
typedef f32x16 (*exp16_fn)(f32x16);

static inline f32x16 lanes_max(f32x16 a, f32x16 b) {  /* _mm512_max_ps: a > b ? a : b (no NaN here) */
    i32x16 gt = a > b;
    return (f32x16)(((i32x16)a & gt) | ((i32x16)b & ~gt));
}

static float lanes_fold(f32x16 v, int max) {  /* vec_reduce_all: lane l with l ^ 8, then ^ 4, ^ 2, ^ 1 */
    for (int d = 8; d >= 1; d /= 2) {
        f32x16 w;
        for (int l = 0; l < 16; l++) w[l] = v[l ^ d];
        v = max ? lanes_max(v, w) : v + w;
    }
    return v[0];
}

static float reduce_row(const float *x, int64_t V, int max) {  /* reduce_all(maximum or +) over x [V], V >= 16 */
    f32x16 acc, v;
    memcpy(&acc, x, 64);
    int64_t d = 16;
    for (; d + 16 <= V; d += 16) {
        memcpy(&v, x + d, 64);
        acc = max ? lanes_max(acc, v) : acc + v;
    }
    for (int64_t l = 0; d + l < V; l++) acc[l] = max ? (acc[l] > x[d + l] ? acc[l] : x[d + l]) : acc[l] + x[d + l];
    return lanes_fold(acc, max);
}

int64_t moec_softmax(const float *x, int64_t B, int64_t V, int64_t ld, float *p, exp16_fn exp16) {
    for (int64_t b = 0; b < B; b++) {
        const float *row = x + b * ld;
        i32x16 bad = {0};
        int64_t i = 0;
        for (; i + 16 <= V; i += 16) {
            f32x16 v;
            memcpy(&v, row + i, 64);
            bad |= (v != v) | (v == INFINITY);
        }
        for (; i < V; i++)
            if (isnan(row[i]) || row[i] == INFINITY) return -1;
        if (any_lane(bad)) return -1;
    }
    for (int64_t b = 0; b < B; b++) {
        const float *row = x + b * ld;
        float *out = p + b * V, m = row[0], sum = 0.0f;
        if (V >= 16) m = reduce_row(row, V, 1);
        else for (int64_t i = 1; i < V; i++) m = m > row[i] ? m : row[i];
        if (m == -INFINITY) return -1;
        int64_t i = 0;
        for (; i + 16 <= V; i += 16) {  /* exp(x - m), 16 at a time */
            f32x16 v;
            memcpy(&v, row + i, 64);
            v = exp16(v - m);
            memcpy(out + i, &v, 64);
        }
        if (i < V) {  /* a partial tail: its lanes */
            f32x16 v = {0};
            memcpy(&v, row + i, (V - i) * 4);
            v = exp16(v - m);
            memcpy(out + i, &v, (V - i) * 4);
        }
        if (V >= 16) sum = reduce_row(out, V, 0);
        else for (int64_t i = 0; i < V; i++) sum = i ? sum + out[i] : out[0];
        float inv = 1.0f / sum;
        for (int64_t i = 0; i < V; i++) out[i] *= inv;
    }
    return 0;
}
#else
typedef void *exp16_fn;
int64_t moec_softmax(const float *x, int64_t B, int64_t V, int64_t ld, float *p, exp16_fn exp16) { return -2; }
#endif

/* A sampled step with no processor but top-k (HF's default sampling): moec_prepare, moec_softmax into p [B, V],
   moec_draw from g into `given`, moec_next_tokens. Returns what moec_next_tokens returns; -1 out of memory
   (prepare's top-k); -2 where the softmax or the draw refused (nothing drawn, the scores prepared): the caller then
   runs torch's softmax and multinomial on them, which raise their errors, then moec_next_tokens. */
int64_t moec_sample(moec_steps *s, torch_rng *g, float *p, exp16_fn exp16) {
    if (moec_prepare(s)) return -1;
    if (moec_softmax(s->scores, s->B, s->V, s->ld, p, exp16) || moec_draw(p, s->B, s->V, g, (int64_t *)s->given, NULL))
        return -2;
    return moec_next_tokens(s, 1);
}
