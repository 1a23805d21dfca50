//! Property tests with generated inputs for what reads client and engine bytes above HTTP: the
//! OpenAI request validation (`openai::parse`), the SSE reader (`sse`) and the prompt-logprob
//! rewriter (`protocol::logprobs`). No panic on anything; output bounded by the input; the
//! rewriters independent of how their input was cut into reads.
//!
//! `PROPTEST_CASES` sets the generated cases (256 by default).

use bytes::Bytes;
use futures::StreamExt;
use pdgate_gateway::config::Config;
use pdgate_gateway::models::Models;
use pdgate_gateway::openai::{parse, Limits, Parsed};
use pdgate_gateway::protocol::logprobs::PromptLogprobs;
use pdgate_gateway::relay::Upstream;
use pdgate_gateway::sse;
use pdgate_wire::openai::ApiKind;
use proptest::prelude::*;
use serde_json::{json, Value};

const MODEL: &str = "m";
const MAX_PROMPTS: usize = 4;

fn limits() -> Limits<'static> {
    static MODELS: std::sync::OnceLock<Models> = std::sync::OnceLock::new();
    let models = MODELS.get_or_init(|| {
        let mut cfg = Config::default();
        cfg.model.name = MODEL.into();
        Models::build(&cfg).expect("models")
    });
    Limits {
        models,
        max_batch_prompts: MAX_PROMPTS,
    }
}

fn kind() -> impl Strategy<Value = ApiKind> {
    prop_oneof![Just(ApiKind::Chat), Just(ApiKind::Completions)]
}

/// Any JSON value, small and nested.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-z \\u{e9}\\u{1F600}]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value for a field the validation looks at: mostly the right type, often not.
fn field_value(name: &'static str) -> BoxedStrategy<Value> {
    let right: BoxedStrategy<Value> = match name {
        "model" => prop_oneof![3 => Just(json!(MODEL)), 1 => Just(json!("other"))].boxed(),
        "prompt" => prop_oneof![
            "[a-z ]{0,12}".prop_map(Value::String),
            proptest::collection::vec(
                prop_oneof![
                    4 => "[a-z ]{0,6}".prop_map(Value::String),
                    1 => any::<u32>().prop_map(|n| json!(n)),
                    1 => Just(Value::Null),
                ],
                0..7
            )
            .prop_map(Value::Array),
        ]
        .boxed(),
        "messages" => proptest::collection::vec(
            (
                prop_oneof![Just(json!("user")), Just(json!(3)), Just(Value::Null)],
                prop_oneof![
                    "[a-z ]{0,8}".prop_map(Value::String),
                    Just(json!([{"type": "text", "text": "hi"}])),
                    Just(json!(5)),
                ],
            )
                .prop_map(|(role, content)| json!({"role": role, "content": content})),
            0..3,
        )
        .prop_map(Value::Array)
        .boxed(),
        "n" => prop_oneof![4 => Just(json!(1)), 1 => Just(json!(2))].boxed(),
        "max_tokens" | "max_completion_tokens" => prop_oneof![
            4 => (1u64..5).prop_map(|n| json!(n)),
            1 => Just(json!(0)),
            1 => Just(json!(u64::MAX)),
            1 => Just(json!(-1)),
            1 => Just(json!(1.5)),
            1 => Just(json!("7")),
        ]
        .boxed(),
        "stream" => prop_oneof![Just(json!(true)), Just(json!(false)), Just(json!("yes"))].boxed(),
        _ => any_json().boxed(),
    };
    prop_oneof![5 => right, 1 => any_json()].boxed()
}

/// A request body: a subset of the fields validation reads, and a stray one.
fn request_body() -> impl Strategy<Value = Value> {
    let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stream",
        "extra",
    ]
    .into_iter()
    .map(|name| {
        let present = if matches!(name, "model" | "prompt" | "messages") {
            0.9
        } else {
            0.4
        };
        proptest::option::weighted(present, field_value(name))
            .prop_map(move |v| v.map(|v| (name.to_string(), v)))
            .boxed()
    })
    .collect();
    fields.prop_map(|pairs| Value::Object(pairs.into_iter().flatten().collect()))
}

