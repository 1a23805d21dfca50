//! `random`: uniform choice per role from a seeded generator, so runs are reproducible.

use super::{Choice, PickCtx, Policy};
use crate::types::Rejection;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Debug)]
pub struct Random {
    rng: SmallRng,
}

impl Random {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
        }
    }
}

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn pick(&mut self, ctx: &PickCtx<'_>) -> Result<Choice, Rejection> {
        let prefill = ctx.prefill[self.rng.random_range(0..ctx.prefill.len())].id;
        let decode = ctx.decode[self.rng.random_range(0..ctx.decode.len())].id;
        Ok(Choice { prefill, decode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerConfig;
    use crate::policy::testing::*;

    #[test]
    fn same_seed_same_sequence_and_all_instances_used() {
        let cfg = SchedulerConfig::default();
        let p: Vec<_> = (0..4).map(cand).collect();
        let run = |seed| {
            let mut r = Random::new(seed);
            (0..200)
                .map(|_| pick(&mut r, &cfg, &key(1), &p, &p).map(|c| (c.prefill.0, c.decode.0)))
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        for i in 0..4 {
            assert!(a.iter().any(|(x, _)| *x == i), "prefill {i} never chosen");
            assert!(a.iter().any(|(_, y)| *y == i), "decode {i} never chosen");
        }
    }
}
