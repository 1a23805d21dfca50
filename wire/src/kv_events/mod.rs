//! KV cache events as vLLM and SGLang publish them over ZMQ, and as the reference engine
//! publishes them too: the types, a bounded MessagePack decoder that takes both encodings the
//! engines have used, and an encoder for either.
//!
//! The transport (a ZMQ multipart `[topic, seq as 8-byte big-endian, payload]` on PUB/SUB, and
//! a ROUTER that replays `[seq, payload]` frames from a start sequence, ending with seq −1) lives
//! with the sockets in the gateway and the engine; this module never does I/O.
//!
//! Two encodings, both msgspec's: the older *positional* one (a batch is `[ts, events, dp_rank]`,
//! an event `["BlockStored", hashes, parent, tokens, ...]` with the tag first), and the newer *map*
//! one (`{"ts": .., "events": .., "data_parallel_rank": ..}`, events `{"type": "BlockStored", ..}`).
//! Engines switched from the first to the second and broke routers that read only one.

mod decode;
mod encode;
mod types;

pub use decode::{decode_batch, DecodeError};
pub use encode::{encode_batch, Encoding};
pub use types::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: &[u64], parent: Option<u64>, bs: u32) -> KvEvent {
        KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.iter().copied().map(EngineHash).collect(),
            parent_block_hash: parent.map(EngineHash),
            token_ids: (0..hashes.len() as u32 * bs).collect(),
            block_size: bs,
            lora_id: None,
            lora_name: None,
            medium: Medium::Gpu,
            has_extra_keys: false,
        })
    }

    fn sample() -> EventBatch {
        EventBatch {
            ts: 1_765_000_000.25,
            events: vec![
                stored(&[1, u64::MAX, 300], None, 4),
                stored(&[7], Some(300), 4),
                KvEvent::BlockRemoved {
                    block_hashes: vec![EngineHash(1)],
                    medium: Medium::Cpu,
                },
                KvEvent::AllBlocksCleared,
            ],
            data_parallel_rank: Some(3),
        }
    }

    #[test]
    fn both_encodings_round_trip() {
        for enc in [Encoding::Map, Encoding::Positional] {
            let b = sample();
            let bytes = encode_batch(&b, enc);
            assert_eq!(decode_batch(&bytes, &Limits::default()), Ok(b), "{enc:?}");
            let mut no_rank = sample();
            no_rank.data_parallel_rank = None;
            let bytes = encode_batch(&no_rank, enc);
            assert_eq!(decode_batch(&bytes, &Limits::default()), Ok(no_rank));
        }
    }

    #[test]
    fn the_two_encodings_differ_on_the_wire() {
        let m = encode_batch(&sample(), Encoding::Map);
        let p = encode_batch(&sample(), Encoding::Positional);
        assert_eq!(m[0], 0x83, "a map of three");
        assert_eq!(p[0], 0x93, "an array of three");
    }

    /// Hand-built msgpack, as msgspec writes it: bytes hashes, a negative int hash (Python's
    /// `hash()`), extra keys, an unknown field and the tag not first in the map.
    #[test]
    fn bytes_and_negative_hashes_extra_keys_and_unknown_fields() {
        let mut b = vec![0x82]; // {"events": [...], "ts": 1}
        b.extend([0xa6]);
        b.extend(b"events");
        b.push(0x91);
        b.push(0x86);
        b.extend([0xac]);
        b.extend(b"block_hashes");
        b.extend([0x92, 0xc4, 0x03, 1, 2, 3, 0xd3]);
        b.extend((-5i64).to_be_bytes());
        b.extend([0xaa]);
        b.extend(b"extra_keys");
        b.extend([0x92, 0xc0, 0x91, 0xa4]);
        b.extend(b"salt");
        b.extend([0xa9]);
        b.extend(b"token_ids");
        b.extend([0x92, 5, 6]);
        b.extend([0xaa]);
        b.extend(b"block_size");
        b.push(1);
        b.extend([0xa7]);
        b.extend(b"future!");
        b.extend([0x81, 0xa1, b'k', 0x90]);
        b.extend([0xa4]);
        b.extend(b"type");
        b.extend([0xab]);
        b.extend(b"BlockStored");
        b.extend([0xa2]);
        b.extend(b"ts");
        b.push(1);
        let got = decode_batch(&b, &Limits::default()).unwrap();
        let KvEvent::BlockStored(s) = &got.events[0] else {
            panic!("{got:?}")
        };
        assert_eq!(s.block_hashes[0], EngineHash::from_bytes(&[1, 2, 3]));
        assert_eq!(s.block_hashes[1], EngineHash(-5i64 as u64));
        assert!(s.has_extra_keys);
        assert_eq!(s.medium, Medium::Gpu, "no medium means GPU");
        assert_eq!(s.parent_block_hash, None);
        assert_eq!(got.ts, 1.0);
    }

    #[test]
    fn limits_refuse_before_allocating() {
        let bytes = encode_batch(&sample(), Encoding::Map);
        let tight = Limits {
            max_hashes_per_event: 2,
            ..Limits::default()
        };
        assert!(matches!(
            decode_batch(&bytes, &tight),
            Err(DecodeError::TooMany {
                what: "block_hashes",
                len: 3
            })
        ));
        let small = Limits {
            max_payload_bytes: 8,
            ..Limits::default()
        };
        assert!(matches!(
            decode_batch(&bytes, &small),
            Err(DecodeError::TooLarge(_))
        ));
        // An array claiming 2^32-1 entries in a few bytes.
        let lie = [0x92, 0x01, 0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_batch(&lie, &Limits::default()).is_err());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        for enc in [Encoding::Map, Encoding::Positional] {
            let bytes = encode_batch(&sample(), enc);
            for cut in 0..bytes.len() {
                assert!(decode_batch(&bytes[..cut], &Limits::default()).is_err());
            }
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut b = bytes.clone();
                let i = (x as usize) % b.len();
                b[i] = (x >> 32) as u8;
                let _ = decode_batch(&b, &Limits::default());
            }
        }
        // Deep nesting in an unknown field.
        let mut deep = vec![0x82, 0xa6];
        deep.extend(b"events");
        deep.push(0x90);
        deep.extend([0xa1, b'x']);
        deep.extend(std::iter::repeat_n(0x91, 10_000));
        deep.push(0xc0);
        assert_eq!(
            decode_batch(&deep, &Limits::default()),
            Err(DecodeError::TooDeep)
        );
    }

    #[test]
    fn unknown_event_types_are_refused() {
        let mut b = vec![0x92, 0x01, 0x91, 0x91, 0xa4];
        b.extend(b"Nope");
        assert!(matches!(
            decode_batch(&b, &Limits::default()),
            Err(DecodeError::UnknownEvent(t)) if t == "Nope"
        ));
    }
}
