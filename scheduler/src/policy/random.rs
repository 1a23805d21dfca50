//! `random`: uniform choice per role from a seeded generator, so runs are reproducible.

use super::{Candidate, Policy};
use crate::scheduler::RequestKey;
use crate::types::InstanceId;
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

    fn pick(
        &mut self,
        _req: &RequestKey,
        prefill: &[Candidate],
        decode: &[Candidate],
    ) -> (InstanceId, InstanceId) {
        let p = prefill[self.rng.random_range(0..prefill.len())].id;
        let d = decode[self.rng.random_range(0..decode.len())].id;
        (p, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::InstanceLoad;

    fn cands(n: u32) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                id: InstanceId(i),
                load: InstanceLoad::default(),
            })
            .collect()
    }

    #[test]
    fn same_seed_same_sequence_and_all_instances_used() {
        let (p, d) = (cands(4), cands(4));
        let key = RequestKey::default();
        let run = |seed| {
            let mut r = Random::new(seed);
            (0..200).map(|_| r.pick(&key, &p, &d)).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        for i in 0..4 {
            assert!(a.iter().any(|(x, _)| x.0 == i), "prefill {i} never chosen");
            assert!(a.iter().any(|(_, y)| y.0 == i), "decode {i} never chosen");
        }
    }
}
