/* moec's int4 kernels and int8 row packing (backends/cpu_native.py: built alone into the library its numba
   kernels call, and first into backends/ort_kernels.py's custom-op library) */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if !defined(__AVX2__) || !defined(__FMA__)
#error "moec's int4 kernel needs AVX2 and FMA"
#endif
#define INLINE static inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 16")  /* loops over accumulators: registers, not memory */

INLINE __m256i nibbles(const uint8_t *p) {  /* 16 bytes -> 32 nibbles: the low ones, then the high ones */
    __m256i w = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    w = _mm256_blend_epi32(w, _mm256_srli_epi16(w, 4), 0xF0);
    return _mm256_and_si256(w, _mm256_set1_epi8(15));
}

INLINE __m256i dot(__m256i acc, __m256i w, __m256i x) {  /* acc += u8 w . s8 x, 4 products a lane */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, w, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

INLINE __m256i group_dot(const uint8_t *w, const int8_t *x, int blocks, int unpacked) {
    /* one group, blocks of 32 inputs; w: packed bytes (16 a block), or nibbles already unpacked (32 a block) */
    __m256i a = _mm256_setzero_si256();
    for (int b = 0; b < blocks; b++)
        a = dot(a, unpacked ? _mm256_loadu_si256((const __m256i *)(w + 32 * b)) : nibbles(w + 16 * b),
                _mm256_loadu_si256((const __m256i *)(x + 32 * b)));
    return a;
}

INLINE float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

INLINE __m256i sum8(__m256i a0, __m256i a1, __m256i a2, __m256i a3, __m256i a4, __m256i a5, __m256i a6, __m256i a7) {
    /* 8 vectors of 8 int32 -> their 8 sums, in order */
    __m256i c0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    __m256i c1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a4, a5), _mm256_hadd_epi32(a6, a7));
    return _mm256_add_epi32(_mm256_permute2x128_si256(c0, c1, 0x20), _mm256_permute2x128_si256(c0, c1, 0x31));
}

/* One output of one row: w the channel's weights (packed, or unpacked: see group_dot), xr the row (int8, the
   kernel's order), sxr/xir its group steps and sums, sj/zj the channel's group scales and zero points (NULL: 8). */
INLINE float row_dot(const uint8_t *w, int unpacked, const int8_t *xr, const float *sxr, const int32_t *xir,
                     const float *sj, const uint8_t *zj, int64_t G, int blocks) {
    int64_t G8 = G / 8 * 8, gw = (unpacked ? 32 : 16) * blocks, gx = 32 * blocks;  /* bytes of a group in w, x */
    __m256 f = _mm256_setzero_ps();
    for (int64_t g = 0; g < G8; g += 8) {
        const uint8_t *wg = w + g * gw;
        const int8_t *xg = xr + g * gx;
        __m256i d = sum8(group_dot(wg, xg, blocks, unpacked), group_dot(wg + gw, xg + gx, blocks, unpacked),
                         group_dot(wg + 2 * gw, xg + 2 * gx, blocks, unpacked),
                         group_dot(wg + 3 * gw, xg + 3 * gx, blocks, unpacked),
                         group_dot(wg + 4 * gw, xg + 4 * gx, blocks, unpacked),
                         group_dot(wg + 5 * gw, xg + 5 * gx, blocks, unpacked),
                         group_dot(wg + 6 * gw, xg + 6 * gx, blocks, unpacked),
                         group_dot(wg + 7 * gw, xg + 7 * gx, blocks, unpacked));
        __m256i sums = _mm256_loadu_si256((const __m256i *)(xir + g));
        __m256i zs = zj ? _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zj + g))), sums)
                        : _mm256_slli_epi32(sums, 3);
        __m256 scales = _mm256_mul_ps(_mm256_loadu_ps(sj + g), _mm256_loadu_ps(sxr + g));
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d, zs)), scales, f);
    }
    float tail = 0;  /* groups past the last 8 */
    for (int64_t g = G8; g < G; g++) {
        __m256i a = group_dot(w + g * gw, xr + g * gx, blocks, unpacked);
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
        int32_t d = _mm_cvtsi128_si32(h) - (zj ? (int32_t)zj[g] : 8) * xir[g];
        tail = fmaf(sj[g] * sxr[g], (float)d, tail);  /* fused as written: a row alone = its row of a batch */
    }
    return hsum(f) + tail;
}

