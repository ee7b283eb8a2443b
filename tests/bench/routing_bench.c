// routing_bench: what the routing statistics cost and what the `balanced` map gains, at op level.
//
//   routing_bench [--threads N] [--rounds N] [--zipf S]
//
// 1. Overhead: MUL_MAT_ID of a Qwen3-30B-A3B-shaped down projection (128 experts, 8 used,
//    768 -> 2048, q8_0), decode and a 32-token batch, placed by numa-moe, timed with the
//    statistics on and off in alternating rounds, and an A/A control (off against off).
//    Prints the median time of each and the ratios.
// 2. Balance: routing drawn from a Zipf distribution over the experts (exponent S, default
//    1.2, the same draw every time). The ops run under `block`, the hook's own counters give
//    each node's rows; the recorded profile then plans `balanced:FILE` and the same ops run
//    again. Prints the busiest node's rows over the mean for block, balanced and rows, from
//    the hook's own counters, with at least one thread per node.
//    Run it with NUMA_MOE_TOPOLOGY describing a 2- and a 4-node machine (make bench does).
//
// Prints markdown tables on stdout.

#define _POSIX_C_SOURCE 200809L

#include "numa_moe.h"

#include "../c/cpu_extra_bufts.h"
#include "bench_util.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { N_EXPERT = 128, N_USED = 8, N_IN = 768, N_OUT = 2048 };

static int g_threads = 2, g_rounds = 200;
static double g_zipf = 1.2;
static uint64_t g_rng = 42;

static uint64_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

