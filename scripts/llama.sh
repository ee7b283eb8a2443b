#!/usr/bin/env bash
# Fetches the pinned llama.cpp, applies patches/*.patch, and builds the targets numa-moe uses.
#
#   scripts/llama.sh source   extract (or copy LLAMA_CPP_DIR) and patch into third_party/llama.cpp
#   scripts/llama.sh build    the portable build (x86-64-v3: AVX2, no AVX-512) into build/llama: every
#                             target the tests use; it also runs in the QEMU NUMA guests
#   scripts/llama.sh native [TARGET...]
#                             the build for this CPU (GGML_NATIVE=ON: -march=native) into
#                             build/llama-native: what a user runs, and what make demo and make bench
#                             run (default: the user's tools; `ggml` for ggml's libraries alone)
#   scripts/llama.sh linked   llama-completion built with GGML_NUMA_MOE_LINK (libnuma_moe.so linked
#                             into ggml-cpu instead of found at run time) into build/llama-linked
#   scripts/llama.sh vulkan   the portable build with ggml's Vulkan backend into build/llama-vulkan:
#                             libllama and llama-completion, for the hybrid CPU+GPU tests on Mesa's
#                             lavapipe (tests/e2e/hybrid.sh)
#
# Every build runs `source` first, which does nothing unless the pin, the patches or the source
# directory changed (a stamp holding their hash sits beside the patched tree); a build tree is
# configured again when the patched tree is newer than its cache. The trees share one patched
# source tree and ccache. Upstream files never leave these ignored folders.
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
NATIVE=$root/build/llama-native
VULKAN=$root/build/llama-vulkan
JOBS=${JOBS:-$(nproc)}

# the portable build: everything the tests run
TARGETS=(llama-cli llama-completion llama-bench llama-perplexity llama-quantize llama-server
         test-backend-ops test-llama-archs)
# the native build, unless told fewer: the tools a user runs
NATIVE_TARGETS=(llama-cli llama-completion llama-bench llama-perplexity llama-quantize llama-server)
# the Vulkan build: what the hybrid tests run (build/vulkan/greedy links libllama)
VULKAN_TARGETS=(llama llama-completion)

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

# build_tree DIR WHAT TARGET...: configures DIR with common_flags and tree_flags when it has no cache
# or the patched tree is newer than its cache, then builds TARGETs (a tool, or a library such as
# ggml) into DIR/bin
build_tree() {
    local dir=$1 what=$2
    shift 2
    if [ ! -f "$dir/CMakeCache.txt" ] || [ "$SRC/.numa-moe-stamp" -nt "$dir/CMakeCache.txt" ]; then
        cmake -S "$SRC" -B "$dir" "${common_flags[@]}" "${tree_flags[@]}" >/dev/null
    fi
    local log=$dir/build.log
    if ! cmake --build "$dir" -j "$JOBS" --target "$@" > "$log" 2>&1; then
        grep -E "error|Error" "$log" | head -40 >&2
        log "ERROR: building llama.cpp ($what) failed (full log: $log)"
        exit 1
    fi
    for t in "$@"; do
        [ -x "$dir/bin/$t" ] || [ -f "$dir/bin/lib$t.so" ] || { log "ERROR: target $t was not built"; exit 1; }
    done
    log "built $* ($what) in $dir/bin"
}

cmd_build() {
    cmd_source
    tree_flags=(-DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON "${cpu_flags[@]}")
    build_tree "$BUILD" portable "${TARGETS[@]}"
}

