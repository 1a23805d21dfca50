//! ShareGPT-style conversation files: a JSON array (or JSONL) of `{"conversations": [{"from":
//! "human"|"gpt"|"system", "value": text}]}` (or `{"messages": [{"role", "content"}]}`).
//!
//! Every user turn that has an assistant reply becomes one request whose prompt is the whole
//! conversation so far — so later turns carry the earlier ones as a shared prefix — and whose
//! output length is the reply's length in tokens. It never invents timestamps: arrivals come
//! from `--rate` or `--concurrency`.

use super::types::{LoadOptions, Prompt, Trace, TraceRequest};
use crate::error::{LoadtestError, Result};
use crate::tokens::CountTokens;
use serde_json::Value;
use std::path::Path;

pub fn parse(path: &Path, text: &str, opts: LoadOptions, tok: &dyn CountTokens) -> Result<Trace> {
    let entries = entries(path, text, opts)?;
    let mut trace = Trace {
        skipped: entries.skipped,
        ..Trace::default()
    };
    for (line, entry) in entries.items {
        match conversation(&entry) {
            Ok(turns) => push_requests(&mut trace, &turns, tok),
            Err(message) => {
                let err = LoadtestError::BadRecord {
                    path: path.to_path_buf(),
                    line,
                    message,
                };
                if !opts.skip_invalid {
                    return Err(err);
                }
                trace.skipped.push(err.to_string());
            }
        }
    }
    Ok(trace)
}

struct Entries {
    items: Vec<(usize, Value)>,
    skipped: Vec<String>,
}

/// Splits the file into conversation values with the line each starts on.
fn entries(path: &Path, text: &str, opts: LoadOptions) -> Result<Entries> {
    let bad = |line: usize, message: String| LoadtestError::BadRecord {
        path: path.to_path_buf(),
        line,
        message,
    };
    if text.trim_start().starts_with('[') {
        let mut items = Vec::new();
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Vec<Value>>();
        let all = match stream.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                return Err(bad(
                    e.line(),
                    format!("not a JSON array of conversations: {e}"),
                ))
            }
            None => Vec::new(),
        };
        // serde_json does not report where each array element starts; approximate with the
        // line of the n-th `{` at nesting depth 1, which is exact for ordinary pretty or
        // one-per-line files.
        let starts = element_lines(text);
        for (i, v) in all.into_iter().enumerate() {
            items.push((starts.get(i).copied().unwrap_or(1), v));
        }
        return Ok(Entries {
            items,
            skipped: Vec::new(),
        });
    }
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(v) => items.push((n + 1, v)),
            Err(e) => {
                let err = bad(n + 1, format!("not a JSON conversation: {e}"));
                if !opts.skip_invalid {
                    return Err(err);
                }
                skipped.push(err.to_string());
            }
        }
    }
    Ok(Entries { items, skipped })
}

fn element_lines(text: &str) -> Vec<usize> {
    let (mut depth, mut line, mut in_str, mut escaped) = (0i32, 1usize, false, false);
    let mut out = Vec::new();
    for c in text.chars() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            if c == '\n' {
                line += 1;
            }
            continue;
        }
        match c {
            '\n' => line += 1,
            '"' => in_str = true,
            '[' | '{' => {
                if c == '{' && depth == 1 {
                    out.push(line);
                }
                depth += 1;
            }
            ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    out
}

#[derive(Debug, PartialEq)]
struct Turn {
    user: bool,
    role: String,
    text: String,
}

fn conversation(v: &Value) -> Result<Vec<Turn>, String> {
    let (list, role_key, text_key) = if let Some(c) = v.get("conversations") {
        (c, "from", "value")
    } else if let Some(m) = v.get("messages") {
        (m, "role", "content")
    } else {
        return Err("entry has neither `conversations` nor `messages`".into());
    };
    let list = list
        .as_array()
        .ok_or_else(|| format!("`{role_key}` list must be an array"))?;
    let mut turns = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let role = t
            .get(role_key)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("turn {i} has no `{role_key}` string"))?;
        let text = t
            .get(text_key)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("turn {i} has no `{text_key}` string"))?;
        let user = matches!(role, "human" | "user");
        let role = match role {
            "human" | "user" => "user",
            "gpt" | "assistant" | "chatgpt" | "bard" | "bing" => "assistant",
            "system" => "system",
            other => return Err(format!("turn {i} has unknown role `{other}`")),
        };
        turns.push(Turn {
            user,
            role: role.into(),
            text: text.into(),
        });
    }
    Ok(turns)
}

