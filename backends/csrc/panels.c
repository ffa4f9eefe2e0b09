/* GEMMs on weights laid out in panels of output channels (fp32, bf16, int8, int4; bf16 rows on bf16 pairs; int8
   rows on int8 panels): the kernels of the experts and Linear ops (after ort_api.c) */
enum { WT_F32 = 0, WT_BF16 = 1, WT_I8 = 2, WT_I4 = 3, WT_BF16_ROWS = 4 };  /* BF16_ROWS: bf16 rows on bf16 pairs */

/* fp32 weights in panels: panel p of a matrix [N, K] holds channels 32p..32p+31 as [K][32] (zeros past N), so a
   panel is one sequential stream and a row's 32 outputs take one broadcast of x[r, k] and two FMAs per k. Each
   output sums its products of even k in order, those of odd k in order, then the two (panel_rows), whatever the
   row count: a token's numbers do not depend on its batch. Rows go MR at a time over KC inputs of the panel
   (32 KB, L1-resident while the row blocks reuse it).
   bf16: the same panels in bf16 (half the bytes), each k's 32 channels stored interleaved (c0, c16, c1, c17, ...:
   narrow_bf16) so that a shift and a mask widen them to fp32 (exact; 1.4x as fast as a widening shuffle on
   weights in the L3), so the products and sums are the fp32 kernel's on the same values. int8 (moec's
   Int8Experts: a scale per channel): the integers widened to fp32 (exact), their products with x summed, the sum
   times the channel's scale. int4 (moec's Int4Experts weight-only, tiles=2: `ort_layouts.int4_panels`): each k's 32 channels
   in 16 bytes (channel c in the low nibble of byte c, c + 16 in the high one), the groups' scales (and zero points)
   as [G][32]; summed a group at a time (i4_rows). */
enum { PANEL = 32, KC = 256 };
#define PANEL_BYTES(wt, K) ((K) * ((wt) == WT_F32 ? 128 : (wt) == WT_BF16 || (wt) == WT_BF16_ROWS ? 64 : (wt) == WT_I8 ? 32 : 16))

#ifdef __AVX512F__
enum { MR = 6 };
typedef struct {  /* int4: a panel's scales and zero points [G][32] from this part on, 2^shift k a group; the
                   lookup table (q - 8, or q with zero points); the group's zero points as floats */
    const float *s; const uint8_t *z; int shift; __m512 table, z0, z1;
} Groups;

INLINE Groups i4_groups(const float *s, const uint8_t *z, int shift) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    Groups g = {s, z, shift, z ? iota : _mm512_sub_ps(iota, _mm512_set1_ps(8)), _mm512_setzero_ps(), _mm512_setzero_ps()};
    return g;
}

INLINE void i4_zero_points(Groups *g, int64_t group) {  /* the group's z as floats (exact), for panel_load */
    if (!g->z) return;
    const uint8_t *z = g->z + group * PANEL;
    g->z0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)z)));
    g->z1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(z + 16))));
}
INLINE void panel_load(const void *w, int64_t k, int wt, Groups g, __m512 *w0, __m512 *w1) {
    if (wt == WT_I4) {  /* q - z, exact: the table (i4_groups) looked up by nibble (vpermps reads an index's low 4 bits) */
        __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)w + k * 16)));
        *w0 = _mm512_permutexvar_ps(i, g.table), *w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(i, 4), g.table);
        if (g.z) *w0 = _mm512_sub_ps(*w0, g.z0), *w1 = _mm512_sub_ps(*w1, g.z1);
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

/* panel_load, the weights also kept widened in keep [., 32] when not NULL (a first row block's, for the others) */
INLINE void load_keep(const void *w, int64_t k, int wt, Groups g, __m512 *w0, __m512 *w1, float *keep) {
    panel_load(w, k, wt, g, w0, w1);
    if (keep) _mm512_storeu_ps(keep + k * PANEL, *w0), _mm512_storeu_ps(keep + k * PANEL + 16, *w1);
}

