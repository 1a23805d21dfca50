#!/usr/bin/env bash
# Can a gateway ask the Mooncake Store master which block keys exist? Starts the real
# `mooncake_master` (PyPI mooncake-transfer-engine-non-cuda) on loopback, puts two keys through its
# Python client, and asks its HTTP admin port: GET /get_all_keys and GET /query_key?key=K.
#
# Usage: MC_BIN=/path/to/venv/bin bash loadtest/scripts/mooncake_master_keys.sh
set -euo pipefail
MC_BIN=${MC_BIN:-$(dirname "$(command -v mooncake_master)")}
# The pip entry points are wrappers around the packaged binaries; run those, so the pid we stop
# is theirs.
MC_PKG=$("$MC_BIN/python" -c 'import mooncake, os; print(os.path.dirname(mooncake.__file__))')
ADMIN=19003
"$MC_PKG/mooncake_master" --rpc_port=50151 --metrics_host=127.0.0.1 --metrics_port=$ADMIN \
  --enable_http_metadata_server=true --http_metadata_server_host=127.0.0.1 \
  --http_metadata_server_port=18081 > /dev/null 2>&1 &
master=$!
trap 'kill $master 2>/dev/null' EXIT
sleep 3
"$MC_BIN/python" - <<'PY'
from mooncake.store import MooncakeDistributedStore
import urllib.request, urllib.error
s = MooncakeDistributedStore()
assert s.setup("127.0.0.1", "http://127.0.0.1:18081/metadata", 64 << 20, 16 << 20, "tcp", "", "127.0.0.1:50151") == 0
for k in ("blk-00a1", "blk-00a2"):
    assert s.put(k, b"x" * 4096) == 0
get = lambda path: urllib.request.urlopen("http://127.0.0.1:19003" + path, timeout=3).read().decode()
print("GET /get_all_keys ->", sorted(get("/get_all_keys").split()))
print("GET /query_key?key=blk-00a1 ->", get("/query_key?key=blk-00a1"))
try:
    get("/query_key?key=absent")
except urllib.error.HTTPError as e:
    print("GET /query_key?key=absent ->", e.code)
s.close()
PY
