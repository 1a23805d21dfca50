#!/usr/bin/env bash
# Two pdgate builds side by side: runs router_compare.sh with build A and with build B in turn,
# RUNS times (A first in odd runs, B first in even ones, so drift over the run favours neither),
# and prints every run's table under its build's name. Both builds face the same peer router, so
# each table's ratios (req/s, added p50, router CPU per request) compare the builds through it.
#
#   A=old/target/release/pdgate B=target/release/pdgate RUNS=2 \
#     MODES=sglang SETTINGS=shipped ROUNDS=2 DURATION=8s bash loadtest/scripts/build_ab.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${A:?path of build A's pdgate}" "${B:?path of build B's pdgate}"
RUNS=${RUNS:-2}
OUT_AB=${OUT_AB:-target/build-ab}
export MODES=${MODES:-sglang} SETTINGS=${SETTINGS:-shipped} ROUNDS=${ROUNDS:-2}
rm -rf "$OUT_AB" && mkdir -p "$OUT_AB"
for run in $(seq "$RUNS"); do
  order="A B"
  [ $((run % 2)) = 0 ] && order="B A"
  for which in $order; do
    bin=$A
    [ "$which" = B ] && bin=$B
    echo "== run $run, build $which ($bin)"
    PDGATE=$bin OUT="$OUT_AB/$which.$run" bash loadtest/scripts/router_compare.sh \
      >"$OUT_AB/$which.$run.log" 2>&1
  done
done
for which in A B; do
  for run in $(seq "$RUNS"); do
    echo
    echo "### build $which, run $run"
    cat "$OUT_AB/$which.$run/table.md"
  done
done