/* inputs k and k + 1 of a panel w (of type wt) for rows x [nr, .] (K apart): onto the sums a and b */
INLINE void two_inputs(const float *x, int64_t K, const void *w, int64_t k, int wt, Groups g, int nr, __m512 a[][2],
                       __m512 b[][2], float *keep) {
    __m512 w0, w1, v0, v1;
    load_keep(w, k, wt, g, &w0, &w1, keep);
    load_keep(w, k + 1, wt, g, &v0, &v1, keep);
    UNROLL for (int r = 0; r < nr; r++) {
        __m512 xv = _mm512_set1_ps(x[r * K + k]), yv = _mm512_set1_ps(x[r * K + k + 1]);
        a[r][0] = _mm512_fmadd_ps(xv, w0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(xv, w1, a[r][1]);
        b[r][0] = _mm512_fmadd_ps(yv, v0, b[r][0]);
        b[r][1] = _mm512_fmadd_ps(yv, v1, b[r][1]);
    }
}

/* rows x [nr, .] (K apart) times nk inputs of a panel w (at those inputs) into o; acc: onto the sums so far.
   Even and odd inputs go to two sets of sums, added at the end: two FMA chains, so that at decode a k step does
   not wait for the last FMA (fp32 experts from the cache 1.2x as fast). Every row count sums the same way. keep: the
   weights also stored widened there (load_keep). */
INLINE void panel_rows(const float *x, int64_t K, const void *w, int64_t nk, int acc, float *o, int64_t N,
                       int nr, __mmask16 m0, __mmask16 m1, int wt, float *keep) {
    const Groups g = {0};  /* not int4 (i4_rows) */
    __m512 a[MR][2], b[MR][2];
    UNROLL for (int r = 0; r < nr; r++) {
        a[r][0] = acc ? _mm512_maskz_loadu_ps(m0, o + r * N) : _mm512_setzero_ps();
        a[r][1] = acc ? _mm512_maskz_loadu_ps(m1, o + r * N + 16) : _mm512_setzero_ps();
        b[r][0] = b[r][1] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 2 <= nk; k += 2) two_inputs(x, K, w, k, wt, g, nr, a, b, keep);
    if (k < nk) {
        __m512 w0, w1;
        load_keep(w, k, wt, g, &w0, &w1, keep);
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

/* int4: rows x [nr, .] (K apart) times nk inputs (whole groups) of a panel onto o (acc: onto the sums so far): w
   the panel's int4 at those inputs, or (widened) their q - z in fp32 [nk][32] (i4_blocks). A group's products
   x (q - z) are summed (even inputs in order, odd ones in order, the two added; q - z is exact: two FMA chains, so
   that at decode a step does not wait for the last FMA), and the sum times the group's scale added to o with one
   FMA: no multiply a weight, and the same numbers whatever the row count. keep: q - z also stored there (load_keep). */
INLINE void i4_rows_of(const float *x, int64_t K, const void *w, int64_t nk, int acc, float *o, int64_t N, int nr,
                       __mmask16 m0, __mmask16 m1, Groups g, int widened, float *keep, const int64_t size) {
    for (int64_t k0 = 0; k0 < nk; k0 += size) {
        __m512 a[MR][2], b[MR][2];
        UNROLL for (int r = 0; r < nr; r++) a[r][0] = a[r][1] = b[r][0] = b[r][1] = _mm512_setzero_ps();
        if (!widened) i4_zero_points(&g, k0 >> g.shift);
        _Pragma("GCC unroll 4") for (int64_t k = k0; k < k0 + size; k += 2)
            two_inputs(x, K, w, k, widened ? WT_F32 : WT_I4, g, nr, a, b, keep);
        const float *s = g.s + (k0 >> g.shift) * PANEL;
        __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
        int first = !acc && k0 == 0;
        UNROLL for (int r = 0; r < nr; r++) {  /* the sums so far in o (L1), not registers: 6 rows' a and b fill them */
            __m512 t0 = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, o + r * N);
            __m512 t1 = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, o + r * N + 16);
            _mm512_mask_storeu_ps(o + r * N, m0, _mm512_fmadd_ps(_mm512_add_ps(a[r][0], b[r][0]), s0, t0));
            _mm512_mask_storeu_ps(o + r * N + 16, m1, _mm512_fmadd_ps(_mm512_add_ps(a[r][1], b[r][1]), s1, t1));
        }
    }
}

/* i4_rows_of with the group's size a constant (prefill 1.03x as fast at groups of 32) */
INLINE void i4_rows(const float *x, int64_t K, const void *w, int64_t nk, int acc, float *o, int64_t N, int nr,
                    __mmask16 m0, __mmask16 m1, Groups g, int widened, float *keep) {
    if (g.shift == 5) i4_rows_of(x, K, w, nk, acc, o, N, nr, m0, m1, g, widened, keep, 32);
    else if (g.shift == 6) i4_rows_of(x, K, w, nk, acc, o, N, nr, m0, m1, g, widened, keep, 64);
    else i4_rows_of(x, K, w, nk, acc, o, N, nr, m0, m1, g, widened, keep, 128);
}

/* CALL(n) for a block of the remaining `left` rows, at most MR: constant row counts keep the accumulators in
   registers */
#define BY_ROWS(left, CALL) switch ((left) < MR ? (left) : MR) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; default: CALL(6); }

/* int4: rows x [R, K] times inputs k0..k0+nk of a panel w (at k0, whole groups) into out's 32 columns; more than
   MR rows: the first block's q - z kept widened in buf [KC][32] (L1) as it reads them, which the other blocks read
   (its FMAs hide the stream's latency, as fp32's first block does) */
INLINE void i4_blocks(const float *x, int64_t R, int64_t K, int64_t k0, const void *w, int64_t nk, float *out,
                      int64_t N, __mmask16 m0, __mmask16 m1, Groups g, float *buf) {
    int widened = R > MR;
    if (widened) i4_rows(x + k0, K, w, nk, k0 > 0, out, N, MR, m0, m1, g, 0, buf);
    for (int64_t r = widened ? MR : 0; r < R; r += MR) {
#define ROWS(NR) if (widened) i4_rows(x + r * K + k0, K, buf, nk, k0 > 0, out + r * N, N, NR, m0, m1, g, 1, NULL); \
                 else i4_rows(x + r * K + k0, K, w, nk, k0 > 0, out + r * N, N, NR, m0, m1, g, 0, NULL)
        BY_ROWS(R - r, ROWS);
#undef ROWS
    }
}

/* rows x [R, K] times inputs k0..k0+nk of a panel w (at k0) into out's 32 columns (masks m0, m1); not fp32 and more
   than MR rows: the first block's weights kept widened in buf [KC][32] (L1) as it reads them (exact), which the
   other blocks read as fp32 */
INLINE void row_blocks(const float *x, int64_t R, int64_t K, int64_t k0, const void *w, int64_t nk, float *out,
                       int64_t N, __mmask16 m0, __mmask16 m1, int wt, float *buf) {
    int widened = R > MR && wt != WT_F32;
    if (widened) panel_rows(x + k0, K, w, nk, k0 > 0, out, N, MR, m0, m1, wt, buf);
    for (int64_t r = widened ? MR : 0; r < R; r += MR) {
#define ROWS(NR) if (widened) panel_rows(x + r * K + k0, K, buf, nk, k0 > 0, out + r * N, N, NR, m0, m1, WT_F32, NULL); \
                 else panel_rows(x + r * K + k0, K, w, nk, k0 > 0, out + r * N, N, NR, m0, m1, wt, NULL)
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
            if (wt == WT_I4) {
                int64_t at = (j / PANEL * G + (k0 >> shift)) * PANEL;
                i4_blocks(x, R, K, k0, wk, nk, out + j, N, m0, m1, i4_groups(sc + at, z ? z + at : NULL, shift), buf);
                continue;
            }
            row_blocks(x, R, K, k0, wk, nk, out + j, N, m0, m1, wt, buf);
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

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#define BF16_ROWS  /* moec_pairs is built */
/* bf16 weights and bf16 rows (a bf16 model's experts and dense layers, bf16_rows=1): the panels' k in pairs,
   [ceil(N/32), K/2, 32, 2] bf16 (`ort_layouts.pair_bf16`: channel c's weights of k and k + 1 side by side), each row rounded to
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
   (`ort_layouts.panels_a8`; 128 past N), the k of each 32 in moec_pack_a8's order (the evens, then the odds). A step of 4
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
#else
/* AVX2 (and FMA): the same panels, each channel's sums in the same order as the AVX-512 build's, so the same
   numbers. A panel's 32 channels are 4 vectors of 8; rows go one at a time over the whole panel: its 8 sums and 4
   weight vectors fill the 16 registers (half a panel for 2 or 3 rows at a time, which a load a multiply-add would
   not need, ran 1.2x slower at prefill). */
enum { MR = 1 };
typedef struct { const float *s; const uint8_t *z; int shift; } Groups;  /* int4: as the AVX-512 build's */

INLINE Groups i4_groups(const float *s, const uint8_t *z, int shift) {
    Groups g = {s, z, shift};
    return g;
}

/* channels 8v..8v+7 of input k of panel w (type wt: fp32, bf16 or int8) widened to fp32, exactly */
INLINE __m256 load8(const void *w, int64_t k, int wt, int v) {
    if (wt == WT_BF16) {  /* word c of the 16: channel c in the low half, c + 16 in the high one (narrow_bf16) */
        __m256i b = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k * PANEL + 16 * (v & 1)));
        return _mm256_castsi256_ps(v < 2 ? _mm256_slli_epi32(b, 16) : _mm256_and_si256(b, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
    if (wt == WT_I8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + k * PANEL + 8 * v))));
    return _mm256_loadu_ps((const float *)w + k * PANEL + 8 * v);
}

#define TWO23 8388608.f  /* 2^23: the float whose low mantissa bits are an integer below 2^23 */
/* input k of an int4 panel (byte c: channel c in the low nibble, c + 16 in the high one) as q - z, exactly: each
   nibble or-ed into 2^23's mantissa, less zf = 2^23 + z */
INLINE void load_i4(const void *w, int64_t k, const __m256 *zf, __m256 *wv) {
    __m128i b = _mm_loadu_si128((const __m128i *)((const uint8_t *)w + k * 16));
    __m256i i0 = _mm256_cvtepu8_epi32(b), i1 = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b));
    __m256i q[4] = {_mm256_and_si256(i0, _mm256_set1_epi32(15)), _mm256_and_si256(i1, _mm256_set1_epi32(15)),
                    _mm256_srli_epi32(i0, 4), _mm256_srli_epi32(i1, 4)};
    UNROLL for (int v = 0; v < 4; v++)
        wv[v] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(q[v], _mm256_castps_si256(_mm256_set1_ps(TWO23)))),
                              zf[v]);
}

