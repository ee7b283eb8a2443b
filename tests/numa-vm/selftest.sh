#!/usr/bin/env bash
# selftest.sh [SCENARIO ...]
#
# Checks the NUMA guest infrastructure itself: builds one initramfs with a
# small guest script (plus probe.c and numactl when this machine can provide
# them), boots every scenario (or the ones named) and checks that the guest saw
# what QEMU was told: node count, CPUs and memory per node, distances, the
# memory-less node, the x86-64-v3 CPU flags, NUMA syscalls, taskset.
# Prints "N passed, N failed" and exits non-zero on any failure.
#
# Env:
#   NUMA_VM_SELFTEST_PAYLOAD_MB  also pack a random file of this many MB, to
#                                exercise big initramfs images (default 0)
#   NUMA_VM_SELFTEST_GZIP=1      build a .cpio.gz instead of a plain .cpio
#   NUMA_VM_SELFTEST_KEEP=1      keep the work directory (results, logs)
#   NUMA_VM_TIMEOUT              per-guest timeout in seconds (default 180)
#   plus everything run-guest.sh reads (NUMA_VM_CPU, NUMA_VM_MEM_*, ...)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || mapfile -t scenarios < <("$here/run-guest.sh" --list)

# The work dir's files are packed at the same absolute paths, so the guest
# sees /tmp/numa-vm-selftest.XXXXXX/probe as well.
work=$(mktemp -d "${TMPDIR:-/tmp}/numa-vm-selftest.XXXXXX")
if [ -n "${NUMA_VM_SELFTEST_KEEP:-}" ]; then
    echo "selftest: keeping $work"
else
    trap 'rm -rf "$work"' EXIT
fi

pass=0 fail=0
ok()  { pass=$((pass + 1)); echo "ok   - $*"; }
bad() { fail=$((fail + 1)); echo "FAIL - $*"; }
check() { # check DESCRIPTION WANT GOT
    if [ "$2" = "$3" ]; then ok "$1"; else bad "$1: want '$2', got '$3'"; fi
}

# --- what goes into the guest --------------------------------------------------
files=()
if command -v "${CC:-cc}" >/dev/null 2>&1 &&
   "${CC:-cc}" -O2 -o "$work/probe" "$here/probe.c" 2>"$work/probe.log"; then
    files+=("$work/probe")
    # A file only the probe maps: its page cache pages are mapped once, so
    # move_pages may migrate them (shared binaries' pages it may not).
    head -c 65536 /dev/urandom >"$work/probe-data"
    files+=("$work/probe-data")
else
    echo "selftest: no working C compiler; NUMA syscall and instruction checks skipped" >&2
fi
numactl=$(command -v numactl || true)
[ -n "$numactl" ] && files+=("$numactl")
payload_mb=${NUMA_VM_SELFTEST_PAYLOAD_MB:-0}
if [ "$payload_mb" -gt 0 ]; then
    head -c "$((payload_mb * 1048576))" /dev/urandom >"$work/payload.bin"
    files+=("$work/payload.bin")
fi

