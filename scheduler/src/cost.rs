//! Predictions from the cost model: prefill, queue, transfer and decode-step times in ms.
//! Pure arithmetic over the configured prior and the measured corrections.

use crate::config::CostModel;

impl CostModel {
    /// Compute time of one prefill step over `tokens` uncached tokens.
    pub fn prefill_ms(&self, tokens: u64) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        let t = tokens as f64;
        self.prefill_a * t * t + self.prefill_b * t + self.prefill_c
    }

    pub fn decode_step_ms(&self, batch: u64, context_tokens: u64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        self.decode_base_ms
            + self.decode_per_seq_ms * batch as f64
            + self.decode_per_ktoken_ms * context_tokens as f64 / 1000.0
    }

    /// The same model for engines running `factor` times as slow (the reference engine's
    /// `time_scale`): compute terms scale, transfer bandwidth does not.
    pub fn time_scaled(&self, factor: f64) -> CostModel {
        let f = factor.max(0.0);
        CostModel {
            prefill_a: self.prefill_a * f,
            prefill_b: self.prefill_b * f,
            prefill_c: self.prefill_c * f,
            decode_base_ms: self.decode_base_ms * f,
            decode_per_seq_ms: self.decode_per_seq_ms * f,
            decode_per_ktoken_ms: self.decode_per_ktoken_ms * f,
            ..self.clone()
        }
    }

    pub fn prior_bytes_per_ms(&self) -> f64 {
        self.transfer_gbps * 1e6
    }
}

/// Exponentially weighted moving average that starts at a prior.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    value: f64,
    alpha: f64,
}

impl Ewma {
    pub fn new(prior: f64, alpha: f64) -> Self {
        Self {
            value: prior,
            alpha: alpha.clamp(0.0, 1.0),
        }
    }

    pub fn get(&self) -> f64 {
        self.value
    }

    pub fn update(&mut self, sample: f64) {
        if sample.is_finite() {
            self.value += self.alpha * (sample - self.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_and_decode_follow_the_model() {
        let m = CostModel::default();
        assert_eq!(m.prefill_ms(0), 0.0);
        let one = m.prefill_ms(1000);
        assert!((one - (4.21e-7 * 1e6 + 15.18 + 16.5)).abs() < 1e-9);
        assert_eq!(m.decode_step_ms(0, 5), 0.0);
        assert!((m.decode_step_ms(10, 50_000) - (6.0 + 0.4 + 1.0)).abs() < 1e-9);
    }

    #[test]
    fn time_scaling_scales_compute_not_bandwidth() {
        let m = CostModel::default();
        let q = m.time_scaled(0.25);
        assert!((q.prefill_ms(4000) - 0.25 * m.prefill_ms(4000)).abs() < 1e-9);
        assert!((q.decode_step_ms(8, 9000) - 0.25 * m.decode_step_ms(8, 9000)).abs() < 1e-9);
        assert_eq!(q.prior_bytes_per_ms(), m.prior_bytes_per_ms());
    }

    #[test]
    fn ewma_moves_toward_samples_and_ignores_nan() {
        let mut e = Ewma::new(1.0, 0.5);
        e.update(3.0);
        assert_eq!(e.get(), 2.0);
        e.update(f64::NAN);
        assert_eq!(e.get(), 2.0);
    }
}
