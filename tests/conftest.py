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


@pytest.fixture(scope="session")
def gateway():
    """Starts `pdgate up` (2 prefill + 2 decode reference engines) and yields its base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [_binary(), "up", "--port", str(port), "--time-scale", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pdgate up exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=1) as r:
                if json.load(r).get("ready"):
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("pdgate up did not become ready in 60 s")
        time.sleep(0.1)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"pdgate up did not exit cleanly on SIGTERM (rc={proc.returncode})"
