// ggml-cpu's extra buffer types (NUMA_MOE_REPACK and NUMA_MOE first when numa-moe attached,
// then CPU_REPACK, ...),
// the list llama.cpp's loader walks. Shared by the C harness and the op benchmark.
#pragma once

#include "ggml-backend.h"

#include <stddef.h>
#include <string.h>

// The NULL-terminated list, or NULL when ggml-cpu has none.
static inline ggml_backend_buffer_type_t * cpu_extra_bufts(void) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_dev_get_extra_bufts_t get =
        (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    return get ? get(dev) : NULL;
}

// The extra buffer type called `name` (NUMA_MOE, NUMA_MOE_REPACK, CPU_REPACK), or NULL.
static inline ggml_backend_buffer_type_t cpu_extra_buft(const char * name) {
    for (ggml_backend_buffer_type_t * b = cpu_extra_bufts(); b && *b; b++) {
        if (strcmp(ggml_backend_buft_name(*b), name) == 0) {
            return *b;
        }
    }
    return NULL;
}
