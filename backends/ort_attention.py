"""moec::CachedAttention: the KV-cache export's attention on moec's kernel inside ONNX Runtime (backend="onnxruntime", CPU).

    moec::CachedAttention(q [B, S, H*D], k [B, S, KVH*D], v [B, S, KVH*D], past_k [B, KVH, P, D], past_v,
                    bias [B|1, 1, S, T] additive, sinks [H] optional; num_heads H, kv_num_heads KVH, scale)
        -> out [B, S, H*D], present_k [B, KVH, T, D], present_v          (T = P + S)
        K, V = cat(past_k, k), cat(past_v, v)                 # query head h reads kv head h // (H / KVH)
        out = softmax([q K^T * scale + bias | sinks])[..., :T] V   # causal: query s never reads a key t > P + s;
                                                                   # 0 where every such key is masked

what moec::ort_gqa computes (backends/onnx_backend.py), the op moec.export_gqa proves each layer's attention
against and exports as com.microsoft::GroupQueryAttention. `rewrite` turns those nodes into this op in the files
backend="onnxruntime" runs on CPU with moec's kernel library (fp32 models; export_onnx/export_genai files keep
ORT's op).

Why: at decode ORT's GroupQueryAttention took ~22 us a layer for one token over 61 positions (a one-node session:
31 us, this op's 16, an Identity's 8.6), for work of a few microseconds. This kernel:
per (batch, kv head, query) the query heads that share the kv head, fp32 logits with AVX2 dot products, the
softmax with a vectorised exp, the weighted sum of values; the past copied into the present once. Work is split
over ORT's pool (KernelContext_ParallelFor) only when it is large enough to pay for waking a thread (prefill).
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
enum { AIN = 7, AOUT = 3 };
static const char *at_names[AIN] = {"q", "k", "v", "past_k", "past_v", "bias", "sinks"};
typedef struct { int64_t H, KVH; float scale; } AttnKernel;
typedef struct {
    int64_t B, S, H, KVH, D, P, T, bias_rows;
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

INLINE __m256 exp8(__m256 x) {  /* e^x: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial (within 3 ulp of expf), 2^n as bits */
    const __m256 lo = _mm256_set1_ps(-104.f), hi = _mm256_set1_ps(88.7f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 c = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), c);  /* ln2 in two parts: r exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    /* 2^n in two factors, so that n down to -150 (denormal results) and up to 128 stay representable */
    __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
    return _mm256_blendv_ps(y, x, nan);  /* NaN stays NaN */
}

INLINE int masked(float b) { return b <= -FLT_MAX / 2; }  /* -inf too */

/* the rep = H / KVH query heads of kv head `kv` at query s of batch row b */
static void attend_item(void *p, size_t item) {
    Attn *a = p;
    int64_t S = a->S, D = a->D, T = a->T, rep = a->H / a->KVH;
    int64_t s = item % S, kv = (item / S) % a->KVH, b = item / (S * a->KVH);
    const float *K = a->ok + (b * a->KVH + kv) * T * D, *V = a->ov + (b * a->KVH + kv) * T * D;
    const float *bias = a->bias + ((a->bias_rows > 1 ? b : 0) * S + s) * T;
    float *l = malloc((T + 8) * sizeof(float));
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
    for (int64_t r = 0; r < rep; r++) {
        int64_t h = kv * rep + r;
        const float *q = a->q + ((b * S + s) * a->H + h) * D;
        float *o = a->out + ((b * S + s) * a->H + h) * D;
        if (!n) {  /* nothing to attend to (a row of padding): zeros, as ORT's op */
            memset(o, 0, D * sizeof(float));
            continue;
        }
        float m = -INFINITY;
        for (int64_t i = 0; i < n; i++) {
            l[i] = dot_f32(q, K + at[i] * D, D) * a->scale + bias[at[i]];
            m = l[i] > m ? l[i] : m;
        }
        float sink = a->sinks ? a->sinks[h] : -INFINITY;
        m = sink > m ? sink : m;
        __m256 acc = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(l + i), mv));
            _mm256_storeu_ps(l + i, e);
            acc = _mm256_add_ps(acc, e);
        }
        float sum = hsum(acc);
        for (; i < n; i++) sum += (l[i] = expf(l[i] - m));
        if (a->sinks) sum += expf(sink - m);
        float inv = 1.f / sum;
        for (int64_t d = 0; d < D; d++) o[d] = 0.f;
        for (int64_t j = 0; j < n; j++) {
            const float *vj = V + at[j] * D;
            float w = l[j] * inv;
            int64_t d = 0;
            __m256 wv = _mm256_set1_ps(w);
            for (; d + 8 <= D; d += 8)
                _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(o + d)));
            for (; d < D; d++) o[d] += w * vj[d];
        }
    }
    free(l), free(at);
}

static void present_item(void *p, size_t i) {  /* (b, kv head) i: its past, then its new keys and values */
    Attn *a = p;
    int64_t b = i / a->KVH, h = i % a->KVH, D = a->D, P = a->P, S = a->S;
    memcpy(a->ok + i * a->T * D, a->pk + i * P * D, P * D * sizeof(float));
    memcpy(a->ov + i * a->T * D, a->pv + i * P * D, P * D * sizeof(float));
    for (int64_t s = 0; s < S; s++) {
        memcpy(a->ok + (i * a->T + P + s) * D, a->k + ((b * S + s) * a->KVH + h) * D, D * sizeof(float));
        memcpy(a->ov + (i * a->T + P + s) * D, a->v + ((b * S + s) * a->KVH + h) * D, D * sizeof(float));
    }
}

static OrtStatus *attention(void *kernel, OrtKernelContext *ctx) {
    const AttnKernel *kn = kernel;
    Input in[AIN];
    for (size_t i = 0; i < AIN; i++) CHECK(get_input(AT, ctx, i, at_names, in + i));
    int64_t H = kn->H, KVH = kn->KVH;
    if (in[0].rank != 3 || in[3].rank != 4 || H <= 0 || KVH <= 0 || H % KVH || in[0].dims[2] % H)
        return error(AT, ORT_INVALID_ARGUMENT, "takes q [B, S, H*D] and past_k [B, KVH, P, D] with H a multiple of KVH");
    int64_t B = in[0].dims[0], S = in[0].dims[1], D = in[0].dims[2] / H, P = in[3].dims[2], T = P + S;
    const Input *k = in + 1, *v = in + 2, *pk = in + 3, *pv = in + 4, *bias = in + 5, *sinks = in + 6;
    int ok = k->rank == 3 && v->rank == 3 && k->dims[0] == B && k->dims[1] == S && k->dims[2] == KVH * D &&
             v->dims[0] == B && v->dims[1] == S && v->dims[2] == KVH * D && pk->dims[0] == B &&
             pk->dims[1] == KVH && pk->dims[3] == D && pv->rank == 4 && pv->dims[0] == B && pv->dims[1] == KVH &&
             pv->dims[2] == P && pv->dims[3] == D && bias->rank == 4 && (bias->dims[0] == 1 || bias->dims[0] == B) &&
             bias->dims[1] == 1 && bias->dims[2] == S && bias->dims[3] == T && (!sinks->v || sinks->numel == H);
    if (!ok)
        return error(AT, ORT_INVALID_ARGUMENT, "q [B, S, H*D], k and v [B, S, KVH*D], past_k and past_v [B, KVH, P, "
                     "D], bias [B or 1, 1, S, P+S] and sinks [H] do not fit (H %lld, KVH %lld)", (long long)H,
                     (long long)KVH);
    Attn a = {.B = B, .S = S, .H = H, .KVH = KVH, .D = D, .P = P, .T = T, .bias_rows = bias->dims[0],
              .scale = kn->scale, .q = in[0].data, .k = k->data, .v = v->data, .pk = pk->data, .pv = pv->data,
              .bias = bias->data, .sinks = sinks->v ? sinks->data : NULL};
    int64_t od[3] = {B, S, H * D}, pd[4] = {B, KVH, T, D};
    OrtValue *y;
    CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 0, od, 3, &y));
    CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&a.out));
    CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 1, pd, 4, &y));
    CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&a.ok));
    CHECK(CALL((OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **), KernelContext_GetOutput, ctx, 2, pd, 4, &y));
    CHECK(CALL((const OrtValue *, void **), GetTensorMutableData, y, (void **)&a.ov));
    if (B * T * D == 0)
        return NULL;
    /* threads only where the work pays for waking one (~0.5M multiply-adds: a prompt, not a decode step) */
    int wide = B * H * S * T * D > (1 << 19);
    CHECK(wide ? parallel(ctx, present_item, B * KVH, &a) : (run_all(present_item, B * KVH, &a), NULL));
    if (S) CHECK(wide ? parallel(ctx, attend_item, B * KVH * S, &a) : (run_all(attend_item, B * KVH * S, &a), NULL));
    return a.failed ? error(AT, ORT_FAIL, "out of memory") : NULL;
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
static int at_input_kind(const OrtCustomOp *op, size_t i) { return i == 6 ? OPTIONAL : REQUIRED; }
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
        inputs=[OpSchema.FormalParameter(n, "tensor(float)", **({"param_option": optional} if n == "sinks" else {}))
                for n in ("q", "k", "v", "past_k", "past_v", "bias", "sinks")],
        outputs=[OpSchema.FormalParameter(n, "tensor(float)") for n in ("out", "present_k", "present_v")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "the logits' scale")]))


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


def self_test(path: str) -> None:
    """A one-node session against moec::ort_gqa (2 rows, 3 new tokens after 5, 8 heads over 2, a padded row,
    a fully masked row, sinks and none; a long row that takes the threaded path); RuntimeError where they differ."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper

    import moec.backends.onnx_backend  # noqa: F401 (registers moec::ort_gqa's torch implementation)

    g = torch.Generator().manual_seed(0)
    for B, S, P, H, KVH, D, sinks in ((2, 3, 5, 8, 2, 16, True), (2, 3, 5, 4, 4, 8, False),
                                      (1, 40, 300, 8, 2, 64, False)):
        T = P + S
        x = {"q": torch.randn(B, S, H * D, generator=g) * 3, "k": torch.randn(B, S, KVH * D, generator=g),
             "v": torch.randn(B, S, KVH * D, generator=g), "past_k": torch.randn(B, KVH, P, D, generator=g),
             "past_v": torch.randn(B, KVH, P, D, generator=g), "bias": torch.zeros(B, 1, S, T)}
        x["bias"][..., P + 1:] = torch.finfo(torch.float32).min  # causal-like, and row 1's first 2 positions padded
        if B > 1:
            x["bias"][1, ..., :2] = float("-inf")
            x["bias"][1, 0, 0] = torch.finfo(torch.float32).min  # a fully masked query row
        if sinks:
            x["sinks"] = torch.randn(H, generator=g)
        node = helper.make_node(OP, [*x, *([] if sinks else [""])], ["out", "present_k", "present_v"],
                                domain="moec", num_heads=H, kv_num_heads=KVH, scale=D ** -0.5)
        graph = helper.make_graph([node], "moec_attention_self_test",
                                  [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in x],
                                  [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                   for n in ("out", "present_k", "present_v")])
        model = helper.make_model(graph, ir_version=10,
                                  opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("moec", 1)])
        so = ort.SessionOptions()
        so.register_custom_ops_library(path)
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = [torch.from_numpy(o) for o in sess.run(None, {n: t.numpy() for n, t in x.items()})]
        want = torch.ops.moec.ort_gqa(x["q"], x["k"], x["v"], x["past_k"], x["past_v"], x["bias"], x.get("sinks"),
                                      H, KVH, D ** -0.5)
        for name, a, b in zip(("out", "present_k", "present_v"), got, want):
            err = ((a - b).abs().max() / b.abs().max()).item()
            if not err < 1e-5:
                raise RuntimeError(f"moec::CachedAttention's self-test differs from moec::ort_gqa ({name}, B={B} S={S} "
                                   f"P={P}: relative error {err:.2e})")
