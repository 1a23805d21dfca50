//! The bootstrap mailbox's side of a push-mode handoff (see `bootstrap` for the exchange): the
//! mailbox segment a prefill engine takes offers on, the mailboxes a decode engine has learnt,
//! and offers as notification payloads, split into parts when their block list does not fit
//! one notification and put back together here.
//!
//! It knows nothing of the engine, so the engine's shared state can hold it while the
//! bootstrap exchange, which needs the engine, sits above both.

use super::rendezvous::Offer;
use crate::openai::ApiError;
use bytes::Bytes;
use parking_lot::Mutex;
use pdgate_transfer::{Segment, SegmentDesc, MAX_NOTIFY_LEN};
use pdgate_wire::native::KvDescriptor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The mailbox holds no data (offers arrive as notifications); one byte rather than none so
/// every transport, shared memory included, can address it.
pub const MAILBOX_BYTES: usize = 1;

/// Mailboxes of prefill engines a decode remembers; a fleet has few, so past this they are all
/// forgotten rather than grown without end.
const MAX_KNOWN_MAILBOXES: usize = 4096;

/// Offers arriving in parts at once; more are refused (their decodes time out).
const MAX_PARTIAL_OFFERS: usize = 1024;

/// Parts one offer may come in (each holds a few hundred block offsets).
const MAX_PARTS: usize = 4096;

/// Bootstrap state: the mailbox on a prefill engine, the mailboxes a decode engine has learnt.
#[derive(Default)]
pub struct Bootstrap {
    mailbox: Option<Segment>,
    partial: Mutex<HashMap<String, Partial>>,
    /// Bootstrap address (`http://host:port`) → its mailbox.
    known: Mutex<HashMap<String, SegmentDesc>>,
}

impl Bootstrap {
    /// A prefill engine's: offers arrive on `mailbox`.
    pub fn with_mailbox(mailbox: Segment) -> Self {
        Self {
            mailbox: Some(mailbox),
            ..Self::default()
        }
    }

    pub fn mailbox(&self) -> Option<&Segment> {
        self.mailbox.as_ref()
    }

    /// Whether a notification addressed to `segment` is an offer.
    pub fn is_mailbox(&self, segment: &str) -> bool {
        self.mailbox.as_ref().is_some_and(|m| m.name() == segment)
    }

    /// The mailbox learnt for the bootstrap server at `bootstrap` (`http://host:port`).
    pub(crate) fn known(&self, bootstrap: &str) -> Option<SegmentDesc> {
        self.known.lock().get(bootstrap).cloned()
    }

    pub(crate) fn learn(&self, bootstrap: &str, mailbox: SegmentDesc) {
        let mut known = self.known.lock();
        if known.len() >= MAX_KNOWN_MAILBOXES {
            known.clear();
        }
        known.insert(bootstrap.to_string(), mailbox);
    }

    pub(crate) fn forget(&self, bootstrap: &str) {
        self.known.lock().remove(bootstrap);
    }

    /// One notification on the mailbox: the whole offer once its last part arrived.
    pub(crate) fn take_part(&self, payload: &[u8], stale: Duration) -> Option<Offer> {
        let Ok(part) = serde_json::from_slice::<PartIn>(payload) else {
            tracing::warn!("ignoring a malformed bootstrap offer");
            return None;
        };
        assemble(self, part, stale)
    }
}

/// The mailbox segment's name on the engine serving HTTP on `port`.
pub fn mailbox_name(model: &str, port: u16) -> String {
    format!("bootstrap-{model}-{port}")
}

/// One notification on a mailbox: an offer whole (`part` 0 of 1) or one part of it, each part
/// carrying a run of the block offsets in order.
#[derive(Serialize)]
struct PartOut<'a> {
    room: &'a str,
    part: usize,
    parts: usize,
    target: TargetOut<'a>,
}

/// `KvDescriptor`'s wire shape, borrowing a run of its offsets.
#[derive(Serialize)]
struct TargetOut<'a> {
    request_id: &'a str,
    segment: &'a str,
    endpoint: &'a str,
    block_bytes: u64,
    block_offsets: &'a [u64],
}

#[derive(Deserialize)]
struct PartIn {
    room: String,
    part: usize,
    parts: usize,
    target: KvDescriptor,
}

struct Partial {
    target: KvDescriptor,
    runs: Vec<Option<Vec<u64>>>,
    missing: usize,
    started: Instant,
}

/// `offer` as notification payloads: one when it fits, else as few parts as fit.
pub(crate) fn encode(offer: &Offer) -> Result<Vec<Bytes>, ApiError> {
    let t = &offer.target;
    let part = |part: usize, parts: usize, block_offsets: &[u64]| {
        let encoded = serde_json::to_vec(&PartOut {
            room: &offer.room,
            part,
            parts,
            target: TargetOut {
                request_id: &t.request_id,
                segment: &t.segment,
                endpoint: &t.endpoint,
                block_bytes: t.block_bytes,
                block_offsets,
            },
        })
        .unwrap_or_default();
        Bytes::from(encoded)
    };
    let whole = part(0, 1, &t.block_offsets);
    if whole.len() <= MAX_NOTIFY_LEN {
        return Ok(vec![whole]);
    }
    // Room for offsets beside the fixed fields (part numbers up to 20 digits each); one offset
    // is at most 21 bytes, so a budget of that much always makes progress.
    let fixed = part(usize::MAX, usize::MAX, &[]).len();
    let budget = MAX_NOTIFY_LEN.saturating_sub(fixed);
    if budget < 21 {
        return Err(ApiError::invalid(
            "bootstrap_room",
            "bootstrap room or request id too long to offer",
        ));
    }
    // Every part fits by construction: at most `per` offsets of at most 21 bytes each.
    let per = budget / 21;
    let runs: Vec<&[u64]> = t.block_offsets.chunks(per).collect();
    Ok(runs
        .iter()
        .enumerate()
        .map(|(i, run)| part(i, runs.len(), run))
        .collect())
}

