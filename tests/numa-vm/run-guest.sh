#!/usr/bin/env bash
# run-guest.sh SCENARIO INITRD RESULT_FILE [TIMEOUT_S]
# run-guest.sh --expect SCENARIO      print the scenario's expect.txt and exit
# run-guest.sh --print-cmd SCENARIO INITRD RESULT_FILE   print the QEMU command line
# run-guest.sh --list                 list scenario names
#
# Boots an emulated multi-node NUMA machine (QEMU, TCG: no KVM needed) with the
# cached Debian cloud kernel and INITRD (from mkinitramfs.sh), and copies what
# the guest's /test.sh wrote to the second serial port into RESULT_FILE. The
# kernel console goes to RESULT_FILE.console.log.
#
# Exit status: 0 when the guest reported "GUEST-EXIT 0"; 1 when it reported
# another status; 3 when it reported nothing (crash, panic, broken init);
# 124 when it did not power off within TIMEOUT_S (default 300); 2 usage.
#
# Scenarios (memory per node overridable, see README.md):
#   two-node   2 nodes x 1 CPU, 512 MiB each, distance 10/20
#   four-node  4 nodes x 2 CPUs, 512 MiB each, distance 10 local, 16 for 0-1
#              and 2-3, 32 otherwise
#   uneven     node 0: 2 CPUs 512 MiB; node 1: 1 CPU 128 MiB
#   memless    nodes 0, 1: 1 CPU, 512 MiB each; node 2: 1 CPU, no memory
#   taskset    four-node's hardware; only NUMA_VM_SCENARIO differs, so guest
#              scripts can run programs under taskset -c
#
# Env:
#   NUMA_VM_MEM_<SCENARIO>  comma list of MiB per node, e.g.
#                           NUMA_VM_MEM_TWO_NODE=1024,1024 (0 = memory-less)
#   NUMA_VM_CPU             QEMU -cpu model (default: max, see README.md)
#   NUMA_VM_GUEST_ENV       newline- or space-separated NAME=VALUE pairs
#                           exported to /test.sh (values without spaces when
#                           space-separated)
#   NUMA_VM_APPEND          extra kernel command line
#   NUMA_VM_QEMU_ARGS       extra QEMU arguments (word-split)
#   NUMA_VM_KERNEL          vmlinuz to boot instead of kernel.sh's
#   NUMA_VM_ROOTFS=ramfs    unpack the initramfs into ramfs instead of tmpfs:
#                           no 50%-of-RAM cap, but its file pages cannot be
#                           migrated (move_pages reports them not moved)
#   NUMA_VM_NO_MEMCHECK=1   boot even if the initramfs looks too big for RAM
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=run-guest.sh
die() { echo "$prog: $*" >&2; exit 2; }

SCENARIOS="two-node four-node uneven memless taskset"

# scenario NAME: fills node_cpus[] (QEMU cpu index ranges, "" = no CPUs),
# node_mem[] (MiB, 0 = memory-less) and the distance function for NAME.
scenario() {
    local name=$1 var override
    case $name in
        two-node)
            node_cpus=(0 1); node_mem=(512 512); dist_kind=flat ;;
        four-node|taskset)
            node_cpus=(0-1 2-3 4-5 6-7); node_mem=(512 512 512 512); dist_kind=pairs ;;
        uneven)
            # Node 0 was planned at 384 MiB; 512 leaves room for a ~150 MB
            # initramfs (see README.md). Node 1 stays small on purpose.
            node_cpus=(0-1 2); node_mem=(512 128); dist_kind=flat ;;
        memless)
            node_cpus=(0 1 2); node_mem=(512 512 0); dist_kind=flat ;;
        *) die "unknown scenario '$name' (known: $SCENARIOS)" ;;
    esac
    var=NUMA_VM_MEM_$(echo "$name" | tr 'a-z-' 'A-Z_')
    override=${!var:-}
    if [ -n "$override" ]; then
        IFS=, read -r -a node_mem <<<"$override"
        [ ${#node_mem[@]} -eq ${#node_cpus[@]} ] ||
            die "$var=$override: need ${#node_cpus[@]} comma-separated sizes"
        local m
        for m in "${node_mem[@]}"; do
            [[ $m =~ ^[0-9]+$ ]] || die "$var=$override: sizes are whole MiB"
        done
    fi
}

# SLIT-like distances. "pairs" models two sockets of two nodes each
# (sub-NUMA clustering): 0-1 and 2-3 are neighbours.
dist() {
    local i=$1 j=$2
    if [ "$i" -eq "$j" ]; then echo 10; return; fi
    case $dist_kind in
        flat) echo 20 ;;
        pairs) if [ $((i / 2)) -eq $((j / 2)) ]; then echo 16; else echo 32; fi ;;
    esac
}