INLINE void rows_int4_a8(const int8_t *x8, const float *sx, const int32_t *xi, int64_t R, int64_t K,
                         const uint8_t *q, const float *s, const uint8_t *z, int64_t G, float *out, int64_t N,
                         int64_t j0, int64_t j1, int blocks) {
    uint8_t w[R > 1 ? K : 1];  /* several rows: each channel's nibbles unpacked once, then read by every row */
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *qj = q + j * (K / 2), *zj = z ? z + j * G : 0;
        if (R > 1)
            for (int64_t b = 0; b < K / 32; b++) _mm256_storeu_si256((__m256i *)(w + 32 * b), nibbles(qj + 16 * b));
        for (int64_t r = 0; r < R; r++)
            out[r * N + j] = R > 1 ? row_dot(w, 1, x8 + r * K, sx + r * G, xi + r * G, s + j * G, zj, G, blocks)
                                   : row_dot(qj, 0, x8, sx, xi, s + j * G, zj, G, blocks);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* Int8 rows on 4 channels at a time: a vector holds a 16-byte block of each channel (one per 128-bit lane), so one
   vpdpbusd makes 4 partial sums for each of the 4 channels, and the rows' 16 even (odd) inputs are one 128-bit
   broadcast: no horizontal sums in the inner loop. Groups go 4 at a time: their 4 x 4 partial sums fold into one
   vector of 4 channels x 4 exact group sums (sum4), which meets the zero points and the scales as row_dot's do. */
INLINE __m512i dot512(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
#endif
}

INLINE __m512i lanes4(const void *p, int64_t stride, __mmask16 m) {  /* 16 bytes (m: dwords) at p + c * stride */
    __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi32(m, p));
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi32(m, (const char *)p + stride), 1);
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi32(m, (const char *)p + 2 * stride), 2);
    return _mm512_inserti32x4(v, _mm_maskz_loadu_epi32(m, (const char *)p + 3 * stride), 3);
}

INLINE __m512i sum4(__m512i a, __m512i b, __m512i c, __m512i d) {
    /* 4 vectors of 4 lanes x 4 int32 -> per lane the 4 sums of a, b, c, d in order */
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}

/* Groups g..g+n-1 (n <= 4) of rows r < nr of x8 [., K] (sx, xi [., G]) times channels c < 4 (q [., K/2], s and z
   [., G] at channel 0; tiles: q and s in the tile layout, moec_int4_tiles), added to f[r] (lane c: channel c's). */
