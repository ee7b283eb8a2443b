#!/usr/bin/env bash
# Hybrid CPU+GPU end to end: llama.cpp with a GPU backend keeps some expert tensors on the CPU
# (-ngl 99 -ot exps=CPU / --cpu-moe, --n-cpu-moe 2, -ngl 2 on a 4-layer model); numa-moe must
# place every one of them, in the layout stock gives them in that configuration, with tokens
# and logits bit-identical to stock's same configuration, and ggml's offload of large batches
# to the GPU must keep working from numa-moe's buffers.
#
# The GPU is ggml's Vulkan backend on Mesa's lavapipe (a software Vulkan driver, so this runs
# on any machine): build/llama-vulkan (scripts/llama.sh vulkan) and build/vulkan/greedy. Every
# run decodes a prompt of 54 tokens, which ggml offloads to the GPU (ggml-vulkan asks for
# batches of 32 tokens or more), then single tokens, computed on the CPU: the first step's
# logits come from the prefill, the others from decode.
#
# LLAMA_VULKAN_BIN runs another build's libraries and llama-completion. Without patches/0003
# every run that lets the GPU's host buffer take weights (no --no-host) fails here: the experts
# land in CPU_Mapped with mmap, Vulkan_Host with --load-mode none, and numa-moe places nothing.
#
# Prints one line per failure and `N passed, N failed`. Expects make llama-vulkan greedy-vulkan lib models.
set -uo pipefail

source "$(dirname "$0")/../../scripts/lib.sh"
OUT=$root/build/e2e-hybrid
rm -rf "$OUT"
mkdir -p "$OUT"
VB=${LLAMA_VULKAN_BIN:-$root/build/llama-vulkan/bin}
GREEDY=$root/build/vulkan/greedy  # greedy.c linked against $VB (lib.sh's greedy runs $GREEDY)
export LD_LIBRARY_PATH=$VB        # before greedy's RUNPATH, so LLAMA_VULKAN_BIN picks the libraries
# ggml-vulkan skips CPU-type devices such as lavapipe unless told to use them
export GGML_VK_VISIBLE_DEVICES=0
# Debian 12's lavapipe (Mesa 22.3) crashes in ggml-vulkan's flash-attention shader for batches
# of more than a few tokens, stock alike: every run here has flash attention off (-fa off).
# Mesa caches the compiled pipelines (about 20 s the first time) outside the clone.
export MESA_SHADER_CACHE_DIR=${MESA_SHADER_CACHE_DIR:-${NUMA_MOE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/numa-moe}/mesa-shader-cache}
export GREEDY_TIMEOUT=300

for f in "$GREEDY" "$VB/libllama.so" "$VB/libggml-vulkan.so" "$VB/llama-completion"; do
    [ -e "$f" ] || { echo "FAIL missing $f (make llama-vulkan greedy-vulkan)"; exit 1; }
done

PROMPT=$(printf 'The quick brown fox jumps over the lazy dog. %.0s' 1 2 3 4 5 6)  # 54 tokens
N=8
MODEL=$M/hybrid/e32u4-q4_0-l4.gguf  # 4 layers of 32 experts, 4 used, q4_0 (CPU_REPACK repacks it)
USED=4

# buffers LOG: the "model buffer size" lines of a run's log, sorted
buffers() { grep -o '[A-Za-z0-9_]* model buffer size = *[0-9.]* MiB' "$1" | sort; }

# layer_slots CSV LAYER: token-slots numa-moe's hook computed in LAYER (a routing profile)
layer_slots() { awk -F, -v l="$2" '$1 == l { s += $3 } END { print s + 0 }' "$1"; }

# check WHAT REF GOT TENSORS: a numa-moe run against stock's run of the same configuration
check() {
    local what=$1 ref=$2 got=$3 tensors=$4
    if ! grep -q "Vulkan0 model buffer size" "$ref.err"; then
        fail "$what: stock loaded nothing on the GPU (no Vulkan0 buffer): is lavapipe installed? $(grep -m2 -iE 'vulkan|error' "$ref.err" | tr '\n' ' ')"
        return
    fi
    if ! grep -q "numa-moe: $tensors expert tensors .* placed by map" "$got.err"; then
        fail "$what: numa-moe did not place the $tensors expert tensors kept on the CPU ($(grep -m1 'numa-moe: [0-9]* expert tensors' "$got.err" || echo none placed)); buffers: $(buffers "$got.err" | tr '\n' ';')"
        return
    fi
    # the layout stock gives the experts in this configuration: CPU_REPACK's with --no-host (and
    # no GPU host buffer), the standard one where a GPU's host buffer would take them
    local stock_repacks=0 repacked=0
    grep -q "CPU_REPACK model buffer size" "$ref.err" && stock_repacks=1
    grep -q "repacked for CPU_REPACK's kernels" "$got.err" && repacked=1
    if [ $stock_repacks != $repacked ]; then
        fail "$what: stock repacks the experts: $stock_repacks, numa-moe repacked them: $repacked"
        return
    fi
    # every other weight where it went before: the GPU's weights alike
    if [ "$(buffers "$ref.err" | grep Vulkan0)" != "$(buffers "$got.err" | grep Vulkan0)" ]; then
        fail "$what: GPU weights differ: stock $(buffers "$ref.err" | grep Vulkan0), numa-moe $(buffers "$got.err" | grep Vulkan0)"
        return
    fi
    # the standard layout is host memory a GPU copies from: say whether it can be pinned
    if [ $repacked = 0 ] && ! grep -q "numa-moe: Vulkan0 cannot register expert memory as pinned host memory" "$got.err"; then
        fail "$what: no word on pinning numa-moe's memory for Vulkan0"
        return
    fi
    # ggml offloads the prefill's expert matmuls to the GPU from a host buffer (numa-moe's
    # standard layout, as from stock's); repacked layouts stay on the CPU, as CPU_REPACK's do
    local slots decode=$(((N - 1) * USED))
    slots=$(layer_slots "$got.csv" 0)
    if [ $repacked = 0 ] && [ "$slots" != $decode ]; then
        fail "$what: numa-moe computed $slots token-slots of layer 0, want the $decode of decode alone: the prefill was not offloaded to the GPU"
        return
    elif [ $repacked = 1 ] && [ "$slots" -lt $((decode + 32 * USED)) ]; then
        fail "$what: numa-moe computed $slots token-slots of layer 0: the prefill of repacked experts left the CPU"
        return
    fi
    if cmp -s "$ref" "$got"; then
        pass
    else
        fail "$what: differs from stock's same configuration at step $(cmp "$ref" "$got" | sed -n 's/.*line \([0-9]*\).*/\1/p')"
    fi
}

