// The C test harness for numa-moe's ABI (include/numa_moe.h) and its ggml buffer type.
//
// Built with -Wall -Wextra -Werror against the generated header, libnuma_moe.so and the
// patched ggml from `make llama`. Run as `harness [filter ...]`; prints one line per test
// and `N passed, N failed`. The machine it tests on is whatever NUMA_MOE_TOPOLOGY says
// (the Makefile runs it on the host and on described multi-node machines).

#include "numa_moe.h"

#include "cpu_extra_bufts.h"

#include "ggml-alloc.h"
#include "ggml-backend-impl.h"  // a stand-in GPU backend for the pinning test
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef EXPECTED_VERSION
#    error "build with -DEXPECTED_VERSION=\"x.y.z\" (the Cargo.toml version)"
#endif

// ---------------------------------------------------------------------------------------
// framework

static int g_ok;

static void check_failed(const char * file, int line, const char * cond, const char * fmt, ...) {
    fprintf(stderr, "  %s:%d: check failed: %s", file, line, cond);
    if (fmt && *fmt) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, ": ");
        vfprintf(stderr, fmt, ap);
        va_end(ap);
    }
    fprintf(stderr, "\n");
    g_ok = 0;
}

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond)) {                                                    \
            check_failed(__FILE__, __LINE__, #cond, "" __VA_ARGS__);      \
        }                                                                 \
    } while (0)

static char g_err[4096];

static const char * last_error(void) {
    numa_moe_last_error(g_err, sizeof g_err);
    return g_err;
}

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static uint64_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

static float rnd_normal(void) {
    // sum of uniforms: cheap and good enough for weights
    float s = 0;
    for (int i = 0; i < 4; i++) {
        s += (float) (rnd() % 1000000) / 1000000.0f;
    }
    return (s - 2.0f) * 1.7f;
}

static int node_count(void) {
    size_t n = 0;
    numa_moe_topology_node_count(&n);
    return (int) n;
}

// Nodes with memory and CPUs this process may use: where `auto` places (a taskset to one
// node's CPUs makes a multi-node machine one node to it)
static int compute_node_count(void) {
    int c = 0;
    for (int i = 0; i < node_count(); i++) {
        NumaMoeNodeInfo info;
        if (numa_moe_topology_node_info((size_t) i, &info) == NUMA_MOE_RESULT_OK && info.has_memory && info.n_cpus > 0) {
            c++;
        }
    }
    return c;
}

static int topology_is_described(void) {
    const char * t = getenv("NUMA_MOE_TOPOLOGY");
    return t && *t && strcmp(t, "host") != 0;
}

static int binding_forced(void) {
    const char * t = getenv("NUMA_MOE_FORCE_BIND");
    return t && strcmp(t, "1") == 0;
}

// ---------------------------------------------------------------------------------------
// the ABI

static void test_version(void) {
    CHECK(strcmp(numa_moe_version(), EXPECTED_VERSION) == 0, "got %s", numa_moe_version());
}

static void test_result_codes_are_stable(void) {
    CHECK(NUMA_MOE_RESULT_OK == 0);
    CHECK(NUMA_MOE_RESULT_NULL_ARGUMENT == 1);
    CHECK(NUMA_MOE_RESULT_INVALID_ARGUMENT == 2);
    CHECK(NUMA_MOE_RESULT_INVALID_MAP == 3);
    CHECK(NUMA_MOE_RESULT_TOPOLOGY_UNAVAILABLE == 4);
    CHECK(NUMA_MOE_RESULT_NOT_PLACED == 5);
    CHECK(NUMA_MOE_RESULT_SYSTEM_ERROR == 6);
    CHECK(NUMA_MOE_RESULT_BUFFER_TOO_SMALL == 7);
    CHECK(NUMA_MOE_RESULT_OUT_OF_MEMORY == 8);
    CHECK(NUMA_MOE_RESULT_PANIC == 255);
}

static void test_null_arguments(void) {
    NumaMoeResult r = numa_moe_map_check(NULL, 0);
    CHECK(r == NUMA_MOE_RESULT_NULL_ARGUMENT, "got %u", (unsigned) r);
    CHECK(strcmp(last_error(), "map is NULL") == 0, "got '%s'", g_err);
    CHECK(numa_moe_config_set_map(NULL) == NUMA_MOE_RESULT_NULL_ARGUMENT);
    CHECK(numa_moe_topology_node_count(NULL) == NUMA_MOE_RESULT_NULL_ARGUMENT);
    CHECK(strcmp(last_error(), "out is NULL") == 0, "got '%s'", g_err);
    CHECK(numa_moe_topology_node_info(0, NULL) == NUMA_MOE_RESULT_NULL_ARGUMENT);
    NumaMoePageReport rep;
    CHECK(numa_moe_memory_pages_per_node(NULL, 4096, &rep) == NUMA_MOE_RESULT_NULL_ARGUMENT);
    CHECK(numa_moe_memory_pages_per_node((const uint8_t *) &rep, sizeof rep, NULL) == NUMA_MOE_RESULT_NULL_ARGUMENT);
    CHECK(numa_moe_tensor_verify(NULL, &rep) == NUMA_MOE_RESULT_NULL_ARGUMENT);
    size_t n = 0;
    CHECK(numa_moe_map_render(NULL, NULL, 0, &n) == NUMA_MOE_RESULT_NULL_ARGUMENT);
    CHECK(numa_moe_ggml_attach(NULL) == NULL);
    CHECK(numa_moe_ggml_supports_op(NULL) == false);
    CHECK(numa_moe_ggml_work_size(1, NULL, NULL) == false);
    CHECK(numa_moe_ggml_compute_forward(NULL, NULL) == false);
}

static void test_last_error_buffer_convention(void) {
    numa_moe_map_check(NULL, 0);
    size_t need = numa_moe_last_error(NULL, 0);
    CHECK(need == strlen("map is NULL"), "got %zu", need);
    char small[4] = { 'x', 'x', 'x', 'x' };
    CHECK(numa_moe_last_error(small, sizeof small) == need);
    CHECK(memcmp(small, "map", 4) == 0, "truncated copy must end in NUL");
}

static void test_topology_query(void) {
    size_t n = 0;
    CHECK(numa_moe_topology_node_count(&n) == NUMA_MOE_RESULT_OK);
    CHECK(n >= 1);
    int with_memory = 0;
    for (size_t i = 0; i < n; i++) {
        NumaMoeNodeInfo info;
        CHECK(numa_moe_topology_node_info(i, &info) == NUMA_MOE_RESULT_OK);
        with_memory += info.has_memory;
        CHECK(info.has_memory == (info.total_bytes > 0));
    }
    CHECK(with_memory >= 1);
    NumaMoeNodeInfo info;
    CHECK(numa_moe_topology_node_info(n, &info) == NUMA_MOE_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "out of range") != NULL, "got '%s'", g_err);
}

