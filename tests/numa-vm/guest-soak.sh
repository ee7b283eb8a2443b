#!/bin/sh
# guest-soak.sh: a bounded llama-server soak inside a real multi-node guest (run by guest.sh,
# busybox only). 4 slots with continuous batching, SOAK_REQUESTS mixed-length completions
# from 4 concurrent clients, the same schedule against stock llama-server and numa-moe:
# every request answered, the server alive at the end, every answer's tokens equal to
# stock's, and `numa-moe verify --pid` of the running server finding no expert byte off
# the nodes its policy allows. Prints "ok"/"FAIL" lines; guest.sh counts them.
# Expects ROOT, M, LIB and CLI from guest.sh.
set -u
S=$ROOT/build/llama/bin/llama-server
MODEL=$M/many/e32u4-q8_0.gguf
N=${SOAK_REQUESTS:-24}
D=/tmp/soak
rm -rf "$D"
mkdir -p "$D"
ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up 2>/dev/null

words="the quick brown fox jumps over a lazy dog while numa nodes hold expert rows"
# body I: request I's JSON: prompts of 1 to 40 words, 1 to 12 predicted tokens
body() {
    n=$(( ($1 * 7) % 40 + 1 )) p="$1:" k=0
    for w in $words $words $words; do
        [ $k -lt $n ] || break
        p="$p $w"
        k=$((k + 1))
    done
    printf '{"prompt":"%s","n_predict":%d,"temperature":0,"seed":42,"cache_prompt":false,"ignore_eos":true,"return_tokens":true}' \
        "$p" $(( ($1 * 5) % 12 + 1 ))
}

# client C PORT NAME: requests C, C+4, C+8, ... one after another
client() {
    i=$1
    while [ $i -lt "$N" ]; do
        timeout 300 wget -q -O "$D/$3.$i" --header 'Content-Type: application/json' --post-data "$(body $i)" \
            "http://127.0.0.1:$2/completion" || echo "request $i failed" >> "$D/$3.errors"
        i=$((i + 4))
    done
}

# soak NAME PORT [VAR=value ...]: the schedule against a fresh server; leaves $server running
soak() {
    name=$1 port=$2
    shift 2
    env "$@" "$S" -m "$MODEL" -np 4 -cb -c 2048 -t 2 --host 127.0.0.1 --port "$port" --no-webui -cram 0 -lv 4 \
        > "$D/$name.log" 2>&1 &
    server=$!
    t=0
    until grep -q "listening on http" "$D/$name.log"; do
        t=$((t + 1))
        if [ $t -gt 300 ] || ! kill -0 $server 2>/dev/null; then
            echo "FAIL soak $name: llama-server did not start: $(tail -2 "$D/$name.log" | tr '\n' ' ')"
            kill -9 $server 2>/dev/null
            server=""
            return 1
        fi
        sleep 1
    done
    clients=""
    for c in 0 1 2 3; do
        client $c "$port" "$name" &
        clients="$clients $!"
    done
    wait $clients
    return 0
}

# answered NAME: requests without an answer carrying tokens
unanswered() {
    bad=0 i=0
    while [ $i -lt "$N" ]; do
        grep -q '"tokens":\[' "$D/$1.$i" 2>/dev/null || bad=$((bad + 1))
        i=$((i + 1))
    done
    echo $bad
}

tokens() { grep -o '"tokens":\[[0-9,]*\]' "$1" 2>/dev/null; }

stop() {
    [ -n "$server" ] || return
    kill "$server" 2>/dev/null
    t=0
    while kill -0 "$server" 2>/dev/null && [ $t -lt 20 ]; do sleep 1; t=$((t + 1)); done
    kill -9 "$server" 2>/dev/null
    server=""
}

start=$(date +%s)
server=""
if soak stock 8090; then
    stop
    if soak numa 8091 NUMA_MOE_EXPERT_MAP=rows LD_PRELOAD="$LIB"; then
        bad=$(unanswered numa)
        if ! kill -0 "$server" 2>/dev/null; then
            echo "FAIL soak: numa-moe's llama-server is gone after the schedule: $(tail -3 "$D/numa.log" | tr '\n' ' ')"
        elif [ "$bad" -ne 0 ] || [ "$(unanswered stock)" -ne 0 ]; then
            echo "FAIL soak: $bad of $N requests unanswered by numa-moe's server ($(unanswered stock) by stock's)"
        else
            v=$("$CLI" verify --pid "$server" --json 2>&1)
            off=$(echo "$v" | grep -o '"bytes_off_policy":[0-9]*' | cut -d: -f2)
            diff=0 i=0
            while [ $i -lt "$N" ]; do
                [ "$(tokens "$D/stock.$i")" = "$(tokens "$D/numa.$i")" ] || diff=$((diff + 1))
                i=$((i + 1))
            done
            if ! grep -q "numa-moe: [0-9]* expert tensors" "$D/numa.log"; then
                echo "FAIL soak: numa-moe placed nothing: $(grep -m2 numa-moe "$D/numa.log" | tr '\n' ' ')"
            elif [ "$diff" -ne 0 ]; then
                echo "FAIL soak: $diff of $N answers differ from stock's"
            elif [ "${off:-x}" != 0 ]; then
                echo "FAIL soak: numa-moe verify --pid: ${off:-?} expert bytes off their nodes ($v)"
            else
                echo "ok   soak: llama-server, 4 slots, $N requests from 4 clients: all answered, equal to stock, no expert byte off its node ($(( $(date +%s) - start )) s)"
            fi
        fi
        stop
    fi
else
    stop
fi