INLINE void step_a8(__m512 *f, const int8_t *x8, const float *sx, const int32_t *xi, int64_t K, const uint8_t *q,
                    const void *s, const uint8_t *z, int64_t G, int64_t g, int n, int nr, int blocks, int tiles,
                    int half) {
    const __m512i low4 = _mm512_set1_epi8(15);
    __mmask16 m = (__mmask16)((1 << n) - 1);  /* the groups of this step, in a 128-bit lane's dwords */
    __m512i d[4][4];
    UNROLL for (int r = 0; r < nr; r++)
        UNROLL for (int i = 0; i < 4; i++) d[r][i] = _mm512_setzero_si512();
    UNROLL for (int i = 0; i < n; i++)
        UNROLL for (int b = 0; b < blocks; b++) {
            int64_t at = ((g + i) * blocks + b) * 32;  /* the block's first input */
            __m512i w = tiles ? _mm512_loadu_si512(q + at * 2) : lanes4(q + at / 2, K / 2, 0xF);
            __m512i lo = _mm512_and_si512(w, low4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
            UNROLL for (int r = 0; r < nr; r++) {
                const int8_t *xb = x8 + r * K + at;
                d[r][i] = dot512(d[r][i], lo, _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xb)));
                d[r][i] = dot512(d[r][i], hi, _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb + 16))));
            }
        }
    __m512 sc;  /* lane c: s[c, g..g+3] */
    if (half) {  /* fp16 scales in the tile layout, widened (exactly); the last n < 4 groups: channel c's at h + c n */
        const uint16_t *h = (const uint16_t *)s + 4 * g;
        __m256i v;
        if (n == 4) {
            v = _mm256_loadu_si256((const __m256i *)h);
        } else {  /* masked loads (a copy through memory would stall the load that reads it back) */
            __mmask8 mh = (__mmask8)((1 << n) - 1);
            __m128i c01 = _mm_unpacklo_epi64(_mm_maskz_loadu_epi16(mh, h), _mm_maskz_loadu_epi16(mh, h + n));
            __m128i c23 = _mm_unpacklo_epi64(_mm_maskz_loadu_epi16(mh, h + 2 * n), _mm_maskz_loadu_epi16(mh, h + 3 * n));
            v = _mm256_inserti128_si256(_mm256_castsi128_si256(c01), c23, 1);
        }
        sc = _mm512_cvtph_ps(v);
    } else {
        const float *sf = s;
        sc = tiles ? n == 4 ? _mm512_loadu_ps(sf + 4 * g) : _mm512_castsi512_ps(lanes4(sf + 4 * g, 4 * n, m))
                   : _mm512_castsi512_ps(lanes4(sf + g, G * 4, m));
    }
    __m512i zc = _mm512_setzero_si512();
    if (z) {  /* lane c: z[c, g..g+3] */
        uint8_t zb[16] = {0};
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < n; i++) zb[4 * c + i] = z[c * G + g + i];
        zc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)zb));
    }
    UNROLL for (int r = 0; r < nr; r++) {
        __m512i sums = _mm512_broadcast_i32x4(_mm_maskz_loadu_epi32(m, xi + r * G + g));
        __m512i zs = z ? _mm512_mullo_epi32(zc, sums) : _mm512_slli_epi32(sums, 3);
        __m512 scales = _mm512_mul_ps(sc, _mm512_broadcast_f32x4(_mm_maskz_loadu_ps(m, sx + r * G + g)));
        __m512i dr = _mm512_sub_epi32(sum4(d[r][0], d[r][1], d[r][2], d[r][3]), zs);
        f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dr), scales, f[r]);
    }
}

/* Tiles of 4 channels whose weights are prefetched: a tile reads 4 rows of weights 16 bytes at a time, which the
   hardware prefetcher follows late (512 x 1792 at one row, one thread: 79 us without, 46-51 us 1-2 tiles ahead) */
#define AHEAD 2
INLINE void tile_a8(const int8_t *x8, const float *sx, const int32_t *xi, int64_t K, const uint8_t *q, const void *s,
                    const uint8_t *z, int64_t G, float *o, int64_t N, int nr, int blocks, int tiles, int half) {
    __m512 f[4];
    for (int r = 0; r < nr; r++) f[r] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {
        const char *ahead = (const char *)q + AHEAD * 2 * K + g * 64 * blocks;  /* a tile: 2K bytes */
        UNROLL for (int l = 0; l < 4 * blocks; l++) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
        step_a8(f, x8, sx, xi, K, q, s, z, G, g, 4, nr, blocks, tiles, half);
    }
    if (g < G) step_a8(f, x8, sx, xi, K, q, s, z, G, g, (int)(G - g), nr, blocks, tiles, half);
    for (int r = 0; r < nr; r++) {
        float t[16];
        _mm512_storeu_ps(t, f[r]);
        for (int c = 0; c < 4; c++) o[r * N + c] = (t[4 * c] + t[4 * c + 1]) + (t[4 * c + 2] + t[4 * c + 3]);
    }
}