INLINE __m256 sums_so_far(int acc, const float *o, __m256i m) {
    return acc ? _mm256_maskload_ps(o, m) : _mm256_setzero_ps();
}

/* input k of a panel w (type wt; widened: fp32 already) for row x (int4: less zf, the group's zero points or 8):
   onto the sums s; keep: the weights also stored there */
INLINE void input8(const float *x, const void *w, int64_t k, int wt, int widened, const __m256 *zf, __m256 *s,
                   float *keep) {
    __m256 xv = _mm256_set1_ps(x[k]), wv[4];
    if (wt == WT_I4 && !widened) load_i4(w, k, zf, wv);
    UNROLL for (int v = 0; v < 4; v++) {
        if (widened) wv[v] = _mm256_loadu_ps((const float *)w + k * PANEL + 8 * v);
        else if (wt != WT_I4) wv[v] = load8(w, k, wt, v);
        if (keep) _mm256_storeu_ps(keep + k * PANEL + 8 * v, wv[v]);
        s[v] = _mm256_fmadd_ps(xv, wv[v], s[v]);
    }
}

/* row x times nk inputs of a panel w (at those inputs) into o (acc: onto the sums so far; m: each vector's channels
   that exist), summed as panel_rows (even inputs onto a, odd ones onto b, the two added) or, int4, i4_rows (the same
   a group of `size` inputs at a time, then times the group's scale onto o). keep: the widened weights (int4:
   q - z) also stored there; widened: w holds such. */