# The guest reports raw facts, one "key args..." per line; all judging is done
# here, so a failing check shows both sides.
cat >"$work/guest.sh" <<EOF
#!/bin/sh
echo "scenario \$NUMA_VM_SCENARIO"
while read -r line; do echo "expect \$line"; done </expect.txt
for d in /sys/devices/system/node/node[0-9]*; do
    n=\${d##*node}
    echo "cpulist \$n \$(cat \$d/cpulist)"
    echo "memtotal \$n \$(awk '/MemTotal/ { print \$4 }' \$d/meminfo)"
    echo "memfree \$n \$(awk '/MemFree/ { print \$4 }' \$d/meminfo)"
    echo "distance \$n \$(cat \$d/distance)"
done
echo "has_memory \$(cat /sys/devices/system/node/has_memory)"
echo "has_cpu \$(cat /sys/devices/system/node/has_cpu)"
echo "nproc \$(nproc)"
echo "flags \$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)"
echo "vendor \$(grep -m1 '^vendor_id' /proc/cpuinfo | cut -d: -f2)"
[ -r /proc/self/numa_maps ] && echo "numa_maps yes" || echo "numa_maps no"
if [ -x "$work/probe" ]; then
    "$work/probe" "$work/probe-data" | sed 's/^/probe /'
fi
if [ -n "$numactl" ]; then
    # A memory-less node must be refused as a membind target.
    for n in \$(cut -d' ' -f1 /expect.txt); do
        "$numactl" --membind=\$n true >/dev/null 2>&1; echo "numactl-membind \$n \$?"
    done
fi
if [ "\$NUMA_VM_SCENARIO" = taskset ]; then
    echo "taskset 2-3 \$(taskset -c 2-3 grep Cpus_allowed_list /proc/self/status | cut -f2)"
    echo "taskset 0,6 \$(taskset -c 0,6 grep Cpus_allowed_list /proc/self/status | cut -f2)"
    [ -x "$work/probe" ] && taskset -c 4-5 "$work/probe" | sed 's/^/taskset-probe /'
fi
[ -f "$work/payload.bin" ] && echo "payload \$(wc -c <"$work/payload.bin")"
exit 0
EOF

case ${NUMA_VM_SELFTEST_GZIP:-} in
    1) initrd=$work/initrd.cpio.gz ;;
    *) initrd=$work/initrd.cpio ;;
esac
"$here/mkinitramfs.sh" "$initrd" "$work/guest.sh" "${files[@]}"

