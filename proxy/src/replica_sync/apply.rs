//! One message from another replica, applied to this replica's scheduler: its URLs looked up
//! among this replica's workers (an unknown one drops the message), then booked or released
//! through the ledger.

use super::ledger::{Applied, Ledger};
use super::wire::{Event, Message, Release};
use crate::fleet::Fleet;
use pdgate_scheduler::{Pull, Role};

/// Returns the outcome's metric label.
pub fn apply(fleet: &Fleet, ledger: &mut Ledger, msg: Message) -> &'static str {
    let now = fleet.now();
    let from = msg.replica;
    ledger.heard(from, now);
    let applied: Applied = match msg.event {
        Event::Alive => return "alive",
        Event::Booked {
            ticket,
            prefill_url,
            decode_url,
            pull_from_url,
            mut booking,
            blocks,
        } => {
            // Resolved before the scheduler's lock: the registry takes them the other way round.
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
            // A pull whose holder this replica does not know is not booked; the request is.
            // Decodes are pull sources too: they keep the KV they receive.
            let holder = pull_from_url.and_then(|u| {
                [Role::Prefill, Role::Decode]
                    .into_iter()
                    .find_map(|role| fleet.workers.find(role, &u))
            });
            booking.pull = booking
                .pull
                .zip(holder)
                .map(|(p, w)| Pull { from: w.id, ..p });
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
