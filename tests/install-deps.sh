#!/usr/bin/env bash
# Installs what the tests need on a fresh machine: the Python packages of the end-to-end tests,
# and the system packages of the transfer crate's optional features — rdma (libibverbs/librdmacm
# headers, pkg-config and libclang for rdma-sys's build script) and etcd (a real etcd server for
# the metadata-store test); dnsmasq-base (a real DNS server for the gateway's DNS discovery test);
# nats-server (a real broker for the booking-sync test between gateway replicas). System packages
# already present are not touched.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

need=()
for pkg in pkg-config libibverbs-dev librdmacm-dev libclang-dev etcd-server dnsmasq-base nats-server; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "missing ${need[*]}: the rdma/etcd feature tests, the DNS discovery test and the replica booking-sync test need them" >&2
    exit 1
  fi
fi
