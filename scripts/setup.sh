#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test numa-moe.
# Idempotent: packages already present are skipped without touching apt.
set -euo pipefail

pkgs=(cmake pkg-config make gcc g++ libclang-dev libhwloc-dev libudev-dev ccache
      patch python3-pip time
      qemu-system-x86 busybox-static cpio valgrind
      mesa-vulkan-drivers glslc libvulkan-dev spirv-headers vulkan-tools)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# python3-pip is only needed when no pip is on PATH (the base image brings its own).
if command -v pip3 >/dev/null 2>&1 || command -v pip >/dev/null 2>&1; then
    missing=("${missing[@]/python3-pip}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))

if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: no Rust toolchain found; install one with rustup (https://rustup.rs)" >&2
    exit 1
fi
