//! `kv_cost`: NVIDIA Dynamo's KV-router cost, in blocks.
//!
//! Prefill instance: `w · max(0, queued + new − overlap) / block_size` (queued prefill tokens plus
//! this prompt, less what the instance already caches). Decode instance: the KV blocks it holds
//! for its sequences. With temperature 0 the cheapest wins (ties: smaller cache tree, then id);
//! above 0 an instance is sampled with probability ∝ `exp(−cost/max_cost / temperature)`.

use super::{Choice, PickCtx, Policy};
use crate::candidate::Candidate;
use crate::config::KvCostConfig;
use crate::types::{InstanceId, Rejection, RequestKey};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Debug)]
pub struct KvCost {
    cfg: KvCostConfig,
    rng: SmallRng,
}

impl KvCost {
    pub fn new(cfg: KvCostConfig, seed: u64) -> Self {
        Self {
            cfg,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    fn prefill_cost(&self, key: &RequestKey, bs: u64, c: &Candidate) -> f64 {
        let overlap = u64::from(c.matched_blocks) * bs;
        let tokens = (c.load.prefill_tokens + u64::from(key.prompt_tokens)).saturating_sub(overlap);
        self.cfg.prefill_weight * tokens as f64 / bs as f64
    }

    fn choose(&mut self, cands: &[Candidate], cost: impl Fn(&Candidate) -> f64) -> InstanceId {
        let costs: Vec<f64> = cands.iter().map(&cost).collect();
        if self.cfg.temperature <= 0.0 {
            let mut best = 0;
            for i in 1..cands.len() {
                let (a, b) = (&cands[i], &cands[best]);
                if (costs[i], a.cached_blocks, a.id) < (costs[best], b.cached_blocks, b.id) {
                    best = i;
                }
            }
            return cands[best].id;
        }
        let max = costs
            .iter()
            .copied()
            .fold(0.0, f64::max)
            .max(f64::MIN_POSITIVE);
        let weights: Vec<f64> = costs
            .iter()
            .map(|c| (-(c / max) / self.cfg.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut x = self.rng.random::<f64>() * total;
        for (c, w) in cands.iter().zip(&weights) {
            if x < *w {
                return c.id;
            }
            x -= w;
        }
        cands[cands.len() - 1].id
    }
}

impl Policy for KvCost {
    fn name(&self) -> &'static str {
        "kv_cost"
    }

    fn pick(&mut self, ctx: &PickCtx<'_>) -> Result<Choice, Rejection> {
        let bs = ctx.predict.cfg.block_size.max(1) as u64;
        let costs: Vec<f64> = ctx
            .prefill
            .iter()
            .map(|c| self.prefill_cost(ctx.key, bs, c))
            .collect();
        let prefill = self.choose(ctx.prefill, |c| {
            let i = ctx.prefill.iter().position(|x| x.id == c.id).unwrap_or(0);
            costs[i]
        });
        let decode = self.choose(ctx.decode, |c| c.load.decode_blocks as f64);
        Ok(Choice { prefill, decode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerConfig;
    use crate::policy::testing::*;

    #[test]
    fn cost_trades_overlap_against_queued_work() {
        let cfg = SchedulerConfig::default();
        let mut p: Vec<_> = (0..2).map(cand).collect();
        // Instance 0 caches 10 of 12 blocks but has 160 queued tokens: (160+192−160)/16 = 12.
        p[0].matched_blocks = 10;
        p[0].load.prefill_tokens = 160;
        // Instance 1 is idle and cold: 192/16 = 12. A tie: smaller tree (1 has none) wins.
        p[0].cached_blocks = 10;
        let mut pol = KvCost::new(cfg.kv_cost.clone(), 0);
        assert_eq!(
            pick(&mut pol, &cfg, &key(192), &p, &p).unwrap().prefill,
            InstanceId(1)
        );
        p[0].load.prefill_tokens = 144; // now 11 < 12
        assert_eq!(
            pick(&mut pol, &cfg, &key(192), &p, &p).unwrap().prefill,
            InstanceId(0)
        );
    }

    #[test]
    fn decode_goes_to_fewest_blocks_and_temperature_spreads() {
        let mut cfg = SchedulerConfig::default();
        let mut d: Vec<_> = (0..3).map(cand).collect();
        d[0].load.decode_blocks = 500;
        d[1].load.decode_blocks = 100;
        d[2].load.decode_blocks = 300;
        let mut pol = KvCost::new(cfg.kv_cost.clone(), 0);
        assert_eq!(
            pick(&mut pol, &cfg, &key(16), &d, &d).unwrap().decode,
            InstanceId(1)
        );
        cfg.kv_cost.temperature = 1.0;
        let mut pol = KvCost::new(cfg.kv_cost.clone(), 0);
        let picks: Vec<_> = (0..300)
            .map(|_| pick(&mut pol, &cfg, &key(16), &d, &d).unwrap().decode.0)
            .collect();
        let count = |i| picks.iter().filter(|&&x| x == i).count();
        assert!(
            count(0) > 0 && count(1) > count(2) && count(2) > count(0),
            "{:?}",
            (count(0), count(1), count(2))
        );
    }
}
