//! KV event ingest: how many block events one core decodes and indexes per second, and the lag
//! from publish to index over a real ZMQ PUB/SUB pair on loopback, each against a no-op
//! subscriber (receives and drops) measured in the same run.
//!
//! `cargo bench -p pdgate-gateway --bench kv_events` (release profile). Prints one table.

use bytes::Bytes;
use pdgate_gateway::kv_events::index::{Sink, WorkerIndex};
use pdgate_scheduler::blocks::DEFAULT_SEED;
use pdgate_scheduler::{BlockHash, BlockHasher, InstanceSpec, Role, Scheduler, SchedulerConfig};
use pdgate_wire::kv_events::{
    decode_batch, encode_batch, BlockStored, Encoding, EngineHash, EventBatch, KvEvent, Limits,
    Medium,
};
use std::time::{Duration, Instant};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

const BS: usize = 16;
/// Blocks per BlockStored event (a 256-token prompt chunk) and events per batch.
const BLOCKS_PER_EVENT: usize = 16;
const EVENTS_PER_BATCH: usize = 4;
/// Prompts stay cached this many batches before the engine evicts them.
const RESIDENT_BATCHES: usize = 200;

struct Indexed<'a> {
    s: &'a mut Scheduler,
    id: pdgate_scheduler::InstanceId,
}

impl Sink for Indexed<'_> {
    fn stored(&mut self, keys: &[BlockHash]) {
        self.s.blocks_stored(self.id, keys, Duration::ZERO);
    }
    fn removed(&mut self, keys: &[BlockHash]) {
        self.s.blocks_removed(self.id, keys);
    }
    fn cleared(&mut self) {
        self.s.blocks_cleared(self.id);
    }
}

fn now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Batch `n`: four new 16-block prompts stored, and the four stored `RESIDENT_BATCHES` earlier
/// evicted. Engine hashes are arbitrary (not the gateway's), as with a real engine.
fn batch(n: usize, enc: Encoding) -> (Vec<u8>, usize) {
    let mut events = Vec::new();
    let mut blocks = 0;
    for e in 0..EVENTS_PER_BATCH {
        let p = (n * EVENTS_PER_BATCH + e) as u64;
        events.push(KvEvent::BlockStored(BlockStored {
            block_hashes: (0..BLOCKS_PER_EVENT as u64)
                .map(|b| EngineHash(p << 8 | b))
                .collect(),
            parent_block_hash: None,
            token_ids: (0..(BLOCKS_PER_EVENT * BS) as u32)
                .map(|t| t.wrapping_mul(2_654_435_761) ^ p as u32)
                .collect(),
            block_size: BS as u32,
            lora_id: None,
            lora_name: None,
            medium: Medium::Gpu,
            has_extra_keys: false,
        }));
        blocks += BLOCKS_PER_EVENT;
        if n >= RESIDENT_BATCHES {
            let old = ((n - RESIDENT_BATCHES) * EVENTS_PER_BATCH + e) as u64;
            events.push(KvEvent::BlockRemoved {
                block_hashes: (0..BLOCKS_PER_EVENT as u64)
                    .map(|b| EngineHash(old << 8 | b))
                    .collect(),
                medium: Medium::Gpu,
            });
            blocks += BLOCKS_PER_EVENT;
        }
    }
    let b = EventBatch {
        ts: now_f64(),
        events,
        data_parallel_rank: Some(0),
    };
    (encode_batch(&b, enc), blocks)
}

struct Subscriber {
    sched: Scheduler,
    id: pdgate_scheduler::InstanceId,
    index: WorkerIndex,
    limits: Limits,
}

impl Subscriber {
    fn new() -> Self {
        let mut sched = Scheduler::new(SchedulerConfig::default());
        let id = sched.add_instance(Role::Prefill, InstanceSpec::default());
        Self {
            sched,
            id,
            index: WorkerIndex::new(BlockHasher::new(BS, DEFAULT_SEED), 4 << 20),
            limits: Limits::default(),
        }
    }

    /// Decode and index one payload; its timestamp.
    fn ingest(&mut self, payload: &[u8]) -> f64 {
        let Ok(b) = decode_batch(payload, &self.limits) else {
            return 0.0;
        };
        let mut sink = Indexed {
            s: &mut self.sched,
            id: self.id,
        };
        self.index.apply(&b, &mut sink, &mut |_| {});
        b.ts
    }
}

