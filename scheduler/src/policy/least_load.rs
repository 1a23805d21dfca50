//! `least_load`: per role, the candidate with the fewest in-flight requests, then the fewest
//! tokens, then the lowest id (so ties are deterministic).

use super::{Candidate, Policy};
use crate::scheduler::RequestKey;
use crate::types::InstanceId;

#[derive(Debug, Default)]
pub struct LeastLoad;

fn least(candidates: &[Candidate]) -> InstanceId {
    candidates
        .iter()
        .min_by_key(|c| (c.load.in_flight, c.load.tokens, c.id))
        .map(|c| c.id)
        .unwrap_or(InstanceId(0))
}

impl Policy for LeastLoad {
    fn name(&self) -> &'static str {
        "least_load"
    }

    fn pick(
        &mut self,
        _req: &RequestKey,
        prefill: &[Candidate],
        decode: &[Candidate],
    ) -> (InstanceId, InstanceId) {
        (least(prefill), least(decode))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::InstanceLoad;

    #[test]
    fn picks_fewest_in_flight_then_tokens_then_id() {
        let c = |id, in_flight, tokens| Candidate {
            id: InstanceId(id),
            load: InstanceLoad { in_flight, tokens },
        };
        let p = [c(0, 2, 10), c(1, 1, 500), c(2, 1, 100)];
        let d = [c(5, 0, 0), c(3, 0, 0)];
        assert_eq!(
            LeastLoad.pick(&RequestKey::default(), &p, &d),
            (InstanceId(2), InstanceId(3))
        );
    }
}