static void test_map_errors_name_the_problem(void) {
    CHECK(numa_moe_map_check("rows", 0) == NUMA_MOE_RESULT_OK, "%s", last_error());
    CHECK(numa_moe_map_check("0-7:0,8-15:9", 0) == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(strstr(last_error(), "node 9 does not exist") != NULL, "got '%s'", g_err);
    CHECK(numa_moe_map_check("0-7:0", 16) == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(strstr(last_error(), "experts 8-15 are not mapped") != NULL, "got '%s'", g_err);
    CHECK(numa_moe_map_check("0-7:0,8-130:0", 128) == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(strstr(last_error(), "expert 128 is beyond the model") != NULL, "got '%s'", g_err);
    CHECK(numa_moe_map_check("0-7:0,8-", 0) == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(strstr(last_error(), "expected an expert number, found the end of the map") != NULL, "got '%s'", g_err);
    CHECK(numa_moe_map_check("", 0) == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(strstr(last_error(), "the expert map is empty") != NULL, "got '%s'", g_err);
    CHECK(numa_moe_config_set_map("bogus") == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(strstr(last_error(), "unknown policy \"bogus\"") != NULL, "got '%s'", g_err);
    // balanced:FILE reads its profile: a missing file is named
    CHECK(numa_moe_map_check("balanced:/nonexistent/p.json", 0) == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(strstr(last_error(), "/nonexistent/p.json") != NULL, "got '%s'", g_err);
}

static void test_map_render(void) {
    char buf[64];
    size_t n = 0;
    CHECK(numa_moe_map_render(" 0 - 7 : 0 ; ", buf, sizeof buf, &n) == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(numa_moe_map_render(" 0 - 3 : 0 , * : 0 ", buf, sizeof buf, &n) == NUMA_MOE_RESULT_OK, "%s", last_error());
    CHECK(strcmp(buf, "0-3:0,*:0") == 0 && n == 9, "got '%s' %zu", buf, n);
    char small[4];
    CHECK(numa_moe_map_render("0-3:0,*:0", small, sizeof small, &n) == NUMA_MOE_RESULT_BUFFER_TOO_SMALL);
    CHECK(n == 9 && strstr(last_error(), "needs 10 bytes") != NULL, "got '%s'", g_err);
}

static void test_pages_per_node(void) {
    size_t len = 64 * 4096;
    uint8_t * p = aligned_alloc(4096, len);
    memset(p, 1, len);
    NumaMoePageReport rep;
    CHECK(numa_moe_memory_pages_per_node(p, len, &rep) == NUMA_MOE_RESULT_OK, "%s", last_error());
    CHECK(rep.resident == 64, "got %" PRIu64, rep.resident);
    uint64_t sum = 0;
    for (int i = 0; i < NUMA_MOE_MAX_NODES; i++) {
        sum += rep.per_node[i];
    }
    CHECK(sum == rep.resident);
    free(p);
}

// ---------------------------------------------------------------------------------------
// the buffer type

// numa-moe's buffer type for ggml's standard layout
static ggml_backend_buffer_type_t numa_moe_buft(void) {
    return cpu_extra_buft("NUMA_MOE");
}

// numa-moe's buffer type for CPU_REPACK's layouts, and CPU_REPACK's own
static ggml_backend_buffer_type_t numa_moe_repack_buft(void) {
    return cpu_extra_buft("NUMA_MOE_REPACK");
}

static ggml_backend_buffer_type_t cpu_repack_buft(void) {
    return cpu_extra_buft("CPU_REPACK");
}

// llama.cpp's loader offers weights to numa-moe's types first: the repacked one, then the
// standard one, ahead of CPU_REPACK (and, through the CPU backend's proc address, ahead of a
// GPU's host buffer and with --no-repack, where only the standard one is offered).
static void test_buffer_types_come_first(void) {
    ggml_backend_buffer_type_t * list = cpu_extra_bufts();
    CHECK(list && list[0] && list[1]);
    if (!list || !list[0] || !list[1]) {
        return;
    }
    CHECK(strcmp(ggml_backend_buft_name(list[0]), "NUMA_MOE_REPACK") == 0, "first extra buffer type is %s", ggml_backend_buft_name(list[0]));
    CHECK(strcmp(ggml_backend_buft_name(list[1]), "NUMA_MOE") == 0, "second extra buffer type is %s", ggml_backend_buft_name(list[1]));
    CHECK(numa_moe_buffer_type() == (void *) list[1]);
    CHECK(numa_moe_ggml_repack_buffer_type() == (void *) list[0]);
    CHECK(ggml_backend_buft_is_host(list[1]), "the standard layout is host memory (a GPU may copy from it)");
    CHECK(!ggml_backend_buft_is_host(list[0]), "repacked layouts are not host memory, as CPU_REPACK's are not");
    CHECK(ggml_backend_buft_get_alignment(list[0]) == 4096 && ggml_backend_buft_get_alignment(list[1]) == 4096);
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    typedef ggml_backend_buffer_type_t * (*types_fn)(bool);
    types_fn types = (types_fn) ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_numa_moe_buffer_types");
    CHECK(types != NULL, "ggml-cpu does not export ggml_backend_numa_moe_buffer_types");
    if (types) {
        ggml_backend_buffer_type_t * on = types(true), * off = types(false);
        CHECK(on[0] == list[0] && on[1] == list[1] && on[2] == NULL, "with extra buffer types: repacked, standard");
        CHECK(off[0] == list[1] && off[1] == NULL, "with --no-repack: the standard type only");
    }
}

struct experts {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf;
    struct ggml_tensor *  w;      // [n_embd, n_ff, n_expert]
    struct ggml_tensor *  plain;  // a 2-D tensor in the same buffer: passes through
};

// Allocates an expert tensor (and a plain one) in `buft` under map `map`.
static int experts_alloc(struct experts * e, ggml_backend_buffer_type_t buft, const char * map, enum ggml_type type,
                         int64_t n_embd, int64_t n_ff, int64_t n_expert) {
    if (map && numa_moe_config_set_map(map) != NUMA_MOE_RESULT_OK) {
        fprintf(stderr, "  set_map(%s): %s\n", map, last_error());
        return 0;
    }
    struct ggml_init_params ip = { 4 * ggml_tensor_overhead(), NULL, true };
    e->ctx   = ggml_init(ip);
    e->w     = ggml_new_tensor_3d(e->ctx, type, n_embd, n_ff, n_expert);
    e->plain = ggml_new_tensor_2d(e->ctx, GGML_TYPE_F32, 17, 3);
    ggml_set_name(e->w, "blk.0.ffn_up_exps.weight");
    ggml_set_name(e->plain, "blk.0.ffn_norm.weight");
    e->buf = ggml_backend_alloc_ctx_tensors_from_buft(e->ctx, buft);
    return e->buf != NULL;
}

static void experts_free(struct experts * e) {
    if (e->buf) {
        ggml_backend_buffer_free(e->buf);
    }
    ggml_free(e->ctx);
    memset(e, 0, sizeof *e);
}

// In guests with a memory-less node (the last one), maps must avoid it: use the first two.
static const char * layout_maps(int i, int nodes) {
    // every slice layout: rows, block, explicit, copies on two nodes, mirror, interleave
    static const char * multi[] = { "rows", "block", "round-robin", "0-2:1,3-5:0,*:1", "0-3:0+1,*:1", "mirror", "interleave", NULL };
    static const char * one[]   = { "rows", "block", "round-robin", "0-2:0,*:0", "0-3:0,*:0", "mirror", "interleave", NULL };
    return nodes > 1 ? multi[i] : one[i];
}

// set/get round trip through every layout, with unaligned writes straddling expert and
// slice boundaries, memset, and verification of page nodes where memory is bound.
static void test_round_trip_every_layout(void) {
    ggml_backend_buffer_type_t buft = numa_moe_buft();
    const int nodes = node_count();
    const int64_t n_embd = 1024, n_ff = 96, n_expert = 8;  // rows of 4 KiB (f32)
    for (int li = 0; layout_maps(li, nodes); li++) {
        const char * map = layout_maps(li, nodes);
        struct experts e;
        if (!experts_alloc(&e, buft, map, GGML_TYPE_F32, n_embd, n_ff, n_expert)) {
            CHECK(0, "allocation under map %s failed", map);
            continue;
        }
        const size_t nb = ggml_nbytes(e.w);
        uint8_t * shadow = calloc(1, nb);
        uint8_t * back   = malloc(nb);
        uint8_t * tmp    = malloc(nb);
        ggml_backend_tensor_memset(e.w, 0, 0, nb);
        for (int k = 0; k < 200; k++) {
            size_t off = rnd() % nb;
            size_t len = 1 + rnd() % (k < 100 ? 9000 : 300000);
            if (off + len > nb) {
                len = nb - off;
            }
            for (size_t i = 0; i < len; i++) {
                tmp[i] = (uint8_t) rnd();
            }
            ggml_backend_tensor_set(e.w, tmp, off, len);
            memcpy(shadow + off, tmp, len);
            if (k % 50 == 0) {
                uint8_t v = (uint8_t) rnd();
                size_t  mo = rnd() % nb, ml = 1 + rnd() % 20000;
                if (mo + ml > nb) {
                    ml = nb - mo;
                }
                ggml_backend_tensor_memset(e.w, v, mo, ml);
                memset(shadow + mo, v, ml);
            }
        }
        ggml_backend_tensor_get(e.w, back, 0, nb);
        CHECK(memcmp(back, shadow, nb) == 0, "map %s: get_tensor differs from what was written", map);
        for (int k = 0; k < 50; k++) {
            size_t off = rnd() % nb, len = 1 + rnd() % 70000;
            if (off + len > nb) {
                len = nb - off;
            }
            ggml_backend_tensor_get(e.w, back, off, len);
            CHECK(memcmp(back, shadow + off, len) == 0, "map %s: window %zu+%zu differs", map, off, len);
        }
        // the plain tensor passes through unchanged and is not "placed"
        float pin[51], pout[51];
        for (int i = 0; i < 51; i++) {
            pin[i] = (float) i * 0.5f;
        }
        ggml_backend_tensor_set(e.plain, pin, 0, sizeof pin);
        ggml_backend_tensor_get(e.plain, pout, 0, sizeof pout);
        CHECK(memcmp(pin, pout, sizeof pin) == 0);
        NumaMoePageReport rep;
        CHECK(numa_moe_tensor_verify(e.plain, &rep) == NUMA_MOE_RESULT_NOT_PLACED, "map %s", map);
        CHECK(strstr(last_error(), "is not a placed expert tensor") != NULL, "got '%s'", g_err);
        if (!topology_is_described()) {
            CHECK(numa_moe_tensor_verify(e.w, &rep) == NUMA_MOE_RESULT_OK, "%s", last_error());
            CHECK(rep.misplaced == 0, "map %s: %" PRIu64 " pages off their planned node", map, rep.misplaced);
            CHECK(rep.resident * 4096 >= nb, "map %s: only %" PRIu64 " pages resident", map, rep.resident);
        }
        free(shadow);
        free(back);
        free(tmp);
        experts_free(&e);
    }
    numa_moe_config_set_map("off");
}

// Many buffers alive at once and freed in a different order (several models in one process).
static void test_alloc_free_cycles(void) {
    ggml_backend_buffer_type_t buft = numa_moe_buft();
    struct experts e[6];
    NumaMoeStats s0, s1;
    numa_moe_stats_get(&s0);
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 6; i++) {
            CHECK(experts_alloc(&e[i], buft, layout_maps(i % 6, node_count()), GGML_TYPE_F16, 256, 64, 8), "%s", last_error());
            float v = (float) (i + round);
            ggml_fp16_t h = ggml_fp32_to_fp16(v);
            for (int64_t j = 0; j < ggml_nelements(e[i].w); j += 97) {
                ggml_backend_tensor_set(e[i].w, &h, j * 2, 2);
            }
        }
        for (int i = 5; i >= 0; i -= 2) {
            experts_free(&e[i]);
        }
        for (int i = 0; i < 6; i += 2) {
            ggml_fp16_t h;
            ggml_backend_tensor_get(e[i].w, &h, 97 * 2, 2);
            CHECK(ggml_fp16_to_fp32(h) == (float) (i + round));
            experts_free(&e[i]);
        }
    }
    numa_moe_stats_get(&s1);
    CHECK(s1.tensors_placed == s0.tensors_placed && s1.bytes_placed == s0.bytes_placed, "freed buffers must release their tensors");
    numa_moe_config_set_map("off");
}

// A map whose node the kernel refuses (a described 2-node machine bound on a 1-node host):
// strict stops the allocation with a message naming tensor, size and node; fallback warns
// and keeps every byte.
static void test_bind_failure_strict_and_fallback(void) {
    if (!binding_forced() || node_count() < 2) {
        printf("  (skipped: needs NUMA_MOE_FORCE_BIND=1 and a described machine with more nodes than the host)\n");
        return;
    }
    ggml_backend_buffer_type_t buft = numa_moe_buft();
    struct experts e;
    CHECK(numa_moe_config_set_strict(true) == NUMA_MOE_RESULT_OK);
    CHECK(!experts_alloc(&e, buft, "0-3:1,*:0", GGML_TYPE_F32, 1024, 16, 8), "strict allocation should fail");
    CHECK(strstr(last_error(), "cannot bind") && strstr(last_error(), "blk.0.ffn_up_exps.weight") &&
              strstr(last_error(), "to node 1") && strstr(last_error(), "mbind failed"),
          "got '%s'", g_err);
    experts_free(&e);
    CHECK(numa_moe_config_set_strict(false) == NUMA_MOE_RESULT_OK);
    CHECK(experts_alloc(&e, buft, "0-3:1,*:0", GGML_TYPE_F32, 1024, 16, 8), "fallback allocation should succeed");
    if (e.buf) {
        size_t    nb = ggml_nbytes(e.w);
        uint8_t * a  = malloc(nb);
        uint8_t * b  = malloc(nb);
        for (size_t i = 0; i < nb; i++) {
            a[i] = (uint8_t) rnd();
        }
        ggml_backend_tensor_set(e.w, a, 0, nb);
        ggml_backend_tensor_get(e.w, b, 0, nb);
        CHECK(memcmp(a, b, nb) == 0, "fallback must keep the data");
        free(a);
        free(b);
    }
    experts_free(&e);
    numa_moe_config_set_map("off");
}

// ---------------------------------------------------------------------------------------
// mul_mat_id: bit-identical to ggml-cpu's stock kernel on a plain CPU buffer

struct mmid_case {
    enum ggml_type type;
    int64_t        n_embd, n_ff, n_expert, n_used, n_tokens;
    int            broadcast;  // src1 has one row per token (gate/up) instead of one per slot (down)
};

static void fill_weights(struct ggml_tensor * w, uint8_t * out) {
    const int64_t n_per_row = w->ne[0];
    const int64_t nrows     = w->ne[1] * w->ne[2];
    float *       src       = malloc(sizeof(float) * n_per_row * nrows);
    for (int64_t i = 0; i < n_per_row * nrows; i++) {
        src[i] = rnd_normal() * 0.1f;
    }
    float * imatrix = NULL;
    if (ggml_quantize_requires_imatrix(w->type)) {
        imatrix = malloc(sizeof(float) * n_per_row);
        for (int64_t i = 0; i < n_per_row; i++) {
            imatrix[i] = 1.0f;
        }
    }
    if (w->type == GGML_TYPE_F32) {
        memcpy(out, src, ggml_nbytes(w));
    } else {
        ggml_quantize_chunk(w->type, src, out, 0, nrows, n_per_row, imatrix);
    }
    free(imatrix);
    free(src);
}

// Computes the graph of `out` (built in `ctx`) on a CPU backend with `n_threads` threads and
// returns a copy of its output (caller frees), or NULL when the compute failed.
static float * compute_output(struct ggml_tensor * out, int n_threads) {
    struct ggml_init_params ip = { ggml_graph_overhead(), NULL, false };
    struct ggml_context *   gctx = ggml_init(ip);
    struct ggml_cgraph *    gf   = ggml_new_graph(gctx);
    ggml_build_forward_expand(gf, out);
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, n_threads);
    float * res = NULL;
    if (ggml_backend_graph_compute(be, gf) == GGML_STATUS_SUCCESS) {
        res = malloc(ggml_nbytes(out));
        memcpy(res, out->data, ggml_nbytes(out));
    }
    ggml_backend_free(be);
    ggml_free(gctx);
    return res;
}

// The index of the first float whose bits differ in two outputs of `bytes` bytes (bytes / 4
// when none does).
static size_t first_difference(const float * a, const float * b, size_t bytes) {
    size_t i = 0;
    while (i < bytes / 4 && memcmp(&a[i], &b[i], 4) == 0) {
        i++;
    }
    return i;
}

// Computes mul_mat_id over the weights already in `e` (caller frees the result).
static float * mmid_over(struct experts * e, const struct mmid_case * c, const float * act, const int32_t * ids, int n_threads) {
    const int64_t ne11 = c->broadcast ? 1 : c->n_used;
    struct ggml_init_params ip = { 64 * 1024 * 1024, NULL, false };
    struct ggml_context * ctx  = ggml_init(ip);
    struct ggml_tensor *  b    = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, c->n_embd, ne11, c->n_tokens);
    struct ggml_tensor *  id   = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, c->n_used, c->n_tokens);
    memcpy(b->data, act, ggml_nbytes(b));
    memcpy(id->data, ids, ggml_nbytes(id));
    float * res = compute_output(ggml_mul_mat_id(ctx, e->w, b, id), n_threads);
    ggml_free(ctx);
    return res;
}

// Runs the op with the weights in `buft`; returns the output (caller frees).
static float * run_mmid(const struct mmid_case * c, ggml_backend_buffer_type_t buft, const uint8_t * wbytes,
                        const float * act, const int32_t * ids, int n_threads, const char * map) {
    struct experts e;
    if (!experts_alloc(&e, buft, map, c->type, c->n_embd, c->n_ff, c->n_expert)) {
        return NULL;
    }
    ggml_backend_tensor_set(e.w, wbytes, 0, ggml_nbytes(e.w));
    NumaMoePageReport rep;
    if (map && !topology_is_described() && numa_moe_tensor_verify(e.w, &rep) == NUMA_MOE_RESULT_OK) {
        CHECK(rep.misplaced == 0, "%s, map %s: %" PRIu64 " pages off their planned node", ggml_backend_buft_name(buft), map, rep.misplaced);
    }
    float * res = mmid_over(&e, c, act, ids, n_threads);
    experts_free(&e);
    return res;
}

// Whether CPU_REPACK gives weights of this type and row count a repacked layout here (ggml's
// own rule: it sets the tensor's traits when the tensor is allocated in its buffer).
static int cpu_repacks(enum ggml_type type, int64_t n_embd, int64_t n_ff) {
    if (!cpu_repack_buft()) {
        return 0;
    }
    struct ggml_init_params ip  = { 2 * ggml_tensor_overhead(), NULL, true };
    struct ggml_context *   ctx = ggml_init(ip);
    struct ggml_tensor *    w   = ggml_new_tensor_3d(ctx, type, n_embd, n_ff, 2);
    ggml_backend_buffer_t   buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, cpu_repack_buft());
    const int               yes = buf && w->extra != NULL;
    if (buf) {
        ggml_backend_buffer_free(buf);
    }
    ggml_free(ctx);
    return yes;
}

// The output of numa-moe's hook with the weights in `got_buft` equals, bit for bit, the output
// of ggml-cpu's stock kernel with them in `ref_buft` (CPU: the standard layout; CPU_REPACK:
// its repacked layouts), for every map and thread count.
static int mmid_identical_in(const struct mmid_case * c, const char * const * maps, const int * threads, ggml_backend_buffer_type_t ref_buft,
                             ggml_backend_buffer_type_t got_buft);

static int mmid_identical(const struct mmid_case * c, const char * const * maps, const int * threads) {
    return mmid_identical_in(c, maps, threads, ggml_backend_cpu_buffer_type(), numa_moe_buft());
}

static int mmid_identical_in(const struct mmid_case * c, const char * const * maps, const int * threads, ggml_backend_buffer_type_t ref_buft,
                             ggml_backend_buffer_type_t got_buft) {
    const int64_t ne11 = c->broadcast ? 1 : c->n_used;
    struct ggml_init_params ip = { ggml_tensor_overhead(), NULL, true };
    struct ggml_context * meta = ggml_init(ip);
    struct ggml_tensor * wt = ggml_new_tensor_3d(meta, c->type, c->n_embd, c->n_ff, c->n_expert);
    uint8_t * wbytes = malloc(ggml_nbytes(wt));
    fill_weights(wt, wbytes);
    float * act = malloc(sizeof(float) * c->n_embd * ne11 * c->n_tokens);
    for (int64_t i = 0; i < c->n_embd * ne11 * c->n_tokens; i++) {
        act[i] = rnd_normal();
    }
    int32_t * ids = malloc(sizeof(int32_t) * c->n_used * c->n_tokens);
    for (int64_t t = 0; t < c->n_tokens; t++) {
        // distinct experts per token, skewed towards low numbers like real routing
        for (int64_t s = 0; s < c->n_used; s++) {
            int32_t x;
            int     dup;
            do {
                x   = (int32_t) ((rnd() % 3 == 0) ? rnd() % 3 : rnd() % c->n_expert);
                dup = 0;
                for (int64_t q = 0; q < s; q++) {
                    dup |= ids[t * c->n_used + q] == x;
                }
            } while (dup);
            ids[t * c->n_used + s] = x;
        }
    }
    const size_t out_bytes = sizeof(float) * c->n_ff * c->n_used * c->n_tokens;
    int ok = 1;
    NumaMoeStats before, after;
    for (int ti = 0; threads[ti]; ti++) {
        float * ref = run_mmid(c, ref_buft, wbytes, act, ids, threads[ti], NULL);
        CHECK(ref != NULL);
        for (int mi = 0; maps[mi] && ref; mi++) {
            numa_moe_stats_get(&before);
            float * got = run_mmid(c, got_buft, wbytes, act, ids, threads[ti], maps[mi]);
            CHECK(got != NULL, "map %s: %s", maps[mi], last_error());
            numa_moe_stats_get(&after);
            // interleave is computed by ggml's own kernel; every other layout by numa-moe's hook
            const int hooked = strcmp(maps[mi], "interleave") != 0;
            CHECK(after.ops_computed - before.ops_computed == (uint64_t) hooked, "map %s: the hook computed %" PRIu64 " ops",
                  maps[mi], after.ops_computed - before.ops_computed);
            CHECK(after.ops_declined == before.ops_declined, "map %s: the hook declined", maps[mi]);
            if (got && memcmp(ref, got, out_bytes) != 0) {
                const size_t i = first_difference(ref, got, out_bytes);
                CHECK(0, "%s %" PRId64 " tokens, %d threads, map %s, %s: output %zu differs from %s's (%g vs %g)", ggml_type_name(c->type),
                      c->n_tokens, threads[ti], maps[mi], ggml_backend_buft_name(got_buft), i, ggml_backend_buft_name(ref_buft), (double) ref[i],
                      (double) got[i]);
                ok = 0;
            }
            free(got);
        }
        free(ref);
    }
    numa_moe_config_set_map("off");
    free(ids);
    free(act);
    free(wbytes);
    ggml_free(meta);
    return ok;
}

static const char * const * compute_maps(void) {
    static const char * multi[] = { "rows", "block", "0-2:1,3-5:0,*:1", "0-3:0+1,*:1", "mirror", "interleave", NULL };
    static const char * one[]   = { "rows", "block", "0-2:0,*:0", "mirror", "interleave", NULL };
    return node_count() > 1 ? multi : one;
}

static const enum ggml_type k_types[] = {
    GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1,   GGML_TYPE_Q5_0,
    GGML_TYPE_Q5_1, GGML_TYPE_Q8_0, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K,   GGML_TYPE_Q5_K,
    GGML_TYPE_Q6_K, GGML_TYPE_IQ2_XS, GGML_TYPE_IQ4_XS, GGML_TYPE_IQ4_NL, GGML_TYPE_MXFP4,
};

static void test_mmid_decode_every_type(void) {
    const int threads[] = { 2, 0 };
    for (size_t i = 0; i < sizeof k_types / sizeof k_types[0]; i++) {
        struct mmid_case c = { k_types[i], 256, 64, 8, 4, 1, 1 };
        mmid_identical(&c, compute_maps(), threads);
    }
}

static void test_mmid_small_batches(void) {
    const int threads[] = { 1, 3, 0 };
    const enum ggml_type types[] = { GGML_TYPE_Q8_0, GGML_TYPE_Q4_K, GGML_TYPE_F16, GGML_TYPE_IQ4_XS };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        for (int64_t n = 2; n <= 16; n += 7) {
            struct mmid_case c = { types[i], 256, 96, 8, 4, n, (int) (n % 2) };
            mmid_identical(&c, compute_maps(), threads);
        }
    }
}

// Prefill: experts receive many rows, so K-quants take ggml's tiled kernel in stock.
static void test_mmid_prefill(void) {
    const int threads[] = { 2, 4, 0 };
    const enum ggml_type types[] = { GGML_TYPE_Q4_K, GGML_TYPE_Q6_K, GGML_TYPE_Q8_0, GGML_TYPE_BF16, GGML_TYPE_MXFP4 };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        struct mmid_case c = { types[i], 256, 160, 8, 4, 512, 1 };
        mmid_identical(&c, compute_maps(), threads);
        struct mmid_case d = { types[i], 256, 160, 8, 4, 64, 0 };
        mmid_identical(&d, compute_maps(), threads);
    }
}

