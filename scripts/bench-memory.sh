#!/usr/bin/env bash
# Memory cost of numa-moe: resident memory of llama-server after loading a MoE model, stock vs
# numa-moe, with and without mmap, and for mirror, for bf16 experts and for q4_K experts (repacked). Steady RSS is read from /proc/PID/status
# once the server listens (VmRSS = RssAnon + RssFile); peak RSS is /usr/bin/time's maximum
# resident set size for the same run. Prints a markdown table with the ratio to stock.
set -uo pipefail

source "$(dirname "$0")/lib.sh"
# llama.cpp built for this CPU, as in the rest of make bench
B=$NB
GEN=$NGEN
MODELS_MEM=${MEM_MODEL:-"$M/mem-e128u8-bf16.gguf $M/mem-e128u8-q4_K.gguf"}
OUT=$root/build/bench
mkdir -p "$OUT"

# Qwen3-30B-A3B expert shapes, 2 layers: bf16 experts (not repacked by ggml, so stock and
# numa-moe both keep exactly one copy of each expert byte when it works) and q4_K experts
# (stock repacks them into CPU_REPACK's buffer, numa-moe into its own repacked buffer type)
for MODEL in $MODELS_MEM; do
    if [ ! -f "$MODEL" ]; then
        ty=$(basename "$MODEL" .gguf)
        "$GEN" --out "$MODEL" "${QWEN3_A3B_SHAPE[@]}" --layers 2 --type "${ty##*-}" > /dev/null
    fi
done

# measure LABEL TOPOLOGY stock|numa [llama-server args...]
measure() {
    local label=$1 topo=$2 mode=$3
    shift 3
    local env=()
    [ "$mode" = stock ] || env=(LD_PRELOAD="$LIB" NUMA_MOE_TOPOLOGY="$topo")
    local log=$OUT/mem-$label.log
    env "${env[@]}" /usr/bin/time -v "$B/llama-server" -m "$MODEL" -t 2 -c 512 --port 0 "$@" > "$log" 2>&1 &
    local timer=$!
    local pid=""
    for _ in $(seq 1 600); do
        pid=$(pgrep -P "$timer" llama-server || true)
        [ -n "$pid" ] && grep -q "server is listening\|model loaded" "$log" && break
        sleep 0.1
    done
    sleep 0.5
    local rss anon file
    rss=$(awk '/^VmRSS/ {print int($2/1024)}' "/proc/$pid/status")
    anon=$(awk '/^RssAnon/ {print int($2/1024)}' "/proc/$pid/status")
    file=$(awk '/^RssFile/ {print int($2/1024)}' "/proc/$pid/status")
    kill "$pid"
    wait "$timer" 2>/dev/null
    local peak
    peak=$(awk -F': ' '/Maximum resident set size/ {print int($2/1024)}' "$log")
    echo "$label|$rss|$anon|$file|$peak"
}

for MODEL in $MODELS_MEM; do
    model_mib=$(( $(stat -c %s "$MODEL") >> 20 ))
    tag=$(basename "$MODEL" .gguf)
    echo "### Memory: llama-server after loading $(basename "$MODEL") (${model_mib} MiB), 2 threads"
    echo
    echo "| run | steady RSS MiB | anon | file | peak RSS MiB | steady vs stock | peak vs stock |"
    echo "|---|---|---|---|---|---|---|"
    for load in mmap none; do
        flags=()
        [ $load = none ] && flags=(--load-mode none)
        base=$(measure "$tag-stock-$load" host stock "${flags[@]}")
        IFS='|' read -r _ brss _ _ bpeak <<< "$base"
        rows=("$base"
              "$(measure "$tag-rows-$load" host numa "${flags[@]}" --numa-expert-map rows)"
              "$(measure "$tag-rows2-$load" "$TWO" numa "${flags[@]}" --numa-expert-map rows)"
              "$(measure "$tag-mirror2-$load" "$TWO" numa "${flags[@]}" --numa-expert-map mirror)")
        names=("stock ($load)" "numa-moe rows, 1 node ($load)" "numa-moe rows, described 2 nodes ($load)" "numa-moe mirror, described 2 nodes ($load)")
        for i in "${!rows[@]}"; do
            IFS='|' read -r _ rss anon file peak <<< "${rows[$i]}"
            echo "| ${names[$i]} | $rss | $anon | $file | $peak | $(awk -v a="$rss" -v b="$brss" 'BEGIN{printf "%.3f", a/b}') | $(awk -v a="$peak" -v b="$bpeak" 'BEGIN{printf "%.3f", a/b}') |"
        done
    done
done
