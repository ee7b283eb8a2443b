// make-moe-model: write a random-weight Mixture-of-Experts GGUF (arch "qwen3moe") that the
// pinned llama.cpp can load, run and benchmark. Only ggml's public C API is used (gguf.h, ggml.h).
//
// Usage:
//   make-moe-model --out PATH [--experts N] [--used K] [--embd E] [--ff F] [--layers L]
//                  [--vocab V] [--heads H] [--head-kv HKV] [--head-dim D] [--ctx N]
//                  [--type T] [--dense-type T] [--seed S] [--std X] [--embd-std X]
//                  [--threads N] [--align A] [--exact] [--fake-imatrix]
//
//   make-moe-model --out /tmp/moe.gguf --experts 32 --used 4 --embd 256 --ff 128
//                  --layers 2 --vocab 256 --type q8_0
//   make-moe-model --out /tmp/a3b.gguf --experts 128 --used 8 --embd 2048 --ff 768 --layers 4
//                  --vocab 1024 --heads 32 --head-kv 4 --head-dim 128 --type q4_K
//
// The tokenizer is llama.cpp's dummy "test" tokenizer (tokenizer.ggml.model = "test", tokens
// "tok_<i>", scores 0): any text tokenizes, so llama-completion and llama-bench run on the model.
// Data is generated per chunk of rows by worker threads and written with pwrite() at the offsets
// the gguf layout gives, so memory use stays small whatever the model size. Quantized tensors are
// assembled from a pool of POOL_BLOCKS blocks quantized once from random normal data (each row
// picks its blocks at random): quantized blocks are self-contained, so this is a valid tensor of
// random-looking weights, written at memcpy speed even for slow quantizers (K, IQ types).
// --exact quantizes every weight instead (q4_K: ~13 M weights/s per core).
// The bytes written depend only on the options and --seed, not on --threads.
// Run with --help for all options and their defaults.

#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64

#include "ggml.h"
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define ARCH "qwen3moe"
#define MAX_EXPERTS 1024          // LLAMA_MAX_EXPERTS in the pinned llama.cpp
#define MAX_LAYERS 512            // LLAMA_MAX_LAYERS
#define UNIT_ELEMS (1 << 20)      // floats generated per work unit (rounded to whole rows)
#define POOL_BLOCKS 16384         // quantized blocks in a type's pool (POOL_ROWS rows)
#define POOL_ROWS 2048

// ---------------------------------------------------------------------------------------------
// options

struct opts {
    const char * out;
    int64_t n_expert, n_used, n_embd, n_ff, n_layer, n_vocab, n_head, n_head_kv, head_dim, n_ctx;
    enum ggml_type type, dense_type;
    uint64_t seed;
    double std, embd_std;
    int threads;
    uint32_t align;
    bool fake_imatrix;
    bool exact;
};

static void usage(FILE * f, const char * argv0) {
    fprintf(f,
        "usage: %s --out PATH [options]\n"
        "\n"
        "Writes a random-weight Mixture-of-Experts GGUF (arch " ARCH ") loadable by llama.cpp.\n"
        "\n"
        "  --out PATH        output file (written to PATH.tmp, then renamed)\n"
        "  --experts N       experts per layer (default 32, at most %d)\n"
        "  --used K          experts used per token (default 4)\n"
        "  --embd E          embedding length (default 256)\n"
        "  --ff F            expert feed-forward length (default 128)\n"
        "  --layers L        number of layers (default 2)\n"
        "  --vocab V         vocabulary size (default 256)\n"
        "  --heads H         attention heads (default 4)\n"
        "  --head-kv HKV     key/value heads, must divide H (default H)\n"
        "  --head-dim D      head size, even (default E/H); Qwen3-30B-A3B uses 128\n"
        "  --ctx N           training context length written to the model (default 4096)\n"
        "  --type T          type of ffn_{gate,up,down}_exps (default q4_K)\n"
        "  --dense-type T    type of the other 2-D weights: token_embd, output, attn_* (default f16)\n"
        "                    (norms and the router ffn_gate_inp are always f32)\n"
        "  --seed S          random seed (default 42)\n"
        "  --std X           stdev of the 2-D weights (default 1/sqrt(row length), 0.25/sqrt(..)\n"
        "                    for attn_output: matmuls keep unit scale, routing stays balanced\n"
        "                    in deep layers, the experts' output is ~20%% of the residual);\n"
        "                    norms are 1 +- 0.1 (q/k norms 3 +- 0.1), the router ffn_gate_inp\n"
        "                    has stdev 1/sqrt(E) (routing logits ~N(0,1))\n"
        "  --embd-std X      stdev of token_embd (default 1.0): large against the attention and\n"
        "                    expert outputs, so each token keeps its own hidden state and routing\n"
        "                    differs from token to token in every layer\n"
        "  --threads N       worker threads (default: online CPUs)\n"
        "  --align A         GGUF data alignment, a power of 2 (default 32; 4096 page-aligns tensors)\n"
        "  --exact           quantize every weight instead of sampling blocks from a pool of\n"
        "                    %d quantized random blocks (slow for K and IQ types)\n"
        "  --fake-imatrix    allow types that need an importance matrix (iq2_xxs iq2_xs iq1_s)\n"
        "                    by passing a uniform one\n"
        "\n"
        "Types: f32 f16 bf16 q4_0 q4_1 q5_0 q5_1 q8_0 q2_K q3_K q4_K q5_K q6_K iq4_nl iq4_xs\n"
        "       mxfp4 nvfp4 q1_0 q2_0 tq1_0 tq2_0 iq3_xxs iq3_s iq2_s iq1_m (+ iq2_xxs iq2_xs iq1_s\n"
        "       with --fake-imatrix). The row length of each tensor must be a multiple of the type's\n"
        "       block size (32 for q*_0/q*_1/iq4_nl/mxfp4, 256 for K and most iq types).\n",
        argv0, MAX_EXPERTS, POOL_BLOCKS);
}

