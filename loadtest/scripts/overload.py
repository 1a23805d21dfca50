#!/usr/bin/env python3
"""Overload and slow-client measurements against `pdgate serve` in front of `pdgate engine`
processes (the fleet of chaos.py), each printed as one JSON object.

  overload  capacity first (closed loop, `pdgate replay --concurrency`), then an open-loop
            Poisson load at --factor x that capacity: TTFT p99 of the admitted requests against
            the SLO, latency p50/p99 of the refusals (429/503; that they carry Retry-After is
            asserted by cli/tests/reliability.rs), gateway RSS sampled through the run.
  stalled   --streams streamed requests whose clients never read: gateway RSS before, with
            them all open, and after they are closed; RSS per stalled stream; KV reservations
            and bookings left once they are gone.

  python3 loadtest/scripts/overload.py overload --factor 5
  python3 loadtest/scripts/overload.py stalled --streams 200
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402  (the fleet launcher and the metric readers)


def start_fleet(args, out, engine_env=None, gateway_extra=""):
    gw_port = chaos.free_port()
    registry = f"http://127.0.0.1:{gw_port}"
    engines = [chaos.Engine(args, "prefill", "native", registry, out, i)
               for i in range(args.prefill)]
    engines += [chaos.Engine(args, "decode", "native", registry, out, i)
                for i in range(args.decode)]
    gw = chaos.Gateway(args, engines, out, "127.0.0.1", gw_port, dict(os.environ),
                       gateway_extra)
    if not chaos.wait_until(lambda: chaos.http_get(f"{gw.url}/health")[0] == 200, 15):
        sys.exit("gateway did not start")
    for e in engines:
        e.env.update(engine_env or {})
        e.start()
    if not chaos.wait_until(lambda: all(gw.healthy(e.url) for e in engines), 60):
        sys.exit("engines did not come up")
    return gw, engines


def stop_fleet(gw, engines):
    procs = [gw.proc] + [e.proc for e in engines]
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def replay(args, gw, out, extra):
    cmd = [args.pdgate, "replay", "synthetic:requests=100000,rate=1,input=400,output=40",
           "--target", gw.url, "--quiet", "--out", out, "--timeout", "60"] + extra
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def p50(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else None


def overload(args, out):
    gw, engines = start_fleet(args, out)
    try:
        cap = replay(args, gw, os.path.join(out, "capacity"),
                     ["--concurrency", "64", "--duration", str(args.capacity_secs)])
        capacity = cap["aggregates"]["request_throughput"]
        rate = capacity * args.factor
        samples = []
        stop = threading.Event()

        def sample_rss():
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - t0, chaos.rss_kib(gw.proc.pid)))
                time.sleep(0.5)

        rss_before = chaos.rss_kib(gw.proc.pid)
        hist_before = chaos.series(gw.metrics(), "pdgate_refusal_duration_seconds_bucket")
        sampler = threading.Thread(target=sample_rss)
        sampler.start()
        rep = replay(args, gw, os.path.join(out, "overload"),
                     ["--rate", f"{rate:.2f}", "--duration", str(args.secs)])
        stop.set()
        sampler.join()
        hist = refusal_histogram(hist_before,
                                 chaos.series(gw.metrics(), "pdgate_refusal_duration_seconds_bucket"))
        recs = rep["records"]
        ok = [r for r in recs if not r.get("error")]
        refused = [r for r in recs if r.get("error") and r["error"].get("status") in (429, 503)]
        other = len(recs) - len(ok) - len(refused)
        refusal_ms = [r["e2el_ms"] for r in refused if r.get("e2el_ms") is not None]
        rss = [k for _, k in samples if k]
        half = len(rss) // 2
        chaos.wait_until(lambda: chaos.leaked(engines) == 0 and gw.booked() == 0, 15)
        return {
            "capacity_rps": round(capacity, 2),
            "offered_rps": round(rate, 2),
            "requests": len(recs),
            "admitted": len(ok),
            "refused": len(refused),
            "refused_by": count(r["error"]["kind"] for r in refused),
            "other_errors": other,
            "admitted_ttft_p99_ms": rep["aggregates"]["ttft_ms"].get("p99"),
            "capacity_run_ttft_p99_ms": cap["aggregates"]["ttft_ms"].get("p99"),
            "slo_ttft_ms": args.slo_ttft_ms,
            "refusal_latency_p99_ms": p99(refusal_ms),
            "refusal_latency_p50_ms": p50(refusal_ms),
            "gateway_refusals": hist["count"],
            "gateway_refusal_p50_at_most_ms": hist["p50_le_ms"],
            "gateway_refusal_p99_at_most_ms": hist["p99_le_ms"],
            "gateway_rss_kib": {"before": rss_before,
                                "first_half_max": max(rss[:half], default=None),
                                "second_half_max": max(rss[half:], default=None),
                                "end": rss[-1] if rss else None},
            "leaked_reservations": chaos.leaked(engines),
            "booked_at_end": gw.booked(),
        }
    finally:
        stop_fleet(gw, engines)


def refusal_histogram(before, after):
    """The gateway's own time for the refusals of this phase (request read to answer built), from
    `pdgate_refusal_duration_seconds` buckets diffed over the phase: the load generator's
    scheduling on a busy box is not in it. Quantiles as bucket upper bounds, in ms."""
    buckets = []
    for labels, v in after.items():
        le = re.search(r'le="([^"]+)"', labels)
        if le:
            buckets.append((float(le.group(1)), v - before.get(labels, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0

    def at_most(q):
        for le, cum in buckets:
            if total and cum >= q * total:
                return le * 1e3
        return None
    return {"count": int(total), "p50_le_ms": at_most(0.5), "p99_le_ms": at_most(0.99)}


def count(items):
    c = {}
    for i in items:
        c[i] = c.get(i, 0) + 1
    return c


def stalled(args, out):
    # Engines big enough to hold every stalled stream's KV, and instant, so each stream has
    # produced more than the socket buffers hold by the time RSS is read.
    args.kv_blocks = 2000000
    env = {"PDGATE_ENGINE_KV_BYTES_PER_TOKEN": "16",
           "PDGATE_ENGINE_MAX_BATCH": str(args.streams),
           "PDGATE_ENGINE_MAX_TOKENS_LIMIT": str(args.max_tokens)}
    # The write deadline far off, so the streams stay open; admission off, so all of them are
    # taken (the `slo` policy would refuse streams past the TBT it predicts for a full batch).
    extra = "[server.limits]\nwrite_timeout_ms = 600000\n[scheduler.slo]\nadmission = false\n"
    gw, engines = start_fleet(args, out, env, extra)
    try:
        # Warm the gateway's pools and allocator with a few ordinary requests first.
        replay(args, gw, os.path.join(out, "warm"), ["--concurrency", "8", "--max-requests", "64"])
        time.sleep(1)
        before = chaos.rss_kib(gw.proc.pid)
        body = json.dumps({"model": "pdgate-sim-8b", "prompt": "stall " * 50,
                           "max_tokens": args.max_tokens, "stream": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        port = int(gw.url.rsplit(":", 1)[1])
        socks = []
        for _ in range(args.streams):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(head + body)
            socks.append(s)
        # Stalled: the engines' generated-token counters stop moving (backpressure all the way).
        last, still = -1.0, 0
        for _ in range(120):
            time.sleep(0.5)
            tok = sum(chaos.sample(e.metrics(), "vllm:generation_tokens_total") or 0
                      for e in engines)
            booked = gw.booked()
            still = still + 1 if tok == last else 0
            last = tok
            if still >= 4 and booked >= args.streams:
                break
        during = chaos.rss_kib(gw.proc.pid)
        queued = send_queue(port)
        for s in socks:
            s.close()
        freed = chaos.wait_until(lambda: chaos.leaked(engines) == 0 and gw.booked() == 0,
                                 30, step=0.25)
        time.sleep(1)
        after = chaos.rss_kib(gw.proc.pid)
        return {
            "streams": args.streams,
            "max_tokens": args.max_tokens,
            "booked_when_measured": booked,
            "gateway_send_queue_bytes": queued,
            "stalled_engine_tokens": last,
            "gateway_rss_kib": {"before": before, "stalled": during, "after_close": after},
            "rss_per_stalled_stream_kib": round((during - before) / args.streams, 1),
            "freed_after_close": freed,
            "leaked_reservations": chaos.leaked(engines),
            "booked_at_end": gw.booked(),
        }
    finally:
        stop_fleet(gw, engines)


def send_queue(port):
    """Bytes the kernel holds unsent on the gateway's side of its client connections."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.split())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["overload", "stalled"])
    ap.add_argument("--pdgate", default=None)
    ap.add_argument("--prefill", type=int, default=1)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--health-ms", type=int, default=500)
    ap.add_argument("--kv-blocks", type=int, default=4096)
    ap.add_argument("--gateway-threads", type=int, default=2)
    ap.add_argument("--factor", type=float, default=5.0, help="offered load / capacity")
    ap.add_argument("--capacity-secs", type=float, default=15)
    ap.add_argument("--secs", type=float, default=30, help="seconds of overload")
    ap.add_argument("--slo-ttft-ms", type=float, default=2000,
                    help="the gateway's scheduler.slo.ttft_ms (default config)")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=100000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args.pdgate = args.pdgate or os.path.join(root, "target", "release", "pdgate")
    out = args.out or tempfile.mkdtemp(prefix=f"{args.mode}-")
    os.makedirs(out, exist_ok=True)
    if args.mode == "stalled":
        args.time_scale = 0.0
    result = overload(args, out) if args.mode == "overload" else stalled(args, out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
