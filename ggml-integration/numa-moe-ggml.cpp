// The ggml-cpu side of numa-moe: an extra buffer type in ggml's own pattern (repack.cpp,
// amx/) whose decisions are all forwarded to libnuma_moe.so through its C ABI. It also hands
// the library the ggml and ggml-cpu functions it calls, so the library links no ggml library
// and can be LD_PRELOADed into any patched build. Kept thin on purpose: logic lives in Rust.

#include "numa-moe-ggml.h"

#include "ggml-backend-impl.h"
#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "numa_moe.h"
#include "tiled/tiled.h"
#include "traits.h"

#ifdef GGML_USE_CPU_REPACK
#    include "repack.h"
#endif

#include <dlfcn.h>

namespace numa_moe_ggml {

// The library's entry points: linked (GGML_NUMA_MOE_LINK) or found in the process.
struct library {
    decltype(&numa_moe_ggml_attach)          attach          = nullptr;
    decltype(&numa_moe_ggml_supports_op)     supports_op     = nullptr;
    decltype(&numa_moe_ggml_work_size)       work_size       = nullptr;
    decltype(&numa_moe_ggml_compute_forward) compute_forward = nullptr;
    decltype(&numa_moe_ggml_repack_buffer_type) repack_buffer_type = nullptr;
    decltype(&numa_moe_ggml_count_stock)     count_stock     = nullptr;
};

static library resolve() {
    library lib;
#ifdef GGML_NUMA_MOE_LINKED
    lib.attach          = numa_moe_ggml_attach;
    lib.supports_op     = numa_moe_ggml_supports_op;
    lib.work_size       = numa_moe_ggml_work_size;
    lib.compute_forward = numa_moe_ggml_compute_forward;
    lib.repack_buffer_type = numa_moe_ggml_repack_buffer_type;
    lib.count_stock     = numa_moe_ggml_count_stock;
#else
    lib.attach          = (decltype(lib.attach))          dlsym(RTLD_DEFAULT, "numa_moe_ggml_attach");
    lib.supports_op     = (decltype(lib.supports_op))     dlsym(RTLD_DEFAULT, "numa_moe_ggml_supports_op");
    lib.work_size       = (decltype(lib.work_size))       dlsym(RTLD_DEFAULT, "numa_moe_ggml_work_size");
    lib.compute_forward = (decltype(lib.compute_forward)) dlsym(RTLD_DEFAULT, "numa_moe_ggml_compute_forward");
    lib.repack_buffer_type = (decltype(lib.repack_buffer_type)) dlsym(RTLD_DEFAULT, "numa_moe_ggml_repack_buffer_type");
    lib.count_stock     = (decltype(lib.count_stock))     dlsym(RTLD_DEFAULT, "numa_moe_ggml_count_stock");
    if (!lib.attach || !lib.supports_op || !lib.work_size || !lib.compute_forward || !lib.repack_buffer_type || !lib.count_stock) {
        return {};
    }
#endif
    return lib;
}

static library g_lib;
// numa-moe's two buffer types (set once at attach)
static ggml_backend_buffer_type_t g_standard = nullptr;
static ggml_backend_buffer_type_t g_repacked = nullptr;

// ggml functions handed to the library (ggml objects travel as void *)

static void * buffer_init(void * buft, const void * iface, void * context, size_t size) {
    return ggml_backend_buffer_init((ggml_backend_buffer_type_t) buft, *(const ggml_backend_buffer_i *) iface, context, size);
}

static const void * type_traits(int32_t type) {
    return ggml_get_type_traits((ggml_type) type);
}

static const void * type_traits_cpu(int32_t type) {
    return ggml_get_type_traits_cpu((ggml_type) type);
}

static void barrier(void * threadpool) {
    ggml_barrier((ggml_threadpool *) threadpool);
}

static bool is_numa(void) {
    return ggml_is_numa();
}

static void log_line(int32_t level, const char * text) {
    ggml_log_internal((ggml_log_level) level, "%s", text);
}

static size_t tiled_wdata_size(int32_t n_tasks, const void * dst) {
    return ggml_tiled_wdata_size(n_tasks, (ggml_tensor *) dst);
}

static bool mmid_tiled(const NumaMoeComputeParams * p, void * dst, int64_t expert, int64_t n_rows,
                       const int32_t * expert_rows, char * scratch) {
    const ggml_compute_params params = {
        /* .ith        = */ p->ith,
        /* .nth        = */ p->nth,
        /* .wsize      = */ p->wsize,
        /* .wdata      = */ p->wdata,
        /* .threadpool = */ (ggml_threadpool *) p->threadpool,
        /* .use_ref    = */ p->use_ref,
    };
    return ggml_compute_forward_mul_mat_id_tiled(&params, (ggml_tensor *) dst, expert, n_rows, expert_rows, scratch);
}

// Asks CPU_REPACK the question llama.cpp's loader asks it: would it take these weights?
static bool stock_repacks(const void * op_) {
#ifdef GGML_USE_CPU_REPACK
    const ggml_tensor *        op   = (const ggml_tensor *) op_;
    ggml_backend_buffer_type_t buft = ggml_backend_cpu_repack_buffer_type();
    if (!buft || !buft->context || !op->src[0]) {
        return false;
    }
    ggml_tensor weights = *op->src[0];
    ggml_tensor probe   = *op;
    weights.buffer      = ggml_backend_buft_alloc_buffer(buft, 0);
    weights.data        = nullptr;
    weights.extra       = nullptr;
    probe.src[0]        = &weights;
    const bool taken    = ((ggml::cpu::extra_buffer_type *) buft->context)->supports_op(buft->device, &probe);
    ggml_backend_buffer_free(weights.buffer);
    return taken;
#else
    GGML_UNUSED(op_);
    return false;
#endif
}

#ifdef GGML_USE_CPU_REPACK
// The layout and kernels CPU_REPACK gives these weights on this CPU (ggml's own choice).
static bool repack_layout(const void * weights, NumaMoeRepackLayout * out) {
    ggml_repack_layout l = {};
    if (!ggml_repack_layout_of((const ggml_tensor *) weights, &l)) {
        return false;
    }
    out->nb_cols      = l.nb_cols;
    out->param_type   = l.param_type;
    out->gemv         = l.gemv;
    out->gemm         = l.gemm;
    out->quantize_mat = l.quantize_mat;
    return true;
}

// CPU_REPACK's conversion of `size` bytes at `data` into header->data (header describes them).
static int32_t repack(void * header, const void * data, size_t size) {
    return ggml_repack_tensor((ggml_tensor *) header, data, size);
}

// CPU_REPACK's own traits for weights in our repacked layout: what computes an op the library
// declines (the bytes are CPU_REPACK's, so its kernel is the stock one for them).
static ggml::cpu::tensor_traits * stock_traits(const ggml_tensor * op) {
    ggml_repack_layout l = {};
    return op->src[0] && ggml_repack_layout_of(op->src[0], &l) ? l.traits : nullptr;
}
#else
static ggml::cpu::tensor_traits * stock_traits(const ggml_tensor *) {
    return nullptr;
}
#endif

// What ggml's registered backends offer for pinning host memory: the first backend whose
// proc address "ggml_backend_register_host_buffer" (and its inverse) exists, and a GPU device
// whose backend has none. The registry (ggml_backend_reg_count/get) lives in libggml, which
// links ggml-cpu rather than the other way round, so it is looked up in the process.
static void host_registration(NumaMoeHostRegistration * out) {
    *out = {};
    using reg_count_t = size_t (*)(void);
    using reg_get_t   = ggml_backend_reg_t (*)(size_t);
    auto reg_count    = (reg_count_t) dlsym(RTLD_DEFAULT, "ggml_backend_reg_count");
    auto reg_get      = (reg_get_t) dlsym(RTLD_DEFAULT, "ggml_backend_reg_get");
    for (size_t i = 0; reg_count && reg_get && i < reg_count(); i++) {
        ggml_backend_reg_t reg = reg_get(i);
        auto reg_fn   = (bool (*)(void *, size_t)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_register_host_buffer");
        auto unreg_fn = (void (*)(void *)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_unregister_host_buffer");
        if (reg_fn && unreg_fn) {
            if (!out->register_host) {
                out->register_host   = reg_fn;
                out->unregister_host = unreg_fn;
                out->backend         = ggml_backend_reg_name(reg);
            }
            continue;
        }
        for (size_t d = 0; d < ggml_backend_reg_dev_count(reg) && !out->gpu_without; d++) {
            ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, d);
            const auto         t   = ggml_backend_dev_type(dev);
            if (t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) {
                out->gpu_without = ggml_backend_dev_name(dev);
            }
        }
    }
}

class tensor_traits : public ggml::cpu::tensor_traits {
  public:
    bool repacked = false;

  private:
    bool work_size(int n_threads, const ggml_tensor * op, size_t & size) override {
        if (g_lib.work_size(n_threads, op, &size)) {
            return true;
        }
        auto * stock = repacked ? stock_traits(op) : nullptr;
        return stock && stock->work_size(n_threads, op, size);
    }

    bool compute_forward(ggml_compute_params * params, ggml_tensor * op) override {
        const NumaMoeComputeParams p = {
            /* .ith        = */ params->ith,
            /* .nth        = */ params->nth,
            /* .wsize      = */ params->wsize,
            /* .wdata      = */ params->wdata,
            /* .threadpool = */ params->threadpool,
            /* .use_ref    = */ params->use_ref,
        };
        if (g_lib.compute_forward(&p, op)) {
            return true;
        }
        if (params->ith == 0) {
            g_lib.count_stock(op);
        }
        // declined (alike on every thread): ggml's stock kernel for the layout the bytes have
        auto * stock = repacked ? stock_traits(op) : nullptr;
        return stock && stock->compute_forward(params, op);
    }
};

// Sees the ops numa-moe does not compute that read weights, on thread 0, for the locality
// counters; computes nothing (ggml goes on to the next extra buffer type, then its own kernel).
class counting_traits : public ggml::cpu::tensor_traits {
    bool work_size(int, const ggml_tensor *, size_t &) override { return false; }

    bool compute_forward(ggml_compute_params * params, ggml_tensor * op) override {
        if (params->ith == 0) {
            g_lib.count_stock(op);
        }
        return false;
    }
};

static bool reads_weights(const ggml_tensor * op) {
    return (op->op == GGML_OP_MUL_MAT || op->op == GGML_OP_MUL_MAT_ID || op->op == GGML_OP_GET_ROWS) && op->src[0] &&
           op->src[0]->buffer && ggml_backend_buffer_get_usage(op->src[0]->buffer) == GGML_BACKEND_BUFFER_USAGE_WEIGHTS;
}

// One per buffer type (standard and repacked), each answering for its own buffers only; the
// standard one also counts the weight reads of every other op (`counts`).
class extra_buffer_type : public ggml::cpu::extra_buffer_type {
  public:
    ggml_backend_buffer_type_t buft   = nullptr;
    bool                       counts = false;
    tensor_traits              traits;
    counting_traits            counting;

    bool supports_op(ggml_backend_dev_t, const ggml_tensor * op) override {
        return g_lib.supports_op(op);
    }

    ggml::cpu::tensor_traits * get_tensor_traits(const ggml_tensor * op) override {
        const bool ours = op->src[0] && op->src[0]->buffer && (op->src[0]->buffer->buft == g_standard || op->src[0]->buffer->buft == g_repacked);
        if ((op->op == GGML_OP_MUL_MAT_ID || op->op == GGML_OP_MUL_MAT) && ours) {
            return op->src[0]->buffer->buft == buft ? &traits : nullptr;
        }
        if (counts && !ours && reads_weights(op)) {
            return &counting;
        }
        return nullptr;
    }
};

}  // namespace numa_moe_ggml

namespace numa_moe_ggml {

struct attached {
    ggml_backend_buffer_type_t standard = nullptr;
    ggml_backend_buffer_type_t repacked = nullptr;
};

static const attached & attach() {
    static attached a = []() -> attached {
        g_lib = resolve();
        if (!g_lib.attach) {
            return {};  // library not loaded: stock behaviour
        }
        auto * extra  = new extra_buffer_type();
        auto * extra2 = new extra_buffer_type();
        extra2->traits.repacked = true;

        NumaMoeGgmlApi api       = {};
        api.struct_size          = sizeof(api);
        api.backend_api_version  = GGML_BACKEND_API_VERSION;
        api.cpu_device           = ggml_backend_reg_dev_get(ggml_backend_cpu_reg(), 0);
        api.extra_context        = extra;
        api.extra_context_repack = extra2;
        api.buffer_init          = buffer_init;
        api.get_type_traits      = type_traits;
        api.get_type_traits_cpu  = type_traits_cpu;
        api.barrier              = barrier;
        api.is_numa              = is_numa;
        api.log                  = log_line;
        api.tiled_wdata_size     = tiled_wdata_size;
        api.mmid_tiled           = mmid_tiled;
        api.stock_repacks        = stock_repacks;
        api.host_registration    = host_registration;
#ifdef GGML_USE_CPU_REPACK
        api.repack_layout        = repack_layout;
        api.repack               = repack;
#endif

        attached r;
        r.standard = (ggml_backend_buffer_type_t) g_lib.attach(&api);
        if (!r.standard) {
            delete extra;
            delete extra2;
            return {};
        }
        extra->buft   = r.standard;
        extra->counts = true;
        r.repacked    = (ggml_backend_buffer_type_t) g_lib.repack_buffer_type();
        extra2->buft  = r.repacked;
        g_standard    = r.standard;
        g_repacked    = r.repacked;
        return r;
    }();
    return a;
}

}  // namespace numa_moe_ggml

ggml_backend_buffer_type_t ggml_backend_numa_moe_buffer_type(void) {
    return numa_moe_ggml::attach().standard;
}

ggml_backend_buffer_type_t ggml_backend_numa_moe_repack_buffer_type(void) {
    return numa_moe_ggml::attach().repacked;
}

ggml_backend_buffer_type_t * ggml_backend_numa_moe_buffer_types(bool repack) {
    static ggml_backend_buffer_type_t with_repack[3]    = {};
    static ggml_backend_buffer_type_t without_repack[2] = {};
    static bool                       filled            = [] {
        const auto & a = numa_moe_ggml::attach();
        int          i = 0;
        if (a.repacked) {
            with_repack[i++] = a.repacked;
        }
        with_repack[i]    = a.standard;
        without_repack[0] = a.standard;
        return true;
    }();
    GGML_UNUSED(filled);
    return repack ? with_repack : without_repack;
}