INLINE void row8(const float *x, const void *w, int64_t nk, int acc, float *o, const __m256i *m, int wt, float *keep,
                 Groups g, int widened, const int64_t size) {
    const int i4 = wt == WT_I4;
    for (int64_t k0 = 0; k0 < nk; k0 += size) {  /* the part at once, or (int4) a group at a time */
        __m256 a[4], b[4], zf[4];
        UNROLL for (int v = 0; v < 4; v++) {
            a[v] = i4 ? _mm256_setzero_ps() : sums_so_far(acc, o + 8 * v, m[v]);
            b[v] = _mm256_setzero_ps();
            if (i4 && !widened)  /* 2^23 + z (exact) */
                zf[v] = _mm256_add_ps(_mm256_set1_ps(TWO23), g.z ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                          (const __m128i *)(g.z + (k0 >> g.shift) * PANEL + 8 * v)))) : _mm256_set1_ps(8));
        }
        int64_t k = k0;
        for (; k + 2 <= k0 + size; k += 2) {
            input8(x, w, k, wt, widened, zf, a, keep);
            input8(x, w, k + 1, wt, widened, zf, b, keep);
        }
        if (k < k0 + size) input8(x, w, k, wt, widened, zf, a, keep);
        UNROLL for (int v = 0; v < 4; v++) {
            __m256 sum = _mm256_add_ps(a[v], b[v]);
            if (i4)  /* the group's sum times its scale, onto the sums so far */
                sum = _mm256_fmadd_ps(sum, _mm256_loadu_ps(g.s + (k0 >> g.shift) * PANEL + 8 * v),
                                      sums_so_far(acc || k0, o + 8 * v, m[v]));
            _mm256_maskstore_ps(o + 8 * v, m[v], sum);
        }
    }
}