INLINE void rows_int4_a8_tiles(const int8_t *x8, const float *sx, const int32_t *xi, int64_t R, int64_t K,
                               const uint8_t *q, const void *s, const uint8_t *z, int64_t G, float *out, int64_t N,
                               int64_t j0, int64_t j1, int blocks, int tiles, int half) {
    /* j1 - j0 >= 4: the last 4 channels' tile overlaps the one before (the same numbers written twice; tiles:
       j0 and j1 are multiples of 4) */
    for (int64_t j = j0; j < j1; j += 4) {
        int64_t c = j + 4 <= j1 ? j : j1 - 4;
        for (int64_t r = 0; r < R; r += 4) {
#define TILE(NR) tile_a8(x8 + r * K, sx + r * G, xi + r * G, K, q + c * (K / 2), (const char *)s + c * G * (half ? 2 : 4), \
                         z ? z + c * G : 0, G, out + r * N + c, N, NR, blocks, tiles, half)
            switch (R - r < 4 ? R - r : 4) {  /* constant row counts: the accumulators stay in registers */
            case 1: TILE(1); break;
            case 2: TILE(2); break;
            case 3: TILE(3); break;
            default: TILE(4);
            }
#undef TILE
        }
    }
}
#endif

#ifdef __AVX512F__
/* Weight-only int4 (fp32 rows): rows x [nr, K] (each 32 inputs as (evens | odds), as x8) times channels q [nc, K/2]
   -> o[r * N + c]. Each group's 16 possible weights s * (i - z) sit in one vector, looked up by nibble (vpermps
   reads an index's low 4 bits), so every product is x times the dequantized weight itself: no zero point taken
   off afterwards, nothing cancels. nr x nc x 2 accumulators: a chain per vector keeps the FMAs' latency hidden. */
INLINE void tile_f32(const float *x, int64_t K, const uint8_t *q, const float *s, const uint8_t *z, int64_t G,
                     float *o, int64_t N, int nr, int nc, int blocks) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 centered = _mm512_sub_ps(iota, _mm512_set1_ps(8));  /* symmetric groups: z = 8 */
    __m512 acc[4][4][2];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) acc[r][c][0] = acc[r][c][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 t[4];
        for (int c = 0; c < nc; c++)
            t[c] = _mm512_mul_ps(z ? _mm512_sub_ps(iota, _mm512_set1_ps(z[c * G + g])) : centered, _mm512_set1_ps(s[c * G + g]));
        for (int64_t b = g * blocks; b < (g + 1) * blocks; b++)
            for (int c = 0; c < nc; c++) {
                __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + c * (K / 2) + 16 * b)));
                __m512 lo = _mm512_permutexvar_ps(i, t[c]), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(i, 4), t[c]);
                for (int r = 0; r < nr; r++) {
                    acc[r][c][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + r * K + 32 * b), acc[r][c][0]);
                    acc[r][c][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + r * K + 32 * b + 16), acc[r][c][1]);
                }
            }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) o[r * N + c] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][c][0], acc[r][c][1]));
}
#else
/* AVX2: as the AVX-512 build's, each weight s * (q - z) computed as it is read (the table's value: q - z is exact),
   a channel's products summed in 8 lanes for the even inputs and 8 for the odd ones */
INLINE void tile_f32(const float *x, int64_t K, const uint8_t *q, const float *s, const uint8_t *z, int64_t G,
                     float *o, int64_t N, int nr, int nc, int blocks) {
    __m256 acc[4][4][2];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 sc[4], zc[4];
        for (int c = 0; c < nc; c++)
            sc[c] = _mm256_set1_ps(s[c * G + g]), zc[c] = _mm256_set1_ps(z ? (float)z[c * G + g] : 8.f);
        for (int64_t b = g * blocks; b < (g + 1) * blocks; b++)
            for (int c = 0; c < nc; c++)
                for (int h = 0; h < 2; h++) {  /* bytes 8h..8h+7: inputs 16h + 2i (low nibbles) and 16h + 2i + 1 */
                    __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + c * (K / 2) + 16 * b + 8 * h)));
                    __m256 lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(i, _mm256_set1_epi32(15))), zc[c]), sc[c]);
                    __m256 hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(i, 4)), zc[c]), sc[c]);
                    for (int r = 0; r < nr; r++) {
                        acc[r][c][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + r * K + 32 * b + 8 * h), acc[r][c][0]);
                        acc[r][c][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + r * K + 32 * b + 16 + 8 * h), acc[r][c][1]);
                    }
                }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) o[r * N + c] = hsum(_mm256_add_ps(acc[r][c][0], acc[r][c][1]));
}
#endif

