//! Where the serving path hands its bookings and releases to the publisher: a bounded queue
//! filled with `try_send`, so a request never waits on the broker (a full queue drops the
//! message and counts it).

use super::counters::message;
use super::wire::{Event, Release, ReplicaId, MAX_SYNCED_BLOCKS};
use pdgate_scheduler::{BlockHash, Booking, Ticket};
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct Outbox {
    id: ReplicaId,
    tx: mpsc::Sender<Event>,
}

impl Outbox {
    pub(super) fn new(id: ReplicaId, tx: mpsc::Sender<Event>) -> Self {
        Self { id, tx }
    }

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

    /// Publishes what `ticket` booked on the pair at these URLs (`blocks`: the prompt's prefix).
    pub fn booked(
        &self,
        ticket: Ticket,
        (prefill_url, decode_url): (Option<String>, String),
        pull_from_url: Option<String>,
        booking: Booking,
        blocks: &[BlockHash],
    ) {
        self.send(Event::Booked {
            ticket: ticket.0,
            prefill_url,
            decode_url,
            pull_from_url,
            booking,
            blocks: blocks[..blocks.len().min(MAX_SYNCED_BLOCKS)].to_vec(),
        });
    }

    pub fn released(&self, ticket: Ticket, what: Release) {
        let ticket = ticket.0;
        self.send(match what {
            Release::Prefill => Event::PrefillDone { ticket },
            Release::Decode => Event::DecodeDone { ticket },
        });
    }
}
