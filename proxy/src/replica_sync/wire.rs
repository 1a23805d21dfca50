//! What replicas say to each other on the broker's subject: one JSON message per booking,
//! prefill done, decode done and heartbeat, tagged with the sender's random id. Engines are named
//! by worker URL, never by instance id: replicas may number the same engine differently.

use pdgate_scheduler::{BlockHash, Booking};
use serde::{Deserialize, Serialize};

/// A replica's random id: tags every message it publishes.
pub type ReplicaId = u64;

/// Leading prompt blocks a booking carries for the other replicas' prefix index: enough for
/// any prompt up to 128k tokens at the default block size, and well under NATS's default
/// 1 MiB message limit.
pub const MAX_SYNCED_BLOCKS: usize = 8192;

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
        /// The holder of the pull the booking planned, if any (its id in `booking` is the
        /// sender's too).
        #[serde(default)]
        pull_from_url: Option<String>,
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

/// Which part of a booking ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Prefill,
    Decode,
}
