//! Where peers' transfer segments are, looked up in the segment registry and cached. Pushing KV
//! (`push`), pulling it (`protocol::pull`) and learning a bootstrap mailbox
//! (`protocol::bootstrap`) all resolve peers here, so it sits below them all.

use crate::engine::Engine;
use pdgate_transfer::{SegmentDesc, TransportKind};

const MAX_CACHED_PEERS: usize = 4096;

/// Where a peer's segment `name` is: the registry's entry when one is configured (cached in
/// `e.peers`), else what its owner told us (`endpoint`, at least `len` bytes long).
pub(crate) async fn locate(
    e: &Engine,
    name: &str,
    endpoint: &str,
    len: u64,
) -> Result<SegmentDesc, String> {
    let Some(reg) = &e.registry else {
        return Ok(SegmentDesc {
            name: name.to_string(),
            endpoint: endpoint.to_string(),
            len,
            transport: TransportKind::Tcp,
        });
    };
    // A cached entry the owner contradicts is stale: it restarted on a new transfer port.
    if let Some(desc) = e.peers.lock().get(name) {
        if desc.endpoint == endpoint {
            return Ok(desc.clone());
        }
    }
    let desc = reg
        .lookup(name)
        .await
        .map_err(|err| err.to_string())?
        .ok_or_else(|| format!("segment `{name}` is not registered"))?;
    remember_peer(e, desc.clone());
    Ok(desc)
}

/// Caches a peer's segment descriptor.
pub(crate) fn remember_peer(e: &Engine, desc: SegmentDesc) {
    let mut peers = e.peers.lock();
    // Bounded: a fleet has few peer segments; forget them all rather than grow without end.
    if peers.len() >= MAX_CACHED_PEERS {
        peers.clear();
    }
    peers.insert(desc.name.clone(), desc);
}
