//! What a protocol mode makes of a request (`Prepared`), shared by every mode and by the
//! dispatch in `protocol` that picks one, so the modes need not import their dispatcher.

use crate::pool::Claim;
use serde_json::Value;

/// Adds protocol fields to a prefill-only leg's (non-streamed) response.
pub type Decorate = Box<dyn FnOnce(&mut Value) + Send>;

/// A decode leg whose KV is in place.
pub struct Leg {
    pub claim: Option<Claim>,
    /// The first generated token when the protocol carries it (else it is recomputed).
    pub first: Option<u32>,
}

pub enum Prepared {
    /// Not a PD leg: prefill here and decode.
    Plain,
    /// A prefill-only leg: prefill done and KV held or pushed; answer with one token.
    PrefillOnly(Decorate),
    Decode(Leg),
}
