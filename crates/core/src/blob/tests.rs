use super::*;
use crate::address::crc64;
use proptest::prelude::*;

fn text(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| b"the quick brown fox jumps over the lazy dog "[i % 44] ^ ((i / 4096) as u8 & 1))
        .collect()
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn roundtrip_and_every_single_byte_flip_is_caught() {
    let payload: Vec<u8> = (0..300u32).map(|i| (i % 256) as u8).collect();
    for level in [None, Some(3)] {
        let (obj, r) = encode_blob_with(BlobKind::Base, &payload, level).unwrap();
        let (back, dec) = decode_blob("b", &obj, Some(r)).unwrap();
        assert_eq!(back, payload);
        assert_eq!(dec.address, r.address());
        assert_eq!(dec.object_len, obj.len() as u64);
        assert!(plausible_object_len(&r, obj.len() as u64));
        for i in 0..obj.len() {
            let mut bad = obj.clone();
            bad[i] ^= 0x40;
            assert!(
                decode_blob("b", &bad, Some(r)).is_err(),
                "{level:?}: flip at {i} not caught"
            );
        }
    }
}

#[test]
fn compressible_payloads_are_compressed_and_incompressible_ones_stored_raw() {
    let payload = text(200_000);
    let (obj, r) = encode_blob_with(BlobKind::Delta, &payload, Some(3)).unwrap();
    let (back, dec) = decode_blob("z", &obj, Some(r)).unwrap();
    assert_eq!((dec.version, dec.codec), (2, Codec::Zstd));
    assert!(obj.len() < payload.len() / 10, "{} bytes", obj.len());
    assert!(back == payload);
    // The content address is the uncompressed payload's, whatever the codec.
    let (plain, r1) = encode_blob(BlobKind::Delta, &payload);
    assert_eq!(r, r1);
    assert_eq!(
        decode_blob("p", &plain, Some(r)).unwrap().1.codec,
        Codec::Raw
    );

    let random = noise(100_000, 7);
    let (obj, r) = encode_blob_with(BlobKind::Segment, &random, Some(19)).unwrap();
    let (back, dec) = decode_blob("r", &obj, Some(r)).unwrap();
    assert_eq!((dec.version, dec.codec), (2, Codec::Raw));
    assert_eq!(obj.len(), random.len() + HEADER_LEN_V2 + FOOTER_LEN_V2);
    assert_eq!(
        &obj[HEADER_LEN_V2..HEADER_LEN_V2 + random.len()],
        &random[..]
    );
    assert!(back == random);
    // Level 0 is off: a version 1 blob.
    let (obj, _) = encode_blob_with(BlobKind::Segment, &random, Some(0)).unwrap();
    assert_eq!(u16::from_le_bytes([obj[8], obj[9]]), 1);
}

#[test]
fn worthwhile_threshold() {
    assert!(worthwhile(100, 97));
    assert!(!worthwhile(100, 98));
    assert!(worthwhile(0, 0));
    assert!(worthwhile(u64::MAX, u64::MAX / 2));
}

/// Rewrites the body of a version 2 object and fixes up every checksum around it, so only
/// the body itself is wrong.
fn with_body(obj: &[u8], body: &[u8], payload_crc: u64) -> Vec<u8> {
    let kind = BlobKind::from_code(obj[10]).unwrap();
    let codec = Codec::from_code(obj[11]).unwrap();
    let n = u64::from_le_bytes(obj[16..24].try_into().unwrap());
    let mut out = encode_header_v2(kind, codec, n, body.len() as u64).to_vec();
    out.extend_from_slice(body);
    out.extend_from_slice(&encode_footer_v2(crc64(body), payload_crc));
    out
}

#[test]
fn damaged_compressed_bodies_are_named_whichever_layer_catches_them() {
    let payload = text(50_000);
    let (obj, r) = encode_blob_with(BlobKind::Base, &payload, Some(3)).unwrap();
    let body = &obj[HEADER_LEN_V2..obj.len() - FOOTER_LEN_V2];
    // Damage at rest: the stored CRC64 catches it (or zstd does, earlier).
    let mut bad = obj.clone();
    bad[HEADER_LEN_V2 + body.len() / 2] ^= 0x10;
    let e = decode_blob("k/base", &bad, Some(r))
        .unwrap_err()
        .to_string();
    assert!(e.contains("k/base") && e.contains("corrupt"), "{e}");
    // A body whose stored CRC64 is right but which is not the payload's frame.
    let other = zstd::bulk::compress(&text(50_001)[1..], 3).unwrap();
    let e = decode_blob("k/x", &with_body(&obj, &other, r.crc64), Some(r))
        .unwrap_err()
        .to_string();
    assert!(e.contains("k/x") && e.contains("payload"), "{e}");
    // Garbage that is no zstd frame at all.
    let e = decode_blob("k/g", &with_body(&obj, &noise(900, 3), r.crc64), Some(r))
        .unwrap_err()
        .to_string();
    assert!(e.contains("k/g") && e.contains("zstd"), "{e}");
    // A frame cut short (the frame itself, not the object).
    let e = decode_blob(
        "k/c",
        &with_body(&obj, &body[..body.len() - 3], r.crc64),
        Some(r),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("k/c") && e.contains("zstd"), "{e}");
    // A frame followed by more bytes.
    let mut long = body.to_vec();
    long.extend_from_slice(b"xyz");
    let e = decode_blob("k/l", &with_body(&obj, &long, r.crc64), Some(r))
        .unwrap_err()
        .to_string();
    assert!(e.contains("k/l") && e.contains("after the end"), "{e}");
    // A frame that inflates to more than the header's payload length.
    let more = zstd::bulk::compress(&text(50_100), 3).unwrap();
    let e = decode_blob("k/m", &with_body(&obj, &more, r.crc64), Some(r))
        .unwrap_err()
        .to_string();
    assert!(e.contains("k/m") && e.contains("more than"), "{e}");
}

