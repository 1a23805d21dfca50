//! Per-request records and their aggregates, with `vllm bench serve` definitions:
//! TTFT (dispatch to first content token), TPOT (`(E2EL − TTFT) / (output − 1)`, the first token
//! excluded, only for outputs longer than one token), ITL (every gap between consecutive content
//! chunks, pooled over requests), E2EL (dispatch to last byte); percentiles by linear
//! interpolation (numpy's default); throughputs over the benchmark duration (start to the last
//! request's end); goodput = requests meeting every given SLO per second.
//!
//! Pure arithmetic: no clock, no I/O, so the replayer and the simulator share it and it is tested
//! against hand-computed values.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub index: usize,
    /// When the request was due, ms since the run start.
    pub scheduled_ms: f64,
    /// When it was actually sent, ms since the run start.
    pub sent_ms: f64,
    pub input_tokens: u32,
    /// Output tokens produced (the server's `usage` when given, else content chunks counted).
    pub output_tokens: u32,
    pub ttft_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
    /// Gaps between consecutive content chunks, ms.
    pub itl_ms: Vec<f64>,
    /// Prompt tokens the serving side found cached (simulator; live when the server says).
    pub cached_tokens: Option<u32>,
    /// Which instance(s) served it (`p0>d1` in the simulator), when known.
    pub instance: Option<String>,
    pub error: Option<RequestError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestError {
    /// HTTP status, when the server answered one.
    pub status: Option<u16>,
    /// A short class: the OpenAI error `type`/`code`, or `connect`, `timeout`, `stream`, …
    pub kind: String,
    pub message: String,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.e2el_ms.is_some()
    }

    pub fn lateness_ms(&self) -> f64 {
        (self.sent_ms - self.scheduled_ms).max(0.0)
    }

    /// vLLM's TPOT: decode time per token after the first; None for single-token outputs.
    pub fn tpot_ms(&self) -> Option<f64> {
        let (ttft, e2el) = (self.ttft_ms?, self.e2el_ms?);
        (self.output_tokens > 1).then(|| (e2el - ttft) / f64::from(self.output_tokens - 1))
    }

    pub fn end_ms(&self) -> Option<f64> {
        self.e2el_ms.map(|e| self.sent_ms + e)
    }
}

/// Latency SLOs for goodput, ms; a missing bound is not checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Slo {
    pub fn is_empty(&self) -> bool {
        self.ttft_ms.is_none() && self.tpot_ms.is_none() && self.e2el_ms.is_none()
    }

    /// Parses `ttft=MS,tpot=MS,e2el=MS` (any subset).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("SLO `{part}` is not name=ms"))?;
            let ms: f64 = v
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("SLO `{part}` needs a positive number of ms"))?;
            match k {
                "ttft" => slo.ttft_ms = Some(ms),
                "tpot" => slo.tpot_ms = Some(ms),
                "e2el" => slo.e2el_ms = Some(ms),
                other => return Err(format!("unknown SLO `{other}` (ttft, tpot, e2el)")),
            }
        }
        Ok(slo)
    }

    /// vLLM's rule: a request is good when every given bound holds (TPOT of a one-token output
    /// counts as 0).
    pub fn met_by(&self, r: &RequestRecord) -> bool {
        let within = |bound: Option<f64>, v: Option<f64>| match bound {
            None => true,
            Some(b) => v.is_some_and(|v| v <= b),
        };
        r.ok()
            && within(self.ttft_ms, r.ttft_ms)
            && within(self.tpot_ms, Some(r.tpot_ms().unwrap_or(0.0)))
            && within(self.e2el_ms, r.e2el_ms)
    }
}

/// Distribution summary of one latency, ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        // Population standard deviation, as numpy's `std` (vLLM's report).
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        Self {
            count: v.len(),
            mean,
            median: percentile(&v, 50.0),
            std,
            p90: percentile(&v, 90.0),
            p95: percentile(&v, 95.0),
            p99: percentile(&v, 99.0),
            max: v[v.len() - 1],
        }
    }
}

/// Linear-interpolation percentile of sorted values (numpy's default method).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = p.clamp(0.0, 100.0) / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregates {
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// Start of the run to the end of the last request, seconds.
    pub duration_s: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Requests per second meeting every SLO (None without SLOs).
    pub request_goodput: Option<f64>,
    pub good_requests: Option<usize>,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2el_ms: Summary,
    /// How late requests were dispatched relative to their due time.
    pub dispatch_lateness_ms: Summary,
    /// Errors counted by `status/kind` (status `-` when there was no HTTP answer).
    pub errors: BTreeMap<String, usize>,
    /// Prefix-cache hit rate over prompt tokens, from the server's counters (or the simulator).
    pub cache_hit_rate: Option<f64>,
}

