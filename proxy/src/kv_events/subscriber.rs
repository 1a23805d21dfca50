//! One worker's subscription: a ZMQ SUB socket on the engine's events endpoint, the sequence
//! check, replays from the engine's ROUTER after a gap, and the decoded batches applied to the
//! scheduler's prefix index for that worker.
//!
//! A lost connection (the socket reports the peer gone) or a publisher that restarted drops
//! every precise entry of the worker: the engine's cache may have changed while nobody listened.
//! The socket reconnects by itself; the first batch after it asks for a replay from the start.

use super::counters::{metric_decode_error, metric_gap, metric_lost, metric_replay, record_batch};
use super::index::{Sink, WorkerIndex};
use super::sequence::{Sequence, Step};
use crate::config::KvEventsConfig;
use crate::fleet::Fleet;
use bytes::Bytes;
use futures::StreamExt;
use pdgate_scheduler::{BlockHash, BlockHasher, InstanceId, Scheduler};
use pdgate_wire::kv_events::{decode_batch, EventBatch, Limits, END_OF_REPLAY};
use std::sync::Arc;
use std::time::Duration;
use zeromq::{Socket, SocketEvent, SocketRecv, SocketSend};

pub struct Subscription {
    pub fleet: Arc<Fleet>,
    pub id: InstanceId,
    pub endpoint: String,
    pub replay: Option<String>,
    pub cfg: KvEventsConfig,
    pub hasher: BlockHasher,
}

/// The scheduler's index for one instance, as the event index's sink.
struct Scheduled<'a> {
    s: &'a mut Scheduler,
    id: InstanceId,
    now: Duration,
}

impl Sink for Scheduled<'_> {
    fn stored(&mut self, keys: &[BlockHash]) {
        self.s.blocks_stored(self.id, keys, self.now);
    }
    fn removed(&mut self, keys: &[BlockHash]) {
        self.s.blocks_removed(self.id, keys);
    }
    fn cleared(&mut self) {
        self.s.blocks_cleared(self.id);
    }
}

struct Stream {
    sub: Subscription,
    limits: Limits,
    index: WorkerIndex,
    seq: Sequence,
}

