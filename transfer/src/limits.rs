//! Protocol limits: the largest segment name, batch, op, notification and
//! message any side accepts. Batch validation (before anything is sent), the
//! wire decoder (before anything is allocated for a peer's lengths) and
//! segment registration all check against these same numbers, so they live
//! here, below all three, rather than in any one of them.

pub const MAX_SEGMENT_NAME_LEN: usize = 256;
pub const MAX_OPS_PER_BATCH: usize = 65536;
pub const MAX_OP_LEN: u64 = 1 << 30;
/// Largest notification payload a batch may carry.
pub const MAX_NOTIFY_LEN: usize = 4096;
/// Largest error text or handshake message a reply may carry.
pub const MAX_MESSAGE_LEN: usize = 4096;
