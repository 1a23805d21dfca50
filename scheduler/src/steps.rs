//! The prefill work booked on one instance, packed into steps the way a continuous-batching
//! engine packs its queue: in arrival order, as many prefills as fit in `max_batched_tokens`
//! (one larger than that runs alone). A step costs `prefill_ms` of all its tokens once, so
//! small prefills queued together cost far less than one after another: sixteen 512-token
//! prefills are one ~170 ms step, not sixteen ~24 ms ones. Summing prefills one by one
//! overpredicted a queue of mostly cached prompts by up to 2.3x, and admission then refused
//! requests that would have been on time.

use crate::config::CostModel;
use crate::types::Ticket;
use std::collections::VecDeque;

/// Booked prefills of one instance, oldest first, with their uncached tokens.
#[derive(Debug, Default, Clone)]
pub struct StepQueue {
    booked: VecDeque<(Ticket, u64)>,
    /// How many of the oldest form the step running now: it started with what was queued
    /// then, and nothing booked since can join it.
    running: usize,
    /// Tokens of the last step as packed, and how many steps there are.
    tail: Tail,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tail {
    tokens: u64,
    steps: usize,
}

impl StepQueue {
    /// Books a prefill of `tokens` behind the others; into an empty queue it starts at once.
    pub fn push(&mut self, ticket: Ticket, tokens: u64, budget: u64) {
        self.booked.push_back((ticket, tokens));
        if self.booked.len() == 1 {
            self.running = 1;
            self.tail = Tail { tokens, steps: 1 };
        } else {
            self.tail = self.tail.add(tokens, budget, self.tail.steps > 1);
        }
    }

    /// Drops `ticket`'s prefill (done, or the request ended); false if it was not booked. The
    /// engine then starts its next step with as much of the queue as fits.
    pub fn remove(&mut self, ticket: Ticket, budget: u64) -> bool {
        let Some(at) = self.booked.iter().position(|(t, _)| *t == ticket) else {
            return false;
        };
        self.booked.remove(at);
        let mut first = 0u64;
        self.running = self
            .booked
            .iter()
            .enumerate()
            .take_while(|&(i, &(_, t))| {
                first += t;
                i == 0 || first <= budget.max(1)
            })
            .count();
        self.tail = self.pack(budget, |_| {});
        true
    }

    /// Time to work through every booked prefill, step by step.
    pub fn ms(&self, cost: &CostModel) -> f64 {
        let mut total = 0.0;
        let tail = self.pack(cost.max_batched_tokens, |step| {
            total += cost.prefill_ms(step)
        });
        total + cost.prefill_ms(tail.tokens)
    }

    /// Packs the booked prefills into steps, the running one closed at `running`; `closed`
    /// gets the tokens of every step but the last, which is returned.
    fn pack(&self, budget: u64, mut closed: impl FnMut(u64)) -> Tail {
        let mut tail = Tail::default();
        for (i, &(_, t)) in self.booked.iter().enumerate() {
            let next = tail.add(t, budget, i != self.running);
            if next.steps > tail.steps && tail.steps > 0 {
                closed(tail.tokens);
            }
            tail = next;
        }
        tail
    }

    /// Tokens of the last step a new prefill could still join: it is not the step already
    /// running and has room left. `None`: a new prefill starts a step of its own.
    pub fn joinable(&self, budget: u64) -> Option<u64> {
        (self.tail.steps > 1 && self.tail.tokens < budget).then_some(self.tail.tokens)
    }
}

impl Tail {
    /// The packing after `tokens` more: into the last step if `open` and they fit (a step
    /// always takes its first prefill, however large), else as a new step.
    fn add(self, tokens: u64, budget: u64, open: bool) -> Tail {
        if open && self.steps > 0 && self.tokens + tokens <= budget.max(1) {
            Tail {
                tokens: self.tokens + tokens,
                steps: self.steps,
            }
        } else {
            Tail {
                tokens,
                steps: self.steps + 1,
            }
        }
    }
}

impl CostModel {
    /// What a prefill of `tokens` adds to a queue whose last step holds `joinable` tokens it
    /// could join: the step grows by its tokens, or it is a step of its own.
    pub fn added_prefill_ms(&self, tokens: u64, joinable: Option<u64>) -> f64 {
        match joinable {
            Some(tail) if tokens > 0 && tail + tokens <= self.max_batched_tokens.max(1) => {
                self.prefill_ms(tail + tokens) - self.prefill_ms(tail)
            }
            _ => self.prefill_ms(tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sizes` booked while the engine was busy, then its running step ended: the engine
    /// starts the next with as much as fits, as after a `remove`.
    fn queue(sizes: &[u64], cost: &CostModel) -> StepQueue {
        let budget = cost.max_batched_tokens;
        let mut q = StepQueue::default();
        q.push(Ticket(u64::MAX), 1, budget);
        for (i, &t) in sizes.iter().enumerate() {
            q.push(Ticket(i as u64), t, budget);
        }
        q.remove(Ticket(u64::MAX), budget);
        q
    }

    #[test]
    fn small_prefills_share_steps_as_the_engine_batches_them() {
        let cost = CostModel::default();
        let q = queue(&[512; 16], &cost);
        assert!(
            (q.ms(&cost) - cost.prefill_ms(8192)).abs() < 1e-9,
            "one full step"
        );
        assert!(q.ms(&cost) < 16.0 * cost.prefill_ms(512) / 2.0);
        // 600 + 600 overflow a 1,000-token budget: two steps; an oversize one runs alone.
        let cost = CostModel {
            max_batched_tokens: 1000,
            ..CostModel::default()
        };
        let q = queue(&[600, 600, 5000, 10], &cost);
        let want = 2.0 * cost.prefill_ms(600) + cost.prefill_ms(5000) + cost.prefill_ms(10);
        assert!((q.ms(&cost) - want).abs() < 1e-9);
    }

    #[test]
    fn a_new_prefill_joins_the_last_step_but_never_the_running_one() {
        let cost = CostModel::default();
        let budget = cost.max_batched_tokens;
        let mut q = StepQueue::default();
        q.push(Ticket(0), 2000, budget);
        assert_eq!(q.joinable(budget), None, "the only step is running");
        q.push(Ticket(9), 1000, budget);
        assert_eq!(q.joinable(budget), Some(1000), "not into the running step");
        let running_then_next = cost.prefill_ms(2000) + cost.prefill_ms(1000);
        assert!((q.ms(&cost) - running_then_next).abs() < 1e-9);
        let added = cost.added_prefill_ms(500, q.joinable(budget));
        assert!((added - (cost.prefill_ms(1500) - cost.prefill_ms(1000))).abs() < 1e-9);
        assert!(added < cost.prefill_ms(500), "no step overhead of its own");
        assert_eq!(
            cost.added_prefill_ms(8000, q.joinable(budget)),
            cost.prefill_ms(8000),
            "too big to join"
        );
        assert!(q.remove(Ticket(0), budget));
        assert_eq!(q.joinable(budget), None, "the rest is the running step now");
        assert!((q.ms(&cost) - cost.prefill_ms(1000)).abs() < 1e-9);
        assert!(!q.remove(Ticket(0), budget));
        assert_eq!(q.booked.len(), 1);
    }
}
