# What numa-moe's shell scripts share; sourced, not run:
#
#   source "$(dirname "$0")/lib.sh"              # from scripts/
#   source "$(dirname "$0")/../../scripts/lib.sh" # from tests/e2e/
#
# Sets the repository's paths from this file's own location (so a clean clone works from any
# directory) and changes into the repository root. Paths can be overridden from the
# environment with the Makefile's names (make passes command-line variables on):
#   LLAMA_BIN  the patched llama.cpp's binaries and libraries, the portable build the tests
#              run (x86-64-v3, also in the QEMU guests)         (build/llama/bin)
#   NATIVE_BIN the same built for this CPU (-march=native), which demo and bench run
#                                                               (build/llama-native/bin)
#   LIB        libnuma_moe.so                                   (target/release/libnuma_moe.so)
#   CLI        the numa-moe tool                                (target/release/numa-moe)
#   MODELS     the test models of scripts/models.sh             (build/models)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
B=${LLAMA_BIN:-$root/build/llama/bin}
NB=${NATIVE_BIN:-$root/build/llama-native/bin}
LIB=${LIB:-$root/target/release/libnuma_moe.so}
CLI=${CLI:-$root/target/release/numa-moe}
M=${MODELS:-$root/build/models}
GEN=$root/build/make-moe-model          # linked against $B
NGEN=$root/build/native/make-moe-model  # linked against $NB
GREEDY=$root/build/greedy

# described machines (hwloc synthetic): numa-moe plans for them on any host, without binding
TWO="package:2 numa:1 core:1 pu:1"
FOUR="package:2 numa:2 core:1 pu:1"

# Model shapes for build/make-moe-model (tests/tools/make-moe-model.c), each used by more
# than one script. The test models of scripts/models.sh: 2 layers, small everything else.
SMALL_SHAPE=(--layers 2 --vocab 256 --embd 256 --heads 4 --head-kv 2)
# Qwen3-30B-A3B's expert shapes (128 experts, 8 used, embd 2048, expert ff 768), small vocab;
# the layer count and types are the caller's
QWEN3_A3B_SHAPE=(--experts 128 --used 8 --embd 2048 --ff 768 --vocab 1024 --heads 32 --head-kv 4 --head-dim 128)

# numa_moe TOPOLOGY COMMAND...: runs COMMAND with libnuma_moe.so preloaded on TOPOLOGY
# (NUMA_MOE_TOPOLOGY), or without it when TOPOLOGY is "stock"
numa_moe() {
    local topo=$1
    shift
    if [ "$topo" = stock ]; then
        "$@"
    else
        NUMA_MOE_TOPOLOGY=$topo LD_PRELOAD=$LIB "$@"
    fi
}

# greedy TOPOLOGY MAP MODEL OUT N [args]: N greedy tokens of $PROMPT and the bit hash of every
# step's logits (tests/e2e/greedy.c) into OUT, its stderr into OUT.err; numa-moe runs with MAP
# on TOPOLOGY ("stock": without it). GREEDY_TIMEOUT bounds the run (default 120 s).
greedy() {
    local topo=$1 map=$2 model=$3 out=$4 n=$5
    shift 5
    NUMA_MOE_EXPERT_MAP=$map numa_moe "$topo" timeout "${GREEDY_TIMEOUT:-120}" "$GREEDY" "$model" "$n" "$PROMPT" "$@" > "$out" 2> "$out.err"
}

# until_logged OUT ERR LAST COMMAND...: runs COMMAND > OUT 2> ERR (both into OUT when ERR is
# the same file) and runs it again, five times in all, while ERR has no line matching LAST.
# llama.cpp's tools print through an asynchronous logger that can lose its last lines at
# exit (their summaries: "eval time", "Final estimate"; upstream issue 22142: the logger is
# never flushed at exit). On a busy machine that happens to every other llama-perplexity
# run. Returns 0 once LAST is there, 1 when COMMAND fails (no retry: a crash is not a lost
# line) or LAST never came.
until_logged() {
    local out=$1 err=$2 last=$3 attempt
    shift 3
    for attempt in 1 2 3 4 5; do
        if [ "$err" = "$out" ]; then
            "$@" > "$out" 2>&1 || return 1
        else
            "$@" > "$out" 2> "$err" || return 1
        fi
        grep -q "$last" "$err" && return 0
    done
    return 1
}

# wait_log FILE PATTERN [SECONDS]: waits (default 30 s) until FILE has a line matching PATTERN
wait_log() {
    local file=$1 pattern=$2 tenths=$((${3:-30} * 10)) i
    for ((i = 0; i < tenths; i++)); do
        grep -q "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# the test runners' counters: pass; fail MESSAGE (prints "FAIL MESSAGE"); summary prints
# "N passed, N failed" and returns non-zero when anything failed
passed=0
failed=0
pass() { passed=$((passed + 1)); }
fail() {
    failed=$((failed + 1))
    echo "FAIL $*"
}
summary() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}
