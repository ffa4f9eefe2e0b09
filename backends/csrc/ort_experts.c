/* moec::Int4Experts, Experts, ExpertsBf16, ExpertsInt8, Linear*, Int4MatMul: the ops' phases over ORT's pool,
   their inputs checked (after panels.c) */
/* ---- the op ---- */
#define OP "Int4Experts"
#define MM "Int4MatMul"
enum { NIN = 9, CH = 64 };  /* inputs; output channels per work item (a multiple of the kernel's tile of 4) */
/* the scales: fp32, or fp16 in the tile layout (any type here, checked by `matrix`) */
static const int in_types[NIN] = {T_FLOAT, T_INT64, T_FLOAT, T_UINT8, T_ANY, T_UINT8, T_UINT8, T_ANY, T_UINT8};
static const char *in_names[NIN] = {"x", "ids", "w", "q13", "s13", "z13", "q2", "s2", "z2"};

typedef struct { int64_t a8, gate_up, tiles, n, wt; } Kernel;  /* wt: the panels' weight type, WT_* */

typedef struct {  /* one matrix of every expert, moec's int4 format: q [E, N, K/2], s [E, N, G], z [E, N, G] or NULL;
                   tiles: q and s in the tile layout (moec_int4_tiles), s in fp16 if half; or weights in panels
                   f [E, P, K, 32] of type wt (int8: times the channel's scale sc [E, N]) */
    const uint8_t *q; const float *s; const uint8_t *z; int64_t N, K, G; int tiles; const void *f; int wt;
    const float *sc; int half;
} Matrix;

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
    const void *x = s->a8 ? (const void *)((const int8_t *)s->in + r0 * m->K) : (const void *)((const float *)s->in + r0 * m->K);
    const uint8_t *q = m->q + e * m->N * (m->K / 2), *z = m->z ? m->z + e * m->N * G : NULL;
