//! `slo` (the default): Mooncake Conductor's choice against the operator's SLOs.
//!
//! For every prefill candidate predict `TTFT = queue + prefill(uncached) + transfer`, each scaled
//! by measured speed and bandwidth, and take the lowest `TTFT + w · prefill(uncached)` (the second
//! term is the compute the choice takes from the fleet; `compute_weight`, default 1): a hot
//! instance wins while its queue is short, and a cold one wins (becoming a replica) once the hot
//! queue costs more than recomputing the prefix — cache load balancing, and no herding on a
//! popular prompt. A candidate that would pull the prefix from another instance (see
//! `predict.rs`) has the pull in its TTFT, and its fleet cost adds the copy it makes in a full
//! cache (`replica_ms`). Admission judges the TTFT alone. Decode: among instances
//! with KV headroom, the lowest `decode time + w · copy`: the expected output at the TBT predicted
//! with the batch expected *when the prefill finishes* (sequences due to end by then are not
//! counted, those booked but still prefilling are), which avoids the reject/accept oscillation of
//! deciding on the current load; plus, as for a pull, the prompt blocks the decode does not cache
//! yet, which its prefix cache keeps and, full, evicts as many others for (`decode_copy_ms`). So a
//! conversation's turns stay on the decode that holds its history, where a later turn prefills
//! locally, unless another decode is faster by more than the copy costs. With admission on, a
//! request whose best TTFT or TBT misses the SLO is rejected before any prefill is spent on it,
//! unless no wait made it late: one whose prefill alone outlasts the TTFT SLO is served best
//! effort while it is small beside the instances (`slo.best_effort_share`) and this fleet's
//! prompts are reused (`slo.best_effort_min_reuse`), because refusing it would only leave its
//! prefix uncached for the requests that share it.

use super::{argmin_by, Choice, PickCtx, Policy};
use crate::candidate::Candidate;
use crate::types::{Rejection, SloBreach};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct SloPolicy;

impl Policy for SloPolicy {
    fn name(&self) -> &'static str {
        "slo"
    }

    fn pick(&mut self, ctx: &PickCtx<'_>) -> Result<Choice, Rejection> {
        let pred = ctx.predict;
        let slo = &pred.cfg.slo;
        let w = slo.compute_weight.max(0.0);
        let prefill = argmin_by(ctx.prefill, |c| {
            (
                pred.ttft_ms(ctx.key, c)
                    + w * (pred.compute_ms(ctx.key, c) + pred.replica_ms(ctx.key, c)),
                c.load.requests(),
            )
        });
        let ttft = ctx
            .prefill
            .iter()
            .find(|c| c.id == prefill)
            .map_or(0.0, |c| pred.ttft_ms(ctx.key, c));
        let at = pred.now + Duration::from_secs_f64(ttft.max(0.0) / 1000.0);

        let roomy: Vec<_> = ctx
            .decode
            .iter()
            .filter(|d| pred.has_headroom(ctx.key, d))
            .copied()
            .collect();
        let pool = if roomy.is_empty() {
            let needed = pred.decode_blocks(ctx.key);
            let largest = ctx
                .decode
                .iter()
                .map(|d| d.capacity_blocks)
                .max()
                .unwrap_or(0);
            if needed > largest {
                // Waiting would not help: no decode instance could ever hold it.
                return Err(Rejection::TooLarge { needed, largest });
            }
            if slo.admission {
                return Err(Rejection::KvFull);
            }
            ctx.decode
        } else {
            &roomy[..]
        };
        let decode = argmin_by(pool, |d| {
            (
                pred.decode_ms(ctx.key, d, at) + w * pred.decode_copy_ms(ctx.key, d),
                d.load.decode_blocks,
            )
        });
        let chosen = pool.iter().find(|d| d.id == decode);
        let tbt = chosen.map_or(0.0, |d| pred.tbt_ms(ctx.key, d, at));
        let runner = ctx.prefill.iter().find(|c| c.id == prefill);
        // A decode that holds most of the prompt prefills it itself (conditional
        // disaggregation): that is the first token to judge, with no handoff in it.
        let (ttft, alone) = match (chosen, runner) {
            (Some(d), _) if pred.prefills_locally(ctx.key, d) => (
                pred.prefill_ms(ctx.key, d),
                pred.prefill_ms(ctx.key, &idle(d)),
            ),
            (_, Some(p)) => (ttft, pred.ttft_ms(ctx.key, &idle(p))),
            _ => (ttft, ttft),
        };
        let ttft = ttft + ctx.waited_ms.max(0.0);
        let late = ttft > slo.ttft_ms && !best_effort(ctx, ttft, alone, runner.zip(chosen));
        if slo.admission && late {
            return Err(Rejection::Slo {
                breach: SloBreach::Ttft,
                predicted_ms: ttft,
                slo_ms: slo.ttft_ms,
            });
        }
        if slo.admission && tbt > slo.tbt_ms {
            return Err(Rejection::Slo {
                breach: SloBreach::Tbt,
                predicted_ms: tbt,
                slo_ms: slo.tbt_ms,
            });
        }
        Ok(Choice { prefill, decode })
    }
}

