//! Writes event batches in either encoding, as msgspec does: the tag as the first element of a
//! positional event or as `"type"` in a map, fields without a default always present (nil when
//! unset), `data_parallel_rank` left out when unset.

use super::types::{BlockStored, EngineHash, EventBatch, KvEvent};
use rmp::Marker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// `{"ts": .., "events": [{"type": "BlockStored", ..}]}`: what current vLLM and SGLang send.
    #[default]
    Map,
    /// `[ts, [["BlockStored", ..]]]`: msgspec's `array_like`, what they sent before.
    Positional,
}

pub fn encode_batch(batch: &EventBatch, enc: Encoding) -> Vec<u8> {
    let tokens: usize = batch
        .events
        .iter()
        .map(|e| match e {
            KvEvent::BlockStored(s) => 5 * s.token_ids.len() + 9 * s.block_hashes.len(),
            KvEvent::BlockRemoved { block_hashes, .. } => 9 * block_hashes.len(),
            KvEvent::AllBlocksCleared => 0,
        })
        .sum();
    let mut w = Writer(Vec::with_capacity(64 + tokens + 96 * batch.events.len()));
    let rank = batch.data_parallel_rank;
    let fields = 2 + usize::from(rank.is_some());
    match enc {
        Encoding::Map => {
            w.map(fields);
            w.str("ts");
            w.f64(batch.ts);
            w.str("events");
        }
        Encoding::Positional => {
            w.array(fields);
            w.f64(batch.ts);
        }
    }
    w.array(batch.events.len());
    for e in &batch.events {
        w.event(e, enc);
    }
    if let Some(r) = rank {
        if enc == Encoding::Map {
            w.str("data_parallel_rank");
        }
        w.uint(u64::from(r));
    }
    w.0
}

struct Writer(Vec<u8>);

impl Writer {
    fn marker(&mut self, m: Marker) {
        self.0.push(m.to_u8());
    }

    fn len(&mut self, n: usize, fix: fn(u8) -> Marker, fix_max: usize, m16: Marker, m32: Marker) {
        if n <= fix_max {
            self.marker(fix(n as u8));
        } else if let Ok(n) = u16::try_from(n) {
            self.marker(m16);
            self.0.extend_from_slice(&n.to_be_bytes());
        } else {
            self.marker(m32);
            self.0
                .extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
        }
    }

    fn array(&mut self, n: usize) {
        self.len(n, Marker::FixArray, 15, Marker::Array16, Marker::Array32);
    }

    fn map(&mut self, n: usize) {
        self.len(n, Marker::FixMap, 15, Marker::Map16, Marker::Map32);
    }

    fn str(&mut self, s: &str) {
        if s.len() < 32 {
            self.marker(Marker::FixStr(s.len() as u8));
        } else if let Ok(n) = u8::try_from(s.len()) {
            self.marker(Marker::Str8);
            self.0.push(n);
        } else {
            self.len(s.len(), |_| Marker::Null, 0, Marker::Str16, Marker::Str32);
        }
        self.0.extend_from_slice(s.as_bytes());
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.marker(Marker::Null),
        }
    }

    fn uint(&mut self, n: u64) {
        if n < 128 {
            self.0.push(n as u8);
        } else if let Ok(n) = u8::try_from(n) {
            self.marker(Marker::U8);
            self.0.push(n);
        } else if let Ok(n) = u16::try_from(n) {
            self.marker(Marker::U16);
            self.0.extend_from_slice(&n.to_be_bytes());
        } else if let Ok(n) = u32::try_from(n) {
            self.marker(Marker::U32);
            self.0.extend_from_slice(&n.to_be_bytes());
        } else {
            self.marker(Marker::U64);
            self.0.extend_from_slice(&n.to_be_bytes());
        }
    }

    fn int(&mut self, n: i64) {
        match u64::try_from(n) {
            Ok(u) => self.uint(u),
            Err(_) => {
                self.marker(Marker::I64);
                self.0.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    fn f64(&mut self, x: f64) {
        self.marker(Marker::F64);
        self.0.extend_from_slice(&x.to_bits().to_be_bytes());
    }

    fn hashes(&mut self, hs: &[EngineHash]) {
        self.array(hs.len());
        for h in hs {
            self.uint(h.0);
        }
    }

    /// Writes `key` in a map, nothing positionally: the order of the calls is the field order.
    fn key(&mut self, enc: Encoding, key: &str) {
        if enc == Encoding::Map {
            self.str(key);
        }
    }

    fn head(&mut self, enc: Encoding, tag: &str, fields: usize) {
        match enc {
            Encoding::Map => {
                self.map(fields + 1);
                self.str("type");
            }
            Encoding::Positional => self.array(fields + 1),
        }
        self.str(tag);
    }

    fn event(&mut self, e: &KvEvent, enc: Encoding) {
        match e {
            KvEvent::BlockStored(s) => self.stored(s, enc),
            KvEvent::BlockRemoved {
                block_hashes,
                medium,
            } => {
                self.head(enc, "BlockRemoved", 2);
                self.key(enc, "block_hashes");
                self.hashes(block_hashes);
                self.key(enc, "medium");
                self.str(medium.as_str());
            }
            KvEvent::AllBlocksCleared => self.head(enc, "AllBlocksCleared", 0),
        }
    }

    fn stored(&mut self, s: &BlockStored, enc: Encoding) {
        self.head(enc, "BlockStored", 7);
        self.key(enc, "block_hashes");
        self.hashes(&s.block_hashes);
        self.key(enc, "parent_block_hash");
        match s.parent_block_hash {
            Some(h) => self.uint(h.0),
            None => self.marker(Marker::Null),
        }
        self.key(enc, "token_ids");
        self.array(s.token_ids.len());
        for t in &s.token_ids {
            self.uint(u64::from(*t));
        }
        self.key(enc, "block_size");
        self.uint(u64::from(s.block_size));
        self.key(enc, "lora_id");
        match s.lora_id {
            Some(id) => self.int(id),
            None => self.marker(Marker::Null),
        }
        self.key(enc, "medium");
        self.str(s.medium.as_str());
        self.key(enc, "lora_name");
        self.opt_str(s.lora_name.as_deref());
    }
}