/// What a passed request promises the pipeline.
fn check_parsed(kind: ApiKind, raw_len: usize, parsed: &Parsed) -> Result<(), TestCaseError> {
    let reqs: Vec<_> = match parsed {
        Parsed::One(r) => vec![r],
        Parsed::Batch(rs) => {
            prop_assert!(
                rs.len() >= 2 && rs.len() <= MAX_PROMPTS,
                "{} prompts",
                rs.len()
            );
            rs.iter().collect()
        }
    };
    let mut total = 0;
    for r in reqs {
        prop_assert_eq!(r.kind, kind);
        prop_assert!(r.max_tokens >= 1);
        prop_assert_eq!(&r.body["model"], &json!(MODEL));
        total += serde_json::to_vec(&r.body).map_or(0, |b| b.len()) + r.prompt.len();
    }
    // Bounded memory: a batch costs at most one copy of the body (plus its rendered prompt)
    // per prompt.
    prop_assert!(
        total <= (MAX_PROMPTS + 1) * (2 * raw_len + 64),
        "{total} bytes from {raw_len}"
    );
    Ok(())
}

/// Cuts `bytes` at the given points (taken modulo its length) into an upstream body.
fn cut(bytes: &[u8], points: &[prop::sample::Index]) -> Upstream {
    let mut at: Vec<usize> = points.iter().map(|p| p.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    let pieces: Vec<Result<Bytes, pdgate_gateway::http1::Error>> = at
        .windows(2)
        .map(|w| Ok(Bytes::copy_from_slice(&bytes[w[0]..w[1]])))
        .collect();
    Box::pin(futures::stream::iter(pieces))
}

fn collect(s: Upstream) -> Vec<u8> {
    futures::executor::block_on(s.collect::<Vec<_>>())
        .into_iter()
        .flat_map(|r| r.map(|b| b.to_vec()).unwrap_or_default())
        .collect()
}

/// A logprobs object as engines send it, sometimes malformed.
fn logprobs() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0usize..5, any::<bool>()).prop_map(|(n, partial)| {
            let tokens: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
            if partial {
                json!({"tokens": tokens})
            } else {
                json!({"tokens": tokens, "token_logprobs": vec![-0.5; n],
                       "top_logprobs": vec![Value::Null; n], "text_offset": (0..n).collect::<Vec<_>>()})
            }
        }),
        1 => any_json(),
    ]
}

fn choice() -> impl Strategy<Value = Value> {
    (
        prop_oneof![3 => (0u64..3).prop_map(|i| json!(i)), 1 => any_json()],
        "[a-z ]{0,6}",
        proptest::option::of(logprobs()),
    )
        .prop_map(|(index, text, lp)| {
            let mut c = json!({"index": index, "text": text});
            if let Some(lp) = lp {
                c["logprobs"] = lp;
            }
            c
        })
}

fn answer() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(choice(), 0..3),
        proptest::option::of(0u64..6),
    )
        .prop_map(|(choices, prompt_tokens)| {
            let mut a = json!({"object": "text_completion", "choices": choices});
            if let Some(n) = prompt_tokens {
                a["usage"] = json!({"prompt_tokens": n, "completion_tokens": 1});
            }
            a
        })
}

