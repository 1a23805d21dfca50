#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit + integration) and the cross-process end-to-end tests
# with the real OpenAI Python client. Installs what the Python tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

# System packages for the transfer crate's optional features: rdma (libibverbs/librdmacm headers,
# pkg-config and libclang for rdma-sys's build script) and etcd (a real etcd server for the metadata-store test).
# Skipped when already present, so a developer machine is not touched.
need=()
for pkg in pkg-config libibverbs-dev librdmacm-dev libclang-dev etcd-server; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "missing ${need[*]}: the transfer crate's rdma/etcd feature tests need them" >&2
    exit 1
  fi
fi

cargo build --workspace --all-targets --locked
cargo test --workspace --locked
# The transfer engine's optional features: the RDMA verbs layer must build and its
# verbs-independent logic pass (PDGATE_TEST_RDMA=1 also runs the conformance suite on RDMA where
# a device exists); the etcd metadata store runs against a real etcd.
cargo test -p pdgate-transfer --locked --features rdma,etcd
PDGATE_BIN="$PWD/target/debug/pdgate" python3 -m pytest -q tests
