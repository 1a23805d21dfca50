#!/usr/bin/env python3
"""Side-by-side figures of `pdgate replay` and aiperf on the same Mooncake slice.

    python3 aiperf_compare_report.py OUT      # OUT as written by aiperf_compare.sh

Reads OUT/slice.jsonl (the trace rows both tools replayed), OUT/ours/report.json and
OUT/aiperf/profile_export_aiperf.json + profile_export.jsonl (aiperf run with
--use-server-token-count, so its per-request input_sequence_length is the engine's
usage.prompt_tokens). Prints a markdown table; writes it to OUT/compare.md too.
"""
import json
import sys
from pathlib import Path


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(out):
    out = Path(out)
    trace = [json.loads(l) for l in open(out / "slice.jsonl") if l.strip()]
    ours = json.load(open(out / "ours" / "report.json"))
    agg = ours["aggregates"]
    ap = json.load(open(out / "aiperf" / "profile_export_aiperf.json"))

    def a(key, stat="avg"):
        v = ap.get(key) or {}
        return v.get(stat, float("nan"))

    # Engine-counted prompt tokens per trace row, for each tool.
    ours_tok = {r["index"]: r["input_tokens"] for r in ours["records"] if not r.get("error")}
    ap_tok = {}
    for line in open(out / "aiperf" / "profile_export.jsonl"):
        rec = json.loads(line)
        isl = rec.get("metrics", {}).get("input_sequence_length")
        if isl is not None:
            # session_num is the row's position in the input file (checked on output_length).
            i = rec["metadata"]["session_num"]
            osl = rec["metrics"].get("output_sequence_length", {}).get("value")
            if osl is not None and osl != trace[i]["output_length"]:
                print(f"warning: aiperf session {i} osl {osl} != trace {trace[i]['output_length']}",
                      file=sys.stderr)
            ap_tok[i] = isl["value"]

    def tok_stats(m):
        rows = [(trace[i]["input_length"], n) for i, n in m.items()]
        ratios = [n / t for t, n in rows if t > 0]
        tsum = sum(t for t, _ in rows)
        nsum = sum(n for _, n in rows)
        sq = sum(n * n for _, n in rows) / max(1, sum(t * t for t, _ in rows))
        return nsum / max(1, tsum), pct(ratios, 50), min(ratios), max(ratios), sq

    o_tok, a_tok = tok_stats(ours_tok), tok_stats(ap_tok)
    ttft = agg["ttft_ms"]
    lat = agg["dispatch_lateness_ms"]
    rows = [
        ("requests sent / completed / failed",
         f"{agg['requests']} / {agg['completed']} / {agg['failed']}",
         f"{int(a('completed_request_count'))} / {int(a('request_count'))} / {int(a('error_request_count') or 0)}"),
        ("benchmark duration (s)", f"{agg['duration_s']:.2f}", f"{a('benchmark_duration'):.2f}"),
        ("TTFT p50 (ms)", f"{ttft['median']:.1f}", f"{a('time_to_first_token', 'p50'):.1f}"),
        ("TTFT p90 (ms)", f"{ttft['p90']:.1f}", f"{a('time_to_first_token', 'p90'):.1f}"),
        ("TTFT mean (ms)", f"{ttft['mean']:.1f}", f"{a('time_to_first_token'):.1f}"),
        ("E2E latency p50 (ms)", f"{agg['e2el_ms']['median']:.1f}", f"{a('request_latency', 'p50'):.1f}"),
        ("request throughput (req/s)", f"{agg['request_throughput']:.2f}", f"{a('request_throughput'):.2f}"),
        ("output token throughput (tok/s)", f"{agg['output_throughput']:.0f}", f"{a('output_token_throughput'):.0f}"),
        ("output tokens (engine usage)", f"{agg['total_output_tokens']}", f"{int(a('total_output_tokens'))}"),
        ("prompt tokens (engine usage)", f"{sum(ours_tok.values())}", f"{int(sum(ap_tok.values()))}"),
        ("engine prompt tokens / trace input_length (sum)", f"{o_tok[0]:.3f}", f"{a_tok[0]:.3f}"),
        ("  per request: median [min, max]", f"{o_tok[1]:.3f} [{o_tok[2]:.2f}, {o_tok[3]:.2f}]",
         f"{a_tok[1]:.3f} [{a_tok[2]:.2f}, {a_tok[3]:.2f}]"),
        ("Σ prompt_tokens² / Σ input_length² (prefill work)", f"{o_tok[4]:.3f}", f"{a_tok[4]:.3f}"),
        ("dispatch lateness p50 / p90 / p99 (ms)",
         f"{lat['median']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f}",
         f"{a('replay_sched_lag_p50'):.1f} / {a('replay_sched_lag_p90'):.1f} / {a('replay_sched_lag_p99'):.1f}"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'metric':<{w}} | pdgate replay | aiperf |", f"|{'-' * (w + 2)}|---:|---:|"]
    lines += [f"| {m:<{w}} | {o} | {p} |" for m, o, p in rows]
    text = "\n".join(lines)
    print(text)
    (out / "compare.md").write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/aiperf-compare")
