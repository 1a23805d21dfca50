#!/usr/bin/env python3
"""Markdown table of a `pdgate simulate --out DIR` report for the KV-reuse study: goodput, failures,
block hit rate split into local hits and pulls, the reachable hit rate (prompt tokens some engine
cached when the prefill was sized: the most placement and pulls could have served), pulls made,
and TTFT percentiles, per policy.

Usage: reuse_table.py DIR/report.json [--pooled]   (--pooled also prints the pooled-LRU bound)
"""
import json
import sys


def main() -> None:
    report = json.load(open(sys.argv[1]))
    pols = report["policies"]
    best = max(p["aggregates"]["good_requests"] for p in pols)
    print("| policy | goodput (req) | failed | hit rate (local + pulled) | local | pulled | reachable | pulls | TTFT p50 | TTFT p90 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in pols:
        a, s = p["aggregates"], p["settings"]
        good = a["good_requests"]
        name = p["label"]
        cells = [
            f"{good:,}",
            f"{a['failed']:,}",
            f"{100 * (a['cache_hit_rate'] or 0):.1f} %",
            f"{100 * s.get('local_hit_rate', a['cache_hit_rate'] or 0):.1f} %",
            f"{100 * s.get('pulled_hit_rate', 0):.1f} %",
            f"{100 * s.get('reachable_hit_rate', 0):.1f} %",
            f"{s.get('pulls', 0):,}",
            f"{a['ttft_ms']['median']:,.0f} ms" if a.get("ttft_ms") else "-",
            f"{a['ttft_ms']['p90']:,.0f} ms" if a.get("ttft_ms") else "-",
        ]
        if good == best:
            name, cells[0] = f"**{name}**", f"**{cells[0]}**"
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "--pooled" in sys.argv:
        print(f"\npooled LRU bound: {100 * pols[0]['settings']['pooled_lru_hit_rate']:.1f} %")


if __name__ == "__main__":
    main()
