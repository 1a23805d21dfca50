//! The prefill side of a push-mode handoff (SGLang bootstrap rooms, vLLM Mooncake transfer ids):
//! a decode engine offers the slots it reserved for a room (as a transfer notification on this
//! engine's bootstrap mailbox, see `bootstrap`); the prefill leg with the same room takes them
//! (waiting if it came first) and writes its KV there. Either side may arrive first.
//!
//! Bounded: at most `MAX_ROOMS` open rooms; stale offers and abandoned waits are purged before
//! a new room is refused.

use crate::openai::ApiError;
use parking_lot::Mutex;
use pdgate_wire::native::KvDescriptor;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const MAX_ROOMS: usize = 4096;

/// What a decode engine sends the prefill for a room: where to write the room's KV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub room: String,
    pub target: KvDescriptor,
}

enum Slot {
    Offered(KvDescriptor, Instant),
    Waiting(oneshot::Sender<KvDescriptor>),
}

#[derive(Default)]
pub struct Rendezvous {
    rooms: Mutex<HashMap<String, Slot>>,
}

fn full() -> ApiError {
    ApiError::server(503, "bootstrap_full", "too many open bootstrap rooms")
}

impl Rendezvous {
    /// A decode's offer for `room`; `stale` is how old an unclaimed offer may grow.
    pub fn offer(&self, offer: Offer, stale: Duration) -> Result<(), ApiError> {
        let Offer { room, mut target } = offer;
        let mut rooms = self.rooms.lock();
        match rooms.remove(&room) {
            Some(Slot::Waiting(tx)) => match tx.send(target) {
                Ok(()) => return Ok(()),
                // The prefill leg gave up (aborted): keep the offer like a fresh one.
                Err(back) => target = back,
            },
            Some(Slot::Offered(kept, at)) => {
                rooms.insert(room.clone(), Slot::Offered(kept, at));
                let msg = format!("bootstrap room `{room}` already has a decode");
                return Err(ApiError::server(409, "duplicate_room", msg));
            }
            None => {}
        }
        if rooms.len() >= MAX_ROOMS {
            purge(&mut rooms, stale);
            if rooms.len() >= MAX_ROOMS {
                return Err(full());
            }
        }
        rooms.insert(room, Slot::Offered(target, Instant::now()));
        Ok(())
    }

    /// The prefill leg of `room`: the decode's slots, once offered, or an error after `timeout`.
    pub async fn take(&self, room: &str, timeout: Duration) -> Result<KvDescriptor, ApiError> {
        let rx = {
            let mut rooms = self.rooms.lock();
            match rooms.remove(room) {
                Some(Slot::Offered(target, _)) => return Ok(target),
                Some(Slot::Waiting(tx)) if !tx.is_closed() => {
                    rooms.insert(room.to_string(), Slot::Waiting(tx));
                    let msg = format!("bootstrap room `{room}` already has a prefill");
                    return Err(ApiError::server(409, "duplicate_room", msg));
                }
                _ => {}
            }
            if rooms.len() >= MAX_ROOMS {
                purge(&mut rooms, timeout);
                if rooms.len() >= MAX_ROOMS {
                    return Err(full());
                }
            }
            let (tx, rx) = oneshot::channel();
            rooms.insert(room.to_string(), Slot::Waiting(tx));
            rx
        };
        let _cleanup = Cleanup { rdv: self, room };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(target)) => Ok(target),
            _ => Err(ApiError::server(
                504,
                "bootstrap_timeout",
                format!(
                    "no decode joined bootstrap room `{room}` within {} ms",
                    timeout.as_millis()
                ),
            )),
        }
    }
}

fn purge(rooms: &mut HashMap<String, Slot>, stale: Duration) {
    let now = Instant::now();
    rooms.retain(|_, slot| match slot {
        Slot::Offered(_, at) => now.duration_since(*at) < stale,
        Slot::Waiting(tx) => !tx.is_closed(),
    });
}

/// Removes an abandoned wait (timeout, abort, client gone).
struct Cleanup<'a> {
    rdv: &'a Rendezvous,
    room: &'a str,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let mut rooms = self.rdv.rooms.lock();
        if matches!(rooms.get(self.room), Some(Slot::Waiting(tx)) if tx.is_closed()) {
            rooms.remove(self.room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str) -> KvDescriptor {
        KvDescriptor {
            request_id: id.into(),
            segment: "s".into(),
            endpoint: "e".into(),
            block_bytes: 1,
            block_offsets: vec![0],
        }
    }

    #[tokio::test]
    async fn either_side_may_come_first_and_waits_time_out() {
        let r = std::sync::Arc::new(Rendezvous::default());
        let stale = Duration::from_secs(5);
        r.offer(
            Offer {
                room: "1".into(),
                target: target("a"),
            },
            stale,
        )
        .expect("offer");
        assert_eq!(
            r.take("1", Duration::ZERO).await.expect("take").request_id,
            "a"
        );
        let r2 = std::sync::Arc::clone(&r);
        let waiter = tokio::spawn(async move { r2.take("2", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.offer(
            Offer {
                room: "2".into(),
                target: target("b"),
            },
            stale,
        )
        .expect("offer");
        assert_eq!(waiter.await.expect("join").expect("take").request_id, "b");
        let err = r.take("3", Duration::from_millis(10)).await.unwrap_err();
        assert_eq!((err.status, err.code), (504, Some("bootstrap_timeout")));
        assert!(r.rooms.lock().is_empty(), "timed-out wait cleaned up");
    }
}
