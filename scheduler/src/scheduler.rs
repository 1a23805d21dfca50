//! The scheduler state machine: the fleet as the gateway sees it, fed with events (instance
//! added, health changed, leg finished) and asked for decisions.
//!
//! Every decision books load on the chosen pair at once, so requests arriving in a burst see each
//! other; the caller must report each leg's end with [`Scheduler::finish`] exactly once.

use crate::blocks::BlockHash;
use crate::load::InstanceLoad;
use crate::policy::{Candidate, Policy, PolicyKind};
use crate::types::{InstanceId, Role};
use std::collections::BTreeMap;
use thiserror::Error;

/// What the scheduler knows of a request: its size and its prefix key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestKey {
    pub prompt_tokens: u32,
    pub blocks: Vec<BlockHash>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub prefill: InstanceId,
    pub decode: InstanceId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Rejection {
    #[error("no healthy {0} instance")]
    NoHealthy(Role),
}

#[derive(Debug, Clone)]
struct Instance {
    role: Role,
    healthy: bool,
    load: InstanceLoad,
}

pub struct Scheduler {
    instances: BTreeMap<InstanceId, Instance>,
    policy: Box<dyn Policy>,
    next_id: u32,
}

impl Scheduler {
    pub fn new(policy: PolicyKind, seed: u64) -> Self {
        Self {
            instances: BTreeMap::new(),
            policy: policy.build(seed),
            next_id: 0,
        }
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Adds an instance, healthy until told otherwise.
    pub fn add_instance(&mut self, role: Role) -> InstanceId {
        let id = InstanceId(self.next_id);
        self.next_id += 1;
        self.instances.insert(
            id,
            Instance {
                role,
                healthy: true,
                load: InstanceLoad::default(),
            },
        );
        id
    }

    pub fn remove_instance(&mut self, id: InstanceId) {
        self.instances.remove(&id);
    }

    pub fn set_healthy(&mut self, id: InstanceId, healthy: bool) {
        if let Some(i) = self.instances.get_mut(&id) {
            i.healthy = healthy;
        }
    }

    pub fn is_healthy(&self, id: InstanceId) -> bool {
        self.instances.get(&id).is_some_and(|i| i.healthy)
    }

    pub fn load(&self, id: InstanceId) -> Option<InstanceLoad> {
        self.instances.get(&id).map(|i| i.load)
    }

    /// Healthy instance count per role: `(prefill, decode)`.
    pub fn healthy_counts(&self) -> (usize, usize) {
        self.instances
            .values()
            .filter(|i| i.healthy)
            .fold((0, 0), |(p, d), i| match i.role {
                Role::Prefill => (p + 1, d),
                Role::Decode => (p, d + 1),
            })
    }

    /// Picks a pair among healthy instances, excluding `avoid` (e.g. a prefill that just failed),
    /// and books the request's load on both.
    pub fn schedule(
        &mut self,
        key: &RequestKey,
        avoid: &[InstanceId],
    ) -> Result<Decision, Rejection> {
        let prefill = self.candidates(Role::Prefill, avoid);
        let decode = self.candidates(Role::Decode, avoid);
        if prefill.is_empty() {
            return Err(Rejection::NoHealthy(Role::Prefill));
        }
        if decode.is_empty() {
            return Err(Rejection::NoHealthy(Role::Decode));
        }
        let (p, d) = self.policy.pick(key, &prefill, &decode);
        let tokens = u64::from(key.prompt_tokens);
        for id in [p, d] {
            if let Some(i) = self.instances.get_mut(&id) {
                i.load.add(tokens);
            }
        }
        Ok(Decision {
            prefill: p,
            decode: d,
        })
    }

    /// Reports that the leg of a request on `id` ended (success or not).
    pub fn finish(&mut self, id: InstanceId, prompt_tokens: u32) {
        if let Some(i) = self.instances.get_mut(&id) {
            i.load.remove(u64::from(prompt_tokens));
        }
    }

    fn candidates(&self, role: Role, avoid: &[InstanceId]) -> Vec<Candidate> {
        self.instances
            .iter()
            .filter(|(id, i)| i.role == role && i.healthy && !avoid.contains(id))
            .map(|(&id, i)| Candidate { id, load: i.load })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tokens: u32) -> RequestKey {
        RequestKey {
            prompt_tokens: tokens,
            blocks: vec![],
        }
    }

    #[test]
    fn books_and_releases_load_on_both_legs() {
        let mut s = Scheduler::new(PolicyKind::LeastLoad, 0);
        let p = s.add_instance(Role::Prefill);
        let d = s.add_instance(Role::Decode);
        let dec = s.schedule(&key(40), &[]).expect("pair");
        assert_eq!(
            dec,
            Decision {
                prefill: p,
                decode: d
            }
        );
        assert_eq!(
            s.load(p),
            Some(InstanceLoad {
                in_flight: 1,
                tokens: 40
            })
        );
        assert_eq!(
            s.load(d),
            Some(InstanceLoad {
                in_flight: 1,
                tokens: 40
            })
        );
        s.finish(p, 40);
        s.finish(d, 40);
        assert_eq!(s.load(p), Some(InstanceLoad::default()));
        assert_eq!(s.load(d), Some(InstanceLoad::default()));
    }

    #[test]
    fn least_load_spreads_a_burst() {
        let mut s = Scheduler::new(PolicyKind::LeastLoad, 0);
        let ps: Vec<_> = (0..2).map(|_| s.add_instance(Role::Prefill)).collect();
        s.add_instance(Role::Decode);
        let a = s.schedule(&key(10), &[]).expect("pair");
        let b = s.schedule(&key(10), &[]).expect("pair");
        assert_ne!(a.prefill, b.prefill);
        assert!(ps.contains(&a.prefill) && ps.contains(&b.prefill));
    }

    #[test]
    fn unhealthy_and_avoided_instances_are_never_chosen() {
        let mut s = Scheduler::new(PolicyKind::RoundRobin, 0);
        let p0 = s.add_instance(Role::Prefill);
        let p1 = s.add_instance(Role::Prefill);
        let d0 = s.add_instance(Role::Decode);
        s.set_healthy(p0, false);
        for _ in 0..5 {
            assert_eq!(s.schedule(&key(1), &[]).expect("pair").prefill, p1);
        }
        assert_eq!(
            s.schedule(&key(1), &[p1]),
            Err(Rejection::NoHealthy(Role::Prefill))
        );
        s.set_healthy(d0, false);
        s.set_healthy(p0, true);
        assert_eq!(
            s.schedule(&key(1), &[]),
            Err(Rejection::NoHealthy(Role::Decode))
        );
        assert_eq!(s.healthy_counts(), (2, 0));
    }
}
