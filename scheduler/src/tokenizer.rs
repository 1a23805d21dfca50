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
        Self::pieces(text).map(Self::piece_id).collect()
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
        let rest = &self.text[self.pos..];
        let bytes = rest.as_bytes();
        if bytes.is_empty() {
            return None;
        }
        let lead =
            usize::from(bytes[0] == b' ' && bytes.get(1).is_some_and(u8::is_ascii_alphanumeric));
        let word = bytes[lead..]
            .iter()
            .take(MAX_WORD_CHARS)
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        let len = if word > 0 {
            lead + word
        } else {
            // One character, which may be several bytes of UTF-8.
            rest.chars().next().map_or(1, char::len_utf8)
        };
        self.pos += len;
        Some(&rest[..len])
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

    #[test]
    fn encoding_is_deterministic_and_content_sensitive() {
        let tok = BuiltinTokenizer;
        assert_eq!(tok.encode("same text"), tok.encode("same text"));
        assert_ne!(tok.encode("same text"), tok.encode("same test"));
        assert_eq!(tok.count(""), 0);
    }
}
