#!/usr/bin/env bash
# Packs what the stock-vs-numa-moe benchmark needs into one folder that runs on another x86-64
# Linux machine without building anything there (a multi-socket server, say):
#
#   scripts/bench-bundle.sh DIR        # here, after make lib llama and the bench tools
#   DIR/run.sh [THREADS]               # there: prints the machine, op-level and llama-bench tables
#
# The folder holds the patched llama-bench and its libraries, libnuma_moe.so, the numa-moe tool,
# the op benchmark, the model generator and the non-glibc system libraries they load.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: $0 DIR}
mkdir -p "$out/lib"
B=$root/build/llama/bin
bins=("$B/llama-bench" "$root/target/release/numa-moe" "$root/build/mmid_bench" "$root/build/make-moe-model")
for f in "${bins[@]}"; do
    [ -x "$f" ] || { echo "missing $f: run make lib llama bench first" >&2; exit 1; }
    cp "$f" "$out/"
done
strip --strip-debug -o "$out/lib/libnuma_moe.so" "$root/target/release/libnuma_moe.so"
# every library the binaries load (llama.cpp's, hwloc, udev, OpenMP, C++), except glibc's,
# which stays the target's; symlinks are copied as the files they name
ldd "${bins[@]}" "$root/target/release/libnuma_moe.so" | awk '/=> \// {print $1, $3}' | sort -u |
    grep -v -E "^(libc|libm|libdl|libpthread|librt|ld-linux[^ ]*)\.so" | while read -r name lib; do
    cp -L "$lib" "$out/lib/$name"
done

cat > "$out/run.sh" <<'EOF'
#!/usr/bin/env bash
# stock vs numa-moe on this machine: the machine, the op-level table, llama-bench end to end.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=$here/lib
T=${1:-$(nproc)}
M=${TMPDIR:-/tmp}/numa-moe-bench
mkdir -p "$M"
echo "## Machine"
echo '```'
lscpu | grep -E "Model name|Socket|Core|Thread|NUMA|L3" || true
echo "threads used: $T"
"$here/numa-moe" topology
echo '```'
nodes=$(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | wc -l)
map=rows
echo
echo "## MUL_MAT_ID, op level ($T threads, map $map)"
"$here/mmid_bench" --threads "$T" --quick
echo
echo "## llama-bench ($T threads): stock vs LD_PRELOAD=libnuma_moe.so --numa-expert-map $map"
for spec in "q4_K ${BENCH_LAYERS_Q4K:-8}" "bf16 ${BENCH_LAYERS_BF16:-4}"; do
    set -- $spec
    model=$M/qwen3moe-a3b-${2}l-$1.gguf
    [ -f "$model" ] || "$here/make-moe-model" --out "$model" --experts 128 --used 8 --embd 2048 --ff 768 --layers "$2" \
        --vocab 1024 --heads 32 --head-kv 4 --head-dim 128 --type "$1" --threads "$T" > /dev/null 2>&1
    for round in 1 2; do
        "$here/llama-bench" -m "$model" -t "$T" -p 256 -n 64 -r 3 -o md 2>/dev/null | grep -E "^\| qwen" | sed "s/^/stock    /"
        LD_PRELOAD=$here/lib/libnuma_moe.so "$here/llama-bench" -m "$model" -t "$T" -p 256 -n 64 -r 3 -o md \
            --numa-expert-map "$map" 2>/dev/null | grep -E "^\| qwen" | sed "s/^/numa-moe /"
    done
done
echo "NUMA nodes: $nodes"
EOF
chmod +x "$out/run.sh"
du -sh "$out"
