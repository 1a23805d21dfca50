#!/usr/bin/env bash
# What one gateway feature costs per request: the same fleet of 2 prefill + 2 decode instant
# reference engines (`--time-scale 0`, native protocol, one async thread each, 64 bytes of KV per
# token as in router_compare.sh), each its own process so the gateway's CPU is its own, and
# `pdgate serve` in front of it started alternately with the feature off and on. FEATURE is
#   auth  on: three API keys (requests use one) and [server.rate_limit] with a rate, a burst and
#         a concurrency budget too large to refuse anything: every request pays the key lookup,
#         its token bucket and its concurrency slot (held to the body's end)
#   tls   on: [server.tls] with a self-signed P-256 certificate (openssl), TLS 1.3; wrk keeps its
#         connections alive, so this is record encryption's steady-state cost, not handshakes'
# ROUNDS times (off, on, off, on, ...), each loaded by `wrk -t2 -c32` for DURATION after a 2 s
# warm-up, with router_compare.lua's unique ~1 KB prompts. Prints req/s and the gateway
# process's CPU clock ticks per request (utime + stime from /proc/<pid>/stat).
#
#   FEATURE=tls DURATION=8s ROUNDS=2 bash loadtest/scripts/gateway_ab.sh
#   (auth_ab.sh and tls_ab.sh run it with FEATURE set)
set -euo pipefail
cd "$(dirname "$0")/../.."
PDGATE=${PDGATE:-target/release/pdgate}
DURATION=${DURATION:-8s}
ROUNDS=${ROUNDS:-2}
FEATURE=${FEATURE:-auth}
OUT=${OUT:-target/$FEATURE-ab}
BASE_PORT=${BASE_PORT:-18400}
SCRIPTS=loadtest/scripts
rm -rf "$OUT" && mkdir -p "$OUT"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_ok() { # url what
  for _ in $(seq 300); do curl -ksf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "$2 not ready at $1" >&2; exit 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

if [ "$FEATURE" = tls ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null
fi

URLS=()
i=0
for role in prefill prefill decode decode; do
  port=$((BASE_PORT + i)); i=$((i + 1))
  PDGATE_ENGINE_KV_BYTES_PER_TOKEN=64 RUST_LOG=warn "$PDGATE" engine --worker-threads 1 \
    --role "$role" --port "$port" --time-scale 0 >"$OUT/engine-$port.log" 2>&1 &
  PIDS+=($!)
  wait_ok "http://127.0.0.1:$port/health" "$role engine"
  URLS+=("$role http://127.0.0.1:$port")
done

GW_PORT=$((BASE_PORT + 10))
config() { # off|on -> file
  local cfg="$OUT/gateway-$1.toml"
  {
    printf '[server]\nport = %d\n' "$GW_PORT"
    if [ "$1" = on ] && [ "$FEATURE" = tls ]; then
      printf '[server.tls]\ncert_file = "%s"\nkey_file = "%s"\n' "$PWD/$OUT/cert.pem" "$PWD/$OUT/key.pem"
    elif [ "$1" = on ]; then
      printf 'api_keys = ["sk-bench-a", "sk-bench-b", "sk-bench-c"]\n'
      printf '[server.rate_limit]\nrequests_per_second = 1000000.0\nburst = 1000000\nmax_concurrent = 10000\n'
    fi
    printf '[log]\nfilter = "warn"\n[scheduler.slo]\nadmission = false\n'
    for u in "${URLS[@]}"; do
      printf '[[workers]]\nurl = "%s"\nrole = "%s"\nprotocol = "native"\n' "${u#* }" "${u%% *}"
    done
  } >"$cfg"
  echo "$cfg"
}

run() { # off|on round
  local cfg auth=() scheme=http
  cfg=$(config "$1")
  if [ "$1" = on ] && [ "$FEATURE" = tls ]; then
    scheme=https
  elif [ "$1" = on ]; then
    auth=(-H "Authorization: Bearer sk-bench-b")
  fi
  RUST_LOG=warn "$PDGATE" serve --config "$cfg" >"$OUT/gateway-$1-$2.log" 2>&1 &
  local gw=$!
  PIDS+=($gw)
  wait_ok "$scheme://127.0.0.1:$GW_PORT/ready" "gateway ($1)"
  wrk -t2 -c32 -d2s "${auth[@]}" -s "$SCRIPTS/router_compare.lua" "$scheme://127.0.0.1:$GW_PORT" >/dev/null
  local before after
  before=$(cpu_ticks "$gw")
  wrk -t2 -c32 -d"$DURATION" "${auth[@]}" -s "$SCRIPTS/router_compare.lua" \
    "$scheme://127.0.0.1:$GW_PORT" >"$OUT/wrk-$1-$2.txt"
  after=$(cpu_ticks "$gw")
  kill "$gw"; wait "$gw" 2>/dev/null || true
  local reqs rps non2xx
  reqs=$(awk '/requests in/ {print $1}' "$OUT/wrk-$1-$2.txt")
  rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/wrk-$1-$2.txt")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$OUT/wrk-$1-$2.txt")
  printf '| %s | %s | %s | %s | %d | %.4f |\n' "$2" "$1" "$rps" "${non2xx:-0}" \
    "$((after - before))" "$(echo "($after - $before) / $reqs" | bc -l)"
  sleep 1
}

echo "| round | $FEATURE | req/s | non-2xx | gateway CPU ticks ($(getconf CLK_TCK)/s) | ticks/request |"
echo "|---|---|---:|---:|---:|---:|"
for r in $(seq "$ROUNDS"); do
  run off "$r"
  run on "$r"
done
