#!/usr/bin/env bash
# mkinitramfs.sh OUT GUEST_SCRIPT [FILE_OR_DIR ...]
#
# Builds an initramfs for the NUMA test guests (see README.md):
#   - busybox with all applet links (so the guest has sh, taskset, awk, ...),
#   - every FILE_OR_DIR at its same absolute path, plus every shared library
#     that ldd says an ELF among them needs (dynamic loader included),
#   - GUEST_SCRIPT as /test.sh,
#   - an /init that runs /test.sh with its output on the second serial port
#     (/dev/ttyS1), ends that output with "GUEST-EXIT <status>" and powers off.
#
# OUT ending in .gz is compressed with gzip -1 (pigz when available); any other
# name is written as a plain cpio, which is faster for big, incompressible
# payloads such as model weights (QEMU loads it; the guest need not gunzip it
# under emulation). Either way the unpacked contents live in guest RAM; see
# README.md for how much memory a guest needs.
#
# Env:
#   NUMA_VM_BUSYBOX  busybox binary to use (default: the one on PATH, which
#                    should come from busybox-static)
set -euo pipefail

die() { echo "mkinitramfs.sh: $*" >&2; exit 1; }

[ $# -ge 2 ] || die "usage: mkinitramfs.sh OUT.cpio[.gz] GUEST_SCRIPT [FILE_OR_DIR ...]"
out=$1 guest_script=$2
shift 2
[ -r "$guest_script" ] || die "guest script $guest_script not readable"

busybox=${NUMA_VM_BUSYBOX:-$(command -v busybox || true)}
[ -n "$busybox" ] && [ -x "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"

tmp_out=""
stage=$(mktemp -d "${TMPDIR:-/tmp}/numa-vm-initramfs.XXXXXX")
trap 'rm -rf "$stage" ${tmp_out:+"$tmp_out"}' EXIT

# Mirror the host's merged-/usr symlinks (/bin -> usr/bin, /lib64 -> usr/lib64
# on Debian 12), so that any path ldd prints resolves inside the guest exactly
# as it does on the host, whichever spelling (/lib or /usr/lib) it uses.
for d in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$d" ]; then
        # Made relative (and its target created) so that, while staging,
        # writes through it stay inside $stage instead of reaching the host.
        target=$(readlink "/$d")
        target=${target#/}
        mkdir -p "$stage/$target"
        ln -s "$target" "$stage/$d"
    elif [ -d "/$d" ]; then
        mkdir -p "$stage/$d"
    fi
done
mkdir -p "$stage"/{usr/bin,usr/sbin,usr/lib,proc,sys,dev,tmp,run,root,etc/numa-vm,bin,sbin}

declare -A copied=()   # guest paths already placed, so shared deps are copied once
declare -A libdirs=()  # directories that hold copied shared libraries

# put SRC DEST: copy SRC's content (symlinks followed) to absolute guest path DEST.
put() {
    local src=$1 dest=$2
    [ -z "${copied[$dest]:-}" ] || return 0
    mkdir -p "$stage$(dirname "$dest")"
    # rm first: DEST may be a busybox applet symlink, and cp would otherwise
    # write through it into /bin/busybox.
    rm -f "$stage$dest"
    cp -L --preserve=mode,timestamps "$src" "$stage$dest"
    copied[$dest]=1
}

is_elf() {
    local magic=""
    [ -f "$1" ] && [ -r "$1" ] || return 1
    LC_ALL=C IFS= read -r -d '' -N 4 magic <"$1" 2>/dev/null || true
    [ "$magic" = $'\x7fELF' ]
}

# add_deps FILE: copy every shared library ldd resolves for FILE. ldd already
# lists the whole transitive closure, so no recursion is needed.
add_deps() {
    local f=$1 out line lib
    is_elf "$f" || return 0
    if ! out=$(LC_ALL=C ldd "$f" 2>&1); then
        # Static binaries, and ELF files for another architecture, have nothing
        # the guest loader would need.
        case $out in *"not a dynamic executable"*) return 0 ;; esac
        die "ldd $f failed: $out"
    fi
    case $out in *"statically linked"*) return 0 ;; esac
    while IFS= read -r line; do
        case $line in
            *"=> not found"*)
                lib=${line%% =>*}
                die "$f needs ${lib#"${lib%%[![:space:]]*}"}, which ldd cannot find (set LD_LIBRARY_PATH?)" ;;
        esac
        # Lines look like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)"
        # or "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no path at all.
        for lib in $line; do
            case $lib in
                /*) put "$lib" "$lib"; libdirs[$(dirname "$lib")]=1 ;;
            esac
        done
    done <<<"$out"
}

# Busybox and its applet links first, so that files given on the command line
# (e.g. util-linux's taskset) replace the applets of the same name.
put "$busybox" /bin/busybox
add_deps "$busybox"
while IFS= read -r applet; do
    case $applet in */*) ;; *) continue ;; esac   # skip linuxrc: /init is ours
    [ -e "$stage/$applet" ] || [ -L "$stage/$applet" ] || {
        mkdir -p "$stage/$(dirname "$applet")"
        ln -s /bin/busybox "$stage/$applet"
    }
done < <("$busybox" --list-full)

