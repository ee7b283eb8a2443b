// two_contexts: two llama.cpp contexts on one loaded model, decoding at the same time from two
// threads, give bit for bit the logits one context gives alone.
//
//   two_contexts MODEL N_PREDICT [--threads N]
//
// Loads MODEL once. First, for each of two prompts, one context decodes it greedily on its
// own: the reference (the chosen token and a hash of all logits' bits at every step). Then two
// fresh contexts on the same model decode the two prompts at once, one thread each, meeting
// at a barrier before every llama_decode so their graphs run together: the first prompt's
// processing against the other's, then token against token. The prompts differ (in text and
// length), so a context reading the other's intermediate results cannot go unseen.
//
// With libnuma_moe.so preloaded (map from NUMA_MOE_EXPERT_MAP), both contexts compute the
// expert ops with numa-moe's hook on the same placed weights, each on its own ggml
// threadpool. Prints one line per difference and "two contexts: N steps ..."; exits 1 on any
// difference or failure. numa-moe's placement report is passed through to stderr.

#define _POSIX_C_SOURCE 200809L  // pthread_barrier_t under -std=c11

#include "llama.h"
#include "e2e_common.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_STEPS  64
#define MAX_TOKENS 256

static const char * PROMPTS[2] = {
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time, in a land of many experts, every token went to eight of them, and the routers kept count",
};

struct run {
    struct llama_context * ctx;
    const char *           prompt;
    int                    n_predict;
    pthread_barrier_t *    barrier;  // NULL: alone
    llama_token            token[MAX_STEPS];
    uint64_t               hash[MAX_STEPS];
    int                    steps;  // completed
    char                   error[160];
};


static void * decode(void * arg) {
    struct run *               r       = arg;
    const struct llama_model * model   = llama_get_model(r->ctx);
    const struct llama_vocab * vocab   = llama_model_get_vocab(model);
    const int                  n_vocab = llama_vocab_n_tokens(vocab);
    llama_token                tokens[MAX_TOKENS];
    int n = llama_tokenize(vocab, r->prompt, (int32_t) strlen(r->prompt), tokens, MAX_TOKENS - MAX_STEPS, true, true);
    if (n <= 0) {
        snprintf(r->error, sizeof r->error, "cannot tokenize \"%s\"", r->prompt);
    }
    struct llama_batch batch = llama_batch_get_one(tokens, n > 0 ? n : 0);
    for (int step = 0; step < r->n_predict; step++) {
        // both threads pass the barrier every step, even after a failure, so neither waits forever
        if (r->barrier) {
            pthread_barrier_wait(r->barrier);
        }
        if (r->error[0]) {
            continue;
        }
        if (llama_decode(r->ctx, batch) != 0) {
            snprintf(r->error, sizeof r->error, "llama_decode failed at step %d", step);
            continue;
        }
        const float * logits = llama_get_logits_ith(r->ctx, -1);
        llama_token   best   = 0;
        for (int v = 1; v < n_vocab; v++) {
            if (logits[v] > logits[best]) {
                best = v;
            }
        }
        r->token[step] = best;
        r->hash[step]  = fnv1a(logits, sizeof(float) * (size_t) n_vocab);
        r->steps       = step + 1;
        tokens[n]      = best;
        batch          = llama_batch_get_one(&tokens[n], 1);
        n++;
    }
    return NULL;
}

static struct llama_context * new_context(struct llama_model * model, int threads) {
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx                       = MAX_TOKENS;
    cp.n_batch                     = MAX_TOKENS;
    cp.n_threads                   = threads;
    cp.n_threads_batch             = threads;
    cp.no_perf                     = true;
    return llama_init_from_model(model, cp);
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL N_PREDICT [--threads N]\n", argv[0]);
        return 2;
    }
    const char * path      = argv[1];
    const int    n_predict = atoi(argv[2]);
    int          threads   = 2;
    for (int i = 3; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (n_predict < 1 || n_predict > MAX_STEPS || threads < 1) {
        fprintf(stderr, "two_contexts: N_PREDICT must be 1..%d and --threads at least 1\n", MAX_STEPS);
        return 2;
    }
    llama_log_set(on_log, NULL);
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(path, llama_model_default_params());
    if (!model) {
        fprintf(stderr, "two_contexts: cannot load %s\n", path);
        return 1;
    }

    static struct run alone[2], together[2];
    for (int k = 0; k < 2; k++) {
        alone[k] = (struct run) { .ctx = new_context(model, threads), .prompt = PROMPTS[k], .n_predict = n_predict };
        if (!alone[k].ctx) {
            fprintf(stderr, "two_contexts: cannot create a context\n");
            return 1;
        }
        decode(&alone[k]);
        llama_free(alone[k].ctx);
    }

    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, 2);
    pthread_t thread[2];
    for (int k = 0; k < 2; k++) {
        together[k] = (struct run) { .ctx = new_context(model, threads), .prompt = PROMPTS[k], .n_predict = n_predict, .barrier = &barrier };
        if (!together[k].ctx) {
            fprintf(stderr, "two_contexts: cannot create a second context\n");
            return 1;
        }
    }
    for (int k = 0; k < 2; k++) {
        if (pthread_create(&thread[k], NULL, decode, &together[k]) != 0) {
            fprintf(stderr, "two_contexts: cannot start a thread\n");
            return 1;
        }
    }
    for (int k = 0; k < 2; k++) {
        pthread_join(thread[k], NULL);
    }
    pthread_barrier_destroy(&barrier);

    int differences = 0;
    for (int k = 0; k < 2; k++) {
        if (alone[k].error[0]) {
            printf("FAIL prompt %d alone: %s\n", k + 1, alone[k].error);
            differences++;
        }
        if (together[k].error[0]) {
            printf("FAIL prompt %d together: %s\n", k + 1, together[k].error);
            differences++;
        }
        int steps = alone[k].steps < together[k].steps ? alone[k].steps : together[k].steps;
        for (int s = 0; s < steps; s++) {
            if (alone[k].token[s] != together[k].token[s] || alone[k].hash[s] != together[k].hash[s]) {
                printf("FAIL prompt %d step %d: alone token %d logits %016" PRIx64 ", together token %d logits %016" PRIx64 "\n", k + 1,
                       s, alone[k].token[s], alone[k].hash[s], together[k].token[s], together[k].hash[s]);
                differences++;
                break;  // later steps follow from this one
            }
        }
    }
    for (int k = 0; k < 2; k++) {
        llama_free(together[k].ctx);
    }
    llama_model_free(model);
    llama_backend_free();
    if (differences) {
        printf("two contexts: %d difference(s) from one context alone\n", differences);
        return 1;
    }
    printf("two contexts: %d steps of each of 2 prompts bit-identical to one context alone\n", n_predict);
    return 0;
}
