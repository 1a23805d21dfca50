#!/usr/bin/env bash
# Gateway overhead against the peer PD routers, in one run on this machine: a 2 prefill + 2 decode
# fleet of instant reference engines (`--time-scale 0`, so what is measured is the routers, not
# model time; KV_BYTES_PER_TOKEN=64 by default, so the engines' real KV copy over loopback, ~2 MB
# per request at the model default, does not eat the CPU the routers share; one async thread per
# engine), loaded with `wrk` (2 threads x 32 connections, ~1 KB prompt, max_tokens 8, unique
# prompts so nothing is served from a prefix cache) for DURATION each, ROUNDS times alternating:
#   direct        one decode engine, plain request (the floor every router adds to)
#   pdgate-sglang pdgate serve, sglang pools     vs  smg-sglang   sglang-router --pd-disaggregation
#   pdgate-vllm   pdgate serve, vllm-nixl pools  vs  vllm-router  vllm-router --vllm-pd-disaggregation
# each router under every policy setting in SETTINGS (both by default):
#   shipped       each router's own default policy, all three prefix-aware: pdgate `slo`, the
#                 peers `cache_aware`
#   round_robin   all three on `round_robin`, the cheapest policy each has
# Prints, per setting, a Markdown table of medians over the rounds (req/s, p50/p99, added p50/p99
# over direct, the router's and the fleet's CPU per request) and the ratios, with their range over
# the rounds. Needs: a release build (cargo build --release -p pdgate), wrk, sglang-router and
# vllm-router (pip); a missing router is skipped.
#
# MODES picks the engine modes to run (both by default: `sglang vllm`).
#
#   DURATION=8s ROUNDS=5 bash loadtest/scripts/router_compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PDGATE=${PDGATE:-target/release/pdgate}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
ROUND=1
OUT=${OUT:-target/router-compare}
BASE_PORT=${BASE_PORT:-18300}
PY=${PYTHON:-python3}
KV_BYTES_PER_TOKEN=${KV_BYTES_PER_TOKEN:-64}
SETTINGS=${SETTINGS:-shipped round_robin}
MODES=${MODES:-sglang vllm}
SCRIPTS=loadtest/scripts
export HF_ENDPOINT=http://127.0.0.1:9 HF_HUB_OFFLINE=1
rm -rf "$OUT" && mkdir -p "$OUT"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_ok() { # url what
  for _ in $(seq 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "$2 not ready at $1" >&2; exit 1
}
stop_all() { cleanup; PIDS=(); sleep 0.5; }

engines() { # protocol -> sets P1 P2 D1 D2
  local proto=$1 i=0
  ENGINE_PIDS=()
  for role in prefill prefill decode decode; do
    local port=$((BASE_PORT + i)); i=$((i + 1))
    # One async thread per engine, like the single event loop of vLLM's and SGLang's API servers:
    # four engines, a router and wrk share two cores, and idle worker threads only add switches.
    PDGATE_ENGINE_KV_BYTES_PER_TOKEN=$KV_BYTES_PER_TOKEN RUST_LOG=warn "$PDGATE" engine --worker-threads "${ENGINE_THREADS:-1}" \
      --role "$role" --protocol "$proto" --port "$port" \
      --time-scale 0 --bootstrap-timeout-ms 5000 >"$OUT/engine-$proto-$port.log" 2>&1 &
    PIDS+=($!)
    ENGINE_PIDS+=($!)
    wait_ok "http://127.0.0.1:$port/health" "$role engine"
  done
  P1=http://127.0.0.1:$BASE_PORT P2=http://127.0.0.1:$((BASE_PORT + 1))
  D1=http://127.0.0.1:$((BASE_PORT + 2)) D2=http://127.0.0.1:$((BASE_PORT + 3))
}

fleet_ticks() { # the four engines' CPU, in clock ticks
  local t=0
  for p in "${ENGINE_PIDS[@]}"; do t=$((t + $(cpu_ticks "$p"))); done
  echo "$t"
}

cpu_ticks() { # pid -> utime+stime of the process and its children threads, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

load() { # name url [router pid]
  # A short warm-up opens the connection pools before the measured run.
  wrk -t2 -c32 -d2s -s "$SCRIPTS/router_compare.lua" "$2" >/dev/null
  local before=0
  [ -n "${3:-}" ] && before=$(cpu_ticks "$3")
  local fleet_before
  fleet_before=$(fleet_ticks)
  wrk -t2 -c32 -d"$DURATION" --latency -s "$SCRIPTS/router_compare.lua" "$2" | tee "$OUT/$1.r$ROUND.txt"
  echo "Fleet CPU ticks: $(($(fleet_ticks) - fleet_before)) at $(getconf CLK_TCK)/s" >>"$OUT/$1.r$ROUND.txt"
  # The router's own CPU over the measured run: what it costs, whatever the shared box did.
  [ -n "${3:-}" ] && echo "Router CPU ticks: $(($(cpu_ticks "$3") - before)) at $(getconf CLK_TCK)/s" >>"$OUT/$1.r$ROUND.txt"
  # One connection: no queueing anywhere, so added latency is the router's own path.
  wrk -t1 -c1 -d"${LAT_DURATION:-5s}" --latency -s "$SCRIPTS/router_compare.lua" "$2" >"$OUT/$1.r$ROUND.c1"
}

policy() { # setting router(pdgate|peer) -> the policy that router runs under that setting
  case "$1" in
    shipped) [ "$2" = pdgate ] && echo slo || echo cache_aware ;;
    *) echo "$1" ;;
  esac
}

