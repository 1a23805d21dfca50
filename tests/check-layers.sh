#!/usr/bin/env bash
# The house rules the compiler alone does not keep.
#
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
# Discovery's clients (kube, k8s-openapi, hickory) and booking sync's broker client (async-nats)
# belong to the gateway alone.
for crate in pdgate-scheduler:'^(tokio|axum|hyper|reqwest|pdgate-transfer|kube|k8s-openapi|hickory-[a-z]+|async-nats) ' \
             pdgate-transfer:'^(axum|hyper|reqwest|pdgate-scheduler|pdgate-wire|kube|k8s-openapi|hickory-[a-z]+|async-nats) ' \
             pdgate-wire:'^(tokio|axum|hyper|reqwest|pdgate-|kube|k8s-openapi|hickory-[a-z]+|async-nats) ' \
             pdgate-engine-sim:'^(kube|k8s-openapi|hickory-[a-z]+|async-nats) '; do
  name=${crate%%:*}; pattern=${crate#*:}
  found=$(cargo tree -p "$name" -e normal --prefix none --locked | tail -n +2 | sort -u | grep -E "$pattern" || true)
  if [ -n "$found" ]; then
    echo "$name must not depend on:" >&2
    echo "$found" >&2
    exit 1
  fi
done

# The declared rust-version must be at least what every locked dependency built here needs.
cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
ver = lambda s: tuple((list(map(int, s.split("."))) + [0, 0])[:3])
ours = {p["rust_version"] for p in m["packages"] if p["source"] is None}
assert len(ours) == 1 and None not in ours, "every crate must inherit one rust-version: %s" % ours
declared = ours.pop()
# Dependencies only of targets never built here (wasm, windows) do not count.
nodes = {n["id"]: n for n in m["resolve"]["nodes"]}
built = {p["id"] for p in m["packages"] if p["source"] is None}
todo = list(built)
while todo:
    for d in nodes[todo.pop()]["deps"]:
        here = any(k["target"] is None or "unix" in k["target"] or "linux" in k["target"]
                   for k in d["dep_kinds"])
        if here and d["pkg"] not in built:
            built.add(d["pkg"])
            todo.append(d["pkg"])
need, name = max((ver(p["rust_version"]), p["name"]) for p in m["packages"]
                 if p["id"] in built and p["rust_version"])
if ver(declared) < need:
    sys.exit("rust-version %s is older than %s needs (%s)" % (declared, name, ".".join(map(str, need))))
print("rust-version %s: ok (%s needs %s)" % (declared, name, ".".join(map(str, need))))
'
# No import circles between the files of any crate: shared types live below their users.
for src in */src; do
  python3 tests/check_circles.py "$src" >/dev/null || { python3 tests/check_circles.py "$src" >&2; exit 1; }
done
echo "crate layers: ok"