INLINE void rows_int4_f32(const float *x, int64_t R, int64_t K, const uint8_t *q, const float *s, const uint8_t *z,
                          int64_t G, float *out, int64_t N, int64_t j0, int64_t j1, int blocks) {
#define TILE(NR, NC) tile_f32(x + r * K, K, q + j * (K / 2), s + j * G, z ? z + j * G : 0, G, out + r * N + j, N, NR, NC, blocks)
    for (int64_t r = 0; r < R; r += 4) {
        int64_t j = j0;
        switch (R - r < 4 ? R - r : 4) {
        case 1: for (; j + 4 <= j1; j += 4) TILE(1, 4); for (; j < j1; j++) TILE(1, 1); break;
        case 2: for (; j + 2 <= j1; j += 2) TILE(2, 2); for (; j < j1; j++) TILE(2, 1); break;
        case 3: for (; j < j1; j++) TILE(3, 1); break;
        default: for (; j < j1; j++) TILE(4, 1);
        }
    }
#undef TILE
}

/* Rows r0..r1 of x [R, K] fp32 -> x8 int8 (each group of g inputs, g a multiple of 32, rounded at a step of its
   amax/127: IEEE division, nearest with ties to even, clamped to +-127; each 32 stored as (the evens | the odds)),
   sx [R, K/g] the steps (0 below FLT_MIN; NaN for a group holding NaN or inf, which gets zeros), xi [R, K/g] each
   group's sum: cpu_quant.group_step's and round_int8's numbers (moec.quant.int8_quantized_rows). The amax is the
   largest |x| bit pattern (the floats' order, NaN above inf). */
void moec_pack_a8(const float *x, int64_t K, int64_t g, int8_t *x8, float *sx, int32_t *xi, int64_t r0,
                  int64_t r1) {
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
    int64_t G = K / g;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t gi = 0; gi < G; gi++) {
            const float *v = x + r * K + gi * g;
            int8_t *o = x8 + r * K + gi * g;
            __m256i m = _mm256_setzero_si256();
            for (int64_t k = 0; k < g; k += 8)
                m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(v + k)), abs));
            __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
            m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0x4E));
            uint32_t bits = (uint32_t)_mm_cvtsi128_si32(_mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0xB1)));
            if (bits >= 0x7f800000u) {
                sx[r * G + gi] = NAN, xi[r * G + gi] = 0;
                memset(o, 0, g);
                continue;
            }
            float amax, step, inverse;
            memcpy(&amax, &bits, 4);
            step = amax / 127.f;
            step = step < FLT_MIN ? 0.f : step;
            inverse = step > 0 ? 1.f / step : 0.f;
            __m256 inv = _mm256_set1_ps(inverse);
            __m256i t = _mm256_setzero_si256();
            for (int64_t b = 0; b < g; b += 32) {
                __m256i a[4];  /* inputs b .. b + 31 as int32, 8 a vector */
                for (int u = 0; u < 4; u++) {
                    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + b + 8 * u), inv),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    a[u] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
                    t = _mm256_add_epi32(t, a[u]);
                }
                /* packs work within 128-bit lanes: bytes come as dwords (0-3, 8-11, 16-19, 24-27 | 4-7, ...) */
                __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a[0], a[1]), _mm256_packs_epi32(a[2], a[3]));
                p = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(p, order), evens_odds);  /* each 16: evens, odds */
                _mm256_storeu_si256((__m256i *)(o + b), _mm256_permute4x64_epi64(p, 0xD8));  /* all evens, odds */
            }
            __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
            sx[r * G + gi] = step, xi[r * G + gi] = _mm_cvtsi128_si32(_mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1)));
        }
}

