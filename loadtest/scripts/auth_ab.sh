#!/usr/bin/env bash
# What API keys and per-key limits cost the gateway: gateway_ab.sh with FEATURE=auth (its header says how).
#
#   DURATION=8s ROUNDS=2 bash loadtest/scripts/auth_ab.sh
FEATURE=auth exec bash "$(dirname "$0")/gateway_ab.sh" "$@"
