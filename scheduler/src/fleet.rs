//! The instances a scheduler knows, in a dense table indexed by `InstanceId`, plus per role an
//! ordered set of the healthy ones by load, so the least-loaded few are found without scanning
//! the fleet. Every mutation of an instance goes through `update`, which keeps the set in step.

use crate::cost::Ewma;
use crate::load::InstanceLoad;
use crate::steps::StepQueue;
use crate::types::{InstanceId, Role, Ticket};
use std::collections::BTreeSet;
use std::time::Duration;

#[derive(Debug)]
pub struct Instance {
    pub role: Role,
    pub healthy: bool,
    pub capacity_blocks: u64,
    /// Takes the evict-first mark on a handed-off prompt's copy (`copies.rs`).
    pub marks_copies: bool,
    pub load: InstanceLoad,
    pub speed: Ewma,
    /// When the prefill work booked here is predicted to be done.
    pub busy_until: Duration,
    /// That work, packed into steps as the engine batches it.
    pub prefills: StepQueue,
    /// When the pulls other instances booked from this one are predicted to have been served.
    pub egress_until: Duration,
    /// Predicted end of each sequence decoding here: (end time, ticket).
    pub decode_ends: BTreeSet<(Duration, Ticket)>,
}

type LoadKey = (u64, u64, InstanceId);

fn load_key(id: InstanceId, i: &Instance) -> LoadKey {
    match i.role {
        Role::Prefill => (i.load.prefill_tokens, u64::from(i.load.requests()), id),
        Role::Decode => (u64::from(i.load.decode_seqs), i.load.decode_tokens, id),
    }
}

fn slot(role: Role) -> usize {
    match role {
        Role::Prefill => 0,
        Role::Decode => 1,
    }
}

/// Adds `inst`'s cache blocks to (or takes them from) its role's sum.
fn count(sums: &mut [u64; 2], inst: &Instance, add: bool) {
    let sum = &mut sums[slot(inst.role)];
    *sum = if add {
        sum.saturating_add(inst.capacity_blocks)
    } else {
        sum.saturating_sub(inst.capacity_blocks)
    };
}

#[derive(Debug, Default)]
pub struct Fleet {
    table: Vec<Option<Instance>>,
    by_load: [BTreeSet<LoadKey>; 2],
    /// Cache blocks of the healthy instances, per role.
    capacity: [u64; 2],
}

impl Fleet {
    pub fn insert(&mut self, id: InstanceId, inst: Instance) {
        let i = id.0 as usize;
        if self.table.len() <= i {
            self.table.resize_with(i + 1, || None);
        }
        self.remove(id);
        if inst.healthy {
            self.by_load[slot(inst.role)].insert(load_key(id, &inst));
            count(&mut self.capacity, &inst, true);
        }
        self.table[i] = Some(inst);
    }

    pub fn remove(&mut self, id: InstanceId) {
        if let Some(old) = self.table.get_mut(id.0 as usize).and_then(Option::take) {
            if old.healthy {
                self.by_load[slot(old.role)].remove(&load_key(id, &old));
                count(&mut self.capacity, &old, false);
            }
        }
    }

    pub fn get(&self, id: InstanceId) -> Option<&Instance> {
        self.table.get(id.0 as usize).and_then(Option::as_ref)
    }

    /// Applies `f` to the instance, keeping the load order in step.
    pub fn update(&mut self, id: InstanceId, f: impl FnOnce(&mut Instance)) {
        let Some(inst) = self.table.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return;
        };
        let (set, capacity) = (&mut self.by_load[slot(inst.role)], &mut self.capacity);
        if inst.healthy {
            set.remove(&load_key(id, inst));
            count(capacity, inst, false);
        }
        f(inst);
        if inst.healthy {
            set.insert(load_key(id, inst));
            count(capacity, inst, true);
        }
    }

    /// The healthy `role` instances' share of the healthy fleet's cache blocks (0 when empty).
    pub fn cache_share(&self, role: Role) -> f64 {
        let total = self.capacity[0] + self.capacity[1];
        if total == 0 {
            0.0
        } else {
            self.capacity[slot(role)] as f64 / total as f64
        }
    }

    /// Every instance, healthy or not, in id order.
    pub fn all(&self) -> impl Iterator<Item = (InstanceId, &Instance)> {
        self.table
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|inst| (InstanceId(i as u32), inst)))
    }

    pub fn healthy_count(&self, role: Role) -> usize {
        self.by_load[slot(role)].len()
    }

    /// Healthy instances of `role`, least loaded first.
    pub fn least_loaded(&self, role: Role) -> impl Iterator<Item = InstanceId> + '_ {
        self.by_load[slot(role)].iter().map(|(_, _, id)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(role: Role) -> Instance {
        Instance {
            role,
            healthy: true,
            capacity_blocks: 1,
            marks_copies: false,
            load: InstanceLoad::default(),
            speed: Ewma::new(1.0, 0.1),
            busy_until: Duration::ZERO,
            prefills: StepQueue::default(),
            egress_until: Duration::ZERO,
            decode_ends: BTreeSet::new(),
        }
    }

    #[test]
    fn cache_share_follows_health_capacity_and_removal() {
        let mut f = Fleet::default();
        f.insert(InstanceId(0), inst(Role::Prefill));
        assert_eq!(f.cache_share(Role::Prefill), 1.0);
        for i in 1..4 {
            f.insert(InstanceId(i), inst(Role::Decode));
        }
        assert_eq!(f.cache_share(Role::Prefill), 0.25);
        f.update(InstanceId(0), |i| i.capacity_blocks = 3);
        assert_eq!(f.cache_share(Role::Prefill), 0.5);
        f.update(InstanceId(1), |i| i.healthy = false);
        assert_eq!(f.cache_share(Role::Decode), 0.4);
        f.remove(InstanceId(1)); // unhealthy: already out of the sums
        f.remove(InstanceId(2));
        assert_eq!(f.cache_share(Role::Decode), 0.25);
        f.remove(InstanceId(0));
        assert_eq!(f.cache_share(Role::Prefill), 0.0);
    }

    #[test]
    fn load_order_follows_updates_and_health() {
        let mut f = Fleet::default();
        for i in 0..3 {
            f.insert(InstanceId(i), inst(Role::Prefill));
        }
        f.insert(InstanceId(3), inst(Role::Decode));
        f.update(InstanceId(0), |i| i.load.prefill_tokens = 500);
        f.update(InstanceId(1), |i| i.load.prefill_tokens = 100);
        let order: Vec<_> = f.least_loaded(Role::Prefill).map(|i| i.0).collect();
        assert_eq!(order, vec![2, 1, 0]);
        f.update(InstanceId(2), |i| i.healthy = false);
        assert_eq!(
            f.least_loaded(Role::Prefill)
                .map(|i| i.0)
                .collect::<Vec<_>>(),
            vec![1, 0]
        );
        assert_eq!(f.healthy_count(Role::Prefill), 2);
        assert_eq!(f.healthy_count(Role::Decode), 1);
        f.update(InstanceId(2), |i| i.healthy = true);
        f.remove(InstanceId(0));
        assert_eq!(
            f.least_loaded(Role::Prefill)
                .map(|i| i.0)
                .collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert!(f.get(InstanceId(0)).is_none());
        assert_eq!(f.all().count(), 3);
    }
}