/* Output channels j0..j1 of rows x [R, K]: int8 (sx, xi their groups' steps and sums: int8 activations, groups of
   32, 64 or 128 inputs) or, sx NULL, fp32 (weight-only; the same groups). z NULL: symmetric (8).
   Weight-only rows go 4 at a time (a chunk's weights stay in L2 between them), one row 4 channels at a time. */
void moec_int4(const void *x, const float *sx, const int32_t *xi, int64_t R, int64_t K, const uint8_t *q,
               const float *s, const uint8_t *z, int64_t G, float *out, int64_t N, int64_t j0, int64_t j1) {
    int blocks = K / G / 32;  /* constants below: gcc keeps the accumulators in registers */
    if (sx) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
        if (j1 - j0 >= 4) {
            switch (blocks) {
            case 1: rows_int4_a8_tiles(x, sx, xi, R, K, q, s, z, G, out, N, j0, j1, 1, 0, 0); break;
            case 2: rows_int4_a8_tiles(x, sx, xi, R, K, q, s, z, G, out, N, j0, j1, 2, 0, 0); break;
            case 4: rows_int4_a8_tiles(x, sx, xi, R, K, q, s, z, G, out, N, j0, j1, 4, 0, 0); break;
            }
            return;
        }
#endif
        switch (blocks) {
        case 1: rows_int4_a8(x, sx, xi, R, K, q, s, z, G, out, N, j0, j1, 1); break;
        case 2: rows_int4_a8(x, sx, xi, R, K, q, s, z, G, out, N, j0, j1, 2); break;
        case 4: rows_int4_a8(x, sx, xi, R, K, q, s, z, G, out, N, j0, j1, 4); break;
        }
        return;
    }
    switch (blocks) {
    case 1: rows_int4_f32(x, R, K, q, s, z, G, out, N, j0, j1, 1); break;
    case 2: rows_int4_f32(x, R, K, q, s, z, G, out, N, j0, j1, 2); break;
    case 4: rows_int4_f32(x, R, K, q, s, z, G, out, N, j0, j1, 4); break;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* moec_int4's int8 rows on weights in the tile layout (moec.backends.ort_layouts.tiled): each tile of 4 channels
   (N a multiple of 4, as j0 and j1) holds q as [K/32 blocks][4 channels][16 bytes], so a block of the 4 channels is
   one 64-byte load, and s as [G/4 steps][4 channels][4 groups] then the last G % 4 groups as [4 channels][G % 4],
   so a step's scales are one 64-byte load; z as in moec's format. A tile's weights are one sequential stream.
   half: s in fp16 (`ort_layouts.tile_weights`, where every scale is an fp16 number: moec.quant makes them so),
   widened exactly as read: the same numbers, a symmetric group of 32 weights in 18 bytes instead of 20. */
void moec_int4_tiles(const int8_t *x8, const float *sx, const int32_t *xi, int64_t R, int64_t K, const uint8_t *q,
                     const void *s, int half, const uint8_t *z, int64_t G, float *out, int64_t N, int64_t j0,
                     int64_t j1) {
#define BLOCKS(H) switch (K / G / 32) { \
    case 1: rows_int4_a8_tiles(x8, sx, xi, R, K, q, s, z, G, out, N, j0, j1, 1, 1, H); break; \
    case 2: rows_int4_a8_tiles(x8, sx, xi, R, K, q, s, z, G, out, N, j0, j1, 2, 1, H); break; \
    case 4: rows_int4_a8_tiles(x8, sx, xi, R, K, q, s, z, G, out, N, j0, j1, 4, 1, H); break; }
    if (half) BLOCKS(1) else BLOCKS(0)
#undef BLOCKS
}
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
void moec_vnni512(void) {}  /* a mark: this build has vpdpbusd on 512 bits (ort_kernels' int8 rows on int8 panels) */
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
void moec_bf16(void) {}  /* a mark: this build has vdpbf16ps (ort_kernels' bf16 rows on bf16 panels) */
#endif