static void quiet(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

struct op {
    struct ggml_context * wctx, *ctx;
    ggml_backend_buffer_t buf;
    struct ggml_tensor *  w, *ids;
    struct ggml_cgraph *  gf;
};

// The down projection of layer 0 in numa-moe's buffer under `map`, and a graph over `n_tokens`.
static int op_init(struct op * o, const char * map, const uint8_t * wbytes, int n_tokens) {
    memset(o, 0, sizeof *o);
    if (numa_moe_config_set_map(map) != NUMA_MOE_RESULT_OK) {
        char err[512];
        numa_moe_last_error(err, sizeof err);
        fprintf(stderr, "routing_bench: map %s: %s\n", map, err);
        return 0;
    }
    struct ggml_init_params wp = { ggml_tensor_overhead(), NULL, true };
    o->wctx = ggml_init(wp);
    o->w    = ggml_new_tensor_3d(o->wctx, GGML_TYPE_Q8_0, N_IN, N_OUT, N_EXPERT);
    ggml_set_name(o->w, "blk.0.ffn_down_exps.weight");
    o->buf = ggml_backend_alloc_ctx_tensors_from_buft(o->wctx, cpu_extra_buft("NUMA_MOE"));
    if (!o->buf) {
        fprintf(stderr, "routing_bench: cannot allocate under map %s\n", map);
        return 0;
    }
    ggml_backend_tensor_set(o->w, wbytes, 0, ggml_nbytes(o->w));
    struct ggml_init_params ip = { 256 * 1024 * 1024, NULL, false };
    o->ctx                      = ggml_init(ip);
    struct ggml_tensor * x      = ggml_new_tensor_3d(o->ctx, GGML_TYPE_F32, N_IN, N_USED, n_tokens);
    o->ids                      = ggml_new_tensor_2d(o->ctx, GGML_TYPE_I32, N_USED, n_tokens);
    for (int64_t i = 0; i < ggml_nelements(x); i++) {
        ((float *) x->data)[i] = (float) ((int) (rnd() % 2001) - 1000) / 1000.0f;
    }
    o->gf = ggml_new_graph(o->ctx);
    ggml_build_forward_expand(o->gf, ggml_mul_mat_id(o->ctx, o->w, x, o->ids));
    return 1;
}

static void op_free(struct op * o) {
    if (o->buf) {
        ggml_backend_buffer_free(o->buf);
    }
    if (o->ctx) {
        ggml_free(o->ctx);
    }
    if (o->wctx) {
        ggml_free(o->wctx);
    }
}

// Routing: each token's N_USED distinct experts, uniform or Zipf-distributed.
static void route(struct op * o, int zipf) {
    static double cdf[N_EXPERT];
    double        sum = 0;
    for (int e = 0; e < N_EXPERT; e++) {
        sum += zipf ? 1.0 / pow(e + 1, g_zipf) : 1.0;
        cdf[e] = sum;
    }
    int32_t * ids = o->ids->data;
    for (int64_t t = 0; t < o->ids->ne[1]; t++) {
        for (int s = 0; s < N_USED; s++) {
            int e, dup;
            do {
                double u = (double) (rnd() % 1000000) / 1e6 * sum;
                for (e = 0; e < N_EXPERT - 1 && cdf[e] < u; e++) {
                }
                dup = 0;
                for (int q = 0; q < s; q++) {
                    dup |= ids[t * N_USED + q] == e;
                }
            } while (dup);
            ids[t * N_USED + s] = e;
        }
    }
}

static double run_once(ggml_backend_t be, struct op * o) {
    double t0 = now_s();
    ggml_backend_graph_compute(be, o->gf);
    return now_s() - t0;
}

static void overhead(ggml_backend_t be, const uint8_t * wbytes) {
    printf("## Routing statistics: cost at op level (%d threads, %d rounds each, interleaved)\n\n", g_threads, g_rounds);
    printf("| op | stats off (us) | stats on (us) | on/off median | A/A off/off median | on/off fastest | A/A fastest |\n|---|---|---|---|---|---|---|\n");
    for (int tokens = 1; tokens <= 32; tokens *= 32) {
        struct op o;
        if (!op_init(&o, "rows", wbytes, tokens)) {
            return;
        }
        route(&o, 0);
        double *on = malloc(sizeof(double) * g_rounds), *off = malloc(sizeof(double) * g_rounds), *off2 = malloc(sizeof(double) * g_rounds);
        for (int i = 0; i < 5; i++) {
            run_once(be, &o);
        }
        for (int i = 0; i < g_rounds; i++) {
            numa_moe_routing_set_enabled(false);
            off[i] = run_once(be, &o);
            numa_moe_routing_set_enabled(true);
            on[i] = run_once(be, &o);
            numa_moe_routing_set_enabled(false);
            off2[i] = run_once(be, &o);
        }
        numa_moe_routing_set_enabled(true);
        qsort(on, g_rounds, sizeof(double), cmp_double);
        qsort(off, g_rounds, sizeof(double), cmp_double);
        qsort(off2, g_rounds, sizeof(double), cmp_double);
        double mon = on[g_rounds / 2], moff = off[g_rounds / 2], moff2 = off2[g_rounds / 2];
        printf("| %s | %.1f | %.1f | %.3f | %.3f | %.3f | %.3f |\n", tokens == 1 ? "decode" : "32 tokens", 1e6 * moff, 1e6 * mon, mon / moff,
               moff2 / moff, on[0] / off[0], off2[0] / off[0]);
        free(on);
        free(off);
        free(off2);
        op_free(&o);
    }
    printf("\n");
}

// The busiest node's rows over the mean, from the hook's own counters.
static double busiest_over_mean(void) {
    size_t n = 0;
    numa_moe_topology_node_count(&n);
    uint64_t total = 0, max = 0;
    int      nodes = 0;
    for (size_t i = 0; i < n; i++) {
        NumaMoeNodeInfo info;
        NumaMoeNodeWork w;
        numa_moe_topology_node_info(i, &info);
        if (info.n_cpus == 0 || !info.has_memory) {
            continue;
        }
        numa_moe_routing_node_work(info.id, &w);
        total += w.rows;
        max = w.rows > max ? w.rows : max;
        nodes++;
    }
    return total ? (double) max * nodes / total : 0;
}

static double balance_under(ggml_backend_t be, const uint8_t * wbytes, const char * map, uint64_t seed) {
    struct op o;
    if (!op_init(&o, map, wbytes, 32)) {
        return -1;
    }
    numa_moe_routing_reset();
    g_rng = seed;
    for (int i = 0; i < 16; i++) {
        route(&o, 1);
        run_once(be, &o);
    }
    double b = busiest_over_mean();
    op_free(&o);
    return b;
}

static void balance(ggml_backend_t be, const uint8_t * wbytes) {
    size_t n = 0;
    numa_moe_topology_node_count(&n);
    // a thread on every node, so every node's group computes its own pieces
    ggml_backend_cpu_set_n_threads(be, g_threads > (int) n ? g_threads : (int) n);
    char path[64];
    snprintf(path, sizeof path, "/tmp/routing-bench-%d.json", (int) getpid());
    printf("## Zipf routing (s = %.2f, 128 experts, 8 used, 16 ops of 32 tokens) on %zu nodes: busiest node's rows over the mean\n\n", g_zipf, n);
    printf("| map | busiest/mean |\n|---|---|\n");
    double block = balance_under(be, wbytes, "block", 7);
    printf("| block | %.3f |\n", block);
    // the profile of that routing (recorded under block), then the same ops under balanced
    if (numa_moe_routing_save(path) != NUMA_MOE_RESULT_OK) {
        printf("| balanced | (no profile) |\n");
        return;
    }
    char map[128];
    snprintf(map, sizeof map, "balanced:%s", path);
    double bal = balance_under(be, wbytes, map, 7);
    printf("| balanced (from block's profile) | %s%.3f |\n", bal < 0 ? "(map refused) " : "", bal);
    printf("| rows | %.3f |\n\n", balance_under(be, wbytes, "rows", 7));
    remove(path);
}

int main(int argc, char ** argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            g_threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--rounds") && i + 1 < argc) {
            g_rounds = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--zipf") && i + 1 < argc) {
            g_zipf = atof(argv[++i]);
        } else {
            fprintf(stderr, "usage: routing_bench [--threads N] [--rounds N] [--zipf S]\n");
            return 2;
        }
    }
    if (g_threads < 1 || g_rounds < 1 || g_zipf <= 0) {
        fprintf(stderr, "routing_bench: bad --threads, --rounds or --zipf\n");
        return 2;
    }
    ggml_log_set(quiet, NULL);
    ggml_cpu_init();
    if (!cpu_extra_bufts() || !numa_moe_buffer_type()) {
        fprintf(stderr, "routing_bench: numa-moe is not attached to ggml-cpu\n");
        return 1;
    }
    const size_t row   = ggml_row_size(GGML_TYPE_Q8_0, N_IN);
    const size_t bytes = row * N_OUT * N_EXPERT;
    uint8_t *    w     = malloc(bytes);
    float *      src   = malloc(sizeof(float) * N_IN * N_OUT);
    for (int e = 0; e < N_EXPERT; e++) {
        for (int i = 0; i < N_IN * N_OUT; i++) {
            src[i] = (float) ((int) (rnd() % 2001) - 1000) / 10000.0f;
        }
        ggml_quantize_chunk(GGML_TYPE_Q8_0, src, w + (size_t) e * row * N_OUT, 0, N_OUT, N_IN, NULL);
    }
    free(src);
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, g_threads);
    overhead(be, w);
    balance(be, w);
    ggml_backend_free(be);
    free(w);
    numa_moe_config_set_map("off");
    return 0;
}
