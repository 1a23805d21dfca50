//! `round_robin`: each role cycles through its candidates independently. The baseline that the
//! public PD proxies ship with.

use super::{Candidate, Policy};
use crate::scheduler::RequestKey;
use crate::types::InstanceId;

#[derive(Debug, Default)]
pub struct RoundRobin {
    prefill: usize,
    decode: usize,
}

fn next(counter: &mut usize, candidates: &[Candidate]) -> InstanceId {
    let id = candidates[*counter % candidates.len()].id;
    *counter = counter.wrapping_add(1);
    id
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn pick(
        &mut self,
        _req: &RequestKey,
        prefill: &[Candidate],
        decode: &[Candidate],
    ) -> (InstanceId, InstanceId) {
        (
            next(&mut self.prefill, prefill),
            next(&mut self.decode, decode),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::InstanceLoad;

    #[test]
    fn cycles_each_role_independently() {
        let p: Vec<_> = (0..3)
            .map(|i| Candidate {
                id: InstanceId(i),
                load: InstanceLoad::default(),
            })
            .collect();
        let d: Vec<_> = (10..12)
            .map(|i| Candidate {
                id: InstanceId(i),
                load: InstanceLoad::default(),
            })
            .collect();
        let mut rr = RoundRobin::default();
        let key = RequestKey::default();
        let picks: Vec<_> = (0..4).map(|_| rr.pick(&key, &p, &d)).collect();
        let ids =
            |v: &[(InstanceId, InstanceId)]| v.iter().map(|(a, b)| (a.0, b.0)).collect::<Vec<_>>();
        assert_eq!(ids(&picks), vec![(0, 10), (1, 11), (2, 10), (0, 11)]);
    }
}