# --- helpers for judging -------------------------------------------------------
field() { # field FILE KEY [ARG1]: rest of the first line "KEY [ARG1] rest"
    if [ $# -eq 3 ]; then
        awk -v k="$2" -v a="$3" '$1 == k && $2 == a { $1 = ""; $2 = ""; sub(/^  /, ""); print; exit }' "$1"
    else
        awk -v k="$2" '$1 == k { $1 = ""; sub(/^ /, ""); print; exit }' "$1"
    fi
}
ranges() { # ranges 0 1 2 5 -> 0-2,5 (sysfs list format)
    local out="" start="" prev="" x
    for x in "$@" ""; do
        if [ -n "$x" ] && [ -n "$prev" ] && [ "$x" -eq $((prev + 1)) ]; then prev=$x; continue; fi
        if [ -n "$start" ]; then
            out+="${out:+,}$start"; [ "$prev" != "$start" ] && out+="-$prev"
        fi
        start=$x prev=$x
    done
    echo "$out"
}

declare -A timing=()

# --- run and judge each scenario -------------------------------------------------
for s in "${scenarios[@]}"; do
    echo "# scenario $s"
    res=$work/result-$s.txt
    rc=0
    "$here/run-guest.sh" "$s" "$initrd" "$res" "${NUMA_VM_TIMEOUT:-180}" 2>"$work/run-$s.log" || rc=$?
    cat "$work/run-$s.log" >&2
    timing[$s]=$(sed -n 's/.* after \([0-9.]*\) s.*/\1/p' "$work/run-$s.log" | tail -n1)
    if [ "$rc" -ne 0 ]; then
        bad "$s: guest ran (run-guest.sh exit $rc)"
        continue
    fi
    ok "$s: guest ran and reported GUEST-EXIT 0"

    check "$s: NUMA_VM_SCENARIO" "$s" "$(field "$res" scenario)"
    want_expect=$("$here/run-guest.sh" --expect "$s")
    check "$s: /expect.txt matches run-guest.sh --expect" "$want_expect" "$(sed -n 's/^expect //p' "$res")"

    ids=() mem_nodes=() cpu_nodes=() want_cpus=0
    while read -r id cpus mem dist; do
        ids+=("$id")
        check "$s: node $id cpulist" "$cpus" "$(field "$res" cpulist "$id")"
        check "$s: node $id distance" "$dist" "$(field "$res" distance "$id")"
        got_kb=$(field "$res" memtotal "$id")
        if [ "$mem" -eq 0 ]; then
            check "$s: node $id is memory-less (MemTotal kB)" 0 "$got_kb"
        else
            mem_nodes+=("$id")
            # MemTotal excludes what firmware and kernel reserve, mostly on
            # the node holding the kernel: expect 75-100% of the size given.
            lo=$((mem * 1024 * 3 / 4)) hi=$((mem * 1024))
            if [ -n "$got_kb" ] && [ "$got_kb" -ge "$lo" ] && [ "$got_kb" -le "$hi" ]; then
                ok "$s: node $id MemTotal $got_kb kB within 75-100% of $mem MiB"
            else
                bad "$s: node $id MemTotal '$got_kb' kB not within 75-100% of $mem MiB"
            fi
        fi
        if [ "$cpus" != - ]; then
            cpu_nodes+=("$id")
            c=$(( ${cpus#*-} - ${cpus%-*} + 1 ))
            want_cpus=$((want_cpus + c))
        fi
    done <<<"$want_expect"
    check "$s: node count" "${#ids[@]}" "$(grep -c '^cpulist ' "$res")"
    check "$s: has_memory" "$(ranges "${mem_nodes[@]}")" "$(field "$res" has_memory)"
    check "$s: has_cpu" "$(ranges "${cpu_nodes[@]}")" "$(field "$res" has_cpu)"
    check "$s: online CPUs" "$want_cpus" "$(field "$res" nproc)"

    # x86-64-v3, which the llama.cpp build targets.
    flags=" $(field "$res" flags) "
    missing=""
    for f in avx avx2 fma f16c bmi1 bmi2 abm movbe xsave; do
        case $flags in *" $f "*) ;; *) missing+=" $f" ;; esac
    done
    check "$s: /proc/cpuinfo has the x86-64-v3 flags (missing:${missing:- none})" "" "$missing"
    check "$s: /proc/self/numa_maps exists" yes "$(field "$res" numa_maps)"

    if grep -q '^probe isa ' "$res"; then
        isa=$(field "$res" probe isa)
        for x in avx2 fma f16c bmi; do
            case " $isa " in
                *" exec-$x=ok "*) ok "$s: $x instructions execute correctly" ;;
                *) bad "$s: $x instructions: $isa" ;;
            esac
        done
        while read -r id cpus mem dist; do
            line=$(awk -v n="$id" '$1 == "probe" && $2 == "node" && $3 == n' "$res")
            if [ "$mem" -eq 0 ]; then
                # Where the unmoved page stays (moved-to) does not matter.
                want="mbind=EINVAL move=ENODEV filemove=ENODEV"
                got=$(echo "$line" | tr ' ' '\n' | grep -E '^(mbind|move|filemove)=' | tr '\n' ' ' | sed 's/ $//')
            else
                want="mbind=ok placed=$id move=ok moved-to=$id filemove=ok file-on=$id"
                got=$(echo "$line" | cut -d' ' -f4-)
            fi
            check "$s: node $id mbind/move_pages" "$want" "$got"
        done <<<"$want_expect"
    fi

    if grep -q '^numactl-membind ' "$res"; then
        while read -r id cpus mem dist; do
            if [ "$mem" -eq 0 ]; then want=1; else want=0; fi
            check "$s: numactl --membind=$id exit status" "$want" "$(field "$res" numactl-membind "$id")"
        done <<<"$want_expect"
    fi

    if [ "$s" = taskset ]; then
        check "$s: taskset -c 2-3 affinity" 2-3 "$(field "$res" taskset 2-3)"
        check "$s: taskset -c 0,6 affinity" 0,6 "$(field "$res" taskset 0,6)"
        if grep -q '^taskset-probe ' "$res"; then
            check "$s: probe under taskset -c 4-5 moves a page to node 0" \
                "mbind=ok placed=0 move=ok moved-to=0" \
                "$(awk '$1 == "taskset-probe" && $2 == "node" && $3 == 0' "$res" | cut -d' ' -f4-7)"
        fi
    fi

    if [ -f "$work/payload.bin" ]; then
        check "$s: payload size in guest" "$(stat -c %s "$work/payload.bin")" "$(field "$res" payload)"
    fi
done

echo "# boot+run+poweroff times (s):$(for s in "${scenarios[@]}"; do printf ' %s=%s' "$s" "${timing[$s]:-?}"; done)"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