# hybrid TOPO MAP OUT [greedy args]: a numa-moe run with its routing profile in OUT.csv
hybrid() {
    local topo=$1 map=$2 out=$3
    shift 3
    NUMA_MOE_ROUTING_OUT=$out.csv greedy "$topo" "$map" "$MODEL" "$out" "$N" "$@" --no-flash-attn && return 0
    fail "$(basename "$out"): llama.cpp failed: $(grep -m2 -iE 'error|fail|abort' "$out.err" | tr '\n' ' ')"
    return 1
}

# 1. each way of keeping experts on the CPU, mmap and --load-mode none, with and without
# --no-host, on a described 2-node machine (rows). -ngl 2 of 4 layers keeps layers 0-2 on the
# CPU (llama.cpp counts the output as a layer); --n-cpu-moe 2 the experts of layers 0-1.
configs=("cpu-moe|--ngl 99 --cpu-moe|12" "n-cpu-moe|--ngl 99 --n-cpu-moe 2|6" "ngl2|--ngl 2|9")
for c in "${configs[@]}"; do
    IFS='|' read -r name flags tensors <<< "$c"
    for mode in mmap none; do
        for host in host no-host; do
            args=($flags --load-mode $mode)
            [ $host = no-host ] && args+=(--no-host)
            tag=$name.$mode.$host
            if ! greedy stock off "$MODEL" "$OUT/$tag.stock" "$N" "${args[@]}" --no-flash-attn; then
                fail "$tag: stock llama.cpp failed: $(tail -2 "$OUT/$tag.stock.err" | tr '\n' ' ')"
                continue
            fi
            hybrid "$TWO" rows "$OUT/$tag.two.rows" "${args[@]}" &&
                check "$tag [two, rows]" "$OUT/$tag.stock" "$OUT/$tag.two.rows" "$tensors"
        done
    done
done

# 2. other maps on the described machine, and rows on this one, where memory is bound and
# its pages are checked
for map in block mirror; do
    tag=cpu-moe.mmap.host
    hybrid "$TWO" $map "$OUT/$tag.two.$map" --ngl 99 --cpu-moe --load-mode mmap &&
        check "$tag [two, $map]" "$OUT/$tag.stock" "$OUT/$tag.two.$map" 12
done
for mode in mmap none; do
    tag=cpu-moe.$mode.host
    hybrid host rows "$OUT/$tag.host.rows" --ngl 99 --cpu-moe --load-mode $mode || continue
    check "$tag [host, rows]" "$OUT/$tag.stock" "$OUT/$tag.host.rows" 12
    grep -q "numa-moe: verified [0-9]* resident pages of expert memory .*: none off its planned node" "$OUT/$tag.host.rows.err" && pass ||
        fail "$tag [host, rows]: no page check, or pages off their node: $(grep -m1 'numa-moe: .*pages' "$OUT/$tag.host.rows.err")"
done

# 3. with the map off numa-moe takes nothing: every weight where stock puts it
tag=cpu-moe.mmap.host
if hybrid "$TWO" off "$OUT/$tag.two.off" --ngl 99 --cpu-moe --load-mode mmap; then
    if [ "$(buffers "$OUT/$tag.stock.err")" = "$(buffers "$OUT/$tag.two.off.err")" ] && cmp -s "$OUT/$tag.stock" "$OUT/$tag.two.off"; then
        pass
    else
        fail "$tag [two, off]: buffers or outputs differ from stock: $(buffers "$OUT/$tag.two.off.err" | tr '\n' ';')"
    fi
fi

# 4. llama.cpp's own front end with its flags: -ngl 99 -ot exps=CPU --numa-expert-map rows (its
# first load is a dry run that fits the context, with buffers of 0 MiB)
ok=0
until_logged "$OUT/completion.out" "$OUT/completion.err" "eval time" \
    numa_moe "$TWO" timeout 300 "$VB/llama-completion" -m "$MODEL" -p "$PROMPT" -n 4 --temp 0 --seed 1 -no-cnv -t 2 -c 256 -v \
    -fa off -ngl 99 -ot exps=CPU --numa-expert-map rows && ok=1
if [ $ok = 1 ] && grep -q 'numa-moe: 12 expert tensors .* placed by map "rows" (--numa-expert-map)' "$OUT/completion.err" &&
    grep -q "NUMA_MOE model buffer size = *[1-9]" "$OUT/completion.err" && grep -q "Vulkan0 model buffer size = *[1-9]" "$OUT/completion.err"; then
    pass
else
    fail "llama-completion -ngl 99 -ot exps=CPU --numa-expert-map rows: $(grep -E 'numa-moe: [0-9]|model buffer size = *[1-9]' "$OUT/completion.err" | tr '\n' ' ')"
fi

summary
