//! Synthetic traces from a compact spec (`synthetic:requests=500,rate=20,input=2048,...`):
//! arrivals from a gamma process (burstiness 1 = Poisson), normal input/output lengths, shared
//! system-prompt groups and multi-turn sessions, emitted as Mooncake records (block ids) so they
//! flow through the same synthesis, replay and simulation as a production trace.
//!
//! It is deterministic for a given spec (seeded) and never produces a zero-length request.

use super::types::{Prompt, Trace, TraceRequest, MOONCAKE_BLOCK_TOKENS};
use crate::error::{LoadtestError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Gamma, Normal};
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub requests: usize,
    /// Mean arrivals per second.
    pub rate: f64,
    /// Gamma shape of inter-arrival times: 1 is Poisson, below 1 burstier, above 1 smoother.
    pub burstiness: f64,
    pub input_mean: f64,
    pub input_sd: f64,
    pub output_mean: f64,
    pub output_sd: f64,
    /// Number of shared-prefix groups (0 = no shared system prompt).
    pub groups: usize,
    /// Tokens of each group's shared prefix (whole 512-token blocks are shared).
    pub prefix: usize,
    /// Turns per session: turn k's prompt starts with turn k-1's prompt.
    pub turns: usize,
    /// Think time between turns of a session, in milliseconds.
    pub think_ms: f64,
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            requests: 1000,
            rate: 10.0,
            burstiness: 1.0,
            input_mean: 2048.0,
            input_sd: 512.0,
            output_mean: 128.0,
            output_sd: 32.0,
            groups: 0,
            prefix: 1024,
            turns: 1,
            think_ms: 5000.0,
            seed: 1,
        }
    }
}

impl FromStr for Spec {
    type Err = LoadtestError;

    fn from_str(s: &str) -> Result<Self> {
        let mut spec = Spec::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| LoadtestError::BadSpec(format!("`{part}` is not key=value")))?;
            let num = |v: &str| -> Result<f64> {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| LoadtestError::BadSpec(format!("`{k}={v}` needs a number ≥ 0")))
            };
            let int = |v: &str| -> Result<usize> {
                v.parse::<usize>()
                    .map_err(|_| LoadtestError::BadSpec(format!("`{k}={v}` needs a whole number")))
            };
            match k {
                "requests" | "n" => spec.requests = int(v)?,
                "rate" => spec.rate = num(v)?,
                "burstiness" => spec.burstiness = num(v)?,
                "input" => spec.input_mean = num(v)?,
                "input_sd" => spec.input_sd = num(v)?,
                "output" => spec.output_mean = num(v)?,
                "output_sd" => spec.output_sd = num(v)?,
                "groups" => spec.groups = int(v)?,
                "prefix" => spec.prefix = int(v)?,
                "turns" => spec.turns = int(v)?.max(1),
                "think_ms" => spec.think_ms = num(v)?,
                "seed" => spec.seed = int(v)? as u64,
                other => return Err(LoadtestError::BadSpec(format!("unknown key `{other}`"))),
            }
        }
        if spec.rate <= 0.0 || spec.burstiness <= 0.0 {
            return Err(LoadtestError::BadSpec(
                "rate and burstiness must be > 0".into(),
            ));
        }
        Ok(spec)
    }
}

