//! `power_of_two`: per role, sample two distinct candidates at random and take the less loaded
//! (the "power of two choices"): near least-load balance without every gateway piling onto the
//! same instance.

use super::{Choice, PickCtx, Policy};
use crate::candidate::Candidate;
use crate::types::{InstanceId, Rejection};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Debug)]
pub struct PowerOfTwo {
    rng: SmallRng,
}

impl PowerOfTwo {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    fn two<K: Ord>(&mut self, cands: &[Candidate], load: impl Fn(&Candidate) -> K) -> InstanceId {
        if cands.len() == 1 {
            return cands[0].id;
        }
        let a = self.rng.random_range(0..cands.len());
        let mut b = self.rng.random_range(0..cands.len() - 1);
        if b >= a {
            b += 1;
        }
        let (x, y) = (&cands[a], &cands[b]);
        if load(y) < load(x) {
            y.id
        } else {
            x.id
        }
    }
}

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power_of_two"
    }

    fn pick(&mut self, ctx: &PickCtx<'_>) -> Result<Choice, Rejection> {
        let prefill = self.two(ctx.prefill, |c| (c.load.requests(), c.load.prefill_tokens));
        let decode = self.two(ctx.decode, |c| (c.load.decode_seqs, c.load.decode_tokens));
        Ok(Choice { prefill, decode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerConfig;
    use crate::policy::testing::*;

    #[test]
    fn never_picks_the_most_loaded_of_many_and_handles_one() {
        let cfg = SchedulerConfig::default();
        let mut p: Vec<_> = (0..4).map(cand).collect();
        p[2].load.in_flight = 100;
        let mut pol = PowerOfTwo::new(3);
        for _ in 0..200 {
            let c = pick(&mut pol, &cfg, &key(1), &p, &p[..1]).unwrap();
            assert_ne!(c.prefill, InstanceId(2), "the loaded one loses every duel");
            assert_eq!(c.decode, InstanceId(0));
        }
    }
}
