#!/usr/bin/env bash
# make bench: stock ggml-cpu vs numa-moe, with the same threads, in one run.
#
#   1. the machine
#   2. op level: build/mmid_bench (tests/bench/mmid_bench.c), MUL_MAT_ID of real MoE expert
#      shapes in q4_K, q8_0, bf16 and mxfp4, stock vs numa-moe vs stock+CPU_REPACK (plus a
#      second stock copy as an A/A control); then the qwen3 decode op with one thread
#   3. the same op benchmark with numa-moe planning for a described 2-node machine
#      (NUMA_MOE_TOPOLOGY) on this host: the cost of a 2-way split, not a NUMA speedup
#   3b. op level, MUL_MAT: build/mmid_bench --op mm, the weight matrices of DeepSeek-V3 and
#      Qwen3-235B (attention, shared expert, output head) in q4_K, q8_0 and bf16 on the
#      described 2-node plan (map rows: the dense= rule's auto splits their rows), stock vs
#      numa-moe vs stock+CPU_REPACK vs numa-moe repacked
#   4. end to end: llama-bench pp and tg on Qwen3-30B-A3B-shaped random models (q4_K and mxfp4
#      experts, which CPU_REPACK repacks, and bf16 experts, which it does not take), stock vs
#      LD_PRELOAD=libnuma_moe.so --numa-expert-map rows (one node, and a described 2-node plan),
#      invocations alternated, with a second stock run as the A/A control, plus stock
#      --repack 0 (q4_K) and stock -lm none (bf16: weights in anonymous memory, as numa-moe's
#      copy is)
#
# Stock and numa-moe are the same build of llama.cpp for this CPU (build/llama-native: GGML_NATIVE=ON,
# as a user builds it), and the op benchmarks link its ggml. Everything is printed as markdown (and
# kept in build/bench/). Expects `make lib llama`, build/native/make-moe-model, build/mmid_bench and
# build/routing_bench (make bench builds them). Knobs (environment):
#   BENCH_THREADS  threads for every run (default 2)
#   BENCH_ROUNDS   alternations of the llama-bench invocations (default 4)
#   BENCH_REPS     llama-bench -r (default 3)
#   BENCH_PP / BENCH_TG  prompt and generated tokens of llama-bench (default 128 / 32)
#   BENCH_WAIT     seconds to wait for other processes to quiet down before each part (default 60)
#   BENCH_QUICK=1  a short smoke run (op benchmark --quick, one round, no bf16 model)
#   BENCH_SKIP     space-separated parts to skip: op split mm routing e2e
set -uo pipefail

source "$(dirname "$0")/lib.sh"
B=$NB
GEN=$NGEN
OUT=$root/build/bench
MODELS=$M
GGML_INC=$root/third_party/llama.cpp/ggml/include
T=${BENCH_THREADS:-2}
ROUNDS=${BENCH_ROUNDS:-4}
REPS=${BENCH_REPS:-3}
PP=${BENCH_PP:-128}
TG=${BENCH_TG:-32}
WAIT=${BENCH_WAIT:-60}
QUICK=${BENCH_QUICK:-0}
SKIP=" ${BENCH_SKIP:-} "
if [ "$QUICK" = 1 ]; then
    ROUNDS=${BENCH_ROUNDS:-1}
    REPS=${BENCH_REPS:-2}
fi
mkdir -p "$OUT" "$MODELS"
start=$SECONDS

for f in "$LIB" "$B/llama-bench" "$B/libggml-cpu.so" "$GEN" "$root/build/mmid_bench" "$root/build/routing_bench"; do
    if [ ! -e "$f" ]; then
        echo "bench: $f is missing: run make bench (it builds them: lib, the native llama.cpp, build/native/make-moe-model, build/mmid_bench, build/routing_bench)" >&2
        exit 2
    fi
done

# share of all CPUs other processes kept busy over one second (we run nothing meanwhile)
others_busy() {
    local a b
    a=($(head -1 /proc/stat))
    sleep 1
    b=($(head -1 /proc/stat))
    local busy=$(((b[1] + b[2] + b[3] + b[6] + b[7] + b[8]) - (a[1] + a[2] + a[3] + a[6] + a[7] + a[8])))
    local idle=$(((b[4] + b[5]) - (a[4] + a[5])))
    echo $((100 * busy / (busy + idle > 0 ? busy + idle : 1)))
}

