#!/usr/bin/env bash
# KV reuse live: the same multi-turn spec (same seed) replayed against `pdgate up` with pulls off
# and on, alternating rounds (off, on, on, off, ...), so drift on the box favours neither. Prints
# per round the gateway's pdgate_kv_pulled_blocks_total, the engines' pulled/failed counters and
# the replay's TTFT p50/p90, goodput and hit rate; then the medians per setting.
#
# Usage: PDGATE=target/release/pdgate ROUNDS=2 bash loadtest/scripts/reuse_live.sh
# Knobs: SPEC (a synthetic: spec), PREFILL/DECODE, TIME_SCALE (modelled GPU speed; 1 = real time),
# KV_BLOCKS (per engine), EXPORT_BLOCKS (what each engine lends at once), OUT.
set -euo pipefail
PDGATE=${PDGATE:-target/release/pdgate}
ROUNDS=${ROUNDS:-2}
PREFILL=${PREFILL:-4}
DECODE=${DECODE:-4}
TIME_SCALE=${TIME_SCALE:-0.5}
KV_BLOCKS=${KV_BLOCKS:-4096}
EXPORT_BLOCKS=${EXPORT_BLOCKS:-1024}
SPEC=${SPEC:-synthetic:requests=400,rate=3,input=3000,input_sd=500,output=32,output_sd=8,groups=8,prefix=2048,turns=4,seed=7}
OUT=${OUT:-/tmp/pdgate-reuse-live}
PORT=${PORT:-18300}
mkdir -p "$OUT"

metric() { # url name -> summed value of every series of that name
  curl -sf "$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { print s + 0 }'
}

engine_sum() { # name -> summed over every engine listed by the gateway
  local total=0 v
  for u in $(curl -sf "http://127.0.0.1:$PORT/admin/workers" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(" ".join(w["url"] for w in (d if isinstance(d, list) else d["workers"])))'); do
    v=$(metric "$u" "$1"); total=$(python3 -c "print($total + $v)")
  done
  echo "$total"
}

round() { # n pull(true|false)
  local dir="$OUT/r$1-pull-$2"
  RUST_LOG=warn PDGATE_SCHEDULER__REUSE__PULL=$2 PDGATE_UP__ENGINE__EXPORT_BLOCKS=$EXPORT_BLOCKS \
    PDGATE_UP__ENGINE__KV_BLOCKS=$KV_BLOCKS \
    "$PDGATE" up --prefill "$PREFILL" --decode "$DECODE" --time-scale "$TIME_SCALE" --port "$PORT" \
    > "$dir.up.log" 2>&1 &
  local up=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.2; done
  "$PDGATE" replay "$SPEC" --target "http://127.0.0.1:$PORT" --slo ttft=2000,tpot=100 --out "$dir" \
    > "$dir.txt" 2>&1
  local pulled engine_pulled failures
  pulled=$(metric "http://127.0.0.1:$PORT" pdgate_kv_pulled_blocks_total)
  engine_pulled=$(engine_sum pdgate_sim_kv_blocks_pulled_total)
  failures=$(engine_sum pdgate_sim_kv_pull_failures_total)
  kill -INT "$up"; wait "$up" || true
  python3 - "$dir/report.json" "$2" "$pulled" "$engine_pulled" "$failures" <<'PY' | tee -a "$OUT/rounds.tsv"
import json, sys
rep = json.load(open(sys.argv[1]))["aggregates"]
t = rep["ttft_ms"]
print("\t".join(str(x) for x in [
    "pull=" + sys.argv[2], "gateway_pulled_blocks=" + sys.argv[3],
    "engine_pulled_blocks=" + sys.argv[4], "pull_failures=" + sys.argv[5],
    "ttft_p50_ms=%.1f" % t["median"], "ttft_p90_ms=%.1f" % t["p90"],
    "goodput=%s" % rep.get("request_goodput"), "hit=%s" % rep.get("cache_hit_rate"), "ok=%s" % rep.get("completed"),
    "errors=%s" % sum(rep.get("errors", {}).values())]))
PY
}

: > "$OUT/rounds.tsv"
for n in $(seq 1 "$ROUNDS"); do
  if (( n % 2 )); then round "$n" false; round "$n" true; else round "$n" true; round "$n" false; fi
done
python3 - "$OUT/rounds.tsv" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split("\t")) for l in open(sys.argv[1]) if l.strip()]
for setting in ("false", "true"):
    rs = [r for r in rows if r["pull"] == setting]
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    print(f"pull={setting}: rounds {len(rs)}, TTFT p50 median {med('ttft_p50_ms'):.1f} ms, "
          f"p90 {med('ttft_p90_ms'):.1f} ms, gateway pulled blocks median {med('gateway_pulled_blocks'):.0f}")
off = [float(r["ttft_p50_ms"]) for r in rows if r["pull"] == "false"]
on = [float(r["ttft_p50_ms"]) for r in rows if r["pull"] == "true"]
if off and on:
    print(f"TTFT p50 ratio on/off (medians): {statistics.median(on) / statistics.median(off):.3f}")
PY
