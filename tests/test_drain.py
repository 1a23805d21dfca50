"""Graceful drain of a real `pdgate up` process on SIGTERM (issue 15): `/ready` turns false at
once, a new request gets 503 with `Retry-After`, the stream already under way finishes whole,
and the process exits 0."""

import json
import signal
import urllib.error
import urllib.request

import httpx

from conftest import _free_port, start_up, stop_up


def _ready(base):
    with urllib.request.urlopen(f"{base}/ready", timeout=1) as r:
        return json.load(r).get("ready")


def test_sigterm_drains_in_flight_and_refuses_new_work():
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # Real time: each decode step takes milliseconds, so 500 tokens stream for a while.
    proc = start_up(["--port", str(port), "--time-scale", "1"], base, _ready)
    try:
        body = {
            "model": "pdgate-sim-8b",
            "messages": [{"role": "user", "content": "drain me"}],
            "max_tokens": 500,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{base}/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert first != "data: [DONE]"
                proc.send_signal(signal.SIGTERM)

                # At once: not ready, and new work is refused with a hint to come back.
                status = None
                for _ in range(100):
                    r = httpx.get(f"{base}/ready", timeout=5)
                    if r.json().get("draining"):
                        status = r.status_code
                        break
                assert status == 503, "ready turned false while draining"
                refused = httpx.post(
                    f"{base}/v1/chat/completions",
                    json={**body, "stream": False, "max_tokens": 2},
                    timeout=5,
                )
                assert refused.status_code == 503, refused.text
                assert refused.headers.get("retry-after"), refused.headers
                assert refused.json()["error"]["code"] == "gateway_draining"

                # The stream under way finishes whole.
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        usage = json.loads(rest[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 500, usage
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            stop_up(proc)
