//! Turns a configured `PolicyKind` into its policy: the one place that names every
//! implementation, kept apart from the `Policy` trait so the implementations can import the trait
//! without the trait's file importing them back.

use super::cache_aware::CacheAware;
use super::kv_cost::KvCost;
use super::least_load::LeastLoad;
use super::power_of_two::PowerOfTwo;
use super::random::Random;
use super::round_robin::RoundRobin;
use super::slo::SloPolicy;
use super::Policy;
use crate::config::{PolicyKind, SchedulerConfig};

impl PolicyKind {
    pub fn build(self, cfg: &SchedulerConfig) -> Box<dyn Policy> {
        match self {
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
            PolicyKind::Random => Box::new(Random::new(cfg.seed)),
            PolicyKind::PowerOfTwo => Box::new(PowerOfTwo::new(cfg.seed)),
            PolicyKind::LeastLoad => Box::new(LeastLoad),
            PolicyKind::CacheAware => Box::new(CacheAware::new(cfg.cache_aware.clone())),
            PolicyKind::KvCost => Box::new(KvCost::new(cfg.kv_cost.clone(), cfg.seed)),
            PolicyKind::Slo => Box::new(SloPolicy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_the_policy_of_its_name() {
        let cfg = SchedulerConfig::default();
        for k in PolicyKind::ALL {
            assert_eq!(k.build(&cfg).name(), k.as_str());
        }
    }
}
