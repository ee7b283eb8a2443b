// mmid_bench: op-level MUL_MAT_ID benchmark (and, with --op mm, MUL_MAT over weight matrices),
// stock ggml-cpu vs numa-moe, same threads, one run.
//
// For every (shape, type, mode) the same expert weights are put in
//   stock              ggml_backend_cpu_buffer_type()   ggml-cpu's own kernel
//   numa-moe           NUMA_MOE (map "rows")            numa-moe's hook, ggml's standard layout
//   repack             CPU_REPACK                       ggml's repacked kernels (as llama.cpp ships)
//   numa-moe repacked  NUMA_MOE_REPACK (map "rows")     numa-moe's hook, CPU_REPACK's layout and gemv
//   repack 2           a second CPU_REPACK buffer       the A/A control of numa-moe repacked vs repack
//   stock 2            a second ggml CPU buffer         the A/A control of numa-moe vs stock
// (the three repacked variants where CPU_REPACK takes the type; by default the A/A control is
// the copy of the row's baseline: repack 2 where CPU_REPACK takes the type, else stock 2) and
// one MUL_MAT_ID node (gate/up layout: activations [K, 1, tokens]) is computed on one
// ggml threadpool. Routing changes every op (a pre-generated random sequence that every
// variant walks through in full, shifted so consecutive ops use different experts), and the
// last-level cache is flushed before every op, so the weights come from memory as they do
// in a real model. Variants are interleaved (A B C, B C A, ... after a warm-up) and the
// median time per op is reported, with effective bandwidth = bytes of the routed experts'
// weights / time. Once per case numa-moe's output is compared bitwise with stock's, numa-moe
// repacked's with CPU_REPACK's, and numa_moe_stats_get must show that the hook computed every
// op of both numa-moe variants.
//
// --op mm: the same for MUL_MAT over a 2-D weight matrix (attention, shared experts, dense
// FFN, output head; DeepSeek-V3's and Qwen3-235B's, named in the table) in q4_K, q8_0 and
// bf16: one ggml_mul_mat node (activations [K, tokens]) over weights named as llama.cpp names
// them, placed by the map's dense= rule (default "rows;dense=rows", which places them on one
// node too; on a multi-node machine, described ones included, "rows" does). Every op reads the
// whole matrix (GB/s: its bytes / time); there is no routing. numa-moe's hook computes
// decode (one token) in both layouts and prefill only in the repacked one (prefill in ggml's
// layout is ggml's own kernel reading numa-moe's placed bytes), and mm_ops_computed must say
// so op for op. A matrix that does not fit --mem-gib gets fewer rows (printed).
//
// Build (scripts/bench.sh does this): the flags of the C harness (Makefile, build/c/harness)
// plus -pthread. Run `mmid_bench --help`. Prints a markdown table on stdout; progress and
// notes on stderr. Exit status 1 when a check failed.

#define _GNU_SOURCE

#include "numa_moe.h"
#include "../c/cpu_extra_bufts.h"
#include "bench_util.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

// ---------------------------------------------------------------------------------------
// cases

struct shape {
    const char * name;      // for --shape
    int64_t      n_expert, n_used, n_embd, n_ff;
    const char * label;     // --op mm: the row's name in the table (followed by K x N); NULL: name
    const char * tensor;    // --op mm: the weight's name; NULL: an expert stack
};

static const struct shape k_mmid_shapes[] = {
    { "qwen3-30b-a3b", 128, 8, 2048, 768, NULL, NULL },
    { "deepseek-v3", 256, 8, 7168, 2048, NULL, NULL },
    { "gpt-oss-120b", 128, 4, 2880, 2880, NULL, NULL },
};

// --op mm: one weight matrix, K x N = n_embd x rows (n_ff), named as llama.cpp names it
static const struct shape k_mm_shapes[] = {
    { "dsv3-q_a", 1, 1, 7168, 1536, "dsv3 q_a", "blk.0.attn_q_a.weight" },
    { "dsv3-q_b", 1, 1, 1536, 24576, "dsv3 q_b", "blk.0.attn_q_b.weight" },
    { "dsv3-kv_a", 1, 1, 7168, 576, "dsv3 kv_a_mqa", "blk.0.attn_kv_a_mqa.weight" },
    { "dsv3-kv_b", 1, 1, 512, 32768, "dsv3 kv_b", "blk.0.attn_kv_b.weight" },
    { "dsv3-attn_out", 1, 1, 16384, 7168, "dsv3 attn_output", "blk.0.attn_output.weight" },
    { "dsv3-shexp_up", 1, 1, 7168, 2048, "dsv3 shexp up", "blk.3.ffn_up_shexp.weight" },
    { "dsv3-shexp_down", 1, 1, 2048, 7168, "dsv3 shexp down", "blk.3.ffn_down_shexp.weight" },
    { "dsv3-head", 1, 1, 7168, 129280, "dsv3 head", "output.weight" },
    { "qwen3-235b-q", 1, 1, 4096, 8192, "qwen3-235b q", "blk.0.attn_q.weight" },
    { "qwen3-235b-k", 1, 1, 4096, 512, "qwen3-235b k", "blk.0.attn_k.weight" },
    { "qwen3-235b-attn_out", 1, 1, 8192, 4096, "qwen3-235b attn_output", "blk.0.attn_output.weight" },
    { "qwen3-235b-head", 1, 1, 4096, 151936, "qwen3-235b head", "output.weight" },
};

// the four CPU_REPACK takes on x86 with AVX2 (q4_0, q4_K, iq4_nl, mxfp4), and two it does not
static const enum ggml_type k_mmid_types[] = { GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_IQ4_NL, GGML_TYPE_MXFP4, GGML_TYPE_Q8_0, GGML_TYPE_BF16 };
// --op mm: what the big dense matrices of those models come in (CPU_REPACK takes q4_K on x86)
static const enum ggml_type k_mm_types[] = { GGML_TYPE_Q4_K, GGML_TYPE_Q8_0, GGML_TYPE_BF16 };

// the op benchmarked (--op): its shapes and types
static int                    g_mm;  // MUL_MAT over a weight matrix, not MUL_MAT_ID
static const struct shape *   k_shapes;
static size_t                 k_nshapes;
static const enum ggml_type * k_types;
static size_t                 k_ntypes;

// V_NREPACK: numa-moe's repacked buffer type (NUMA_MOE_REPACK). V_REPACK2 and V_STOCK2: second
// copies of the CPU_REPACK and the stock weights, timed like the others: the A/A controls
// (what two copies of the same thing differ by on this machine in this run)
enum variant { V_STOCK, V_NUMA, V_REPACK, V_NREPACK, V_REPACK2, V_STOCK2, V_COUNT };

static const char * const k_variant_names[V_COUNT] = { "stock", "numa-moe", "stock+repack", "numa-moe repacked", "repack copy 2",
                                                       "stock copy 2" };

// A/A controls (--control): the copy of the row's baseline, both copies, or none
enum control { C_AUTO, C_BOTH, C_NONE };


// ---------------------------------------------------------------------------------------
// options

static struct {
    int          threads;
    int          iters;           // rounds; 0: per-mode default
    int          warmup;          // -1: per-mode default
    const char * shape;           // NULL: all; else a comma-separated list
    const char * type;            // NULL: all; else a comma-separated list
    const char * mode;            // NULL: both
    int          quick;
    int          prefill_tokens;
    double       mem_gib;         // budget for all copies of one case's weights
    double       bw_gib;          // streaming-read buffer; 0: skip
    int          flush;           // flush the LLC before every op
    int          stock_thp;       // madvise(MADV_HUGEPAGE) the stock and repack weights
    const char * map;             // NULL: the op's default
    uint64_t     seed;
    int          retries;         // reruns of a case's timed rounds when others were busy
    double       max_others;      // share of the CPUs others may use while timing (0..1)
    enum control control;         // which A/A controls to time
} g_opt = { 2, 0, -1, NULL, NULL, NULL, 0, 128, 12.0, 2.0, 1, 0, NULL, 42, 2, 0.10, C_AUTO };

