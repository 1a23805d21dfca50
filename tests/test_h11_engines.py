"""The gateway's engine client against engines on uvicorn + h11 (what vLLM and SGLang serve with),
not only against the reference engine's own HTTP stack: content-length and chunked bodies, and
kept-alive connections that uvicorn closes after its idle timeout, which the gateway must replace
without failing a request."""

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import _binary, _free_port
from test_router_oracle import ENV, _post, _start, _stop

HERE = Path(__file__).resolve().parent


def _uvicorn(role: str):
    port = _free_port()
    cmd = [sys.executable, "-m", "uvicorn", "h11_vllm_engine:app", "--host", "127.0.0.1",
           "--port", str(port), "--http", "h11", "--timeout-keep-alive", "1", "--log-level", "warning"]
    env = dict(ENV, PDGATE_TEST_ROLE=role, PYTHONPATH=str(HERE))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"uvicorn {role} did not start: {proc.stdout.read()}")
            time.sleep(0.1)


def _stream(base: str, path: str, body: dict) -> list:
    status, text = _post(base, path, dict(body, stream=True))
    assert status == 200, text
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


def test_gateway_client_against_uvicorn_engines_with_idle_timeouts():
    pytest.importorskip("uvicorn")
    procs = []
    try:
        prefill, p_url = _uvicorn("prefill")
        procs.append(prefill)
        decode, d_url = _uvicorn("decode")
        procs.append(decode)
        port = _free_port()
        cfg = Path(tempfile.mkdtemp()) / "gw.toml"
        cfg.write_text(
            f'[server]\nport = {port}\n[model]\nname = "h11-model"\n'
            # No health or metrics polls reuse (and so refresh) pooled connections meanwhile.
            '[health]\ninterval_ms = 60000\nmetrics_interval_ms = 60000\n'
            f'[[workers]]\nurl = "{p_url}"\nrole = "prefill"\nprotocol = "vllm-nixl"\n'
            f'[[workers]]\nurl = "{d_url}"\nrole = "decode"\nprotocol = "vllm-nixl"\n')
        gw = f"http://127.0.0.1:{port}"
        procs.append(_start([_binary(), "serve", "--config", str(cfg)], "pdgate", f"{gw}/ready"))
        for attempt in range(3):
            status, text = _post(gw, "/v1/completions",
                                 {"model": "h11-model", "prompt": "hello " * 30, "max_tokens": 4})
            assert status == 200, text
            body = json.loads(text)
            # The 40 kB filler arrives over several reads: the whole body, byte for byte.
            assert body["choices"][0]["text"] == "alpha beta gamma delta", body["choices"]
            assert len(body["filler"]) == 40000
            events = _stream(gw, "/v1/chat/completions",
                             {"model": "h11-model", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 4})
            assert events[-1] == "[DONE]", events
            content = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                              for e in events[:-1] if json.loads(e)["choices"])
            assert content == "alpha beta gamma delta", events
            # uvicorn closes idle keep-alive connections after 1 s: the next round finds every
            # pooled connection closed by the engine and must still succeed.
            time.sleep(1.6)
    finally:
        _stop(procs)
