//! SVG plots (plotters): TTFT and E2E-latency CDFs, latency and throughput over time, and
//! per-instance load — several reports (simulated policies) as series in one chart.
//!
//! SVG because it renders text as SVG text elements, needing no font files or system font
//! libraries on a bare server; plotting never fails a run silently — an error names the plot.

use super::file::write_file;
use super::types::Report;
use crate::error::{LoadtestError, Result};
use plotters::prelude::*;
use std::path::Path;

const SIZE: (u32, u32) = (900, 520);
/// Buckets of the over-time plots.
const BUCKETS: usize = 60;

type Series = (String, Vec<(f64, f64)>);

pub fn write(dir: &Path, reports: &[Report]) -> Result<Vec<String>> {
    let ok = |r: &Report, f: fn(&crate::metrics::RequestRecord) -> Option<f64>| -> Vec<f64> {
        r.records.iter().filter(|x| x.ok()).filter_map(f).collect()
    };
    let cdf_of = |f: fn(&crate::metrics::RequestRecord) -> Option<f64>| -> Vec<Series> {
        reports
            .iter()
            .map(|r| (r.label.clone(), cdf(ok(r, f))))
            .collect()
    };
    let mut out = Vec::new();
    let plots: Vec<(&str, &str, &str, &str, Vec<Series>)> = vec![
        (
            "ttft_cdf.svg",
            "TTFT CDF",
            "TTFT (ms)",
            "fraction of requests",
            cdf_of(|r| r.ttft_ms),
        ),
        (
            "e2el_cdf.svg",
            "End-to-end latency CDF",
            "E2EL (ms)",
            "fraction of requests",
            cdf_of(|r| r.e2el_ms),
        ),
        (
            "latency_over_time.svg",
            "Mean TTFT over time (by dispatch time)",
            "time (s)",
            "TTFT (ms)",
            reports
                .iter()
                .map(|r| (r.label.clone(), ttft_over_time(r)))
                .collect(),
        ),
        (
            "throughput_over_time.svg",
            "Output throughput over time (by completion time)",
            "time (s)",
            "output tokens/s",
            reports
                .iter()
                .map(|r| (r.label.clone(), throughput_over_time(r)))
                .collect(),
        ),
        (
            "instance_load.svg",
            "Prompt tokens per instance",
            "instance",
            "prompt tokens",
            reports
                .iter()
                .map(|r| {
                    let pts = r
                        .instances
                        .iter()
                        .enumerate()
                        .map(|(i, x)| (i as f64, x.prompt_tokens as f64))
                        .collect();
                    (r.label.clone(), pts)
                })
                .collect(),
        ),
    ];
    for (file, title, x, y, series) in plots {
        let svg = line_chart(title, x, y, &series).map_err(|message| LoadtestError::Plot {
            file: file.into(),
            message,
        })?;
        out.push(write_file(&dir.join(file), svg.as_bytes())?);
    }
    Ok(out)
}

/// Empirical CDF points of `values`.
pub fn cdf(mut values: Vec<f64>) -> Vec<(f64, f64)> {
    values.sort_by(f64::total_cmp);
    let n = values.len() as f64;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v, (i + 1) as f64 / n))
        .collect()
}

fn bucket_width_s(r: &Report) -> f64 {
    (r.aggregates.duration_s / BUCKETS as f64).max(0.001)
}

fn ttft_over_time(r: &Report) -> Vec<(f64, f64)> {
    let w = bucket_width_s(r);
    let mut sums = vec![(0.0, 0usize); BUCKETS + 1];
    for rec in r.records.iter().filter(|x| x.ok()) {
        if let Some(t) = rec.ttft_ms {
            let b = ((rec.sent_ms / 1e3 / w) as usize).min(BUCKETS);
            sums[b].0 += t;
            sums[b].1 += 1;
        }
    }
    sums.iter()
        .enumerate()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(i, (s, n))| ((i as f64 + 0.5) * w, s / *n as f64))
        .collect()
}

fn throughput_over_time(r: &Report) -> Vec<(f64, f64)> {
    let w = bucket_width_s(r);
    let mut tokens = vec![0.0; BUCKETS + 1];
    for rec in r.records.iter().filter(|x| x.ok()) {
        if let Some(end) = rec.end_ms() {
            tokens[((end / 1e3 / w) as usize).min(BUCKETS)] += f64::from(rec.output_tokens);
        }
    }
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((i as f64 + 0.5) * w, t / w))
        .collect()
}

fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let pts = series.iter().flat_map(|(_, p)| p.iter());
        let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
        for (x, y) in pts {
            x_max = x_max.max(*x);
            y_max = y_max.max(*y);
        }
        let x_max = if x_max > 0.0 { x_max * 1.05 } else { 1.0 };
        let y_max = if y_max > 0.0 { y_max * 1.05 } else { 1.0 };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(|x| e(&x))?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_is_monotone_and_ends_at_one() {
        let c = cdf(vec![3.0, 1.0, 2.0, 2.0]);
        assert_eq!(c.first(), Some(&(1.0, 0.25)));
        assert_eq!(c.last(), Some(&(3.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
    }

    #[test]
    fn charts_render_svg_with_labels() {
        let svg = line_chart("T", "x", "y", &[("a".into(), vec![(0.0, 1.0), (1.0, 2.0)])]).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains(">\nT\n</text>"), "caption is SVG text");
    }
}