# waits up to $WAIT seconds for the machine to be quiet (others below 10% of the CPUs)
wait_quiet() {
    local b=0 i
    for ((i = 0; i < WAIT; i++)); do
        b=$(others_busy)
        if [ "$b" -le 10 ]; then
            return 0
        fi
    done
    if [ "$WAIT" -gt 0 ]; then
        echo "> note: other processes kept ${b}% of the CPUs busy when this part started; its numbers may be noisy"
        echo
    fi
}

skip() { [[ "$SKIP" == *" $1 "* ]]; }

echo "# numa-moe benchmarks"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), numa-moe $("$CLI" --version 2>/dev/null | awk '{print $NF}'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)'), libnuma_moe.so built $(date -u -r "$LIB" '+%Y-%m-%d %H:%M UTC'), $T threads"
echo
echo "## Machine"
echo
lscpu_field() { lscpu | sed -n "s/^$1: *//p" | head -1; }
echo "| | |"
echo "|---|---|"
echo "| CPU | $(lscpu_field 'Model name') ($(lscpu_field 'Vendor ID'), family $(lscpu_field 'CPU family') model $(lscpu_field 'Model')) |"
echo "| sockets x cores x threads | $(lscpu_field 'Socket(s)') x $(lscpu_field 'Core(s) per socket') x $(lscpu_field 'Thread(s) per core') ($(nproc) CPUs online) |"
echo "| NUMA nodes | $(lscpu_field 'NUMA node(s)') |"
echo "| caches | L2 $(lscpu_field 'L2 cache'), L3 $(lscpu_field 'L3 cache') |"
echo "| memory | $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) |"
echo "| hypervisor | $(lscpu_field 'Hypervisor vendor' || true) |"
echo "| SIMD | $(grep -o -w -E 'avx2|avx512f|avx512_bf16|avx512_vnni|avx_vnni|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ') |"
llama_build() {
    local cache=$B/../CMakeCache.txt native
    native=$(sed -n 's/^GGML_NATIVE:BOOL=//p' "$cache" 2>/dev/null)
    echo "$(realpath -m --relative-to="$root" "$B/.." 2>/dev/null || echo "$B"), GGML_NATIVE=${native:-unknown}$(
        grep -o -m1 -- '-m\(arch\|cpu\)=[a-z0-9_.-]*' "$B/../native-cpu.txt" 2>/dev/null | sed 's/^/: /')"
}
echo "| llama.cpp build | $(llama_build) |"
echo "| kernel, THP | $(uname -r), THP $(sed 's/.*\[\(.*\)\].*/\1/' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null) |"
echo
echo '```'
"$CLI" topology 2>&1 | head -12
echo '```'
echo

if ! skip op; then
    echo "## MUL_MAT_ID, op level (build/mmid_bench)"
    echo
    echo "One MUL_MAT_ID node (gate/up layout: activations [K, 1, tokens], weights [K, rows, experts]) on one ggml"
    echo "threadpool of $T threads; the same weights in ggml's CPU buffer (stock), numa-moe's buffer (map rows) and,"
    echo "where it takes the type, CPU_REPACK; plus a second stock copy as an A/A control. Random routing that"
    echo "changes every op, the last-level cache flushed before every op, variants interleaved, medians."
    echo
    wait_quiet
    if [ "$QUICK" = 1 ]; then
        build/mmid_bench --threads "$T" --quick | tee "$OUT/mmid.md"
    else
        build/mmid_bench --threads "$T" | tee "$OUT/mmid.md"
    fi
    [ "${PIPESTATUS[0]}" -eq 0 ] || echo "**mmid_bench reported a failed check (see above)**"
    echo
    if [ "$QUICK" != 1 ] && [ "$T" != 1 ]; then
        echo "### The same decode op with one thread (qwen3-30b-a3b shape)"
        echo
        echo "With one thread there is no division of rows between threads: what is left is the hook's own cost."
        echo
        build/mmid_bench --threads 1 --shape qwen3-30b-a3b --mode decode --bw-gib 0 | grep -E '^\|' | tee "$OUT/mmid-1thread.md"
        echo
    fi
fi