fn one_core(enc: Encoding, n: usize) -> (f64, f64) {
    let payloads: Vec<(Vec<u8>, usize)> = (0..n).map(|i| batch(i, enc)).collect();
    let blocks: usize = payloads.iter().map(|(_, b)| b).sum();
    // No-op: touch every byte (what receiving costs at least).
    let t = Instant::now();
    let mut sum = 0u64;
    for (p, _) in &payloads {
        sum = sum.wrapping_add(p.iter().map(|b| u64::from(*b)).sum::<u64>());
    }
    std::hint::black_box(sum);
    let noop = blocks as f64 / t.elapsed().as_secs_f64();
    let mut sub = Subscriber::new();
    let t = Instant::now();
    for (p, _) in &payloads {
        sub.ingest(p);
    }
    let full = blocks as f64 / t.elapsed().as_secs_f64();
    (full, noop)
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() * 99 / 100).copied().unwrap_or(f64::NAN)
}

/// Publishes `n` batches at `rate` block events/s over loopback PUB/SUB; per-batch lag from the
/// batch's timestamp to the end of its processing, and the block-event rate achieved.
async fn live(n: usize, rate: f64, noop: bool) -> (f64, f64, f64) {
    let mut publ = zeromq::PubSocket::new();
    let ep = publ
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string();
    let mut sub = zeromq::SubSocket::new();
    sub.subscribe("").await.expect("subscribe");
    sub.connect(&ep).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let recv = tokio::spawn(async move {
        let mut s = Subscriber::new();
        let mut lags = Vec::with_capacity(n);
        let mut first = None;
        while lags.len() < n {
            let Ok(m) = sub.recv().await else { break };
            first.get_or_insert_with(Instant::now);
            let frames = m.into_vec();
            let Some(payload) = frames.get(2) else {
                continue;
            };
            let ts = if noop {
                // Only the timestamp: the first field of the map, read without decoding.
                f64::from_be_bytes(payload[5..13].try_into().unwrap_or([0; 8]))
            } else {
                s.ingest(payload)
            };
            lags.push(now_f64() - ts);
        }
        (lags, first.map(|f| f.elapsed()).unwrap_or_default())
    });
    let per_batch = BLOCKS_PER_EVENT * EVENTS_PER_BATCH * 2;
    let gap = Duration::from_secs_f64(per_batch as f64 / rate);
    let start = Instant::now();
    for i in 0..n {
        let due = start + gap * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        // Encoded at send time so the timestamp is the publish time.
        let (payload, _) = batch(i + RESIDENT_BATCHES, Encoding::Map);
        let mut m = ZmqMessage::from(Bytes::new());
        m.push_back(Bytes::copy_from_slice(&(i as u64).to_be_bytes()));
        m.push_back(Bytes::from(payload));
        publ.send(m).await.expect("send");
    }
    let (lags, took) = recv.await.expect("receiver");
    let achieved = (lags.len() * per_batch) as f64 / took.as_secs_f64();
    (
        p99(lags.clone()) * 1e3,
        lags.iter().sum::<f64>() / lags.len() as f64 * 1e3,
        achieved,
    )
}

fn main() {
    println!("| measurement | no-op subscriber | pdgate subscriber (decode + index) | ratio |");
    println!("|---|---|---|---|");
    for enc in [Encoding::Map, Encoding::Positional] {
        let (full, noop) = one_core(enc, 20_000);
        println!(
            "| one core, {enc:?} encoding, block events/s | {noop:.0} | {full:.0} | {:.3} |",
            full / noop
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // 500k block events/s: 128 per batch (64 stored, 64 removed), ~3900 batches/s, 4 s.
        let n = 16_000;
        let (np99, nmean, nrate) = live(n, 500_000.0, true).await;
        let (fp99, fmean, frate) = live(n, 500_000.0, false).await;
        println!(
            "| loopback at 500k block events/s: achieved rate | {nrate:.0} | {frate:.0} | {:.3} |",
            frate / nrate
        );
        println!(
            "| loopback at 500k block events/s: mean lag, ms | {nmean:.3} | {fmean:.3} | {:.2} |",
            fmean / nmean
        );
        println!(
            "| loopback at 500k block events/s: p99 lag, ms | {np99:.3} | {fp99:.3} | {:.2} |",
            fp99 / np99
        );
    });
}
