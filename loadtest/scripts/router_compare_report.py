"""Parses router_compare.sh's `wrk --latency` outputs and prints the comparison table (Markdown).

Usage: router_compare_report.py OUT_DIR  (reads OUT_DIR/<name>.txt for every run name)."""

import re
import sys
from pathlib import Path

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsed latency {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse(path: Path) -> dict:
    out = path.read_text()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors:.*", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    cpu = re.search(r"Router CPU ticks: (\d+) at (\d+)/s", out)
    cpu_us = float(cpu.group(1)) / float(cpu.group(2)) * 1e6 / total if cpu else None
    c1 = path.with_suffix(".c1")
    c1_p50 = ms(re.search(r"^\s+50%\s+(\S+)", c1.read_text(), re.M).group(1)) if c1.exists() else None
    return {"rps": rps, "p50": p50, "p99": p99, "non2xx": int(bad.group(1)) if bad else 0,
            "sockerr": errs.group(0) if errs else "", "cpu_us": cpu_us, "c1_p50": c1_p50}


def main() -> None:
    d = Path(sys.argv[1])
    runs = {p.stem: parse(p) for p in d.glob("*.txt")}
    base = runs["direct"]
    rows = [("direct", "one decode engine, plain request")]
    rows += [("pdgate-sglang", "pdgate, protocol sglang"), ("smg-sglang", "sglang-router (smg) PD mode"),
             ("pdgate-vllm", "pdgate, protocol vllm-nixl"), ("vllm-router", "vllm-router --vllm-pd-disaggregation")]
    print("| target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | router CPU µs/req | 1-conn added p50 ms | non-2xx |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label in rows:
        r = runs.get(name)
        if r is None:
            print(f"| {label} | (not run) | | | | | | | |")
            continue
        add50, add99 = r["p50"] - base["p50"], r["p99"] - base["p99"]
        added = ("–", "–") if name == "direct" else (f"{add50:.2f}", f"{add99:.2f}")
        cpu = "–" if r["cpu_us"] is None else f"{r['cpu_us']:.0f}"
        c1 = "–" if name == "direct" or r["c1_p50"] is None or base["c1_p50"] is None \
            else f"{r['c1_p50'] - base['c1_p50']:.3f}"
        print(f"| {label} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {added[0]} | {added[1]} | {cpu} | {c1} | {r['non2xx']} |")
        if r["sockerr"]:
            print(f"<!-- {name}: {r['sockerr']} -->")
    print()
    for ours, theirs, mode in (("pdgate-sglang", "smg-sglang", "SGLang"), ("pdgate-vllm", "vllm-router", "vLLM")):
        a, b = runs.get(ours), runs.get(theirs)
        if not a or not b:
            continue
        rps_ratio = a["rps"] / b["rps"]
        add_a, add_b = a["p50"] - base["p50"], b["p50"] - base["p50"]
        lat_ratio = add_a / add_b if add_b > 0 else float("nan")
        line = (f"- {mode} mode: pdgate req/s ÷ router req/s = **{rps_ratio:.2f}×** (target ≥ 1.5); "
                f"pdgate added p50 ÷ router added p50 = **{lat_ratio:.2f}** (target ≤ 0.5)")
        if a["cpu_us"] and b["cpu_us"]:
            line += f"; router CPU per request pdgate ÷ router = **{a['cpu_us'] / b['cpu_us']:.2f}**"
        if a["c1_p50"] is not None and b["c1_p50"] is not None and base["c1_p50"] is not None:
            d_a, d_b = a["c1_p50"] - base["c1_p50"], b["c1_p50"] - base["c1_p50"]
            if d_b > 0:
                line += f"; 1-connection added p50 pdgate ÷ router = **{d_a / d_b:.2f}**"
        print(line)


if __name__ == "__main__":
    main()