// CPU_REPACK's layouts (q4_0, q4_K, iq4_nl, mxfp4 on x86 with AVX2): numa-moe holds them in
// its repacked buffer type, split on the layout's row groups, and its hook equals CPU_REPACK's
// kernel bit for bit: decode, small batches and prefill, 1-4 threads, every map.
static void test_mmid_repacked_layouts(void) {
    if (!numa_moe_repack_buft() || !cpu_repack_buft()) {
        printf("  (skipped: ggml-cpu has no CPU_REPACK here)\n");
        return;
    }
    const int threads[] = { 1, 2, 3, 4, 0 };
    int       tested    = 0;
    for (size_t i = 0; i < sizeof k_types / sizeof k_types[0]; i++) {
        if (!cpu_repacks(k_types[i], 256, 64)) {
            continue;
        }
        tested++;
        const struct mmid_case cases[] = {
            { k_types[i], 256, 64, 8, 4, 1, 1 },    // decode (gate/up)
            { k_types[i], 256, 96, 8, 4, 9, 0 },    // a small batch (down)
            { k_types[i], 256, 160, 8, 4, 64, 0 },  // prefill
            { k_types[i], 512, 136, 16, 6, 128, 1 },
        };
        for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
            mmid_identical_in(&cases[k], compute_maps(), threads, cpu_repack_buft(), numa_moe_repack_buft());
        }
    }