/// A decode stream: answer chunks as events, comments, `[DONE]`, junk; LF or CRLF framed.
fn sse_stream() -> impl Strategy<Value = Vec<u8>> {
    let event = prop_oneof![
        4 => answer().prop_map(|a| format!("data: {a}\n\n").into_bytes()),
        1 => Just(b"data: [DONE]\n\n".to_vec()),
        1 => Just(b": keep-alive\r\n\r\n".to_vec()),
        1 => answer().prop_map(|a| format!("data:{a}\r\n\r\n").into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ];
    proptest::collection::vec(event, 0..6).prop_map(|events| events.concat())
}

proptest! {
    #[test]
    fn parse_never_panics_on_any_bytes(
        kind in kind(),
        raw in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Ok(parsed) = parse(kind, &raw, &limits()) {
            check_parsed(kind, raw.len(), &parsed)?;
        }
    }

    #[test]
    fn parse_keeps_its_promises_on_generated_requests(kind in kind(), body in request_body()) {
        let raw = serde_json::to_vec(&body).expect("json");
        if let Ok(parsed) = parse(kind, &raw, &limits()) {
            check_parsed(kind, raw.len(), &parsed)?;
        }
    }

    /// Events come out whole and untouched whatever the chunking; nothing is lost or added.
    #[test]
    fn sse_splitting_is_lossless_and_independent_of_chunking(
        body in prop_oneof![sse_stream(), proptest::collection::vec(any::<u8>(), 0..300)],
        points in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut whole = sse::Splitter::default();
        let mut expected = whole.push(&body);
        expected.push(whole.take_rest());
        let mut s = sse::Splitter::default();
        let mut events = Vec::new();
        let mut at: Vec<usize> = points.iter().map(|p| p.index(body.len() + 1)).collect();
        at.sort_unstable();
        let mut from = 0;
        for to in at.into_iter().chain([body.len()]) {
            events.extend(s.push(&body[from..to]));
            from = to;
            prop_assert!(s.pending() <= body.len());
        }
        events.push(s.take_rest());
        prop_assert_eq!(events.concat(), body.clone());
        prop_assert_eq!(&events, &expected);
        let _ = sse::datas(&body);
        for e in &events {
            let _ = sse::data(e);
        }
    }

    #[test]
    fn prompt_logprobs_never_panic_on_any_answer(
        raw in prop_oneof![
            answer().prop_map(|a| a.to_string().into_bytes()),
            sse_stream(),
            proptest::collection::vec(any::<u8>(), 0..300),
        ]
    ) {
        let _ = PromptLogprobs::from_answer(&raw);
    }

    /// Merging the prefill's prompt logprobs into a decode body gives the same bytes however the
    /// body was cut into reads; with nothing to merge (no choice of ours), the body passes
    /// through byte for byte; and it never grows by more than the prompt's logprobs per choice.
    #[test]
    fn logprob_merging_is_independent_of_chunking_and_bounded(
        prefill in answer(),
        decode_sse in sse_stream(),
        decode_json in answer(),
        sse_mode in any::<bool>(),
        points in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let Some(prompt) = PromptLogprobs::from_json(&prefill) else {
            return Ok(());
        };
        let body = if sse_mode { decode_sse } else { decode_json.to_string().into_bytes() };
        let whole = collect(prompt.clone().wrap(cut(&body, &[]), sse_mode));
        let pieces = collect(prompt.clone().wrap(cut(&body, &points), sse_mode));
        prop_assert_eq!(&pieces, &whole);
        let prompt_len = prefill.to_string().len();
        prop_assert!(whole.len() <= body.len() * 2 + 8 * prompt_len + 64, "{} from {}", whole.len(), body.len());
        if sse_mode && !body.windows(7).any(|w| w == b"\"index\"") {
            prop_assert_eq!(&whole, &body, "nothing to merge: untouched");
        }
    }
}

/// Nesting past serde_json's recursion limit is an error, not a stack overflow.
#[test]
fn deep_nesting_is_refused_not_a_crash() {
    for depth in [200, 100_000] {
        let deep = format!(
            "{{\"model\":\"{MODEL}\",\"prompt\":\"x\",\"x\":{}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert!(parse(ApiKind::Completions, deep.as_bytes(), &limits()).is_err());
        let _ = PromptLogprobs::from_answer(deep.as_bytes());
    }
}

/// The generators reach the cases worth checking: requests that pass (one prompt and a batch)
/// and decode bodies the merge actually rewrites. (`--nocapture` shows the counts.)
#[test]
fn the_generators_reach_the_interesting_cases() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut one, mut batch, mut merged) = (0, 0, 0);
    let total = 2_000;
    for _ in 0..total {
        let body = request_body()
            .new_tree(&mut runner)
            .expect("body")
            .current();
        let raw = serde_json::to_vec(&body).expect("json");
        match parse(ApiKind::Completions, &raw, &limits()) {
            Ok(Parsed::One(_)) => one += 1,
            Ok(Parsed::Batch(_)) => batch += 1,
            Err(_) => {}
        }
        let prefill = answer().new_tree(&mut runner).expect("answer").current();
        let decode = sse_stream()
            .new_tree(&mut runner)
            .expect("stream")
            .current();
        if let Some(prompt) = PromptLogprobs::from_json(&prefill) {
            if collect(prompt.wrap(cut(&decode, &[]), true)) != decode {
                merged += 1;
            }
        }
    }
    eprintln!("{total} cases: {one} single and {batch} batched requests passed; {merged} streams merged into");
    assert!(one > 20 && batch > 5 && merged > 20, "coverage too thin");
}
