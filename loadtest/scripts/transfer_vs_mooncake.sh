#!/usr/bin/env bash
# pdgate's transfer engine beside Mooncake's own `transfer_engine_bench`, same block and batch
# sizes, one run each, two processes over loopback: pdgate tcp and shm, Mooncake tcp (the
# transport its PyPI build without CUDA has). Mooncake's bench comes from
# `pip install mooncake-transfer-engine-non-cuda` (with its `mooncake_http_metadata_server`).
#
# Usage: PDGATE=target/release/pdgate MC_BIN=/path/to/venv/bin \
#        BLOCK=1MiB BATCH=16 OP=write DURATION=3 bash loadtest/scripts/transfer_vs_mooncake.sh
set -euo pipefail
PDGATE=${PDGATE:-target/release/pdgate}
MC_BIN=${MC_BIN:-$(dirname "$(command -v transfer_engine_bench)")}
# The pip entry points are wrappers around the packaged binaries; run those, so the pid we stop
# is theirs.
MC_PKG=$("$MC_BIN/python" -c 'import mooncake, os; print(os.path.dirname(mooncake.__file__))')
BLOCK=${BLOCK:-1MiB}
BATCH=${BATCH:-16}
OP=${OP:-write}
DURATION=${DURATION:-3}
OUT=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$OUT"; }
trap cleanup EXIT

bytes() { # 1MiB -> 1048576, 4KiB -> 4096
  local n=${1%[KMG]iB}
  case $1 in *KiB) echo $((n * 1024)) ;; *MiB) echo $((n * 1048576)) ;; *GiB) echo $((n * 1073741824)) ;; *) echo "$1" ;; esac
}

for transport in tcp shm; do
  port=$((17900 + RANDOM % 50))
  "$PDGATE" transfer-bench --role target --listen "127.0.0.1:$port" --transport "$transport" --no-auth \
    > "$OUT/pd-target-$transport.log" 2>&1 &
  pids+=($!)
  sleep 1
  gbps=$("$PDGATE" transfer-bench --target "127.0.0.1:$port" --transport "$transport" --no-auth \
    --operation "$OP" --block-size "$BLOCK" --batch-size "$BATCH" --threads 1 --duration "$DURATION" --json \
    | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["gb_per_s"])')
  echo "| pdgate | $transport | $BLOCK × $BATCH | $OP | $gbps |"
done

"$MC_BIN/mooncake_http_metadata_server" --host 127.0.0.1 --port 18080 > "$OUT/meta.log" 2>&1 &
pids+=($!)
sleep 1
common=(--protocol=tcp --metadata_server=http://127.0.0.1:18080/metadata --buffer_size=268435456)
"$MC_PKG/transfer_engine_bench" --mode=target "${common[@]}" --local_server_name=127.0.0.1:17801 \
  > "$OUT/mc-target.log" 2>&1 &
pids+=($!)
sleep 3
"$MC_PKG/transfer_engine_bench" --mode=initiator "${common[@]}" --local_server_name=127.0.0.1:17802 \
  --segment_id=127.0.0.1:17801 --operation="$OP" --block_size="$(bytes "$BLOCK")" --batch_size="$BATCH" \
  --threads=1 --duration="$DURATION" > "$OUT/mc-initiator.log" 2>&1
gbps=$(grep -o 'throughput [0-9.]* GB/s' "$OUT/mc-initiator.log" | awk '{print $2}')
echo "| Mooncake transfer_engine_bench | tcp | $BLOCK × $BATCH | $OP | $gbps |"
