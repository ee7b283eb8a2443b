// numa-moe's extra buffer type for ggml-cpu (compiled into ggml-cpu by patches/0001).
#pragma once

#include "ggml-backend.h"

#ifdef __cplusplus
extern "C" {
#endif

// numa-moe's buffer type, or NULL when libnuma_moe.so is not in the process: ggml-cpu then
// behaves exactly like stock.
ggml_backend_buffer_type_t ggml_backend_numa_moe_buffer_type(void);

#ifdef __cplusplus
}
#endif
