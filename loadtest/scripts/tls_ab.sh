#!/usr/bin/env bash
# What TLS on the client listener cost the gateway: gateway_ab.sh with FEATURE=tls (its header says how).
#
#   DURATION=8s ROUNDS=2 bash loadtest/scripts/tls_ab.sh
FEATURE=tls exec bash "$(dirname "$0")/gateway_ab.sh" "$@"
