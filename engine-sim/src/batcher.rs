//! The emulated GPU: a continuous-batching loop that admits prefill work within a token budget
//! and decode sequences up to a batch limit, sleeps for the modelled step time, then completes
//! prefills and emits one token per running sequence.
//!
//! Its queue is bounded (`submit` refuses when full) and it never blocks on a slow client: each
//! sequence's token channel holds every token the sequence can produce.

use crate::config::EngineConfig;
use crate::pool::Claim;
use crate::stats::Stats;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

pub enum Job {
    /// Compute `uncached` prompt tokens; `done` fires when the step that did it ends.
    Prefill {
        uncached: Size,
        done: oneshot::Sender<()>,
    },
    /// Generate `steps` tokens for a sequence holding `context` tokens; one `()` per token.
    Decode {
        context: usize,
        steps: u32,
        out: mpsc::Sender<()>,
        claim: Option<Claim>,
    },
}

/// A prefill's uncached tokens: known at submission, or once a pull of cached blocks from a
/// peer has landed. A pending prefill keeps its place in the queue while later work runs past
/// it, as vLLM's scheduler skips a request whose KV is still loading: the pull overlaps the
/// wait in the queue rather than preceding it.
pub enum Size {
    Known(usize),
    Pending(oneshot::Receiver<usize>),
}

#[derive(Clone)]
pub struct Gpu {
    tx: mpsc::Sender<Job>,
}

#[derive(Debug, thiserror::Error)]
#[error("engine queue full")]
pub struct QueueFull;

impl Gpu {
    pub fn start(cfg: &EngineConfig, stats: Arc<Stats>) -> Self {
        let (tx, rx) = mpsc::channel(cfg.max_waiting.max(1));
        tokio::spawn(run(cfg.clone(), rx, stats));
        Self { tx }
    }

    pub fn submit(&self, job: Job) -> Result<(), QueueFull> {
        self.tx.try_send(job).map_err(|_| QueueFull)
    }

    /// Runs a prefill of `uncached` tokens and waits for it.
    pub async fn prefill(&self, uncached: usize) -> Result<(), QueueFull> {
        let (done, wait) = oneshot::channel();
        self.submit(Job::Prefill {
            uncached: Size::Known(uncached),
            done,
        })?;
        wait.await.map_err(|_| QueueFull)
    }

    /// Queues a prefill whose size is sent later on the returned sender (dropping it withdraws
    /// the prefill); the receiver fires when the step that computed it ends.
    pub fn prefill_deferred(
        &self,
    ) -> Result<(oneshot::Sender<usize>, oneshot::Receiver<()>), QueueFull> {
        let (size, pending) = oneshot::channel();
        let (done, wait) = oneshot::channel();
        self.submit(Job::Prefill {
            uncached: Size::Pending(pending),
            done,
        })?;
        Ok((size, wait))
    }

    /// Starts a decode of `steps` tokens; the receiver yields one `()` per generated token.
    pub fn decode(
        &self,
        context: usize,
        steps: u32,
        claim: Option<Claim>,
    ) -> Result<mpsc::Receiver<()>, QueueFull> {
        let (out, rx) = mpsc::channel(steps as usize + 1);
        self.submit(Job::Decode {
            context,
            steps,
            out,
            claim,
        })?;
        Ok(rx)
    }
}

struct Seq {
    context: usize,
    steps: u32,
    out: mpsc::Sender<()>,
    _claim: Option<Claim>,
}

async fn run(cfg: EngineConfig, mut rx: mpsc::Receiver<Job>, stats: Arc<Stats>) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    loop {
        if waiting.is_empty() && running.is_empty() {
            match rx.recv().await {
                Some(job) => waiting.push_back(job),
                None => return,
            }
        }
        while waiting.len() < cfg.max_waiting {
            match rx.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => break,
            }
        }
        let prefills = admit(&cfg, &mut waiting, &mut running);
        if prefills.is_empty() && running.is_empty() {
            // Only prefills waiting for their pulls: wait for new work or a pull to land.
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => waiting.push_back(job),
                    None => return,
                },
                () = tokio::time::sleep(PENDING_POLL) => {}
            }
            continue;
        }
        let prefill_tokens: usize = prefills.iter().map(|(t, _)| *t).sum();
        let context: usize = running.iter().map(|s| s.context).sum();
        stats
            .running
            .store((running.len() + prefills.len()) as u64, Relaxed);
        stats
            .waiting
            .store((waiting.len() + rx.len()) as u64, Relaxed);

        let ms = cfg.timing.prefill_ms(prefill_tokens)
            + cfg.timing.decode_step_ms(running.len(), context);
        let step = cfg.timing.scaled(ms);
        if step.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(step).await;
        }

        for (_, done) in prefills {
            let _ = done.send(());
        }
        let emitted = running.len() as u64;
        running.retain_mut(|s| {
            // A closed channel means the client went away: drop the sequence (and its claim).
            if s.out.try_send(()).is_err() {
                return false;
            }
            s.steps -= 1;
            s.context += 1;
            s.steps > 0
        });
        Stats::add(&stats.generation_tokens, emitted);
        if running.is_empty() && waiting.is_empty() {
            stats.running.store(0, Relaxed);
            stats.waiting.store(rx.len() as u64, Relaxed);
        }
    }
}

