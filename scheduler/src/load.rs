//! Gateway-local load of one instance: what the gateway itself has sent and not seen finish.
//!
//! Only counters the gateway can keep exactly without asking the engine; engine-reported metrics
//! arrive through the scheduler issue's load model.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InstanceLoad {
    /// Requests sent to the instance (in this role) and not yet finished.
    pub in_flight: u32,
    /// Prompt tokens of those requests: queued prefill work on a prefill instance, resident
    /// context on a decode instance.
    pub tokens: u64,
}

impl InstanceLoad {
    pub fn add(&mut self, tokens: u64) {
        self.in_flight = self.in_flight.saturating_add(1);
        self.tokens = self.tokens.saturating_add(tokens);
    }

    pub fn remove(&mut self, tokens: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.tokens = self.tokens.saturating_sub(tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_remove_returns_to_zero_and_never_underflows() {
        let mut l = InstanceLoad::default();
        l.add(100);
        l.add(50);
        assert_eq!(
            l,
            InstanceLoad {
                in_flight: 2,
                tokens: 150
            }
        );
        l.remove(100);
        l.remove(50);
        l.remove(50);
        assert_eq!(l, InstanceLoad::default());
    }
}
