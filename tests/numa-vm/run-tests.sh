#!/usr/bin/env bash
# make test-numa: numa-moe on emulated multi-node machines. Builds one initramfs with the C
# harness, the greedy driver, llama-server, the numa-moe tool, libnuma_moe.so, the patched
# llama.cpp libraries and two small MoE models, boots it in every scenario of run-guest.sh (2 nodes,
# 4 nodes with SLIT distances, uneven nodes, a memory-less node, a taskset-restricted
# process), and sums what guest.sh reports. Fails on any failure or guest timeout.
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
VM=$root/tests/numa-vm
OUT=$root/build/numa-vm
mkdir -p "$OUT"
SCENARIOS=${NUMA_VM_SCENARIOS:-two-node four-node uneven memless taskset}
TIMEOUT=${NUMA_VM_TIMEOUT:-900}

files=(
    "$root/build/c/harness" "$root/build/greedy" "$root/target/release/numa-moe" "$root/target/release/libnuma_moe.so"
    "$root/build/models/many/e32u4-q8_0.gguf" "$root/build/models/archs/qwen3moe-moe.gguf" "$root/build/models/archs/deepseek2-moe.gguf"
    "$root/build/models/many/e64u8-q4_K.gguf" "$root/build/models/many/e32u4-mxfp4.gguf"
    "$root/build/llama/bin/llama-server" "$VM/guest-soak.sh"
)
for f in "${files[@]}"; do
    [ -e "$f" ] || { echo "numa-vm: missing $f (run make lib harness models)"; echo "0 passed, 1 failed"; exit 1; }
done
initrd=$OUT/guest.cpio
"$VM/mkinitramfs.sh" "$initrd" "$VM/guest.sh" "${files[@]}" > "$OUT/mkinitramfs.log" 2>&1 || {
    cat "$OUT/mkinitramfs.log"
    echo "0 passed, 1 failed"
    exit 1
}

passed=0
failed=0
for s in $SCENARIOS; do
    start=$SECONDS
    result=$OUT/$s.txt
    NUMA_VM_GUEST_ENV="ROOT=$root" "$VM/run-guest.sh" "$s" "$initrd" "$result" "$TIMEOUT" > "$OUT/$s.run.log" 2>&1
    rc=$?
    line=$(grep -E "^guest $s: [0-9]+ passed, [0-9]+ failed" "$result" 2>/dev/null | tail -1)
    p=$(echo "$line" | sed -n 's/.*: \([0-9]*\) passed.*/\1/p')
    f=$(echo "$line" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
    if [ -z "$line" ]; then
        echo "FAIL $s: no result from the guest (run-guest.sh exit $rc, $((SECONDS - start)) s):"
        tail -5 "$OUT/$s.run.log"
        failed=$((failed + 1))
        continue
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        failed=$((failed + 1))
        echo "FAIL $s: guest exited with status $rc"
    fi
    echo "$s: $p passed, $f failed ($((SECONDS - start)) s)"
    grep -E "^FAIL|check failed" "$result" | sed "s/^/  $s: /"
done
echo "numa-vm: $passed passed, $failed failed"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
