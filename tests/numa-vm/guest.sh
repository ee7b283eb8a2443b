#!/bin/sh
# Runs inside every QEMU NUMA guest (see run-tests.sh): the C harness on a real multi-node
# kernel, numa-moe's view of the machine, and llama.cpp end to end against stock.
# Paths are the host's (mkinitramfs.sh keeps them); ROOT is exported by run-tests.sh.
set -u
H=$ROOT/build/c/harness
G=$ROOT/build/greedy
CLI=$ROOT/target/release/numa-moe
LIB=$ROOT/target/release/libnuma_moe.so
M=$ROOT/build/models
passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }

echo "scenario $NUMA_VM_SCENARIO: $(cat /sys/devices/system/node/online) online, $(nproc) cpus"
cat /expect.txt
$CLI topology

# 1. the C harness: ABI, placement with real mbind (every page verified), bit-identical
#    mul_mat_id with workers pinned per node, bad maps, a node out of memory
tests="abi buffer mmid_decode mmid_batches mm_every_type mm_repacked locality_counters numa_topology numa_bad_maps numa_out_of_memory numa_workers"
if [ "$NUMA_VM_SCENARIO" = taskset ]; then
    # only node 0's CPUs: nodes 1-3 hold experts but have no thread (computed by node 0)
    out=$(HARNESS_CPUS_RESTRICTED=1 taskset -c 0,1 "$H" $tests 2>&1)
else
    out=$("$H" $tests 2>&1)
fi
rc=$?
echo "$out" | grep -v "^ok "
p=$(echo "$out" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1/p')
f=$(echo "$out" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\2/p')
passed=$((passed + ${p:-0}))
failed=$((failed + ${f:-1}))
[ $rc -eq 0 ] || [ "${f:-1}" -gt 0 ] || fail "harness exited $rc"

# 2. llama.cpp end to end: the same tokens from bit-identical logits as stock in the same
#    configuration (as shipped, CPU_REPACK on; and --no-repack), in this guest, with every
#    expert page on its planned node; q4_K and mxfp4 experts in CPU_REPACK's layout
n=$(wc -l < /expect.txt)
case $n in
    2) maps="rows 0-15:0,*:1 mirror" ;;
    3) maps="rows 0-15:0,*:1" ;;        # memless: node 2 has no memory
    *) maps="rows 0-7:0,8-15:1+2,*:3 block" ;;
esac
prefix=""
[ "$NUMA_VM_SCENARIO" = taskset ] && prefix="taskset -c 0,1"
for model in "$M/many/e32u4-q8_0.gguf" "$M/archs/qwen3moe-moe.gguf" "$M/many/e64u8-q4_K.gguf" "$M/many/e32u4-mxfp4.gguf"; do
    name=$(basename "$model" .gguf)
    want_repack=0
    case $name in *q4_K | *mxfp4) want_repack=1 ;; esac
    for nr in "" --no-extra-bufts; do
        # --no-repack once per model: the standard layout where stock keeps it too
        [ -n "$nr" ] && [ $want_repack = 0 ] && continue
        $prefix "$G" "$model" 8 "The quick brown fox" $nr > /tmp/ref 2>/tmp/ref.err || { fail "$name: stock run failed"; continue; }
        for map in $maps; do
            case "$name:$map" in qwen3moe-moe:0-*) map="0:0,1:1" ;; esac
            [ -n "$nr" ] && [ "$map" != rows ] && continue
            what="$name [$map${nr:+, --no-repack}]"
            if ! NUMA_MOE_EXPERT_MAP=$map LD_PRELOAD=$LIB $prefix "$G" "$model" 8 "The quick brown fox" $nr > /tmp/got 2>/tmp/got.err; then
                fail "$what: numa-moe run failed: $(grep -m2 -i error /tmp/got.err)"
            elif ! cmp -s /tmp/ref /tmp/got; then
                fail "$what: tokens or logits differ from stock"
            elif ! grep -q "none off its planned node" /tmp/got.err; then
                fail "$what: expert pages not verified on their nodes: $(grep numa-moe /tmp/got.err | tail -2)"
            elif [ -z "$nr" ] && [ $want_repack = 1 ] && ! grep -q "repacked for CPU_REPACK's kernels" /tmp/got.err; then
                fail "$what: experts not in CPU_REPACK's layout: $(grep -m1 'expert tensors' /tmp/got.err)"
            else
                pass "$what: $(grep -o 'verified [0-9]* resident pages' /tmp/got.err)"
            fi
        done
    done
done

