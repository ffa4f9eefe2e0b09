/* the ops' tables and RegisterCustomOps, the entry point ONNX Runtime calls: last, after every op's source
   (ort_attention.c's too) */
static void destroy(void *kernel) { free(kernel); }
static const char *name(const OrtCustomOp *op) { return "Int4Experts"; }
static const char *provider(const OrtCustomOp *op) { return "CPUExecutionProvider"; }
static int input_type(const OrtCustomOp *op, size_t i) { return in_types[i]; }
static size_t inputs(const OrtCustomOp *op) { return NIN; }
static int output_type(const OrtCustomOp *op, size_t i) { return T_FLOAT; }
static size_t outputs(const OrtCustomOp *op) { return 1; }
static int input_kind(const OrtCustomOp *op, size_t i) { return i == 5 || i == 8 ? OPTIONAL : REQUIRED; }
static int output_kind(const OrtCustomOp *op, size_t i) { return REQUIRED; }
static int memory(const OrtCustomOp *op, size_t i) { return 0; }  /* OrtMemTypeDefault */
static int one(const OrtCustomOp *op) { return 1; }

static const char *xp_name(const OrtCustomOp *op) { return "Experts"; }
static int xp_input_type(const OrtCustomOp *op, size_t i) { return xp_types[i]; }
static const char *xb_name(const OrtCustomOp *op) { return "ExpertsBf16"; }
static int xb_input_type(const OrtCustomOp *op, size_t i) { return xb_types[i]; }
static size_t xp_inputs(const OrtCustomOp *op) { return XIN; }
static int xp_input_kind(const OrtCustomOp *op, size_t i) { return REQUIRED; }

static const char *xi_name(const OrtCustomOp *op) { return "ExpertsInt8"; }
static int xi_input_type(const OrtCustomOp *op, size_t i) { return x8_types[i]; }
static size_t xi_inputs(const OrtCustomOp *op) { return XIN8; }
static const char *fm_name(const OrtCustomOp *op) { return "Linear"; }
static int fm_input_type(const OrtCustomOp *op, size_t i) { return fm_types[i]; }
static const char *fb_name(const OrtCustomOp *op) { return "LinearBf16"; }
static const char *fi_name(const OrtCustomOp *op) { return "LinearInt8"; }
static int fi_input_type(const OrtCustomOp *op, size_t i) { return f8_types[i]; }
static size_t fi_inputs(const OrtCustomOp *op) { return FIN8; }
static int fb_input_type(const OrtCustomOp *op, size_t i) { return fb_types[i]; }
static size_t fm_inputs(const OrtCustomOp *op) { return FIN; }

static const char *mm_name(const OrtCustomOp *op) { return "Int4MatMul"; }
static int mm_input_type(const OrtCustomOp *op, size_t i) { return mm_types[i]; }
static size_t mm_inputs(const OrtCustomOp *op) { return MIN; }
static int mm_input_kind(const OrtCustomOp *op, size_t i) { return i == 3 ? OPTIONAL : REQUIRED; }

#define OP_FIELDS .version = 16, .GetExecutionProviderType = provider, .GetOutputType = output_type, \
    .GetOutputTypeCount = outputs, .KernelDestroy = destroy, .GetOutputCharacteristic = output_kind, \
    .GetInputMemoryType = memory, .GetVariadicInputMinArity = one, .GetVariadicInputHomogeneity = one, \
    .GetVariadicOutputMinArity = one, .GetVariadicOutputHomogeneity = one, .CreateKernelV2 = create
static const OrtCustomOp op = {OP_FIELDS, .GetName = name, .GetInputType = input_type, .GetInputTypeCount = inputs,
                               .GetInputCharacteristic = input_kind, .KernelComputeV2 = compute};
/* moec's ops on weights in panels: every input required, one compute for the experts' and one for Linear */
#define PANEL_OP(NAME, TYPES, COUNT, COMPUTE) {OP_FIELDS, .GetName = NAME, .GetInputType = TYPES, \
    .GetInputTypeCount = COUNT, .GetInputCharacteristic = xp_input_kind, .KernelComputeV2 = COMPUTE}
static const OrtCustomOp xp_op = PANEL_OP(xp_name, xp_input_type, xp_inputs, experts_panels);
static const OrtCustomOp xb_op = PANEL_OP(xb_name, xb_input_type, xp_inputs, experts_panels);
static const OrtCustomOp xi_op = PANEL_OP(xi_name, xi_input_type, xi_inputs, experts_panels);
static const OrtCustomOp fm_op = PANEL_OP(fm_name, fm_input_type, fm_inputs, linear);
static const OrtCustomOp fb_op = PANEL_OP(fb_name, fb_input_type, fm_inputs, linear);
static const OrtCustomOp fi_op = PANEL_OP(fi_name, fi_input_type, fi_inputs, linear);
static const OrtCustomOp mm_op = {OP_FIELDS, .GetName = mm_name, .GetInputType = mm_input_type,
                                  .GetInputTypeCount = mm_inputs, .GetInputCharacteristic = mm_input_kind,
                                  .KernelComputeV2 = matmul};
static const OrtCustomOp at_op = {OP_FIELDS, .GetName = at_name, .GetInputType = at_input_type,
                                  .GetInputTypeCount = at_inputs, .GetOutputTypeCount = at_outputs,
                                  .GetInputCharacteristic = at_input_kind, .GetOutputCharacteristic = at_output_kind,
                                  .CreateKernelV2 = attention_create,
                                  .KernelComputeV2 = attention};

/* SessionOptions.register_custom_ops_library calls this */
EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    api = base->GetApi(API_VERSION);
    if (!api)
        return NULL;  /* too old to make a status: the session then fails on the unknown op, naming it */
    const char *info = ((const char *(*)(void))api[GetBuildInfoString])();
    if (!info || strncmp(info, "ORT Build Info", 14))
        return error("RegisterCustomOps", ORT_FAIL, "this onnxruntime's C API is not laid out as the library expects");
    OrtCustomOpDomain *domain;
    CHECK(CALL((const char *, OrtCustomOpDomain **), CreateCustomOpDomain, "moec", &domain));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &xp_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &fm_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &xb_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &fb_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &xi_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &fi_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &mm_op));
    CHECK(CALL((OrtCustomOpDomain *, const void *), CustomOpDomain_Add, domain, &at_op));
    return CALL((OrtSessionOptions *, OrtCustomOpDomain *), AddCustomOpDomain, options, domain);
}
