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

/// How a rendered conversation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The assistant header follows the last turn, so the model's reply starts a new turn
    /// (`add_generation_prompt`, the default).
    GenerationPrompt,
    /// The last turn is closed and nothing follows (`add_generation_prompt: false`).
    Closed,
    /// The last turn (an assistant's) is left open, without its end-of-turn newline, so
    /// generation continues its text (`continue_final_message`, as vLLM and SGLang name it).
    /// The rendering is then exactly the [`Ending::GenerationPrompt`] rendering of the earlier
    /// turns followed by that text: a continued answer sees the same sequence the uninterrupted
    /// one did.
    ContinueFinal,
}

/// Renders every turn (not just the first: later turns carry the conversation's prefix) and
/// ends with the assistant header so the model's reply continues the text.
pub fn render_chat(turns: &[ChatTurn<'_>]) -> String {
    render_chat_ending(turns, Ending::GenerationPrompt)
}

/// Renders every turn, ending as `ending` says. With [`Ending::ContinueFinal`] the caller has
/// checked that the last turn is the assistant's.
pub fn render_chat_ending(turns: &[ChatTurn<'_>], ending: Ending) -> String {
    let len = turns
        .iter()
        .map(|t| t.role.len() + t.content.len() + 8)
        .sum::<usize>();
    let mut out = String::with_capacity(len + 16);
    for (i, turn) in turns.iter().enumerate() {
        out.push_str("<|");
        out.push_str(turn.role);
        out.push_str("|>\n");
        out.push_str(turn.content);
        let open = ending == Ending::ContinueFinal && i + 1 == turns.len();
        if !open {
            out.push('\n');
        }
    }
    if ending == Ending::GenerationPrompt {
        out.push_str("<|assistant|>\n");
    }
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

    #[test]
    fn a_continued_final_message_extends_the_generation_prompt() {
        let user = ChatTurn {
            role: "user",
            content: "hi",
        };
        let partial = ChatTurn {
            role: "assistant",
            content: " the cache",
        };
        let asked = render_chat(std::slice::from_ref(&user));
        let continued = render_chat_ending(&[user.clone(), partial], Ending::ContinueFinal);
        assert_eq!(continued, format!("{asked} the cache"));
        assert_eq!(
            render_chat_ending(&[user], Ending::Closed),
            "<|user|>\nhi\n"
        );
    }
}
