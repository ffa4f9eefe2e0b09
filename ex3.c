#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#define INLINE static inline __attribute__((always_inline))
INLINE __m256d exp4d(__m256d x) {  /* x in [-120, 100] */
    __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
    static const double c[] = {1.0 / 6227020800, 1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880,
                               1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0};
    __m256d p = _mm256_set1_pd(c[0]);
    for (int i = 1; i < 14; i++) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c[i]));
    /* 2^n: n + 2^52 + 1023 holds n + 1023 in its low bits, shifted into the exponent */
    __m256i e = _mm256_slli_epi64(_mm256_castpd_si256(_mm256_add_pd(n, _mm256_set1_pd(0x1p52 + 1023))), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
}

INLINE __m256 exp8(__m256 x) {
    __m256 c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-120.f)), _mm256_set1_ps(100.f));
    __m128 lo = _mm256_cvtpd_ps(exp4d(_mm256_cvtps_pd(_mm256_castps256_ps128(c))));
    __m128 hi = _mm256_cvtpd_ps(exp4d(_mm256_cvtps_pd(_mm256_extractf128_ps(c, 1))));
    return _mm256_blendv_ps(_mm256_set_m128(hi, lo), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}


int main() {
    long bad = 0, total = 0, wrong = 0;
    float in[8], out[8];
    for (int sign = 0; sign < 2; sign++) {
        uint32_t lim; float L = sign ? 110.f : 95.f; memcpy(&lim, &L, 4);
        for (uint32_t u = 0; u <= lim; u += 8) {
            for (int i = 0; i < 8; i++) { uint32_t v = (u + i) | (sign ? 0x80000000u : 0); memcpy(in + i, &v, 4); }
            _mm256_storeu_ps(out, exp8(_mm256_loadu_ps(in)));
            for (int i = 0; i < 8; i++) {
                float g = expf(in[i]); total++;
                if (memcmp(&g, out + i, 4)) { bad++; float c = (float)expl((long double)in[i]);
                    if (memcmp(&c, out + i, 4)) { if (wrong < 5) printf("WRONG x %a ref %a mine %a\n", in[i], c, out[i]); wrong++; } }
            }
        }
    }
    float sp[8] = {NAN, INFINITY, -INFINITY, 0.f, -0.f, 88.72283f, 88.7229f, -103.9721f};
    _mm256_storeu_ps(out, exp8(_mm256_loadu_ps(sp)));
    for (int i = 0; i < 8; i++) printf("exp(%a) = %a (expf %a)\n", sp[i], out[i], expf(sp[i]));
    printf("%ld of %ld differ from glibc, wrong in %ld\n", bad, total, wrong);
}