/// Whether a request predicted `ttft` ms to its first token, `alone` ms on an idle instance, is
/// served best effort: no wait made it late (it is late alone, and the wait ahead is within
/// the SLO), it is small beside its prefill's cache and decode's pool, and the fleet's prompts
/// are reused.
fn best_effort(
    ctx: &PickCtx<'_>,
    ttft: f64,
    alone: f64,
    pair: Option<(&Candidate, &Candidate)>,
) -> bool {
    let (pred, slo) = (ctx.predict, &ctx.predict.cfg.slo);
    let share = slo.best_effort_share.max(0.0);
    let small = |(p, d): (&Candidate, &Candidate)| {
        let prompt_blocks =
            u64::from(ctx.key.prompt_tokens).div_ceil(pred.cfg.block_size.max(1) as u64);
        prompt_blocks as f64 <= share * p.capacity_blocks as f64
            && pred.decode_blocks(ctx.key) as f64 <= share * d.capacity_blocks as f64
    };
    alone > slo.ttft_ms
        && ttft - alone <= slo.ttft_ms
        && ctx.reuse >= slo.best_effort_min_reuse
        && pair.is_some_and(small)
}

/// `c` with nothing queued: what the request would take there on its own.
fn idle(c: &Candidate) -> Candidate {
    Candidate {
        queue_ms: 0.0,
        joinable_tokens: None,
        ..*c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerConfig;
    use crate::policy::testing::*;
    use crate::types::InstanceId;

    #[test]
    fn hot_instance_wins_until_its_queue_outweighs_the_recompute() {
        let cfg = SchedulerConfig::default();
        let mut p: Vec<_> = (0..2).map(cand).collect();
        p[0].matched_blocks = 250; // 4000 of 4096 tokens cached
        let d = [cand(9)];
        let k = key(4096);
        assert_eq!(
            pick(&mut SloPolicy, &cfg, &k, &p, &d).unwrap().prefill,
            InstanceId(0)
        );
        // Cold recompute of 4096 tokens ≈ 85 ms; a hot queue of 8000 tokens ≈ 164 ms.
        p[0].queue_ms = cfg.cost.prefill_ms(8000); // one step
        assert_eq!(
            pick(&mut SloPolicy, &cfg, &k, &p, &d).unwrap().prefill,
            InstanceId(1),
            "replicate instead of queueing"
        );
    }

    #[test]
    fn compute_weight_keeps_a_moderately_queued_cache_holder() {
        let mut cfg = SchedulerConfig::default();
        let mut p: Vec<_> = (0..2).map(cand).collect();
        p[0].matched_blocks = 250;
        p[0].queue_ms = 120.0; // hot: 120 + 18 ms; cold: 85 ms of recompute
        let d = [cand(9)];
        let k = key(4096);
        cfg.slo.compute_weight = 0.0;
        assert_eq!(
            pick(&mut SloPolicy, &cfg, &k, &p, &d).unwrap().prefill,
            InstanceId(1),
            "fastest first token"
        );
        cfg.slo.compute_weight = 1.0;
        assert_eq!(
            pick(&mut SloPolicy, &cfg, &k, &p, &d).unwrap().prefill,
            InstanceId(0),
            "the recompute saved is worth 50 ms"
        );
    }

    #[test]
    fn a_pull_into_a_full_cache_is_charged_the_copy_it_makes() {
        let cfg = SchedulerConfig::default();
        let mut p: Vec<_> = (0..2).map(cand).collect();
        let k = key(4096);
        p[0].matched_blocks = 250;
        p[0].queue_ms = 60.0; // hot: 60 + 18 ms
                              // Cold could pull the 250 blocks (32.8 MB ≈ 18 ms at 2 GB/s) and compute 96 tokens.
        p[1].pull = Some(crate::candidate::Pull {
            from: InstanceId(0),
            upto_blocks: 250,
            bytes: 250 * 16 * 8192,
            ms: 18.4,
        });
        let d = [cand(9)];
        p[1].cached_blocks = 0; // roomy: the copy costs nothing, the faster pull wins
        assert_eq!(
            pick(&mut SloPolicy, &cfg, &k, &p, &d).unwrap().prefill,
            InstanceId(1)
        );
        p[1].cached_blocks = p[1].capacity_blocks; // full: the copy evicts a recompute's worth
        assert_eq!(
            pick(&mut SloPolicy, &cfg, &k, &p, &d).unwrap().prefill,
            InstanceId(0)
        );
    }

    #[test]
    fn rejects_at_the_ttft_boundary_and_not_below() {
        let mut cfg = SchedulerConfig::default();
        let mut p = [cand(0)];
        p[0].queue_ms = 500.0; // the wait is what makes it late
        let d = [cand(1)];
        let k = key(2000);
        let predict = crate::predict::Predictor {
            cfg: &cfg,
            bytes_per_ms: cfg.cost.prior_bytes_per_ms(),
            now: Duration::ZERO,
            ends_before: &no_ends,
        };
        let ttft = predict.ttft_ms(&k, &p[0]);
        cfg.slo.ttft_ms = ttft; // exactly at the SLO: admitted
        assert!(pick(&mut SloPolicy, &cfg, &k, &p, &d).is_ok());
        cfg.slo.ttft_ms = ttft - 0.001;
        match pick(&mut SloPolicy, &cfg, &k, &p, &d) {
            Err(Rejection::Slo {
                breach: SloBreach::Ttft,
                predicted_ms,
                ..
            }) => assert!((predicted_ms - ttft).abs() < 1e-9),
            other => panic!("expected a TTFT rejection, got {other:?}"),
        }
        cfg.slo.admission = false;
        assert!(
            pick(&mut SloPolicy, &cfg, &k, &p, &d).is_ok(),
            "admission off never rejects"
        );
    }

    /// A prompt whose prefill alone outlasts the SLO is served best effort on an idle fleet
    /// (refusing it frees nothing and leaves its prefix uncached), but refused when a queue
    /// longer than the SLO is ahead of it, when it is large beside the instances, when
    /// `best_effort_share` is 0, or when the fleet's prompts are too little reused.
    #[test]
    fn a_request_late_even_alone_is_served_best_effort_while_small() {
        let mut cfg = SchedulerConfig::default();
        let mut p = [cand(0)];
        let mut d = [cand(1)];
        let k = key(30_000); // 1,875 blocks; ~0.85 s of prefill alone
        cfg.slo.ttft_ms = 500.0;
        let late = |r: Result<Choice, Rejection>| {
            matches!(
                r,
                Err(Rejection::Slo {
                    breach: SloBreach::Ttft,
                    ..
                })
            )
        };
        assert!(pick(&mut SloPolicy, &cfg, &k, &p, &d).is_ok(), "idle fleet");
        p[0].queue_ms = 450.0;
        assert!(
            pick(&mut SloPolicy, &cfg, &k, &p, &d).is_ok(),
            "wait within the SLO"
        );
        p[0].queue_ms = 550.0;
        assert!(
            late(pick(&mut SloPolicy, &cfg, &k, &p, &d)),
            "the wait alone is late"
        );
        p[0].queue_ms = 0.0;
        p[0].capacity_blocks = 6_000;
        assert!(
            late(pick(&mut SloPolicy, &cfg, &k, &p, &d)),
            "a third of the cache"
        );
        p[0].capacity_blocks = 10_000;
        d[0].capacity_blocks = 6_000;
        assert!(
            late(pick(&mut SloPolicy, &cfg, &k, &p, &d)),
            "a third of the pool"
        );
        d[0].capacity_blocks = 10_000;
        cfg.slo.best_effort_share = 0.0;
        assert!(late(pick(&mut SloPolicy, &cfg, &k, &p, &d)), "turned off");
        // Where prompts are not reused, its prefix would serve no one.
        cfg.slo.best_effort_share = 0.25;
        let with_reuse = |reuse: f64| pick_after(&mut SloPolicy, &cfg, &k, &p, &d, 0.0, reuse);
        let min = cfg.slo.best_effort_min_reuse;
        assert!(with_reuse(min).is_ok());
        assert!(late(with_reuse(min - 0.05)), "too little reuse");
    }

    #[test]
    fn decode_needs_headroom_and_low_tbt() {
        let mut cfg = SchedulerConfig::default();
        let p = [cand(0)];
        let mut d: Vec<_> = (1..4).map(cand).collect();
        d[0].load.decode_seqs = 10;
        d[0].load.decode_tokens = 10_000;
        d[1].capacity_blocks = 10; // too small for a 512-token prompt
        d[2].load.decode_seqs = 20;
        d[2].load.decode_tokens = 20_000;
        assert_eq!(
            pick(&mut SloPolicy, &cfg, &key(512), &p, &d)
                .unwrap()
                .decode,
            InstanceId(1)
        );
        cfg.slo.tbt_ms = 6.0;
        assert!(matches!(
            pick(&mut SloPolicy, &cfg, &key(512), &p, &d),
            Err(Rejection::Slo {
                breach: SloBreach::Tbt,
                ..
            })
        ));
        let full: Vec<_> = d
            .iter()
            .map(|c| crate::candidate::Candidate {
                capacity_blocks: 1,
                ..*c
            })
            .collect();
        assert!(matches!(
            pick(&mut SloPolicy, &cfg, &key(512), &p, &full),
            Err(Rejection::TooLarge {
                needed: 33,
                largest: 1
            })
        ));
        let busy: Vec<_> = d
            .iter()
            .map(|c| crate::candidate::Candidate {
                load: crate::load::InstanceLoad {
                    decode_blocks: c.capacity_blocks,
                    ..c.load
                },
                ..*c
            })
            .collect();
        assert_eq!(
            pick(&mut SloPolicy, &cfg, &key(512), &p, &busy),
            Err(Rejection::KvFull),
            "full now, not forever"
        );
    }

    #[test]
    fn a_request_its_decode_prefills_locally_is_judged_on_that_path() {
        let cfg = SchedulerConfig::default();
        let mut p = [cand(0)];
        p[0].queue_ms = 5_000.0; // through the prefill instance: far past the 2 s TTFT
        let mut d = [cand(1)];
        let k = key(4096);
        assert!(matches!(
            pick(&mut SloPolicy, &cfg, &k, &p, &d),
            Err(Rejection::Slo {
                breach: SloBreach::Ttft,
                ..
            })
        ));
        // The decode holds 250 of the 256 blocks: it prefills the rest itself, in ~18 ms.
        d[0].matched_blocks = 250;
        let c = pick(&mut SloPolicy, &cfg, &k, &p, &d).expect("admitted on the local path");
        assert_eq!(c.decode, InstanceId(1));
    }

    #[test]
    fn time_already_waited_for_room_counts_into_the_ttft_judged() {
        let cfg = SchedulerConfig::default();
        let (p, d, k) = ([cand(0)], [cand(1)], key(2000));
        let predict = crate::predict::Predictor {
            cfg: &cfg,
            bytes_per_ms: cfg.cost.prior_bytes_per_ms(),
            now: Duration::ZERO,
            ends_before: &no_ends,
        };
        let ttft = predict.ttft_ms(&k, &p[0]);
        let after = |waited_ms: f64| pick_after(&mut SloPolicy, &cfg, &k, &p, &d, waited_ms, 1.0);
        assert!(after(cfg.slo.ttft_ms - ttft).is_ok(), "exactly at the SLO");
        match after(cfg.slo.ttft_ms - ttft + 1.0) {
            Err(Rejection::Slo {
                breach: SloBreach::Ttft,
                predicted_ms,
                ..
            }) => assert!((predicted_ms - cfg.slo.ttft_ms - 1.0).abs() < 1e-6),
            other => panic!("expected a TTFT rejection, got {other:?}"),
        }
    }

    #[test]
    fn decode_load_is_forecast_at_prefill_completion() {
        let cfg = SchedulerConfig::default();
        let p = [cand(0)];
        let mut d: Vec<_> = (1..3).map(cand).collect();
        d[0].load.decode_seqs = 30; // busy now, but all 30 end before our prefill finishes
        d[0].load.decode_tokens = 30_000;
        d[1].load.decode_seqs = 5;
        d[1].load.decode_tokens = 5_000;
        let ends = |id: InstanceId, _at: Duration| if id == InstanceId(1) { 30 } else { 0 };
        let predict = crate::predict::Predictor {
            cfg: &cfg,
            bytes_per_ms: cfg.cost.prior_bytes_per_ms(),
            now: Duration::ZERO,
            ends_before: &ends,
        };
        let k = key(512);
        let c = SloPolicy
            .pick(&crate::policy::PickCtx {
                key: &k,
                prefill: &p,
                decode: &d,
                predict: &predict,
                waited_ms: 0.0,
                reuse: 1.0,
            })
            .unwrap();
        assert_eq!(c.decode, InstanceId(1));
    }
}
