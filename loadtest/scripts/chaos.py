#!/usr/bin/env python3
"""Chaos harness: a fleet of separate `pdgate engine` processes behind `pdgate serve`, load from
`pdgate replay`, faults injected on a schedule, and a report of what the clients lost.

Faults, in turn, each on one engine (decode and prefill alternately):
  kill       SIGKILL, restarted on the same port after --down seconds
  stop       SIGSTOP for --down seconds, then SIGCONT (a hung engine: its port open, no answer)
  partition  the engine's link cut for --down seconds (every engine then runs in a network
             namespace of its own, bridged to the gateway's; the link's bridge end goes down,
             so neither the gateway nor the other engines reach it). Needs root and `ip netns`.
  latency    added delay with `tc netem`: refused with the reason when the kernel lacks netem

Reported per protocol (report.json in --out, and a Markdown table on stdout):
  lost_before_streaming  requests that failed before their first token (429/503 refusals apart)
  streams_cut            requests that failed after their answer began (a 200 head went out)
  refused                429/503 answers (admission, retry budget, no healthy pair)
  migrations             the gateway's pdgate_migrations_total{outcome="ok"} (streams continued
                         on another decode), when it has that metric; every outcome in the
                         report
  retries                the gateway's pdgate_retries_total, by role and outcome
  leaked_reservations    pdgate_sim_kv_reservations_active summed over every engine, read once
                         the load is over and --settle seconds have passed (or all are gone)
  recovery_s             per fault: from its end (restart, SIGCONT, link up) to the engine
                         healthy in the gateway's /admin/workers again

--load-fraction F first measures capacity (a closed loop, --capacity-secs) and then offers F
times that rate. --soak samples the RSS of the gateway and every engine into rss.csv and draws
rss.svg (fault times marked).

From the repository root, after `cargo build --release -p pdgate`:
  python3 loadtest/scripts/chaos.py --protocol all --duration 60 --fault-every 8
  python3 loadtest/scripts/chaos.py --protocol native --soak --duration 1800 --fault-every 60 \\
      --load-fraction 0.7
"""

import argparse
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

PROTOCOLS = ["native", "vllm-nixl", "vllm-mooncake", "sglang", "trtllm"]
ADMIN_TOKEN = "chaos-admin-token-0123456789"


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(url, timeout=2.0, token=None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return None, ""


def sample(text, name, labels=None):
    """Sum of the series of metric `name` in Prometheus text whose labels include `labels`
    (None when there is no such series)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        if labels and not all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            continue
        total += float(m.group(3))
        seen = True
    return total if seen else None


def series(text, name):
    """Every series of `name`: {label string: value}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) == name:
            out[m.group(2) or ""] = float(m.group(3))
    return out


def rss_kib(pid):
    return rss_parts_kib(pid).get("VmRSS")


def rss_parts_kib(pid):
    """VmRSS and its parts: RssAnon is the process's own memory; RssShmem counts the pages of
    shared segments it has touched, which for an engine are the KV pools: its own and, over the
    shm transport, the decode pools it writes into (owned by those decodes)."""
    parts = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    parts[key] = int(line.split()[1])
    except OSError:
        pass
    return parts