cpu_count() { # cpu_count "0-1" -> 2 ; "" -> 0
    local r=$1
    [ -n "$r" ] || { echo 0; return; }
    case $r in *-*) echo $(( ${r#*-} - ${r%-*} + 1 )) ;; *) echo 1 ;; esac
}

# NUMA_VM_EXPECT: "id:cpulist:mem_mib:d0,d1,...;..." (one kernel parameter;
# the guest's /init expands it into /expect.txt).
expect_compact() {
    local n=${#node_cpus[@]} i j row out=""
    for ((i = 0; i < n; i++)); do
        row=""
        for ((j = 0; j < n; j++)); do row+="${row:+,}$(dist "$i" "$j")"; done
        out+="${out:+;}$i:${node_cpus[$i]:--}:${node_mem[$i]}:$row"
    done
    echo "$out"
}

expect_txt() {
    expect_compact | tr ';' '\n' | while IFS=: read -r id cpus mem d; do
        echo "$id $cpus $mem ${d//,/ }"
    done
}

case ${1:-} in
    --list) echo "$SCENARIOS" | tr ' ' '\n'; exit 0 ;;
    --expect) [ $# -eq 2 ] || die "usage: $prog --expect SCENARIO"
              scenario "$2"; expect_txt; exit 0 ;;
    --print-cmd) print_cmd=1; shift ;;
    *) print_cmd="" ;;
esac

[ $# -ge 3 ] && [ $# -le 4 ] || die "usage: $prog SCENARIO INITRD RESULT_FILE [TIMEOUT_S]"
name=$1 initrd=$2 result=$3 timeout_s=${4:-300}
[[ $timeout_s =~ ^[0-9]+$ ]] && [ "$timeout_s" -gt 0 ] || die "TIMEOUT_S must be a positive integer"
[ -r "$initrd" ] || die "initrd $initrd not readable"
scenario "$name"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"

kernel=$("$here/kernel.sh")

# --- memory sizing -----------------------------------------------------------
# The packed image sits in guest RAM until it is unpacked; the rootfs it is
# unpacked into is a tmpfs whose size cap is half of the RAM the kernel
# manages at that moment, i.e. without the kernel's own reserve R and without
# the still-packed image. So tmpfs needs RAM >= 2*unpacked + packed + R;
# ramfs (no cap) needs RAM >= unpacked + packed + R. R was measured at
# 43/51/69 MiB for 512/1024/2048 MiB guests; 40 + RAM/50 covers that.
# Refuse up front rather than let the guest die with a confusing unpack error.
total_mib=0
for m in "${node_mem[@]}"; do total_mib=$((total_mib + m)); done
[ "$total_mib" -gt 0 ] || die "scenario $name has no memory"
packed=$(stat -L -c %s "$initrd")
if [ "$(head -c2 "$initrd" | od -An -tx1 | tr -d ' ')" = 1f8b ]; then
    # gzip's trailer holds the unpacked size mod 4 GiB: fine for initramfs sizes.
    unpacked=$(tail -c4 "$initrd" | od -An -tu4 -N4 --endian=little | tr -d ' ')
else
    unpacked=$packed
fi
unpacked_mib=$(( (unpacked + 1048575) / 1048576 ))
packed_mib=$(( (packed + 1048575) / 1048576 ))
reserve_mib=$(( 40 + total_mib / 50 ))
case ${NUMA_VM_ROOTFS:-tmpfs} in
    tmpfs) need_mib=$(( 2 * unpacked_mib + packed_mib + reserve_mib )) ;;
    ramfs) need_mib=$(( unpacked_mib + packed_mib + reserve_mib )) ;;
    *) die "NUMA_VM_ROOTFS must be tmpfs or ramfs" ;;
