//! Booking sync over NATS core pub/sub: one connection per replica, publishing and subscribing
//! on one subject (so one replica's messages reach the others in the order it sent them). The
//! client reconnects by itself, resubscribing and flushing what was published meanwhile; a
//! publish that cannot even be queued is dropped and counted.

use super::apply::apply;
use super::counters::{connected, expired, held, message};
use super::ledger::Ledger;
use super::wire::{Event, Message, ReplicaId};
use crate::config::ReplicasConfig;
use crate::fleet::Fleet;
use anyhow::Context;
use futures::StreamExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub(super) async fn start(
    cfg: &ReplicasConfig,
    fleet: Arc<Fleet>,
    id: ReplicaId,
    outbound: mpsc::Receiver<Event>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("pdgate-{id:016x}"))
        // Start serving even if the broker is down now; the client keeps trying.
        .retry_on_initial_connect()
        .max_reconnects(None::<usize>)
        .subscription_capacity(cfg.queue.max(1))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => {
                    connected(true);
                    tracing::info!("booking sync: connected to the broker");
                }
                async_nats::Event::Disconnected => {
                    connected(false);
                    tracing::warn!(
                        "booking sync: broker lost; scheduling unsynced until it is back"
                    );
                }
                async_nats::Event::SlowConsumer(_) => {
                    message("in", "dropped_slow_consumer");
                    tracing::warn!(
                        "booking sync: messages arrive faster than they are read; some dropped"
                    );
                }
                // Reconnect attempts and the like: the transitions above already said it.
                other => tracing::debug!(event = %other, "booking sync: broker event"),
            }
        });
    if let Some(path) = &cfg.token_file {
        opts = opts.token(read_secret(path)?);
    }
    match (&cfg.user, &cfg.password_file) {
        (Some(user), Some(path)) => opts = opts.user_and_password(user.clone(), read_secret(path)?),
        (None, None) => {}
        _ => anyhow::bail!("[replicas] user and password_file go together"),
    }
    connected(false);
    let client = opts
        .connect(cfg.url.as_str())
        .await
        .with_context(|| format!("[replicas] connecting to {}", cfg.url))?;
    let subject = cfg.subject.clone();
    let subscriber = client
        .subscribe(subject.clone())
        .await
        .with_context(|| format!("[replicas] subscribing to {subject}"))?;
    let (inbound_tx, inbound_rx) = mpsc::channel::<Message>(cfg.queue.max(1));
    let receive = tokio::spawn(receive(subscriber, id, inbound_tx));
    let ledger = Ledger::new(
        cfg.max_bookings.max(1),
        Duration::from_secs(cfg.booking_ttl_secs.max(1)),
        Duration::from_millis(cfg.replica_timeout_ms.max(1)),
    );
    let heartbeat = Duration::from_millis(cfg.heartbeat_ms.max(10));
    let apply = tokio::spawn(apply_loop(fleet, ledger, inbound_rx, heartbeat));
    let publish = tokio::spawn(publish(client, subject, id, outbound, heartbeat));
    Ok(vec![receive, apply, publish])
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("[replicas] reading {}", path.display()))?;
    Ok(s.trim().to_string())
}

/// Decodes what arrives and queues other replicas' messages for `apply_loop`, dropping (and
/// counting) when that queue is full rather than letting the broker's buffer grow.
async fn receive(
    mut subscriber: async_nats::Subscriber,
    own: ReplicaId,
    tx: mpsc::Sender<Message>,
) {
    while let Some(msg) = subscriber.next().await {
        let Ok(msg) = serde_json::from_slice::<Message>(&msg.payload) else {
            message("in", "malformed");
            continue;
        };
        if msg.replica == own {
            message("in", "own");
            continue;
        }
        if tx.try_send(msg).is_err() {
            message("in", "dropped_queue_full");
        }
    }
}

/// Books and releases what the other replicas sent, and expires what they never released.
async fn apply_loop(
    fleet: Arc<Fleet>,
    mut ledger: Ledger,
    mut rx: mpsc::Receiver<Message>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                message("in", apply(&fleet, &mut ledger, msg));
            }
            _ = tick.tick() => {
                let e = ledger.expire(&mut fleet.scheduler.lock(), fleet.now());
                if e.ttl + e.replica_gone > 0 {
                    tracing::warn!(ttl = e.ttl, replica_gone = e.replica_gone, "booking sync: released other replicas' bookings never released by them");
                }
                expired(e);
            }
        }
        held(ledger.len());
    }
}

/// Publishes the serving path's events, and a heartbeat every `every`.
async fn publish(
    client: async_nats::Client,
    subject: String,
    id: ReplicaId,
    mut rx: mpsc::Receiver<Event>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            e = rx.recv() => match e {
                Some(e) => e,
                None => return,
            },
            _ = tick.tick() => Event::Alive,
        };
        let body = match serde_json::to_vec(&Message { replica: id, event }) {
            Ok(b) => b,
            Err(_) => {
                message("out", "malformed");
                continue;
            }
        };
        let outcome = match client.publish(subject.clone(), body.into()).await {
            Ok(()) => "published",
            Err(e) => {
                tracing::debug!(error = %e, "booking sync: publish failed");
                "publish_failed"
            }
        };
        message("out", outcome);
    }
}