/// How often a loop with nothing but pending prefills looks at them again.
const PENDING_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// Moves jobs from the queue into this step, in arrival order, within the step's limits; a
/// prefill still waiting for its pull is passed over and keeps its place.
fn admit(
    cfg: &EngineConfig,
    waiting: &mut VecDeque<Job>,
    running: &mut Vec<Seq>,
) -> Vec<(usize, oneshot::Sender<()>)> {
    let mut prefills = Vec::new();
    let mut passed_over = Vec::new();
    let mut budget = cfg.max_batched_tokens;
    while let Some(job) = waiting.pop_front() {
        match job {
            Job::Prefill {
                uncached: Size::Pending(mut size),
                done,
            } => match size.try_recv() {
                Ok(n) => waiting.push_front(Job::Prefill {
                    uncached: Size::Known(n),
                    done,
                }),
                Err(oneshot::error::TryRecvError::Empty) => passed_over.push(Job::Prefill {
                    uncached: Size::Pending(size),
                    done,
                }),
                // The request gave up before its pull ended: nothing to compute.
                Err(oneshot::error::TryRecvError::Closed) => {}
            },
            Job::Prefill {
                uncached: Size::Known(uncached),
                done,
            } => {
                // An oversized prompt still runs, alone, rather than starving forever.
                if !prefills.is_empty() && uncached > budget {
                    waiting.push_front(Job::Prefill {
                        uncached: Size::Known(uncached),
                        done,
                    });
                    break;
                }
                budget = budget.saturating_sub(uncached);
                prefills.push((uncached, done));
            }
            Job::Decode {
                context,
                steps,
                out,
                claim,
            } => {
                if out.is_closed() || steps == 0 {
                    continue;
                }
                if running.len() >= cfg.max_batch {
                    waiting.push_front(Job::Decode {
                        context,
                        steps,
                        out,
                        claim,
                    });
                    break;
                }
                running.push(Seq {
                    context,
                    steps,
                    out,
                    _claim: claim,
                });
            }
        }
    }
    for job in passed_over.into_iter().rev() {
        waiting.push_front(job);
    }
    prefills
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TimingModel;
    use std::time::Duration;

    fn cfg(max_batch: usize) -> EngineConfig {
        EngineConfig {
            max_batch,
            timing: TimingModel {
                time_scale: 0.0,
                ..TimingModel::default()
            },
            ..EngineConfig::default()
        }
    }

    #[tokio::test]
    async fn a_prefill_waiting_for_its_pull_does_not_hold_up_later_work() {
        let gpu = Gpu::start(&cfg(4), Arc::new(Stats::default()));
        let (size, mut deferred) = gpu.prefill_deferred().expect("queued");
        // Queued after it, run before it: the pull is still under way.
        tokio::time::timeout(Duration::from_secs(5), gpu.prefill(100))
            .await
            .expect("not held up")
            .expect("ran");
        assert!(
            deferred.try_recv().is_err(),
            "not computed before its size is known"
        );
        size.send(10).expect("still queued");
        tokio::time::timeout(Duration::from_secs(5), deferred)
            .await
            .expect("runs once sized")
            .expect("computed");
    }

    #[tokio::test]
    async fn a_withdrawn_deferred_prefill_is_dropped() {
        let gpu = Gpu::start(&cfg(4), Arc::new(Stats::default()));
        let (size, deferred) = gpu.prefill_deferred().expect("queued");
        drop(size);
        let out = tokio::time::timeout(Duration::from_secs(5), deferred)
            .await
            .expect("answered");
        assert!(out.is_err(), "dropped, never computed");
        gpu.prefill(5).await.expect("the loop goes on");
    }

    #[tokio::test]
    async fn decode_emits_exactly_the_requested_tokens() {
        let stats = Arc::new(Stats::default());
        let gpu = Gpu::start(&cfg(4), Arc::clone(&stats));
        let mut rx = gpu.decode(10, 5, None).expect("queued");
        let mut n = 0;
        while rx.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 5);
        assert_eq!(stats.generation_tokens.load(Relaxed), 5);
    }

    #[tokio::test]
    async fn batch_limit_serialises_excess_sequences() {
        // With real (scaled) step times, 2 sequences over a batch of 1 take two sequences' time.
        let mut c = cfg(1);
        c.timing = TimingModel {
            decode_base_ms: 10.0,
            decode_per_seq_ms: 0.0,
            decode_per_ktoken_ms: 0.0,
            time_scale: 1.0,
            ..TimingModel::default()
        };
        let gpu = Gpu::start(&c, Arc::new(Stats::default()));
        let mut a = gpu.decode(0, 3, None).expect("a");
        let mut b = gpu.decode(0, 3, None).expect("b");
        let mut order = Vec::new();
        loop {
            tokio::select! {
                Some(()) = a.recv() => order.push('a'),
                Some(()) = b.recv() => order.push('b'),
                else => break,
            }
        }
        assert_eq!(
            order,
            vec!['a', 'a', 'a', 'b', 'b', 'b'],
            "b waits for a's slot"
        );
    }

    #[tokio::test]
    async fn dropped_receiver_aborts_the_sequence() {
        let stats = Arc::new(Stats::default());
        let mut c = cfg(4);
        c.timing.time_scale = 1.0;
        let gpu = Gpu::start(&c, Arc::clone(&stats));
        let rx = gpu.decode(0, 1000, None).expect("queued");
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(rx);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(stats.running.load(Relaxed), 0);
        assert!(stats.generation_tokens.load(Relaxed) < 1000);
    }

    #[tokio::test]
    async fn full_queue_is_refused_not_grown() {
        let mut c = cfg(1);
        c.max_waiting = 1;
        c.timing.time_scale = 1.0;
        let gpu = Gpu::start(&c, Arc::new(Stats::default()));
        let results: Vec<_> = (0..50)
            .map(|_| gpu.decode(0, 100, None).map(|_| ()))
            .collect();
        assert!(results.iter().any(|r| r.is_err()));
    }
}
