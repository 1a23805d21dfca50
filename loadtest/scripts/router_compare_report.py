"""Parses router_compare.sh's `wrk --latency` outputs and prints the comparison table (Markdown).

Usage: router_compare_report.py OUT_DIR  (reads OUT_DIR/<name>.r<round>.txt and .c1 files, where
<name> is `direct` or `<router>-<setting>`, the setting being the policy setting it ran under).
One table per setting, all against the same direct runs. Every figure is the median over the rounds; each ratio is also given per round (min–max), since
the routers of one round shared the machine's slow and fast spells."""

import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsed latency {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def per_request_us(out: str, label: str, total: int):
    cpu = re.search(rf"{label} CPU ticks: (\d+) at (\d+)/s", out)
    return float(cpu.group(1)) / float(cpu.group(2)) * 1e6 / total if cpu else None


def parse(path: Path) -> dict:
    out = path.read_text()
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors:.*", out)
    c1 = path.with_suffix(".c1")
    c1_p50 = ms(re.search(r"^\s+50%\s+(\S+)", c1.read_text(), re.M).group(1)) if c1.exists() else None
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        "p99": ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
        "non2xx": int(bad.group(1)) if bad else 0,
        "sockerr": errs.group(0) if errs else "",
        "cpu_us": per_request_us(out, "Router", total),
        "fleet_us": per_request_us(out, "Fleet", total),
        "c1_p50": c1_p50,
    }


def load(d: Path) -> dict:
    """name -> {round: run}."""
    runs = defaultdict(dict)
    for p in d.glob("*.r*.txt"):
        name, _, rnd = p.stem.rpartition(".r")
        runs[name][int(rnd)] = parse(p)
    return runs


def med(rounds: dict, key: str):
    vals = [r[key] for r in rounds.values() if r[key] is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


ROWS = [("direct", "one decode engine, plain request"),
        ("pdgate-sglang", "pdgate, protocol sglang"), ("smg-sglang", "sglang-router (smg) PD mode"),
        ("pdgate-vllm", "pdgate, protocol vllm-nixl"), ("vllm-router", "vllm-router --vllm-pd-disaggregation")]
ROUTERS = [name for name, _ in ROWS[1:]]


def settings(runs: dict) -> list:
    """The policy settings present, in the order the script runs them."""
    found = []
    for name in sorted(runs):
        for router in ROUTERS:
            if name.startswith(router + "-") and name[len(router) + 1:] not in found:
                found.append(name[len(router) + 1:])
    return sorted(found, key=lambda s: (s != "shipped", s))


def of(runs: dict, setting: str) -> dict:
    """The runs of one setting, keyed by router name (plus direct)."""
    out = {r: runs[f"{r}-{setting}"] for r in ROUTERS if f"{r}-{setting}" in runs}
    out["direct"] = runs["direct"]
    return out


def table(runs: dict) -> None:
    base = runs["direct"]
    b50, b99, bc1 = med(base, "p50"), med(base, "p99"), med(base, "c1_p50")
    print("| target | rounds | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms "
          "| router CPU µs/req | fleet CPU µs/req | 1-conn added p50 ms | non-2xx |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label in ROWS:
        r = runs.get(name)
        if not r:
            print(f"| {label} | 0 | (not run) | | | | | | | | |")
            continue
        p50, p99, c1 = med(r, "p50"), med(r, "p99"), med(r, "c1_p50")
        direct = name == "direct"
        add50 = "–" if direct else f"{p50 - b50:.2f}"
        add99 = "–" if direct else f"{p99 - b99:.2f}"
        addc1 = "–" if direct or c1 is None or bc1 is None else f"{c1 - bc1:.3f}"
        non2xx = sum(x["non2xx"] for x in r.values())
        print(f"| {label} | {len(r)} | {med(r, 'rps'):.0f} | {p50:.2f} | {p99:.2f} | {add50} | {add99} "
              f"| {fmt(med(r, 'cpu_us'), '.0f')} | {fmt(med(r, 'fleet_us'), '.0f')} | {addc1} | {non2xx} |")
        for x in r.values():
            if x["sockerr"]:
                print(f"<!-- {name}: {x['sockerr']} -->")


def spread(vals: list) -> str:
    return f"{min(vals):.2f}–{max(vals):.2f}" if vals else "–"


def ratios(runs: dict) -> None:
    base = runs["direct"]
    for ours, theirs, mode in (("pdgate-sglang", "smg-sglang", "SGLang"), ("pdgate-vllm", "vllm-router", "vLLM")):
        a, b = runs.get(ours), runs.get(theirs)
        if not a or not b:
            continue
        rounds = sorted(set(a) & set(b))
        b50 = {k: base[k]["p50"] if k in base else med(base, "p50") for k in rounds}
        rps = [a[k]["rps"] / b[k]["rps"] for k in rounds]
        lat = [(a[k]["p50"] - b50[k]) / (b[k]["p50"] - b50[k]) for k in rounds if b[k]["p50"] > b50[k]]
        cpu = [a[k]["cpu_us"] / b[k]["cpu_us"] for k in rounds if a[k]["cpu_us"] and b[k]["cpu_us"]]
        base50 = med(base, "p50")
        med_lat = (med(a, "p50") - base50) / (med(b, "p50") - base50)
        line = (f"- {mode} mode: pdgate req/s ÷ router req/s = **{med(a, 'rps') / med(b, 'rps'):.2f}×** "
                f"(per round {spread(rps)}; target ≥ 1.5); pdgate added p50 ÷ router added p50 = "
                f"**{med_lat:.2f}** (per round {spread(lat)}; target ≤ 0.5)")
        if cpu:
            line += (f"; router CPU per request pdgate ÷ router = **{statistics.median(cpu):.2f}** "
                     f"(per round {spread(cpu)})")
        print(line)


def policies(out: Path) -> dict:
    """setting -> (pdgate's policy, the peers'), as the script wrote them to settings.txt."""
    path = out / "settings.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return {f[0]: (f[1], f[2]) for f in map(str.split, lines) if len(f) == 3}


def main() -> None:
    out = Path(sys.argv[1])
    runs = load(out)
    if "direct" not in runs:
        sys.exit("no direct run found")
    named = policies(out)
    for setting in settings(runs):
        ours, theirs = named.get(setting, (setting, setting))
        print(f"#### Policy setting `{setting}`: pdgate `{ours}`, peers `{theirs}`\n")
        table(of(runs, setting))
        print()
        ratios(of(runs, setting))
        print()


if __name__ == "__main__":
    main()