static void usage(FILE * f) {
    fprintf(f,
            "usage: mmid_bench [options]\n"
            "  --op OP             mmid: MUL_MAT_ID over expert stacks (default); mm: MUL_MAT over\n"
            "                      the weight matrices of DeepSeek-V3 and Qwen3-235B\n"
            "  --threads N         ggml threads for every variant (default 2)\n"
            "  --iters N           timed rounds per case (default: decode 100, prefill 8; at least\n"
            "                      twice the number of variants timed)\n"
            "  --warmup N          untimed rounds first (default: decode 5, prefill 1)\n"
            "  --shape NAME[,...]  qwen3-30b-a3b | deepseek-v3 | gpt-oss-120b (default: all);\n"
            "                      --op mm: dsv3-q_a | dsv3-q_b | dsv3-kv_a | dsv3-kv_b |\n"
            "                      dsv3-attn_out | dsv3-shexp_up | dsv3-shexp_down | dsv3-head |\n"
            "                      qwen3-235b-q | qwen3-235b-k | qwen3-235b-attn_out |\n"
            "                      qwen3-235b-head (default: all)\n"
            "  --type T[,...]      q4_0 | q4_K | iq4_nl | mxfp4 | q8_0 | bf16 (default: all);\n"
            "                      --op mm: q4_K | q8_0 | bf16 (default: all)\n"
            "  --mode M            decode | prefill (default: both)\n"
            "  --prefill-tokens N  tokens of a prefill op (default 128)\n"
            "  --quick             short smoke run: qwen3 shape (--op mm: dsv3-q_a and qwen3-235b-k),\n"
            "                      32-token prefill, few rounds\n"
            "  --mem-gib X         memory for all copies of one case's weights (default 12);\n"
            "                      a shape that does not fit gets fewer experts (--op mm: rows;\n"
            "                      printed)\n"
            "  --bw-gib X          streaming-read buffer (default 2; 0 skips the measurement)\n"
            "  --no-flush          do not flush the last-level cache before every op\n"
            "  --control C         A/A controls, second copies timed like the others: auto (default:\n"
            "                      a second CPU_REPACK copy where CPU_REPACK takes the type, else a\n"
            "                      second stock copy), both (both where CPU_REPACK takes the type),\n"
            "                      none\n"
            "  --no-control        the same as --control none\n"
            "  --stock-thp         ask transparent huge pages for the stock and repack weights\n"
            "                      (numa-moe's buffer asks for them only with NUMA_MOE_THP=1)\n"
            "  --map MAP           numa-moe expert map (default rows; --op mm: rows;dense=rows,\n"
            "                      which places the matrices on one node too)\n"
            "  --seed S            routing and weights seed (default 42)\n"
            "  --retries N         rerun a case's timed rounds up to N times when other processes\n"
            "                      used more than --max-others of the CPUs meanwhile (default 2)\n"
            "  --max-others P      that share, in percent (default 10)\n");
}

static int parse_args(int argc, char ** argv) {
    for (int i = 1; i < argc; i++) {
        const char * a    = argv[i];
        const char * next = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED_ARG()                                              \
    do {                                                        \
        if (!next) {                                            \
            fprintf(stderr, "mmid_bench: %s needs a value\n", a); \
            return 0;                                           \
        }                                                       \
        i++;                                                    \
    } while (0)
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "--op")) {
            NEED_ARG();
            if (strcmp(next, "mmid") && strcmp(next, "mm")) {
                fprintf(stderr, "mmid_bench: --op is mmid or mm\n");
                return 0;
            }
            g_mm = !strcmp(next, "mm");
        } else if (!strcmp(a, "--threads")) {
            NEED_ARG();
            g_opt.threads = atoi(next);
        } else if (!strcmp(a, "--iters")) {
            NEED_ARG();
            g_opt.iters = atoi(next);
        } else if (!strcmp(a, "--warmup")) {
            NEED_ARG();
            g_opt.warmup = atoi(next);
        } else if (!strcmp(a, "--shape")) {
            NEED_ARG();
            g_opt.shape = next;
        } else if (!strcmp(a, "--type")) {
            NEED_ARG();
            g_opt.type = next;
        } else if (!strcmp(a, "--mode")) {
            NEED_ARG();
            g_opt.mode = next;
            if (strcmp(next, "decode") && strcmp(next, "prefill")) {
                fprintf(stderr, "mmid_bench: --mode is decode or prefill\n");
                return 0;
            }
        } else if (!strcmp(a, "--prefill-tokens")) {
            NEED_ARG();
            g_opt.prefill_tokens = atoi(next);
        } else if (!strcmp(a, "--quick")) {
            g_opt.quick = 1;
        } else if (!strcmp(a, "--mem-gib")) {
            NEED_ARG();
            g_opt.mem_gib = atof(next);
        } else if (!strcmp(a, "--bw-gib")) {
            NEED_ARG();
            g_opt.bw_gib = atof(next);
        } else if (!strcmp(a, "--no-flush")) {
            g_opt.flush = 0;
        } else if (!strcmp(a, "--no-control")) {
            g_opt.control = C_NONE;
        } else if (!strcmp(a, "--control")) {
            NEED_ARG();
            if (!strcmp(next, "auto")) {
                g_opt.control = C_AUTO;
            } else if (!strcmp(next, "both")) {
                g_opt.control = C_BOTH;
            } else if (!strcmp(next, "none")) {
                g_opt.control = C_NONE;
            } else {
                fprintf(stderr, "mmid_bench: --control is auto, both or none\n");
                return 0;
            }
        } else if (!strcmp(a, "--stock-thp")) {
            g_opt.stock_thp = 1;
        } else if (!strcmp(a, "--map")) {
            NEED_ARG();
            g_opt.map = next;
        } else if (!strcmp(a, "--retries")) {
            NEED_ARG();
            g_opt.retries = atoi(next);
        } else if (!strcmp(a, "--max-others")) {
            NEED_ARG();
            g_opt.max_others = atof(next) / 100.0;
        } else if (!strcmp(a, "--seed")) {
            NEED_ARG();
            g_opt.seed = strtoull(next, NULL, 0);
        } else {
            fprintf(stderr, "mmid_bench: unknown option %s\n", a);
            usage(stderr);
            return 0;
        }
#undef NEED_ARG
    }
    if (g_opt.threads < 1 || g_opt.threads > GGML_MAX_N_THREADS || g_opt.prefill_tokens < 1 || g_opt.iters < 0) {
        fprintf(stderr, "mmid_bench: bad --threads, --iters or --prefill-tokens\n");
        return 0;
    }
    k_shapes  = g_mm ? k_mm_shapes : k_mmid_shapes;
    k_nshapes = g_mm ? sizeof k_mm_shapes / sizeof k_mm_shapes[0] : sizeof k_mmid_shapes / sizeof k_mmid_shapes[0];
    k_types   = g_mm ? k_mm_types : k_mmid_types;
    k_ntypes  = g_mm ? sizeof k_mm_types / sizeof k_mm_types[0] : sizeof k_mmid_types / sizeof k_mmid_types[0];
    if (!g_opt.map) {
        // on one node only an explicit dense= rule places a weight matrix
        g_opt.map = g_mm ? "rows;dense=rows" : "rows";
    }
    if (g_opt.quick) {
        if (!g_opt.shape) {
            g_opt.shape = g_mm ? "dsv3-q_a,qwen3-235b-k" : "qwen3-30b-a3b";
        }
        g_opt.prefill_tokens = 32;
        if (g_opt.bw_gib > 0.25) {
            g_opt.bw_gib = 0.25;
        }
    }
    return 1;
}