#if defined(__x86_64__)
    // the x86 rule at the pin: q4_0, q4_K, iq4_nl and mxfp4 with AVX2 (this build's baseline)
    CHECK(tested >= 4, "CPU_REPACK repacks only %d of the tested types here", tested);
#endif
}

// ---------------------------------------------------------------------------------------
// mul_mat over a placed weight matrix (attention, shared experts, dense FFN, output head):
// bit-identical to ggml-cpu's stock kernel (CPU_REPACK's for its layouts)

struct mm_case {
    enum ggml_type type;
    int64_t        n_embd, n_out, n_tokens;
    int64_t        n_head;  // > 1: a stack of per-head matrices (MLA's attn_k_b), activations
                            // [n_embd, n_tokens, n_head] permuted from [n_embd, n_head, n_tokens]
};

// Computes out = W x act with W in `buft` (under `map`, NULL: none), `n_threads` threads; also
// reports how many MUL_MAT ops numa-moe's hook computed. Caller frees the result.
static float * run_mm(const struct mm_case * c, ggml_backend_buffer_type_t buft, const uint8_t * wbytes, const float * act, int n_threads,
                      const char * map, uint64_t * hooked) {
    if (map && numa_moe_config_set_map(map) != NUMA_MOE_RESULT_OK) {
        fprintf(stderr, "  set_map(%s): %s\n", map, last_error());
        return NULL;
    }
    struct ggml_init_params wp = { ggml_tensor_overhead(), NULL, true };
    struct ggml_context *   wctx = ggml_init(wp);
    const int64_t           nh   = c->n_head > 1 ? c->n_head : 1;
    struct ggml_tensor *    w    = ggml_new_tensor_3d(wctx, c->type, c->n_embd, c->n_out, nh);
    ggml_set_name(w, nh > 1 ? "blk.0.attn_k_b.weight" : "blk.0.attn_q.weight");
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft);
    float *               res  = NULL;
    if (wbuf) {
        ggml_backend_buffer_set_usage(wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        ggml_backend_tensor_set(w, wbytes, 0, ggml_nbytes(w));
        NumaMoePageReport rep;
        if (map && !topology_is_described() && numa_moe_tensor_verify(w, &rep) == NUMA_MOE_RESULT_OK) {
            CHECK(rep.misplaced == 0, "map %s: %" PRIu64 " pages of the matrix off their planned node", map, rep.misplaced);
        }
        struct ggml_init_params ip  = { 64 * 1024 * 1024, NULL, false };
        struct ggml_context *   ctx = ggml_init(ip);
        struct ggml_tensor *    b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, c->n_embd, nh, c->n_tokens);
        memcpy(b->data, act, ggml_nbytes(b));
        struct ggml_tensor * out = ggml_mul_mat(ctx, w, nh > 1 ? ggml_permute(ctx, b, 0, 2, 1, 3) : ggml_reshape_2d(ctx, b, c->n_embd, c->n_tokens));
        NumaMoeStats before, after;
        numa_moe_stats_get(&before);
        res = compute_output(out, n_threads);
        numa_moe_stats_get(&after);
        *hooked = after.mm_ops_computed - before.mm_ops_computed;
        ggml_free(ctx);
        ggml_backend_buffer_free(wbuf);
    }
    ggml_free(wctx);
    return res;
}

// Maps that place weight matrices on this machine: where the process computes on one node
// only an explicit dense= rule does (auto leaves them to llama.cpp there).
static const char * const * dense_maps(void) {
    static const char * multi[] = { "rows", "rows;dense=mirror", "off;dense=rows", "block;dense=rows@1", "rows;dense=interleave", NULL };
    static const char * one[]   = { "rows;dense=rows", "off;dense=mirror", "rows;dense=rows@0", "rows;dense=interleave", NULL };
    return compute_node_count() > 1 ? multi : one;
}

// numa-moe's output with the weights in `got_buft` equals ggml's with them in `ref_buft`,
// bit for bit, for every map and thread count; where it should compute the op (standard
// layout: decode, that is one token; repacked layouts: every batch) its hook did.
static void mm_identical(const struct mm_case * c, const int * threads, ggml_backend_buffer_type_t ref_buft, ggml_backend_buffer_type_t got_buft,
                         int repacked) {
    struct ggml_init_params ip   = { ggml_tensor_overhead(), NULL, true };
    struct ggml_context *   meta = ggml_init(ip);
    const int64_t           nh   = c->n_head > 1 ? c->n_head : 1;
    struct ggml_tensor *    wt   = ggml_new_tensor_3d(meta, c->type, c->n_embd, c->n_out, nh);
    uint8_t *               wbytes = malloc(ggml_nbytes(wt));
    fill_weights(wt, wbytes);
    float * act = malloc(sizeof(float) * c->n_embd * c->n_tokens * nh);
    for (int64_t i = 0; i < c->n_embd * c->n_tokens * nh; i++) {
        act[i] = rnd_normal();
    }
    const size_t out_bytes = sizeof(float) * c->n_out * c->n_tokens * nh;
    const char * const * maps = dense_maps();
    for (int ti = 0; threads[ti]; ti++) {
        uint64_t hooked = 0;
        numa_moe_config_set_map("off");
        float * ref = run_mm(c, ref_buft, wbytes, act, threads[ti], NULL, &hooked);
        CHECK(ref != NULL);
        for (int mi = 0; maps[mi] && ref; mi++) {
            float * got = run_mm(c, got_buft, wbytes, act, threads[ti], maps[mi], &hooked);
            CHECK(got != NULL, "map %s: %s", maps[mi], last_error());
            const int want = strstr(maps[mi], "interleave") == NULL && (repacked || c->n_tokens == 1);
            CHECK(hooked == (uint64_t) want, "%s %" PRId64 " tokens, map %s: the hook computed %" PRIu64 " MUL_MAT ops, expected %d",
                  ggml_type_name(c->type), c->n_tokens, maps[mi], hooked, want);
            if (got && memcmp(ref, got, out_bytes) != 0) {
                const size_t i = first_difference(ref, got, out_bytes);
                CHECK(0, "%s %" PRId64 "x%" PRId64 ", %" PRId64 " tokens, %d threads, map %s, %s: output %zu differs from %s's (%g vs %g)",
                      ggml_type_name(c->type), c->n_out, c->n_embd, c->n_tokens, threads[ti], maps[mi], ggml_backend_buft_name(got_buft), i,
                      ggml_backend_buft_name(ref_buft), (double) ref[i], (double) got[i]);
            }
            free(got);
        }
        free(ref);
    }
    numa_moe_config_set_map("off");
    free(act);
    free(wbytes);
    ggml_free(meta);
}

// Every type in the standard layout against ggml-cpu's kernel, decode and batches (which stock
// computes with llamafile's sgemm or the tiled kernel: numa-moe leaves those to it).
static void test_mm_every_type(void) {
    const int threads[] = { 1, 2, 3, 4, 0 };
    for (size_t i = 0; i < sizeof k_types / sizeof k_types[0]; i++) {
        const struct mm_case cases[] = {
            { k_types[i], 512, 200, 1, 0 },
            { k_types[i], 256, 64, 1, 0 },
            { k_types[i], 256, 96, 9, 0 },
        };
        for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
            mm_identical(&cases[k], threads, ggml_backend_cpu_buffer_type(), numa_moe_buft(), 0);
        }
    }
}

// MLA's per-head matrices (attn_k_b, attn_v_b): one batched MUL_MAT over a stack of heads,
// with permuted activations, as deepseek2's graph multiplies them; every head's rows split.
static void test_mm_per_head_stacks(void) {
    const int threads[] = { 1, 2, 3, 4, 0 };
    const enum ggml_type types[] = { GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_F32, GGML_TYPE_Q4_0 };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        const struct mm_case cases[] = { { types[i], 128, 64, 1, 8 }, { types[i], 64, 96, 1, 5 }, { types[i], 128, 64, 7, 4 } };
        for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
            mm_identical(&cases[k], threads, ggml_backend_cpu_buffer_type(), numa_moe_buft(), 0);
        }
    }
}

// CPU_REPACK's layouts: numa-moe's repacked type against CPU_REPACK, decode, batches of
// fewer than four rows, gemm's four-row groups with a tail, and prefill.
static void test_mm_repacked_layouts(void) {
    if (!numa_moe_repack_buft() || !cpu_repack_buft()) {
        printf("  (skipped: ggml-cpu has no CPU_REPACK here)\n");
        return;
    }
    const int threads[] = { 1, 2, 3, 4, 0 };
    for (size_t i = 0; i < sizeof k_types / sizeof k_types[0]; i++) {
        if (!cpu_repacks(k_types[i], 256, 64)) {
            continue;
        }
        const struct mm_case cases[] = {
            { k_types[i], 256, 64, 1, 0 }, { k_types[i], 512, 136, 3, 0 }, { k_types[i], 256, 96, 9, 0 }, { k_types[i], 512, 256, 64, 0 },
        };
        for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
            mm_identical(&cases[k], threads, cpu_repack_buft(), numa_moe_repack_buft(), 1);
        }
    }
}