for arg in "$@"; do
    [ -e "$arg" ] || die "$arg does not exist"
    abs=$(realpath -s "$arg")   # -s: keep the path the caller will use in the guest
    if [ -d "$arg" ]; then
        mkdir -p "$stage$abs"
        cp -a "$arg/." "$stage$abs/"
        while IFS= read -r -d '' f; do
            add_deps "$f"
        done < <(find "$arg/" -type f -print0)
    else
        put "$arg" "$abs"
        add_deps "$arg"
        # Libraries passed explicitly (e.g. dlopen()ed backends) must be findable
        # by the guest loader too.
        case $(basename "$abs") in lib*.so*) libdirs[$(dirname "$abs")]=1 ;; esac
    fi
done

# The guest has no /etc/ld.so.cache unless we make one; without it, libraries
# the host finds through ld.so.conf (e.g. /usr/local/lib) or LD_LIBRARY_PATH
# would not be found. ldconfig -r builds a cache for just the copied dirs.
if ((${#libdirs[@]})); then
    printf '%s\n' "${!libdirs[@]}" | sort >"$stage/etc/ld.so.conf"
    ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
    if [ -x "$ldconfig" ]; then
        # -X: do not create or change any symlinks in the staged tree.
        "$ldconfig" -X -r "$stage" 2>/dev/null ||
            echo "mkinitramfs.sh: warning: ldconfig -r failed; guest relies on default library dirs" >&2
    fi
fi

install -m 0755 "$guest_script" "$stage/test.sh"

cat >"$stage/init" <<'INIT'
#!/bin/sh
# Generated by tests/numa-vm/mkinitramfs.sh. Runs /test.sh once and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
# A fresh tmpfs on /tmp, unless files were packed under /tmp (mounting over
# them would hide them; the rootfs is writable tmpfs anyway).
[ -n "$(ls -A /tmp)" ] || mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm

# run-guest.sh passes NUMA_VM_* as kernel parameters; the kernel hands unknown
# name=value parameters to init as environment. Turn the compact expectation
# into /expect.txt ("id cpulist mem_mib d0 d1 ..."; see README.md).
export NUMA_VM_SCENARIO=${NUMA_VM_SCENARIO:-none}
: >/expect.txt
if [ -n "${NUMA_VM_EXPECT:-}" ]; then
    echo "$NUMA_VM_EXPECT" | tr ';' '\n' | while IFS=: read -r id cpus mem dist; do
        [ -n "$id" ] && echo "$id $cpus $mem $(echo "$dist" | tr ',' ' ')"
    done >/expect.txt
fi
# Extra guest env from NUMA_VM_GUEST_ENV on the host, base64-encoded so that
# spaces and quotes survive the kernel command line.
if [ -n "${NUMA_VM_ENV_B64:-}" ]; then
    echo "$NUMA_VM_ENV_B64" | base64 -d >/etc/numa-vm/env 2>/dev/null && . /etc/numa-vm/env
fi

if ! exec 3<>/dev/ttyS1; then
    echo "init: cannot open /dev/ttyS1; powering off" >/dev/console
    poweroff -f
fi
# Raw mode: no \n -> \r\n translation, so the host gets the bytes as written.
stty -F /dev/ttyS1 raw -echo 2>/dev/null

cd /
/test.sh </dev/null >&3 2>&3
echo "GUEST-EXIT $?" >&3
# Closing the port waits until its transmit buffer has drained, so nothing is
# lost by the immediate poweroff below.
exec 3>&-
sync
poweroff -f
INIT
chmod 0755 "$stage/init"

# /dev/console must exist before /dev is mounted: the kernel opens it for
# init's stdin/stdout. A device node needs root to mknod, so write its newc
# header by hand instead and prepend it as a separate small archive (the
# kernel unpacks concatenated archives in order).
newc() { # newc NAME MODE RDEVMAJOR RDEVMINOR  (zero-length entry)
    local name=$1 mode=$2 maj=$3 min=$4 namesize hdr pad
    namesize=$((${#name} + 1))
    hdr=$(printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 "$mode" 0 0 1 0 0 0 0 "$maj" "$min" "$namesize" 0)
    printf '%s%s\0' "$hdr" "$name"
    pad=$(( (4 - (110 + namesize) % 4) % 4 ))
    head -c "$pad" /dev/zero
}
write_archive() {
    newc dev $((0040755)) 0 0
    newc dev/console $((0020600)) 5 1
    newc 'TRAILER!!!' 0 0 0
    # Sorted and owner-normalised so identical inputs give identical archives.
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc --owner=0:0 --reproducible)
}

mkdir -p "$(dirname "$out")"
tmp_out="$out.tmp.$$"
case $out in
    *.gz)
        if command -v pigz >/dev/null; then write_archive | pigz -1 >"$tmp_out"
        else write_archive | gzip -1 >"$tmp_out"; fi ;;
    *) write_archive >"$tmp_out" ;;
esac
mv "$tmp_out" "$out"

size_kib=$(du -sk --apparent-size "$stage" | cut -f1)
echo "mkinitramfs.sh: wrote $out ($(( $(stat -c %s "$out") / 1024 )) KiB, $size_kib KiB unpacked)" >&2
