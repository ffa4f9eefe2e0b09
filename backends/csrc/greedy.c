/* The generate loop's work between two session runs (backends/ort_generate.py: built into cpu_native's library
   and called through ctypes). In numpy it is ~10 small operations, each slow with the caches cold after a step:
   41-61 us a token outside the session on mix int4, 156 on mix bf16 (its rounding too); here one or two calls,
   14-25 and 63 us (docs/benchmarks.md). */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

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
} moec_steps;

/* Sampling's scores before HF's processors: rounded to bf16 in place when bf16 (NaN left as it is), then the held
   ids at -inf. */
void moec_round_hold(const moec_steps *s) {
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
}

/* The step's token of each row b: given[b] when sampled, else greedy search's, the first maximum of the scores
   (rounded, with the held ids at -inf). A row that has ended takes pad instead, and ends when its token is a stop
   id. The token goes to out and next; pos[b] = count[b], then count[b] += 1; step += 1. Returns how many rows
   have not ended. */
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
        if (s->ids32)
            ((int32_t *)s->next)[b] = (int32_t)token;
        else
            ((int64_t *)s->next)[b] = token;
        s->pos[b] = s->count[b]++;
    }
    s->step++;
    return going;
}
