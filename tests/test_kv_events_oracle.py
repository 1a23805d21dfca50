"""KV events from a publisher written from vLLM's spec (pyzmq + msgpack), read by a real `pdgate
serve`: both encodings (the newer map one and the older positional one), int and bytes block
hashes, a removal, a batch lost on the PUB socket that the gateway must fetch from the ROUTER
replay socket, a payload that is not MessagePack, and AllBlocksCleared.

vLLM's own publisher (`vllm.distributed.kv_events`) cannot be the oracle here: the module imports
`vllm.config` and `vllm.v1.core.kv_cache_utils`, which need torch. What it sends is restated below:
multipart `[topic, seq as 8-byte big-endian, payload]`; replay requests `[identity, "", start]` on a
ROUTER answered with `[identity, "", seq, payload]` frames and a final seq of -1; msgspec tagged
unions (tag field `type` in maps, first element in arrays).

The gateway's prefix index is read through `pdgate_scheduler_index_bytes` (64 bytes an entry).
"""

import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
import zmq

from conftest import _binary, _free_port

ENTRY_BYTES = 64
BLOCK = 4


class Publisher:
    """PUB + ROUTER, as vLLM's ZmqEventPublisher: every batch is numbered and kept for replay."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.buffer = []
        self.seq = 0
        self.replays = 0
        self.running = True
        self.thread = threading.Thread(target=self._serve_replay, daemon=True)
        self.thread.start()

    def publish(self, payload: bytes, lose: bool = False):
        """Numbers and buffers the batch; `lose` leaves it off the PUB socket (a gap)."""
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        if not lose:
            self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

    def _serve_replay(self):
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while self.running:
            if not poller.poll(50):
                continue
            ident, _, start = self.router.recv_multipart()
            start = int.from_bytes(start, "big")
            self.replays += 1
            for seq, payload in list(self.buffer):
                if seq >= start:
                    self.router.send_multipart([ident, b"", seq.to_bytes(8, "big"), payload])
            self.router.send_multipart([ident, b"", (-1).to_bytes(8, "big", signed=True), b""])

    def close(self):
        self.running = False
        self.thread.join(timeout=2)
        self.ctx.destroy(linger=0)


def stored(hashes, parent, tokens, positional):
    fields = dict(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=BLOCK,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    if positional:
        return ["BlockStored", *fields.values()]
    return {"type": "BlockStored", **fields}


def removed(hashes, positional):
    if positional:
        return ["BlockRemoved", hashes, "GPU"]
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


def cleared(positional):
    return ["AllBlocksCleared"] if positional else {"type": "AllBlocksCleared"}


def batch(events, positional):
    if positional:
        return msgpack.packb([time.time(), events])
    return msgpack.packb({"ts": time.time(), "events": events, "data_parallel_rank": 0})


def metric(base, name, labels=""):
    with urllib.request.urlopen(f"{base}/metrics", timeout=2) as r:
        text = r.read().decode()
    total = None
    for line in text.splitlines():
        if line.startswith(name + labels) or (not labels and line.startswith(name + "{")):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total or 0.0


def wait_for(pred, what, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def served():
    pub = Publisher()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    dead = _free_port()
    cfg = Path(tempfile.mkdtemp()) / "pdgate.toml"
    cfg.write_text(
        f"""
[server]
port = {port}
[scheduler]
block_size = {BLOCK}
[[workers]]
url = "http://127.0.0.1:{dead}"
role = "prefill"
kv_events = "tcp://127.0.0.1:{pub.pub_port}"
kv_events_replay = "tcp://127.0.0.1:{pub.replay_port}"
[[workers]]
url = "http://127.0.0.1:{dead}"
role = "decode"
"""
    )
    proc = subprocess.Popen([_binary(), "serve", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _up(base), "pdgate serve")
        # The subscriber connects within the supervisor's 250 ms; a batch sent before that is
        # recovered through the replay socket anyway, on the next one.
        time.sleep(1.0)
        yield pub, base
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        pub.close()


def _up(base):
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=1):
            return True
    except OSError:
        return False


def entries(base):
    return metric(base, "pdgate_scheduler_index_bytes") / ENTRY_BYTES


def test_both_encodings_int_and_bytes_hashes_a_gap_replayed_and_garbage(served):
    pub, base = served
    prompt = list(range(100, 112))

    # Map encoding, int hashes: three blocks of one prompt.
    pub.publish(batch([stored([101, 102, 103], None, prompt, False)], False))
    wait_for(lambda: entries(base) == 3, "three blocks indexed")

    # Positional encoding, a bytes hash chained to an int parent.
    pub.publish(batch([stored([b"\x07" * 32], 103, [1, 2, 3, 4], True)], True))
    wait_for(lambda: entries(base) == 4, "the fourth block indexed")

    pub.publish(batch([removed([102], True)], True))
    wait_for(lambda: entries(base) == 3, "a removal")

    # A batch lost on PUB: the next one shows the gap, the ROUTER replays both.
    pub.publish(batch([stored([b"\x01" * 32, b"\x02" * 32], None, list(range(8)), False)], False), lose=True)
    pub.publish(batch([stored([9001], b"\x02" * 32, [9, 9, 9, 9], True)], True))
    wait_for(lambda: entries(base) == 6, "the lost batch replayed")
    assert pub.replays >= 1
    assert metric(base, "pdgate_kv_events_gaps_total") >= 1
    assert metric(base, "pdgate_kv_events_replays_total", '{outcome="complete"}') >= 1

    # Not MessagePack: counted, and the stream goes on.
    pub.publish(b"\xc1 not msgpack")
    pub.publish(batch([cleared(False)], False))
    wait_for(lambda: entries(base) == 0, "AllBlocksCleared")
    assert metric(base, "pdgate_kv_events_decode_errors_total") >= 1
    assert metric(base, "pdgate_kv_events_total", '{kind="stored"}') >= 4
    assert metric(base, "pdgate_kv_events_total", '{kind="removed"}') >= 1
    assert metric(base, "pdgate_kv_events_total", '{kind="cleared"}') >= 1