# 2b. the whole model node-local: a qwen3moe and a deepseek2 model (shared experts, a dense
#     first layer, MLA attention) under the default map, every weight matrix placed, every page
#     on its node, tokens and logits equal to stock's, and >= 99% of the weight bytes each
#     decoded token reads read on their own node, per numa-moe's locality counters (exit
#     report). One thread per node, kept there by llama.cpp's --numa distribute, so that every
#     node has a thread of its own in these small guests.
case "$NUMA_VM_SCENARIO" in
    two-node | four-node)
        nt=$(wc -l < /expect.txt)
        for model in "$M/archs/qwen3moe-moe.gguf" "$M/archs/deepseek2-moe.gguf" "$M/many/e64u8-q4_K.gguf"; do
            name=$(basename "$model" .gguf)
            args="--threads $nt --numa distribute"
            "$G" "$model" 8 "The quick brown fox" $args > /tmp/ref 2>/tmp/ref.err || { fail "$name [whole model]: stock run failed"; continue; }
            if ! LD_PRELOAD=$LIB "$G" "$model" 8 "The quick brown fox" $args > /tmp/got 2>/tmp/got.err; then
                fail "$name [whole model]: numa-moe run failed: $(grep -m2 -iE 'error|fatal' /tmp/got.err)"
                continue
            fi
            local_pct=$(sed -n 's/.*weights read per decoded token: .*, \([0-9.]*\)% read on their own node.*/\1/p' /tmp/got.err | tail -1)
            if ! cmp -s /tmp/ref /tmp/got; then
                fail "$name [whole model]: tokens or logits differ from stock"
            elif ! grep -q "and [0-9]* weight matrices" /tmp/got.err; then
                fail "$name [whole model]: weight matrices not placed: $(grep -m1 'expert tensors' /tmp/got.err)"
            elif ! grep -q "none off its planned node" /tmp/got.err; then
                fail "$name [whole model]: pages not verified on their nodes: $(grep numa-moe /tmp/got.err | tail -2)"
            elif [ -z "$local_pct" ] || ! awk -v p="$local_pct" 'BEGIN { exit !(p >= 99.0) }'; then
                fail "$name [whole model]: ${local_pct:-no}% of the weight bytes read node-local: $(grep -A1 'weights read per' /tmp/got.err | tr '\n' ' ')"
            else
                pass "$name [whole model]: $local_pct% of each decoded token's weight bytes read on their own node, $(grep -o 'verified [0-9]* resident pages' /tmp/got.err)"
            fi
        done
        ;;
esac

# 3. next to llama.cpp's own --numa distribute (ggml re-pins its threads at every compute;
#    numa-moe must not fight it and takes each thread's node from getcpu) and --load-mode none
#    (the loader reads the file straight into numa-moe's memory)
model=$M/many/e32u4-q8_0.gguf
$prefix "$G" "$model" 8 "The quick brown fox" --no-extra-bufts > /tmp/ref 2>/dev/null
for extra in "--numa distribute" "--load-mode none"; do
    if NUMA_MOE_EXPERT_MAP=rows LD_PRELOAD=$LIB $prefix "$G" "$model" 8 "The quick brown fox" $extra > /tmp/got 2>/tmp/got.err &&
        cmp -s /tmp/ref /tmp/got && grep -q "none off its planned node" /tmp/got.err; then
        pass "e32u4-q8_0 [rows, $extra]"
    else
        fail "e32u4-q8_0 [rows, $extra]: differs from stock or pages misplaced: $(grep numa-moe /tmp/got.err | tail -1)"
    fi
done

# 4. pinning stays inside the CPU set llama.cpp gives its threads (--cpu-range) and does not
#    move a thread when the batch thread count differs from the decode one
expand() { # "2-3,5" -> "2 3 5"
    echo "$1" | tr ',' '\n' | while IFS=- read -r a b; do seq "$a" "${b:-$a}"; done | tr '\n' ' '
}
ncpu=$(nproc)
if [ "$NUMA_VM_SCENARIO" != taskset ] && [ "$ncpu" -ge 2 ]; then
    if [ "$ncpu" -ge 6 ]; then range=2-5; else range=1-$((ncpu - 1)); fi
    [ "$ncpu" -eq 2 ] && range=0-1  # one CPU per node: both
    allowed=" $(expand "$range")"
    for args in "--threads 4 --threads-batch 2" "--threads 2 --threads-batch 4"; do
        $prefix "$G" "$model" 8 "The quick brown fox" --no-extra-bufts $args > /tmp/ref 2>/dev/null
        if ! NUMA_MOE_EXPERT_MAP=rows LD_PRELOAD=$LIB "$G" "$model" 8 "The quick brown fox" --cpus "$range" $args > /tmp/got 2>/tmp/got.err; then
            fail "pinning [--cpus $range $args]: run failed: $(grep -m2 -iE 'error|fatal' /tmp/got.err)"
            continue
        fi
        cmp -s /tmp/ref /tmp/got || { fail "pinning [--cpus $range $args]: differs from stock"; continue; }
        bad=""
        pins=$(grep -o 'worker [0-9]* pinned to node [0-9]*, CPUs [0-9,-]* (of [0-9,-]*)' /tmp/got.err)
        while read -r _ w _ _ _ node _ cpus _ of; do
            [ -n "$w" ] || continue
            for c in $(expand "$cpus"); do
                case "$allowed " in *" $c "*) ;; *) bad="$bad worker $w on CPU $c outside $range;" ;; esac
            done
            [ "$(expand "${of%)}")" = "$(expand "$range")" ] || bad="$bad worker $w saw set ${of%)};"
            # one node per worker index for the whole run, whatever the thread count
            other=$(echo "$pins" | awk -v w="$w" -v n="${node%,}" '$2 == w && $6 != n "," { print $6 }' | head -1)
            [ -z "$other" ] || bad="$bad worker $w moved from node ${node%,} to ${other%,};"
        done <<PINS
$pins
PINS
        n=$(echo "$pins" | grep -c pinned)
        if [ -n "$bad" ]; then
            fail "pinning [--cpus $range $args]:$bad"
        elif [ "$n" -eq 0 ]; then
            fail "pinning [--cpus $range $args]: no worker was pinned"
        else
            pass "pinning [--cpus $range $args]: $n pins, all inside $range, none moved"
        fi
    done
fi

# 5. llama-server under load: 4 slots, continuous batching, concurrent clients, against stock
#    (tests/numa-vm/guest-soak.sh); in the 2- and 4-node guests
case "$NUMA_VM_SCENARIO" in
    two-node | four-node)
        out=$(ROOT=$ROOT M=$M LIB=$LIB CLI=$CLI sh "$ROOT/tests/numa-vm/guest-soak.sh" 2>&1)
        echo "$out"
        if echo "$out" | grep -q "^ok   soak"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
        ;;
esac

echo "guest $NUMA_VM_SCENARIO: $passed passed, $failed failed"
[ $failed -eq 0 ]
