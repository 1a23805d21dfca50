//! What the scheduler learns of the fleet's prompts, one sample per request: how much of each
//! some instance already cached, and how large a typical one is.

use crate::cost::Ewma;

/// Weight of one request: about the last hundred count, so one prompt, fully cached or not at
/// all, moves the reuse estimate by a point.
const ALPHA: f64 = 0.01;

#[derive(Debug)]
pub struct PromptStats {
    /// Share of a prompt's blocks some instance already cached (`slo.best_effort_min_reuse`).
    reuse: Ewma,
    /// Share of prompts cached almost whole (`copies.rs`).
    near_whole: Ewma,
    /// Blocks of a typical prompt, averaged from the first sample on.
    blocks: Option<Ewma>,
    samples: u64,
}

impl Default for PromptStats {
    fn default() -> Self {
        Self {
            // No reuse until some is seen.
            reuse: Ewma::new(0.0, ALPHA),
            near_whole: Ewma::new(0.0, ALPHA),
            blocks: None,
            samples: 0,
        }
    }
}

impl PromptStats {
    /// A prompt of `blocks` blocks whose leading `cached` some instance holds; it counts as
    /// cached almost whole from `near_whole_share` of it.
    pub fn sample(&mut self, blocks: usize, cached: u32, near_whole_share: f64) {
        if blocks == 0 {
            return;
        }
        let n = blocks as f64;
        let share = f64::from(cached) / n;
        self.reuse.update(share);
        self.near_whole
            .update(f64::from(u8::from(share >= near_whole_share)));
        self.blocks
            .get_or_insert_with(|| Ewma::new(n, ALPHA))
            .update(n);
        self.samples += 1;
    }

    pub fn reuse(&self) -> f64 {
        self.reuse.get()
    }

    pub fn near_whole(&self) -> f64 {
        self.near_whole.get()
    }

    /// Blocks of a typical prompt, once as many requests as the averages span were seen
    /// (before, the first turns of conversations would stand for the fleet).
    pub fn typical_blocks(&self) -> Option<f64> {
        let span = (1.0 / ALPHA) as u64;
        self.blocks
            .as_ref()
            .filter(|_| self.samples >= span)
            .map(Ewma::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_typical_prompt_is_known_after_a_hundred_and_follows_the_fleet() {
        let mut s = PromptStats::default();
        for i in 0..99 {
            s.sample(100, 0, 0.9);
            assert_eq!(s.typical_blocks(), None, "sample {i}");
        }
        s.sample(100, 0, 0.9);
        assert_eq!(s.typical_blocks(), Some(100.0));
        for _ in 0..500 {
            s.sample(300, 0, 0.9);
        }
        let typical = s.typical_blocks().unwrap_or(0.0);
        assert!((typical - 300.0).abs() < 5.0, "{typical}");
        s.sample(0, 0, 0.9); // an empty prompt is no sample
        assert_eq!(s.samples, 600);
    }

    #[test]
    fn reuse_and_the_near_whole_share_follow_what_was_cached() {
        let mut s = PromptStats::default();
        assert_eq!((s.reuse(), s.near_whole()), (0.0, 0.0));
        // Every other prompt 95 % cached, the rest 50 %.
        for i in 0..1000 {
            s.sample(100, if i % 2 == 0 { 95 } else { 50 }, 0.9);
        }
        assert!((s.reuse() - 0.725).abs() < 0.03, "{}", s.reuse());
        assert!((s.near_whole() - 0.5).abs() < 0.03, "{}", s.near_whole());
    }
}
