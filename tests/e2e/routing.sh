#!/usr/bin/env bash
# Routing statistics end to end (issue 13), as a user runs them:
#   1. NUMA_MOE_ROUTING_OUT writes a profile at exit; `numa-moe routing` reads it and draws it;
#   2. `--numa-expert-map balanced:FILE` from that profile gives stock's tokens and logits on
#      described 2- and 4-node machines (a whole-expert map like block);
#   3. a profile of another model is refused with the file named; a bare `balanced` without
#      a profile falls back to block with one warning, still equal to stock.
# Prints one line per failure and `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"
OUT=$root/build/e2e-routing
rm -rf "$OUT"
mkdir -p "$OUT"
PROMPT="The quick brown fox jumps over the lazy dog"
model=$M/many/e32u4-q8_0.gguf
other=$M/many/e48u6-f16.gguf

# g NAME TOPOLOGY MAP [model]: 8 greedy tokens and logits hashes into $OUT/NAME (scripts/lib.sh)
g() {
    local name=$1 topo=$2 map=$3 m=${4:-$model}
    if [ "$topo" = stock ]; then
        greedy stock "$map" "$m" "$OUT/$name" 8 --no-extra-bufts
    else
        greedy "$topo" "$map" "$m" "$OUT/$name" 8
    fi
}

g stock stock - || fail "stock run failed: $(tail -2 "$OUT/stock.err")"

# 1. record, read, draw
if NUMA_MOE_ROUTING_OUT=$OUT/profile.json g record "$TWO" rows && [ -s "$OUT/profile.json" ]; then
    pass
    grep -q "numa-moe: routing: [0-9]* token-slots over 2 layers of 32 experts" "$OUT/record.err" || fail "no routing line in the exit report"
    if "$CLI" routing "$OUT/profile.json" --topology "$TWO" --out "$OUT/pictures" > "$OUT/routing.txt" 2>&1 &&
        ls "$OUT"/pictures/*.svg > /dev/null 2>&1; then
        pass
    else
        fail "numa-moe routing: $(tail -3 "$OUT/routing.txt" | tr '\n' ' ')"
    fi
else
    fail "NUMA_MOE_ROUTING_OUT wrote no profile: $(grep -m2 numa-moe "$OUT/record.err" | tr '\n' ' ')"
fi

# 2. balanced from the profile, equal to stock
for machine in two four; do
    topo=$TWO
    [ $machine = four ] && topo=$FOUR
    if g "balanced.$machine" "$topo" "balanced:$OUT/profile.json" && grep -q "numa-moe: [0-9]* expert tensors" "$OUT/balanced.$machine.err"; then
        if cmp -s "$OUT/stock" "$OUT/balanced.$machine"; then pass; else fail "balanced [$machine]: differs from stock"; fi
    else
        fail "balanced [$machine]: $(grep -m2 -iE 'numa-moe|error' "$OUT/balanced.$machine.err" | tr '\n' ' ')"
    fi
done

# 3. another model's profile: refused, naming the file; no profile: block, one warning
if g mismatch "$TWO" "balanced:$OUT/profile.json" "$other"; then
    fail "a 32-expert profile was accepted for a 48-expert model"
elif grep -q "profile.json.*32 experts" "$OUT/mismatch.err"; then
    pass
else
    fail "mismatched profile: no clear error ($(grep -m2 -iE 'numa-moe|error' "$OUT/mismatch.err" | tr '\n' ' '))"
fi
if NUMA_MOE_ROUTING_PROFILE= g bare "$TWO" balanced && cmp -s "$OUT/stock" "$OUT/bare"; then
    n=$(grep -c "block" <(grep -i "warning.*balanced" "$OUT/bare.err"))
    [ "$n" -eq 1 ] && pass || fail "bare balanced: want one warning naming the fallback to block, got $n"
else
    fail "bare balanced: failed or differs from stock ($(grep -m2 -iE 'numa-moe|error' "$OUT/bare.err" | tr '\n' ' '))"
fi

echo -n "routing: "
summary
