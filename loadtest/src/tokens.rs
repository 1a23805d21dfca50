//! Counting tokens the way the server will: prompt synthesis needs it to hit a trace's input
//! length, and trace loading to measure ShareGPT text. It sits below both so that neither has to
//! import the other.

use pdgate_scheduler::BuiltinTokenizer;

/// Counts tokens the way the server will.
pub trait CountTokens: Send + Sync {
    fn count(&self, text: &str) -> usize;
    /// True when every synthesised word is one token that never merges with a neighbour, so the
    /// prompt needs no correction pass (and the simulator may key blocks from ids directly).
    fn one_token_per_word(&self) -> bool {
        false
    }
}

/// The reference engine's built-in tokenizer (`pdgate_scheduler::BuiltinTokenizer`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Builtin;

impl CountTokens for Builtin {
    fn count(&self, text: &str) -> usize {
        BuiltinTokenizer.count(text)
    }
    fn one_token_per_word(&self) -> bool {
        true
    }
}

/// The gateway's tokenizer (built-in or a HuggingFace `tokenizer.json`), for `--tokenizer`.
impl CountTokens for pdgate_scheduler::Tokenizer {
    fn count(&self, text: &str) -> usize {
        pdgate_scheduler::Tokenizer::count(self, text)
    }
    fn one_token_per_word(&self) -> bool {
        matches!(self, pdgate_scheduler::Tokenizer::Builtin)
    }
}
