//! Booking sync between gateway replicas in front of the same engines: each replica publishes
//! what it booked (and when each leg ended) and books what the others publish, so its scheduler
//! sees the load they placed. Messages name engines by URL, since replicas may number the same
//! engine differently; a URL this replica does not know is dropped.
//!
//! Never on the request path's critical section: publishing is a `try_send` onto a bounded
//! queue (dropped and counted when full), and the broker's state never fails a request — when it
//! is down, replicas schedule unsynced until it is back.

mod ledger;
mod nats;

pub use ledger::{Applied, Expired, Ledger, Release, ReplicaId};

use crate::config::{ReplicaSync, ReplicasConfig};
use crate::fleet::Fleet;
use metrics::{counter, gauge};
use pdgate_scheduler::{BlockHash, Booking, Decision, Role};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Leading prompt blocks a booking carries for the other replicas' prefix index: enough for
/// any prompt up to 128k tokens at the default block size, and well under NATS's default
/// 1 MiB message limit.
const MAX_SYNCED_BLOCKS: usize = 8192;

/// One message on the subject, JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    /// The publishing replica's random id (its own echo is skipped).
    pub replica: ReplicaId,
    pub event: Event,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// `booking`'s instance ids are the sender's and ignored: the URLs name the pair.
    Booked {
        ticket: u64,
        prefill_url: Option<String>,
        decode_url: String,
        booking: Booking,
        blocks: Vec<BlockHash>,
    },
    PrefillDone {
        ticket: u64,
    },
    DecodeDone {
        ticket: u64,
    },
    /// Sent every `heartbeat_ms`: a replica heard from holds its bookings.
    Alive,
}

/// Where the serving path hands its bookings and releases to the publisher.
#[derive(Debug, Clone)]
pub struct Outbox {
    id: ReplicaId,
    tx: mpsc::Sender<Event>,
}

impl Outbox {
    /// This replica's id on the wire.
    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// Queues `event` for publishing; never waits.
    fn send(&self, event: Event) {
        let outcome = match self.tx.try_send(event) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => "dropped_queue_full",
            Err(mpsc::error::TrySendError::Closed(_)) => "dropped_closed",
        };
        message("out", outcome);
    }

    /// Publishes what `decision` booked (`blocks`: the request's prefix).
    pub fn booked(&self, fleet: &Fleet, decision: &Decision, blocks: &[BlockHash]) {
        let now = fleet.now();
        let Some(booking) = fleet.scheduler.lock().booking(decision.ticket, now) else {
            return;
        };
        let url = |id| fleet.workers.get(id).map(|w| w.url.clone());
        let Some(decode_url) = url(decision.decode) else {
            return;
        };
        let prefill_url = match decision.prefill {
            Some(id) => match url(id) {
                Some(u) => Some(u),
                None => return,
            },
            None => None,
        };
        self.send(Event::Booked {
            ticket: decision.ticket.0,
            prefill_url,
            decode_url,
            booking,
            blocks: blocks[..blocks.len().min(MAX_SYNCED_BLOCKS)].to_vec(),
        });
    }

    pub fn released(&self, decision: &Decision, what: Release) {
        let ticket = decision.ticket.0;
        self.send(match what {
            Release::Prefill => Event::PrefillDone { ticket },
            Release::Decode => Event::DecodeDone { ticket },
        });
    }
}

/// The running sync: its tasks end when this is stopped.
pub struct ReplicaSyncTasks {
    tasks: Vec<JoinHandle<()>>,
}

impl ReplicaSyncTasks {
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Starts booking sync as `[replicas]` says, installing the fleet's outbox. `Ok(None)`: sync is
/// off. Errors only on configuration (a credential file that cannot be read, a bad URL); an
/// unreachable broker is retried in the background while serving goes on.
pub async fn start(
    cfg: &ReplicasConfig,
    fleet: &Arc<Fleet>,
) -> anyhow::Result<Option<ReplicaSyncTasks>> {
    match cfg.sync {
        ReplicaSync::None => Ok(None),
        ReplicaSync::Nats => {
            let id = uuid::Uuid::new_v4().as_u64_pair().0;
            let (tx, rx) = mpsc::channel(cfg.queue.max(1));
            let tasks = nats::start(cfg, Arc::clone(fleet), id, rx).await?;
            // Set once per fleet; a second start would have no publisher behind it.
            if fleet.replicas.set(Outbox { id, tx }).is_err() {
                anyhow::bail!("booking sync already started for this fleet");
            }
            tracing::info!(replica = id, url = %cfg.url, subject = %cfg.subject, "booking sync with other replicas on");
            Ok(Some(ReplicaSyncTasks { tasks }))
        }
    }
}

/// Applies one message from another replica to this one's scheduler.
fn apply(fleet: &Fleet, ledger: &mut Ledger, msg: Message) -> &'static str {
    let now = fleet.now();
    ledger.heard(msg.replica, now);
    let from = msg.replica;
    let applied = match msg.event {
        Event::Alive => return "alive",
        Event::Booked {
            ticket,
            prefill_url,
            decode_url,
            mut booking,
            blocks,
        } => {
            // Resolved before the scheduler's lock: the registry takes it the other way round.
            let decode = fleet.workers.find(Role::Decode, &decode_url).map(|w| w.id);
            let prefill = match prefill_url {
                Some(u) => fleet.workers.find(Role::Prefill, &u).map(|w| Some(w.id)),
                None => Some(None),
            };
            let (Some(decode), Some(prefill)) = (decode, prefill) else {
                return "unknown_worker";
            };
            booking.decode = decode;
            booking.prefill = prefill;
            let mut sched = fleet.scheduler.lock();
            ledger.book(&mut sched, (from, ticket), &booking, &blocks, now)
        }
        Event::PrefillDone { ticket } => {
            let mut sched = fleet.scheduler.lock();
            ledger.release(&mut sched, (from, ticket), Release::Prefill, now)
        }
        Event::DecodeDone { ticket } => {
            let mut sched = fleet.scheduler.lock();
            ledger.release(&mut sched, (from, ticket), Release::Decode, now)
        }
    };
    applied.label()
}

/// `pdgate_replica_sync_messages_total{direction="out"|"in", outcome}`: outcomes are fixed
/// names (`published`, `publish_failed`, `dropped_queue_full`, `own`, `booked`, `released`,
/// `unknown_worker`, `unknown_booking`, `malformed`, …).
fn message(direction: &'static str, outcome: &'static str) {
    counter!("pdgate_replica_sync_messages_total", "direction" => direction, "outcome" => outcome)
        .increment(1);
}

fn expired(e: Expired) {
    for (reason, n) in [("ttl", e.ttl), ("replica_gone", e.replica_gone)] {
        if n > 0 {
            counter!("pdgate_replica_sync_expired_total", "reason" => reason).increment(n as u64);
        }
    }
}

fn held(n: usize) {
    gauge!("pdgate_replica_sync_bookings").set(n as f64);
}

fn connected(up: bool) {
    gauge!("pdgate_replica_sync_connected").set(if up { 1.0 } else { 0.0 });
}