/* row8 with the part or the group size a constant */
INLINE void row8_of(const float *x, const void *w, int64_t nk, int acc, float *o, const __m256i *m, int wt,
                    float *keep, Groups g, int widened) {
    if (wt != WT_I4) row8(x, w, nk, acc, o, m, wt, keep, g, widened, nk);
    else if (g.shift == 5) row8(x, w, nk, acc, o, m, wt, keep, g, widened, 32);
    else if (g.shift == 6) row8(x, w, nk, acc, o, m, wt, keep, g, widened, 64);
    else row8(x, w, nk, acc, o, m, wt, keep, g, widened, 128);
}

/* rows x [R, K] times inputs k0..k0+nk of a panel w (at k0) into out's 32 columns; not fp32 and more than one row:
   the first row's weights kept widened in buf [KC][32] (L1) as it reads them (exact), which the others read */
INLINE void row_blocks(const float *x, int64_t R, int64_t K, int64_t k0, const void *w, int64_t nk, float *out,
                       int64_t N, const __m256i *m, int wt, Groups g, float *buf) {
    int widened = R > 1 && wt != WT_F32;
    row8_of(x + k0, w, nk, k0 > 0, out, m, wt, widened ? buf : NULL, g, 0);
    for (int64_t r = 1; r < R; r++)
        if (widened) row8_of(x + r * K + k0, buf, nk, k0 > 0, out + r * N, m, wt == WT_I4 ? WT_I4 : WT_F32, NULL, g, 1);
        else row8_of(x + r * K + k0, w, nk, k0 > 0, out + r * N, m, wt, NULL, g, 0);
}

/* as the AVX-512 build's panels_any */
INLINE void panels_any(const float *x, int64_t R, int64_t K, const void *w, float *out, int64_t N, int64_t j0,
                       int64_t j1, int wt, const float *sc, const uint8_t *z, int64_t G) {
    float buf[R > MR && wt != WT_F32 ? KC * PANEL : 1];
    int shift = wt == WT_I4 ? __builtin_ctzll((uint64_t)(K / G)) : 0;
    for (int64_t j = j0; j < j1; j += PANEL) {
        int64_t n = j1 - j < PANEL ? j1 - j : PANEL;
        __m256i m[4];  /* vector v: channels 8v + i < n */
        for (int v = 0; v < 4; v++)
            m[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n - 8 * v), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const char *wp = (const char *)w + j / PANEL * PANEL_BYTES(wt, K);
        for (int64_t k0 = 0; k0 < K; k0 += KC) {  /* KC a multiple of the groups: each part starts a group */
            int64_t nk = (k0 + KC < K ? k0 + KC : K) - k0, at = (j / PANEL * G + (k0 >> shift)) * PANEL;
            Groups g = i4_groups(wt == WT_I4 ? sc + at : NULL, wt == WT_I4 && z ? z + at : NULL, shift);
            row_blocks(x, R, K, k0, wp + PANEL_BYTES(wt, k0), nk, out + j, N, m, wt, g, buf);
        }
        if (wt == WT_I8)  /* the channels' scales, once their sums are whole */
            for (int64_t r = 0; r < R; r++)
                for (int v = 0; v < 4; v++) {
                    float *o = out + r * N + j + 8 * v;
                    _mm256_maskstore_ps(o, m[v], _mm256_mul_ps(_mm256_maskload_ps(o, m[v]),
                                                               _mm256_maskload_ps(sc + j + 8 * v, m[v])));
                }
    }
}
#endif

/* panels_any (either build) with the weight type a constant */
static void moec_panels(const float *x, int64_t R, int64_t K, const void *w, float *out, int64_t N, int64_t j0,
                        int64_t j1, int wt, const float *sc, const uint8_t *z, int64_t G) {
    if (wt == WT_BF16) panels_any(x, R, K, w, out, N, j0, j1, WT_BF16, sc, z, G);
    else if (wt == WT_I8) panels_any(x, R, K, w, out, N, j0, j1, WT_I8, sc, z, G);
    else if (wt == WT_I4) panels_any(x, R, K, w, out, N, j0, j1, WT_I4, sc, z, G);
    else panels_any(x, R, K, w, out, N, j0, j1, WT_F32, sc, z, G);
}
