//! Completions logprobs in the layout SGLang's OpenAI server writes (`to_openai_style_logprobs`
//! in `python/sglang/srt/entrypoints/openai/utils.py`): one object per choice with four parallel
//! arrays `{tokens, token_logprobs, top_logprobs, text_offset}`, the prompt's tokens first when
//! `echo` and `logprobs` were both asked for, then the generated tokens. As in SGLang, the first
//! prompt token has a `null` logprob (nothing precedes it) and every `text_offset` is `-1` (SGLang
//! does not compute offsets). `top_logprobs` lists only the token itself (`{token: logprob}`), and
//! is `null` where the logprob is.
//!
//! The values are fake but deterministic — a function of the token id alone — so a gateway that
//! merges a prefill's prompt logprobs in front of a decode's generated ones can be checked exactly.
//! Prompt logprobs exist only where the prompt ran through this engine's forward pass (a plain
//! request or a prefill leg): a decode leg got its KV from elsewhere and never invents them.

use pdgate_scheduler::{BuiltinTokenizer, TokenId};
use pdgate_wire::openai::Wanted;
use serde_json::{json, Map, Value};

/// The fake logprob of a token, in (-8, 0): a function of its id, nothing else.
pub fn value(id: TokenId) -> f64 {
    -f64::from(id % 4096 + 1) / 512.0
}

/// One choice's logprobs, built token by token.
#[derive(Debug, Default)]
pub struct Logprobs {
    tokens: Vec<String>,
    values: Vec<Option<f64>>,
    top: bool,
}

impl Logprobs {
    pub fn new(wanted: Wanted) -> Self {
        Self {
            top: wanted.top > 0,
            ..Self::default()
        }
    }

    /// Appends every token of the prompt; the first has no logprob.
    pub fn push_prompt(&mut self, prompt: &str) {
        for (i, piece) in BuiltinTokenizer::pieces(prompt).enumerate() {
            let v = (i > 0).then(|| value(BuiltinTokenizer::piece_id(piece)));
            self.tokens.push(piece.to_string());
            self.values.push(v);
        }
    }

    /// Appends one generated token.
    pub fn push(&mut self, piece: &str) {
        self.tokens.push(piece.to_string());
        self.values
            .push(Some(value(BuiltinTokenizer::piece_id(piece))));
    }

    pub fn to_json(&self) -> Value {
        let top: Vec<Value> = self
            .tokens
            .iter()
            .zip(&self.values)
            .map(|(t, v)| match v {
                Some(v) if self.top => Value::Object(Map::from_iter([(t.clone(), json!(v))])),
                _ => Value::Null,
            })
            .collect();
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.values,
            "top_logprobs": top,
            "text_offset": vec![-1; self.tokens.len()],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_first_with_a_null_lead_then_generated() {
        let mut lp = Logprobs::new(Wanted {
            top: 1,
            prompt: true,
        });
        lp.push_prompt("Hello, world");
        lp.push(" the");
        let v = lp.to_json();
        assert_eq!(v["tokens"], json!(["Hello", ",", " world", " the"]));
        assert_eq!(v["token_logprobs"][0], Value::Null);
        assert_eq!(
            v["token_logprobs"][2],
            json!(value(BuiltinTokenizer::piece_id(" world")))
        );
        assert_eq!(v["top_logprobs"][0], Value::Null);
        assert_eq!(v["top_logprobs"][3][" the"], v["token_logprobs"][3]);
        assert_eq!(v["text_offset"], json!([-1, -1, -1, -1]));
    }

    #[test]
    fn values_are_negative_and_deterministic() {
        for id in [0, 1, 4095, 4096, u32::MAX] {
            let v = value(id);
            assert!(v < 0.0 && v > -8.01, "{id}: {v}");
            assert_eq!(v, value(id));
        }
        let mut lp = Logprobs::new(Wanted {
            top: 0,
            prompt: false,
        });
        lp.push(" a");
        assert_eq!(
            lp.to_json()["top_logprobs"],
            json!([null]),
            "no alternatives asked"
        );
    }
}