/// The whole offer once its last part arrived.
fn assemble(b: &Bootstrap, part: PartIn, stale: Duration) -> Option<Offer> {
    let PartIn {
        room,
        part,
        parts,
        mut target,
    } = part;
    if parts <= 1 {
        return Some(Offer { room, target });
    }
    if part >= parts || parts > MAX_PARTS {
        tracing::warn!(
            room,
            part,
            parts,
            "ignoring a bootstrap offer part out of range"
        );
        return None;
    }
    let mut partial = b.partial.lock();
    if !partial.contains_key(&room) && partial.len() >= MAX_PARTIAL_OFFERS {
        let now = Instant::now();
        partial.retain(|_, p| now.duration_since(p.started) < stale);
        if partial.len() >= MAX_PARTIAL_OFFERS {
            tracing::warn!(room, "too many bootstrap offers in parts; refusing one");
            return None;
        }
    }
    let run = std::mem::take(&mut target.block_offsets);
    let entry = partial.entry(room.clone()).or_insert_with(|| Partial {
        target: target.clone(),
        runs: vec![None; parts],
        missing: parts,
        started: Instant::now(),
    });
    // Parts of another decode's offer for the same room must never be spliced into this one:
    // its offsets address a different pool.
    let same_offer = entry.runs.len() == parts && entry.target == target;
    match entry.runs.get_mut(part) {
        Some(slot) if slot.is_none() && same_offer => {
            *slot = Some(run);
            entry.missing -= 1;
        }
        _ => {
            tracing::warn!(
                room,
                part,
                parts,
                "ignoring a repeated or mismatched offer part"
            );
            return None;
        }
    }
    if entry.missing > 0 {
        return None;
    }
    let Partial {
        mut target, runs, ..
    } = partial.remove(&room)?;
    target.block_offsets = runs.into_iter().flatten().flatten().collect();
    Some(Offer { room, target })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(blocks: u64) -> Offer {
        Offer {
            room: "sglang-42".into(),
            target: KvDescriptor {
                request_id: "sglang-42".into(),
                segment: "kv-pdgate-sim-8b-18401".into(),
                endpoint: "127.0.0.1:40000".into(),
                block_bytes: 131_072,
                block_offsets: (0..blocks).rev().map(|b| (1 << 32) + b * 131_072).collect(),
            },
        }
    }

    fn decode(payload: &[u8]) -> PartIn {
        serde_json::from_slice(payload).expect("a part")
    }

    #[test]
    fn a_small_offer_is_one_notification() {
        let o = offer(16);
        let parts = encode(&o).expect("encoded");
        assert_eq!(parts.len(), 1);
        let got = assemble(
            &Bootstrap::default(),
            decode(&parts[0]),
            Duration::from_secs(1),
        );
        assert_eq!(got, Some(o));
    }

    #[test]
    fn a_long_block_list_goes_in_parts_and_comes_back_whole_in_any_order() {
        let o = offer(4096);
        let mut parts = encode(&o).expect("encoded");
        assert!(parts.len() > 1, "{} parts", parts.len());
        assert!(parts.iter().all(|p| p.len() <= MAX_NOTIFY_LEN));
        parts.reverse();
        let b = Bootstrap::default();
        let (last, rest) = parts.split_last().expect("parts");
        for p in rest {
            assert_eq!(assemble(&b, decode(p), Duration::from_secs(1)), None);
        }
        // A repeated part is ignored, not counted twice.
        assert_eq!(assemble(&b, decode(&rest[0]), Duration::from_secs(1)), None);
        assert_eq!(
            assemble(&b, decode(last), Duration::from_secs(1)),
            Some(o.clone())
        );
        assert!(b.partial.lock().is_empty());
    }

    #[test]
    fn parts_of_another_decodes_offer_for_the_room_are_not_spliced_in() {
        let mine = offer(4096);
        let mut theirs = offer(4096);
        theirs.target.segment = "kv-other-decode".into();
        let (mine_parts, their_parts) = (
            encode(&mine).expect("encoded"),
            encode(&theirs).expect("encoded"),
        );
        assert_eq!(mine_parts.len(), their_parts.len());
        let b = Bootstrap::default();
        let stale = Duration::from_secs(1);
        assert_eq!(assemble(&b, decode(&mine_parts[0]), stale), None);
        for p in &their_parts[1..] {
            assert_eq!(assemble(&b, decode(p), stale), None, "refused");
        }
        let mut got = None;
        for p in &mine_parts[1..] {
            got = assemble(&b, decode(p), stale);
        }
        assert_eq!(got, Some(mine));
    }

    #[test]
    fn an_absurd_room_is_refused_rather_than_split_forever() {
        let mut o = offer(8);
        o.room = "r".repeat(MAX_NOTIFY_LEN);
        assert_eq!(encode(&o).unwrap_err().status, 400);
    }
}
