//! A MessagePack reader for event batches: one pass over the payload, no intermediate value
//! tree, every length checked against the remaining bytes and the limits before anything is
//! allocated. Unknown map keys and trailing positional fields are skipped (engines add fields).

use super::types::{BlockStored, EngineHash, EventBatch, KvEvent, Limits, Medium};
use rmp::Marker;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload ends early")]
    Truncated,
    #[error("payload of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("{what}: {len} entries is over the limit")]
    TooMany { what: &'static str, len: usize },
    #[error("{0}: unexpected type")]
    Type(&'static str),
    #[error("unknown event type {0:?}")]
    UnknownEvent(String),
    #[error("{0} missing")]
    Missing(&'static str),
    #[error("nesting too deep")]
    TooDeep,
    #[error("{0} bytes after the batch")]
    Trailing(usize),
}

type Result<T> = std::result::Result<T, DecodeError>;

/// Decodes one payload (the third frame of a PUB message, or the second of a replay frame).
pub fn decode_batch(payload: &[u8], limits: &Limits) -> Result<EventBatch> {
    if payload.len() > limits.max_payload_bytes {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    let mut r = Reader {
        buf: payload,
        limits,
    };
    let batch = r.batch()?;
    if !r.buf.is_empty() {
        return Err(DecodeError::Trailing(r.buf.len()));
    }
    Ok(batch)
}

/// Nesting the skipper follows before giving up: the events need three levels, extra keys a few.
const MAX_DEPTH: u32 = 16;

struct Reader<'a> {
    buf: &'a [u8],
    limits: &'a Limits,
}

enum Container {
    Array(usize),
    Map(usize),
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn be(&mut self, n: usize) -> Result<u64> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn marker(&mut self) -> Result<Marker> {
        Ok(Marker::from_u8(self.take(1)?[0]))
    }

    fn peek(&self) -> Result<Marker> {
        self.buf
            .first()
            .map(|b| Marker::from_u8(*b))
            .ok_or(DecodeError::Truncated)
    }

    /// Consumes a nil if one is next.
    fn nil(&mut self) -> Result<bool> {
        if self.peek()? == Marker::Null {
            self.take(1)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Every element takes at least one byte, so a length past the remaining bytes is a lie.
    fn checked(&self, len: usize) -> Result<usize> {
        if len > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(len)
    }

    fn container(&mut self, what: &'static str) -> Result<Container> {
        let c = match self.marker()? {
            Marker::FixArray(n) => Container::Array(usize::from(n)),
            Marker::Array16 => Container::Array(self.be(2)? as usize),
            Marker::Array32 => Container::Array(self.be(4)? as usize),
            Marker::FixMap(n) => Container::Map(usize::from(n)),
            Marker::Map16 => Container::Map(self.be(2)? as usize),
            Marker::Map32 => Container::Map(self.be(4)? as usize),
            _ => return Err(DecodeError::Type(what)),
        };
        Ok(c)
    }

    fn array(&mut self, what: &'static str, max: usize) -> Result<usize> {
        match self.container(what)? {
            Container::Array(n) if n > max => Err(DecodeError::TooMany { what, len: n }),
            Container::Array(n) => self.checked(n),
            Container::Map(_) => Err(DecodeError::Type(what)),
        }
    }

    /// Any integer, as its two's-complement 64 bits (hashes) or its value (everything else).
    fn int(&mut self, what: &'static str) -> Result<i128> {
        let v = match self.marker()? {
            Marker::FixPos(n) => i128::from(n),
            Marker::FixNeg(n) => i128::from(n),
            Marker::U8 => i128::from(self.be(1)?),
            Marker::U16 => i128::from(self.be(2)?),
            Marker::U32 => i128::from(self.be(4)?),
            Marker::U64 => i128::from(self.be(8)?),
            Marker::I8 => i128::from(self.be(1)? as u8 as i8),
            Marker::I16 => i128::from(self.be(2)? as u16 as i16),
            Marker::I32 => i128::from(self.be(4)? as u32 as i32),
            Marker::I64 => i128::from(self.be(8)? as i64),
            _ => return Err(DecodeError::Type(what)),
        };
        Ok(v)
    }

    fn uint32(&mut self, what: &'static str) -> Result<u32> {
        u32::try_from(self.int(what)?).map_err(|_| DecodeError::Type(what))
    }

    fn float(&mut self, what: &'static str) -> Result<f64> {
        match self.peek()? {
            Marker::F64 => {
                self.take(1)?;
                Ok(f64::from_bits(self.be(8)?))
            }
            Marker::F32 => {
                self.take(1)?;
                Ok(f64::from(f32::from_bits(self.be(4)? as u32)))
            }
            _ => Ok(self.int(what)? as f64),
        }
    }

    fn bytes_of(&mut self, m: Marker, what: &'static str) -> Result<&'a [u8]> {
        let n = match m {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 | Marker::Bin8 => self.be(1)? as usize,
            Marker::Str16 | Marker::Bin16 => self.be(2)? as usize,
            Marker::Str32 | Marker::Bin32 => self.be(4)? as usize,
            _ => return Err(DecodeError::Type(what)),
        };
        self.take(n)
    }

    fn str(&mut self, what: &'static str) -> Result<&'a str> {
        let m = self.marker()?;
        if !matches!(
            m,
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32
        ) {
            return Err(DecodeError::Type(what));
        }
        std::str::from_utf8(self.bytes_of(m, what)?).map_err(|_| DecodeError::Type(what))
    }

    fn opt_str(&mut self, what: &'static str) -> Result<Option<&'a str>> {
        if self.nil()? {
            return Ok(None);
        }
        self.str(what).map(Some)
    }

    fn hash(&mut self) -> Result<EngineHash> {
        match self.peek()? {
            m @ (Marker::Bin8 | Marker::Bin16 | Marker::Bin32) => {
                self.take(1)?;
                Ok(EngineHash::from_bytes(self.bytes_of(m, "block hash")?))
            }
            _ => Ok(EngineHash(self.int("block hash")? as u64)),
        }
    }

    fn opt_hash(&mut self) -> Result<Option<EngineHash>> {
        if self.nil()? {
            return Ok(None);
        }
        self.hash().map(Some)
    }

    fn hashes(&mut self) -> Result<Vec<EngineHash>> {
        let n = self.array("block_hashes", self.limits.max_hashes_per_event)?;
        (0..n).map(|_| self.hash()).collect()
    }

    fn tokens(&mut self) -> Result<Vec<u32>> {
        let n = self.array("token_ids", self.limits.max_tokens_per_event)?;
        (0..n).map(|_| self.uint32("token_ids")).collect()
    }

    fn opt_int(&mut self, what: &'static str) -> Result<Option<i64>> {
        if self.nil()? {
            return Ok(None);
        }
        i64::try_from(self.int(what)?)
            .map(Some)
            .map_err(|_| DecodeError::Type(what))
    }

    /// `extra_keys`: `None`, or one entry per block, each `None` or a tuple. Only whether any
    /// block has one matters here.
    fn extra_keys(&mut self) -> Result<bool> {
        if self.nil()? {
            return Ok(false);
        }
        let n = self.array("extra_keys", self.limits.max_hashes_per_event)?;
        let mut any = false;
        for _ in 0..n {
            if !self.nil()? {
                any = true;
                self.skip(0)?;
            }
        }
        Ok(any)
    }

    fn skip(&mut self, depth: u32) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let m = self.marker()?;
        let fixed = match m {
            Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => {
                0
            }
            Marker::U8 | Marker::I8 => 1,
            Marker::U16 | Marker::I16 => 2,
            Marker::U32 | Marker::I32 | Marker::F32 => 4,
            Marker::U64 | Marker::I64 | Marker::F64 => 8,
            Marker::FixStr(_)
            | Marker::Str8
            | Marker::Str16
            | Marker::Str32
            | Marker::Bin8
            | Marker::Bin16
            | Marker::Bin32 => {
                self.bytes_of(m, "value")?;
                0
            }
            Marker::FixExt1 => 2,
            Marker::FixExt2 => 3,
            Marker::FixExt4 => 5,
            Marker::FixExt8 => 9,
            Marker::FixExt16 => 17,
            Marker::Ext8 | Marker::Ext16 | Marker::Ext32 => {
                let n = match m {
                    Marker::Ext8 => self.be(1)?,
                    Marker::Ext16 => self.be(2)?,
                    _ => self.be(4)?,
                } as usize;
                n + 1
            }
            Marker::FixArray(n) => self.skip_items(usize::from(n), 1, depth)?,
            Marker::Array16 => {
                let n = self.be(2)? as usize;
                self.skip_items(n, 1, depth)?
            }
            Marker::Array32 => {
                let n = self.be(4)? as usize;
                self.skip_items(n, 1, depth)?
            }
            Marker::FixMap(n) => self.skip_items(usize::from(n), 2, depth)?,
            Marker::Map16 => {
                let n = self.be(2)? as usize;
                self.skip_items(n, 2, depth)?
            }
            Marker::Map32 => {
                let n = self.be(4)? as usize;
                self.skip_items(n, 2, depth)?
            }
            Marker::Reserved => return Err(DecodeError::Type("value")),
        };
        self.take(fixed)?;
        Ok(())
    }

    /// Skips `items` containers entries of `per` values each; returns the bytes left to take.
    fn skip_items(&mut self, items: usize, per: usize, depth: u32) -> Result<usize> {
        for _ in 0..self.checked(items)?.saturating_mul(per) {
            self.skip(depth + 1)?;
        }
        Ok(0)
    }

    fn batch(&mut self) -> Result<EventBatch> {
        match self.container("batch")? {
            Container::Array(n) => {
                let n = self.checked(n)?;
                if n < 2 {
                    return Err(DecodeError::Missing("events"));
                }
                let ts = self.float("ts")?;
                let events = self.events()?;
                let mut rank = None;
                if n >= 3 {
                    rank = self.opt_int("data_parallel_rank")?;
                }
                for _ in 3..n {
                    self.skip(1)?;
                }
                Ok(EventBatch {
                    ts,
                    events,
                    data_parallel_rank: rank.and_then(|r| u32::try_from(r).ok()),
                })
            }
            Container::Map(n) => {
                let (mut ts, mut events, mut rank) = (None, None, None);
                for _ in 0..self.checked(n)? {
                    match self.str("batch key")? {
                        "ts" => ts = Some(self.float("ts")?),
                        "events" => events = Some(self.events()?),
                        // SGLang's name for the same thing under attention data parallelism.
                        "data_parallel_rank" | "attn_dp_rank" => {
                            rank = self.opt_int("data_parallel_rank")?
                        }
                        _ => self.skip(1)?,
                    }
                }
                Ok(EventBatch {
                    ts: ts.unwrap_or(0.0),
                    events: events.ok_or(DecodeError::Missing("events"))?,
                    data_parallel_rank: rank.and_then(|r| u32::try_from(r).ok()),
                })
            }
        }
    }

    fn events(&mut self) -> Result<Vec<KvEvent>> {
        let n = self.array("events", self.limits.max_events_per_batch)?;
        (0..n).map(|_| self.event()).collect()
    }

    fn event(&mut self) -> Result<KvEvent> {
        let mut f = Fields::default();
        let tag = match self.container("event")? {
            Container::Array(n) => {
                let n = self.checked(n)?;
                if n == 0 {
                    return Err(DecodeError::Missing("event type"));
                }
                let tag = self.str("event type")?;
                let order: &[Field] = match tag {
                    "BlockStored" => &[
                        Field::Hashes,
                        Field::Parent,
                        Field::Tokens,
                        Field::BlockSize,
                        Field::LoraId,
                        Field::Medium,
                        Field::LoraName,
                        Field::ExtraKeys,
                    ],
                    "BlockRemoved" => &[Field::Hashes, Field::Medium],
                    _ => &[],
                };
                for i in 1..n {
                    match order.get(i - 1) {
                        Some(field) => self.field(*field, &mut f)?,
                        None => self.skip(1)?,
                    }
                }
                tag
            }
            Container::Map(n) => {
                let mut tag = None;
                for _ in 0..self.checked(n)? {
                    let field = match self.str("event key")? {
                        "type" => {
                            tag = Some(self.str("event type")?);
                            continue;
                        }
                        "block_hashes" => Field::Hashes,
                        "parent_block_hash" => Field::Parent,
                        "token_ids" => Field::Tokens,
                        "block_size" => Field::BlockSize,
                        "lora_id" => Field::LoraId,
                        "medium" => Field::Medium,
                        "lora_name" => Field::LoraName,
                        "extra_keys" => Field::ExtraKeys,
                        _ => {
                            self.skip(1)?;
                            continue;
                        }
                    };
                    self.field(field, &mut f)?;
                }
                tag.ok_or(DecodeError::Missing("event type"))?
            }
        };
        f.into_event(tag)
    }

    fn field(&mut self, field: Field, f: &mut Fields) -> Result<()> {
        match field {
            Field::Hashes => f.hashes = Some(self.hashes()?),
            Field::Parent => f.parent = self.opt_hash()?,
            Field::Tokens => f.tokens = Some(self.tokens()?),
            Field::BlockSize => f.block_size = Some(self.uint32("block_size")?),
            Field::LoraId => f.lora_id = self.opt_int("lora_id")?,
            Field::Medium => f.medium = Medium::parse(self.opt_str("medium")?),
            Field::LoraName => f.lora_name = self.opt_str("lora_name")?.map(str::to_string),
            Field::ExtraKeys => f.extra_keys = self.extra_keys()?,
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Field {
    Hashes,
    Parent,
    Tokens,
    BlockSize,
    LoraId,
    Medium,
    LoraName,
    ExtraKeys,
}

struct Fields {
    hashes: Option<Vec<EngineHash>>,
    parent: Option<EngineHash>,
    tokens: Option<Vec<u32>>,
    block_size: Option<u32>,
    lora_id: Option<i64>,
    lora_name: Option<String>,
    medium: Medium,
    extra_keys: bool,
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            hashes: None,
            parent: None,
            tokens: None,
            block_size: None,
            lora_id: None,
            lora_name: None,
            medium: Medium::Gpu,
            extra_keys: false,
        }
    }
}

impl Fields {
    fn into_event(self, tag: &str) -> Result<KvEvent> {
        match tag {
            "BlockStored" => Ok(KvEvent::BlockStored(BlockStored {
                block_hashes: self.hashes.ok_or(DecodeError::Missing("block_hashes"))?,
                parent_block_hash: self.parent,
                token_ids: self.tokens.ok_or(DecodeError::Missing("token_ids"))?,
                block_size: self.block_size.ok_or(DecodeError::Missing("block_size"))?,
                lora_id: self.lora_id,
                lora_name: self.lora_name,
                medium: self.medium,
                has_extra_keys: self.extra_keys,
            })),
            "BlockRemoved" => Ok(KvEvent::BlockRemoved {
                block_hashes: self.hashes.ok_or(DecodeError::Missing("block_hashes"))?,
                medium: self.medium,
            }),
            "AllBlocksCleared" => Ok(KvEvent::AllBlocksCleared),
            other => Err(DecodeError::UnknownEvent(other.chars().take(64).collect())),
        }
    }
}
