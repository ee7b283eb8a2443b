// greedy: decodes a prompt greedily through llama.cpp's C API and prints, for every step,
// the chosen token and a hash of all the logits (their exact bits), synchronously.
//
//   greedy MODEL N_PREDICT PROMPT [--threads N] [--threads-batch N] [--cpus A-B] [--no-extra-bufts]
//          [--load-mode none|mmap] [--numa distribute] [--ngl N] [--cpu-moe] [--n-cpu-moe N] [--no-host] [--no-flash-attn]
//
// --cpus gives ggml's threadpools a CPU mask (llama.cpp's --cpu-range), for the tests that
// check numa-moe pins workers only inside it. With a GPU backend (tests/e2e/hybrid.sh):
// --ngl N layers on the GPU (default: llama.cpp's, all), --cpu-moe every expert tensor kept on
// the CPU (llama.cpp's -ot exps=CPU, --cpu-moe), --n-cpu-moe N those of the first N layers,
// --no-host no GPU host buffer for weights on the CPU; each as llama.cpp's common arguments do it;
// --no-flash-attn llama.cpp's -fa off.
//
// The end-to-end tests compare these lines between stock llama.cpp and numa-moe (preloaded;
// its map comes from NUMA_MOE_EXPERT_MAP): equal lines mean the same tokens from bit-identical
// logits. numa-moe's placement report is passed through from llama.cpp's log to stderr.

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "llama.h"
#include "e2e_common.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPS_REGEX "\\.ffn_(up|down|gate|gate_up)_(ch|)exps"

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL N_PREDICT PROMPT [--threads N] [--threads-batch N] [--cpus A-B] [--no-extra-bufts] [--load-mode none|mmap] [--numa distribute]"
                        " [--ngl N] [--cpu-moe] [--n-cpu-moe N] [--no-host] [--no-flash-attn]\n",
                argv[0]);
        return 2;
    }
    const char * path      = argv[1];
    const int    n_predict = atoi(argv[2]);
    const char * prompt    = argv[3];
    int          threads   = 2;
    int          threads_b = 0;
    int          cpu_lo = -1, cpu_hi = -1;
    int          extra     = 1;
    int          mode      = LLAMA_LOAD_MODE_MMAP;
    int          numa      = 0;
    int          ngl       = -1;
    int          no_host   = 0;
    int          no_fa     = 0;
    // expert tensors kept on the CPU: common/common.h's overrides (LLM_FFN_EXPS_REGEX)
    static char                             patterns[64][64];
    struct llama_model_tensor_buft_override overrides[65];
    int                                     n_over = 0;
    for (int i = 4; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--threads-batch") == 0 && i + 1 < argc) {
            threads_b = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--cpus") == 0 && i + 1 < argc) {
            if (sscanf(argv[++i], "%d-%d", &cpu_lo, &cpu_hi) != 2 || cpu_lo < 0 || cpu_hi < cpu_lo || cpu_hi >= GGML_MAX_N_THREADS) {
                fprintf(stderr, "--cpus wants A-B\n");
                return 2;
            }
        } else if (strcmp(argv[i], "--no-extra-bufts") == 0) {
            extra = 0;
        } else if (strcmp(argv[i], "--numa") == 0 && i + 1 < argc) {
            numa = strcmp(argv[++i], "distribute") == 0;
        } else if (strcmp(argv[i], "--ngl") == 0 && i + 1 < argc) {
            ngl = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--no-host") == 0) {
            no_host = 1;
        } else if (strcmp(argv[i], "--no-flash-attn") == 0) {
            no_fa = 1;
        } else if (strcmp(argv[i], "--cpu-moe") == 0 && n_over < 64) {
            snprintf(patterns[n_over], sizeof patterns[n_over], "%s", EXPS_REGEX);
            n_over++;
        } else if (strcmp(argv[i], "--n-cpu-moe") == 0 && i + 1 < argc) {
            const int n = atoi(argv[++i]);
            if (n < 0 || n_over + n > 64) {
                fprintf(stderr, "--n-cpu-moe wants 0-64\n");
                return 2;
            }
            for (int l = 0; l < n; l++) {
                snprintf(patterns[n_over], sizeof patterns[n_over], "blk\\.%d%s", l, EXPS_REGEX);
                n_over++;
            }
        } else if (strcmp(argv[i], "--load-mode") == 0 && i + 1 < argc) {
            mode = strcmp(argv[++i], "none") == 0 ? LLAMA_LOAD_MODE_NONE : LLAMA_LOAD_MODE_MMAP;
        } else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    llama_log_set(on_log, NULL);
    llama_backend_init();
    if (numa) {
        // llama.cpp's own --numa distribute: ggml pins worker i to node i mod N at every compute
        llama_numa_init(GGML_NUMA_STRATEGY_DISTRIBUTE);
    }

    struct llama_model_params mp = llama_model_default_params();
    mp.use_extra_bufts           = extra;
    mp.load_mode                 = (enum llama_load_mode) mode;
    mp.no_host                   = no_host;
    if (ngl >= 0) {
        mp.n_gpu_layers = ngl;
    }
    for (int i = 0; i < n_over; i++) {
        overrides[i].pattern = patterns[i];
        overrides[i].buft    = ggml_backend_cpu_buffer_type();
    }
    if (n_over > 0) {
        overrides[n_over].pattern = NULL;
        overrides[n_over].buft    = NULL;
        mp.tensor_buft_overrides  = overrides;
    }
    struct llama_model * model   = llama_model_load_from_file(path, mp);
    if (!model) {
        fprintf(stderr, "greedy: cannot load %s\n", path);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx                       = 256;
    cp.n_batch                     = 256;
    cp.n_threads                   = threads;
    cp.n_threads_batch             = threads_b > 0 ? threads_b : threads;
    cp.no_perf                     = true;
    if (no_fa) {
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    struct llama_context * ctx     = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "greedy: cannot create a context\n");
        return 1;
    }
    struct ggml_threadpool * tp = NULL, *tp_batch = NULL;
    if (cpu_lo >= 0) {
        // as llama.cpp's --cpu-range: every worker may run on any CPU of the range
        struct ggml_threadpool_params tpp = ggml_threadpool_params_default(cp.n_threads);
        struct ggml_threadpool_params tpb = ggml_threadpool_params_default(cp.n_threads_batch);
        for (int c = cpu_lo; c <= cpu_hi; c++) {
            tpp.cpumask[c] = tpb.cpumask[c] = true;
        }
        tp       = ggml_threadpool_new(&tpp);
        tp_batch = ggml_threadpool_new(&tpb);
        llama_attach_threadpool(ctx, tp, tp_batch);
    }
    const struct llama_vocab * vocab   = llama_model_get_vocab(model);
    const int                  n_vocab = llama_vocab_n_tokens(vocab);

    llama_token tokens[256];
    int         n = llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), tokens, 200, true, true);
    if (n <= 0) {
        fprintf(stderr, "greedy: cannot tokenize the prompt\n");
        return 1;
    }
    struct llama_batch batch = llama_batch_get_one(tokens, n);
    for (int step = 0; step < n_predict; step++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "greedy: decode failed at step %d\n", step);
            return 1;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);
        llama_token   best   = 0;
        for (int v = 1; v < n_vocab; v++) {
            if (logits[v] > logits[best]) {
                best = v;
            }
        }
        printf("%d %016" PRIx64 "\n", best, fnv1a(logits, sizeof(float) * (size_t) n_vocab));
        tokens[n]  = best;
        batch      = llama_batch_get_one(&tokens[n], 1);
        n++;
    }
    fflush(stdout);
    llama_free(ctx);
    if (tp) {
        ggml_threadpool_free(tp);
        ggml_threadpool_free(tp_batch);
    }
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
