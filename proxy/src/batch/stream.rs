//! Streamed batches: the prompts' SSE bodies are read concurrently, cut into events, merged by
//! [`ChunkMerge`] and sent to the client through a bounded channel, so a slow client holds back
//! the engines rather than filling gateway memory. The task doing it dies with the response body:
//! a client that leaves drops every prompt's relay, which aborts their legs and frees their KV.

use super::merge::{BatchInfo, ChunkMerge, Step};
use crate::error::ApiError;
use crate::sse;
use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use std::convert::Infallible;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Merged events waiting for the client; beyond it the prompts' streams are not read.
const CHANNEL_EVENTS: usize = 16;

/// Largest SSE event accepted from an engine (a chunk is one token: this is generous).
const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// The merged SSE response over every prompt's relayed decode stream.
pub fn respond(heads: Vec<Response>, info: BatchInfo) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_EVENTS);
    let guard = AbortOnDrop(tokio::spawn(pump(heads, info, tx)).abort_handle());
    let body = ReceiverStream::new(rx).map(move |event| {
        let _keep = &guard;
        Ok::<_, Infallible>(event)
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Aborts the merging task when the response body is dropped (client gone).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one prompt's body yields to the merge: bytes, or its end.
enum Piece {
    Data(Result<Bytes, axum::Error>),
    End,
}

async fn pump(heads: Vec<Response>, info: BatchInfo, tx: mpsc::Sender<Bytes>) {
    let mut merge = ChunkMerge::new(info, heads.len());
    let mut events: Vec<SseEvents> = heads.iter().map(|_| SseEvents::default()).collect();
    let bodies = heads.into_iter().enumerate().map(|(i, resp)| {
        let end = stream::once(futures::future::ready(Piece::End));
        let data = resp.into_body().into_data_stream().map(Piece::Data);
        data.chain(end).map(move |piece| (i, piece))
    });
    let mut pieces = stream::select_all(bodies);
    while let Some((i, piece)) = pieces.next().await {
        let Some(events) = events.get_mut(i) else {
            continue;
        };
        for step in steps(&mut merge, events, i, piece) {
            match step {
                Step::Skip => {}
                Step::Forward(event) => {
                    if !send(&tx, event).await {
                        return;
                    }
                }
                Step::Fail(event) => {
                    // Ends here: dropping `pieces` drops every other prompt's relay.
                    send(&tx, event).await;
                    return;
                }
            }
        }
    }
    for event in merge.finish() {
        if !send(&tx, event).await {
            return;
        }
    }
}

/// The merge's answer to one piece of prompt `i`'s body.
fn steps(merge: &mut ChunkMerge, events: &mut SseEvents, i: usize, piece: Piece) -> Vec<Step> {
    let broken = |detail: String| {
        let err = ApiError::upstream(
            "decode_stream_interrupted",
            format!("prompt {i}: decode stream {detail}"),
        );
        vec![Step::Fail(sse::frame(&err.body().to_string()))]
    };
    match piece {
        Piece::End => merge.ended(i).map(Step::Fail).into_iter().collect(),
        Piece::Data(Err(e)) => broken(format!("broke: {e}")),
        Piece::Data(Ok(bytes)) => match events.push(&bytes) {
            Some(datas) => datas.iter().map(|d| merge.event(i, d)).collect(),
            None => broken(format!("sent an event over {MAX_EVENT_BYTES} bytes")),
        },
    }
}

/// False once the client is gone.
async fn send(tx: &mpsc::Sender<Bytes>, event: String) -> bool {
    tx.send(Bytes::from(event)).await.is_ok()
}

/// One prompt's SSE body cut into events' data; holds at most one partial event, bounded.
#[derive(Debug, Default)]
struct SseEvents {
    split: sse::Splitter,
}

impl SseEvents {
    /// Appends a chunk and returns the `data` of every event it completed (events without data,
    /// such as comments, yield nothing); `None` if a partial event outgrew the bound.
    fn push(&mut self, chunk: &[u8]) -> Option<Vec<String>> {
        let datas = self
            .split
            .push(chunk)
            .iter()
            .filter_map(|e| sse::data(e))
            .collect();
        (self.split.pending() <= MAX_EVENT_BYTES).then_some(datas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_whatever_the_chunking() {
        let mut sse = SseEvents::default();
        assert_eq!(
            sse.push(b"data: {\"a\"").expect("bounded"),
            Vec::<String>::new()
        );
        assert_eq!(
            sse.push(b":1}\n\n\n\ndata: [DONE]\r\n\r\n: comment\n\ndata: x")
                .expect("bounded"),
            vec![r#"{"a":1}"#.to_string(), "[DONE]".to_string()]
        );
        assert_eq!(sse.push(b"\n\n").expect("bounded"), vec!["x".to_string()]);
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut sse = SseEvents::default();
        assert!(sse.push(&vec![b'x'; MAX_EVENT_BYTES + 1]).is_none());
    }
}
