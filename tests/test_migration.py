"""Mid-stream migration seen by the real OpenAI client (issue 15): three `pdgate engine`
processes behind `pdgate serve`; the decode streaming an answer is killed (SIGKILL) part-way, and
the client still reads one uninterrupted answer, the same text and `usage` as a run nobody
interrupted (the reference engine's generation is a function of the token sequence)."""

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request

import openai

from conftest import _binary, _free_port

MODEL = "pdgate-sim-8b"


def _get(url):
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.load(r)


def _wait(cond, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _engine(role):
    port = _free_port()
    # Slow decode steps (~60 ms) so the kill lands mid-stream.
    proc = subprocess.Popen(
        [_binary(), "engine", "--role", role, "--protocol", "native", "--time-scale", "10",
         "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: urllib.request.urlopen(f"{url}/health", timeout=1).status == 200, f"{role} up")
    return proc, url


def _healthy(base, url):
    return any(w["url"] == url and w["healthy"] for w in _get(f"{base}/admin/workers"))


def _answer(stream):
    """Text, usage, ids and role count of a streamed chat answer."""
    text, usage, ids, roles = "", None, set(), 0
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            assert usage is None, "one usage chunk"
            usage = chunk.usage
        for choice in chunk.choices:
            roles += choice.delta.role is not None
            text += choice.delta.content or ""
        yield text, usage, ids, roles


def test_a_decode_killed_mid_stream_is_continued_in_the_same_stream():
    engines = [_engine("prefill"), _engine("decode"), _engine("decode")]
    (_, prefill), (d1_proc, d1), (_, d2) = engines
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(
            f"""
[server]
host = "127.0.0.1"
port = {port}
[scheduler]
policy = "round_robin"
[health]
interval_ms = 200
timeout_ms = 300
[upstream]
migration_limit = 1
[[workers]]
url = "{prefill}"
role = "prefill"
protocol = "native"
[[workers]]
url = "{d1}"
role = "decode"
protocol = "native"
"""
        )
        config = f.name
    gw = subprocess.Popen([_binary(), "serve", "--config", config],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _get(f"{base}/ready").get("ready"), "gateway ready")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        ask = dict(
            model=MODEL,
            messages=[{"role": "user", "content": "migrate me"}],
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        *_, reference = _answer(client.chat.completions.create(**ask))
        ref_text, ref_usage, ref_ids, _ = reference
        assert ref_usage.completion_tokens == 40

        killed = False
        last = None
        for last in _answer(client.chat.completions.create(**ask)):
            text = last[0]
            if not killed and len(text.split()) >= 5:
                # Only now a second decode exists: the stream is on the first one.
                req = urllib.request.Request(
                    f"{base}/admin/workers",
                    data=json.dumps({"url": d2, "role": "decode", "protocol": "native"}).encode(),
                    headers={"content-type": "application/json"},
                    method="POST",
                )
                urllib.request.urlopen(req, timeout=5).close()
                _wait(lambda: _healthy(base, d2), "second decode healthy")
                d1_proc.send_signal(signal.SIGKILL)
                killed = True
        assert killed, "the kill landed mid-stream"
        text, usage, ids, roles = last
        assert text == ref_text
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            ref_usage.prompt_tokens, ref_usage.completion_tokens, ref_usage.total_tokens)
        assert len(ids) == 1 and roles == 1, (ids, roles)
        with urllib.request.urlopen(f"{base}/metrics", timeout=2) as r:
            metrics = r.read().decode()
        assert any(line.startswith("pdgate_migrations_total") and 'outcome="ok"' in line
                   and line.endswith(" 1") for line in metrics.splitlines()), metrics
    finally:
        gw.terminate()
        gw.wait(timeout=15)
        for proc, _ in engines:
            proc.kill()
            proc.wait()
        os.unlink(config)