if ! skip split; then
    echo "## Overhead of a split on one node (not a NUMA speedup)"
    echo
    echo "The same op benchmark with NUMA_MOE_TOPOLOGY=\"$TWO\" and then \"$FOUR\": numa-moe plans for a"
    echo "described 2- or 4-node machine, splits every expert's rows between the \"nodes\" and gives each part to the"
    echo "threads planned there. Memory is not bound and all threads share this machine's one memory controller,"
    echo "so this measures what the split and its bookkeeping cost, not what NUMA placement gains. The 4-node run"
    echo "covers the types CPU_REPACK repacks; the A/A control is a second CPU_REPACK copy where it takes the type."
    echo
    for topo in "$TWO" "$FOUR"; do
        wait_quiet
        echo "### NUMA_MOE_TOPOLOGY=\"$topo\""
        echo
        types=()
        [ "$topo" = "$FOUR" ] && types=(--type q4_0,q4_K,iq4_nl,mxfp4)
        quick=()
        [ "$QUICK" = 1 ] && quick=(--quick)
        NUMA_MOE_TOPOLOGY="$topo" build/mmid_bench --threads "$T" --bw-gib 0 "${quick[@]}" "${types[@]}" \
            | tee "$OUT/mmid-split-$(echo "$topo" | tr -dc '0-9').md"
        echo
    done
fi

if ! skip mm; then
    echo "## MUL_MAT over weight matrices, op level, on a described 2-node plan (build/mmid_bench --op mm)"
    echo
    echo "One MUL_MAT node (activations [K, tokens]) over one weight matrix of DeepSeek-V3 or Qwen3-235B (attention,"
    echo "shared expert, output head; K x N = n_embd x rows), decode (1 token) and prefill, on one ggml threadpool of"
    echo "$T threads, with NUMA_MOE_TOPOLOGY=\"$TWO\" and map rows: the map's dense= rule (auto) splits every"
    echo "matrix's rows between the two described nodes and numa-moe's hook computes each part on the threads planned"
    echo "there (decode in ggml's layout, every batch in CPU_REPACK's; prefill in ggml's layout stays ggml's kernel)."
    echo "Memory is not bound and all threads share this machine's memory: the cost of the split, not a NUMA gain"
    echo "(target: numa-moe / baseline time <= 1.03). Baseline: stock (ggml's CPU buffer), or stock+repack where"
    echo "CPU_REPACK takes the type (q4_K), with a second copy of it as the A/A control; the LLC flushed before every"
    echo "op, variants interleaved, medians; outputs checked bitwise against the baseline's."
    echo
    wait_quiet
    quick=()
    [ "$QUICK" = 1 ] && quick=(--quick)
    NUMA_MOE_TOPOLOGY="$TWO" build/mmid_bench --op mm --map rows --threads "$T" --bw-gib 0 "${quick[@]}" | tee "$OUT/mm-split-2.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || echo "**mmid_bench --op mm reported a failed check (see above)**"
    echo
fi

if ! skip routing; then
    echo "## Routing statistics and the balanced map (build/routing_bench)"
    echo
    echo "The statistics' cost: the same op timed with recording on and off in alternating rounds (A/A: off"
    echo "against off). The balance: Zipf routing over 128 experts under block, then balanced from the profile"
    echo "block's run recorded, then rows, on described 2- and 4-node machines: the busiest node's rows over the"
    echo "mean, from the hook's own counters (a count, not a timing)."
    echo
    for topo in "$TWO" "$FOUR"; do
        wait_quiet
        echo "### NUMA_MOE_TOPOLOGY=\"$topo\""
        echo
        NUMA_MOE_TOPOLOGY="$topo" build/routing_bench --threads "$T" $([ "$QUICK" = 1 ] && echo --rounds 10) 2>/dev/null \
            | tee -a "$OUT/routing.md"
    done
fi

# ---------------------------------------------------------------------------------------
# end to end