impl Subscription {
    pub async fn run(self) {
        let limits = Limits {
            max_payload_bytes: self.cfg.max_payload_bytes,
            max_events_per_batch: self.cfg.max_events_per_batch,
            max_hashes_per_event: self.cfg.max_blocks_per_event,
            max_tokens_per_event: self
                .cfg
                .max_blocks_per_event
                .saturating_mul(self.hasher.block_size()),
        };
        let index = WorkerIndex::new(self.hasher, self.cfg.max_blocks_per_worker);
        let mut st = Stream {
            sub: self,
            limits,
            index,
            seq: Sequence::default(),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut socket = zeromq::SubSocket::new();
            let mut monitor = socket.monitor();
            let connected = async {
                socket.subscribe("").await?;
                socket.connect(&st.sub.endpoint).await
            };
            if let Err(e) = connected.await {
                tracing::warn!(worker = st.sub.id.0, endpoint = %st.sub.endpoint, error = %e, "kv events: cannot subscribe; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            backoff = Duration::from_millis(100);
            tracing::info!(worker = st.sub.id.0, endpoint = %st.sub.endpoint, "kv events: subscribed");
            loop {
                tokio::select! {
                    ev = monitor.next() => match ev {
                        Some(SocketEvent::Disconnected(_)) => st.lost("disconnected"),
                        Some(_) => {}
                        None => break,
                    },
                    msg = socket.recv() => match msg {
                        Ok(m) => st.message(m.into_vec()).await,
                        Err(e) => {
                            tracing::debug!(worker = st.sub.id.0, error = %e, "kv events: receive failed");
                            st.lost("receive_error");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        }
    }
}

impl Stream {
    fn lost(&mut self, why: &'static str) {
        if self.seq.next().is_some() || !self.index.is_empty() {
            tracing::info!(
                worker = self.sub.id.0,
                reason = why,
                "kv events: subscription lost; dropping this worker's precise entries"
            );
            metric_lost(why);
        }
        self.seq.reset();
        self.clear();
    }

    fn clear(&mut self) {
        let mut s = self.sub.fleet.scheduler.lock();
        let now = self.sub.fleet.now();
        self.index.clear(&mut Scheduled {
            s: &mut s,
            id: self.sub.id,
            now,
        });
    }

    async fn message(&mut self, frames: Vec<Bytes>) {
        let [_topic, seq, payload] = frames.as_slice() else {
            return metric_decode_error("frames");
        };
        let Ok(seq) = <[u8; 8]>::try_from(seq.as_ref()).map(u64::from_be_bytes) else {
            return metric_decode_error("seq");
        };
        let mut step = self.seq.observe(seq);
        if step == Step::Restart {
            self.lost("publisher_restarted");
            step = self.seq.observe(seq);
        }
        match step {
            Step::Apply => self.apply(seq, payload, true),
            Step::Duplicate => {}
            Step::Restart => {}
            Step::Gap { from } => {
                metric_gap();
                self.recover(from, seq).await;
                match self.seq.observe(seq) {
                    Step::Apply => self.apply(seq, payload, true),
                    Step::Duplicate => {}
                    _ => {
                        // Still missing batches: what we hold may be wrong, so hold nothing.
                        self.clear();
                        self.seq.reset();
                        self.apply(seq, payload, true);
                    }
                }
            }
        }
    }

    /// Asks the replay socket for `from..` and applies what it brings. A replay that starts
    /// after `from` (the engine's buffer no longer reaches back) means lost events: the
    /// worker's entries are dropped first, then rebuilt from what the replay has.
    async fn recover(&mut self, from: u64, upto: u64) {
        let Some(endpoint) = self.sub.replay.clone() else {
            metric_replay("unavailable");
            return;
        };
        let got = tokio::time::timeout(
            Duration::from_millis(self.sub.cfg.replay_timeout_ms),
            replay(&endpoint, from, self.sub.cfg.max_replay_batches),
        )
        .await;
        let frames = match got {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::warn!(worker = self.sub.id.0, endpoint = %endpoint, error = %e, "kv events: replay failed");
                return metric_replay("failed");
            }
            Err(_) => {
                tracing::warn!(worker = self.sub.id.0, endpoint = %endpoint, "kv events: replay timed out");
                return metric_replay("timeout");
            }
        };
        let complete = frames.first().is_some_and(|(s, _)| *s <= from);
        metric_replay(if complete { "complete" } else { "partial" });
        if !complete {
            self.clear();
            self.seq.reset();
        }
        tracing::debug!(
            worker = self.sub.id.0,
            from,
            upto,
            batches = frames.len(),
            complete,
            "kv events: replayed"
        );
        for (seq, payload) in frames {
            match self.seq.next() {
                Some(n) if seq < n => continue,
                Some(n) if seq > n => break,
                _ => {}
            }
            self.apply(seq, &payload, false);
        }
    }

    fn apply(&mut self, seq: u64, payload: &[u8], live: bool) {
        self.seq.applied(seq);
        let batch = match decode_batch(payload, &self.limits) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(worker = self.sub.id.0, seq, error = %e, "kv events: undecodable batch");
                return metric_decode_error("payload");
            }
        };
        self.index_batch(&batch);
        record_batch(&batch, live);
    }

    fn index_batch(&mut self, batch: &EventBatch) {
        let now = self.sub.fleet.now();
        let mut s = self.sub.fleet.scheduler.lock();
        let mut sink = Scheduled {
            s: &mut s,
            id: self.sub.id,
            now,
        };
        self.index.apply(batch, &mut sink, &mut |skip| {
            metrics::counter!("pdgate_kv_events_skipped_total", "reason" => skip.label())
                .increment(1)
        });
    }
}

/// Asks a ROUTER replay socket for every batch from `from` on: a DEALER sends `["", from]`
/// (the empty delimiter the ROUTER expects before the request), the answers are
/// `["", seq, payload]` frames up to one whose seq is −1.
pub async fn replay(
    endpoint: &str,
    from: u64,
    max_batches: usize,
) -> Result<Vec<(u64, Bytes)>, String> {
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(endpoint).await.map_err(|e| e.to_string())?;
    let mut req = zeromq::ZmqMessage::from(Bytes::new());
    req.push_back(Bytes::copy_from_slice(&from.to_be_bytes()));
    dealer.send(req).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    loop {
        let msg = dealer.recv().await.map_err(|e| e.to_string())?.into_vec();
        let (seq, payload) = match msg.as_slice() {
            [_, seq, payload] => (seq, payload),
            [seq, payload] => (seq, payload),
            _ => return Err(format!("replay frame of {} parts", msg.len())),
        };
        let seq = <[u8; 8]>::try_from(seq.as_ref())
            .map(i64::from_be_bytes)
            .map_err(|_| "replay sequence number is not 8 bytes".to_string())?;
        if seq == END_OF_REPLAY {
            return Ok(out);
        }
        if out.len() >= max_batches {
            return Err(format!("replay longer than {max_batches} batches"));
        }
        out.push((seq as u64, payload.clone()));
    }
}
