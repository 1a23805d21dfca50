//! Chat messages rendered to one prompt string with a fixed template.
//!
//! The gateway and the reference engine must render identically, or prefix keys would not match
//! what the engine caches; this is the one place the template lives.

/// One chat turn, with its content already flattened to text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// Renders every turn (not just the first: later turns carry the conversation's prefix) and
/// ends with the assistant header so the model's reply continues the text.
pub fn render_chat(turns: &[ChatTurn<'_>]) -> String {
    let len = turns
        .iter()
        .map(|t| t.role.len() + t.content.len() + 8)
        .sum::<usize>();
    let mut out = String::with_capacity(len + 16);
    for turn in turns {
        out.push_str("<|");
        out.push_str(turn.role);
        out.push_str("|>\n");
        out.push_str(turn.content);
        out.push('\n');
    }
    out.push_str("<|assistant|>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_turns_extend_the_earlier_rendering() {
        let t1 = [
            ChatTurn {
                role: "system",
                content: "be brief",
            },
            ChatTurn {
                role: "user",
                content: "hi",
            },
        ];
        let mut t2 = t1.to_vec();
        t2.push(ChatTurn {
            role: "assistant",
            content: "hello",
        });
        t2.push(ChatTurn {
            role: "user",
            content: "more",
        });
        let a = render_chat(&t1);
        let b = render_chat(&t2);
        let common = a.trim_end_matches("<|assistant|>\n");
        assert!(b.starts_with(common));
        assert!(b.ends_with("<|user|>\nmore\n<|assistant|>\n"));
    }
}
