#!/usr/bin/env bash
# Packs what the stock-vs-numa-moe benchmark needs into one folder that runs on another x86-64
# Linux machine without building anything there (a multi-socket server, say):
#
#   scripts/bench-bundle.sh DIR        # here, after make bench (and make llama-portable, see below)
#   DIR/run.sh [THREADS]               # there: prints the machine, op-level and llama-bench tables
#
# The folder holds the patched llama-bench, libnuma_moe.so, the numa-moe tool, the op benchmark,
# the model generator, the non-glibc system libraries they load, and llama.cpp's libraries as
# make bench runs them, built for this CPU (build/llama-native, in lib/native). Where the portable
# build (build/llama, x86-64-v3) is there too, its libraries go in lib/portable: run.sh takes the
# native ones on a machine with every instruction set extension this one has, else the portable
# ones, and says which (without them it stops on such a machine rather than die of SIGILL).
set -euo pipefail

source "$(dirname "$0")/lib.sh"
out=${1:?usage: $0 DIR}
case $out in /*) ;; *) out=$OLDPWD/$out ;; esac   # lib.sh changed into the repository
mkdir -p "$out/lib/native"
bins=("$NB/llama-bench" "$CLI" "$root/build/mmid_bench" "$NGEN")
for f in "${bins[@]}"; do
    [ -x "$f" ] || { echo "missing $f: run make bench first" >&2; exit 1; }
    cp "$f" "$out/"
done
strip --strip-debug -o "$out/lib/libnuma_moe.so" "$LIB"
# every library the binaries load (llama.cpp's, hwloc, udev, OpenMP, C++), except glibc's,
# which stays the target's; symlinks are copied as the files they name
nb=$(realpath "$NB")
ldd "${bins[@]}" "$LIB" | awk '/=> \// {print $1, $3}' | sort -u |
    grep -v -E "^(libc|libm|libdl|libpthread|librt|ld-linux[^ ]*)\.so" | while read -r name lib; do
    if [ "$(realpath "$(dirname "$lib")")" = "$nb" ]; then
        cp -L "$lib" "$out/lib/native/$name"
    else
        cp -L "$lib" "$out/lib/$name"
    fi
done
rm -rf "$out/lib/portable"
if [ -f "$B/libggml-cpu.so" ]; then
    mkdir -p "$out/lib/portable"
    for f in "$out"/lib/native/*; do
        cp -L "$B/$(basename "$f")" "$out/lib/portable/"
    done
else
    echo "bench-bundle: no portable build in $B (make llama-portable): the bundle runs only on CPUs with this one's extensions" >&2
fi
# the instruction set extensions of this CPU that -march=native may have used
grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | tr ' ' '\n' | grep -x -E \
    'sse[0-9_a-z]*|ssse3|pni|avx[0-9_a-z]*|amx[_a-z0-9]*|fma[0-9]?|f16c|bmi[12]|abm|lzcnt|movbe|popcnt|adx|aes|pclmulqdq|vaes|vpclmulqdq|gfni|sha_ni|rdrand|rdseed|xsave[a-z]*|clflushopt|clwb|clzero|cx16|fsgsbase|movdiri|movdir64b|serialize|waitpkg|cldemote|rdpid|xop|tbm|lwp|mwaitx|wbnoinvd|rtm|hle|pku|ospke|3dnowprefetch' |
    LC_ALL=C sort -u > "$out/native-isa.txt"

cat > "$out/run.sh" <<'EOF'
#!/usr/bin/env bash
# stock vs numa-moe on this machine: the machine, the op-level table, llama-bench end to end.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# llama.cpp's libraries built for the bundling machine's CPU, where this one has all its extensions
missing=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | tr ' ' '\n' | LC_ALL=C sort -u | LC_ALL=C comm -13 - "$here/native-isa.txt" | tr '\n' ' ')
build=native
if [ -n "$missing" ]; then
    if [ ! -d "$here/lib/portable" ]; then
        echo "this CPU lacks $missing which the bundled llama.cpp (built for the bundling machine's CPU) may use;" >&2
        echo "(make llama-portable where the bundle was made, then bundle again: it takes the portable build too)" >&2
        exit 1
    fi
    build=portable
fi
export LD_LIBRARY_PATH=$here/lib/$build:$here/lib
T=${1:-$(nproc)}
M=${TMPDIR:-/tmp}/numa-moe-bench
mkdir -p "$M"
echo "## Machine"
echo '```'
lscpu | grep -E "Model name|Socket|Core|Thread|NUMA|L3" || true
echo "threads used: $T"
echo "llama.cpp: the $build build${missing:+ (this CPU lacks $missing)}"
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
