/* ONNX Runtime's custom-op library, first part (backends/ort_kernels.py builds it after native.c): the C ABI as
   moec's ops use it, and their helpers (error statuses, exp) */
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
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2, T_ANY = 0, T_FLOAT = 1, T_UINT8 = 2, T_INT8 = 3, T_INT64 = 7, T_BOOL = 9,
       T_FLOAT16 = 10, T_BF16 = 16, REQUIRED = 0, OPTIONAL = 1 };  /* T_ANY: ORT's UNDEFINED, an input of any type */
enum { CreateStatus = 0, CreateCustomOpDomain = 26, CustomOpDomain_Add = 27, AddCustomOpDomain = 28,  /* OrtApi */
       GetTensorMutableData = 51, GetTensorElementType = 60, GetDimensionsCount = 61, GetDimensions = 62, GetTensorTypeAndShape = 65,
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
