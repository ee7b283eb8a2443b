#!/usr/bin/env bash
# Runs numa-moe's test suites and prints each runner's summary line.
#
#   scripts/test.sh all | rust | c | e2e | hybrid | numa
#
# `all` runs every suite even when one fails, then prints a summary of the suites and exits
# non-zero if any failed. Expects `make llama-portable lib harness models` to have run (make test does).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
CARGO=${CARGO:-$(command -v cargo || echo "$HOME/.cargo/bin/cargo")}
export NUMA_MOE_LLAMA_SRC=$root/third_party/llama.cpp
HARNESS=$root/build/c/harness
LOGS=$root/build/test-logs
mkdir -p "$LOGS"

suite_rust() {
    # unit, property and integration tests; the integration tests that change process
    # state (memory policy, affinity) run single-threaded
    "$CARGO" test --release --lib --bins 2>&1 | tee "$LOGS/rust-unit.log" | grep -E "^test result|FAILED|panicked" || true
    local rc1=${PIPESTATUS[0]}
    "$CARGO" test --release --test '*' -- --test-threads=1 2>&1 | tee "$LOGS/rust-integration.log" | grep -E "^test result|FAILED|panicked" || true
    local rc2=${PIPESTATUS[0]}
    [ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
}

suite_c() {
    local rc=0
    echo "C harness on this machine:"
    "$HARNESS" 2>"$LOGS/harness-host.err" | tee "$LOGS/harness-host.log" | grep -E "^FAIL|passed" || true
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    for topo in "package:2 numa:1 core:1 pu:1" "package:2 numa:2 core:1 pu:1"; do
        echo "C harness on a described machine ($topo):"
        NUMA_MOE_TOPOLOGY="$topo" "$HARNESS" 2>>"$LOGS/harness-described.err" | tee -a "$LOGS/harness-described.log" | grep -E "^FAIL|passed" || true
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    done
    echo "C harness, binding refused by the kernel (a described node 1 on this host):"
    NUMA_MOE_FORCE_BIND=1 NUMA_MOE_TOPOLOGY="package:2 numa:1 core:1 pu:1" "$HARNESS" buffer_bind 2>>"$LOGS/harness-bind.err" \
        | tee "$LOGS/harness-bind.log" | grep -E "^FAIL|passed|skipped" || true
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    # environment faults (docs/DESIGN.md, "Environment faults"): each NUMA syscall refused with
    # EPERM (a container's seccomp profile) and ENOSYS (a kernel without NUMA) through an
    # LD_PRELOAD shim, alone and all together; binding refused on a described 2-node machine
    # too, where replicas must not add a second warning
    local shim=$root/build/c/fault_shim.so
    local faults=(mbind=EPERM mbind=ENOSYS move_pages=EPERM move_pages=ENOSYS get_mempolicy=EPERM get_mempolicy=ENOSYS
        set_mempolicy=EPERM set_mempolicy=ENOSYS mbind=EPERM,move_pages=EPERM,get_mempolicy=EPERM,set_mempolicy=EPERM)
    : >"$LOGS/harness-fault.log"
    for fault in "${faults[@]}"; do
        echo "C harness, kernel refuses $fault (tests/c/fault_shim.c):"
        LD_PRELOAD=$shim NUMA_MOE_FAULT=$fault "$HARNESS" fault_syscalls 2>>"$LOGS/harness-fault.err" \
            | tee -a "$LOGS/harness-fault.log" | grep -E "^FAIL|passed" || true
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    done
    for fault in mbind=EPERM mbind=ENOSYS; do
        echo "C harness, kernel refuses $fault, binding forced on a described 2-node machine:"
        LD_PRELOAD=$shim NUMA_MOE_FAULT=$fault NUMA_MOE_FORCE_BIND=1 NUMA_MOE_TOPOLOGY="package:2 numa:1 core:1 pu:1" \
            "$HARNESS" fault_syscalls 2>>"$LOGS/harness-fault.err" | tee -a "$LOGS/harness-fault.log" | grep -E "^FAIL|passed" || true
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    done
    echo "C harness, topology detection fails (a broken hwloc XML file):"
    local broken=$LOGS/broken-topology.xml
    printf '<topology><object type="Machine"' >"$broken"
    HARNESS_TOPOLOGY_BROKEN=1 NUMA_MOE_TOPOLOGY=$broken "$HARNESS" fault_topology 2>"$LOGS/harness-topology.err" \
        | tee "$LOGS/harness-topology.log" | grep -E "^FAIL|passed" || true
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    # its one warning comes before the harness's log callback exists: count it on stderr
    local said
    said=$(grep -c "cannot read the machine's topology" "$LOGS/harness-topology.err")
    if [ "$said" -ne 1 ]; then
        echo "FAIL the topology warning was printed $said times, want once"
        rc=1
    fi
    if ! command -v valgrind >/dev/null; then
        echo "FAIL valgrind is missing (scripts/setup.sh installs it)"
        rc=1
    else
        echo "C harness under valgrind (ABI and alloc/free cycles; leaks and invalid accesses are errors):"
        valgrind -q --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite \
            "$HARNESS" abi buffer 2>"$LOGS/valgrind.err" | tee "$LOGS/valgrind.log" | grep -E "^FAIL|passed" || true
        local v=${PIPESTATUS[0]}
        if [ "$v" -ne 0 ]; then
            rc=1
            echo "valgrind reported errors (exit $v):"
            tail -40 "$LOGS/valgrind.err"
        fi
    fi
    return $rc
}

suite_e2e() {
    local rc=0
    tests/e2e/run.sh || rc=1
    echo "hardening (80 thread groups, a fault after the decision point, replicas, batch threads):"
    tests/e2e/hardening.sh || rc=1
    echo "routing statistics, numa-moe routing, the balanced map (tests/e2e/routing.sh):"
    tests/e2e/routing.sh || rc=1
    echo "llama-server soak, 4 slots, stock against numa-moe (tests/e2e/soak.sh):"
    tests/e2e/soak.sh || rc=1
    return $rc
}

suite_hybrid() {
    # a GPU backend in the process: ggml's Vulkan backend on Mesa's lavapipe (build/llama-vulkan)
    tests/e2e/hybrid.sh
}

suite_numa() {
    tests/numa-vm/run-tests.sh
}

run_suite() {
    local name=$1
    echo "=== $name"
    local start=$SECONDS
    if "suite_$name"; then
        results+=("$name: passed ($((SECONDS - start)) s)")
    else
        results+=("$name: FAILED ($((SECONDS - start)) s)")
        failed=1
    fi
}

results=()
failed=0
case "${1:-all}" in
    all)
        for s in rust c e2e hybrid numa; do
            run_suite "$s"
        done
        ;;
    rust | c | e2e | hybrid | numa) run_suite "$1" ;;
    *) echo "usage: $0 all|rust|c|e2e|hybrid|numa" >&2; exit 2 ;;
esac
echo "=== summary"
printf '%s\n' "${results[@]}"
exit $failed
