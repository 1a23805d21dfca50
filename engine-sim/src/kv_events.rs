//! KV cache events as vLLM publishes them: every block the prefix cache stores or evicts, and
//! a cleared cache, as MessagePack event batches on a ZMQ PUB socket (`[topic, seq, payload]`),
//! with a ROUTER socket replaying the last `buffer_steps` batches to a subscriber that missed
//! some (`[id, "", start_seq]` in, `[id, "", seq, payload]` out, then seq −1).
//!
//! Configured with vLLM's own keys (`--kv-events-config` JSON or `[kv_events]`), plus the
//! encoding: map (current vLLM and SGLang) or positional (what they sent before). The cache
//! hands batches over without waiting; when the queue is full a batch is dropped and the next
//! one starts with `AllBlocksCleared`, so subscribers never hold a block the engine does not.

use bytes::Bytes;
use pdgate_wire::kv_events::{encode_batch, Encoding, EventBatch, KvEvent};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

/// vLLM's `KVEventsConfig`, the keys it takes in `--kv-events-config`, and `encoding`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KvEventsConfig {
    pub enable_kv_cache_events: bool,
    /// `zmq`, or `null` for none (vLLM's names).
    pub publisher: String,
    /// Where the PUB socket binds. `tcp://*:5557` listens on every interface: anyone who can
    /// reach the port sees the cache's token ids. Keep it on loopback or a private network.
    pub endpoint: String,
    /// Where the replay ROUTER binds; absent: no replay.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Batches waiting to be sent; beyond it a batch is dropped (see the module comment).
    pub max_queue_size: usize,
    pub topic: String,
    pub encoding: Encoding,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enable_kv_cache_events: false,
            publisher: "null".into(),
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            max_queue_size: 100_000,
            topic: String::new(),
            encoding: Encoding::Map,
        }
    }
}

impl KvEventsConfig {
    pub fn enabled(&self) -> bool {
        self.enable_kv_cache_events && self.publisher == "zmq"
    }
}

/// ZMQ's `*` is "every interface"; the socket layer wants an address.
fn bindable(ep: &str) -> String {
    ep.replace("://*:", "://0.0.0.0:")
}

pub struct Publisher {
    tx: mpsc::Sender<Vec<KvEvent>>,
    dropped: AtomicBool,
    /// The endpoints really bound (a port 0 resolved).
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    task: JoinHandle<()>,
}

impl Publisher {
    pub async fn start(cfg: &KvEventsConfig) -> anyhow::Result<Arc<Self>> {
        let mut publ = zeromq::PubSocket::new();
        let endpoint = publ.bind(&bindable(&cfg.endpoint)).await?.to_string();
        let (router, replay_endpoint) = match &cfg.replay_endpoint {
            Some(ep) => {
                let mut r = zeromq::RouterSocket::new();
                let bound = r.bind(&bindable(ep)).await?.to_string();
                (Some(r), Some(bound))
            }
            None => (None, None),
        };
        let (tx, rx) = mpsc::channel(cfg.max_queue_size.max(1));
        let task = tokio::spawn(serve(
            publ,
            router,
            rx,
            Bytes::from(cfg.topic.clone().into_bytes()),
            cfg.buffer_steps.max(1),
            cfg.encoding,
        ));
        tracing::info!(endpoint = %endpoint, replay = ?replay_endpoint, "publishing KV events");
        Ok(Arc::new(Self {
            tx,
            dropped: AtomicBool::new(false),
            endpoint,
            replay_endpoint,
            task,
        }))
    }

    /// Queues one batch without waiting. Called with the cache's lock held, so batches leave in
    /// the order the cache changed.
    pub fn publish(&self, mut events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        if self.dropped.load(Ordering::Acquire) {
            events.insert(0, KvEvent::AllBlocksCleared);
        }
        match self.tx.try_send(events) {
            Ok(()) => self.dropped.store(false, Ordering::Release),
            Err(_) => {
                self.dropped.store(true, Ordering::Release);
                tracing::warn!("KV event queue full: a batch was dropped");
            }
        }
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_secs_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn serve(
    mut publ: zeromq::PubSocket,
    mut router: Option<zeromq::RouterSocket>,
    mut rx: mpsc::Receiver<Vec<KvEvent>>,
    topic: Bytes,
    buffer_steps: usize,
    encoding: Encoding,
) {
    let mut seq: u64 = 0;
    let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::with_capacity(buffer_steps.min(4096));
    loop {
        let replay_req = async {
            match router.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            events = rx.recv() => {
                let Some(events) = events else { return };
                let batch = EventBatch { ts: now_secs_f64(), events, data_parallel_rank: Some(0) };
                let payload = Bytes::from(encode_batch(&batch, encoding));
                let mut msg = ZmqMessage::from(topic.clone());
                msg.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
                msg.push_back(payload.clone());
                if let Err(e) = publ.send(msg).await {
                    tracing::debug!(error = %e, "KV event batch not sent");
                }
                if buffer.len() == buffer_steps {
                    buffer.pop_front();
                }
                buffer.push_back((seq, payload));
                seq += 1;
            }
            req = replay_req => {
                let (Ok(req), Some(r)) = (req, router.as_mut()) else { continue };
                answer_replay(r, req.into_vec(), &buffer).await;
            }
        }
    }
}

async fn answer_replay(
    r: &mut zeromq::RouterSocket,
    frames: Vec<Bytes>,
    buffer: &VecDeque<(u64, Bytes)>,
) {
    let [id, _, start] = frames.as_slice() else {
        tracing::debug!(parts = frames.len(), "malformed replay request");
        return;
    };
    let Ok(start) = <[u8; 8]>::try_from(start.as_ref()).map(u64::from_be_bytes) else {
        tracing::debug!("replay request without an 8-byte start");
        return;
    };
    let frame = |seq: Bytes, payload: Bytes| {
        let mut m = ZmqMessage::from(id.clone());
        m.push_back(Bytes::new());
        m.push_back(seq);
        m.push_back(payload);
        m
    };
    for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
        let msg = frame(Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone());
        if r.send(msg).await.is_err() {
            return;
        }
    }
    let end = frame(
        Bytes::copy_from_slice(&pdgate_wire::kv_events::END_OF_REPLAY.to_be_bytes()),
        Bytes::new(),
    );
    let _ = r.send(end).await;
}
