#!/usr/bin/env bash
# The gateway library's normal dependencies must not include the reference engine, the load tools
# or the HTTP client, plotting and progress crates they bring. The compiler already refuses an
# import of a crate that is not a dependency; this refuses the dependency itself.
set -euo pipefail
cd "$(dirname "$0")/.."

forbidden='^(pdgate-engine-sim|pdgate-loadtest|pdgate|reqwest|plotters|indicatif) '
found=$(cargo tree -p pdgate-gateway -e normal --prefix none --locked | sort -u | grep -E "$forbidden" || true)
if [ -n "$found" ]; then
  echo "pdgate-gateway must not depend on:" >&2
  echo "$found" >&2
  exit 1
fi
# The scheduler stays free of I/O and async runtimes; the transfer engine of HTTP servers and LLMs.
for crate in pdgate-scheduler:'^(tokio|axum|hyper|reqwest|pdgate-transfer) ' \
             pdgate-transfer:'^(axum|hyper|reqwest|pdgate-scheduler|pdgate-wire) ' \
             pdgate-wire:'^(tokio|axum|hyper|reqwest|pdgate-) '; do
  name=${crate%%:*}; pattern=${crate#*:}
  found=$(cargo tree -p "$name" -e normal --prefix none --locked | tail -n +2 | sort -u | grep -E "$pattern" || true)
  if [ -n "$found" ]; then
    echo "$name must not depend on:" >&2
    echo "$found" >&2
    exit 1
  fi
done
echo "crate layers: ok"
