#!/usr/bin/env bash
# End to end against the pinned, patched llama.cpp: every MoE test model generates the same
# tokens with numa-moe as without it, under each map, on this machine and on described
# multi-node machines; llama-perplexity's KL divergence against stock logits is 0; the
# numa-moe tool's plan of a real model adds up; a bad map stops llama.cpp before loading; two
# contexts computing at once on one model give the logits of one context alone.
#
# Prints one line per failure and `N passed, N failed`. Expects make llama-portable lib models.
set -uo pipefail

source "$(dirname "$0")/../../scripts/lib.sh"
OUT=$root/build/e2e
rm -rf "$OUT"
mkdir -p "$OUT"
PROMPT="The quick brown fox jumps over the lazy dog"

# 1. the same tokens from bit-identical logits, with and without numa-moe, in the same
# configuration: stock as shipped (CPU_REPACK on) is the reference of numa-moe's default run,
# and stock without extra buffer types (--no-repack) that of numa-moe with it. Where stock
# repacks the experts (q4_0, q4_K, iq4_nl, mxfp4 on x86) numa-moe must hold them in the same
# layout ("repacked for CPU_REPACK's kernels"), and the two references then differ: a
# numa-moe that computed the plain layout would match the wrong one.
models=("$M"/archs/*-moe.gguf "$M"/many/*.gguf)
skipped=()
skipped_dense=()
for model in "${models[@]}"; do
    name=$(basename "$model" .gguf)
    # test-llama-archs names some dense variants "-moe" (ernie4_5, paddleocr): nothing to place
    if [[ "$("$CLI" plan --model "$model" --map rows --topology "$TWO" 2>&1)" == *"no stacked expert tensors"* ]]; then
        skipped+=("$name")
        continue
    fi
    plain=$OUT/$name.plain
    stock=$OUT/$name.stock
    if ! greedy stock off "$model" "$plain" 16 --no-extra-bufts || ! greedy stock off "$model" "$stock" 16; then
        fail "$name: stock llama.cpp failed: $(tail -2 "$plain.err" "$stock.err" | tr '\n' ' ')"
        continue
    fi
    # whether stock put expert tensors in CPU_REPACK (its buffer line; llama.cpp lists them)
    stock_repacks=0
    grep -q "CPU_REPACK model buffer size" "$stock.err" && stock_repacks=1
    runs=("host|rows" "two|rows" "two|block" "two|mirror" "two|interleave" "four|rows" "four|0:0+1,1:2,*:3" "two|rows|-nr" "four|mirror|-nr"
          "two|rows;dense=off" "two|block;dense=mirror" "host|rows;dense=rows")
    for run in "${runs[@]}"; do
        IFS='|' read -r machine map nr <<< "$run"
        case $machine in
            host) topo=host ;;
            two) topo=$TWO ;;
            four) topo=$FOUR ;;
        esac
        got=$OUT/$name.$machine.$(echo "$map" | tr ':,+*;=@' '___x___')${nr:+.nr}
        extra=()
        ref=$stock
        [ -n "$nr" ] && extra=(--no-extra-bufts) && ref=$plain
        if ! greedy "$topo" "$map" "$model" "$got" 16 "${extra[@]}"; then
            fail "$name [$machine, $map${nr:+, --no-repack}]: llama.cpp failed: $(grep -m2 -iE 'error|fail' "$got.err" | tr '\n' ' ')"
            continue
        fi
        if ! grep -q "numa-moe: [0-9]* expert tensors" "$got.err"; then
            fail "$name [$machine, $map${nr:+, --no-repack}]: numa-moe placed no expert tensor"
            continue
        fi
        # the other weight matrices: placed on a described machine unless dense=off, and by an
        # explicit dense rule on this one
        dense_want=1
        [[ $machine == host && $map != *dense=rows* ]] && dense_want=0
        [[ $map == *dense=off* ]] && dense_want=0
        dense_got=0
        grep -q "numa-moe: [0-9]* expert tensors .* and [0-9]* weight matrices" "$got.err" && dense_got=1
        if [ $dense_got != $dense_want ]; then
            fail "$name [$machine, $map${nr:+, --no-repack}]: weight matrices placed: $dense_got, expected $dense_want ($(grep -m1 'expert tensors' "$got.err"))"
            continue
        fi
        repacked=0
        grep -q "repacked for CPU_REPACK's kernels" "$got.err" && repacked=1
        if [ -z "$nr" ] && [ $repacked != $stock_repacks ]; then
            fail "$name [$machine, $map]: stock repacks experts: $stock_repacks, numa-moe repacked them: $repacked"
        elif [ -n "$nr" ] && [ $repacked = 1 ]; then
            fail "$name [$machine, $map, --no-repack]: numa-moe repacked although --no-repack was given"
        elif cmp -s "$ref" "$got"; then
            pass
        else
            fail "$name [$machine, $map${nr:+, --no-repack}]: differs from stock${nr:+ --no-repack} at step $(cmp "$ref" "$got" | sed -n 's/.*line \([0-9]*\).*/\1/p')"
        fi
    done
done

# 1c. dense models (test-llama-archs' *-dense, and its "-moe" models without experts): every
# weight matrix placed and computed node-local, tokens and logits equal to stock's
for model in "$M"/archs/*-dense.gguf "${skipped[@]/#/$M/archs/}"; do
    [[ $model == *.gguf ]] || model=$model.gguf
    name=$(basename "$model" .gguf)
    ref=$OUT/$name.dense-stock
    if ! greedy stock off "$model" "$ref" 16; then
        skipped_dense+=("$name")
        continue
    fi
    for run in "two|rows" "four|rows" "two|rows;dense=mirror" "host|dense=rows"; do
        IFS='|' read -r machine map <<< "$run"
        case $machine in
            host) topo=host ;;
            two) topo=$TWO ;;
            four) topo=$FOUR ;;
        esac
        got=$OUT/$name.dense.$machine.$(echo "$map" | tr ':,+*;=@' '___x___')
        if ! greedy "$topo" "$map" "$model" "$got" 16; then
            fail "$name [$machine, $map]: llama.cpp failed: $(grep -m2 -iE 'error|fail' "$got.err" | tr '\n' ' ')"
        elif ! grep -q "and [0-9]* weight matrices" "$got.err"; then
            fail "$name [$machine, $map]: numa-moe placed no weight matrix"
        elif cmp -s "$ref" "$got"; then
            pass
        else
            fail "$name [$machine, $map]: differs from stock at step $(cmp "$ref" "$got" | sed -n 's/.*line \([0-9]*\).*/\1/p')"
        fi
    done
done

# 1a. threads: 1, 3 and 4 threads (2 above) on the repacked and plain layouts, described
# 2- and 4-node machines, batches of prompt and decode
for model in "$M"/many/e64u8-q4_K.gguf "$M"/many/e32u4-mxfp4.gguf "$M"/many/e32u4-q8_0.gguf; do
    name=$(basename "$model" .gguf)
    for t in 1 3 4; do
        ref=$OUT/$name.stock-t$t
        if ! greedy stock off "$model" "$ref" 16 --threads "$t"; then
            fail "$name [$t threads]: stock llama.cpp failed"
            continue
        fi
        for machine in two four; do
            topo=$TWO
            [ $machine = four ] && topo=$FOUR
            got=$OUT/$name.$machine.t$t
            if greedy "$topo" rows "$model" "$got" 16 --threads "$t" && cmp -s "$ref" "$got"; then
                pass
            else
                fail "$name [$machine, rows, $t threads]: differs from stock or failed: $(grep -m2 -iE 'error|fail' "$got.err" | tr '\n' ' ')"
            fi
        done
    done
done

# 1b. llama-completion with the --numa-expert-map flag (llama.cpp's own front end), retried
# when its logger drops the output at exit
completion_ok=0
until_logged "$OUT/completion.out" "$OUT/completion.err" "eval time" \
    numa_moe "$TWO" timeout 120 "$B/llama-completion" -m "$M/many/e32u4-q8_0.gguf" -p "$PROMPT" -n 12 \
    --temp 0 --seed 1 -no-cnv -t 2 -c 256 -v --numa-expert-map rows && completion_ok=1
if [ $completion_ok = 1 ] && grep -q 'numa-moe: 6 expert tensors .* placed by map "rows" (--numa-expert-map)' "$OUT/completion.err" &&
    grep -q "numa-moe: node 0: .* | node 1: " "$OUT/completion.err"; then
    pass
else
    fail "llama-completion --numa-expert-map rows: no placement report ($(grep -m3 numa-moe "$OUT/completion.err" | tr '\n' ' '))"
fi

# 2. KL divergence against stock logits (llama-perplexity): numa-moe's statistics are exactly
# those of stock against the same base. llama.cpp stores base log-probabilities in 16 bits, so
# even stock against itself shows |KLD| up to 1e-6; the mean must print as 0. Both run as
# shipped (CPU_REPACK on), so repacked experts are held to CPU_REPACK's results.
text=$OUT/kld.txt
for i in $(seq 1 60); do echo "Line $i of a text long enough for two chunks of perplexity; the fox keeps jumping."; done > "$text"
kld_stats() { sed -n '/^====== Perplexity statistics/,$p' "$1" | grep -v '^numa-moe: '; }  # numa-moe's exit report is not llama.cpp's
# ppl_run OUT LAST COMMAND...: llama-perplexity's output in OUT, retried when llama.cpp's
# logger lost its last line (matching LAST) at exit
ppl_run() {
    local out=$1
    shift
    until_logged "$out" "$out" "$@"
}
for model in "$M"/many/*.gguf "$M"/archs/qwen3moe-moe.gguf "$M"/archs/deepseek2-moe.gguf "$M"/archs/gpt-oss-moe.gguf "$M"/archs/llama4-moe.gguf; do
    name=$(basename "$model" .gguf)
    base=$OUT/$name.kld
    ppl=(timeout 300 "$B/llama-perplexity" -m "$model" -f "$text" -c 128 -b 128 -t 2 --kl-divergence-base "$base")
    if ! ppl_run "$OUT/$name.ppl-base" "Final estimate" "${ppl[@]}" ||
        ! ppl_run "$OUT/$name.ppl-stock" "^Same top p" "${ppl[@]}" --kl-divergence; then
        fail "$name: stock llama-perplexity failed: $(tail -qn2 "$OUT/$name.ppl-base" "$OUT/$name.ppl-stock" 2>/dev/null | tr '\n' ' ')"
        continue
    fi
    for machine in two four; do
        topo=$TWO
        [ $machine = four ] && topo=$FOUR
        log=$OUT/$name.ppl-$machine
        if ! ppl_run "$log" "^Same top p" numa_moe "$topo" "${ppl[@]}" --kl-divergence --numa-expert-map rows; then
            fail "$name [$machine]: llama-perplexity --kl-divergence failed: $(tail -2 "$log" | tr '\n' ' ')"
            continue
        fi
        kld=$(sed -n 's/^Mean *KLD: *\([-0-9.e]*\).*/\1/p' "$log" | head -1)
        if [ -n "$kld" ] && awk -v k="$kld" 'BEGIN { exit !(k == 0) }' && [ -n "$(kld_stats "$log")" ] &&
            [ "$(kld_stats "$log")" = "$(kld_stats "$OUT/$name.ppl-stock")" ]; then
            pass
        else
            fail "$name [$machine]: KLD statistics differ from stock's (mean KLD ${kld:-missing}): $(diff <(kld_stats "$OUT/$name.ppl-stock") <(kld_stats "$log") | head -4 | tr '\n' ' ')"
        fi
    done
done

# 3. the tool's plan of a real model matches what llama.cpp allocates
model=$M/many/e64u8-q4_K.gguf
plan=$("$CLI" plan --model "$model" --map rows --topology "package:2 numa:4 core:4 pu:1" --json 2>&1)
bytes=$(echo "$plan" | sed -n 's/.*"expert_bytes":\([0-9]*\).*/\1/p')
# (the run with dense=off: numa-moe's buffers then hold the experts alone)
alloc=$(grep -m1 "NUMA_MOE\(_REPACK\)\? model buffer size" "$OUT/e64u8-q4_K.two.rows_dense_off.err" | sed -n 's/.*= *\([0-9.]*\) MiB.*/\1/p')
if [ -n "$bytes" ] && [ -n "$alloc" ] && awk -v b="$bytes" -v a="$alloc" 'BEGIN { exit !(b / 1048576 - a < 0.01 && a - b / 1048576 < 0.01) }'; then
    pass
else
    fail "plan: numa-moe plan says ${bytes:-?} bytes of experts, llama.cpp allocated ${alloc:-?} MiB"
fi
nodes=$(echo "$plan" | grep -o '"node":[0-9]*,"bytes":[0-9]*' | sed 's/.*"bytes"://' | sort -u)
if [ "$(echo "$nodes" | wc -l)" = 1 ] && [ "$nodes" -gt 0 ] && [ $((nodes * 8)) = "$bytes" ]; then
    pass
else
    fail "plan: 8 nodes should each hold 1/8 of $bytes bytes, got: $(echo $nodes)"
fi

# 3b. and of a model llama.cpp itself wrote (test-llama-archs), on an 8-node EPYC
plan=$("$CLI" plan --model "$M/archs/qwen3moe-moe.gguf" --map rows --topology "$root/tests/topologies/epyc-2s-nps4.xml" --json 2>&1)
bytes=$(echo "$plan" | sed -n 's/.*"expert_bytes":\([0-9]*\).*/\1/p')
nodes=$(echo "$plan" | grep -o '"node":[0-9]*,"bytes":[0-9]*' | sed 's/.*"bytes"://' | sort -u)
if [ -n "$bytes" ] && [ "$(echo "$nodes" | wc -l)" = 1 ] && [ $((nodes * 8)) = "$bytes" ] && [[ "$plan" == *'"warnings":[]'* ]]; then
    pass
else
    fail "plan of qwen3moe-moe on 8 nodes: $(echo "$plan" | head -c 400)"
fi

# 4. a bad map stops llama.cpp before loading, with the planner's message
check_error() {
    local what=$1 expect=$2
    shift 2
    if "$@" > "$OUT/err.out" 2>&1; then
        fail "$what: llama.cpp ran with a bad map"
    elif grep -q "$expect" "$OUT/err.out"; then
        pass
    else
        fail "$what: expected \"$expect\", got: $(grep -m3 -iE 'error|numa-moe' "$OUT/err.out" | tr '\n' ' ')"
    fi
}
qwen=$M/archs/qwen3moe-moe.gguf
check_error "absent node" "node 7 does not exist" numa_moe host "$B/llama-completion" -m "$qwen" -p hi -n 1 -no-cnv --numa-expert-map "0:0,1:7"
check_error "syntax" "expected ':' and a node after the experts" numa_moe host "$B/llama-completion" -m "$qwen" -p hi -n 1 -no-cnv --numa-expert-map "0-1"
check_error "llama-bench flag" "unknown policy \"rowz\"" numa_moe host "$B/llama-bench" -m "$qwen" -p 0 -n 1 --numa-expert-map rowz
# errors found while loading (llama.cpp's own tools print them through their asynchronous
# logger, which can drop lines at exit; the greedy driver prints them as they come)
check_error "expert beyond the model" "expert 2 is beyond the model: blk.0.ffn_gate_exps.weight has 2 experts" \
    env NUMA_MOE_EXPERT_MAP="0-3:0" LD_PRELOAD="$LIB" "$GREEDY" "$qwen" 1 hi
check_error "expert not mapped" "expert 1 is not mapped" \
    env NUMA_MOE_EXPERT_MAP="0:0" LD_PRELOAD="$LIB" "$GREEDY" "$qwen" 1 hi
check_error "malformed map in the environment" "NUMA_MOE_EXPERT_MAP: invalid expert map \"0:0,,\"" \
    env NUMA_MOE_EXPERT_MAP="0:0,," LD_PRELOAD="$LIB" "$GREEDY" "$qwen" 1 hi
check_error "flag without the library" "needs libnuma_moe.so" "$B/llama-completion" -m "$qwen" -p hi -n 1 -no-cnv --numa-expert-map rows

# 5. the flag reaches llama-server and llama-cli too (their argument parsers accept it)
for tool in llama-server llama-cli; do
    help=$(numa_moe host "$B/$tool" --help 2>&1)
    if grep -q -- "--numa-expert-map" <<< "$help"; then pass; else fail "$tool has no --numa-expert-map"; fi
done

# 6. a build that links libnuma_moe.so (GGML_NUMA_MOE_LINK) needs no LD_PRELOAD
linked=$root/build/llama-linked/bin/llama-completion
if [ -x "$linked" ]; then
    ok=0
    until_logged "$OUT/linked.out" "$OUT/linked.err" "eval time" env NUMA_MOE_TOPOLOGY="$TWO" "$linked" -m "$M/many/e32u4-q8_0.gguf" \
        -p "$PROMPT" -n 4 --temp 0 -no-cnv -t 2 -c 256 -v --numa-expert-map rows && ok=1
    if [ $ok = 1 ] && grep -q "numa-moe: 6 expert tensors" "$OUT/linked.err"; then pass; else fail "GGML_NUMA_MOE_LINK build: no placement report"; fi
else
    fail "missing $linked (make llama-linked)"
fi

# 7. two contexts on one model decoding different prompts at once from two threads
# (tests/e2e/two_contexts.c): every step's logits bit-identical to one context alone, stock and
# with numa-moe on a described 2-node machine and on this one (f16 experts, which numa-moe
# computes on one node too)
for machine in stock two host; do
    case $machine in
        stock) topo=stock ;;
        two) topo=$TWO ;;
        host) topo=host ;;
    esac
    log=$OUT/two_contexts.$machine
    if ! NUMA_MOE_EXPERT_MAP=rows numa_moe "$topo" timeout 120 "$root/build/two_contexts" "$M/many/e48u6-f16.gguf" 16 > "$log" 2> "$log.err"; then
        fail "two contexts at once [$machine]: $(grep -m2 -E "^FAIL|two contexts" "$log" | tr '\n' ' ')$(tail -2 "$log.err" | tr '\n' ' ')"
    elif [ $machine != stock ] && ! grep -q "numa-moe: [0-9]* expert tensors" "$log.err"; then
        fail "two contexts at once [$machine]: numa-moe placed no expert tensor"
    else
        pass
    fi
done

[ ${#skipped[@]} -gt 0 ] && echo "e2e: skipped ${skipped[*]} (no stacked expert tensors in the file)"
[ ${#skipped_dense[@]} -gt 0 ] && echo "e2e: dense models stock llama.cpp cannot run here: ${skipped_dense[*]}"
echo "e2e: $(( ${#models[@]} - ${#skipped[@]} )) MoE models compared"
summary
