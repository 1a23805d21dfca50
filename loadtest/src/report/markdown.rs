//! Tables: the summary a person reads — in the terminal at the end of a run and in `report.md` —
//! with several reports (simulated policies) side by side, one column each.
//!
//! Both renderings come from the same rows so the terminal and the file never disagree.

use super::file::write_file;
use super::types::Report;
use crate::error::Result;
use crate::metrics::Summary;
use std::fmt::Write;
use std::path::Path;

type SummaryOf = fn(&Report) -> &Summary;

/// `(metric, one cell per report)`.
pub fn rows(reports: &[Report]) -> Vec<(String, Vec<String>)> {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&Report) -> String| {
        rows.push((name.to_string(), reports.iter().map(f).collect()));
    };
    let f1 = |x: f64| format!("{x:.1}");
    let f2 = |x: f64| format!("{x:.2}");
    row("requests (ok / failed)", &|r| {
        format!("{} / {}", r.aggregates.completed, r.aggregates.failed)
    });
    row("duration (s)", &|r| f2(r.aggregates.duration_s));
    row("request throughput (req/s)", &|r| {
        f2(r.aggregates.request_throughput)
    });
    row("input tokens", &|r| {
        r.aggregates.total_input_tokens.to_string()
    });
    row("output tokens", &|r| {
        r.aggregates.total_output_tokens.to_string()
    });
    row("output throughput (tok/s)", &|r| {
        f1(r.aggregates.output_throughput)
    });
    row("total token throughput (tok/s)", &|r| {
        f1(r.aggregates.total_token_throughput)
    });
    row("goodput (req/s)", &|r| {
        r.aggregates.request_goodput.map_or("-".into(), |g| {
            format!("{g:.2} ({})", r.aggregates.good_requests.unwrap_or(0))
        })
    });
    row("prefix cache hit rate", &|r| {
        r.aggregates
            .cache_hit_rate
            .map_or("-".into(), |h| format!("{:.1}%", h * 100.0))
    });
    let stats: [(&str, SummaryOf); 5] = [
        ("TTFT", |r| &r.aggregates.ttft_ms),
        ("TPOT", |r| &r.aggregates.tpot_ms),
        ("ITL", |r| &r.aggregates.itl_ms),
        ("E2EL", |r| &r.aggregates.e2el_ms),
        ("dispatch lateness", |r| &r.aggregates.dispatch_lateness_ms),
    ];
    for (name, get) in stats {
        for (q, pick) in [
            ("mean", (|s: &Summary| s.mean) as fn(&Summary) -> f64),
            ("median", |s| s.median),
            ("p90", |s| s.p90),
            ("p95", |s| s.p95),
            ("p99", |s| s.p99),
        ] {
            if name == "dispatch lateness" && !matches!(q, "median" | "p99") {
                continue;
            }
            row(&format!("{name} {q} (ms)"), &|r| f2(pick(get(r))));
        }
    }
    let mut kinds: Vec<String> = reports
        .iter()
        .flat_map(|r| r.aggregates.errors.keys().cloned())
        .collect();
    kinds.sort();
    kinds.dedup();
    for k in kinds {
        row(&format!("errors {k}"), &|r| {
            r.aggregates
                .errors
                .get(&k)
                .copied()
                .unwrap_or(0)
                .to_string()
        });
    }
    rows
}

fn headers(reports: &[Report]) -> Vec<String> {
    reports.iter().map(|r| r.label.clone()).collect()
}

/// Aligned plain-text table for the terminal.
pub fn terminal(reports: &[Report]) -> String {
    let rows = rows(reports);
    let heads = headers(reports);
    let w0 = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..reports.len())
        .map(|i| {
            rows.iter()
                .map(|(_, c)| c[i].chars().count())
                .chain([heads[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let _ = write!(out, "{:<w0$}", "");
    for (h, w) in heads.iter().zip(&widths) {
        let _ = write!(out, "  {h:>w$}");
    }
    out.push('\n');
    let total = w0 + widths.iter().map(|w| w + 2).sum::<usize>();
    out.push_str(&"─".repeat(total));
    out.push('\n');
    for (name, cells) in rows {
        let _ = write!(out, "{name:<w0$}");
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "  {c:>w$}");
        }
        out.push('\n');
    }
    out
}

pub fn markdown(reports: &[Report]) -> String {
    let mut out = String::new();
    let kind = reports.first().map_or("replay", |r| r.kind.as_str());
    let _ = writeln!(out, "# pdgate {kind} report\n");
    for r in reports {
        let _ = writeln!(
            out,
            "- **{}**: {} requests, wall time {:.2} s{}",
            r.label,
            r.aggregates.requests,
            r.wall_s,
            if r.not_sent > 0 {
                format!(", {} not sent (duration limit)", r.not_sent)
            } else {
                String::new()
            }
        );
    }
    out.push('\n');
    let _ = write!(out, "| metric |");
    for h in headers(reports) {
        let _ = write!(out, " {h} |");
    }
    let _ = write!(out, "\n|---|");
    for _ in reports {
        out.push_str("---:|");
    }
    out.push('\n');
    for (name, cells) in rows(reports) {
        let _ = write!(out, "| {name} |");
        for c in cells {
            let _ = write!(out, " {c} |");
        }
        out.push('\n');
    }
    for r in reports.iter().filter(|r| !r.instances.is_empty()) {
        let _ = writeln!(out, "\n## Per-instance load: {}\n", r.label);
        out.push_str("| instance | role | requests | prompt tokens | generated tokens | hit rate |\n|---|---|---:|---:|---:|---:|\n");
        for i in &r.instances {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                i.id,
                i.role,
                i.requests,
                i.prompt_tokens,
                i.generated_tokens,
                i.cache_hit_rate
                    .map_or("-".into(), |h| format!("{:.1}%", h * 100.0))
            );
        }
    }
    for r in reports.iter().filter(|r| !r.skipped.is_empty()) {
        let _ = writeln!(out, "\n## Skipped trace records ({})\n", r.skipped.len());
        for s in r.skipped.iter().take(50) {
            let _ = writeln!(out, "- `{s}`");
        }
    }
    out.push_str("\nPlots: `ttft_cdf.svg`, `e2el_cdf.svg`, `latency_over_time.svg`, `throughput_over_time.svg`, `instance_load.svg`.\n");
    out
}

pub fn write(dir: &Path, reports: &[Report]) -> Result<String> {
    write_file(&dir.join("report.md"), markdown(reports).as_bytes())
}