// The locality counters: a decoded token's weight reads are all node-local under rows, and
// counted once per op; ops left to ggml-cpu count as left to llama.cpp.
static void test_locality_counters(void) {
    const struct mm_case c = { GGML_TYPE_Q8_0, 512, 256, 1, 0 };
    struct ggml_init_params ip   = { ggml_tensor_overhead(), NULL, true };
    struct ggml_context *   meta = ggml_init(ip);
    struct ggml_tensor *    wt   = ggml_new_tensor_2d(meta, c.type, c.n_embd, c.n_out);
    uint8_t *               wbytes = malloc(ggml_nbytes(wt));
    fill_weights(wt, wbytes);
    float * act = calloc((size_t) c.n_embd, sizeof(float));
    const char * map = compute_node_count() > 1 ? "rows" : "rows;dense=rows";
    uint64_t hooked = 0;
    NumaMoeLocality l0, l1;
    CHECK(numa_moe_locality_reset() == NUMA_MOE_RESULT_OK);
    // a thread on every node, so nothing is read across: the main thread (ith 0) is not pinned
    // and may share a node with a worker, so twice as many threads as nodes on big machines
    const int n = compute_node_count() > 2 ? 2 * compute_node_count() : 3;
    free(run_mm(&c, numa_moe_buft(), wbytes, act, n, map, &hooked));
    CHECK(numa_moe_locality_get(&l0) == NUMA_MOE_RESULT_OK);
    CHECK(l0.local_bytes == ggml_nbytes(wt), "local %" PRIu64 " of %zu bytes", l0.local_bytes, ggml_nbytes(wt));
    CHECK(l0.remote_bytes == 0 && l0.stock_bytes == 0, "remote %" PRIu64 ", stock %" PRIu64, l0.remote_bytes, l0.stock_bytes);
    CHECK(l0.local_by_category[1] == ggml_nbytes(wt), "attention's share: %" PRIu64, l0.local_by_category[1]);
    // the same op on a plain CPU buffer of weights: ggml's kernel, counted as left to llama.cpp
    free(run_mm(&c, ggml_backend_cpu_buffer_type(), wbytes, act, n, "off", &hooked));
    CHECK(numa_moe_locality_get(&l1) == NUMA_MOE_RESULT_OK);
    CHECK(l1.stock_bytes - l0.stock_bytes == ggml_nbytes(wt) && l1.local_bytes == l0.local_bytes, "stock %" PRIu64, l1.stock_bytes);
    CHECK(numa_moe_locality_get(NULL) == NUMA_MOE_RESULT_NULL_ARGUMENT);
    numa_moe_config_set_map("off");
    free(act);
    free(wbytes);
    ggml_free(meta);
}

// Writes into the repacked buffer type: CPU_REPACK itself takes only whole tensors (and
// aborts otherwise); numa-moe converts any write of whole row groups, in pieces, and refuses
// others with an error naming the tensor instead of aborting.
static void test_repacked_writes(void) {
    if (!numa_moe_repack_buft() || !cpu_repacks(GGML_TYPE_Q4_K, 256, 64)) {
        printf("  (skipped: ggml-cpu does not repack q4_K here)\n");
        return;
    }
    const struct mmid_case c = { GGML_TYPE_Q4_K, 256, 64, 8, 4, 3, 1 };
    struct experts         e;
    CHECK(experts_alloc(&e, numa_moe_repack_buft(), "rows", c.type, c.n_embd, c.n_ff, c.n_expert), "%s", last_error());
    if (!e.buf) {
        return;
    }
    const size_t nb = ggml_nbytes(e.w), group = 8 * e.w->nb[1];
    uint8_t *    w  = malloc(nb);
    fill_weights(e.w, w);
    // a write that is not whole 8-row groups: refused with the reason, nothing aborts
    numa_moe_config_set_map(NULL);  // a known last error, to see it replaced
    ggml_backend_tensor_set(e.w, w, 0, group / 2);
    CHECK(strstr(last_error(), "blk.0.ffn_up_exps.weight") && strstr(last_error(), "whole 8-row groups"), "got '%s'", g_err);
    // three pieces on group boundaries (one straddling an expert boundary) equal one whole write
    const size_t cut1 = 3 * group, cut2 = nb - 5 * group;
    ggml_backend_tensor_set(e.w, w, 0, cut1);
    ggml_backend_tensor_set(e.w, w + cut1, cut1, cut2 - cut1);
    ggml_backend_tensor_set(e.w, w + cut2, cut2, nb - cut2);
    float * act = malloc(sizeof(float) * c.n_embd * c.n_tokens);
    for (int64_t i = 0; i < c.n_embd * c.n_tokens; i++) {
        act[i] = rnd_normal();
    }
    const int32_t ids[] = { 0, 3, 5, 7, 1, 2, 6, 4, 7, 0, 2, 5 };
    float *       got   = mmid_over(&e, &c, act, ids, 2);
    float *       ref   = run_mmid(&c, cpu_repack_buft(), w, act, ids, 2, NULL);
    CHECK(got && ref && memcmp(got, ref, sizeof(float) * c.n_ff * c.n_used * c.n_tokens) == 0, "pieces differ from CPU_REPACK's whole write");
    free(got);
    free(ref);
    free(act);
    free(w);
    experts_free(&e);
    numa_moe_config_set_map("off");
}

// ---------------------------------------------------------------------------------------
// environment faults: NUMA syscalls the kernel refuses (tests/c/fault_shim.c, preloaded with
// NUMA_MOE_FAULT="call=ERRNO,...") and a machine whose topology cannot be read. Each runs
// alone in its own process (scripts/test.sh), since numa-moe warns once per process.

static int g_warnings;  // numa-moe warnings and errors the log callback has seen
static int g_errors;

// defined by fault_shim.so when it is preloaded
extern unsigned long numa_moe_fault_hits(const char * name) __attribute__((weak));

// The errno text numa-moe reports for `call` under NUMA_MOE_FAULT, or NULL if not refused.
static const char * refused(const char * spec, const char * call) {
    char key[32];
    snprintf(key, sizeof key, "%s=", call);
    const char * at = strstr(spec, key);
    if (!at || (at != spec && at[-1] != ',')) {
        return NULL;
    }
    at += strlen(key);
    return strncmp(at, "EPERM", 5) == 0  ? "Operation not permitted (errno 1)" :
           strncmp(at, "ENOSYS", 6) == 0 ? "Function not implemented (errno 38)" :
                                           "(another errno)";
}

// What the user sees when NUMA syscalls are refused: strict stops the load with one message
// naming the tensor and the kernel's error; fallback loads with one warning in all and
// computes the same bits as ggml's stock kernel.
static void test_fault_syscalls(void) {
    const char * spec = getenv("NUMA_MOE_FAULT");
    if (!spec || !*spec) {
        printf("  (skipped: runs under tests/c/fault_shim.so with NUMA_MOE_FAULT set)\n");
        return;
    }
    CHECK(numa_moe_fault_hits != NULL, "NUMA_MOE_FAULT is set but fault_shim.so is not preloaded");
    if (!numa_moe_fault_hits) {
        return;
    }
    const int warnings0 = g_warnings, errors0 = g_errors;
    const char * mbind = refused(spec, "mbind");
    const char * pages = refused(spec, "move_pages");
    const char * map   = node_count() > 1 ? "rows" : "0-3:0,*:0";
    ggml_backend_buffer_type_t buft = numa_moe_buft();
    struct experts e;

    CHECK(numa_moe_config_set_strict(true) == NUMA_MOE_RESULT_OK);
    int loaded = experts_alloc(&e, buft, map, GGML_TYPE_F32, 1024, 16, 8);
    if (mbind) {
        CHECK(!loaded, "strict: the load must stop when mbind is refused");
        CHECK(strstr(last_error(), "cannot bind") && strstr(last_error(), "blk.0.ffn_up_exps.weight") &&
                  strstr(last_error(), "mbind failed: ") && strstr(last_error(), mbind),
              "got '%s'", g_err);
        CHECK(g_errors - errors0 == 1, "strict: %d error messages, want one", g_errors - errors0);
        CHECK(numa_moe_fault_hits("mbind") > 0);
    } else {
        CHECK(loaded, "strict: nothing stops placement when only %s is refused: %s", spec, last_error());
        CHECK(g_errors == errors0, "%d error messages", g_errors - errors0);
    }
    experts_free(&e);
    CHECK(numa_moe_config_set_strict(false) == NUMA_MOE_RESULT_OK);

    // fallback: the load succeeds and every output bit is stock's, under every layout
    const int threads[] = { 2, 0 };
    const enum ggml_type types[] = { GGML_TYPE_F16, GGML_TYPE_Q4_K };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        struct mmid_case c = { types[i], 256, 64, 8, 4, 3, 1 };
        mmid_identical(&c, compute_maps(), threads);
    }
    if (!mbind && !pages) {
        // nothing numa-moe needs was refused: placement is bound and verified as usual
        CHECK(experts_alloc(&e, buft, map, GGML_TYPE_F32, 1024, 16, 8), "%s", last_error());
        NumaMoePageReport rep;
        ggml_backend_tensor_memset(e.w, 1, 0, ggml_nbytes(e.w));
        CHECK(numa_moe_tensor_verify(e.w, &rep) == NUMA_MOE_RESULT_OK, "%s", last_error());
        CHECK(rep.resident * 4096 >= ggml_nbytes(e.w) && rep.misplaced == 0, "%" PRIu64 " resident, %" PRIu64 " misplaced",
              rep.resident, rep.misplaced);
        experts_free(&e);
        numa_moe_config_set_map("off");
    }
    if (pages) {
        CHECK(numa_moe_fault_hits("move_pages") > 0);
    }
    // one warning for the whole process, not one per tensor or buffer; none when nothing
    // numa-moe relies on was refused
    const int want = (mbind || pages) ? 1 : 0;
    CHECK(g_warnings - warnings0 == want, "%d warnings, want %d", g_warnings - warnings0, want);
}

