//! `round_robin`: each role cycles through its candidates independently. The baseline the public
//! PD proxies ship with.

use super::{Choice, PickCtx, Policy};
use crate::candidate::Candidate;
use crate::types::{InstanceId, Rejection};

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

    fn pick(&mut self, ctx: &PickCtx<'_>) -> Result<Choice, Rejection> {
        Ok(Choice {
            prefill: next(&mut self.prefill, ctx.prefill),
            decode: next(&mut self.decode, ctx.decode),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerConfig;
    use crate::policy::testing::*;

    #[test]
    fn cycles_each_role_independently() {
        let cfg = SchedulerConfig::default();
        let p: Vec<_> = (0..3).map(cand).collect();
        let d: Vec<_> = (10..12).map(cand).collect();
        let mut rr = RoundRobin::default();
        let picks: Vec<_> = (0..4)
            .map(|_| pick(&mut rr, &cfg, &key(10), &p, &d).map(|c| (c.prefill.0, c.decode.0)))
            .collect();
        assert_eq!(
            picks,
            vec![Ok((0, 10)), Ok((1, 11)), Ok((2, 10)), Ok((0, 11))]
        );
    }
}
