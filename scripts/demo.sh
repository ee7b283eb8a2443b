#!/usr/bin/env bash
# make demo: the patched llama.cpp runs a Mixture-of-Experts model with numa-moe, printing
# where every expert byte went, and numa-moe's tools show the machine, the plan and the
# placement of a running server.
set -uo pipefail

source "$(dirname "$0")/lib.sh"
# llama.cpp built for this CPU, as a user builds it (make demo builds it)
B=$NB
GEN=$NGEN
MODEL=$M/demo-e64u8-f16.gguf
OUT=$root/build/demo
mkdir -p "$OUT" "$M"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ ! -f "$MODEL" ]; then
    # 64 experts, 8 used per token, 4 layers; f16 experts (ggml's CPU_REPACK does not take
    # f16, so numa-moe places them even on a one-node machine)
    "$GEN" --out "$MODEL" --experts 64 --used 8 --embd 512 --ff 256 --layers 4 \
        --vocab 512 --heads 8 --head-kv 2 --type f16 --seed 11 > /dev/null
fi

say "this machine, as numa-moe sees it (numa-moe topology)"
"$CLI" topology

say "the plan for this machine (numa-moe plan --map rows)"
"$CLI" plan --model "$MODEL" --map rows

say "the same model planned for a 2-socket EPYC in NPS4, 8 nodes (numa-moe plan --topology tests/topologies/...)"
"$CLI" plan --model "$MODEL" --map rows --topology "$root/tests/topologies/epyc-2s-nps4.xml" --threads 96

say "llama-completion with LD_PRELOAD=libnuma_moe.so --numa-expert-map rows"
ok=0
until_logged "$OUT/completion.out" "$OUT/completion.err" "eval time" env LD_PRELOAD="$LIB" "$B/llama-completion" -m "$MODEL" \
    -p "Once upon a time" -n 48 --temp 0 --seed 1 -no-cnv -t 2 --numa-expert-map rows -v && ok=1
grep -E " [IWE] numa-moe|NUMA_MOE model buffer size = +[1-9]" "$OUT/completion.err" | sed 's/^[0-9.]* [A-Z] //'
echo "generated: $(head -c 400 "$OUT/completion.out")"
grep -E "eval time" "$OUT/completion.err" | sed 's/^[0-9.]* [A-Z] //'
[ $ok = 1 ] || echo "(llama-completion failed or its log was cut short three times; see $OUT/completion.err)"

if [ "$("$CLI" topology --json | grep -o '"id":' | wc -l)" -lt 2 ]; then
    say "one node here: the same run planned for a described 2-socket machine (NUMA_MOE_TOPOLOGY; memory not bound)"
    until_logged "$OUT/described.out" "$OUT/described.err" "eval time" numa_moe "$root/tests/topologies/xeon-2s.xml" \
        "$B/llama-completion" -m "$MODEL" -p "Once upon a time" -n 16 --temp 0 --seed 1 -no-cnv -t 2 --numa-expert-map rows -v
    grep -E " [IWE] numa-moe" "$OUT/described.err" | sed 's/^[0-9.]* [A-Z] //'
    text=$(tr -d '\n' < "$OUT/described.out")
    if [ -n "$text" ] && [ "$(head -c ${#text} "$OUT/completion.out")" = "$text" ]; then
        echo "generated: $text (the same tokens as the run above)"
    fi
fi

say "how the model routes: NUMA_MOE_ROUTING_OUT, numa-moe routing, and a balanced map from it"
NUMA_MOE_ROUTING_OUT=$OUT/routing.json NUMA_MOE_EXPERT_MAP=block numa_moe "$root/tests/topologies/xeon-2s.xml" \
    "$B/llama-completion" -m "$MODEL" -p "Once upon a time" -n 32 --temp 0 --seed 1 -no-cnv -t 2 > /dev/null 2> "$OUT/routing.err"
grep -E "^numa-moe: (routing|rows computed)" "$OUT/routing.err"
if [ -s "$OUT/routing.json" ]; then
    "$CLI" routing "$OUT/routing.json" --map block --topology "$root/tests/topologies/xeon-2s.xml"
    "$CLI" plan --model "$MODEL" --map "balanced:$OUT/routing.json" --topology "$root/tests/topologies/xeon-2s.xml" 2>&1 |
        sed -n '/expected/,$p'
fi

say "a running llama-server, checked from outside (numa-moe verify --pid)"
LD_PRELOAD=$LIB "$B/llama-server" -m "$MODEL" --numa-expert-map rows -t 2 --port 0 > "$OUT/server.log" 2>&1 &
server=$!
wait_log "$OUT/server.log" "server is listening\|model loaded" 30
"$CLI" verify --pid "$server"
kill "$server" 2>/dev/null
wait "$server" 2>/dev/null

say "done"
echo "LD_PRELOAD=$LIB $B/llama-cli -m MODEL --numa-expert-map MAP   # your own models"
