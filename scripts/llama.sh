#!/usr/bin/env bash
# Fetches the pinned llama.cpp, applies patches/*.patch, and builds the targets numa-moe uses.
#
#   scripts/llama.sh source   extract (or copy LLAMA_CPP_DIR) and patch into third_party/llama.cpp
#   scripts/llama.sh build    configure and build into build/llama (runs `source` first if needed)
#   scripts/llama.sh linked   llama-completion built with GGML_NUMA_MOE_LINK (libnuma_moe.so linked
#                             into ggml-cpu instead of found at run time) into build/llama-linked
#
# The tree is rebuilt only when the pin, the patches or the source directory change: a stamp
# holding their hash sits beside the patched tree. Upstream files never leave these ignored folders.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

PIN_VERSION=0.3.36
PIN_COMMIT=0c1e57098
PIN_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SDIST=llama_cpp_python-$PIN_VERSION.tar.gz
CACHE=${NUMA_MOE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/numa-moe}
SRC=$root/third_party/llama.cpp
BUILD=$root/build/llama
JOBS=${JOBS:-$(nproc)}

TARGETS=(llama-cli llama-completion llama-bench llama-perplexity llama-quantize llama-server
         test-backend-ops test-llama-archs)

log() { echo "llama.sh: $*" >&2; }

stamp_of_inputs() {
    {
        echo "pin $PIN_COMMIT $PIN_SHA256"
        echo "dir ${LLAMA_CPP_DIR:-}"
        for p in patches/*.patch; do [ -e "$p" ] && cat "$p"; done; true
    } | sha256sum | cut -d' ' -f1
}

fetch_sdist() {
    mkdir -p "$CACHE"
    if [ -f "$CACHE/$SDIST" ] && echo "$PIN_SHA256  $CACHE/$SDIST" | sha256sum -c --status; then
        return
    fi
    log "downloading llama-cpp-python $PIN_VERSION (vendored llama.cpp $PIN_COMMIT) from PyPI"
    local tmp
    tmp=$(mktemp -d)
    local pip=pip3
    command -v pip3 >/dev/null || pip=pip
    $pip download -q --no-deps --no-binary llama-cpp-python -d "$tmp" "llama-cpp-python==$PIN_VERSION"
    if ! echo "$PIN_SHA256  $tmp/$SDIST" | sha256sum -c --status; then
        log "ERROR: $SDIST does not match the pinned sha256 $PIN_SHA256"
        log "       got $(sha256sum "$tmp/$SDIST" | cut -d' ' -f1); refusing to build from a changed artifact"
        exit 1
    fi
    mv "$tmp/$SDIST" "$CACHE/$SDIST"
    rm -rf "$tmp"
}

cmd_source() {
    local want
    want=$(stamp_of_inputs)
    if [ -f "$SRC/.numa-moe-stamp" ] && [ "$(cat "$SRC/.numa-moe-stamp")" = "$want" ]; then
        return
    fi
    rm -rf "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    if [ -n "${LLAMA_CPP_DIR:-}" ]; then
        [ -f "$LLAMA_CPP_DIR/ggml/include/ggml.h" ] || { log "ERROR: LLAMA_CPP_DIR=$LLAMA_CPP_DIR is not a llama.cpp checkout"; exit 1; }
        log "copying $LLAMA_CPP_DIR (your checkout is not modified)"
        tar -C "$LLAMA_CPP_DIR" --exclude=./.git --exclude=./build --exclude='./build-*' -cf - . | tar -C "$SRC.tmp" -xf -
    else
        fetch_sdist
        log "extracting vendor/llama.cpp"
        tar -xzf "$CACHE/$SDIST" -C "$SRC.tmp" --strip-components=3 "llama_cpp_python-$PIN_VERSION/vendor/llama.cpp"
        rm -f "$SRC.tmp/.git"   # a submodule pointer into the sdist author's repository
    fi
    for p in patches/*.patch; do
        [ -e "$p" ] || continue
        if ! patch -d "$SRC.tmp" -p1 --forward --batch --silent --dry-run < "$p" >/dev/null; then
            log "ERROR: patch $p does not apply to this llama.cpp tree:"
            patch -d "$SRC.tmp" -p1 --forward --batch --dry-run < "$p" >&2 || true
            exit 1
        fi
        patch -d "$SRC.tmp" -p1 --forward --batch --silent < "$p"
        log "applied $(basename "$p")"
    done
    echo "$want" > "$SRC.tmp/.numa-moe-stamp"
    rm -rf "$SRC"
    mv "$SRC.tmp" "$SRC"
}

cpu_flags=()
case "$(uname -m)" in
    # x86-64-v3 (AVX2, FMA, F16C, BMI2) rather than -march=native, so that one build runs here,
    # in the QEMU NUMA guests (TCG emulates AVX2 but not AVX-512) and on other hosts
    x86_64) cpu_flags=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON) ;;
esac
export CCACHE_BASEDIR=$root CCACHE_NOHASHDIR=1 CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-include_file_mtime,include_file_ctime,time_macros}
common_flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_EXAMPLES=OFF
              -DGGML_CCACHE=ON -DGGML_NUMA_MOE=ON -DGGML_NUMA_MOE_DIR="$root")

cmd_linked() {
    cmd_source
    local lib=$root/target/release/libnuma_moe.so
    [ -f "$lib" ] || { log "ERROR: $lib is missing: run make lib first"; exit 1; }
    local dir=$root/build/llama-linked
    cmake -S "$SRC" -B "$dir" "${common_flags[@]}" -DLLAMA_BUILD_TESTS=OFF "${cpu_flags[@]}" -DGGML_NUMA_MOE_LINK="$lib" >/dev/null
    if ! cmake --build "$dir" -j "$JOBS" --target llama-completion > "$dir/build.log" 2>&1; then
        grep -E "error|Error" "$dir/build.log" | head -40 >&2
        log "ERROR: building llama.cpp with GGML_NUMA_MOE_LINK failed (full log: $dir/build.log)"
        exit 1
    fi
}

cmd_build() {
    cmd_source
    if [ ! -f "$BUILD/CMakeCache.txt" ] || [ "$SRC/.numa-moe-stamp" -nt "$BUILD/CMakeCache.txt" ]; then
        cmake -S "$SRC" -B "$BUILD" "${common_flags[@]}" -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON "${cpu_flags[@]}" >/dev/null
    fi
    local log=$BUILD/build.log
    if ! cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}" > "$log" 2>&1; then
        grep -E "error|Error" "$log" | head -40 >&2
        log "ERROR: building llama.cpp failed (full log: $log)"
        exit 1
    fi
    for t in "${TARGETS[@]}"; do
        [ -x "$BUILD/bin/$t" ] || { log "ERROR: target $t was not built"; exit 1; }
    done
    log "built ${TARGETS[*]} in $BUILD/bin"
}

case "${1:-build}" in
    source) cmd_source ;;
    build)  cmd_build ;;
    linked) cmd_linked ;;
    *) echo "usage: $0 source|build|linked" >&2; exit 2 ;;
esac