// ---------------------------------------------------------------------------------------
// utilities

static uint64_t rnd_next(uint64_t * s) {
    // splitmix64
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z          = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z          = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float rnd_normal(uint64_t * s) {
    float x = 0;
    for (int i = 0; i < 4; i++) {
        x += (float) (rnd_next(s) >> 40) / (float) (1 << 24);
    }
    return (x - 2.0f) * 1.7f;
}

// q-quantile (0..1) of v[0..n) (sorts a copy)
static double quantile(const double * v, int n, double q) {
    double * s = malloc(sizeof(double) * (size_t) n);
    memcpy(s, v, sizeof(double) * (size_t) n);
    qsort(s, (size_t) n, sizeof(double), cmp_double);
    double pos = q * (n - 1);
    int    lo  = (int) pos;
    int    hi  = lo + 1 < n ? lo + 1 : lo;
    double r   = s[lo] + (s[hi] - s[lo]) * (pos - lo);
    free(s);
    return r;
}

static double mem_available_gib(void) {
    FILE * f = fopen("/proc/meminfo", "r");
    if (!f) {
        return -1;
    }
    char   line[256];
    double kib = -1;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "MemAvailable: %lf kB", &kib) == 1) {
            break;
        }
    }
    fclose(f);
    return kib < 0 ? -1 : kib / (1024.0 * 1024.0);
}

static void loadavg(char * out, size_t len) {
    out[0]  = 0;
    FILE * f = fopen("/proc/loadavg", "r");
    if (f) {
        double a = 0, b = 0, c = 0;
        if (fscanf(f, "%lf %lf %lf", &a, &b, &c) == 3) {
            snprintf(out, len, "%.2f %.2f %.2f", a, b, c);
        }
        fclose(f);
    }
}

// CPU time of the whole machine (/proc/stat) and of this process (/proc/self/stat), in ticks
struct cpu_sample {
    double wall;
    long long busy, self;
};

static void cpu_sample(struct cpu_sample * c) {
    memset(c, 0, sizeof *c);
    c->wall  = now_s();
    FILE * f = fopen("/proc/stat", "r");
    if (f) {
        long long v[8] = { 0 };
        if (fscanf(f, "cpu %lld %lld %lld %lld %lld %lld %lld %lld", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) == 8) {
            c->busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        }
        fclose(f);
    }
    f = fopen("/proc/self/stat", "r");
    if (f) {
        char buf[1024];
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n]   = 0;
        char * p = strrchr(buf, ')');  // the command name may hold spaces
        long long ut = 0, st = 0;
        if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lld %lld", &ut, &st) == 2) {
            c->self = ut + st;
        }
        fclose(f);
    }
}

// share of all CPUs that other processes kept busy between two samples
static double others_busy(const struct cpu_sample * a, const struct cpu_sample * b) {
    const double hz   = (double) sysconf(_SC_CLK_TCK);
    const double ncpu = (double) sysconf(_SC_NPROCESSORS_ONLN);
    const double wall = b->wall - a->wall;
    if (wall <= 0 || hz <= 0 || ncpu <= 0) {
        return 0;
    }
    double o = ((double) (b->busy - a->busy) - (double) (b->self - a->self)) / hz / (wall * ncpu);
    return o < 0 ? 0 : o;
}

// waits (at most max_s seconds) until others keep less than --max-others of the CPUs busy
static void wait_quiet(int max_s) {
    for (int i = 0; i < max_s; i++) {
        struct cpu_sample a, b;
        cpu_sample(&a);
        usleep(1000000);
        cpu_sample(&b);
        if (others_busy(&a, &b) <= g_opt.max_others) {
            return;
        }
    }
}

static void quiet_log(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level >= GGML_LOG_LEVEL_WARN || getenv("MMID_BENCH_VERBOSE")) {
        fputs(text, stderr);
    }
}

static const char * numa_err(void) {
    static char buf[1024];
    numa_moe_last_error(buf, sizeof buf);
    return buf;
}

static void fill_random(uint8_t * p, size_t len, uint64_t seed) {
    for (size_t i = 0; i + 8 <= len; i += 8) {
        uint64_t x = rnd_next(&seed);
        memcpy(p + i, &x, 8);
    }
}

// ---------------------------------------------------------------------------------------
// streaming read bandwidth: n threads sum disjoint parts of one buffer

typedef uint64_t v4u64 __attribute__((vector_size(32)));

struct bw_job {
    const uint8_t * p;
    size_t          len;
    uint64_t        sum;
};

// built for AVX2 and AVX-512 too where the CPU has them: SSE2 alone does not reach full bandwidth
__attribute__((target_clones("avx512f", "avx2", "default"))) static void * bw_thread(void * arg) {
    struct bw_job * j = arg;
    v4u64 a = { 0 }, b = { 0 }, c = { 0 }, d = { 0 };
    for (size_t i = 0; i + 128 <= j->len; i += 128) {
        v4u64 x0, x1, x2, x3;
        memcpy(&x0, j->p + i, 32);
        memcpy(&x1, j->p + i + 32, 32);
        memcpy(&x2, j->p + i + 64, 32);
        memcpy(&x3, j->p + i + 96, 32);
        a += x0;
        b += x1;
        c += x2;
        d += x3;
    }
    v4u64 s = a + b + c + d;
    j->sum  = s[0] + s[1] + s[2] + s[3];
    return NULL;
}

static double read_pass(const uint8_t * buf, size_t len, int nt, uint64_t * sink) {
    pthread_t     th[GGML_MAX_N_THREADS];
    struct bw_job jobs[GGML_MAX_N_THREADS];
    size_t        part = (len / (size_t) nt) & ~(size_t) 127;
    double        t0   = now_s();
    for (int t = 0; t < nt; t++) {
        jobs[t] = (struct bw_job) { buf + (size_t) t * part, part, 0 };
        if (t > 0) {
            pthread_create(&th[t], NULL, bw_thread, &jobs[t]);
        }
    }
    bw_thread(&jobs[0]);
    for (int t = 1; t < nt; t++) {
        pthread_join(th[t], NULL);
    }
    double dt = now_s() - t0;
    for (int t = 0; t < nt; t++) {
        *sink += jobs[t].sum;
    }
    return (double) part * nt / dt;
}

// best and median of 7 passes over a buffer of `gib` GiB, in GB/s (1e9 bytes)
static int measure_bandwidth(double gib, int nt, double * best, double * median) {
    size_t    len = (size_t) (gib * (1ull << 30));
    uint8_t * buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        return 0;
    }
    fill_random(buf, len, 7);  // distinct pages: nothing a zero page or page merging could share
    uint64_t sink = 0;
    read_pass(buf, len, nt, &sink);  // warm-up
    double r[7];
    for (int i = 0; i < 7; i++) {
        r[i] = read_pass(buf, len, nt, &sink) / 1e9;
    }
    munmap(buf, len);
    *best   = quantile(r, 7, 1.0);
    *median = quantile(r, 7, 0.5);
    return sink != 1;  // keeps the sums alive
}

// last-level cache flush: read a buffer twice the size of any L3 here
static uint8_t * g_flush_buf;
static size_t    g_flush_len = 64u << 20;
static volatile uint64_t g_flush_sink;

static void flush_llc(void) {
    if (!g_opt.flush) {
        return;
    }
    if (!g_flush_buf) {
        g_flush_buf = malloc(g_flush_len);
        fill_random(g_flush_buf, g_flush_len, 3);
    }
    struct bw_job j = { g_flush_buf, g_flush_len, 0 };
    bw_thread(&j);
    g_flush_sink += j.sum;
}

