//! Per-request abort handles (SGLang's `/abort_request {"rid"}`): a leg registers its request
//! id while it runs; an abort wakes whatever it is waiting on (a bootstrap rendezvous, KV landing,
//! the next decode step). It must never grow without bound: entries leave with their leg, and
//! aborts that arrive before their leg (a gateway aborting a leg still in flight) are remembered
//! in a small fixed-size ring.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::watch;

/// Aborts remembered for legs that have not arrived yet.
const EARLY_ABORTS: usize = 1024;

#[derive(Default)]
pub struct Aborts {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, (u64, watch::Sender<bool>)>,
    early: VecDeque<String>,
    next: u64,
}

/// A running leg's registration; deregisters on drop.
pub struct AbortHandle {
    aborts: Arc<Aborts>,
    rid: String,
    serial: u64,
    rx: watch::Receiver<bool>,
}

impl Aborts {
    pub fn register(self: &Arc<Self>, rid: &str) -> AbortHandle {
        let mut inner = self.inner.lock();
        let already = match inner.early.iter().position(|r| r == rid) {
            Some(i) => {
                inner.early.remove(i);
                true
            }
            None => false,
        };
        let (tx, rx) = watch::channel(already);
        inner.next += 1;
        let serial = inner.next;
        inner.live.insert(rid.to_string(), (serial, tx));
        AbortHandle {
            aborts: Arc::clone(self),
            rid: rid.to_string(),
            serial,
            rx,
        }
    }

    /// Aborts the leg running under `rid`; true when one was running.
    pub fn abort(&self, rid: &str) -> bool {
        let mut inner = self.inner.lock();
        if let Some((_, tx)) = inner.live.get(rid) {
            let _ = tx.send(true);
            return true;
        }
        if inner.early.len() >= EARLY_ABORTS {
            inner.early.pop_front();
        }
        inner.early.push_back(rid.to_string());
        false
    }
}

impl AbortHandle {
    /// A receiver that flips to `true` on abort (owned, so a streaming task can keep it).
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    pub fn is_aborted(&self) -> bool {
        *self.rx.borrow()
    }
}

impl Drop for AbortHandle {
    fn drop(&mut self) {
        let mut inner = self.aborts.inner.lock();
        // Only our own registration: a later leg may have reused the id.
        if inner
            .live
            .get(&self.rid)
            .is_some_and(|(serial, _)| *serial == self.serial)
        {
            inner.live.remove(&self.rid);
        }
    }
}

/// Resolves when `rx` signals an abort (never, if the sender is gone without aborting).
pub async fn aborted(mut rx: watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn abort_wakes_the_leg_and_early_aborts_are_remembered() {
        let a = Arc::new(Aborts::default());
        let h = a.register("r1");
        let rx = h.receiver();
        assert!(a.abort("r1"));
        aborted(rx).await;
        drop(h);
        assert!(!a.abort("r2"), "nothing running yet");
        assert!(
            a.register("r2").is_aborted(),
            "early abort applies on arrival"
        );
        assert!(!a.register("r3").is_aborted());
        assert!(a.inner.lock().live.is_empty(), "handles deregister");
    }
}
