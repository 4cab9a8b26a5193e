/* What the worker's operators share: the few ONNX Runtime C API entries they use (by their index
 * in the API's append-only table of function pointers, OrtApiBase->GetApi(version); the library
 * links nothing of ONNX Runtime), the custom op descriptor, and the helpers every op uses.
 * tests/unit/test_lora_kernel.py and test_paged_attention.py exercise every entry. */
#ifndef ORTMUX_API_H
#define ORTMUX_API_H

#include <stddef.h>
#include <stdint.h>

#define API_VERSION 17u /* KernelContext_ParallelFor arrived in 17 */

/* Indices into OrtApi (onnxruntime_c_api.h, struct OrtApi, in declaration order). */
enum {
    API_CreateStatus = 0,
    API_CreateCustomOpDomain = 26,
    API_CustomOpDomain_Add = 27,
    API_AddCustomOpDomain = 28,
    API_GetTensorMutableData = 51,
    API_GetDimensionsCount = 61,
    API_GetDimensions = 62,
    API_GetTensorTypeAndShape = 65,
    API_KernelContext_GetInput = 90,
    API_KernelContext_GetOutput = 91,
    API_ReleaseTensorTypeAndShapeInfo = 99,
    API_KernelContext_ParallelFor = 274,
};

typedef void *Status; /* OrtStatus*: NULL is success */
typedef struct {
    const void *const *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} ApiBase;

typedef Status (*CreateStatusFn)(int code, const char *message);
typedef Status (*CreateCustomOpDomainFn)(const char *domain, void **out);
typedef Status (*CustomOpDomainAddFn)(void *domain, const void *op);
typedef Status (*AddCustomOpDomainFn)(void *options, void *domain);
typedef Status (*GetTensorMutableDataFn)(void *value, void **out);
typedef Status (*GetDimensionsCountFn)(const void *info, size_t *out);
typedef Status (*GetDimensionsFn)(const void *info, int64_t *dims, size_t count);
typedef Status (*GetTensorTypeAndShapeFn)(const void *value, void **out);
typedef Status (*GetInputFn)(const void *context, size_t index, const void **out);
typedef Status (*GetOutputFn)(void *context, size_t index, const int64_t *dims, size_t count, void **out);
typedef void (*ReleaseInfoFn)(void *info);
typedef Status (*ParallelForFn)(const void *context, void (*fn)(void *, size_t), size_t total,
                                size_t num_batch, void *data);

extern const void *const *ortmux_api;
#define CALL(type, index) ((type)ortmux_api[index])

enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2, TYPE_FLOAT = 1, TYPE_INT64 = 7, MAX_DIMS = 8 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* An INVALID_ARGUMENT status with ``message``. */
Status fail(const char *message);
/* The words ONNX Runtime's own allocation failures carry ("<op>: Failed to allocate memory"),
 * which the worker answers as RESOURCE_EXHAUSTED. */
Status out_of_memory(const char *op);
/* The dimensions of an input or output value; their count, or -1. */
int64_t shape_of(const void *value, int64_t *dims);

/* The operators' compute functions (KernelComputeV2). */
Status lora_branch_compute(void *kernel, void *context);
Status paged_attention_compute(void *kernel, void *context);

#endif