def wait_until(pred, timeout, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


class Fabric:
    """A bridge in a namespace of its own, one veth to the gateway's namespace (10.77.0.1) and
    one per engine namespace (10.77.0.k): engines reach the gateway and each other over it, and
    taking an engine's bridge end down partitions that engine from all of them. Nothing in the
    host's own namespace changes but one veth end and its address."""

    def __init__(self):
        self.tag = f"pdg{os.getpid() % 100000}"
        self.ns = f"{self.tag}-fab"
        self.host_if = f"{self.tag}h"
        self.gateway_ip = "10.77.0.1"
        self.next = 2
        self.made = []

    @staticmethod
    def why_not():
        """None when namespaces, veth and a bridge can be made here, else why not."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        probe = f"pdgprobe{os.getpid() % 100000}"
        r = run(["ip", "netns", "add", probe])
        if r.returncode != 0:
            return f"`ip netns add` failed: {r.stderr.strip()}"
        try:
            r = run(["ip", "netns", "exec", probe, "ip", "link", "add", "b0", "type", "bridge"])
            if r.returncode != 0:
                return f"no bridge devices: {r.stderr.strip()}"
        finally:
            run(["ip", "netns", "del", probe])
        return None

    @staticmethod
    def netem_why_not():
        """None when `tc netem` works in a namespace here, else the kernel's answer."""
        probe = f"pdgnetem{os.getpid() % 100000}"
        if run(["ip", "netns", "add", probe]).returncode != 0:
            return "`ip netns add` failed"
        try:
            r = run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root",
                     "netem", "delay", "10ms"])
            return None if r.returncode == 0 else f"`tc qdisc add ... netem`: {r.stderr.strip()}"
        finally:
            run(["ip", "netns", "del", probe])

    def sh(self, *cmd):
        r = run(list(cmd))
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def up(self):
        self.sh("ip", "netns", "add", self.ns)
        self.made.append(("ns", self.ns))
        self.sh("ip", "netns", "exec", self.ns, "ip", "link", "add", "br0", "type", "bridge")
        self.sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "br0", "up")
        self.sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "gw",
                "netns", self.ns)
        self.made.append(("link", self.host_if))
        self.sh("ip", "addr", "add", f"{self.gateway_ip}/24", "dev", self.host_if)
        self.sh("ip", "link", "set", self.host_if, "up")
        self.sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "gw", "master", "br0")
        self.sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "gw", "up")

    def add_engine(self, name):
        """A namespace for engine `name`, linked to the bridge; (namespace, ip, bridge end)."""
        k = self.next
        self.next += 1
        ns, ip, port = f"{self.tag}-{name}", f"10.77.0.{k}", f"e{k}"
        self.sh("ip", "netns", "add", ns)
        self.made.append(("ns", ns))
        self.sh("ip", "netns", "exec", self.ns, "ip", "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", ns)
        self.sh("ip", "netns", "exec", self.ns, "ip", "link", "set", port, "master", "br0")
        self.sh("ip", "netns", "exec", self.ns, "ip", "link", "set", port, "up")
        self.sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        self.sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        self.sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        return ns, ip, port

    def cut(self, port, down):
        self.sh("ip", "netns", "exec", self.ns, "ip", "link", "set", port,
                "down" if down else "up")

    def teardown(self):
        for kind, name in reversed(self.made):
            if kind == "ns":
                run(["ip", "netns", "del", name])
            else:
                run(["ip", "link", "del", name])


class Engine:
    def __init__(self, args, role, protocol, registry, logdir, index, fabric=None):
        self.pdgate, self.role, self.protocol = args.pdgate, role, protocol
        self.registry, self.time_scale = registry, args.time_scale
        self.kv_blocks = args.kv_blocks
        self.name = f"{role}{index}"
        self.ns = self.port_if = None
        host = "127.0.0.1"
        if fabric:
            self.ns, host, self.port_if = fabric.add_engine(self.name)
        self.host = host
        self.port = free_port() if not fabric else 8100 + index + (0 if role == "prefill" else 50)
        self.url = f"http://{host}:{self.port}"
        self.log = open(os.path.join(logdir, f"{self.name}.log"), "ab")
        self.env = dict(os.environ, RUST_LOG="warn")
        self.proc = None

    def start(self):
        cmd = [self.pdgate, "--worker-threads", "1", "engine", "--role", self.role,
               "--host", self.host, "--port", str(self.port), "--protocol", self.protocol,
               "--registry", self.registry, "--time-scale", str(self.time_scale)]
        if self.ns:
            cmd = ["ip", "netns", "exec", self.ns] + cmd
        env = dict(self.env, PDGATE_ENGINE_KV_BLOCKS=str(self.kv_blocks))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env)

    def metrics(self):
        return http_get(f"{self.url}/metrics", timeout=1.0)[1]