# llama-bench once: $1 tag, $2 config, $3 round, $4 model. Measures the share of the CPUs
# other processes used while it ran (machine busy time minus llama-bench's own CPU time); when
# that is over 10%, waits for a quiet moment and runs it again (at most twice more).
run_llama_bench() {
    local tag=$1 cfg=$2 round=$3 model=$4
    local f="$OUT/e2e/$tag/$cfg-$round"
    local args=(-m "$model" -t "$T" -p "$PP" -n "$TG" -r "$REPS" -o json -v)
    local attempt rc others
    for attempt in 1 2 3; do
        local a b t0 t1
        a=($(head -1 /proc/stat))
        t0=$(date +%s.%N)
        TIMEFORMAT='%U %S'
        case $cfg in
            stock) { time "$B/llama-bench" "${args[@]}" > "$f.json" 2> "$f.err"; } 2> "$f.cpu" ;;
            stock-repack0) { time "$B/llama-bench" "${args[@]}" --repack 0 > "$f.json" 2> "$f.err"; } 2> "$f.cpu" ;;
            stock-nommap) { time "$B/llama-bench" "${args[@]}" -lm none > "$f.json" 2> "$f.err"; } 2> "$f.cpu" ;;
            stock-aa) { time "$B/llama-bench" "${args[@]}" > "$f.json" 2> "$f.err"; } 2> "$f.cpu" ;;
            numa-moe) { time LD_PRELOAD=$LIB "$B/llama-bench" "${args[@]}" --numa-expert-map rows > "$f.json" 2> "$f.err"; } 2> "$f.cpu" ;;
            numa-moe-2n) { time LD_PRELOAD=$LIB NUMA_MOE_TOPOLOGY="$TWO" "$B/llama-bench" "${args[@]}" --numa-expert-map rows > "$f.json" 2> "$f.err"; } 2> "$f.cpu" ;;
        esac
        rc=$?
        t1=$(date +%s.%N)
        b=($(head -1 /proc/stat))
        local busy=$(((b[1] + b[2] + b[3] + b[6] + b[7] + b[8]) - (a[1] + a[2] + a[3] + a[6] + a[7] + a[8])))
        others=$(awk -v busy="$busy" -v hz="$(getconf CLK_TCK)" -v n="$(nproc)" -v t0="$t0" -v t1="$t1" -v own="$(cat "$f.cpu")" \
            'BEGIN { split(own, o, " "); x = (busy / hz - o[1] - o[2]) / ((t1 - t0) * n) * 100; if (x < 0) x = 0; printf "%d", x + 0.5 }')
        echo "$others" > "$f.others"
        if [ $rc -ne 0 ] || [ "$others" -le 10 ]; then
            break
        fi
        [ $attempt -lt 3 ] && wait_quiet > /dev/null
    done
    if [ $rc -ne 0 ]; then
        echo "**llama-bench ($cfg, round $round) failed with exit status $rc:** $(tail -3 "$f.err" | tr '\n' ' ')"
    fi
}

