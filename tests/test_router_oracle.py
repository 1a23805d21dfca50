"""Oracle check of the engine emulation: the real PD routers from PyPI (the SGLang model gateway,
`sglang-router`, in PD mode; `vllm-router` in vLLM PD mode) front reference engines started with
`pdgate engine --protocol sglang|vllm-nixl` and must work unchanged: 200, the engines' text, exact
usage. If the emulation drifted from what the real routers speak, these fail."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import _binary, _free_port

MODEL = "pdgate-sim-8b"
ENV = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1", RUST_LOG="warn")


def _wait(url: str, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"{what} exited early:\n{out[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready at {url}")


def _start(cmd, what, health):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        _wait(health, proc, what)
    except Exception:
        proc.kill()
        raise
    return proc


def _engines(protocol: str):
    procs, urls = [], {"prefill": [], "decode": []}
    for role in ("prefill", "decode"):
        port = _free_port()
        cmd = [_binary(), "engine", "--role", role, "--protocol", protocol, "--port", str(port),
               "--time-scale", "0", "--bootstrap-timeout-ms", "5000"]
        url = f"http://127.0.0.1:{port}"
        procs.append(_start(cmd, f"{role} engine", f"{url}/health"))
        urls[role].append(url)
    return procs, urls


def _post(base: str, path: str, body: dict):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read().decode()


def _check(base: str):
    status, text = _post(base, "/v1/completions",
                         {"model": MODEL, "prompt": "oracle check " * 40, "max_tokens": 6})
    assert status == 200, text
    body = json.loads(text)
    assert body["usage"]["completion_tokens"] == 6, body
    assert body["choices"][0]["text"].strip(), body
    status, text = _post(base, "/v1/chat/completions",
                         {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 50}],
                          "max_tokens": 4, "stream": True})
    assert status == 200, text
    events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    content = "".join((json.loads(e)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                      for e in events[:-1])
    assert content.strip(), events
    return body


def _verified(urls):
    total = 0.0
    for u in urls:
        with urllib.request.urlopen(f"{u}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("pdgate_sim_kv_blocks_verified_total"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def _stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.mark.skipif(shutil.which("smg") is None and not shutil.which("python3"), reason="no python")
def test_sglang_router_pd_mode_against_sglang_engines():
    pytest.importorskip("sglang_router")
    procs, urls = _engines("sglang")
    port = _free_port()
    prefill_port = urls["prefill"][0].rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
           "--host", "127.0.0.1", "--port", str(port),
           "--prefill", urls["prefill"][0], prefill_port, "--decode", urls["decode"][0],
           "--policy", "round_robin"]
    try:
        procs.append(_start(cmd, "sglang router", f"http://127.0.0.1:{port}/health"))
        _check(f"http://127.0.0.1:{port}")
        assert _verified(urls["decode"]) > 0, "KV really moved through the emulated handoff"
    finally:
        _stop(procs)


def test_vllm_router_pd_mode_against_vllm_nixl_engines():
    if shutil.which("vllm-router") is None:
        pytest.skip("vllm-router not installed")
    procs, urls = _engines("vllm-nixl")
    port = _free_port()
    cmd = ["vllm-router", "--vllm-pd-disaggregation", "--host", "127.0.0.1", "--port", str(port),
           "--prefill", urls["prefill"][0], "--decode", urls["decode"][0],
           "--prefill-policy", "round_robin", "--decode-policy", "round_robin"]
    try:
        procs.append(_start(cmd, "vllm-router", f"http://127.0.0.1:{port}/health"))
        _check(f"http://127.0.0.1:{port}")
        assert _verified(urls["decode"]) > 0, "KV really moved through the emulated handoff"
    finally:
        _stop(procs)
