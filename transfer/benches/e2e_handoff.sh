#!/usr/bin/env bash
# End-to-end KV handoff time through `pdgate up` (time scale 0), shm vs tcp.
#
# One prefill and one decode engine with the 8B profile (128 KiB of KV per token, 16-token blocks);
# one chat request with a prompt of ~TOKENS tokens and max_tokens 1; the handoff time is the
# gateway's pdgate_kv_transfer_duration_seconds, after a warm-up request (the prefill engine's `transfer_ms`: it includes
# generating the KV bytes, which is the same work for both transports).
# Usage: transfer/benches/e2e_handoff.sh [TOKENS]   (default 32768; needs ~2x TOKENS*128KiB RAM)
set -euo pipefail
cd "$(dirname "$0")/../.."
TOKENS=${1:-32768}
PORT=${PORT:-18123}
BLOCKS=$(( TOKENS / 16 + 64 ))
cargo build --release -q -p pdgate || [ -x target/release/pdgate ]
BIN=target/release/pdgate

for transport in ${TRANSPORTS:-shm tcp}; do
  env PDGATE_SERVER__PORT=$PORT PDGATE_SERVER__MAX_BODY_BYTES=67108864 \
    PDGATE_SCHEDULER__KV_BYTES_PER_TOKEN=131072 PDGATE_SCHEDULER__SLO__ADMISSION=false \
    PDGATE_UP__ENGINE__KV_BYTES_PER_TOKEN=131072 PDGATE_UP__ENGINE__KV_BLOCKS=$BLOCKS \
    PDGATE_UP__ENGINE__MAX_BATCHED_TOKENS=$((TOKENS + 1024)) \
    PDGATE_UP__ENGINE__TRANSPORT=$transport \
    PDGATE_UPSTREAM__PREFILL_TIMEOUT_SECS=600 \
    "$BIN" up --prefill 1 --decode 1 --time-scale 0 >/tmp/pdgate-e2e-$transport.log 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null' EXIT
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/ready" | grep -q "\"ready\":true" >/dev/null 2>&1 && break; sleep 0.2; done
  python3 - "$PORT" "$transport" "$TOKENS" <<'PY'
import json, sys, time, urllib.request
port, transport, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompt = " ".join("w%d" % (i % 9973) for i in range(tokens))
def ask(text):
    body = json.dumps({"model": "pdgate-sim-8b", "max_tokens": 1,
                       "messages": [{"role": "user", "content": text}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"content-type": "application/json"})
    t0 = time.time()
    resp = json.load(urllib.request.urlopen(req, timeout=600))
    return resp, time.time() - t0
def metrics():
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    def metric(name):
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0
    return (metric("pdgate_kv_transfer_duration_seconds_sum"),
            metric("pdgate_kv_transfer_bytes_total"))
# Warm-up with a different prompt of the same length (connections, handshake, first-touch page
# faults of the decode pool), then the measured request.
ask("warm " + prompt)
s0, b0 = metrics()
resp, wall = ask(prompt)
s1, b1 = metrics()
secs, nbytes = s1 - s0, b1 - b0
print(json.dumps({"transport": transport, "prompt_tokens": resp["usage"]["prompt_tokens"],
                  "kv_bytes": nbytes, "handoff_ms": round(secs * 1e3, 1),
                  "gb_per_s": round(nbytes / secs / 1e9, 3) if secs else None,
                  "request_wall_ms": round(wall * 1e3, 1)}))
PY
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