pdgate() { # protocol name setting
  local port=$((BASE_PORT + 10)) cfg="$OUT/pdgate-$1.toml"
  {
    printf '[server]\nport = %d\n[log]\nfilter = "warn"\n' "$port"
    # Routers compared here do no admission control; neither does pdgate in this run.
    printf '[scheduler]\npolicy = "%s"\n[scheduler.slo]\nadmission = false\n' "$(policy "$3" pdgate)"
    for u in "$P1" "$P2"; do printf '[[workers]]\nurl = "%s"\nrole = "prefill"\nprotocol = "%s"\n' "$u" "$1"; done
    for u in "$D1" "$D2"; do printf '[[workers]]\nurl = "%s"\nrole = "decode"\nprotocol = "%s"\n' "$u" "$1"; done
  } >"$cfg"
  # PDGATE_THREADS: pdgate's async threads (default: one per core, as shipped).
  RUST_LOG=warn "$PDGATE" serve ${PDGATE_THREADS:+--worker-threads "$PDGATE_THREADS"} \
    --config "$cfg" >"$OUT/$2.log" 2>&1 &
  PIDS+=($!)
  wait_ok "http://127.0.0.1:$port/ready" "pdgate"
  load "$2" "http://127.0.0.1:$port" "${PIDS[-1]}"
  curl -s "http://127.0.0.1:$port/metrics" | grep -E '^pdgate_(requests|legs)_total' >"$OUT/$2.metrics" || true
}

# One setting's pair of runs: pdgate in `protocol` mode and the peer (`peer` SETTING), the peer
# only if `check...` succeeds (it is installed). Odd rounds run pdgate first, even rounds the
# peer, so a drift of the machine's speed within a round favours neither.
pair() { # protocol setting peer check...
  local proto=$1 s=$2 peer=$3 first second
  shift 3
  if (( ROUND % 2 )); then first=ours second=peer; else first=peer second=ours; fi
  for who in $first $second; do
    if [ "$who" = ours ]; then
      echo "== round $ROUND, $s: pdgate, $proto"
      pdgate "$proto" "pdgate-${proto%%-*}-$s" "$s"
      stop_last
    elif "$@" >/dev/null 2>&1; then
      echo "== round $ROUND, $s: $peer"
      "$peer" "$s"
    fi
  done
}

stop_last() { kill "${PIDS[-1]}" 2>/dev/null || true; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }

smg() { # setting
  local port=$((BASE_PORT + 11))
  # The reference engine serves its bootstrap endpoint on its HTTP port.
  "$PY" -m sglang_router.launch_router --pd-disaggregation --host 127.0.0.1 --port "$port" \
    --prefill "$P1" "${P1##*:}" --prefill "$P2" "${P2##*:}" --decode "$D1" --decode "$D2" \
    --policy "$(policy "$1" peer)" --log-level warn >"$OUT/smg-sglang-$1.log" 2>&1 &
  PIDS+=($!)
  wait_ok "http://127.0.0.1:$port/health" "sglang-router"
  load "smg-sglang-$1" "http://127.0.0.1:$port" "${PIDS[-1]}"
  stop_last
}

vllm_router() { # setting
  local port=$((BASE_PORT + 12))
  vllm-router --vllm-pd-disaggregation --host 127.0.0.1 --port "$port" \
    --prefill "$P1" --prefill "$P2" --decode "$D1" --decode "$D2" \
    --policy "$(policy "$1" peer)" --log-level warning \
    >"$OUT/vllm-router-$1.log" 2>&1 &
  PIDS+=($!)
  wait_ok "http://127.0.0.1:$port/health" "vllm-router"
  load "vllm-router-$1" "http://127.0.0.1:$port" "${PIDS[-1]}"
  stop_last
}

# Rounds alternate the routers on one fleet, so a slow spell of this shared machine hits both;
# the report takes each figure's median over the rounds.
# The report names each setting's policies from here, so the mapping lives in one place.
for S in $SETTINGS; do echo "$S $(policy "$S" pdgate) $(policy "$S" peer)"; done >"$OUT/settings.txt"

# --- SGLang mode -------------------------------------------------------------------------------
# The direct baseline runs on the SGLang fleet, so it runs whenever the report needs it.
engines sglang
for ROUND in $(seq "$ROUNDS"); do
  echo "== round $ROUND: direct (one decode engine, plain request)"
  load direct "$D1"
  [[ " $MODES " == *" sglang "* ]] || continue
  for S in $SETTINGS; do pair sglang "$S" smg "$PY" -c 'import sglang_router'; done
done
stop_all

# --- vLLM mode ---------------------------------------------------------------------------------
if [[ " $MODES " == *" vllm "* ]]; then
  engines vllm-nixl
  for ROUND in $(seq "$ROUNDS"); do
    for S in $SETTINGS; do pair vllm-nixl "$S" vllm_router command -v vllm-router; done
  done
  stop_all
fi

echo
"$PY" "$SCRIPTS/router_compare_report.py" "$OUT" | tee "$OUT/table.md"