impl Aggregates {
    pub fn compute(records: &[RequestRecord], slo: &Slo) -> Self {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
        let duration_ms = records
            .iter()
            .filter_map(RequestRecord::end_ms)
            .fold(0.0, f64::max);
        let duration_s = duration_ms / 1000.0;
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let total_input: u64 = ok.iter().map(|r| u64::from(r.input_tokens)).sum();
        let total_output: u64 = ok.iter().map(|r| u64::from(r.output_tokens)).sum();
        let collect = |f: &dyn Fn(&RequestRecord) -> Option<f64>| -> Vec<f64> {
            ok.iter().filter_map(|r| f(r)).collect()
        };
        let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect();
        let mut errors = BTreeMap::new();
        for r in records {
            if let Some(e) = &r.error {
                let status = e.status.map_or_else(|| "-".to_string(), |s| s.to_string());
                *errors.entry(format!("{status}/{}", e.kind)).or_insert(0) += 1;
            }
        }
        let good = (!slo.is_empty()).then(|| records.iter().filter(|r| slo.met_by(r)).count());
        let lateness: Vec<f64> = records.iter().map(RequestRecord::lateness_ms).collect();
        Self {
            requests: records.len(),
            completed: ok.len(),
            failed: records.len() - ok.len(),
            duration_s,
            total_input_tokens: total_input,
            total_output_tokens: total_output,
            request_throughput: per_s(ok.len() as f64),
            output_throughput: per_s(total_output as f64),
            total_token_throughput: per_s((total_input + total_output) as f64),
            request_goodput: good.map(|g| per_s(g as f64)),
            good_requests: good,
            ttft_ms: Summary::of(&collect(&|r| r.ttft_ms)),
            tpot_ms: Summary::of(&collect(&RequestRecord::tpot_ms)),
            itl_ms: Summary::of(&itl),
            e2el_ms: Summary::of(&collect(&|r| r.e2el_ms)),
            dispatch_lateness_ms: Summary::of(&lateness),
            errors,
            cache_hit_rate: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sent: f64, ttft: f64, itl: &[f64], out: u32) -> RequestRecord {
        let e2el = ttft + itl.iter().sum::<f64>();
        RequestRecord {
            scheduled_ms: sent,
            sent_ms: sent,
            input_tokens: 100,
            output_tokens: out,
            ttft_ms: Some(ttft),
            e2el_ms: Some(e2el),
            itl_ms: itl.to_vec(),
            ..RequestRecord::default()
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        // numpy.percentile([1,2,3,4], [50, 90, 99]) = [2.5, 3.7, 3.97]
        assert!((percentile(&v, 50.0) - 2.5).abs() < 1e-12);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s.mean, 2.5);
        assert!(
            (s.std - 1.118_033_988_749_895).abs() < 1e-12,
            "population std"
        );
        assert_eq!(s.max, 4.0);
    }

    #[test]
    fn hand_computed_aggregates() {
        // A: sent 0, TTFT 100, tokens at +10, +30 → E2EL 140, 3 tokens, TPOT 20.
        // B: sent 50, TTFT 200, one gap of 50 → E2EL 250, 2 tokens, TPOT 50. Ends at 300 ms.
        // C: failed with a 503.
        let a = rec(0.0, 100.0, &[10.0, 30.0], 3);
        let b = rec(50.0, 200.0, &[50.0], 2);
        let mut c = rec(60.0, 0.0, &[], 0);
        c.ttft_ms = None;
        c.e2el_ms = None;
        c.sent_ms = 65.0; // 5 ms late
        c.error = Some(RequestError {
            status: Some(503),
            kind: "server_error".into(),
            message: "full".into(),
        });
        let slo = Slo::parse("ttft=150,tpot=30").unwrap();
        let g = Aggregates::compute(&[a, b, c], &slo);
        assert_eq!((g.requests, g.completed, g.failed), (3, 2, 1));
        assert!((g.duration_s - 0.3).abs() < 1e-12);
        assert!((g.request_throughput - 2.0 / 0.3).abs() < 1e-9);
        assert_eq!(g.total_input_tokens, 200);
        assert_eq!(g.total_output_tokens, 5);
        assert!((g.output_throughput - 5.0 / 0.3).abs() < 1e-9);
        assert!((g.total_token_throughput - 205.0 / 0.3).abs() < 1e-9);
        assert_eq!(g.ttft_ms.mean, 150.0);
        assert_eq!(g.ttft_ms.median, 150.0);
        assert!((g.ttft_ms.p99 - 199.0).abs() < 1e-9);
        assert_eq!(g.tpot_ms.mean, 35.0);
        // ITL pooled: [10, 30, 50].
        assert_eq!(g.itl_ms.count, 3);
        assert_eq!(g.itl_ms.mean, 30.0);
        assert_eq!(g.itl_ms.median, 30.0);
        assert_eq!(g.e2el_ms.mean, 195.0);
        // Only A meets TTFT ≤ 150 and TPOT ≤ 30.
        assert_eq!(g.good_requests, Some(1));
        assert!((g.request_goodput.unwrap() - 1.0 / 0.3).abs() < 1e-9);
        assert_eq!(g.errors.get("503/server_error"), Some(&1));
        assert_eq!(g.dispatch_lateness_ms.max, 5.0);
    }

    #[test]
    fn single_token_outputs_have_no_tpot_and_pass_tpot_slo() {
        let r = rec(0.0, 10.0, &[], 1);
        assert_eq!(r.tpot_ms(), None);
        assert!(Slo::parse("tpot=1").unwrap().met_by(&r));
        assert!(!Slo::parse("ttft=5").unwrap().met_by(&r));
    }

    #[test]
    fn slo_parsing_rejects_nonsense() {
        assert!(Slo::parse("ttft=abc").is_err());
        assert!(Slo::parse("ttfx=1").is_err());
        assert!(Slo::parse("ttft=-1").is_err());
        assert_eq!(Slo::parse("e2el=9").unwrap().e2el_ms, Some(9.0));
        assert!(Slo::parse("").unwrap().is_empty());
    }
}
