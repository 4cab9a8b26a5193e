/* The worker's operator library: registers domain "ortmux" with LoraBranch (lora_branch.c) and
 * PagedAttention (paged_attention.c), and the helpers they share (ortmux_api.h). */
#include <stdio.h>

#include "ortmux_api.h"

const void *const *ortmux_api;

Status fail(const char *message) { return CALL(CreateStatusFn, API_CreateStatus)(ORT_INVALID_ARGUMENT, message); }

Status out_of_memory(const char *op) {
    char message[96];
    snprintf(message, sizeof message, "%s: Failed to allocate memory", op);
    return CALL(CreateStatusFn, API_CreateStatus)(ORT_FAIL, message);
}

int64_t shape_of(const void *value, int64_t *dims) {
    void *info = NULL;
    size_t count = 0;
    if (CALL(GetTensorTypeAndShapeFn, API_GetTensorTypeAndShape)(value, &info) != NULL) return -1;
    int64_t result = -1;
    if (CALL(GetDimensionsCountFn, API_GetDimensionsCount)(info, &count) == NULL && count <= MAX_DIMS &&
        CALL(GetDimensionsFn, API_GetDimensions)(info, dims, count) == NULL)
        result = (int64_t)count;
    CALL(ReleaseInfoFn, API_ReleaseTensorTypeAndShapeInfo)(info);
    return result;
}

/* OrtCustomOp up to version 16's fields (KernelComputeV2); ORT reads no further at version 16. */
typedef struct {
    uint32_t version;
    void *(*CreateKernel)(const void *op, const void *api, const void *info);
    const char *(*GetName)(const void *op);
    const char *(*GetExecutionProviderType)(const void *op);
    int (*GetInputType)(const void *op, size_t index);
    size_t (*GetInputTypeCount)(const void *op);
    int (*GetOutputType)(const void *op, size_t index);
    size_t (*GetOutputTypeCount)(const void *op);
    void (*KernelCompute)(void *kernel, void *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const void *op, size_t index);
    int (*GetOutputCharacteristic)(const void *op, size_t index);
    int (*GetInputMemoryType)(const void *op, size_t index);
    int (*GetVariadicInputMinArity)(const void *op);
    int (*GetVariadicInputHomogeneity)(const void *op);
    int (*GetVariadicOutputMinArity)(const void *op);
    int (*GetVariadicOutputHomogeneity)(const void *op);
    Status (*CreateKernelV2)(const void *op, const void *api, const void *info, void **kernel);
    Status (*KernelComputeV2)(void *kernel, void *context);
} CustomOp;

static void *create_kernel(const void *op, const void *ort_api, const void *info) {
    (void)op, (void)ort_api, (void)info;
    return (void *)&ortmux_api; /* stateless: any non-NULL pointer */
}
static Status create_kernel_v2(const void *op, const void *ort_api, const void *info, void **kernel) {
    *kernel = create_kernel(op, ort_api, info);
    return NULL;
}
static void destroy_kernel(void *kernel) { (void)kernel; }
static const char *op_provider(const void *op) { (void)op; return "CPUExecutionProvider"; }
static int output_type(const void *op, size_t index) { (void)op, (void)index; return TYPE_FLOAT; }
static size_t output_count(const void *op) { (void)op; return 1; }
static int required(const void *op, size_t index) { (void)op, (void)index; return 0; }
static int default_memory(const void *op, size_t index) { (void)op, (void)index; return 0; }
static int one(const void *op) { (void)op; return 1; }

/* LoraBranch: x, base (float), table (int64). */
static void lora_v1(void *kernel, void *context) { (void)lora_branch_compute(kernel, context); }
static const char *lora_name(const void *op) { (void)op; return "LoraBranch"; }
static int lora_input(const void *op, size_t index) { (void)op; return index == 2 ? TYPE_INT64 : TYPE_FLOAT; }
static size_t lora_inputs(const void *op) { (void)op; return 3; }

/* PagedAttention: q, k, v (float), pools, tables, lens (int64), params (float). */
static void paged_v1(void *kernel, void *context) { (void)paged_attention_compute(kernel, context); }
static const char *paged_name(const void *op) { (void)op; return "PagedAttention"; }
static int paged_input(const void *op, size_t index) {
    (void)op;
    return index >= 3 && index <= 5 ? TYPE_INT64 : TYPE_FLOAT;
}
static size_t paged_inputs(const void *op) { (void)op; return 7; }

#define OP(name, input_type, input_count, compute_v1, compute)                                           \
    {16,           create_kernel, name,           op_provider, input_type, input_count, output_type,        \
     output_count, compute_v1,    destroy_kernel, required,    required,   default_memory, one,             \
     one,          one,           one,            create_kernel_v2, compute}

static const CustomOp lora_branch = OP(lora_name, lora_input, lora_inputs, lora_v1, lora_branch_compute);
static const CustomOp paged_attention = OP(paged_name, paged_input, paged_inputs, paged_v1, paged_attention_compute);

/* What SessionOptions.register_custom_ops_library calls. */
__attribute__((visibility("default"))) Status RegisterCustomOps(void *options, const ApiBase *base) {
    ortmux_api = base->GetApi(API_VERSION);
    if (ortmux_api == NULL) return NULL; /* a runtime older than 1.17: the worker checks the version first */
    void *domain = NULL;
    Status status = CALL(CreateCustomOpDomainFn, API_CreateCustomOpDomain)("ortmux", &domain);
    if (status == NULL) status = CALL(CustomOpDomainAddFn, API_CustomOpDomain_Add)(domain, &lora_branch);
    if (status == NULL) status = CALL(CustomOpDomainAddFn, API_CustomOpDomain_Add)(domain, &paged_attention);
    if (status == NULL) status = CALL(AddCustomOpDomainFn, API_AddCustomOpDomain)(options, domain);
    return status;
}
