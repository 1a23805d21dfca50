//! `cache_aware`: the SGLang model gateway's policy, reproduced so users can compare.
//!
//! Per role: if load is imbalanced — `max − min > balance_abs_threshold` and
//! `max > balance_rel_threshold · min` (in requests) — take the least-loaded instance. Otherwise
//! take the instance with the longest prefix match if its match rate (matched / prompt tokens)
//! exceeds `match_threshold`, else the instance with the smallest cache tree. Defaults 64, 1.5 and
//! 0.3 are SGLang's. One difference, on purpose: matches are in tokens over the whole rendered
//! prompt, not characters of the first message.

use super::{argmin_by, Choice, PickCtx, Policy};
use crate::candidate::Candidate;
use crate::config::CacheAwareConfig;
use crate::types::{InstanceId, Rejection, RequestKey};

#[derive(Debug)]
pub struct CacheAware {
    cfg: CacheAwareConfig,
}

impl CacheAware {
    pub fn new(cfg: CacheAwareConfig) -> Self {
        Self { cfg }
    }

    fn choose(
        &self,
        key: &RequestKey,
        block_size: usize,
        cands: &[Candidate],
        load: impl Fn(&Candidate) -> u32,
    ) -> InstanceId {
        let max = cands.iter().map(&load).max().unwrap_or(0);
        let min = cands.iter().map(&load).min().unwrap_or(0);
        let imbalanced = max - min > self.cfg.balance_abs_threshold
            && f64::from(max) > self.cfg.balance_rel_threshold * f64::from(min);
        if imbalanced {
            return argmin_by(cands, |c| (load(c), c.id));
        }
        let best = argmin_by(cands, |c| {
            (std::cmp::Reverse(c.matched_blocks), load(c), c.id)
        });
        let matched = cands
            .iter()
            .find(|c| c.id == best)
            .map_or(0, |c| c.matched_blocks);
        let rate =
            (u64::from(matched) * block_size as u64) as f64 / f64::from(key.prompt_tokens.max(1));
        if rate > self.cfg.match_threshold {
            best
        } else {
            argmin_by(cands, |c| (c.cached_blocks, c.id))
        }
    }
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }

    fn pick(&mut self, ctx: &PickCtx<'_>) -> Result<Choice, Rejection> {
        let bs = ctx.predict.cfg.block_size;
        let prefill = self.choose(ctx.key, bs, ctx.prefill, |c| c.load.requests());
        let decode = self.choose(ctx.key, bs, ctx.decode, |c| {
            c.load.decode_seqs.max(c.load.requests())
        });
        Ok(Choice { prefill, decode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerConfig;
    use crate::policy::testing::*;

    fn setup() -> (SchedulerConfig, Vec<Candidate>) {
        let cfg = SchedulerConfig::default();
        let mut p: Vec<_> = (0..3).map(cand).collect();
        p[0].cached_blocks = 50;
        p[1].cached_blocks = 10;
        p[2].cached_blocks = 30;
        (cfg, p)
    }

    fn prefill_of(p: &[Candidate], cfg: &SchedulerConfig, prompt: u32) -> u32 {
        let mut pol = CacheAware::new(cfg.cache_aware.clone());
        pick(&mut pol, cfg, &key(prompt), p, &p[..1])
            .unwrap()
            .prefill
            .0
    }

    #[test]
    fn good_match_wins_weak_match_goes_to_smallest_tree() {
        let (cfg, mut p) = setup();
        p[2].matched_blocks = 4; // 64 of 160 tokens = 0.4 > 0.3
        assert_eq!(prefill_of(&p, &cfg, 160), 2);
        p[2].matched_blocks = 2; // 32 of 160 = 0.2
        assert_eq!(prefill_of(&p, &cfg, 160), 1, "smallest tree");
    }

    #[test]
    fn imbalance_gate_needs_both_thresholds() {
        let (cfg, mut p) = setup();
        p[2].matched_blocks = 10;
        p[2].load.in_flight = 100;
        p[0].load.in_flight = 30;
        p[1].load.in_flight = 35;
        // 100 − 30 = 70 > 64 and 100 > 1.5·30: least loaded wins over the match.
        assert_eq!(prefill_of(&p, &cfg, 160), 0);
        // 100 − 40 = 60 ≤ 64: balanced enough, the match wins.
        p[0].load.in_flight = 40;
        p[1].load.in_flight = 40;
        assert_eq!(prefill_of(&p, &cfg, 160), 2);
    }
}
