//! The PD protocols by name: one enum for the gateway's pools and the engine's modes, so
//! `pdgate up --protocol P` and a pool's `protocol = "P"` can never disagree on a name.

use serde::{Deserialize, Serialize};

/// The PD protocol an engine speaks (and the gateway speaks to it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// pdgate's own: reserve on decode, prefill writes KV through pdgate-transfer, decode verifies.
    #[default]
    Native,
    /// vLLM NixlConnector: sequential legs, decode pulls the blocks named in `kv_transfer_params`.
    VllmNixl,
    /// vLLM MooncakeConnector: concurrent legs sharing a `transfer_id`, prefill pushes.
    VllmMooncake,
    /// SGLang: the same body (with a bootstrap room) to both at once, prefill pushes.
    Sglang,
    /// TensorRT-LLM disaggregated serving: context-only leg, then generation-only leg that pulls.
    Trtllm,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::Native,
        Protocol::VllmNixl,
        Protocol::VllmMooncake,
        Protocol::Sglang,
        Protocol::Trtllm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Native => "native",
            Protocol::VllmNixl => "vllm-nixl",
            Protocol::VllmMooncake => "vllm-mooncake",
            Protocol::Sglang => "sglang",
            Protocol::Trtllm => "trtllm",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown protocol `{s}` (native, vllm-nixl, vllm-mooncake, sglang, trtllm)")
            })
    }
}