# what -march=native (-mcpu=native elsewhere) means to the compiler on this CPU: its expansion into
# explicit flags
native_cpu() {
    local cc=${CC:-cc}
    { "$cc" -march=native -### -E - < /dev/null 2>&1 || "$cc" -mcpu=native -### -E - < /dev/null 2>&1; } | grep cc1
}

cmd_native() {
    cmd_source
    local targets=("$@")
    ((${#targets[@]})) || targets=("${NATIVE_TARGETS[@]}")
    # A tree built for another CPU (a shared home, a copied checkout) could stop with SIGILL here:
    # it is built again. ccache hashes -march=native as text, so every compilation with it also
    # hashes this expansion (scripts/ccache-native.sh); the others are shared with the portable tree.
    local cpu
    cpu=$(native_cpu) || { log "ERROR: cannot ask ${CC:-cc} what -march=native means on this CPU"; exit 1; }
    if [ -f "$NATIVE/native-cpu.txt" ] && [ "$(cat "$NATIVE/native-cpu.txt")" != "$cpu" ]; then
        log "$NATIVE was built for another CPU: building it again for this one"
        rm -rf "$NATIVE"
    fi
    mkdir -p "$NATIVE"
    [ -f "$NATIVE/native-cpu.txt" ] || echo "$cpu" > "$NATIVE/native-cpu.txt"
    tree_flags=(-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON)
    if command -v ccache > /dev/null; then
        local launcher="$root/scripts/ccache-native.sh;$NATIVE/native-cpu.txt"
        tree_flags+=(-DCMAKE_C_COMPILER_LAUNCHER="$launcher" -DCMAKE_CXX_COMPILER_LAUNCHER="$launcher")
    fi
    build_tree "$NATIVE" native "${targets[@]}"
}

# Vulkan headers for the pinned ggml-vulkan, which needs VK_EXT_layer_settings (Debian 12's
# libvulkan-dev 1.3.239 predates it): Debian 13's libvulkan-dev, fetched with apt-get download through
# a private sources list (nothing installed, nothing upgraded) and unpacked into the cache, where
# every clone finds it. Prints the include directory.
vulkan_headers() {
    local dir=$CACHE/vulkan-headers
    local core=$dir/usr/include/vulkan/vulkan_core.h
    if ! grep -qs VK_EXT_layer_settings "$core"; then
        log "fetching Debian 13's libvulkan-dev (headers only) into $dir"
        local apt=$CACHE/apt-trixie
        rm -rf "$apt" "$dir.tmp"
        mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/deb" "$dir.tmp"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" > "$apt/sources.list"
        local opts=(-q -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
                    -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o Debug::NoLocking=1
                    -o APT::Sandbox::User="$(id -un)")
        if ! apt-get "${opts[@]}" update > "$apt/log" 2>&1 ||
            ! (cd "$apt/deb" && apt-get "${opts[@]}" download libvulkan-dev/trixie >> "$apt/log" 2>&1); then
            tail -5 "$apt/log" >&2
            log "ERROR: cannot fetch libvulkan-dev from Debian 13 (trixie) (full log: $apt/log)"
            exit 1
        fi
        dpkg-deb -x "$apt"/deb/libvulkan-dev_*.deb "$dir.tmp"
        grep -qs VK_EXT_layer_settings "$dir.tmp/usr/include/vulkan/vulkan_core.h" ||
            { log "ERROR: $(basename "$apt"/deb/*.deb) has no VK_EXT_layer_settings"; exit 1; }
        log "unpacked $(basename "$apt"/deb/*.deb)"
        rm -rf "$dir" "$apt"
        mv "$dir.tmp" "$dir"
    fi
    echo "$dir/usr/include"
}

cmd_vulkan() {
    cmd_source
    local need
    for need in glslc dpkg-deb apt-get; do
        command -v "$need" > /dev/null || { log "ERROR: $need is missing (scripts/setup.sh installs it)"; exit 1; }
    done
    local inc
    inc=$(vulkan_headers)
    # the portable tree's flags, so that everything but ggml-vulkan comes from ccache
    tree_flags=(-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON "${cpu_flags[@]}" -DGGML_VULKAN=ON -DVulkan_INCLUDE_DIR="$inc")
    build_tree "$VULKAN" vulkan "${VULKAN_TARGETS[@]}"
}

case "${1:-build}" in
    source) cmd_source ;;
    build)  cmd_build ;;
    native) shift; cmd_native "$@" ;;
    linked) cmd_linked ;;
    vulkan) cmd_vulkan ;;
    *) echo "usage: $0 source|build|native [TARGET...]|linked|vulkan" >&2; exit 2 ;;
esac