esac
if [ "$total_mib" -lt "$need_mib" ] && [ -z "${NUMA_VM_NO_MEMCHECK:-}" ]; then
    die "scenario $name has ${total_mib} MiB of guest RAM but the initramfs ($unpacked_mib MiB unpacked) needs about $need_mib MiB; raise NUMA_VM_MEM_$(echo "$name" | tr 'a-z-' 'A-Z_')"
fi

# --- QEMU command line -------------------------------------------------------
n=${#node_cpus[@]}
ncpus=0 per_node="" uniform=1
for ((i = 0; i < n; i++)); do
    c=$(cpu_count "${node_cpus[$i]}")
    ncpus=$((ncpus + c))
    [ "$c" -eq 0 ] && continue
    if [ -z "$per_node" ]; then per_node=$c; elif [ "$per_node" -ne "$c" ]; then uniform=""; fi
done
# One socket per node when the nodes are alike (node == package, as on most
# real machines); otherwise one socket per CPU, so that no socket or cache
# spans two nodes (Linux warns about such topologies and ignores the sharing).
if [ -n "$uniform" ]; then
    smp="$ncpus,sockets=$((ncpus / per_node)),cores=$per_node,threads=1"
else
    smp="$ncpus,sockets=$ncpus,cores=1,threads=1"
fi

if [ -n "$print_cmd" ]; then
    # For running by hand: real paths, serial output next to RESULT_FILE.
    tmp=$(dirname "$result")
    k_path=$kernel i_path=$initrd
    console_path=$result.console.log ttys1_path=$result
else
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/numa-vm-run.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    # QEMU's option parser treats commas in file: paths specially; links under
    # a fresh temp dir keep arbitrary caller paths out of QEMU's options.
    ln -s "$(realpath "$initrd")" "$tmp/initrd"
    ln -s "$(realpath "$kernel")" "$tmp/kernel"
    k_path=$tmp/kernel i_path=$tmp/initrd
    console_path=$tmp/console.log ttys1_path=$tmp/ttyS1.txt
fi

# nokaslr: with KASLR the kernel image (~30 MiB with its reserved areas) lands
# at a random physical address, sometimes on a small node, so per-node
# MemTotal/MemFree would change from boot to boot.
# numa_balancing=disable: automatic NUMA balancing would migrate pages behind
# a test's back (timing-dependent under emulation); a test that wants it can
# pass NUMA_VM_APPEND=numa_balancing=enable (the last occurrence wins).
# cryptomgr.notests: the kernel's crypto self-tests are of no use here, and under TCG on a busy
# 2-core host one of them (cryptomgr_test) was seen spinning for minutes at boot (soft lockups)
append="console=ttyS0 panic=-1 nokaslr numa_balancing=disable cryptomgr.notests=1 NUMA_VM_SCENARIO=$name NUMA_VM_EXPECT=$(expect_compact)"
if [ -n "${NUMA_VM_GUEST_ENV:-}" ]; then
    envfile=""
    while read -r kv; do
        [ -n "$kv" ] || continue
        k=${kv%%=*} v=${kv#*=}
        [[ $k =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && [ "$k" != "$kv" ] ||
            die "NUMA_VM_GUEST_ENV: '$kv' is not NAME=VALUE"
        envfile+="export $k='${v//\'/\'\\\'\'}'"$'\n'
    done < <(printf '%s\n' "${NUMA_VM_GUEST_ENV}" | tr ' ' '\n')
    append+=" NUMA_VM_ENV_B64=$(printf '%s' "$envfile" | base64 -w0)"
fi
# With root= set, the kernel makes the initramfs rootfs a ramfs, not a tmpfs
# (init/do_mounts.c); /init is still run from it, the device is never used.
[ "${NUMA_VM_ROOTFS:-tmpfs}" = ramfs ] && append+=" root=/dev/ram0"
append+=${NUMA_VM_APPEND:+ $NUMA_VM_APPEND}

qemu=(qemu-system-x86_64
    -accel tcg -machine q35 -cpu "${NUMA_VM_CPU:-max}"
    -smp "$smp" -m "${total_mib}M"
    -nodefaults -no-user-config -display none -monitor none -no-reboot
    -serial "file:$console_path" -serial "file:$ttys1_path"
    -kernel "$k_path" -initrd "$i_path" -append "$append")
for ((i = 0; i < n; i++)); do
    node="node,nodeid=$i"
    [ -n "${node_cpus[$i]}" ] && node+=",cpus=${node_cpus[$i]}"
    if [ "${node_mem[$i]}" -gt 0 ]; then
        qemu+=(-object "memory-backend-ram,id=m$i,size=${node_mem[$i]}M")
        node+=",memdev=m$i"
    fi
    qemu+=(-numa "$node")
done
# QEMU needs the full matrix once there are more than two nodes; giving it
# always keeps the guest's view independent of QEMU's defaults.
for ((i = 0; i < n; i++)); do
    for ((j = i + 1; j < n; j++)); do
        qemu+=(-numa "dist,src=$i,dst=$j,val=$(dist "$i" "$j")")
    done
done
# shellcheck disable=SC2206 # word splitting is the documented interface
[ -n "${NUMA_VM_QEMU_ARGS:-}" ] && qemu+=(${NUMA_VM_QEMU_ARGS})

if [ -n "$print_cmd" ]; then
    printf '%q ' "${qemu[@]}"; echo
    exit 0
fi

# --- run ----------------------------------------------------------------------
mkdir -p "$(dirname "$result")"
rm -f "$result" "$result.console.log"
start=$(date +%s.%N)
rc=0
# A guest that has reported GUEST-EXIT but whose kernel then stalls in its power-off (seen
# under TCG: an RCU stall after the last test, the guest's result complete) is stopped after a
# grace period instead of holding the suite until the timeout; its result stands.
timeout --kill-after=10 "$timeout_s" "${qemu[@]}" </dev/null &
qpid=$!
reported="" stalled=""
while kill -0 "$qpid" 2>/dev/null; do
    if [ -z "$reported" ] && grep -q '^GUEST-EXIT [0-9]' "$tmp/ttyS1.txt" 2>/dev/null; then
        reported=$SECONDS
    fi
    if [ -n "$reported" ] && [ $((SECONDS - reported)) -ge 60 ]; then
        echo "$prog: $name: the guest reported GUEST-EXIT but did not power off within 60 s; stopping qemu" >&2
        stalled=1
        kill "$qpid" 2>/dev/null
        break
    fi
    sleep 1
done
wait "$qpid" || rc=$?
[ -n "$stalled" ] && rc=0
elapsed=$(echo "$start $(date +%s.%N)" | awk '{ printf "%.1f", $2 - $1 }')
cp "$tmp/ttyS1.txt" "$result" 2>/dev/null || : >"$result"
cp "$tmp/console.log" "$result.console.log" 2>/dev/null || true

show_console() {
    echo "$prog: last lines of the kernel console ($result.console.log):" >&2
    tail -n 25 "$result.console.log" 2>/dev/null | sed 's/^/    /' >&2 || true
}

if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$prog: $name: guest timed out after $timeout_s s" >&2
    show_console
    exit 124
fi
[ "$rc" -eq 0 ] || { echo "$prog: $name: qemu exited with status $rc" >&2; show_console; exit 3; }

status=$(sed -n 's/^GUEST-EXIT \([0-9][0-9]*\)$/\1/p' "$result" | tail -n1)
if [ -z "$status" ]; then
    echo "$prog: $name: guest powered off without GUEST-EXIT (after $elapsed s)" >&2
    show_console
    exit 3
fi
echo "$prog: $name: GUEST-EXIT $status after $elapsed s" >&2
[ "$status" -eq 0 ] || exit 1
