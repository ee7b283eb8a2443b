// numa-moe's extra buffer type for ggml-cpu (compiled into ggml-cpu by patches/0001).
#pragma once

#include "ggml-backend.h"

#ifdef __cplusplus
extern "C" {
#endif

// numa-moe's buffer type for ggml's standard layout, or NULL when libnuma_moe.so is not in
// the process: ggml-cpu then behaves exactly like stock.
ggml_backend_buffer_type_t ggml_backend_numa_moe_buffer_type(void);

// numa-moe's buffer type for the layouts CPU_REPACK would give (not a host buffer, as
// CPU_REPACK's is not), or NULL without libnuma_moe.so or without CPU_REPACK.
ggml_backend_buffer_type_t ggml_backend_numa_moe_repack_buffer_type(void);

// The buffer types to offer weights to, in order, NULL-terminated (empty without the
// library): the repacked one first when extra buffer types are on (`repack`), then the
// standard one. llama.cpp's loader asks for them through the CPU backend's proc address
// "ggml_backend_numa_moe_buffer_types".
ggml_backend_buffer_type_t * ggml_backend_numa_moe_buffer_types(bool repack);

#ifdef __cplusplus
}
#endif