// ---------------------------------------------------------------------------------------
// weights: random normal data quantized once into a pool of units (one block, or 64
// elements for bf16), each row made of random units of the pool (blocks are
// self-contained)

#define POOL_UNITS 16384

struct fill_job {
    uint8_t *       dst;
    const uint8_t * pool;
    size_t          unit_bytes;
    int64_t         units_per_row;
    int64_t         row0, row1;
    size_t          row_bytes;
    uint64_t        seed;
};

static void fill_rows(const struct fill_job * j) {
    uint64_t s = j->seed;
    for (int64_t r = j->row0; r < j->row1; r++) {
        uint8_t * row = j->dst + (size_t) r * j->row_bytes;
        for (int64_t u = 0; u < j->units_per_row; u++) {
            memcpy(row + (size_t) u * j->unit_bytes, j->pool + (size_t) (rnd_next(&s) % POOL_UNITS) * j->unit_bytes, j->unit_bytes);
        }
    }
}

static void fill_weights(struct ggml_tensor * w, uint8_t * dst, uint64_t seed) {
    const enum ggml_type type  = w->type;
    const int64_t        unit  = ggml_blck_size(type) > 1 ? ggml_blck_size(type) : 64;
    const size_t         ub    = ggml_row_size(type, unit);
    float *              src   = malloc(sizeof(float) * POOL_UNITS * (size_t) unit);
    uint8_t *            pool  = malloc(ub * POOL_UNITS);
    uint64_t             s     = seed;
    for (int64_t i = 0; i < POOL_UNITS * unit; i++) {
        src[i] = rnd_normal(&s) * 0.05f;
    }
    ggml_quantize_chunk(type, src, pool, 0, POOL_UNITS, unit, NULL);
    free(src);

    // one thread, rows in order: every copy of the weights (this one, and those copied from
    // it with ggml_backend_tensor_set) has its pages first touched the same way
    struct fill_job job = { dst, pool, ub, w->ne[0] / unit, 0, w->ne[1] * w->ne[2], w->nb[1], seed * 1000003u };
    fill_rows(&job);
    free(pool);
}

// ---------------------------------------------------------------------------------------
// buffer types

// numa-moe's standard and repacked types, and CPU_REPACK, found by name in ggml-cpu's list
static ggml_backend_buffer_type_t g_numa_buft, g_nrepack_buft, g_repack_buft;

static void find_bufts(void) {
    g_numa_buft    = cpu_extra_buft("NUMA_MOE");
    g_nrepack_buft = cpu_extra_buft("NUMA_MOE_REPACK");
    g_repack_buft  = cpu_extra_buft("CPU_REPACK");
}

// Whether CPU_REPACK takes a MUL_MAT_ID over expert weights (--op mm: a MUL_MAT over a
// weight matrix) of this type and row count, asked the way ggml asks it: the weights in a
// CPU_REPACK buffer, the device's supports_op.
static int repack_takes(enum ggml_type type, int64_t n_embd, int64_t n_ff) {
    if (!g_repack_buft) {
        return 0;
    }
    struct ggml_init_params ip  = { 8 * ggml_tensor_overhead(), NULL, true };
    struct ggml_context *   ctx = ggml_init(ip);
    struct ggml_tensor *    w   = g_mm ? ggml_new_tensor_2d(ctx, type, n_embd, n_ff)
                                       : ggml_new_tensor_3d(ctx, type, n_embd, n_ff, 2);  // 3-D, as ggml checks
    ggml_backend_buffer_t   buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, g_repack_buft);
    int                     ok  = 0;
    if (buf) {
        struct ggml_tensor * b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_embd, 1, 1);
        struct ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, 1);
        struct ggml_tensor * op  = g_mm ? ggml_mul_mat(ctx, w, b) : ggml_mul_mat_id(ctx, w, b, ids);
        ok = ggml_backend_dev_supports_op(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU), op);
        ggml_backend_buffer_free(buf);
    }
    ggml_free(ctx);
    return ok;
}

struct weights {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf;
    struct ggml_tensor *  w;
};

// an expert stack [n_embd, n_ff, n_expert], or (s->tensor) a weight matrix [n_embd, n_ff]
static int weights_alloc(struct weights * e, ggml_backend_buffer_type_t buft, enum ggml_type type, const struct shape * s,
                         int64_t n_ff, int64_t n_expert) {
    struct ggml_init_params ip = { 2 * ggml_tensor_overhead(), NULL, true };
    e->ctx = ggml_init(ip);
    e->w   = s->tensor ? ggml_new_tensor_2d(e->ctx, type, s->n_embd, n_ff) : ggml_new_tensor_3d(e->ctx, type, s->n_embd, n_ff, n_expert);
    ggml_set_name(e->w, s->tensor ? s->tensor : "blk.0.ffn_up_exps.weight");
    e->buf = ggml_backend_alloc_ctx_tensors_from_buft(e->ctx, buft);
    if (!e->buf) {
        ggml_free(e->ctx);
        memset(e, 0, sizeof *e);
        return 0;
    }
    return 1;
}

static void weights_free(struct weights * e) {
    if (e->buf) {
        ggml_backend_buffer_free(e->buf);
    }
    if (e->ctx) {
        ggml_free(e->ctx);
    }
    memset(e, 0, sizeof *e);
}

static void advise_thp(struct ggml_tensor * w) {
    uintptr_t a = ((uintptr_t) w->data + 4095) & ~(uintptr_t) 4095;
    uintptr_t b = ((uintptr_t) w->data + ggml_nbytes(w)) & ~(uintptr_t) 4095;
    if (b > a) {
        madvise((void *) a, b - a, MADV_HUGEPAGE);
    }
}

// ---------------------------------------------------------------------------------------
// one graph per variant: the MUL_MAT_ID node over that variant's weights (--op mm: the
// MUL_MAT node, activations [K, tokens], no ids)

struct graph {
    struct ggml_context * ctx;
    struct ggml_cgraph *  gf;
    struct ggml_tensor *  ids;
    struct ggml_tensor *  out;
};

static void graph_build(struct graph * g, struct ggml_tensor * w, const float * act, int64_t n_used, int64_t n_tokens) {
    const int64_t K   = w->ne[0];
    size_t        mem = sizeof(float) * (size_t) (K * n_tokens + w->ne[1] * n_used * n_tokens) +
                 sizeof(int32_t) * (size_t) (n_used * n_tokens) + 8 * ggml_tensor_overhead() + ggml_graph_overhead() + (1 << 20);
    struct ggml_init_params ip = { mem, NULL, false };
    g->ctx                     = ggml_init(ip);
    struct ggml_tensor * b     = g_mm ? ggml_new_tensor_2d(g->ctx, GGML_TYPE_F32, K, n_tokens)
                                      : ggml_new_tensor_3d(g->ctx, GGML_TYPE_F32, K, 1, n_tokens);
    g->ids                     = g_mm ? NULL : ggml_new_tensor_2d(g->ctx, GGML_TYPE_I32, n_used, n_tokens);
    memcpy(b->data, act, ggml_nbytes(b));
    g->out = g_mm ? ggml_mul_mat(g->ctx, w, b) : ggml_mul_mat_id(g->ctx, w, b, g->ids);
    g->gf  = ggml_new_graph(g->ctx);
    ggml_build_forward_expand(g->gf, g->out);
}

static ggml_backend_t g_backend;

static double graph_run(struct graph * g, const int32_t * ids) {
    if (g->ids) {
        memcpy(g->ids->data, ids, ggml_nbytes(g->ids));
    }
    flush_llc();
    double t0 = now_s();
    enum ggml_status st = ggml_backend_graph_compute(g_backend, g->gf);
    double dt = now_s() - t0;
    if (st != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "mmid_bench: graph compute failed (%d)\n", (int) st);
        exit(2);
    }
    return dt;
}

