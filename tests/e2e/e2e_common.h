// What the end-to-end drivers (greedy.c, two_contexts.c) share: llama.cpp's log filtered to
// warnings and numa-moe's own lines, and the hash that stands for a step's logits bits.
#pragma once

#include "llama.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static void on_log(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level >= GGML_LOG_LEVEL_WARN || strstr(text, "numa-moe") || strstr(text, "model buffer size")) {
        fputs(text, stderr);
    }
}

static uint64_t fnv1a(const void * p, size_t n) {
    const unsigned char * b = p;
    uint64_t              h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ b[i]) * 1099511628211ull;
    }
    return h;
}
