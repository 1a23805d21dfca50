#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit + integration) and the cross-process end-to-end tests
# with the real OpenAI Python client. Installs what the Python tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

cargo build --workspace --all-targets --locked
cargo test --workspace --locked
PDGATE_BIN="$PWD/target/debug/pdgate" python3 -m pytest -q tests