// ---------------------------------------------------------------------------------------
// the table

struct result {
    const struct shape * s;
    enum ggml_type       type;
    const char *         mode;
    int64_t              n_expert;   // experts in the tensor (may be fewer than the model's)
    int64_t              n_rows;     // --op mm: rows of the matrix (may be fewer than the model's)
    int64_t              n_tokens;
    int                  na;         // the type cannot represent the shape
    int                  skipped;    // did not fit the memory budget
    int                  has[V_COUNT];
    double               med[V_COUNT], iqr[V_COUNT];
    double               bytes;      // mean routed-expert bytes per op (--op mm: the matrix's)
    char                 check[128]; // "ok", "**MISMATCH**", "**HOOK NOT USED**", or why n/a
    double               repack_rel; // RMS of (repack - stock) / RMS of stock
    double               others;     // share of the CPUs other processes used while timing
};

#define MAX_RESULTS 128
static struct result g_res[MAX_RESULTS];
static int           g_nres;
static int           g_failures;

// Columns: the old comparison (numa-moe in ggml's standard layout against stock, with its A/A
// control), then the one that matters where CPU_REPACK takes the type (numa-moe repacked
// against stock+repack as llama.cpp ships, with its A/A control).
#define N_COLS 16

static void print_header(void) {
    printf("| shape | type | mode | %s | stock ms | numa-moe ms | numa-moe / stock time | A/A: stock copy 2 / stock | "
           "stock+repack ms | numa-moe repacked ms | **numa-moe repacked / stock+repack time** | A/A: repack copy 2 / stock+repack | "
           "GB/s stock / repack | noise | others | check |\n",
           g_mm ? "rows" : "experts");
    printf("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
}

static void print_cells(char cells[N_COLS][160]) {
    for (int c = 0; c < N_COLS; c++) {
        printf("| %s ", cells[c]);
    }
    printf("|\n");
}

static void print_row(const struct result * r) {
    char cells[N_COLS][160];
    memset(cells, 0, sizeof cells);
    if (g_mm) {
        snprintf(cells[0], sizeof cells[0], "%s %" PRId64 "x%" PRId64, r->s->label, r->s->n_embd, r->s->n_ff);
    } else {
        snprintf(cells[0], sizeof cells[0], "%s", r->s->name);
    }
    snprintf(cells[1], sizeof cells[1], "%s", ggml_type_name(r->type));
    if (r->na) {
        snprintf(cells[2], sizeof cells[2], "%s", r->mode);
    } else {
        snprintf(cells[2], sizeof cells[2], "%s (%" PRId64 " tok)", r->mode, r->n_tokens);
    }
    if (r->na || r->skipped) {
        for (int c = 3; c < 13; c++) {
            snprintf(cells[c], sizeof cells[c], "%s", r->na ? "n/a" : "-");
        }
        snprintf(cells[15], sizeof cells[15], "%s", r->check);  // why
        print_cells(cells);
        return;
    }
    const int64_t have = g_mm ? r->n_rows : r->n_expert, want = g_mm ? r->s->n_ff : r->s->n_expert;
    if (have != want) {
        snprintf(cells[3], sizeof cells[3], "%" PRId64 " of %" PRId64, have, want);
    } else {
        snprintf(cells[3], sizeof cells[3], "%" PRId64, have);
    }
    const double st = r->med[V_STOCK], nm = r->med[V_NUMA];
    snprintf(cells[4], sizeof cells[4], "%.3f", st * 1e3);
    snprintf(cells[5], sizeof cells[5], "%.3f", nm * 1e3);
    snprintf(cells[6], sizeof cells[6], "%.3f", nm / st);
    snprintf(cells[7], sizeof cells[7], "-");
    if (r->has[V_STOCK2]) {
        snprintf(cells[7], sizeof cells[7], "%.3f", r->med[V_STOCK2] / st);
    }
    for (int c = 8; c < 12; c++) {
        snprintf(cells[c], sizeof cells[c], "-");
    }
    snprintf(cells[12], sizeof cells[12], "%.1f / -", r->bytes / st / 1e9);
    if (!r->has[V_REPACK]) {
        snprintf(cells[8], sizeof cells[8], "not taken");  // CPU_REPACK does not take this type here
    } else {
        const double rp = r->med[V_REPACK];
        snprintf(cells[8], sizeof cells[8], "%.3f", rp * 1e3);
        if (r->has[V_NREPACK]) {
            snprintf(cells[9], sizeof cells[9], "%.3f", r->med[V_NREPACK] * 1e3);
            snprintf(cells[10], sizeof cells[10], "**%.3f**", r->med[V_NREPACK] / rp);
        }
        if (r->has[V_REPACK2]) {
            snprintf(cells[11], sizeof cells[11], "%.3f", r->med[V_REPACK2] / rp);
        }
        snprintf(cells[12], sizeof cells[12], "%.1f / %.1f", r->bytes / st / 1e9, r->bytes / rp / 1e9);
    }
    double noise = 0;
    for (int v = 0; v < V_COUNT; v++) {
        if (r->has[v] && r->iqr[v] / r->med[v] > noise) {
            noise = r->iqr[v] / r->med[v];
        }
    }
    snprintf(cells[13], sizeof cells[13], "%.0f%%", noise * 100);
    snprintf(cells[14], sizeof cells[14], "%.0f%%", r->others * 100);
    snprintf(cells[15], sizeof cells[15], "%s", r->check);
    print_cells(cells);
}

// ---------------------------------------------------------------------------------------
// one case: a shape and a type, both modes

static int type_fits_shape(enum ggml_type type, const struct shape * s) {
    return s->n_embd % ggml_blck_size(type) == 0;
}

// distinct experts per token, uniform
static void gen_ids(int32_t * ids, int64_t n_used, int64_t n_tokens, int64_t n_expert, uint64_t * rng) {
    for (int64_t t = 0; t < n_tokens; t++) {
        for (int64_t k = 0; k < n_used; k++) {
            int32_t x;
            int     dup;
            do {
                x   = (int32_t) (rnd_next(rng) % (uint64_t) n_expert);
                dup = 0;
                for (int64_t q = 0; q < k; q++) {
                    dup |= ids[t * n_used + q] == x;
                }
            } while (dup);
            ids[t * n_used + k] = x;
        }
    }
}

static int64_t distinct_experts(const int32_t * ids, int64_t n, int64_t n_expert, uint8_t * seen) {
    memset(seen, 0, (size_t) n_expert);
    int64_t d = 0;
    for (int64_t i = 0; i < n; i++) {
        d += !seen[ids[i]];
        seen[ids[i]] = 1;
    }
    return d;
}

// the hook's op counter of the op benchmarked
static uint64_t hook_ops(const NumaMoeStats * st) {
    return g_mm ? st->mm_ops_computed : st->ops_computed;
}

// ops the hook computes per run of variant v: every numa-moe op, except (--op mm) batches of
// two or more tokens in ggml's layout, which ggml-cpu's own kernel computes
static int hook_expected(int v, int64_t n_tokens) {
    return v == V_NREPACK || (v == V_NUMA && (!g_mm || n_tokens == 1));
}

static void run_mode(struct result * r, struct weights * wv, const int * has, const char * mode) {
    const struct shape * s        = r->s;
    const int64_t        n_tokens = !strcmp(mode, "decode") ? 1 : g_opt.prefill_tokens;
    const int            decode   = n_tokens == 1;
    int                  rounds   = g_opt.iters ? g_opt.iters : (decode ? (g_opt.quick ? 30 : 100) : (g_opt.quick ? 6 : 8));
    int                  warmup   = g_opt.warmup >= 0 ? g_opt.warmup : (decode ? 5 : 1);
    int                  nv       = 0;  // variants timed
    for (int v = 0; v < V_COUNT; v++) {
        nv += has[v] != 0;
    }
    if (rounds < 2 * nv) {
        rounds = 2 * nv;  // see the offsets below
    }
    r->mode     = mode;
    r->n_tokens = n_tokens;
    r->n_expert = wv[V_STOCK].w->ne[2];
    r->n_rows   = wv[V_STOCK].w->ne[1];
    for (int v = 0; v < V_COUNT; v++) {
        r->has[v] = has[v];
    }

    uint64_t rng = g_opt.seed ^ (uint64_t) n_tokens * 0x1234567ull;
    float *  act = malloc(sizeof(float) * (size_t) (s->n_embd * n_tokens));
    for (int64_t i = 0; i < s->n_embd * n_tokens; i++) {
        act[i] = rnd_normal(&rng);
    }
    // the routing sequence: one entry per round. The j-th variant takes entry (i + j*D) mod
    // nseq in round i (D = nseq / variants >= 2): every variant walks the whole sequence,
    // and no two consecutive ops (the order rotates every round) share their routing.
    // --op mm has no routing (per = 0): every op reads the whole matrix.
    const int64_t per  = g_mm ? 0 : s->n_used * n_tokens;
    const int     nseq = rounds;
    int32_t *     seq  = malloc(sizeof(int32_t) * (size_t) (per * nseq + 1));
    int32_t *     wseq = malloc(sizeof(int32_t) * (size_t) (per * (warmup + 1) + 1));
    uint8_t *     seen = malloc((size_t) r->n_expert);
    r->bytes           = (double) ggml_nbytes(wv[V_STOCK].w);
    if (!g_mm) {
        for (int i = 0; i < nseq; i++) {
            gen_ids(seq + (size_t) i * per, s->n_used, n_tokens, r->n_expert, &rng);
        }
        for (int i = 0; i < warmup + 1; i++) {
            gen_ids(wseq + (size_t) i * per, s->n_used, n_tokens, r->n_expert, &rng);
        }
        double       bytes        = 0;
        const double expert_bytes = (double) wv[V_STOCK].w->nb[2];
        for (int i = 0; i < nseq; i++) {
            bytes += (double) distinct_experts(seq + (size_t) i * per, per, r->n_expert, seen) * expert_bytes;
        }
        r->bytes = bytes / nseq;
    }

    struct graph g[V_COUNT];
    memset(g, 0, sizeof g);
    for (int v = 0; v < V_COUNT; v++) {
        if (has[v]) {
            graph_build(&g[v], wv[v].w, act, s->n_used, n_tokens);
        }
    }

    // correctness, once: numa-moe bitwise equal to stock, numa-moe repacked bitwise equal to
    // CPU_REPACK, and each computed by the hook (where it should: hook_expected)
    const char * tn = ggml_type_name(wv[V_STOCK].w->type);
    const size_t out_bytes = ggml_nbytes(g[V_STOCK].out);
    snprintf(r->check, sizeof r->check, "ok");
    graph_run(&g[V_STOCK], wseq);
    if (has[V_REPACK]) {
        graph_run(&g[V_REPACK], wseq);
    }
    const int checked[2][2] = { { V_NUMA, V_STOCK }, { V_NREPACK, V_REPACK } };  // (numa-moe variant, its reference)
    for (int c = 0; c < 2; c++) {
        const int v = checked[c][0], ref = checked[c][1];
        if (!has[v]) {
            continue;
        }
        NumaMoeStats st0, st1;
        numa_moe_stats_get(&st0);
        graph_run(&g[v], wseq);
        numa_moe_stats_get(&st1);
        char why[128] = "";
        if (memcmp(g[ref].out->data, g[v].out->data, out_bytes) != 0) {
            snprintf(why, sizeof why, "**MISMATCH** (%s vs %s)", k_variant_names[v], k_variant_names[ref]);
            fprintf(stderr, "\n*** MISMATCH: %s %s %s: %s's output differs from %s's ***\n\n", s->name, tn, mode, k_variant_names[v],
                    k_variant_names[ref]);
        } else if (hook_ops(&st1) - hook_ops(&st0) != (uint64_t) hook_expected(v, n_tokens) || st1.ops_declined != st0.ops_declined) {
            snprintf(why, sizeof why, "**HOOK %s** (%s)", hook_expected(v, n_tokens) ? "NOT USED" : "USED", k_variant_names[v]);
            fprintf(stderr, "\n*** MISMATCH: %s %s %s: numa-moe computed %" PRIu64 " ops of %s, declined %" PRIu64 " (want %d, 0) ***\n\n",
                    s->name, tn, mode, hook_ops(&st1) - hook_ops(&st0), k_variant_names[v], st1.ops_declined - st0.ops_declined,
                    hook_expected(v, n_tokens));
        }
        if (why[0]) {
            g_failures++;
            if (!strcmp(r->check, "ok")) {
                snprintf(r->check, sizeof r->check, "%s", why);
            }
        }
    }
    r->repack_rel = 0;
    if (has[V_REPACK]) {
        const float * a = g[V_STOCK].out->data;
        const float * b = g[V_REPACK].out->data;
        double        num = 0, den = 0;
        for (size_t i = 0; i < out_bytes / 4; i++) {
            num += ((double) a[i] - b[i]) * ((double) a[i] - b[i]);
            den += (double) a[i] * a[i];
        }
        r->repack_rel = den > 0 ? sqrt(num / den) : 0;
        if (!(r->repack_rel < 1e-2)) {
            fprintf(stderr, "note: %s %s %s: repacked output differs from stock by %.3g (relative RMS)\n", s->name, tn, mode, r->repack_rel);
        }
    }

    // warm-up, then timed rounds; the first variant rotates every round
    int order[V_COUNT];
    for (int v = 0, k = 0; v < V_COUNT; v++) {
        if (has[v]) {
            order[k++] = v;
        }
    }
    for (int i = 0; i < warmup; i++) {
        for (int k = 0; k < nv; k++) {
            graph_run(&g[order[k]], wseq + (size_t) ((i + k) % (warmup + 1)) * per);
        }
    }
    // timed rounds; when other processes took more than g_opt.max_others of the CPUs
    // meanwhile, wait for a quiet moment and run them again (the quietest attempt counts)
    double * t[V_COUNT];
    double   best_others = 2;
    for (int v = 0; v < V_COUNT; v++) {
        t[v] = calloc((size_t) rounds, sizeof(double));
    }
    double * tt = calloc((size_t) rounds * V_COUNT, sizeof(double));
    for (int attempt = 0; attempt <= g_opt.retries; attempt++) {
        if (attempt > 0) {
            fprintf(stderr, "  other processes used %.0f%% of the CPUs during %s: waiting for a quiet moment, run %d\n",
                    best_others * 100, mode, attempt + 1);
            wait_quiet(30);
        }
        struct cpu_sample c0, c1;
        NumaMoeStats st0, st1;
        cpu_sample(&c0);
        numa_moe_stats_get(&st0);
        int numa_runs = 0;
        for (int i = 0; i < rounds; i++) {
            for (int k = 0; k < nv; k++) {
                const int j = (i + k) % nv;
                const int v = order[j];
                tt[v * rounds + i] = graph_run(&g[v], seq + (size_t) ((i + j * (nseq / nv)) % nseq) * per);
                numa_runs += hook_expected(v, n_tokens);
            }
        }
        numa_moe_stats_get(&st1);
        cpu_sample(&c1);
        if (hook_ops(&st1) - hook_ops(&st0) != (uint64_t) numa_runs && !strcmp(r->check, "ok")) {
            snprintf(r->check, sizeof r->check, "**HOOK NOT USED**");
            fprintf(stderr, "\n*** MISMATCH: %s %s %s: numa-moe computed %" PRIu64 " of %d timed ops ***\n\n", s->name, tn, mode,
                    hook_ops(&st1) - hook_ops(&st0), numa_runs);
            g_failures++;
        }
        const double others = others_busy(&c0, &c1);
        if (others < best_others) {
            best_others = others;
            for (int v = 0; v < V_COUNT; v++) {
                memcpy(t[v], tt + v * rounds, sizeof(double) * (size_t) rounds);
            }
        }
        if (best_others <= g_opt.max_others) {
            break;
        }
    }
    free(tt);
    r->others = best_others;
    for (int v = 0; v < V_COUNT; v++) {
        if (has[v]) {
            r->med[v] = quantile(t[v], rounds, 0.5);
            r->iqr[v] = quantile(t[v], rounds, 0.75) - quantile(t[v], rounds, 0.25);
        }
        free(t[v]);
        if (g[v].ctx) {
            ggml_free(g[v].ctx);
        }
    }
    free(seen);
    free(wseq);
    free(seq);
    free(act);
}

static int mode_selected(const char * m) {
    return !g_opt.mode || !strcmp(g_opt.mode, m);
}

static void run_case(const struct shape * s, enum ggml_type type) {
    const char * modes[2] = { "decode", "prefill" };
    if (!type_fits_shape(type, s)) {
        for (int m = 0; m < 2; m++) {
            if (mode_selected(modes[m]) && g_nres < MAX_RESULTS) {
                struct result * r = &g_res[g_nres++];
                memset(r, 0, sizeof *r);
                r->s = s, r->type = type, r->mode = modes[m], r->na = 1;
                snprintf(r->check, sizeof r->check, "K=%" PRId64 " is not a multiple of %s's %" PRId64 "-wide blocks",
                         s->n_embd, ggml_type_name(type), ggml_blck_size(type));
                print_row(r);
                fflush(stdout);
            }
        }
        return;
    }

    // the repacked variants where CPU_REPACK takes the type; the A/A controls as --control asks
    const int repacked = repack_takes(type, s->n_embd, s->n_ff);
    int       has[V_COUNT];
    has[V_STOCK]   = 1;
    has[V_NUMA]    = 1;
    has[V_REPACK]  = repacked;
    has[V_NREPACK] = repacked && g_nrepack_buft;
    has[V_REPACK2] = repacked && g_opt.control != C_NONE;
    has[V_STOCK2]  = g_opt.control == C_BOTH || (g_opt.control == C_AUTO && !repacked);
    // experts (--op mm: rows) that fit the budget with every copy alive at once: whole
    // experts, at least 32, a multiple of 8 (rows: at least 1024 or all, a multiple of 256)
    const double expert_bytes = (double) ggml_row_size(type, s->n_embd) * (double) s->n_ff;
    const double unit_bytes   = g_mm ? (double) ggml_row_size(type, s->n_embd) : expert_bytes;
    const int64_t units       = g_mm ? s->n_ff : s->n_expert, step = g_mm ? 256 : 8;
    const int64_t min_units   = g_mm ? (units < 1024 ? units : 1024) : 32;
    double       budget       = g_opt.mem_gib * (double) (1ull << 30);
    const double avail        = mem_available_gib();
    if (avail > 0 && (avail - 3.0) * (double) (1ull << 30) < budget) {
        budget = (avail - 3.0) * (double) (1ull << 30);
        fprintf(stderr, "note: only %.1f GiB available: budget %.1f GiB for this case\n", avail, budget / (double) (1ull << 30));
    }
    int copies = 0;
    for (int v = 0; v < V_COUNT; v++) {
        copies += has[v];
    }
    int64_t n_units = units;
    if (copies * unit_bytes * (double) n_units > budget) {
        n_units = (int64_t) (budget / (copies * unit_bytes)) / step * step;
    }
    const int64_t n_expert = g_mm ? 1 : n_units, n_ff = g_mm ? n_units : s->n_ff;
    const double  copy_bytes = unit_bytes * (double) n_units;
    if (n_units < min_units) {
        for (int m = 0; m < 2; m++) {
            if (mode_selected(modes[m]) && g_nres < MAX_RESULTS) {
                struct result * r = &g_res[g_nres++];
                memset(r, 0, sizeof *r);
                r->s = s, r->type = type, r->mode = modes[m], r->skipped = 1, r->n_tokens = m ? g_opt.prefill_tokens : 1;
                snprintf(r->check, sizeof r->check, "skipped: fewer than %" PRId64 " %s fit the memory budget", min_units,
                         g_mm ? "rows" : "experts");
                print_row(r);
                fflush(stdout);
            }
        }
        return;
    }

    double          t0 = now_s();
    struct weights  wv[V_COUNT];
    memset(wv, 0, sizeof wv);
    if (!weights_alloc(&wv[V_STOCK], ggml_backend_cpu_buffer_type(), type, s, n_ff, n_expert)) {
        fprintf(stderr, "mmid_bench: cannot allocate %.2f GB of stock weights\n", copy_bytes / 1e9);
        exit(2);
    }
    if (g_opt.stock_thp) {
        advise_thp(wv[V_STOCK].w);
    }
    fill_weights(wv[V_STOCK].w, wv[V_STOCK].w->data, g_opt.seed + (uint64_t) type * 977u + (uint64_t) s->n_embd);
    if (numa_moe_config_set_map(g_opt.map) != NUMA_MOE_RESULT_OK) {
        fprintf(stderr, "mmid_bench: numa_moe_config_set_map(%s): %s\n", g_opt.map, numa_err());
        exit(2);
    }
    // every other copy from the stock one (numa-moe's and CPU_REPACK's buffers convert it to
    // their layouts as they are written, as llama.cpp's loader writes them)
    for (int v = V_NUMA; v < V_COUNT; v++) {
        if (!has[v]) {
            continue;
        }
        const ggml_backend_buffer_type_t buft = v == V_NUMA      ? g_numa_buft
                                                : v == V_NREPACK ? g_nrepack_buft
                                                : v == V_REPACK || v == V_REPACK2 ? g_repack_buft
                                                                                  : ggml_backend_cpu_buffer_type();
        const int numa = v == V_NUMA || v == V_NREPACK;
        NumaMoeStats st0, st1;
        numa_moe_stats_get(&st0);
        if (!weights_alloc(&wv[v], buft, type, s, n_ff, n_expert)) {
            fprintf(stderr, "mmid_bench: cannot allocate the %s weights%s%s\n", k_variant_names[v], numa ? ": " : "", numa ? numa_err() : "");
            exit(2);
        }
        numa_moe_stats_get(&st1);
        if (numa && st1.tensors_placed != st0.tensors_placed + 1) {
            fprintf(stderr, "\n*** MISMATCH: numa-moe did not place %s in %s (map %s) ***\n\n", ggml_get_name(wv[v].w),
                    ggml_backend_buft_name(buft), g_opt.map);
            g_failures++;
        }
        if (g_opt.stock_thp && !numa) {
            advise_thp(wv[v].w);
        }
        ggml_backend_tensor_set(wv[v].w, wv[V_STOCK].w->data, 0, ggml_nbytes(wv[V_STOCK].w));
    }
    fprintf(stderr, "%s %s: %" PRId64 " of %" PRId64 " %s, %.2f GB per copy, %d copies, set up in %.1f s\n", s->name, ggml_type_name(type),
            n_units, units, g_mm ? "rows" : "experts", copy_bytes / 1e9, copies, now_s() - t0);

    for (int m = 0; m < 2; m++) {
        if (!mode_selected(modes[m]) || g_nres >= MAX_RESULTS) {
            continue;
        }
        struct result * r = &g_res[g_nres++];
        memset(r, 0, sizeof *r);
        r->s    = s;
        r->type = type;
        double t1 = now_s();
        run_mode(r, wv, has, modes[m]);
        fprintf(stderr, "  %s: %.1f s\n", modes[m], now_s() - t1);
        print_row(r);
        fflush(stdout);
    }
    for (int v = 0; v < V_COUNT; v++) {
        weights_free(&wv[v]);
    }
}

// ---------------------------------------------------------------------------------------

// whether `name` is one of the comma-separated `list` (NULL: everything)
static int in_list(const char * list, const char * name) {
    if (!list) {
        return 1;
    }
    const size_t n = strlen(name);
    for (const char * p = list; *p;) {
        const char * end = strchr(p, ',');
        const size_t len = end ? (size_t) (end - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) {
            return 1;
        }
        p += len + (end != NULL);
    }
    return 0;
}

static int case_selected(size_t si, size_t ti) {
    return in_list(g_opt.shape, k_shapes[si].name) && in_list(g_opt.type, ggml_type_name(k_types[ti]));
}

int main(int argc, char ** argv) {
    if (!parse_args(argc, argv)) {
        return 2;
    }
    // every name in --shape and --type must be known (a typo would drop cases silently)
    for (int which = 0; which < 2; which++) {
        const char * list = which ? g_opt.type : g_opt.shape;
        for (const char * p = list; p && *p;) {
            const char * end   = strchr(p, ',');
            const size_t len   = end ? (size_t) (end - p) : strlen(p);
            int          known = 0;
            const size_t n     = which ? k_ntypes : k_nshapes;
            for (size_t i = 0; i < n; i++) {
                const char * name = which ? ggml_type_name(k_types[i]) : k_shapes[i].name;
                known |= strlen(name) == len && !strncmp(p, name, len);
            }
            if (!known) {
                fprintf(stderr, "mmid_bench: unknown %s \"%.*s\" (see --help)\n", which ? "type" : "shape", (int) len, p);
                return 2;
            }
            p += len + (end != NULL);
        }
    }
    int matched = 0;
    for (size_t si = 0; si < k_nshapes; si++) {
        for (size_t ti = 0; ti < k_ntypes; ti++) {
            matched += case_selected(si, ti);
        }
    }
    if (!matched) {
        fprintf(stderr, "mmid_bench: no case matches --shape/--type (see --help)\n");
        return 2;
    }
    ggml_log_set(quiet_log, NULL);
    ggml_cpu_init();
    find_bufts();
    if (!g_numa_buft) {
        fprintf(stderr, "mmid_bench: ggml-cpu has no NUMA_MOE extra buffer type (patched ggml with libnuma_moe.so needed)\n");
        return 2;
    }
    if (g_repack_buft && !g_nrepack_buft) {
        // ggml-cpu repacks, so numa-moe should offer its repacked type next to its standard one
        fprintf(stderr, "\n*** MISMATCH: ggml-cpu has CPU_REPACK but no NUMA_MOE_REPACK buffer type ***\n\n");
        g_failures++;
    }

    size_t nodes = 0;
    numa_moe_topology_node_count(&nodes);
    const char * topo = getenv("NUMA_MOE_TOPOLOGY");
    char         la[64];
    loadavg(la, sizeof la);
    time_t     now = time(NULL);
    struct tm  tmv;
    char       date[64];
    gmtime_r(&now, &tmv);
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", &tmv);

    static const char * const controls[] = {
        [C_AUTO] = "a second CPU_REPACK copy where CPU_REPACK takes the type, else a second stock copy",
        [C_BOTH] = "second stock and CPU_REPACK copies",
        [C_NONE] = "none",
    };
    printf("mmid_bench%s (numa-moe %s): %s%s, %d threads, map \"%s\", %zu NUMA node(s) as numa-moe sees them%s%s%s, "
           "CPU_REPACK %s, NUMA_MOE_REPACK %s, LLC flush before every op: %s, stock THP: %s, A/A control: %s, load average %s\n\n",
           g_mm ? " --op mm" : "", numa_moe_version(), date, g_mm ? ", MUL_MAT over weight matrices" : "", g_opt.threads, g_opt.map, nodes, topo ? " (NUMA_MOE_TOPOLOGY=\"" : "", topo ? topo : "",
           topo ? "\")" : "", g_repack_buft ? "present" : "absent", g_nrepack_buft ? "present" : "absent", g_opt.flush ? "yes" : "no",
           g_opt.stock_thp ? "asked" : "no (as ggml allocates)", controls[g_opt.control], la);

    if (g_opt.bw_gib > 0) {
        double best = 0, med = 0;
        if (measure_bandwidth(g_opt.bw_gib, g_opt.threads, &best, &med)) {
            printf("Streaming read, %d threads summing a %.2f GiB buffer: %.1f GB/s best, %.1f GB/s median of 7 (before the cases)\n\n",
                   g_opt.threads, g_opt.bw_gib, best, med);
        }
    }

    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(g_opt.threads);
    struct ggml_threadpool *      tp  = ggml_threadpool_new(&tpp);
    g_backend                         = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(g_backend, g_opt.threads);
    ggml_backend_cpu_set_threadpool(g_backend, tp);

    print_header();
    fflush(stdout);
    for (size_t si = 0; si < k_nshapes; si++) {
        for (size_t ti = 0; ti < k_ntypes; ti++) {
            if (case_selected(si, ti)) {
                run_case(&k_shapes[si], k_types[ti]);
            }
        }
    }

    loadavg(la, sizeof la);
    printf("\nms: median time per op. numa-moe: weights in NUMA_MOE (ggml's standard layout); numa-moe repacked: in "
           "NUMA_MOE_REPACK (CPU_REPACK's layout and kernels), where CPU_REPACK takes the type; stock+repack: in CPU_REPACK, "
           "as llama.cpp ships. Time ratios < 1.000: faster than the baseline. A/A: a second copy of the baseline, timed like the "
           "others: how far from 1.000 a ratio of two identical variants lands in this run. GB/s: bytes of the %s / median "
           "time. noise: largest (p75-p25)/median of the variants; others: share of the CPUs other processes used while it was "
           "timed; load average at the end %s\n",
           g_mm ? "weight matrix" : "routed experts' weights", la);
    if (g_mm) {
        printf("K x N: the matrix's n_embd x rows; rows: those allocated (fewer where the copies did not fit --mem-gib). "
               "numa-moe's hook computes decode in both of its layouts and prefill in the repacked one; prefill in "
               "NUMA_MOE is ggml-cpu's own kernel (sgemm or tiled) over numa-moe's placed bytes.\n");
    }
    if (g_opt.bw_gib > 0) {
        double best = 0, med = 0;
        if (measure_bandwidth(g_opt.bw_gib, g_opt.threads, &best, &med)) {
            printf("Streaming read again after the cases: %.1f GB/s best, %.1f GB/s median of 7 (this machine's memory bandwidth "
                   "varies with its neighbours' load: compare variants within a row, not rows of different runs)\n",
                   best, med);
        }
    }
    NumaMoeStats st;
    numa_moe_stats_get(&st);
    printf("numa-moe: %" PRIu64 " %s ops computed by the hook, %" PRIu64 " declined; %s\n", hook_ops(&st), g_mm ? "MUL_MAT" : "MUL_MAT_ID",
           st.ops_declined,
           g_failures ? "CHECKS FAILED (see **MISMATCH** above)" : "every numa-moe output bitwise equal to stock's, "
                                                                      "every numa-moe repacked output to CPU_REPACK's\n");

    ggml_backend_free(g_backend);
    ggml_threadpool_free(tp);
    free(g_flush_buf);
    return g_failures ? 1 : 0;
}