#ifdef TILES
    if (m->tiles) {
        moec_int4_tiles(x, s->in_s + r0 * G, s->in_i + r0 * G, s->first[e + 1] - r0, m->K, q,
                        (const char *)m->s + e * m->N * G * (m->half ? 2 : 4), m->half, z, G, s->out + r0 * m->N,
                        m->N, j0, j1);
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

/* a phase of n items over `values` numbers in all: on this thread where they are few (a decode step's k rows: a
   parallel region for a few us of work), else over the pool */
static OrtStatus *phase(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t n, int64_t values, void *s) {
    if (values <= (1 << 14)) {
        run_all(fn, n, s);
        return NULL;
    }
    return parallel(ctx, fn, n, s);
}

enum { MAX_RANK = 8 };
typedef struct { const OrtValue *v; void *data; int64_t dims[MAX_RANK]; size_t rank; int64_t numel; int type; } Input;

static OrtStatus *get_input(const char *op, OrtKernelContext *ctx, size_t i, const char **names, Input *in) {
    memset(in, 0, sizeof *in);
    CHECK(CALL((const OrtKernelContext *, size_t, const OrtValue **), KernelContext_GetInput, ctx, i, &in->v));
    if (!in->v)
        return NULL;  /* an optional input left out */
    OrtShapeInfo *info;
    CHECK(CALL((const OrtValue *, OrtShapeInfo **), GetTensorTypeAndShape, in->v, &info));
    OrtStatus *st = CALL((const OrtShapeInfo *, int *), GetTensorElementType, info, &in->type);
    if (!st)
        st = CALL((const OrtShapeInfo *, size_t *), GetDimensionsCount, info, &in->rank);
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
    /* s in fp16: the tile layout's only (ort_layouts.tile_weights stores scales that are all fp16 numbers so) */
    if (s->type != T_FLOAT && (s->type != T_FLOAT16 || tiles != 1))
        return error(op, ORT_INVALID_ARGUMENT, "%s: the scales are fp32, or fp16 in the tile layout (tiles=1), not "
                     "element type %d with tiles=%d", names[i + 1], s->type, tiles);
    /* tiles=2: q, s and z in panels (ort_layouts.int4_panels), the same shapes; moec_panels runs them */
    *m = (Matrix){q->data, s->data, z->v && z->numel ? z->data : NULL, N, K, G, tiles == 1,
                  tiles == 2 ? q->data : NULL, WT_I4, .half = s->type == T_FLOAT16};
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
    OrtStatus *st = phase(ctx, input_item, R, R * H, s);
    if (!st) {
        s->m = &s->m13, s->in = s->x1, s->in_s = s->s1, s->in_i = s->i1, s->out = s->h;
        st = parallel(ctx, gemm_item, nact * ((2 * I + CH - 1) / CH), s);
    }
    if (!st) st = phase(ctx, act_item, R, R * I, s);
    if (!st) {
        s->m = &s->m2, s->in = s->x2, s->in_s = s->s2, s->in_i = s->i2, s->out = s->o;
        st = parallel(ctx, gemm_item, nact * ((H + CH - 1) / CH), s);
    }
    if (!st) st = phase(ctx, combine_item, T, R * H, s);
    free(idx), work_put(buf, kept);
    return st;
}

/* moec::Experts(x [T, H] fp32, ids [T, k] int64, w [T, k] fp32, w13 [E, ceil(2I/32), H, 32] fp32,
   w2 [E, ceil(H/32), I, 32] fp32; gate_up) -> y [T, H]: fp32 experts, weights in panels (moec_panels;
   `ort_layouts.panel_weights` lays out the session's file), the same phases as Int4Experts. moec::ExpertsBf16: w13 and w2 in
   bf16 (`ort_layouts.narrow_bf16`). moec::ExpertsInt8(..., w13 int8, w2 int8, s13 [E, 2I], s2 [E, H]): moec's Int8Experts,
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
                       "rows: ort_layouts.panel_weights) do not fit x [T, %lld]"
                     : kd == 2 ? "w13 [E, ceil(2I/32), H/2, 64] and w2 [E, ceil(H/32), I/2, 64] (bf16 weights in pairs "
                                 "for bf16 rows: ort_layouts.pair_bf16) do not fit x [T, %lld]"
                     : "w13 [E, ceil(2I/32), H, 32] and w2 [E, ceil(H/32), I, 32] (weights in panels: "
                       "ort_layouts.panel_weights) do not fit x [T, %lld]", (long long)H);
    if (kn->a8 && (H % 32 || I % 32 || H > 65536 || I > 65536))
        return error(XP, ORT_INVALID_ARGUMENT, "int8 rows take H and I multiples of 32, at most 65536 (int32 sums): "
                     "H %lld, I %lld", (long long)H, (long long)I);
    if (n == XIN8 && (s13->rank != 2 || s13->dims[0] != E || s13->dims[1] != 2 * I || s2->rank != 2 ||
                      s2->dims[0] != E || s2->dims[1] != H))
        return error(XP, ORT_INVALID_ARGUMENT, "s13 [E, 2I] and s2 [E, H] (the channels' scales) do not fit");
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
}

/* moec::Int4MatMul(x [..., K] fp32, q u8 [N, K/2], s [N, G] fp32, z u8 [N, G] or absent; int8_activations)
   -> y [..., N]: one matrix (a dense layer's MatMulNBits, moec.export_dense), the experts' phases with one expert
   taking every row */
enum { MIN = 4 };
static const int mm_types[MIN] = {T_FLOAT, T_UINT8, T_ANY, T_UINT8};
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
                       "ort_layouts.panel_weights) do not fit, n = %lld"
                     : kd == 2 ? "x [..., K] and w [ceil(n/32), K/2, 64] (bf16 weights in pairs for bf16 rows: "
                                 "ort_layouts.pair_bf16) do not fit, n = %lld"
                     : "x [..., K] and w [ceil(n/32), K, 32] (weights in panels: ort_layouts.panel_weights) do not "
                       "fit, n = %lld", (long long)N);
    if (kn->a8 && (K % 32 || K > 65536))
        return error(FM, ORT_INVALID_ARGUMENT, "int8 rows take K a multiple of 32, at most 65536 (int32 sums): K %lld",
                     (long long)K);
    if (n == FIN8 && (sc->rank != 1 || sc->dims[0] != N))
        return error(FM, ORT_INVALID_ARGUMENT, "s [n] (the channels' scales) does not fit n = %lld", (long long)N);
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
    if (!st && kn->tiles == 1)
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
