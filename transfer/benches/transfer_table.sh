#!/usr/bin/env bash
# docs/transfer.md's transfer-engine table in one run: throughput of tcp and shm against their baselines
# (a plain loopback socket copy and a single memcpy of the same bytes), 4 KiB latency, and the
# slice-size sweep behind DEFAULT_SLICE_SIZE. Usage: transfer/benches/transfer_table.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-3}
cargo build --release -q -p pdgate || [ -x target/release/pdgate ]
B="target/release/pdgate transfer-bench --loopback --json --duration $D"
{
  $B --transport tcp --block-size 1MiB --batch-size 16 --threads 1 --baseline
  $B --transport shm --block-size 1MiB --batch-size 16 --threads 1 --baseline
  $B --transport tcp --block-size 1MiB --batch-size 16 --threads 1 --operation read
  $B --transport shm --block-size 1MiB --batch-size 16 --threads 1 --operation read
  $B --transport tcp --block-size 4KiB --batch-size 1 --threads 1
  $B --transport shm --block-size 4KiB --batch-size 1 --threads 1
  for s in 64KiB 256KiB 1MiB 4MiB; do
    $B --transport tcp --block-size 4MiB --batch-size 8 --threads 1 --slice-size $s | sed "s/^{/{\"slice\":\"$s\",/"
  done
} | python3 -c '
import json, sys
print("| transport | op | block x batch | slice | GB/s | baseline GB/s | ratio | p50 us | p99 us |")
print("|---|---|---|---|---|---|---|---|---|")
for line in sys.stdin:
    r = json.loads(line)
    base = "%s %.2f" % (r["baseline"], r["baseline_gb_per_s"]) if "baseline" in r else ""
    ratio = "%.2f" % r["ratio"] if "ratio" in r else ""
    blk = r["block_size"]
    blk = "%d KiB" % (blk >> 10) if blk < (1 << 20) else "%d MiB" % (blk >> 20)
    print("| %s | %s | %s x %d | %s | %.2f | %s | %s | %.0f | %.0f |" % (
        r["transport"], r["op"], blk, r["batch_size"], r.get("slice", "1MiB"),
        r["gb_per_s"], base, ratio, r["latency_us_p50"], r["latency_us_p99"]))
'
