#!/usr/bin/env bash
# Hardening end to end (issue 12): what must never hang, crash or differ from stock.
#   1. more thread groups than any fixed limit: 80 described nodes, 80 threads (one group
#      per thread) give stock's tokens and logits; main before the fix panicked past the
#      barrier and then crashed.
#   2. a failure after the decision point (test-only switch in build/fault/libnuma_moe.so)
#      aborts with a message naming the op, and never hangs ggml's barrier.
#   3. replicas (mirror, a+b copies) loaded with and without mmap equal stock.
#   4. a batch thread count different from the decode one equals stock.
# Prints one line per failure and `N passed, N failed`. Expects make lib greedy models fault-lib.
set -uo pipefail

source "$(dirname "$0")/../../scripts/lib.sh"
FAULT_LIB=${FAULT_LIB:-$root/build/fault/libnuma_moe.so}
OUT=$root/build/e2e-hardening
rm -rf "$OUT"
mkdir -p "$OUT"
PROMPT="The quick brown fox jumps over the lazy dog"
model=$M/many/e32u4-q8_0.gguf

# run NAME TOPOLOGY MAP LIB [greedy args]: 6 greedy tokens and logit hashes into $OUT/NAME
# (scripts/lib.sh's greedy, with library LIB; "stock": llama.cpp's plain layout)
run() {
    local name=$1 topo=$2 map=$3 lib=$4
    shift 4
    if [ "$lib" = stock ]; then
        GREEDY_TIMEOUT=300 greedy stock "$map" "$model" "$OUT/$name" 6 --no-extra-bufts "$@"
    else
        LIB=$lib GREEDY_TIMEOUT=300 greedy "$topo" "$map" "$model" "$OUT/$name" 6 "$@"
    fi
}

# same NAME REF WHAT: passes when NAME placed experts and equals REF
same() {
    local name=$1 ref=$2 what=$3
    if ! grep -q "numa-moe: [0-9]* expert tensors" "$OUT/$name.err"; then
        fail "$what: numa-moe placed nothing ($(grep -m2 -iE 'numa-moe|error' "$OUT/$name.err" | tr '\n' ' '))"
    elif ! cmp -s "$OUT/$ref" "$OUT/$name"; then
        fail "$what: tokens or logits differ from stock"
    else
        pass
    fi
}

run stock2 - - stock --threads 2 || fail "stock run failed: $(tail -2 "$OUT/stock2.err")"

# 1. 80 groups
EIGHTY="package:2 numa:40 core:1 pu:1"
run stock80 - - stock --threads 80 || fail "stock with 80 threads failed"
if run g80 "$EIGHTY" rows "$LIB" --threads 80; then
    same g80 stock80 "80 nodes, 80 threads, rows"
    grep -q "node 79:" "$OUT/g80.err" || fail "80 nodes: node 79 holds nothing ($(grep -m1 'numa-moe: node' "$OUT/g80.err" | cut -c1-200))"
else
    fail "80 nodes, 80 threads: exit $? ($(grep -m3 -iE 'panic|fatal|error' "$OUT/g80.err" | tr '\n' ' '))"
fi

# 2. a failure after the decision point aborts, with the op named
if [ -f "$FAULT_LIB" ]; then
    (NUMA_MOE_INJECT_FAULT=after-decision run fault "$TWO" rows "$FAULT_LIB" --threads 2) 2>/dev/null
    rc=$?
    if [ $rc -eq 124 ]; then
        fail "injected fault: the run hung (killed after 300 s)"
    elif [ $rc -ne 134 ]; then
        fail "injected fault: exit $rc, expected SIGABRT (134)"
    elif ! grep -q "numa-moe: fatal: MUL_MAT_ID .* over blk\.[0-9]*\.ffn_[a-z]*_exps\.weight failed after every thread had committed .*injected fault" "$OUT/fault.err"; then
        fail "injected fault: no message naming the op ($(grep -m2 numa-moe "$OUT/fault.err" | tail -1))"
    else
        pass
    fi
    # the same library without the switch computes like stock: the switch alone caused it
    run nofault "$TWO" rows "$FAULT_LIB" --threads 2 && same nofault stock2 "fault-injection build without the switch"
else
    fail "no $FAULT_LIB (make fault-lib)"
fi

# 3. replicas, loaded through set_tensor (mmap) and straight into tensor data (no mmap)
for map in mirror "0-15:0+1,*:1"; do
    for mode in mmap none; do
        name=rep.$(echo "$map.$mode" | tr ':,+*' '___x')
        run "$name" "$TWO" "$map" "$LIB" --threads 2 --load-mode "$mode" && same "$name" stock2 "replicas [$map, load mode $mode]"
    done
done

# 4. n_threads_batch != n_threads: the prompt with 1 thread, decoding with 2
run stock_tb - - stock --threads 2 --threads-batch 1
run tb "$TWO" rows "$LIB" --threads 2 --threads-batch 1 && same tb stock_tb "threads 2, batch threads 1"

echo -n "hardening: "
summary
