#!/usr/bin/env bash
# One copy per handoff, live and simulated, on the same trace: 100 repeats of a one-block
# prompt (the gateway learns the fleet's typical prompt), then DOCS documents of BLOCKS 512-token
# blocks asked in turn, PASSES times over, GAP_MS apart, on one prefill and one decode whose
# caches hold KV_BLOCKS 16-token blocks each. With two copies of every document each cache cycles
# through more documents than it holds; with one copy the two hold them all between them.
# Replays it against `pdgate up` with `reuse.one_copy` on and off, then simulates both; prints
# per run the engines' prefix-cache hit rate (their own counters, warm-ups included), the TTFT
# p50 and the blocks the engines marked.
#
# Usage: PDGATE=target/release/pdgate bash loadtest/scripts/one_copy_live.sh
# Knobs: DOCS, BLOCKS, PASSES, GAP_MS, KV_BLOCKS, TIME_SCALE, OUT, PORT.
set -euo pipefail
PDGATE=${PDGATE:-target/release/pdgate}
DOCS=${DOCS:-40}
BLOCKS=${BLOCKS:-4}
PASSES=${PASSES:-5}
GAP_MS=${GAP_MS:-150}
KV_BLOCKS=${KV_BLOCKS:-4096}
TIME_SCALE=${TIME_SCALE:-1}
OUT=${OUT:-/tmp/pdgate-one-copy}
PORT=${PORT:-18310}
mkdir -p "$OUT"
TRACE="$OUT/docs.jsonl"
python3 - "$TRACE" "$DOCS" "$BLOCKS" "$PASSES" "$GAP_MS" <<'PY'
import json, sys
path, docs, blocks, passes, gap = sys.argv[1], *map(int, sys.argv[2:])
rows = [[1]] * 100 + [[1000 + d * 100 + b for b in range(blocks)] for _ in range(passes) for d in range(docs)]
with open(path, "w") as f:
    for i, ids in enumerate(rows):
        f.write(json.dumps({"timestamp": i * gap, "input_length": 512 * len(ids), "output_length": 4, "hash_ids": ids}) + "\n")
PY

metric() { # url name -> summed value of every series of that name
  curl -sf "$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { print s + 0 }'
}

live() { # one_copy(true|false)
  local dir="$OUT/live-$1"
  RUST_LOG=warn PDGATE_SCHEDULER__REUSE__ONE_COPY=$1 PDGATE_UP__ENGINE__KV_BLOCKS=$KV_BLOCKS \
    "$PDGATE" up --prefill 1 --decode 1 --time-scale "$TIME_SCALE" --port "$PORT" > "$dir.up.log" 2>&1 &
  local up=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.2; done
  "$PDGATE" replay "$TRACE" --target "http://127.0.0.1:$PORT" --slo ttft=2000,tpot=100 --out "$dir" > "$dir.txt" 2>&1
  local marked=0 u
  for u in $(curl -sf "http://127.0.0.1:$PORT/admin/workers" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(" ".join(w["url"] for w in (d if isinstance(d, list) else d["workers"])))'); do
    marked=$((marked + $(metric "$u" pdgate_sim_kv_evict_first_blocks_total | cut -d. -f1)))
  done
  kill -INT "$up"; wait "$up" || true
  report "live one_copy=$1" "$dir/report.json" "$marked"
}

sim() { # one_copy(true|false)
  local dir="$OUT/sim-$1"
  printf '[reuse]\none_copy = %s\n' "$1" > "$dir.toml"
  "$PDGATE" simulate "$TRACE" --prefill 1 --decode 1 --kv-blocks "$KV_BLOCKS" --policy slo \
    --slo ttft=2000,tpot=100 --scheduler-config "$dir.toml" --out "$dir" > "$dir.txt" 2>&1
  report "sim  one_copy=$1" "$dir/report.json" "-"
}

report() { # label report.json marked
  python3 - "$@" <<'PY'
import json, sys
label, path, marked = sys.argv[1:]
rep = json.load(open(path))
pol = rep["policies"][0] if "policies" in rep else rep
agg = pol["aggregates"]
print(f"{label}: engines' hit rate {agg.get('cache_hit_rate') or 0:.3f}, "
      f"TTFT p50 {agg['ttft_ms']['median']:.1f} ms, ok {agg.get('completed')}, "
      f"blocks marked evict-first {marked}")
PY
}

for oc in false true; do live "$oc"; done
for oc in false true; do sim "$oc"; done
