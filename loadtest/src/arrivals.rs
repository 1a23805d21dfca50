//! When each request is due: at its trace time (divided by a speed-up factor), on a Poisson or
//! gamma process of a given rate, or — closed loop — whenever one of N slots frees up.
//!
//! It only computes due times; it never sleeps or sends (the replayer does), so the same
//! schedule feeds the simulator.

use crate::error::{LoadtestError, Result};
use crate::trace::types::Trace;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Trace timestamps divided by `speed` (2.0 = twice as fast).
    TraceTime { speed: f64 },
    /// A gamma process of `rate` requests/s; `burstiness` is the shape (1 = Poisson).
    Rate {
        rate: f64,
        burstiness: f64,
        seed: u64,
    },
    /// Closed loop: `concurrency` requests outstanding at all times.
    Closed { concurrency: usize },
}

impl Mode {
    /// Picks the mode from command-line choices; trace time needs timestamps.
    pub fn choose(
        trace: &Trace,
        speed: f64,
        rate: Option<f64>,
        burstiness: f64,
        concurrency: Option<usize>,
        seed: u64,
    ) -> Result<Self> {
        if !(speed.is_finite() && speed > 0.0) {
            return Err(LoadtestError::BadOption("--speed must be > 0".into()));
        }
        match (rate, concurrency) {
            (Some(_), Some(_)) => Err(LoadtestError::BadOption(
                "--rate and --concurrency are exclusive".into(),
            )),
            (Some(rate), None) if rate > 0.0 && burstiness > 0.0 => Ok(Mode::Rate {
                rate,
                burstiness,
                seed,
            }),
            (Some(_), None) => Err(LoadtestError::BadOption(
                "--rate and --burstiness must be > 0".into(),
            )),
            (None, Some(0)) => Err(LoadtestError::BadOption("--concurrency must be ≥ 1".into())),
            (None, Some(c)) => Ok(Mode::Closed { concurrency: c }),
            (None, None) if trace.has_timestamps() => Ok(Mode::TraceTime { speed }),
            (None, None) => Err(LoadtestError::BadOption(
                "this trace has no timestamps: give --rate or --concurrency".into(),
            )),
        }
    }

    /// Due times in ms since the run start, one per request (None in closed loop).
    pub fn schedule(&self, trace: &Trace) -> Option<Vec<f64>> {
        match *self {
            Mode::TraceTime { speed } => {
                let first = trace
                    .requests
                    .iter()
                    .filter_map(|r| r.arrival_ms)
                    .fold(f64::INFINITY, f64::min);
                let first = if first.is_finite() { first } else { 0.0 };
                Some(
                    trace
                        .requests
                        .iter()
                        .map(|r| (r.arrival_ms.unwrap_or(first) - first) / speed)
                        .collect(),
                )
            }
            Mode::Rate {
                rate,
                burstiness,
                seed,
            } => {
                let mut rng = StdRng::seed_from_u64(seed);
                let gap = Gamma::new(burstiness, 1.0 / (burstiness * rate)).ok();
                let mut t = 0.0;
                Some(
                    trace
                        .requests
                        .iter()
                        .enumerate()
                        .map(|(i, _)| {
                            // The first request goes at once, as in vllm bench serve.
                            if i > 0 {
                                t += gap.map_or(1.0 / rate, |g| g.sample(&mut rng)) * 1000.0;
                            }
                            t
                        })
                        .collect(),
                )
            }
            Mode::Closed { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::types::{Prompt, TraceRequest};

    fn trace(times: &[Option<f64>]) -> Trace {
        Trace {
            requests: times
                .iter()
                .enumerate()
                .map(|(index, t)| TraceRequest {
                    index,
                    arrival_ms: *t,
                    input_tokens: 1,
                    output_tokens: 1,
                    prompt: Prompt::Text("x".into()),
                })
                .collect(),
            skipped: vec![],
        }
    }

    #[test]
    fn trace_time_is_shifted_and_sped_up() {
        let t = trace(&[Some(100.0), Some(300.0), Some(1100.0)]);
        let s = Mode::TraceTime { speed: 2.0 }.schedule(&t).unwrap();
        assert_eq!(s, vec![0.0, 100.0, 500.0]);
    }

    #[test]
    fn rate_mode_has_the_right_mean_and_burstiness_changes_spread() {
        let t = trace(&vec![None; 20_000]);
        let cv = |burstiness: f64| {
            let s = Mode::Rate {
                rate: 100.0,
                burstiness,
                seed: 3,
            }
            .schedule(&t)
            .unwrap();
            let gaps: Vec<f64> = s.windows(2).map(|w| w[1] - w[0]).collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            assert!((mean - 10.0).abs() < 0.3, "mean gap {mean}");
            var.sqrt() / mean
        };
        // Gamma with shape k has a coefficient of variation of 1/sqrt(k).
        assert!((cv(1.0) - 1.0).abs() < 0.05);
        assert!((cv(0.25) - 2.0).abs() < 0.15);
    }

    #[test]
    fn choose_validates() {
        let timed = trace(&[Some(0.0)]);
        let untimed = trace(&[None]);
        assert_eq!(
            Mode::choose(&timed, 1.0, None, 1.0, None, 0).unwrap(),
            Mode::TraceTime { speed: 1.0 }
        );
        assert!(Mode::choose(&untimed, 1.0, None, 1.0, None, 0).is_err());
        assert!(Mode::choose(&timed, 1.0, Some(1.0), 1.0, Some(2), 0).is_err());
        assert!(Mode::choose(&timed, 0.0, None, 1.0, None, 0).is_err());
        assert_eq!(
            Mode::choose(&untimed, 1.0, None, 1.0, Some(4), 0).unwrap(),
            Mode::Closed { concurrency: 4 }
        );
    }
}