def gateway_config(engines, args, host, port):
    lines = ["[server]", f'host = "{host}"', f"port = {port}"]
    if host != "127.0.0.1":
        lines.append(f'admin_token = "{ADMIN_TOKEN}"')
    lines += ["", "[health]", f"interval_ms = {args.health_ms}", "fail_threshold = 2",
              "recover_threshold = 1", ""]
    for e in engines:
        lines += ["[[workers]]", f'url = "{e.url}"', f'role = "{e.role}"',
                  f'protocol = "{e.protocol}"', ""]
    return "\n".join(lines)


class Gateway:
    def __init__(self, args, engines, out, host, port, env, extra=""):
        self.url = f"http://{host}:{port}"
        self.token = ADMIN_TOKEN if host != "127.0.0.1" else None
        path = os.path.join(out, "gateway.toml")
        with open(path, "w") as f:
            f.write(gateway_config(engines, args, host, port) + "\n" + extra)
        log = open(os.path.join(out, "gateway.log"), "ab")
        self.proc = subprocess.Popen([args.pdgate, "--worker-threads", str(args.gateway_threads),
                                      "serve", "--config", path], stdout=log, stderr=log,
                                     env=dict(env, RUST_LOG="warn"))

    def workers(self):
        code, body = http_get(f"{self.url}/admin/workers", token=self.token)
        if code != 200:
            return []
        try:
            return json.loads(body)
        except ValueError:
            return []

    def healthy(self, url):
        return any(w.get("url") == url and w.get("healthy") for w in self.workers())

    def in_rotation(self, url):
        return any(w.get("url") == url and w.get("healthy") and w.get("breaker") != "open"
                   for w in self.workers())

    def booked(self):
        return sum(w.get("load", {}).get("in_flight", 0) for w in self.workers())

    def metrics(self):
        return http_get(f"{self.url}/metrics")[1]


def leaked(engines):
    return sum(sample(e.metrics(), "pdgate_sim_kv_reservations_active") or 0 for e in engines)


class Rss:
    """RSS samples of the gateway and the engines: `series` is private memory (RssAnon), the
    leak measure; `shared` the shared-segment pages (RssShmem)."""

    def __init__(self, path):
        self.f = open(path, "w")
        self.f.write("t_s,process,rss_kib,anon_kib,file_kib,shmem_kib\n")
        self.series = {}
        self.shared = {}

    def take(self, t, procs):
        for name, pid in procs:
            p = rss_parts_kib(pid)
            if "RssAnon" not in p:
                continue
            self.f.write(f"{t:.1f},{name},{p['VmRSS']},{p['RssAnon']},{p.get('RssFile', 0)},"
                         f"{p.get('RssShmem', 0)}\n")
            self.series.setdefault(name, []).append((t, p["RssAnon"]))
            self.shared.setdefault(name, []).append((t, p.get("RssShmem", 0)))
        self.f.flush()


def rss_summary(series):
    """Per process: first, last, min, max, and the medians of minutes 5-10 and of the last 5
    minutes (the soak's flatness measure: the second within 10 % of the first)."""
    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else None
    out = {}
    for k, v in series.items():
        end = v[-1][0]
        early = med([x for t, x in v if 300 <= t < 600])
        late = med([x for t, x in v if t >= end - 300])
        out[k] = {"first": v[0][1], "last": v[-1][1], "min": min(x for _, x in v),
                  "max": max(x for _, x in v), "median_5_10_min": early,
                  "median_last_5_min": late,
                  "late_over_early": round(late / early, 3) if early and late else None}
    return out


