#!/usr/bin/env bash
# KV reuse across instances in virtual time: every policy × tight (4,096) and roomy (65,536)
# caches × the public trace at 2× and a multi-turn ~10k-token spec at 2× and 4×, with pulls on
# (`[reuse] pull = true`) and off (the default; the same code otherwise). Prints one table per
# run (loadtest/scripts/reuse_table.py) and the pooled-LRU bound.
#
# Usage: PDGATE=target/release/pdgate TRACE=../shared/data/traces/synthetic_trace.jsonl \
#        OUT=/tmp/reuse bash loadtest/scripts/reuse_sim.sh
set -euo pipefail
PDGATE=${PDGATE:-target/release/pdgate}
TRACE=${TRACE:-../shared/data/traces/synthetic_trace.jsonl}
OUT=${OUT:-/tmp/pdgate-reuse}
HERE=$(cd "$(dirname "$0")" && pwd)
SPEC="synthetic:requests=2000,rate=1,input=3000,input_sd=600,output=128,output_sd=32,groups=16,prefix=1024,turns=4"
mkdir -p "$OUT"
printf '[reuse]\npull = true\n' > "$OUT/pull-on.toml"
printf '[reuse]\npull = false\n' > "$OUT/pull-off.toml"

run() { # name source speed blocks pulls
  local extra=(--scheduler-config "$OUT/pull-$5.toml")
  "$PDGATE" simulate "$2" --prefill 4 --decode 4 --policy all --kv-blocks "$4" --speed "$3" \
    --slo ttft=2000,tpot=100 "${extra[@]}" --out "$OUT/$1" > "$OUT/$1.log" 2>&1
  echo "### $1 (speed $3, $4 blocks/engine, pulls $5)"
  python3 "$HERE/reuse_table.py" "$OUT/$1/report.json" --pooled
  echo
}

for blocks in 4096 65536; do
  for pulls in on off; do
    run "trace_s2_${blocks}_$pulls" "$TRACE" 2 "$blocks" "$pulls"
    run "mt_s2_${blocks}_$pulls" "$SPEC" 2 "$blocks" "$pulls"
    run "mt_s4_${blocks}_$pulls" "$SPEC" 4 "$blocks" "$pulls"
  done
done