fn push_requests(trace: &mut Trace, turns: &[Turn], tok: &dyn CountTokens) {
    let mut prefix = String::new();
    for (i, t) in turns.iter().enumerate() {
        let rendered = format!("{}: {}\n", t.role, t.text);
        if t.user {
            if let Some(reply) = turns
                .get(i + 1)
                .filter(|r| !r.user && r.role == "assistant")
            {
                let prompt = format!("{prefix}{rendered}");
                let output = tok.count(&reply.text).max(1);
                trace.requests.push(TraceRequest {
                    index: trace.requests.len(),
                    arrival_ms: None,
                    input_tokens: u32::try_from(tok.count(&prompt)).unwrap_or(u32::MAX).max(1),
                    output_tokens: u32::try_from(output).unwrap_or(u32::MAX),
                    prompt: Prompt::Text(prompt),
                });
            }
        }
        prefix.push_str(&rendered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::Builtin;

    const TWO_TURNS: &str = r#"[
  {"id": "a", "conversations": [
    {"from": "human", "value": "Hello there"},
    {"from": "gpt", "value": "Hi! How can I help?"},
    {"from": "human", "value": "Tell me a joke"},
    {"from": "gpt", "value": "No."}
  ]},
  {"id": "b", "conversations": [{"from": "human", "value": "unanswered"}]}
]"#;

    #[test]
    fn later_turns_carry_earlier_ones_as_prefix() {
        let t = parse(
            Path::new("s.json"),
            TWO_TURNS,
            LoadOptions::default(),
            &Builtin,
        )
        .unwrap();
        assert_eq!(t.requests.len(), 2, "an unanswered turn is no request");
        let (Prompt::Text(first), Prompt::Text(second)) =
            (&t.requests[0].prompt, &t.requests[1].prompt)
        else {
            panic!("text prompts expected");
        };
        assert_eq!(first, "user: Hello there\n");
        assert!(second.starts_with(first.as_str()));
        assert!(second.ends_with("assistant: Hi! How can I help?\nuser: Tell me a joke\n"));
        // "Hi", "!", " How", " can", " I", " help", "?" under the built-in tokenizer.
        assert_eq!(t.requests[0].output_tokens, 7);
        assert_eq!(t.requests[0].input_tokens as usize, Builtin.count(first));
        assert_eq!(t.requests[1].arrival_ms, None);
    }

    #[test]
    fn bad_entries_name_their_line() {
        let text = "[\n  {\"conversations\": [{\"from\": \"human\", \"value\": \"x\"}]},\n  {\"conversations\": [{\"from\": \"alien\", \"value\": \"x\"}]}\n]";
        let err = parse(Path::new("s.json"), text, LoadOptions::default(), &Builtin).unwrap_err();
        assert!(err.to_string().starts_with("s.json:3: "), "{err}");
        assert!(err.to_string().contains("alien"), "{err}");
        let bad_json = "[\n {\"conversations\": [}\n]";
        let err = parse(
            Path::new("s.json"),
            bad_json,
            LoadOptions::default(),
            &Builtin,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("s.json:2: "), "{err}");
    }

    #[test]
    fn jsonl_with_messages_and_skip_invalid() {
        let text = "{\"messages\": [{\"role\": \"user\", \"content\": \"a b\"}, {\"role\": \"assistant\", \"content\": \"c\"}]}\n{broken\n{\"nothing\": 1}\n";
        let err = parse(Path::new("s.jsonl"), text, LoadOptions::default(), &Builtin).unwrap_err();
        assert!(err.to_string().starts_with("s.jsonl:2: "), "{err}");
        let t = parse(
            Path::new("s.jsonl"),
            text,
            LoadOptions { skip_invalid: true },
            &Builtin,
        )
        .unwrap();
        assert_eq!(t.requests.len(), 1);
        assert_eq!(t.skipped.len(), 2);
        assert!(t.skipped[1].starts_with("s.jsonl:3: "), "{:?}", t.skipped);
    }
}