// NUMA_MOE_TOPOLOGY names a broken XML file: `off` and `auto` still work (llama.cpp's own
// path, same bits), other maps are refused with the detection error, nothing warns per call.
static void test_fault_topology(void) {
    const char * topo = getenv("NUMA_MOE_TOPOLOGY");
    if (!getenv("HARNESS_TOPOLOGY_BROKEN") || !topo) {
        printf("  (skipped: needs HARNESS_TOPOLOGY_BROKEN=1 and NUMA_MOE_TOPOLOGY naming a broken file)\n");
        return;
    }
    CHECK(numa_moe_config_set_map("rows") == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(strstr(last_error(), "topology could not be read") && strstr(last_error(), topo), "got '%s'", g_err);
    CHECK(numa_moe_config_set_map("0-3:0,*:0") == NUMA_MOE_RESULT_INVALID_MAP);
    CHECK(numa_moe_config_set_map("auto") == NUMA_MOE_RESULT_OK, "%s", last_error());
    CHECK(numa_moe_config_set_map("off") == NUMA_MOE_RESULT_OK, "%s", last_error());
    CHECK(node_count() == 1);
    const char * maps[] = { "off", "auto" };
    for (int m = 0; m < 2; m++) {
        struct mmid_case c = { GGML_TYPE_Q8_0, 256, 64, 8, 4, 5, 1 };
        struct ggml_init_params ip = { ggml_tensor_overhead(), NULL, true };
        struct ggml_context * meta = ggml_init(ip);
        struct ggml_tensor * wt = ggml_new_tensor_3d(meta, c.type, c.n_embd, c.n_ff, c.n_expert);
        uint8_t * w = malloc(ggml_nbytes(wt));
        fill_weights(wt, w);
        float * act = malloc(sizeof(float) * c.n_embd * c.n_tokens);
        for (int64_t i = 0; i < c.n_embd * c.n_tokens; i++) {
            act[i] = rnd_normal();
        }
        int32_t ids[4 * 5];  // token t uses experts 2s + t%2, s = 0..3
        for (int i = 0; i < 4 * 5; i++) {
            ids[i] = (int32_t) ((i % 4) * 2 + (i / 4) % 2);
        }
        NumaMoeStats before, after;
        numa_moe_stats_get(&before);
        float * ref = run_mmid(&c, ggml_backend_cpu_buffer_type(), w, act, ids, 2, NULL);
        float * got = run_mmid(&c, numa_moe_buft(), w, act, ids, 2, maps[m]);
        numa_moe_stats_get(&after);
        CHECK(ref && got, "map %s: %s", maps[m], last_error());
        CHECK(ref && got && memcmp(ref, got, sizeof(float) * c.n_ff * c.n_used * c.n_tokens) == 0, "map %s: outputs differ", maps[m]);
        CHECK(after.tensors_placed == 0 && after.ops_computed == before.ops_computed, "map %s placed or computed something", maps[m]);
        free(ref);
        free(got);
        free(act);
        free(w);
        ggml_free(meta);
    }
    // the one warning about the topology comes when ggml-cpu registers, before main() sets this
    // log callback (scripts/test.sh counts it on stderr); nothing after it warns again
    CHECK(g_warnings == 0 && g_errors == 0, "%d warnings and %d errors after start-up", g_warnings, g_errors);
}

// ---------------------------------------------------------------------------------------
// inside a QEMU NUMA guest (tests/numa-vm): NUMA_VM_EXPECT describes what QEMU was told,
// "id:cpus:mib:d0,d1,...;..." per node

struct expect_node {
    int      id, n_cpus, mib;
    int      dist[16];
};

static int parse_expect(struct expect_node * out, int max) {
    const char * e = getenv("NUMA_VM_EXPECT");
    if (!e || !*e) {
        return -1;
    }
    int n = 0;
    while (*e && n < max) {
        struct expect_node * x = &out[n];
        memset(x, 0, sizeof *x);
        char cpus[64] = { 0 }, dist[128] = { 0 };
        if (sscanf(e, "%d:%63[^:]:%d:%127[^;]", &x->id, cpus, &x->mib, dist) != 4) {
            return -2;
        }
        // count CPUs in a list like 0-1,4
        for (char * tok = strtok(cpus, ","); tok; tok = strtok(NULL, ",")) {
            int a, b;
            if (sscanf(tok, "%d-%d", &a, &b) == 2) {
                x->n_cpus += b - a + 1;
            } else {
                x->n_cpus += 1;
            }
        }
        int k = 0;
        for (char * tok = strtok(dist, ","); tok && k < 16; tok = strtok(NULL, ",")) {
            x->dist[k++] = atoi(tok);
        }
        n++;
        e = strchr(e, ';');
        if (!e) {
            break;
        }
        e++;
    }
    return n;
}

static int in_guest(void) {
    if (!getenv("NUMA_VM_EXPECT")) {
        printf("  (skipped: runs inside the QEMU NUMA guests, tests/numa-vm)\n");
        return 0;
    }
    return 1;
}

static void test_numa_topology_matches_the_machine(void) {
    struct expect_node ex[16];
    if (!in_guest()) {
        return;
    }
    int n = parse_expect(ex, 16);
    CHECK(n == node_count(), "QEMU was told %d nodes, numa-moe sees %d", n, node_count());
    const char * restricted = getenv("HARNESS_CPUS_RESTRICTED");
    for (int i = 0; i < n && i < node_count(); i++) {
        NumaMoeNodeInfo info;
        CHECK(numa_moe_topology_node_info((size_t) i, &info) == NUMA_MOE_RESULT_OK);
        CHECK((int) info.id == ex[i].id, "node %d is %u", ex[i].id, info.id);
        if (!restricted) {
            CHECK((int) info.n_cpus == ex[i].n_cpus, "node %d: %u cpus, QEMU gave %d", ex[i].id, info.n_cpus, ex[i].n_cpus);
        }
        CHECK(info.has_memory == (ex[i].mib > 0), "node %d: has_memory %d, QEMU gave %d MiB", ex[i].id, info.has_memory, ex[i].mib);
        if (ex[i].mib > 0) {
            uint64_t mib = info.total_bytes >> 20;
            CHECK(mib <= (uint64_t) ex[i].mib && mib >= (uint64_t) ex[i].mib / 2, "node %d: %" PRIu64 " MiB, QEMU gave %d",
                  ex[i].id, mib, ex[i].mib);
        }
        for (int j = 0; j < n; j++) {
            uint32_t d = 0;
            CHECK(numa_moe_topology_distance((size_t) i, (size_t) j, &d) == NUMA_MOE_RESULT_OK);
            CHECK((int) d == ex[i].dist[j], "distance %d->%d is %u, QEMU gave %d", i, j, d, ex[i].dist[j]);
        }
    }
}

static void test_numa_bad_maps_name_absent_and_memoryless_nodes(void) {
    struct expect_node ex[16];
    if (!in_guest()) {
        return;
    }
    int n = parse_expect(ex, 16);
    char map[64];
    snprintf(map, sizeof map, "0:%d,*:0", n + 3);
    CHECK(numa_moe_config_set_map(map) == NUMA_MOE_RESULT_INVALID_MAP);
    char want[64];
    snprintf(want, sizeof want, "node %d does not exist", n + 3);
    CHECK(strstr(last_error(), want) != NULL, "got '%s'", g_err);
    for (int i = 0; i < n; i++) {
        if (ex[i].mib == 0) {
            snprintf(map, sizeof map, "rows@0,%d", ex[i].id);
            CHECK(numa_moe_config_set_map(map) == NUMA_MOE_RESULT_INVALID_MAP);
            snprintf(want, sizeof want, "node %d has no memory", ex[i].id);
            CHECK(strstr(last_error(), want) != NULL, "got '%s'", g_err);
        }
    }
    numa_moe_config_set_map("off");
}

// A node too small for what the map puts on it: strict stops with the node and the shortfall;
// fallback warns, places what fits there (preferred policy) and keeps every byte.
static void test_numa_node_out_of_memory(void) {
    struct expect_node ex[16];
    if (!in_guest()) {
        return;
    }
    int n = parse_expect(ex, 16), small = -1;
    for (int i = 0; i < n; i++) {
        if (ex[i].mib > 0 && ex[i].mib <= 256 && (small < 0 || ex[i].mib < ex[small].mib)) {
            small = i;
        }
    }
    if (small < 0) {
        printf("  (skipped: no node of 256 MiB or less in this scenario)\n");
        return;
    }
    ggml_backend_buffer_type_t buft = numa_moe_buft();
    // experts of 1 MiB each, 1.5x the node's memory in all
    const int64_t n_expert = ex[small].mib * 3 / 2;
    char map[64];
    snprintf(map, sizeof map, "*:%d", ex[small].id);
    struct experts e;
    CHECK(numa_moe_config_set_strict(true) == NUMA_MOE_RESULT_OK);
    CHECK(!experts_alloc(&e, buft, map, GGML_TYPE_F32, 1024, 256, n_expert), "strict allocation should fail");
    char want[96];
    snprintf(want, sizeof want, "cannot place blk.0.ffn_up_exps.weight on node %d", ex[small].id);
    CHECK(strstr(last_error(), want) && strstr(last_error(), "short)"), "got '%s'", g_err);
    experts_free(&e);
    CHECK(numa_moe_config_set_strict(false) == NUMA_MOE_RESULT_OK);
    CHECK(experts_alloc(&e, buft, map, GGML_TYPE_F32, 1024, 256, n_expert), "fallback allocation should succeed: %s", last_error());
    if (e.buf) {
        const size_t chunk = 1 << 20;
        uint8_t *    a     = malloc(chunk);
        uint8_t *    b     = malloc(chunk);
        for (int64_t x = 0; x < n_expert; x++) {
            memset(a, (int) (x * 7 + 1), chunk);
            ggml_backend_tensor_set(e.w, a, (size_t) x * chunk, chunk);
        }
        int ok = 1;
        for (int64_t x = 0; x < n_expert && ok; x++) {
            memset(a, (int) (x * 7 + 1), chunk);
            ggml_backend_tensor_get(e.w, b, (size_t) x * chunk, chunk);
            ok = memcmp(a, b, chunk) == 0;
        }
        CHECK(ok, "fallback must keep every byte");
        NumaMoePageReport rep;
        CHECK(numa_moe_tensor_verify(e.w, &rep) == NUMA_MOE_RESULT_OK);
        CHECK(rep.per_node[ex[small].id] > 0, "the small node should still hold what fits");
        CHECK(rep.resident > rep.per_node[ex[small].id], "the rest spills to other nodes");
        free(a);
        free(b);
    }
    experts_free(&e);
    numa_moe_config_set_map("off");
}

// After the mul_mat_id tests: every worker numa-moe pinned ran on its planned node.
static void test_numa_workers_run_on_their_node(void) {
    if (!in_guest()) {
        return;
    }
    NumaMoeStats st;
    CHECK(numa_moe_stats_get(&st) == NUMA_MOE_RESULT_OK);
    int with_cpus = 0;
    for (int i = 0; i < node_count(); i++) {
        NumaMoeNodeInfo info;
        numa_moe_topology_node_info((size_t) i, &info);
        with_cpus += info.n_cpus > 0 && info.has_memory;
    }
    if (with_cpus > 1) {
        CHECK(st.workers_checked > 0, "no worker was checked: did the mul_mat_id tests run?");
    }
    CHECK(st.workers_off_node == 0, "%" PRIu64 " of %" PRIu64 " worker checks found a thread off its node", st.workers_off_node,
          st.workers_checked);
    printf("  %" PRIu64 " worker checks, %" PRIu64 " off their node\n", st.workers_checked, st.workers_off_node);
}

// ---------------------------------------------------------------------------------------
// replicas (mirror, a+b copies): every byte reaches every copy, whichever way it was written

static void test_replicas_cover_every_write(void) {
    if (node_count() < 2) {
        printf("  one node: no replicas to test\n");
        return;
    }
    // every token routed to every expert, so every copy's rows are read
    const struct mmid_case c = { GGML_TYPE_F32, 64, 96, 8, 8, 4, 1 };
    struct experts e;
    static const char * maps[] = { "mirror", "0-3:0+1,*:1", NULL };
    const int64_t ne11 = 1;
    float *   act = malloc(sizeof(float) * c.n_embd * ne11 * c.n_tokens);
    int32_t * ids = malloc(sizeof(int32_t) * c.n_used * c.n_tokens);
    for (int64_t i = 0; i < c.n_embd * ne11 * c.n_tokens; i++) {
        act[i] = rnd_normal();
    }
    for (int64_t t = 0; t < c.n_tokens; t++) {
        for (int64_t s = 0; s < c.n_used; s++) {
            ids[t * c.n_used + s] = (int32_t) ((s + t) % c.n_expert);
        }
    }
    for (int mi = 0; maps[mi]; mi++) {
        if (!experts_alloc(&e, numa_moe_buft(), maps[mi], c.type, c.n_embd, c.n_ff, c.n_expert)) {
            CHECK(0, "map %s: %s", maps[mi], last_error());
            continue;
        }
        const size_t n = ggml_nbytes(e.w);
        // bytes placed beyond the tensor itself are its copies; none where the map gives
        // every expert one node with threads (e.g. under taskset on one node)
        NumaMoeStats st;
        numa_moe_stats_get(&st);
        const int has_copies = st.bytes_placed > n;
        if (!has_copies) {
            printf("  map %s: one copy here, nothing to test\n", maps[mi]);
            experts_free(&e);
            continue;
        }
        uint8_t *    w1 = malloc(n);
        uint8_t *    w2 = malloc(n);
        fill_weights(e.w, w1);
        fill_weights(e.w, w2);
        // The first half through set_tensor, twice (a byte count would call the tensor
        // written), the second half straight into tensor data, as llama.cpp's loader does
        // without mmap. The first compute must bring every copy up to date.
        ggml_backend_tensor_set(e.w, w1, 0, n / 2);
        ggml_backend_tensor_set(e.w, w1, 0, n / 2);
        memcpy((uint8_t *) e.w->data + n / 2, w1 + n / 2, n - n / 2);
        struct experts ref;
        CHECK(experts_alloc(&ref, ggml_backend_cpu_buffer_type(), NULL, c.type, c.n_embd, c.n_ff, c.n_expert));
        ggml_backend_tensor_set(ref.w, w1, 0, n);
        float *      want = mmid_over(&ref, &c, act, ids, 2);
        float *      got  = mmid_over(&e, &c, act, ids, 2);
        const size_t ob   = sizeof(float) * c.n_ff * c.n_used * c.n_tokens;
        CHECK(want && got && memcmp(want, got, ob) == 0, "map %s: a copy missed bytes written straight into tensor data", maps[mi]);
        NumaMoePageReport r;
        CHECK(numa_moe_tensor_verify(e.w, &r) == NUMA_MOE_RESULT_OK, "%s", last_error());
        CHECK(r.stale_replica_bytes == 0, "map %s: %" PRIu64 " stale bytes after the first compute", maps[mi], r.stale_replica_bytes);
        free(got);
        free(want);

        // A direct write after the first compute is detected, and refresh repairs it.
        memcpy(e.w->data, w2, n);
        CHECK(numa_moe_tensor_verify(e.w, &r) == NUMA_MOE_RESULT_OK, "%s", last_error());
        CHECK(r.stale_replica_bytes > 0, "map %s: a direct write after the first compute went undetected", maps[mi]);
        CHECK(numa_moe_tensor_refresh(e.w) == NUMA_MOE_RESULT_OK, "%s", last_error());
        CHECK(numa_moe_tensor_verify(e.w, &r) == NUMA_MOE_RESULT_OK && r.stale_replica_bytes == 0, "map %s: refresh left %" PRIu64
              " stale bytes", maps[mi], r.stale_replica_bytes);
        ggml_backend_tensor_set(ref.w, w2, 0, n);
        want = mmid_over(&ref, &c, act, ids, 2);
        got  = mmid_over(&e, &c, act, ids, 2);
        CHECK(want && got && memcmp(want, got, ob) == 0, "map %s: outputs after refresh differ from the new weights'", maps[mi]);
        free(got);
        free(want);
        // a set_tensor after the first compute reaches every copy by itself
        ggml_backend_tensor_set(e.w, w1, 0, n);
        CHECK(numa_moe_tensor_verify(e.w, &r) == NUMA_MOE_RESULT_OK && r.stale_replica_bytes == 0, "map %s: set_tensor left %" PRIu64
              " stale bytes", maps[mi], r.stale_replica_bytes);
        CHECK(numa_moe_tensor_refresh(NULL) == NUMA_MOE_RESULT_NULL_ARGUMENT);
        CHECK(numa_moe_tensor_refresh(e.plain) == NUMA_MOE_RESULT_NOT_PLACED);
        experts_free(&ref);
        experts_free(&e);
        free(w1);
        free(w2);
    }
    numa_moe_config_set_map("off");
    free(ids);
    free(act);
}

// ---------------------------------------------------------------------------------------
// routing statistics: counted exactly from a known routing

// An expert tensor named `name` in numa-moe's buffer, under the current map.
static int named_experts(struct experts * e, const char * name, int64_t n_embd, int64_t n_ff, int64_t n_expert) {
    struct ggml_init_params ip = { 2 * ggml_tensor_overhead(), NULL, true };
    e->ctx   = ggml_init(ip);
    e->w     = ggml_new_tensor_3d(e->ctx, GGML_TYPE_F32, n_embd, n_ff, n_expert);
    e->plain = NULL;
    ggml_set_name(e->w, name);
    e->buf = ggml_backend_alloc_ctx_tensors_from_buft(e->ctx, numa_moe_buft());
    return e->buf != NULL;
}

static void test_routing_counts_exactly(void) {
    const struct mmid_case c = { GGML_TYPE_F32, 64, 96, 8, 2, 6, 1 };
    CHECK(numa_moe_config_set_map("rows") == NUMA_MOE_RESULT_OK, "%s", last_error());
    CHECK(numa_moe_routing_set_enabled(true) == NUMA_MOE_RESULT_OK);
    CHECK(numa_moe_routing_reset() == NUMA_MOE_RESULT_OK);
    struct experts down, up;
    CHECK(named_experts(&down, "blk.5.ffn_down_exps.weight", c.n_embd, c.n_ff, c.n_expert), "%s", last_error());
    CHECK(named_experts(&up, "blk.6.ffn_up_exps.weight", c.n_embd, c.n_ff, c.n_expert), "%s", last_error());
    if (!down.buf || !up.buf) {
        return;
    }
    uint8_t * w = malloc(ggml_nbytes(down.w));
    fill_weights(down.w, w);
    ggml_backend_tensor_set(down.w, w, 0, ggml_nbytes(down.w));
    ggml_backend_tensor_set(up.w, w, 0, ggml_nbytes(up.w));
    float * act = malloc(sizeof(float) * c.n_embd * c.n_tokens);
    for (int64_t i = 0; i < c.n_embd * c.n_tokens; i++) {
        act[i] = rnd_normal();
    }
    // token t goes to experts t % 8 and (t + 3) % 8; expert 7 gets nothing
    int32_t  ids[12];
    uint64_t want[8] = { 0 };
    int      routed_experts = 0;
    for (int t = 0; t < 6; t++) {
        ids[2 * t]     = t % 8;
        ids[2 * t + 1] = (t + 3) % 8;
        want[t % 8]++;
        want[(t + 3) % 8]++;
    }
    for (int x = 0; x < 8; x++) {
        routed_experts += want[x] > 0;
    }
    float * out = mmid_over(&down, &c, act, ids, 2);
    free(out);
    out = mmid_over(&up, &c, act, ids, 2);
    free(out);
    uint64_t got[8], recent[8];
    CHECK(numa_moe_routing_layer(5, got, recent, 8) == NUMA_MOE_RESULT_OK, "%s", last_error());
    CHECK(memcmp(got, want, sizeof want) == 0, "layer 5 counts %llu %llu %llu %llu %llu %llu %llu %llu", (unsigned long long) got[0],
          (unsigned long long) got[1], (unsigned long long) got[2], (unsigned long long) got[3], (unsigned long long) got[4],
          (unsigned long long) got[5], (unsigned long long) got[6], (unsigned long long) got[7]);
    CHECK(memcmp(recent, want, sizeof want) == 0, "layer 5's recent window differs from its counts");
    // routing is counted once per layer, on its down projection
    CHECK(numa_moe_routing_layer(6, got, NULL, 8) == NUMA_MOE_RESULT_NOT_PLACED);
    CHECK(numa_moe_routing_layer(5, got, NULL, 7) == NUMA_MOE_RESULT_INVALID_ARGUMENT);
    CHECK(numa_moe_routing_layer(5, NULL, NULL, 8) == NUMA_MOE_RESULT_NULL_ARGUMENT);
    // rows and bytes, summed over nodes, for both ops: every routed (token, slot) needs all
    // 96 rows of its expert; every routed expert's rows are read once per op
    uint64_t rows = 0, bytes = 0;
    for (int i = 0; i < node_count(); i++) {
        NumaMoeNodeInfo info;
        NumaMoeNodeWork nw;
        numa_moe_topology_node_info((size_t) i, &info);
        CHECK(numa_moe_routing_node_work(info.id, &nw) == NUMA_MOE_RESULT_OK);
        rows += nw.rows;
        bytes += nw.bytes;
    }
    CHECK(rows == 2u * 12u * 96u, "rows computed: %llu, want %u", (unsigned long long) rows, 2u * 12u * 96u);
    CHECK(bytes == 2u * (uint64_t) routed_experts * 96u * 64u * 4u, "bytes read: %llu", (unsigned long long) bytes);
    // the profile file, and nothing counted while recording is off
    char path[64];
    snprintf(path, sizeof path, "/tmp/numa-moe-harness-routing-%d.json", (int) getpid());
    CHECK(numa_moe_routing_save(path) == NUMA_MOE_RESULT_OK, "%s", last_error());
    FILE * f = fopen(path, "r");
    char   head[64] = { 0 };
    CHECK(f && fread(head, 1, sizeof head - 1, f) > 0 && strstr(head, "numa_moe_routing"), "no profile in %s", path);
    if (f) {
        fclose(f);
    }
    remove(path);
    numa_moe_routing_set_enabled(false);
    out = mmid_over(&down, &c, act, ids, 2);
    free(out);
    numa_moe_routing_set_enabled(true);
    CHECK(numa_moe_routing_layer(5, got, NULL, 8) == NUMA_MOE_RESULT_OK && memcmp(got, want, sizeof want) == 0,
          "counted while recording was off");
    numa_moe_routing_reset();
    free(act);
    free(w);
    experts_free(&down);
    experts_free(&up);
    numa_moe_config_set_map("off");
}

// ---------------------------------------------------------------------------------------
// pinning with a GPU backend

// A stand-in GPU backend, registered with ggml like ggml-cuda: one GPU device, FakeGPU0, and,
// while g_fake.offer is set, the proc addresses "ggml_backend_register_host_buffer" and
// "ggml_backend_unregister_host_buffer" (ggml-cuda's cudaHostRegister and cudaHostUnregister).
static struct {
    int    offer, accept;  // offer registration; accept a registration
    int    registered, unregistered;
    void * last;           // the last range registered
    size_t last_size;
    char   policy[32];     // the memory policy of the mapping that starts there, when registered
} g_fake;

// The memory policy /proc/self/numa_maps shows for the mapping that starts at `p` ("bind:0",
// "default", ...; binding splits mappings at the extents it binds), or "" when none starts there.
static void policy_at(const void * p, char out[32]) {
    out[0]   = 0;
    FILE * f = fopen("/proc/self/numa_maps", "r");
    char   line[512], want[32];
    snprintf(want, sizeof want, "%lx ", (unsigned long) (uintptr_t) p);
    while (f && fgets(line, sizeof line, f)) {
        if (strncmp(line, want, strlen(want)) == 0) {
            sscanf(line + strlen(want), "%31s", out);
            break;
        }
    }
    if (f) {
        fclose(f);
    }
}

static bool fake_register(void * p, size_t size) {
    g_fake.last      = p;
    g_fake.last_size = size;
    policy_at(p, g_fake.policy);
    if (!g_fake.accept) {
        return false;
    }
    // pinning faults every page in, as cudaHostRegister does
    for (size_t o = 0; o < size; o += 4096) {
        ((volatile uint8_t *) p)[o] = ((volatile uint8_t *) p)[o];
    }
    g_fake.registered++;
    return true;
}

static void fake_unregister(void * p) {
    CHECK(p == g_fake.last, "unregistered %p, registered %p", p, g_fake.last);
    g_fake.unregistered++;
}

static const char * fake_reg_name(ggml_backend_reg_t reg) {
    (void) reg;
    return "FakeGPU";
}

static const char * fake_dev_name(ggml_backend_dev_t dev) {
    (void) dev;
    return "FakeGPU0";
}

static enum ggml_backend_dev_type fake_dev_type(ggml_backend_dev_t dev) {
    (void) dev;
    return GGML_BACKEND_DEVICE_TYPE_GPU;
}

static struct ggml_backend_device g_fake_dev;

static size_t fake_dev_count(ggml_backend_reg_t reg) {
    (void) reg;
    return 1;
}

static ggml_backend_dev_t fake_dev_get(ggml_backend_reg_t reg, size_t i) {
    (void) reg;
    return i == 0 ? &g_fake_dev : NULL;
}

static void * fake_proc(ggml_backend_reg_t reg, const char * name) {
    (void) reg;
    if (g_fake.offer && strcmp(name, "ggml_backend_register_host_buffer") == 0) {
        return (void *) fake_register;
    }
    if (g_fake.offer && strcmp(name, "ggml_backend_unregister_host_buffer") == 0) {
        return (void *) fake_unregister;
    }
    return NULL;
}

static struct ggml_backend_reg g_fake_reg = {
    .api_version = GGML_BACKEND_API_VERSION,
    .iface       = { .get_name = fake_reg_name, .get_device_count = fake_dev_count, .get_device = fake_dev_get, .get_proc_address = fake_proc },
    .context     = NULL,
};

static char g_log[8192];

static void quiet_log(enum ggml_log_level level, const char * text, void * user);

static void capture_log(enum ggml_log_level level, const char * text, void * user) {
    (void) level;
    (void) user;
    if (strncmp(text, "numa-moe", 8) == 0 && strlen(g_log) + strlen(text) < sizeof g_log) {
        strcat(g_log, text);
    }
}

// Allocates q8_0 experts (and a plain tensor) in `buft` under `rows`, writes them, and frees the
// buffer; the log of the load report in g_log.
static void pinning_round(ggml_backend_buffer_type_t buft, enum ggml_type type) {
    g_log[0] = 0;
    struct experts e;
    if (!experts_alloc(&e, buft, "rows", type, 256, 64, 8)) {
        CHECK(0, "allocation failed: %s", last_error());
        return;
    }
    const size_t nb   = ggml_nbytes(e.w);
    uint8_t *    data = malloc(nb);
    for (size_t i = 0; i < nb; i++) {
        data[i] = (uint8_t) (i * 7);
    }
    if (type == GGML_TYPE_Q4_0) {
        for (size_t b = 0; b < nb; b += 18) {  // finite scales
            data[b] = 0;
            data[b + 1] = 0x3c;
        }
    }
    ggml_backend_tensor_set(e.w, data, 0, nb);
    float plain[51] = { 0 };
    ggml_backend_tensor_set(e.plain, plain, 0, sizeof plain);
    if (g_fake.registered && g_fake.last == e.w->data && !topology_is_described()) {
        NumaMoePageReport rep;
        CHECK(numa_moe_tensor_verify(e.w, &rep) == NUMA_MOE_RESULT_OK && rep.misplaced == 0, "%" PRIu64 " pages off their node", rep.misplaced);
    }
    free(data);
    experts_free(&e);
}

// The standard layout's expert tensors are registered with a GPU backend that pins host memory
// (ggml's scheduler copies them to the GPU for the batches it offloads): each once, after its
// memory is bound (so the pages pinning faults in land on their node), unregistered when its
// buffer is freed; repacked layouts, which no GPU copies, and plain tensors never. The load
// report names a GPU that cannot pin, and a backend that declines.
static void test_pinning_with_a_gpu_backend(void) {
    static int registered_backend = 0;
    if (!registered_backend) {
        g_fake_dev = (struct ggml_backend_device) { .iface = { .get_name = fake_dev_name, .get_type = fake_dev_type }, .reg = &g_fake_reg };
        ggml_backend_register(&g_fake_reg);
        registered_backend = 1;
    }
    ggml_log_set(capture_log, NULL);
    memset(&g_fake, 0, sizeof g_fake);

    // a GPU whose backend offers no registration (Vulkan at the pin)
    pinning_round(numa_moe_buft(), GGML_TYPE_Q8_0);
    CHECK(strstr(g_log, "numa-moe: FakeGPU0 cannot register expert memory as pinned host memory (its backend offers no ggml_backend_register_host_buffer"),
          "log: %s", g_log);

    // a backend that registers
    g_fake.offer = g_fake.accept = 1;
    pinning_round(numa_moe_buft(), GGML_TYPE_Q8_0);
    CHECK(g_fake.registered == 1, "%d registrations, want the one expert tensor", g_fake.registered);
    CHECK(g_fake.unregistered == 1, "%d unregistrations at free, want 1", g_fake.unregistered);
    CHECK(g_fake.last_size == (size_t) 256 / 32 * 34 * 64 * 8, "registered %zu bytes", g_fake.last_size);
    if (!topology_is_described()) {
        CHECK(strncmp(g_fake.policy, "bind:", 5) == 0, "memory policy when registered: '%s', want bind: registered before binding", g_fake.policy);
    }
    CHECK(strstr(g_log, "numa-moe: 1 expert tensors (") && strstr(g_log, "registered with FakeGPU as pinned host memory"), "log: %s", g_log);
    CHECK(!strstr(g_log, "cannot register"), "log: %s", g_log);

    // repacked layouts are not host memory: never registered
    ggml_backend_buffer_type_t repack = numa_moe_repack_buft();
    if (repack) {
        g_fake.registered = g_fake.unregistered = 0;
        pinning_round(repack, GGML_TYPE_Q4_0);
        CHECK(g_fake.registered == 0 && g_fake.unregistered == 0, "repacked layout registered %d times", g_fake.registered);
        CHECK(strstr(g_log, "repacked for CPU_REPACK's kernels") && !strstr(g_log, "pinned"), "log: %s", g_log);
    }

    // a backend that declines (ggml-cuda without GGML_CUDA_REGISTER_HOST)
    g_fake.accept = 0;
    g_fake.registered = g_fake.unregistered = 0;
    pinning_round(numa_moe_buft(), GGML_TYPE_Q8_0);
    CHECK(g_fake.unregistered == 0, "unregistered what was never registered");
    CHECK(strstr(g_log, "numa-moe: FakeGPU did not register 1 of 1 expert tensors"), "log: %s", g_log);

    g_fake.offer = 0;
    ggml_log_set(quiet_log, NULL);
    numa_moe_config_set_map("off");
}

// ---------------------------------------------------------------------------------------

struct test {
    const char * name;
    void (*fn)(void);
};

static const struct test k_tests[] = {
    { "abi_version", test_version },
    { "abi_result_codes", test_result_codes_are_stable },
    { "abi_null_arguments", test_null_arguments },
    { "abi_last_error", test_last_error_buffer_convention },
    { "abi_topology", test_topology_query },
    { "abi_map_errors", test_map_errors_name_the_problem },
    { "abi_map_render", test_map_render },
    { "abi_pages_per_node", test_pages_per_node },
    { "buffer_types", test_buffer_types_come_first },
    { "buffer_round_trip", test_round_trip_every_layout },
    { "buffer_cycles", test_alloc_free_cycles },
    { "buffer_bind_failure", test_bind_failure_strict_and_fallback },
    { "buffer_replicas", test_replicas_cover_every_write },
    { "mmid_routing_stats", test_routing_counts_exactly },
    { "mmid_decode", test_mmid_decode_every_type },
    { "mmid_batches", test_mmid_small_batches },
    { "mmid_prefill", test_mmid_prefill },
    { "mmid_repacked", test_mmid_repacked_layouts },
    { "mm_every_type", test_mm_every_type },
    { "mm_repacked", test_mm_repacked_layouts },
    { "mm_heads", test_mm_per_head_stacks },
    { "locality_counters", test_locality_counters },
    { "buffer_repacked_writes", test_repacked_writes },
    { "fault_syscalls", test_fault_syscalls },
    { "fault_topology", test_fault_topology },
    { "numa_topology", test_numa_topology_matches_the_machine },
    { "numa_bad_maps", test_numa_bad_maps_name_absent_and_memoryless_nodes },
    { "numa_out_of_memory", test_numa_node_out_of_memory },
    { "numa_workers", test_numa_workers_run_on_their_node },
    { "pinning", test_pinning_with_a_gpu_backend },  // last: it registers a stand-in GPU backend with ggml
};

static void quiet_log(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (strncmp(text, "numa-moe", 8) == 0) {
        g_warnings += level == GGML_LOG_LEVEL_WARN;
        g_errors += level == GGML_LOG_LEVEL_ERROR;
    }
    if (level >= GGML_LOG_LEVEL_WARN || getenv("HARNESS_VERBOSE")) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    ggml_log_set(quiet_log, NULL);
    ggml_cpu_init();
    int passed = 0, failed = 0;
    for (size_t i = 0; i < sizeof k_tests / sizeof k_tests[0]; i++) {
        int selected = argc < 2;
        for (int a = 1; a < argc; a++) {
            selected |= strncmp(k_tests[i].name, argv[a], strlen(argv[a])) == 0;
        }
        if (!selected) {
            continue;
        }
        g_ok = 1;
        k_tests[i].fn();
        printf("%s %s\n", g_ok ? "ok  " : "FAIL", k_tests[i].name);
        fflush(stdout);
        if (g_ok) {
            passed++;
        } else {
            failed++;
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
