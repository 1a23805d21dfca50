//! `least_load`: per role, the least-loaded candidate. Prefill: fewest requests, then fewest
//! queued prefill tokens. Decode: fewest sequences, then fewest context tokens. Ties go to the
//! lowest id, so the choice is deterministic.

use super::{argmin_by, Choice, PickCtx, Policy};
use crate::types::Rejection;

#[derive(Debug, Default)]
pub struct LeastLoad;

impl Policy for LeastLoad {
    fn name(&self) -> &'static str {
        "least_load"
    }

    fn pick(&mut self, ctx: &PickCtx<'_>) -> Result<Choice, Rejection> {
        let prefill = argmin_by(ctx.prefill, |c| (c.load.requests(), c.load.prefill_tokens));
        let decode = argmin_by(ctx.decode, |c| {
            (
                c.load.decode_seqs.max(c.load.requests()),
                c.load.decode_tokens,
            )
        });
        Ok(Choice { prefill, decode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerConfig;
    use crate::policy::testing::*;
    use crate::types::InstanceId;

    #[test]
    fn picks_fewest_requests_then_tokens_then_id() {
        let cfg = SchedulerConfig::default();
        let mut p = [cand(0), cand(1), cand(2)];
        p[0].load.in_flight = 2;
        (p[1].load.in_flight, p[1].load.prefill_tokens) = (1, 500);
        (p[2].load.in_flight, p[2].load.prefill_tokens) = (1, 100);
        let d = [cand(3), cand(5)];
        let c = pick(&mut LeastLoad, &cfg, &key(1), &p, &d).unwrap();
        assert_eq!((c.prefill, c.decode), (InstanceId(2), InstanceId(3)));
    }
}
