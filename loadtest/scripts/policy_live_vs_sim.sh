#!/usr/bin/env bash
# Live confirmation of the policy ranking: a slice of the trace replayed against `pdgate up`, one
# policy at a time, then the same slice simulated with the same parameters. Needs a release build.
set -u
cd "$(dirname "$0")/../.."
TRACE=${TRACE:-../shared/data/traces/synthetic_trace.jsonl}
for P in least_load cache_aware kv_cost slo; do
  PORT=18200
  RUST_LOG=warn PDGATE_UP__ENGINE__KV_BLOCKS=65536 PDGATE_UP__ENGINE__KV_BYTES_PER_TOKEN=1024 \
  PDGATE_SCHEDULER__SLO__TTFT_MS=500 PDGATE_SCHEDULER__SLO__TBT_MS=25 \
    ./target/release/pdgate up --prefill 4 --decode 4 --policy $P --time-scale 0.25 --port $PORT > /tmp/live-up-$P.log 2>&1 &
  UP=$!
  for i in $(seq 1 50); do curl -sf http://127.0.0.1:$PORT/ready >/dev/null && break; sleep 0.2; done
  ./target/release/pdgate replay "$TRACE" --target http://127.0.0.1:$PORT \
    --max-requests 400 --speed 8 --slo ttft=500,tpot=25 --out /tmp/live-$P > /tmp/live-$P.txt 2>&1
  kill -INT $UP; wait $UP
  echo "== $P"; grep -E "requests \(ok|goodput|hit rate|TTFT (median|p90)|errors" /tmp/live-$P.txt
done

echo "== simulated, same parameters"
./target/release/pdgate simulate "$TRACE" --max-requests 400 --speed 8 --time-scale 0.25 --prefill 4 --decode 4 \
  --policy least_load,cache_aware,kv_cost,slo --kv-blocks 65536 --kv-bytes-per-token 1024 --slo ttft=500,tpot=25 2>/dev/null \
  | grep -E "^ +least|requests \(ok|goodput|hit rate|TTFT (median|p90)|errors"