impl Spec {
    pub fn generate(&self) -> Trace {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut next_id = 0u64;
        let mut fresh = |n: usize| -> Vec<u64> {
            let ids = (next_id..next_id + n as u64).collect();
            next_id += n as u64;
            ids
        };
        let prefix_blocks = self.prefix / MOONCAKE_BLOCK_TOKENS;
        let groups: Vec<Vec<u64>> = (0..self.groups).map(|_| fresh(prefix_blocks)).collect();
        // Shape k, scale 1/(k·rate): mean 1/rate whatever the burstiness.
        let gap = Gamma::new(self.burstiness, 1.0 / (self.burstiness * self.rate)).ok();
        let len = |rng: &mut StdRng, mean: f64, sd: f64| -> u32 {
            let x = Normal::new(mean, sd.max(0.0)).map_or(mean, |d| d.sample(rng));
            x.round().clamp(1.0, u32::MAX as f64) as u32
        };

        let mut out = Vec::with_capacity(self.requests);
        let mut t_session = 0.0f64;
        while out.len() < self.requests {
            t_session += gap.map_or(1.0 / self.rate, |g| g.sample(&mut rng)) * 1000.0;
            let shared = if groups.is_empty() {
                Vec::new()
            } else {
                groups[rng.random_range(0..groups.len())].clone()
            };
            let mut context: Vec<u64> = shared;
            let mut context_tokens = context.len() * MOONCAKE_BLOCK_TOKENS;
            for turn in 0..self.turns {
                if out.len() >= self.requests {
                    break;
                }
                let input = context_tokens as u32 + len(&mut rng, self.input_mean, self.input_sd);
                let output = len(&mut rng, self.output_mean, self.output_sd);
                // The prompt keeps the context's whole blocks and adds fresh ones for the rest.
                let total_blocks = (input as usize).div_ceil(MOONCAKE_BLOCK_TOKENS);
                let mut ids = context.clone();
                ids.extend(fresh(total_blocks.saturating_sub(ids.len())));
                out.push(TraceRequest {
                    index: 0,
                    arrival_ms: Some(t_session + turn as f64 * self.think_ms),
                    input_tokens: input,
                    output_tokens: output,
                    prompt: Prompt::HashIds(ids.clone()),
                });
                // The next turn shares this prompt's full blocks (a partial last block's id
                // names exactly its tokens, so a longer block is a different id).
                let full = input as usize / MOONCAKE_BLOCK_TOKENS;
                ids.truncate(full);
                context = ids;
                context_tokens = full * MOONCAKE_BLOCK_TOKENS;
            }
        }
        out.sort_by(|a, b| {
            a.arrival_ms
                .unwrap_or(0.0)
                .total_cmp(&b.arrival_ms.unwrap_or(0.0))
        });
        for (i, r) in out.iter_mut().enumerate() {
            r.index = i;
        }
        Trace {
            requests: out,
            skipped: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_rejects_unknown_keys() {
        let s: Spec = "requests=10,rate=5,groups=2,prefix=1024,turns=3"
            .parse()
            .unwrap();
        assert_eq!((s.requests, s.rate, s.groups, s.turns), (10, 5.0, 2, 3));
        assert!("bogus=1".parse::<Spec>().is_err());
        assert!("rate=0".parse::<Spec>().is_err());
        assert!("rate".parse::<Spec>().is_err());
    }

    #[test]
    fn groups_share_prefix_blocks_and_rate_is_honoured() {
        let s: Spec = "requests=2000,rate=50,groups=1,prefix=1024,input=600,input_sd=0"
            .parse()
            .unwrap();
        let t = s.generate();
        assert_eq!(t.requests.len(), 2000);
        for r in &t.requests {
            let Prompt::HashIds(ids) = &r.prompt else {
                panic!()
            };
            assert_eq!(
                &ids[..2],
                &[0, 1],
                "every request starts with the group's 2 blocks"
            );
            assert_eq!(r.input_tokens, 1624);
            assert_eq!(ids.len(), 4);
        }
        let mean_rate = 2000.0 / (t.span_ms() / 1000.0);
        assert!((mean_rate - 50.0).abs() < 5.0, "{mean_rate}");
    }

    #[test]
    fn session_turns_extend_the_previous_prompt() {
        let s: Spec = "requests=3,turns=3,input=1024,input_sd=0,think_ms=100"
            .parse()
            .unwrap();
        let t = s.generate();
        let ids: Vec<_> = t
            .requests
            .iter()
            .map(|r| match &r.prompt {
                Prompt::HashIds(v) => v.clone(),
                Prompt::Text(_) => unreachable!(),
            })
            .collect();
        assert_eq!(ids[0].len(), 2);
        assert_eq!(&ids[1][..2], &ids[0][..]);
        assert_eq!(&ids[2][..4], &ids[1][..]);
        assert_eq!(t.requests[2].input_tokens, 3072);
    }
}
