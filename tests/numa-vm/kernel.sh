#!/usr/bin/env bash
# Prints the path of a cached Debian cloud kernel (vmlinuz) for the NUMA guests,
# fetching it first if needed.
#
# Why the cloud flavour: it has CONFIG_NUMA=y and the 8250 serial console built
# in (no modules needed), so an initramfs without /lib/modules boots fine.
# The package is only downloaded and unpacked, never installed on the host.
#
# Env:
#   NUMA_MOE_CACHE   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/numa-moe)
#   NUMA_VM_KERNEL   use this vmlinuz instead (skips all of the below)
#   NUMA_VM_KERNEL_REFRESH=1  re-resolve the ABI even if a kernel is cached
set -euo pipefail

if [ -n "${NUMA_VM_KERNEL:-}" ]; then
    [ -r "$NUMA_VM_KERNEL" ] || { echo "kernel.sh: NUMA_VM_KERNEL=$NUMA_VM_KERNEL not readable" >&2; exit 1; }
    echo "$NUMA_VM_KERNEL"
    exit 0
fi

CACHE=${NUMA_MOE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/numa-moe}/vm
mkdir -p "$CACHE"
log() { echo "kernel.sh: $*" >&2; }

# A stable name that always points at the last kernel fetched, so reruns (and CI
# with a restored cache) need neither apt lists nor network.
if [ -z "${NUMA_VM_KERNEL_REFRESH:-}" ] && [ -r "$CACHE/vmlinuz" ]; then
    readlink -f "$CACHE/vmlinuz"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# The metapackage's dependency names the current ABI (linux-image-6.1.0-NN-cloud-amd64);
# it moves with point releases, so it is resolved every time rather than pinned.
resolve_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1
}
pkg=$(resolve_pkg || true)
if [ -z "$pkg" ]; then
    # Fresh CI images often ship without package lists.
    log "no apt package lists know linux-image-cloud-amd64; running apt-get update once"
    $SUDO apt-get update -q >&2
    pkg=$(resolve_pkg || true)
fi
[ -n "$pkg" ] || { log "cannot resolve linux-image-cloud-amd64 to a kernel package"; exit 1; }

dest="$CACHE/$pkg.vmlinuz"
if [ ! -r "$dest" ]; then
    # Downloaded outside the cache: as root, apt-get download drops to the _apt
    # user, which cannot enter a 0700 $HOME or write a root-owned directory
    # (it would warn and go unsandboxed).
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
    log "downloading $pkg"
    if ! (cd "$tmp" && apt-get download "$pkg" >&2); then
        log "download failed; refreshing package lists and retrying"
        $SUDO apt-get update -q >&2
        (cd "$tmp" && apt-get download "$pkg" >&2)
    fi
    debs=("$tmp"/*.deb)
    deb=${debs[0]}
    [ -f "$deb" ] || { log "apt-get download produced no .deb"; exit 1; }
    # Only boot/vmlinuz-* is needed; extracting the whole package (modules) would
    # cost ~100 MB of disk for nothing.
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
    images=("$tmp"/boot/vmlinuz-*)
    vmlinuz=${images[0]}
    [ -s "$vmlinuz" ] || { log "no vmlinuz in $deb"; exit 1; }
    # Copy then rename, so an interrupted run (or a concurrent job sharing the
    # cache) never sees a truncated kernel under the final name.
    cp "$vmlinuz" "$dest.part.$$"
    mv "$dest.part.$$" "$dest"
fi
ln -sfn "$(basename "$dest")" "$CACHE/vmlinuz"
echo "$dest"