// the types ggml_quantize_chunk() can produce
static const enum ggml_type k_types[] = {
    GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16,
    GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0,
    GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K,
    GGML_TYPE_IQ4_NL, GGML_TYPE_IQ4_XS, GGML_TYPE_MXFP4, GGML_TYPE_NVFP4,
    GGML_TYPE_Q1_0, GGML_TYPE_Q2_0, GGML_TYPE_TQ1_0, GGML_TYPE_TQ2_0,
    GGML_TYPE_IQ3_XXS, GGML_TYPE_IQ3_S, GGML_TYPE_IQ2_S, GGML_TYPE_IQ1_M,
    GGML_TYPE_IQ2_XXS, GGML_TYPE_IQ2_XS, GGML_TYPE_IQ1_S,
};

static void die(const char * fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void die(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("make-moe-model: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static enum ggml_type parse_type(const char * s, const char * opt) {
    for (size_t i = 0; i < sizeof(k_types)/sizeof(k_types[0]); i++) {
        if (strcasecmp(s, ggml_type_name(k_types[i])) == 0) {
            return k_types[i];
        }
    }
    fprintf(stderr, "make-moe-model: error: %s: unknown or unsupported type '%s'; one of:", opt, s);
    for (size_t i = 0; i < sizeof(k_types)/sizeof(k_types[0]); i++) {
        fprintf(stderr, " %s", ggml_type_name(k_types[i]));
    }
    fputc('\n', stderr);
    exit(1);
}

static int64_t parse_int(const char * s, const char * opt, int64_t lo, int64_t hi) {
    char * end = NULL;
    errno = 0;
    const long long v = strtoll(s, &end, 0);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
        die("%s: expected an integer in [%" PRId64 ", %" PRId64 "], got '%s'", opt, lo, hi, s);
    }
    return (int64_t) v;
}

static void parse_opts(int argc, char ** argv, struct opts * o) {
    *o = (struct opts) {
        .out = NULL, .n_expert = 32, .n_used = 4, .n_embd = 256, .n_ff = 128, .n_layer = 2,
        .n_vocab = 256, .n_head = 4, .n_head_kv = 0, .head_dim = 0, .n_ctx = 4096,
        .type = GGML_TYPE_Q4_K, .dense_type = GGML_TYPE_F16, .seed = 42, .std = 0.0, .embd_std = 1.0,
        .threads = 0, .align = 0, .fake_imatrix = false, .exact = false,
    };
    for (int i = 1; i < argc; i++) {
        const char * a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout, argv[0]);
            exit(0);
        }
        if (strcmp(a, "--fake-imatrix") == 0) {
            o->fake_imatrix = true;
            continue;
        }
        if (strcmp(a, "--exact") == 0) {
            o->exact = true;
            continue;
        }
        if (i + 1 >= argc) {
            usage(stderr, argv[0]);
            die("%s: missing value (or unknown option)", a);
        }
        const char * v = argv[++i];
        const int64_t big = INT64_C(1) << 31;
        if      (strcmp(a, "--out") == 0)        o->out        = v;
        else if (strcmp(a, "--experts") == 0)    o->n_expert   = parse_int(v, a, 1, MAX_EXPERTS);
        else if (strcmp(a, "--used") == 0)       o->n_used     = parse_int(v, a, 1, MAX_EXPERTS);
        else if (strcmp(a, "--embd") == 0)       o->n_embd     = parse_int(v, a, 1, big);
        else if (strcmp(a, "--ff") == 0)         o->n_ff       = parse_int(v, a, 1, big);
        else if (strcmp(a, "--layers") == 0)     o->n_layer    = parse_int(v, a, 1, MAX_LAYERS);
        else if (strcmp(a, "--vocab") == 0)      o->n_vocab    = parse_int(v, a, 1, big);
        else if (strcmp(a, "--heads") == 0)      o->n_head     = parse_int(v, a, 1, 4096);
        else if (strcmp(a, "--head-kv") == 0)    o->n_head_kv  = parse_int(v, a, 1, 4096);
        else if (strcmp(a, "--head-dim") == 0)   o->head_dim   = parse_int(v, a, 2, 65536);
        else if (strcmp(a, "--ctx") == 0)        o->n_ctx      = parse_int(v, a, 1, big);
        else if (strcmp(a, "--type") == 0)       o->type       = parse_type(v, a);
        else if (strcmp(a, "--dense-type") == 0) o->dense_type = parse_type(v, a);
        else if (strcmp(a, "--seed") == 0)       o->seed       = (uint64_t) parse_int(v, a, 0, INT64_MAX);
        else if (strcmp(a, "--threads") == 0)    o->threads    = (int) parse_int(v, a, 1, 1024);
        else if (strcmp(a, "--align") == 0)      o->align      = (uint32_t) parse_int(v, a, 1, 1 << 30);
        else if (strcmp(a, "--std") == 0 || strcmp(a, "--embd-std") == 0) {
            char * end = NULL;
            const double x = strtod(v, &end);
            if (end == v || *end != '\0' || !(x > 0.0) || !(x < 10.0)) {
                die("%s: expected a number in (0, 10), got '%s'", a, v);
            }
            *(strcmp(a, "--std") == 0 ? &o->std : &o->embd_std) = x;
        } else {
            usage(stderr, argv[0]);
            die("unknown option '%s'", a);
        }
    }
    if (!o->out) {
        usage(stderr, argv[0]);
        die("--out PATH is required");
    }
    if (o->n_used > o->n_expert) {
        die("--used (%" PRId64 ") must not exceed --experts (%" PRId64 ")", o->n_used, o->n_expert);
    }
    if (o->n_head_kv == 0) {
        o->n_head_kv = o->n_head;
    }
    if (o->n_head % o->n_head_kv != 0) {
        die("--head-kv (%" PRId64 ") must divide --heads (%" PRId64 ")", o->n_head_kv, o->n_head);
    }
    if (o->head_dim == 0) {
        if (o->n_embd % o->n_head != 0) {
            die("--heads (%" PRId64 ") must divide --embd (%" PRId64 ") unless --head-dim is given",
                o->n_head, o->n_embd);
        }
        o->head_dim = o->n_embd / o->n_head;
    }
    if (o->head_dim % 2 != 0) {
        die("head size %" PRId64 " must be even (rope)", o->head_dim);
    }
    if (o->align != 0 && (o->align & (o->align - 1)) != 0) {
        die("--align must be a power of 2, got %u", o->align);
    }
    if (o->threads == 0) {
        const long n = sysconf(_SC_NPROCESSORS_ONLN);
        o->threads = n > 0 ? (int) n : 1;
    }
    const enum ggml_type ts[2] = { o->type, o->dense_type };
    for (int i = 0; i < 2; i++) {
        if (ggml_quantize_requires_imatrix(ts[i]) && !o->fake_imatrix) {
            die("type %s needs an importance matrix (imatrix) to quantize, which this tool does not "
                "have; pick another type or pass --fake-imatrix to quantize with a uniform one "
                "(poorer quality, fine for tests)", ggml_type_name(ts[i]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// random numbers: splitmix64 stream, 4 uniforms of 16 bits per draw, summed (Irwin-Hall n=4)
// which is close enough to normal for weights and much faster than Box-Muller.

static inline uint64_t splitmix64(uint64_t * s) {
    uint64_t z = (*s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static inline uint64_t mix3(uint64_t a, uint64_t b, uint64_t c) {
    uint64_t s = a ^ (b * UINT64_C(0xD6E8FEB86659FD93)) ^ (c * UINT64_C(0xA0761D6478BD642F));
    splitmix64(&s);
    return splitmix64(&s);
}

// fill dst[0..n) with mean + std * (approximately standard normal)
static void fill_normal(float * dst, int64_t n, uint64_t seed, float mean, float std) {
    uint64_t s = seed;
    // sum of 4 U(0,1) has mean 2 and variance 1/3; each uniform is k/65536 + 1/131072
    const float scale = std * sqrtf(3.0f) / 65536.0f;
    const float off   = mean - std * sqrtf(3.0f) * (2.0f - 4.0f / 131072.0f);
    for (int64_t i = 0; i < n; i++) {
        const uint64_t r = splitmix64(&s);
        const uint32_t sum = (uint32_t) (r & 0xFFFF) + (uint32_t) ((r >> 16) & 0xFFFF)
                           + (uint32_t) ((r >> 32) & 0xFFFF) + (uint32_t) (r >> 48);
        dst[i] = (float) sum * scale + off;
    }
}

// general.file_type: the llama_ftype value (include/llama.h; the tool does not include llama.h)
// named after the expert type, so llama-bench and the loader show e.g. "Q4_K - Medium" instead
// of a guess from the most frequent tensor type (the f32 norms in a small model)
static int llama_ftype_of(enum ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32:     return 0;
        case GGML_TYPE_F16:     return 1;
        case GGML_TYPE_Q4_0:    return 2;
        case GGML_TYPE_Q4_1:    return 3;
        case GGML_TYPE_Q8_0:    return 7;
        case GGML_TYPE_Q5_0:    return 8;
        case GGML_TYPE_Q5_1:    return 9;
        case GGML_TYPE_Q2_K:    return 10;
        case GGML_TYPE_Q3_K:    return 12;  // Q3_K_M
        case GGML_TYPE_Q4_K:    return 15;  // Q4_K_M
        case GGML_TYPE_Q5_K:    return 17;  // Q5_K_M
        case GGML_TYPE_Q6_K:    return 18;
        case GGML_TYPE_IQ2_XXS: return 19;
        case GGML_TYPE_IQ2_XS:  return 20;
        case GGML_TYPE_IQ3_XXS: return 23;
        case GGML_TYPE_IQ1_S:   return 24;
        case GGML_TYPE_IQ4_NL:  return 25;
        case GGML_TYPE_IQ3_S:   return 26;
        case GGML_TYPE_IQ2_S:   return 28;
        case GGML_TYPE_IQ4_XS:  return 30;
        case GGML_TYPE_IQ1_M:   return 31;
        case GGML_TYPE_BF16:    return 32;
        case GGML_TYPE_TQ1_0:   return 36;
        case GGML_TYPE_TQ2_0:   return 37;
        case GGML_TYPE_MXFP4:   return 38;  // MXFP4_MOE
        case GGML_TYPE_NVFP4:   return 39;
        case GGML_TYPE_Q1_0:    return 40;
        case GGML_TYPE_Q2_0:    return 41;
        default:                return -1;
    }
}

// ---------------------------------------------------------------------------------------------
// model layout

// the scales keep routing balanced in every layer and the experts' output a sizeable part of
// the residual stream: token_embd N(0, 1); q/k norms 3 (peaky attention that copies a few
// tokens rather than averaging them all into one shared vector, which would make every token
// pick the same experts in deep layers); attn_output 0.25/sqrt(n); other weights 1/sqrt(n),
// n = row length (fan-in), so matmuls keep unit scale
enum tkind { K_DENSE, K_EMBD, K_EXPERT, K_NORM, K_QKNORM, K_ROUTER, K_ATTN_OUT };

// quantized blocks of N(0, std) data, sampled to build the rows of quantized tensors
struct pool {
    enum ggml_type type;
    float std;
    char * data;
    int64_t nblocks;
    size_t block_bytes;
};

struct tdesc {
    struct ggml_tensor * t;  // metadata only (no_alloc context)
    enum tkind kind;
    float mean, std;
    size_t file_off;          // absolute file offset of the data
    size_t nbytes;
    int64_t rows_per_unit, n_units, unit0;  // work split
    const struct pool * pool; // NULL: generate and quantize every weight
};

struct model {
    struct opts o;
    struct gguf_context * gguf;
    struct ggml_context * ctx;
    struct tdesc * td;
    int n_td;
    size_t meta_size, total_size, expert_bytes;
    int64_t n_units;
    float * imatrix_ones;     // only with --fake-imatrix
    int64_t imatrix_len;
    struct pool pools[8];
    int n_pools;
};

static void add_tensor(struct model * m, int cap, enum tkind kind, enum ggml_type type,
        int64_t ne0, int64_t ne1, int64_t ne2, const char * fmt, int il) {
    if (m->n_td >= cap) {
        die("internal: too many tensors");
    }
    if (ne0 % ggml_blck_size(type) != 0) {
        char name[GGML_MAX_NAME];
        snprintf(name, sizeof(name), fmt, il);
        die("type %s has block size %" PRId64 " but %s has rows of %" PRId64 " elements; "
            "choose sizes that are multiples of %" PRId64 " or another type",
            ggml_type_name(type), ggml_blck_size(type), name, ne0, ggml_blck_size(type));
    }
    struct ggml_tensor * t;
    if (ne2 > 1) {
        t = ggml_new_tensor_3d(m->ctx, type, ne0, ne1, ne2);
    } else if (ne1 > 1) {
        t = ggml_new_tensor_2d(m->ctx, type, ne0, ne1);
    } else {
        t = ggml_new_tensor_1d(m->ctx, type, ne0);
    }
    ggml_format_name(t, fmt, il);
    struct tdesc * d = &m->td[m->n_td++];
    memset(d, 0, sizeof(*d));
    d->t = t;
    d->kind = kind;
    switch (kind) {
        case K_NORM:   d->mean = 1.0f; d->std = 0.1f; break;
        case K_ROUTER: d->mean = 0.0f; d->std = 1.0f / sqrtf((float) ne0); break;
        case K_EMBD:   d->mean = 0.0f; d->std = (float) m->o.embd_std; break;
        case K_QKNORM: d->mean = 3.0f; d->std = 0.1f; break;
        case K_ATTN_OUT:
                       d->mean = 0.0f;
                       d->std = m->o.std > 0.0 ? (float) m->o.std : 0.25f / sqrtf((float) ne0); break;
        default:       d->mean = 0.0f;
                       d->std = m->o.std > 0.0 ? (float) m->o.std : 1.0f / sqrtf((float) ne0); break;
    }
    gguf_add_tensor(m->gguf, t);
}

static void build_model(struct model * m) {
    const struct opts * o = &m->o;

    // an empty context ignores general.alignment set later, so to use another alignment the
    // context is created from a serialized header that already carries it
    if (o->align != 0) {
        struct gguf_context * tmp = gguf_init_empty();
        gguf_set_val_u32(tmp, "general.alignment", o->align);
        const size_t n = gguf_get_meta_size(tmp);
        void * buf = malloc(n);
        if (!buf) die("out of memory");
        gguf_get_meta_data(tmp, buf);
        gguf_free(tmp);
        struct gguf_init_params ip = { .no_alloc = true, .ctx = NULL };
        m->gguf = gguf_init_from_buffer(buf, n, ip);
        free(buf);
        if (!m->gguf || gguf_get_alignment(m->gguf) != o->align) {
            die("could not create a gguf context with alignment %u", o->align);
        }
    } else {
        m->gguf = gguf_init_empty();
    }
    struct gguf_context * g = m->gguf;

    char key[256];
#define KEY(suffix) (snprintf(key, sizeof(key), ARCH ".%s", suffix), key)
    gguf_set_val_str(g, "general.architecture", ARCH);
    gguf_set_val_str(g, "general.type", "model");
    char name[128];
    snprintf(name, sizeof(name), "numa-moe random %" PRId64 "x%" PRId64 " %s",
             o->n_expert, o->n_used, ggml_type_name(o->type));
    gguf_set_val_str(g, "general.name", name);
    gguf_set_val_u32(g, "general.quantization_version", GGML_QNT_VERSION);
    if (llama_ftype_of(o->type) >= 0) {
        gguf_set_val_u32(g, "general.file_type", (uint32_t) llama_ftype_of(o->type));
    }
    gguf_set_val_u32(g, KEY("vocab_size"),                       (uint32_t) o->n_vocab);
    gguf_set_val_u32(g, KEY("context_length"),                   (uint32_t) o->n_ctx);
    gguf_set_val_u32(g, KEY("embedding_length"),                 (uint32_t) o->n_embd);
    gguf_set_val_u32(g, KEY("block_count"),                      (uint32_t) o->n_layer);
    gguf_set_val_u32(g, KEY("feed_forward_length"),              (uint32_t) (o->n_ff * o->n_used));
    gguf_set_val_u32(g, KEY("expert_feed_forward_length"),       (uint32_t) o->n_ff);
    gguf_set_val_u32(g, KEY("expert_count"),                     (uint32_t) o->n_expert);
    gguf_set_val_u32(g, KEY("expert_used_count"),                (uint32_t) o->n_used);
    gguf_set_val_u32(g, KEY("attention.head_count"),             (uint32_t) o->n_head);
    gguf_set_val_u32(g, KEY("attention.head_count_kv"),          (uint32_t) o->n_head_kv);
    gguf_set_val_u32(g, KEY("attention.key_length"),             (uint32_t) o->head_dim);
    gguf_set_val_u32(g, KEY("attention.value_length"),           (uint32_t) o->head_dim);
    gguf_set_val_u32(g, KEY("rope.dimension_count"),             (uint32_t) o->head_dim);
    gguf_set_val_f32(g, KEY("rope.freq_base"),                   1000000.0f);
    gguf_set_val_f32(g, KEY("attention.layer_norm_rms_epsilon"), 1e-6f);
#undef KEY

    // dummy tokenizer, as in llama.cpp tests/test-llama-archs.cpp: text is hashed in 5-byte
    // chunks to token ids, ids detokenize to hex; no bos/eos/unk tokens
    {
        gguf_set_val_str(g, "tokenizer.ggml.model", "test");
        char ** toks = malloc(sizeof(char *) * (size_t) o->n_vocab);
        float * scores = calloc((size_t) o->n_vocab, sizeof(float));
        if (!toks || !scores) die("out of memory");
        for (int64_t i = 0; i < o->n_vocab; i++) {
            char tmp[32];
            snprintf(tmp, sizeof(tmp), "tok_%" PRId64, i);
            toks[i] = strdup(tmp);
            if (!toks[i]) die("out of memory");
        }
        gguf_set_arr_str(g, "tokenizer.ggml.tokens", (const char **) toks, (size_t) o->n_vocab);
        gguf_set_arr_data(g, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores, (size_t) o->n_vocab);
        for (int64_t i = 0; i < o->n_vocab; i++) free(toks[i]);
        free(toks);
        free(scores);
    }

    // tensors (same order as convert_hf_to_gguf writes them)
    const int cap = 3 + 12 * (int) o->n_layer;
    struct ggml_init_params cp = {
        .mem_size   = ggml_tensor_overhead() * (size_t) (cap + 1),
        .mem_buffer = NULL,
        .no_alloc   = true,
    };
    m->ctx = ggml_init(cp);
    m->td = calloc((size_t) cap, sizeof(struct tdesc));
    if (!m->ctx || !m->td) die("out of memory");

    const int64_t E = o->n_embd, V = o->n_vocab, F = o->n_ff, X = o->n_expert, D = o->head_dim;
    const int64_t Q = D * o->n_head, KV = D * o->n_head_kv;
    const enum ggml_type dt = o->dense_type, et = o->type, f32 = GGML_TYPE_F32;

    add_tensor(m, cap, K_EMBD, dt, E, V, 1, "token_embd.weight", 0);
    for (int il = 0; il < (int) o->n_layer; il++) {
        add_tensor(m, cap, K_NORM,   f32, E,  1,  1, "blk.%d.attn_norm.weight",     il);
        add_tensor(m, cap, K_DENSE,  dt,  E,  Q,  1, "blk.%d.attn_q.weight",        il);
        add_tensor(m, cap, K_DENSE,  dt,  E,  KV, 1, "blk.%d.attn_k.weight",        il);
        add_tensor(m, cap, K_DENSE,  dt,  E,  KV, 1, "blk.%d.attn_v.weight",        il);
        add_tensor(m, cap, K_ATTN_OUT, dt, Q, E,  1, "blk.%d.attn_output.weight",   il);
        add_tensor(m, cap, K_QKNORM, f32, D,  1,  1, "blk.%d.attn_q_norm.weight",   il);
        add_tensor(m, cap, K_QKNORM, f32, D,  1,  1, "blk.%d.attn_k_norm.weight",   il);
        add_tensor(m, cap, K_NORM,   f32, E,  1,  1, "blk.%d.ffn_norm.weight",      il);
        add_tensor(m, cap, K_ROUTER, f32, E,  X,  1, "blk.%d.ffn_gate_inp.weight",  il);
        add_tensor(m, cap, K_EXPERT, et,  E,  F,  X, "blk.%d.ffn_gate_exps.weight", il);
        add_tensor(m, cap, K_EXPERT, et,  F,  E,  X, "blk.%d.ffn_down_exps.weight", il);
        add_tensor(m, cap, K_EXPERT, et,  E,  F,  X, "blk.%d.ffn_up_exps.weight",   il);
    }
    add_tensor(m, cap, K_NORM,  f32, E, 1, 1, "output_norm.weight", 0);
    add_tensor(m, cap, K_DENSE, dt,  E, V, 1, "output.weight",      0);

    // layout: the gguf context has computed each tensor's offset in the data section
    m->meta_size = gguf_get_meta_size(g);
    const size_t align = gguf_get_alignment(g);
    m->n_units = 0;
    m->expert_bytes = 0;
    int64_t max_ne0 = 0;
    for (int i = 0; i < m->n_td; i++) {
        struct tdesc * d = &m->td[i];
        const int64_t id = gguf_find_tensor(g, d->t->name);
        d->file_off = m->meta_size + gguf_get_tensor_offset(g, id);
        d->nbytes = ggml_nbytes(d->t);
        const int64_t ne0 = d->t->ne[0];
        const int64_t nrows = ggml_nrows(d->t);
        d->rows_per_unit = ne0 >= UNIT_ELEMS ? 1 : UNIT_ELEMS / ne0;
        if (d->rows_per_unit > nrows) d->rows_per_unit = nrows;
        d->n_units = (nrows + d->rows_per_unit - 1) / d->rows_per_unit;
        d->unit0 = m->n_units;
        m->n_units += d->n_units;
        if (d->kind == K_EXPERT) m->expert_bytes += d->nbytes;
        if (ne0 > max_ne0) max_ne0 = ne0;
        if (i == m->n_td - 1) {
            m->total_size = d->file_off + ((d->nbytes + align - 1) / align) * align;
        }
    }
    // pools: one per (quantized type, stdev) of the zero-mean weights
    for (int i = 0; i < m->n_td; i++) {
        struct tdesc * d = &m->td[i];
        const enum ggml_type type = d->t->type;
        if (o->exact || !ggml_is_quantized(type) || d->mean != 0.0f) {
            continue;
        }
        int p = 0;
        while (p < m->n_pools && (m->pools[p].type != type || m->pools[p].std != d->std)) p++;
        if (p == m->n_pools) {
            if (p == (int) (sizeof(m->pools) / sizeof(m->pools[0]))) die("internal: too many pools");
            m->pools[p].type = type;
            m->pools[p].std = d->std;
            m->pools[p].nblocks = POOL_BLOCKS;
            m->pools[p].block_bytes = ggml_row_size(type, ggml_blck_size(type));
            m->pools[p].data = malloc(m->pools[p].block_bytes * POOL_BLOCKS);
            if (!m->pools[p].data) die("out of memory");
            m->n_pools++;
        }
        d->pool = &m->pools[p];
    }
    if (max_ne0 < 256 * (POOL_BLOCKS / POOL_ROWS)) max_ne0 = 256 * (POOL_BLOCKS / POOL_ROWS);
    if (o->fake_imatrix) {
        m->imatrix_len = max_ne0;
        m->imatrix_ones = malloc(sizeof(float) * (size_t) max_ne0);
        if (!m->imatrix_ones) die("out of memory");
        for (int64_t i = 0; i < max_ne0; i++) m->imatrix_ones[i] = 1.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// data generation

struct shared {
    struct model * m;
    int fd;
    atomic_int_fast64_t next_unit;
    atomic_int_fast64_t bytes_done;
    atomic_int failed;
    atomic_int progress_step;
    struct timespec t0;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + ts.tv_nsec * 1e-9;
}

static bool pwrite_all(int fd, const void * buf, size_t n, off_t off) {
    const char * p = buf;
    while (n > 0) {
        const ssize_t w = pwrite(fd, p, n, off);
        if (w < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        p += w;
        n -= (size_t) w;
        off += w;
    }
    return true;
}

static void run_threads(int n, void * (*fn)(void *), void * arg) {
    pthread_t * th = calloc((size_t) n, sizeof(pthread_t));
    if (!th) die("out of memory");
    for (int i = 0; i < n; i++) {
        if (pthread_create(&th[i], NULL, fn, arg) != 0) die("pthread_create failed");
    }
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    free(th);
}

// fill the pools, POOL_ROWS rows of POOL_BLOCKS/POOL_ROWS blocks each
static void * pool_worker(void * arg) {
    struct shared * sh = arg;
    struct model * m = sh->m;
    const int64_t bpr = POOL_BLOCKS / POOL_ROWS;
    float * src = NULL;
    size_t src_cap = 0;
    for (;;) {
        const int64_t u = atomic_fetch_add(&sh->next_unit, 1);
        if (u >= (int64_t) m->n_pools * POOL_ROWS) break;
        struct pool * p = &m->pools[u / POOL_ROWS];
        const int64_t row = u % POOL_ROWS;
        const int64_t ne = bpr * ggml_blck_size(p->type);
        if ((size_t) ne > src_cap) {
            free(src);
            src = malloc(sizeof(float) * (size_t) ne);
            src_cap = (size_t) ne;
            if (!src) die("out of memory");
        }
        fill_normal(src, ne, mix3(m->o.seed, UINT64_C(0x706f6f6c) + (uint64_t) (u / POOL_ROWS), (uint64_t) row),
                    0.0f, p->std);
        const float * imat = ggml_quantize_requires_imatrix(p->type) ? m->imatrix_ones : NULL;
        const size_t row_bytes = (size_t) bpr * p->block_bytes;
        const size_t got = ggml_quantize_chunk(p->type, src, p->data + (size_t) row * row_bytes, 0, 1, ne, imat);
        if (got != row_bytes) die("pool %s: quantized %zu bytes, expected %zu", ggml_type_name(p->type), got, row_bytes);
    }
    free(src);
    return NULL;
}

static void * worker(void * arg) {
    struct shared * sh = arg;
    struct model * m = sh->m;
    float * src = NULL;
    void * dst = NULL;
    size_t src_cap = 0, dst_cap = 0;
    int ti = 0;

    for (;;) {
        const int64_t u = atomic_fetch_add(&sh->next_unit, 1);
        if (u >= m->n_units || atomic_load(&sh->failed)) break;
        while (ti + 1 < m->n_td && m->td[ti + 1].unit0 <= u) ti++;
        while (m->td[ti].unit0 > u) ti--;
        const struct tdesc * d = &m->td[ti];
        const int64_t k = u - d->unit0;
        const int64_t ne0 = d->t->ne[0];
        const int64_t row0 = k * d->rows_per_unit;
        int64_t nrows = ggml_nrows(d->t) - row0;
        if (nrows > d->rows_per_unit) nrows = d->rows_per_unit;
        const size_t n = (size_t) (nrows * ne0);
        const size_t row_size = ggml_row_size(d->t->type, ne0);
        const size_t out_bytes = row_size * (size_t) nrows;

        if (!d->pool && n > src_cap) {
            free(src);
            src = malloc(n * sizeof(float));
            src_cap = n;
        }
        if (out_bytes > dst_cap) {
            free(dst);
            dst = malloc(out_bytes);
            dst_cap = out_bytes;
        }
        if ((!d->pool && !src) || !dst) {
            fprintf(stderr, "make-moe-model: error: out of memory\n");
            atomic_store(&sh->failed, 1);
            break;
        }

        const uint64_t seed = mix3(m->o.seed, (uint64_t) ti, (uint64_t) k);
        size_t got = out_bytes;
        if (d->pool) {
            // each block of the output is a random block of the pool
            const struct pool * p = d->pool;
            const int64_t nb = (int64_t) n / ggml_blck_size(d->t->type);
            uint64_t s = seed;
            char * out = dst;
            for (int64_t b = 0; b < nb; b++) {
                const uint64_t idx = ((splitmix64(&s) >> 32) * (uint64_t) p->nblocks) >> 32;
                memcpy(out + (size_t) b * p->block_bytes, p->data + idx * p->block_bytes, p->block_bytes);
            }
        } else {
            fill_normal(src, (int64_t) n, seed, d->mean, d->std);
            const float * imat = ggml_quantize_requires_imatrix(d->t->type) ? m->imatrix_ones : NULL;
            got = ggml_quantize_chunk(d->t->type, src, dst, 0, nrows, ne0, imat);
        }
        if (got != out_bytes) {
            fprintf(stderr, "make-moe-model: error: %s: quantized %zu bytes, expected %zu\n",
                    d->t->name, got, out_bytes);
            atomic_store(&sh->failed, 1);
            break;
        }
        if (!pwrite_all(sh->fd, dst, out_bytes, (off_t) (d->file_off + (size_t) row0 * row_size))) {
            fprintf(stderr, "make-moe-model: error: write failed: %s\n", strerror(errno));
            atomic_store(&sh->failed, 1);
            break;
        }

        // progress on stderr every 10% for models over 256 MiB
        const int64_t done = atomic_fetch_add(&sh->bytes_done, (int64_t) out_bytes) + (int64_t) out_bytes;
        if (m->total_size > ((size_t) 256 << 20)) {
            const int step = (int) (done * 10 / (int64_t) m->total_size);
            int prev = atomic_load(&sh->progress_step);
            while (step > prev) {
                if (atomic_compare_exchange_weak(&sh->progress_step, &prev, step)) {
                    fprintf(stderr, "make-moe-model: %3d%% (%.1f s)\n", step * 10, now_s() -
                            ((double) sh->t0.tv_sec + sh->t0.tv_nsec * 1e-9));
                    break;
                }
            }
        }
    }
    free(src);
    free(dst);
    return NULL;
}

// ---------------------------------------------------------------------------------------------

static void fmt_bytes(char * buf, size_t n, double b) {
    if (b >= 1024.0 * 1024 * 1024) snprintf(buf, n, "%.2f GiB", b / (1024.0 * 1024 * 1024));
    else if (b >= 1024.0 * 1024)   snprintf(buf, n, "%.2f MiB", b / (1024.0 * 1024));
    else                           snprintf(buf, n, "%.1f KiB", b / 1024.0);
}

int main(int argc, char ** argv) {
    struct model m;
    memset(&m, 0, sizeof(m));
    parse_opts(argc, argv, &m.o);
    const struct opts * o = &m.o;

    const double t_start = now_s();
    build_model(&m);

    char tmp_path[4096];
    if (snprintf(tmp_path, sizeof(tmp_path), "%s.tmp", o->out) >= (int) sizeof(tmp_path)) {
        die("--out path too long");
    }
    const int fd = open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("cannot create %s: %s", tmp_path, strerror(errno));
    // size the file first: the alignment padding between tensors stays zero (sparse)
    if (ftruncate(fd, (off_t) m.total_size) != 0) {
        die("cannot size %s to %zu bytes: %s", tmp_path, m.total_size, strerror(errno));
    }
    {
        void * meta = malloc(m.meta_size);
        if (!meta) die("out of memory");
        gguf_get_meta_data(m.gguf, meta);
        if (!pwrite_all(fd, meta, m.meta_size, 0)) die("write %s: %s", tmp_path, strerror(errno));
        free(meta);
    }

    // the quantizers' lookup tables are set up here rather than racing in the workers
    ggml_quantize_init(o->type);
    ggml_quantize_init(o->dense_type);

    struct shared sh;
    memset(&sh, 0, sizeof(sh));
    sh.m = &m;
    sh.fd = fd;
    atomic_init(&sh.next_unit, 0);
    atomic_init(&sh.bytes_done, 0);
    atomic_init(&sh.failed, 0);
    atomic_init(&sh.progress_step, 0);
    clock_gettime(CLOCK_MONOTONIC, &sh.t0);

    if (m.n_pools > 0) {
        int np = o->threads;
        if (np > m.n_pools * POOL_ROWS) np = m.n_pools * POOL_ROWS;
        run_threads(np, pool_worker, &sh);
        atomic_store(&sh.next_unit, 0);
    }
    int nt = o->threads;
    if (nt > m.n_units) nt = (int) m.n_units;
    run_threads(nt, worker, &sh);

    if (atomic_load(&sh.failed)) {
        close(fd);
        unlink(tmp_path);
        return 1;
    }
    // no fsync: these are scratch test files, and the page cache absorbs a few GB at once
    if (close(fd) != 0) die("close %s: %s", tmp_path, strerror(errno));
    if (rename(tmp_path, o->out) != 0) die("rename %s -> %s: %s", tmp_path, o->out, strerror(errno));
    const double secs = now_s() - t_start;

    char total[32], exp[32];
    fmt_bytes(total, sizeof(total), (double) m.total_size);
    fmt_bytes(exp, sizeof(exp), (double) m.expert_bytes);
    printf("%s: arch=%s experts=%" PRId64 "/%" PRId64 " layers=%" PRId64 " embd=%" PRId64
           " ff_exp=%" PRId64 " vocab=%" PRId64 " heads=%" PRId64 "/%" PRId64 " head_dim=%" PRId64
           " gate/up=[%" PRId64 ",%" PRId64 ",%" PRId64 "] down=[%" PRId64 ",%" PRId64 ",%" PRId64 "]"
           " type=%s dense=%s size=%s (%zu B) experts=%s (%.1f%%) align=%zu seed=%" PRIu64
           " data=%s time=%.2fs threads=%d\n",
           o->out, ARCH, o->n_expert, o->n_used, o->n_layer, o->n_embd, o->n_ff, o->n_vocab,
           o->n_head, o->n_head_kv, o->head_dim,
           o->n_embd, o->n_ff, o->n_expert, o->n_ff, o->n_embd, o->n_expert,
           ggml_type_name(o->type), ggml_type_name(o->dense_type), total, m.total_size,
           exp, 100.0 * (double) m.expert_bytes / (double) m.total_size,
           gguf_get_alignment(m.gguf), o->seed, m.n_pools > 0 ? "block-pool" : "exact", secs, nt);

    for (int p = 0; p < m.n_pools; p++) free(m.pools[p].data);
    free(m.imatrix_ones);
    free(m.td);
    ggml_free(m.ctx);
    gguf_free(m.gguf);
    return 0;
}