def svg(series, path, marks, title):
    """Lines over time, one per process, `marks` (times) as grey verticals."""
    w, h, ml, mr, mt, mb = 900, 420, 70, 130, 30, 40
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    tmax = max(t for t, _ in pts) or 1.0
    ymax = max(k for _, k in pts) / 1024.0 * 1.1 or 1.0

    def x(t):
        return ml + (w - ml - mr) * t / tmax

    def y(mib):
        return h - mb - (h - mt - mb) * mib / ymax

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
              "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{ml}" y="18">{title}</text>',
           f'<line x1="{ml}" y1="{h-mb}" x2="{w-mr}" y2="{h-mb}" stroke="black"/>',
           f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h-mb}" stroke="black"/>']
    for i in range(5):
        v = ymax * i / 4
        out.append(f'<text x="{ml-8}" y="{y(v)+4:.1f}" text-anchor="end">{v:.0f}</text>')
        t = tmax * i / 4
        out.append(f'<text x="{x(t):.1f}" y="{h-mb+16}" text-anchor="middle">{t:.0f} s</text>')
    out.append(f'<text x="14" y="{(h-mb+mt)/2:.0f}" transform="rotate(-90 14 '
               f'{(h-mb+mt)/2:.0f})" text-anchor="middle">RSS, MiB</text>')
    for t in marks:
        out.append(f'<line x1="{x(t):.1f}" y1="{mt}" x2="{x(t):.1f}" y2="{h-mb}" '
                   'stroke="#ddd"/>')
    for i, (name, s) in enumerate(sorted(series.items())):
        c = colors[i % len(colors)]
        line = " ".join(f"{x(t):.1f},{y(k/1024.0):.1f}" for t, k in s)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{line}"/>')
        out.append(f'<text x="{w-mr+8}" y="{mt+16*i+10}" fill="{c}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def classify(report_path):
    with open(report_path) as f:
        rep = json.load(f)
    lost = cut = refused = ok = 0
    kinds = {}
    for r in rep.get("records", []):
        err = r.get("error")
        if not err:
            ok += 1
            continue
        kind = f"{err.get('status')} {err.get('kind', '?')}"
        kinds[kind] = kinds.get(kind, 0) + 1
        # A 200 head means the answer had begun: its error is a stream cut mid-way.
        if err.get("status") == 200 or r.get("ttft_ms") is not None:
            cut += 1
        elif err.get("status") in (429, 503):
            refused += 1
        else:
            lost += 1
    agg = rep.get("aggregates", {})
    return {"requests": len(rep.get("records", [])), "completed": ok,
            "lost_before_streaming": lost, "streams_cut": cut, "refused": refused,
            "error_kinds": kinds, "ttft_p99_ms": agg.get("ttft_ms", {}).get("p99"),
            "throughput_rps": agg.get("request_throughput")}


def synthetic(args, rate):
    return (f"synthetic:requests={args.max_requests},rate={rate},input={args.input},"
            f"output={args.output},groups=16,prefix=256,turns=3,think_ms=500")


def measure_capacity(args, gw, out):
    """Completions per second of a closed loop (--concurrency outstanding) over
    --capacity-secs, faults off."""
    dest = os.path.join(out, "capacity")
    subprocess.run([args.pdgate, "replay", synthetic(args, 1), "--target", gw.url,
                    "--concurrency", str(args.concurrency), "--duration", str(args.capacity_secs),
                    "--max-requests", str(args.max_requests), "--timeout", "60", "--quiet",
                    "--no-records", "--out", dest], stdout=subprocess.DEVNULL, check=True)
    with open(os.path.join(dest, "report.json")) as f:
        agg = json.load(f)["aggregates"]
    return agg["request_throughput"], agg.get("ttft_ms", {}).get("p99")


def inject(kind, e, gw, args, fabric, t, entry_out):
    """Applies one fault to engine `e`, ends it after --down seconds, and times the engine's
    return to rotation."""
    entry = {"t_s": round(t, 1), "fault": kind, "engine": e.name}
    entry_out.append(entry)
    start = time.monotonic()
    if kind == "kill":
        e.proc.send_signal(signal.SIGKILL)
        e.proc.wait()
    elif kind == "stop":
        e.proc.send_signal(signal.SIGSTOP)
    elif kind == "partition":
        fabric.cut(e.port_if, True)
    entry["marked_down"] = wait_until(lambda: not gw.healthy(e.url), args.down, step=0.1)
    rest = args.down - (time.monotonic() - start)
    if rest > 0:
        time.sleep(rest)
    if kind == "kill":
        e.start()
    elif kind == "stop":
        e.proc.send_signal(signal.SIGCONT)
    elif kind == "partition":
        fabric.cut(e.port_if, False)
    ended = time.monotonic()
    back = wait_until(lambda: gw.healthy(e.url), 60, step=0.02)
    entry["recovery_s"] = round(time.monotonic() - ended, 2) if back else None
    entry["within_2_intervals"] = back and (time.monotonic() - ended) <= 2 * args.health_ms / 1e3
    # In rotation: healthy and its breaker admitting work (an open breaker, tripped by the
    # failures the fault caused, keeps the scheduler away until its cooldown or a probe).
    admitted = wait_until(lambda: gw.in_rotation(e.url), 60, step=0.02)
    entry["rotation_s"] = round(time.monotonic() - ended, 2) if admitted else None


def run_protocol(args, protocol, out, faults, fabric_ok):
    os.makedirs(out, exist_ok=True)
    fabric = None
    env = dict(os.environ)
    if "partition" in faults and fabric_ok:
        fabric = Fabric()
        fabric.up()
        # Off loopback the gateway wants an admin token and its registry a fleet secret.
        env["PDGATE_FLEET_SECRET"] = base64.b64encode(os.urandom(32)).decode()
    host = fabric.gateway_ip if fabric else "127.0.0.1"
    gw_port = free_port(host if fabric else "127.0.0.1")
    registry = f"http://{host}:{gw_port}"
    engines = []
    try:
        engines = [Engine(args, "prefill", protocol, registry, out, i, fabric)
                   for i in range(args.prefill)]
        engines += [Engine(args, "decode", protocol, registry, out, i, fabric)
                    for i in range(args.decode)]
        for e in engines:
            e.env = dict(env, RUST_LOG="warn")
        gw = Gateway(args, engines, out, host, gw_port, env)
        replay = None
        if not wait_until(lambda: http_get(f"{gw.url}/health")[0] == 200, 20):
            sys.exit(f"gateway did not start; see {out}/gateway.log")
        for e in engines:
            e.start()
        if not wait_until(lambda: all(gw.healthy(e.url) for e in engines), 60):
            sys.exit("engines did not come up; see the logs in " + out)

        result = {"protocol": protocol}
        rate = args.rate
        if args.load_fraction:
            cap, cap_ttft = measure_capacity(args, gw, out)
            rate = round(cap * args.load_fraction, 2)
            result.update({"capacity_rps": round(cap, 2), "capacity_ttft_p99_ms": cap_ttft,
                           "load_fraction": args.load_fraction})
        result["offered_rps"] = rate
        trace = args.trace or synthetic(args, rate)
        replay_cmd = [args.pdgate, "replay", trace, "--target", gw.url, "--rate", str(rate),
                      "--duration", str(args.duration), "--max-requests", str(args.max_requests),
                      "--timeout", "120", "--quiet", "--out", os.path.join(out, "replay")]
        if args.trace:
            replay_cmd += ["--skip-invalid"]
        if gw.token:
            replay_cmd += ["--admin-token", gw.token]
        replay = subprocess.Popen(replay_cmd, stdout=open(os.path.join(out, "replay.log"), "ab"),
                                  stderr=subprocess.STDOUT)

        rss = Rss(os.path.join(out, "rss.csv")) if args.soak else None
        t0 = time.monotonic()
        faults_log, fault_times, threads = [], [], []
        next_fault, n = args.fault_every, 0
        last_sample = -1e9
        while replay.poll() is None:
            t = time.monotonic() - t0
            if rss and t - last_sample >= args.sample:
                rss.take(t, [("gateway", gw.proc.pid)] +
                         [(e.name, e.proc.pid) for e in engines if e.proc])
                last_sample = t
            busy = any(th.is_alive() for th in threads)
            if faults and t >= next_fault and t < args.duration - args.down and not busy:
                kind = faults[n % len(faults)]
                # Alternate roles so both legs' failures are exercised.
                pool = [e for e in engines if e.role == ("decode" if n % 2 == 0 else "prefill")]
                target = pool[(n // 2) % len(pool)]
                fault_times.append(t)
                th = threading.Thread(target=inject, daemon=True,
                                      args=(kind, target, gw, args, fabric, t, faults_log))
                th.start()
                threads.append(th)
                n += 1
                next_fault = t + args.fault_every
            time.sleep(0.05)
        for th in threads:
            th.join()
        elapsed = time.monotonic() - t0

        # What the engines still hold once the load is over: abandoned reservations get
        # --settle seconds to be released (their TTL is 120 s; a leak outlives the settle).
        settle0 = time.monotonic()
        wait_until(lambda: leaked(engines) == 0 and gw.booked() == 0, args.settle, step=0.25)
        gw_metrics = gw.metrics()
        result.update(classify(os.path.join(out, "replay", "report.json")))
        result.update({
            "duration_s": round(elapsed, 1),
            "health_interval_ms": args.health_ms,
            "faults": faults_log,
            "migrations": sample(gw_metrics, "pdgate_migrations_total", {"outcome": "ok"}),
            "migration_outcomes": series(gw_metrics, "pdgate_migrations_total"),
            "retries": series(gw_metrics, "pdgate_retries_total"),
            "leaked_reservations": leaked(engines),
            "leak_settle_s": round(time.monotonic() - settle0, 1),
            "booked_at_end": gw.booked(),
            "netem": args.netem_note,
            "out": out,
        })
        if rss:
            svg(rss.series, os.path.join(out, "rss.svg"), fault_times,
                f"private RSS (RssAnon) over the run ({protocol}); grey lines: faults")
            svg({k: v for k, v in rss.series.items() if k == "gateway"},
                os.path.join(out, "rss-gateway.svg"), fault_times,
                f"gateway private RSS over the run ({protocol})")
            svg(rss.shared, os.path.join(out, "rss-shared.svg"), fault_times,
                f"shared-segment pages in RSS (RssShmem) ({protocol})")
            result["rss_anon_kib"] = rss_summary(rss.series)
            result["rss_shmem_kib"] = rss_summary(rss.shared)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(result, f, indent=2)
        return result
    finally:
        if "replay" in locals() and replay and replay.poll() is None:
            replay.kill()
        procs = [e.proc for e in engines if e.proc]
        for e in engines:
            if e.proc and e.proc.poll() is None:
                e.proc.send_signal(signal.SIGCONT)
                e.proc.terminate()
        if "gw" in locals():
            gw.proc.terminate()
            procs.append(gw.proc)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        if fabric:
            fabric.teardown()


def recovery_summary(r):
    out = []
    for f in r["faults"]:
        rec, rot = f.get("recovery_s"), f.get("rotation_s")
        text = f"{f['fault']} {f['engine']} {rec if rec is not None else 'never'}"
        if rot is not None and rot != rec:
            text += f" (rotation {rot})"
        out.append(text)
    return "; ".join(out) or "none"


def table(results):
    head = ("| protocol | requests | completed | lost before streaming | streams cut | refused "
            "| migrations | retries | leaked reservations | recovery s (fault engine: s) |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for r in results:
        retries = int(sum(r["retries"].values())) if r["retries"] else 0
        mig = r["migrations"]
        rows.append(f"| {r['protocol']} | {r['requests']} | {r['completed']} "
                    f"| {r['lost_before_streaming']} | {r['streams_cut']} | {r['refused']} "
                    f"| {'n/a' if mig is None else int(mig)} | {retries} "
                    f"| {int(r['leaked_reservations'])} | {recovery_summary(r)} |")
    return head + "\n" + "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--pdgate", default=None, help="pdgate binary (default: target/release)")
    ap.add_argument("--protocol", choices=PROTOCOLS + ["all"], default="native")
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--decode", type=int, default=2)
    ap.add_argument("--time-scale", type=float, default=0.2,
                    help="engine time scale (1 = the modelled GPU in real time)")
    ap.add_argument("--kv-blocks", type=int, default=4096, help="KV blocks per engine")
    ap.add_argument("--gateway-threads", type=int, default=2)
    ap.add_argument("--duration", type=float, default=60, help="seconds of load")
    ap.add_argument("--rate", type=float, default=8, help="requests per second offered")
    ap.add_argument("--load-fraction", type=float, default=None,
                    help="offer this fraction of the capacity measured first (overrides --rate)")
    ap.add_argument("--capacity-secs", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=32, help="closed loop of the capacity run")
    ap.add_argument("--input", type=int, default=600, help="synthetic prompt tokens")
    ap.add_argument("--output", type=int, default=60, help="synthetic output tokens")
    ap.add_argument("--trace", default=None,
                    help="a trace file for pdgate replay (default: synthetic multi-turn load)")
    ap.add_argument("--max-requests", type=int, default=100000)
    ap.add_argument("--fault-every", type=float, default=10)
    ap.add_argument("--faults", default="kill,stop",
                    help="comma list of kill, stop, partition, latency")
    ap.add_argument("--down", type=float, default=3, help="seconds each fault lasts")
    ap.add_argument("--health-ms", type=int, default=500)
    ap.add_argument("--settle", type=float, default=20,
                    help="seconds after the load for reservations to be released")
    ap.add_argument("--soak", action="store_true", help="sample RSS into rss.csv and rss.svg")
    ap.add_argument("--sample", type=float, default=2.0, help="RSS sample interval, s (soak)")
    ap.add_argument("--out", default=None, help="output directory")
    args = ap.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args.pdgate = args.pdgate or os.path.join(root, "target", "release", "pdgate")
    if not os.access(args.pdgate, os.X_OK):
        sys.exit(f"no pdgate binary at {args.pdgate}: cargo build --release -p pdgate")
    out = args.out or tempfile.mkdtemp(prefix="chaos-")
    os.makedirs(out, exist_ok=True)
    faults = [f for f in args.faults.split(",") if f]
    args.netem_note = None
    if "latency" in faults:
        faults.remove("latency")
        why = Fabric.why_not() or Fabric.netem_why_not()
        args.netem_note = f"latency fault skipped: {why}" if why else \
            "latency fault skipped: not implemented (netem works here)"
        print(args.netem_note, file=sys.stderr)
    fabric_ok = True
    if "partition" in faults:
        why = Fabric.why_not()
        if why:
            faults.remove("partition")
            fabric_ok = False
            print(f"partition fault skipped: {why}", file=sys.stderr)

    protocols = PROTOCOLS if args.protocol == "all" else [args.protocol]
    results = []
    for p in protocols:
        r = run_protocol(args, p, os.path.join(out, p), faults, fabric_ok)
        results.append(r)
        print(f"{p}: {r['completed']}/{r['requests']} completed, lost {r['lost_before_streaming']},"
              f" cut {r['streams_cut']}, leaked {int(r['leaked_reservations'])}; "
              f"{recovery_summary(r)}", file=sys.stderr, flush=True)
    md = table(results)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(md)
    print(f"\ndetails: {out}/<protocol>/report.json", file=sys.stderr)


if __name__ == "__main__":
    main()
