"""Fixtures for the cross-process end-to-end tests: a real `pdgate up` process on loopback."""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    explicit = os.environ.get("PDGATE_BIN")
    if explicit:
        return explicit
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / "pdgate"
        if path.exists():
            return str(path)
    raise RuntimeError("pdgate binary not found: run `cargo build` first or set PDGATE_BIN")


def start_up(args, base, ready):
    """Starts `pdgate up ARGS` and waits until `ready(base)` says its /ready is true; the process."""
    proc = subprocess.Popen(
        [_binary(), "up", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pdgate up exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            if ready(base):
                return proc
        except (OSError, ValueError):
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("pdgate up did not become ready in 60 s")
        time.sleep(0.1)


def stop_up(proc):
    """SIGTERM, then requires a clean exit."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"pdgate up did not exit cleanly on SIGTERM (rc={proc.returncode})"


def _plain_ready(base):
    with urllib.request.urlopen(f"{base}/ready", timeout=1) as r:
        return json.load(r).get("ready")


@pytest.fixture(scope="session")
def gateway():
    """Starts `pdgate up` (2 prefill + 2 decode reference engines) and yields its base URL."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_up(["--port", str(port), "--time-scale", "0.01"], base, _plain_ready)
    yield base
    stop_up(proc)
