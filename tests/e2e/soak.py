#!/usr/bin/env python3
"""The client and the checks of tests/e2e/soak.sh (python3's standard library only).

  soak.py run --port P --pid PID --out RUN.json [--requests N] [--clients C] [--seed S] [--deadline S]
      sends a fixed schedule of N completion requests (mixed prompt lengths and n_predict,
      temperature 0, fixed seed, cache_prompt false) to the llama-server on 127.0.0.1:P from
      C threads at once, and writes every response, and the server's VmRSS (/proc/PID/status)
      once a quarter of the requests were answered and again at the end, to RUN.json.
  soak.py check RUN.json [--stock A.json B.json] [--rss-slack-pct P] [--rss-slack-mib M]
      prints one line per check, "pass WHAT" or "fail WHAT: DETAILS": every request answered
      with HTTP 200; RSS flat after the first quarter; with --stock, every response on which
      the two stock runs agree is the same in RUN.json.
"""

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request

WORDS = (
    "the quick brown fox jumps over lazy dog expert router token layer node memory socket thread "
    "batch slot prompt weight tensor page kernel numa place row split copy mirror compute"
).split()


def schedule(n, seed):
    """N requests: prompts of 1 to about 350 tokens and 1 to 48 predicted tokens, in a mix. The
    first four (as many as the server has slots) are the longest, so that the slots reach
    their largest context long before a quarter of the requests is answered: RSS measured then
    is past the warm-up."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if i < 4:
            words, n_predict = 300, 48
        elif kind < 0.4:
            words = rng.randint(1, 12)
        elif kind < 0.8:
            words = rng.randint(20, 120)
        else:
            words = rng.randint(150, 300)
        if i >= 4:
            n_predict = rng.choice([1, 2, rng.randint(3, 16), rng.randint(17, 48), rng.randint(17, 48)])
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append({"id": i, "prompt": f"{i}: {prompt}", "n_predict": n_predict})
    return out


def vm_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def post(port, req, timeout):
    body = json.dumps(
        {
            "prompt": req["prompt"],
            "n_predict": req["n_predict"],
            "temperature": 0,
            "seed": 42,
            "cache_prompt": False,
            "ignore_eos": True,
            "return_tokens": True,
        }
    ).encode()
    r = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            data = json.loads(resp.read())
            return {"status": resp.status, "content": data.get("content"), "tokens": data.get("tokens"),
                    "prompt_tokens": data.get("tokens_evaluated")}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "error": e.read()[:200].decode(errors="replace")}
    except Exception as e:  # connection refused or reset, timeout: the server died or hung
        return {"status": None, "error": f"{type(e).__name__}: {e}"}


def wait_ready(port, seconds):
    """Waits until /health answers 200 (llama-server answers 503 while it loads the model)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                if resp.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(0.2)
    return False


def cmd_run(a):
    if not wait_ready(a.port, 60):
        print(f"soak.py: the server on port {a.port} did not become ready in 60 s", file=sys.stderr)
        return 1
    reqs = schedule(a.requests, a.seed)
    results = [None] * len(reqs)
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "rss_quarter": None}
    quarter = max(1, len(reqs) // 4)
    start = time.monotonic()

    def worker():
        while True:
            with lock:
                i = state["next"]
                if i >= len(reqs):
                    return
                state["next"] += 1
            left = a.deadline - (time.monotonic() - start)
            if left <= 0:
                res = {"status": None, "error": f"not sent: the soak's {a.deadline} s were over"}
            else:
                res = post(a.port, reqs[i], min(left, a.timeout))
            res["n_predict"] = reqs[i]["n_predict"]
            results[i] = res
            with lock:
                state["done"] += 1
                if state["done"] == quarter:
                    state["rss_quarter"] = vm_rss_kib(a.pid)

    threads = [threading.Thread(target=worker) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {
        "requests": len(reqs),
        "seconds": round(time.monotonic() - start, 1),
        "rss_quarter_kib": state["rss_quarter"],
        "rss_end_kib": vm_rss_kib(a.pid),
        "results": results,
    }
    with open(a.out, "w") as f:
        json.dump(out, f)
    return 0


def answer(r):
    return (r.get("content"), r.get("tokens"))


def cmd_check(a):
    run = json.load(open(a.run))
    res = run["results"]
    bad = [(i, r) for i, r in enumerate(res) if r.get("status") != 200]
    if bad:
        first = "; ".join(f"request {i}: HTTP {r.get('status')} {r.get('error', '')}".strip() for i, r in bad[:3])
        print(f"fail requests: {len(bad)} of {len(res)} not answered with HTTP 200 ({first})")
    else:
        short = [i for i, r in enumerate(res) if len(r.get("tokens") or []) != r["n_predict"]]
        if short:
            print(f"fail requests: {len(short)} of {len(res)} answers without n_predict tokens (first: request {short[0]})")
        else:
            print(f"pass requests: all {len(res)} answered with HTTP 200 and n_predict tokens in {run['seconds']} s")

    q, e = run.get("rss_quarter_kib"), run.get("rss_end_kib")
    if q is None or e is None:
        print("fail rss: could not read the server's VmRSS (was it gone?)")
    else:
        slack = max(q * a.rss_slack_pct / 100, a.rss_slack_mib * 1024)
        verdict = "pass" if e <= q + slack else "fail"
        print(f"{verdict} rss: VmRSS {q / 1024:.1f} MiB after the first quarter, {e / 1024:.1f} MiB at the end "
              f"({(e - q) / 1024:+.1f} MiB; allowed +{slack / 1024:.1f})")

    if a.stock:
        s1, s2 = (json.load(open(p))["results"] for p in a.stock)
        agreed = [i for i in range(len(res)) if s1[i].get("status") == 200 and answer(s1[i]) == answer(s2[i])]
        differ = [i for i in agreed if answer(res[i]) != answer(s1[i])]
        if not agreed:
            print("fail deterministic: the two stock runs agreed on no request")
        elif differ:
            i = differ[0]
            t1, t2 = s1[i].get("tokens") or [], res[i].get("tokens") or []
            at = next((k for k in range(min(len(t1), len(t2))) if t1[k] != t2[k]), min(len(t1), len(t2)))
            print(f"fail deterministic: {len(differ)} of the {len(agreed)} responses both stock runs agree on differ "
                  f"(first: request {i}, {s1[i].get('prompt_tokens')} prompt tokens, from generated token {at} on)")
        else:
            print(f"pass deterministic: the two stock runs agree on {len(agreed)} of {len(res)} responses; "
                  f"this run gives the same text and tokens for all {len(agreed)}")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--pid", type=int, required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--requests", type=int, default=200)
    r.add_argument("--clients", type=int, default=6)
    r.add_argument("--seed", type=int, default=12)
    r.add_argument("--deadline", type=float, default=120, help="seconds for the whole run")
    r.add_argument("--timeout", type=float, default=60, help="seconds for one request")
    c = sub.add_parser("check")
    c.add_argument("run")
    c.add_argument("--stock", nargs=2)
    c.add_argument("--rss-slack-pct", type=float, default=5)
    c.add_argument("--rss-slack-mib", type=float, default=4)
    a = p.parse_args()
    return cmd_run(a) if a.cmd == "run" else cmd_check(a)


if __name__ == "__main__":
    sys.exit(main())