#[test]
fn truncation_and_trailing_bytes_are_named() {
    for level in [None, Some(3)] {
        let (obj, r) = encode_blob_with(BlobKind::Segment, &text(5000), level).unwrap();
        for cut in [0, 5, HEADER_LEN, HEADER_LEN + 3, 40, obj.len() - 1] {
            let err = decode_blob("k/seg", &obj[..cut], Some(r))
                .unwrap_err()
                .to_string();
            assert!(err.contains("k/seg") && err.contains("truncated"), "{err}");
        }
        let mut long = obj.clone();
        long.push(0);
        let err = decode_blob("k/seg", &long, Some(r))
            .unwrap_err()
            .to_string();
        assert!(err.contains("trailing"), "{err}");
    }
}

#[test]
fn unknown_versions_and_codecs_are_refused() {
    let (obj, r) = encode_blob_with(BlobKind::Base, &text(3000), Some(3)).unwrap();
    let mut v3 = obj.clone();
    v3[8] = 3;
    let c = crc64(&v3[0..24]);
    v3[24..32].copy_from_slice(&c.to_le_bytes());
    let e = decode_blob("k", &v3, Some(r)).unwrap_err();
    assert!(
        matches!(e, CoreError::UnsupportedVersion { version: 3, .. }),
        "{e}"
    );
    let mut codec = obj.clone();
    codec[11] = 9;
    let c = crc64(&codec[0..24]);
    codec[24..32].copy_from_slice(&c.to_le_bytes());
    let e = decode_blob("k", &codec, Some(r)).unwrap_err().to_string();
    assert!(e.contains("codec"), "{e}");
}

#[test]
fn wrong_expectation_is_rejected() {
    let (obj, r) = encode_blob(BlobKind::Base, b"abc");
    let other = BlobRef {
        kind: BlobKind::Delta,
        ..r
    };
    assert!(decode_blob("x", &obj, Some(other)).is_err());
    let other = BlobRef {
        xxh3: Digest128(r.xxh3.0 ^ 1),
        ..r
    };
    let err = decode_blob("x", &obj, Some(other)).unwrap_err().to_string();
    assert!(err.contains("XXH3"), "{err}");
}

#[test]
fn plausible_sizes() {
    let (_, r) = encode_blob(BlobKind::Base, &[0u8; 1000]);
    assert!(plausible_object_len(&r, 1048));
    assert!(plausible_object_len(&r, 72));
    assert!(plausible_object_len(&r, 1072));
    assert!(!plausible_object_len(&r, 71));
    assert!(!plausible_object_len(&r, 1073));
    assert_eq!(max_object_len(r.len), 1072);
}

proptest! {
    #[test]
    fn streaming_decode_in_any_split(payload in proptest::collection::vec(any::<u8>(), 0..2000),
                                     repeat in 1usize..40,
                                     level in prop_oneof![Just(None), Just(Some(1)), Just(Some(3)), Just(Some(-3))],
                                     splits in proptest::collection::vec(1usize..97, 1..40)) {
        // Repeating the random bytes makes some payloads compressible, some not.
        let payload: Vec<u8> = payload.iter().copied().cycle().take(payload.len() * repeat).collect();
        let (obj, r) = encode_blob_with(BlobKind::Delta, &payload, level).unwrap();
        prop_assert!(plausible_object_len(&r, obj.len() as u64));
        let mut d = BlobDecoder::new("p", Some(r));
        let mut out = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < obj.len() {
            let n = splits[i % splits.len()].min(obj.len() - pos);
            d.push(&obj[pos..pos + n], |p| {
                out.extend_from_slice(p);
                Ok::<(), CoreError>(())
            }).unwrap();
            pos += n;
            i += 1;
        }
        prop_assert_eq!(d.object_len(), Some(obj.len() as u64));
        let dec = d.finish().unwrap();
        prop_assert_eq!(dec.object_len, obj.len() as u64);
        prop_assert_eq!(out, payload);
    }
}