# $1 tag, $2 model, then the configs; alternates them ROUNDS times (the first one rotates)
e2e_model() {
    local tag=$1 model=$2
    shift 2
    local cfgs=("$@")
    rm -rf "$OUT/e2e/$tag"
    mkdir -p "$OUT/e2e/$tag"
    wait_quiet
    local n=${#cfgs[@]}
    for ((r = 1; r <= ROUNDS; r++)); do
        for ((k = 0; k < n; k++)); do
            run_llama_bench "$tag" "${cfgs[$(((r - 1 + k) % n))]}" "$r" "$model"
        done
    done
    python3 - "$OUT/e2e/$tag" "$tag" "$(basename "$model")" "$ROUNDS" "${cfgs[@]}" <<'EOF'
import json, os, statistics, sys
d, tag, model, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfgs = sys.argv[5:]
samples = {}   # (cfg, test) -> [t/s ...]
per_round = {} # (cfg, test, round) -> median t/s
others = []
for cfg in cfgs:
    for r in range(1, rounds + 1):
        p = os.path.join(d, f"{cfg}-{r}.json")
        try:
            rows = json.load(open(p))
        except Exception:
            continue
        try:
            others.append(int(open(os.path.join(d, f"{cfg}-{r}.others")).read()))
        except Exception:
            pass
        for row in rows:
            test = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
            samples.setdefault((cfg, test), []).extend(row["samples_ts"])
            per_round[(cfg, test, r)] = statistics.median(row["samples_ts"])
tests = sorted({t for (_, t) in samples}, key=lambda t: (t[:2] != "tg", t))
def cell(cfg, test):
    v = samples.get((cfg, test))
    if not v:
        return "failed"
    m = statistics.median(v)
    sd = statistics.pstdev(v) / statistics.mean(v) * 100 if len(v) > 1 else 0
    return f"{m:.2f} ±{sd:.1f}%"
others_cfgs = [c for c in cfgs if c != "stock"]
head = ["model", "test"] + [f"{c} t/s" for c in cfgs] + [f"{c}/stock t/s" for c in others_cfgs] + ["numa-moe/stock per round"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * 2 + "---:|" * (len(cfgs) + len(others_cfgs)) + "---|")
for test in tests:
    row = [model, test] + [cell(c, test) for c in cfgs]
    s = samples.get(("stock", test))
    for c in others_cfgs:
        v = samples.get((c, test))
        row.append(f"{statistics.median(v) / statistics.median(s):.3f}" if s and v else "-")
    rr = []
    for r in range(1, rounds + 1):
        a, b = per_round.get(("stock", test, r)), per_round.get(("numa-moe", test, r))
        if a and b:
            rr.append(f"{b / a:.3f}")
    row.append(" ".join(rr) or "-")
    print("| " + " | ".join(row) + " |")
print()
nsamp = len(next(iter(samples.values()))) if samples else 0
print(f"t/s: median of {nsamp} runs per cell (llama-bench -r x {rounds} alternated invocations) ± their standard deviation; "
      f"numa-moe/stock > 1.000: numa-moe faster; per round: the ratio of each round's medians. Share of the CPUs other "
      f"processes used during each invocation (rerun, at most twice, when over 10%): {', '.join(f'{o}%' for o in others)}.")
EOF
    # what numa-moe did with the model (its log lines, first round)
    local err="$OUT/e2e/$tag/numa-moe-1.err"
    if [ -f "$err" ]; then
        echo
        echo "numa-moe's log and the model buffers (first numa-moe run):"
        echo
        echo '```'
        grep -E "numa-moe|model buffer size" "$err" | grep -v "general.name" | sed 's/^[0-9.]* [A-Z] //' | sort -u | head -12
        echo '```'
    fi
    echo
}

if ! skip e2e; then
    echo "## End to end: llama-bench (pp$PP, tg$TG, $T threads)"
    echo
    echo "Random-weight models with Qwen3-30B-A3B's expert shapes (128 experts, 8 used, embd 2048, expert ff 768,"
    echo "vocab 1024) from build/make-moe-model. stock: llama-bench as shipped (CPU_REPACK on); stock-aa: the same"
    echo "again, the A/A control; numa-moe: LD_PRELOAD=libnuma_moe.so and --numa-expert-map rows on this machine's"
    echo "one node (an explicit map: numa-moe places the experts, in CPU_REPACK's layout where stock repacks them);"
    echo "numa-moe-2n: the same planned for a described 2-node machine (NUMA_MOE_TOPOLOGY=\"$TWO\"; rows split"
    echo "between two halves of this machine's threads, memory not bound: the cost of the split, not a NUMA gain);"
    echo "stock-repack0: llama-bench --repack 0 (no extra buffer types); stock-nommap: llama-bench -lm none (weights"
    echo "read into anonymous memory, as numa-moe copies the experts into its own buffer). Invocations alternate"
    echo "(the first configuration rotates every round)."
    echo
    # qwen3_like PATH TYPE LAYERS: Qwen3-30B-A3B's expert shapes, written once
    qwen3_like() {
        [ -f "$1" ] || "$GEN" --out "$1" "${QWEN3_A3B_SHAPE[@]}" --layers "$3" --type "$2" > /dev/null 2>&1 ||
            { echo "bench: make-moe-model failed" >&2; exit 2; }
    }
    Q4K=$MODELS/qwen3moe-a3b-4l-q4_K.gguf
    qwen3_like "$Q4K" q4_K 4
    echo "### q4_K experts, 4 layers (CPU_REPACK takes q4_K: numa-moe holds them in its layout)"
    echo
    e2e_model q4_K "$Q4K" stock stock-aa numa-moe numa-moe-2n stock-repack0
    MXFP4=$MODELS/qwen3moe-a3b-4l-mxfp4.gguf
    qwen3_like "$MXFP4" mxfp4 4
    echo "### mxfp4 experts, 4 layers (CPU_REPACK takes mxfp4: numa-moe holds them in its layout)"
    echo
    e2e_model mxfp4 "$MXFP4" stock stock-aa numa-moe numa-moe-2n
    if [ "$QUICK" != 1 ]; then
        BF16=$MODELS/qwen3moe-a3b-2l-bf16.gguf
        qwen3_like "$BF16" bf16 2
        echo "### bf16 experts, 2 layers (CPU_REPACK does not take bf16: numa-moe computes the experts)"
        echo
        e2e_model bf16 "$BF16" stock numa-moe stock-nommap
    fi
fi

if [ "$QUICK" != 1 ]; then
    echo
    "$root/scripts/bench-memory.sh"
    echo
fi

echo "(make bench took $((SECONDS - start)) s; raw outputs in build/bench/)"
