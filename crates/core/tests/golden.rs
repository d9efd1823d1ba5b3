//! Golden fixtures of the on-disk formats: a blob, a delta and a manifest encoded by this
//! build must equal the committed bytes, and the committed bytes must decode to the same
//! values. A format change shows up here and needs a version bump (see docs/FORMATS.md).
//! `CAIRN_BLESS=1 cargo test -p cairn-core --test golden` rewrites the fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use cairn_core::blob::{decode_blob, encode_blob, encode_blob_with, Codec};
use cairn_core::delta::{encode_delta, DeltaHeader, DeltaView};
use cairn_core::{
    BlobKind, BlobRef, ChunkState, Content, DbId, DbState, Digest128, Generation, Lsn, Manifest,
    PagesState, SegmentEntry, SourceKind, StateDiff, TenantId, WalDiff, WalState,
};

fn fixture(name: &str, bytes: &[u8]) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("CAIRN_BLESS").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (bless with CAIRN_BLESS=1)", path.display()))
}

fn payload() -> Vec<u8> {
    (0..1000u32).map(|i| (i * 7 % 256) as u8).collect()
}

#[test]
fn blob_v1() {
    let (obj, blob) = encode_blob(BlobKind::Base, &payload());
    let golden = fixture("blob-v1.bin", &obj);
    assert_eq!(
        obj, golden,
        "blob encoding changed: bump BLOB_VERSION and document it"
    );
    let (back, decoded) = decode_blob("golden", &golden, Some(blob)).unwrap();
    assert_eq!(back, payload());
    assert_eq!(decoded.address, blob.address());
    // Names carry both digests (scheme 1); blobs named before that keep their names.
    assert!(
        blob.name().starts_with("base-9a9a15922194c6ca-3e8-"),
        "{}",
        blob.name()
    );
    assert_eq!(blob.name().len(), "base-9a9a15922194c6ca-3e8-".len() + 16);
    let legacy = cairn_core::BlobRef { scheme: 0, ..blob };
    assert_eq!(legacy.name(), "base-9a9a15922194c6ca-3e8");
}

/// Version 2: a compressible payload (zstd body) and an incompressible one (raw body).
/// The zstd bytes are reproducible for the zstd version pinned in `Cargo.lock`.
#[test]
fn blob_v2() {
    let text: Vec<u8> = (0..4000u32)
        .map(|i| b"cairn checkpoints pages "[(i % 24) as usize])
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..600)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for (name, payload, codec) in [
        ("blob-v2-zstd.bin", &text, Codec::Zstd),
        ("blob-v2-raw.bin", &noise, Codec::Raw),
    ] {
        let (obj, blob) = encode_blob_with(BlobKind::Delta, payload, Some(3)).unwrap();
        let golden = fixture(name, &obj);
        assert_eq!(
            obj, golden,
            "{name}: blob encoding changed: bump BLOB_VERSION and document it"
        );
        let (back, decoded) = decode_blob("golden", &golden, Some(blob)).unwrap();
        assert_eq!(&back, payload);
        assert_eq!((decoded.version, decoded.codec), (2, codec));
        // The name is the uncompressed payload's, exactly as version 1 would name it.
        assert_eq!(blob, encode_blob(BlobKind::Delta, payload).1);
    }
}

#[test]
fn delta_v1() {
    let h = DeltaHeader {
        page_size: 512,
        chunk: 3,
        generation: 9,
        base_crc64: 0x0123_4567_89ab_cdef,
        chunk_len: 8 * 512,
    };
    let bytes: Vec<u8> = (0..3 * 512u32).map(|i| (i % 251) as u8).collect();
    let d = encode_delta(&h, &[1, 4, 7], &bytes).unwrap();
    let golden = fixture("delta-v1.bin", &d);
    assert_eq!(
        d, golden,
        "delta encoding changed: bump DELTA_VERSION and document it"
    );
    let v = DeltaView::parse("golden", &golden, 3, 0x0123_4567_89ab_cdef, 512).unwrap();
    assert_eq!(v.header, h);
    assert_eq!(v.page(4), Some(&bytes[512..1024]));
}

fn blob(kind: BlobKind, crc: u64, len: u64) -> BlobRef {
    BlobRef {
        kind,
        crc64: crc,
        len,
        xxh3: Digest128(u128::from(crc) << 64 | u128::from(len)),
        alias: 0,
        scheme: 0,
        epoch: 0,
    }
}

/// The values the version 1 fixtures hold, as this build reads them.
fn v1_pages() -> Manifest {
    Manifest {
        format: 1,
        tenant: TenantId::new("acme").unwrap(),
        db: DbId::new("orders").unwrap(),
        generation: Generation(7),
        parent: Some(Generation(6)),
        writer: "00000000000000aa".into(),
        created_unix_ms: 1_795_000_000_000,
        job: Some("00000000000000bb".into()),
        content: Content::Full(DbState {
            pages: Some(PagesState {
                origin: SourceKind::Sqlite,
                page_size: 4096,
                chunk_size: 8192,
                len: 12288,
                lsn: None,
                generation: Generation(7),
                chunks: vec![
                    ChunkState {
                        index: 0,
                        len: 8192,
                        base: blob(BlobKind::Base, 1, 8192),
                        deltas: vec![blob(BlobKind::Delta, 2, 4156)],
                    },
                    ChunkState {
                        index: 1,
                        len: 4096,
                        base: blob(BlobKind::Base, 3, 4096),
                        deltas: vec![],
                    },
                ],
            }),
            wal: None,
            gc: Default::default(),
        }),
        gc: false,
    }
}

fn segment(name: &str, start: u64, len: u64, crc: u64) -> SegmentEntry {
    SegmentEntry {
        name: name.into(),
        lsn_start: Lsn(start),
        lsn_end: Lsn(start + len),
        len,
        blob: blob(BlobKind::Segment, crc, len),
    }
}

#[test]
fn manifests_v1_are_still_read() {
    let pages = v1_pages();
    let segments = Manifest {
        generation: Generation(2),
        parent: Some(Generation(1)),
        job: None,
        content: Content::Full(DbState {
            pages: None,
            wal: Some(WalState {
                start: Lsn(100),
                end: Lsn(150),
                last_name: Some("wal-0001".into()),
                segments: vec![segment("wal-0001", 100, 50, 4)],
            }),
            gc: Default::default(),
        }),
        ..pages.clone()
    };
    for (name, m) in [
        ("manifest-pages-v1.cmf", pages),
        ("manifest-segments-v1.cmf", segments),
    ] {
        // Version 1 is read, never written: the fixtures are not blessed again.
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        let golden = std::fs::read(&path).unwrap();
        assert_eq!(Manifest::decode(name, &golden).unwrap(), m, "{name}");
    }
}

#[test]
fn manifests_v2() {
    let both = Manifest {
        format: 2,
        generation: Generation(8),
        parent: Some(Generation(7)),
        content: Content::Full(DbState {
            pages: match v1_pages().content {
                Content::Full(s) => s.pages.map(|p| PagesState {
                    lsn: Some(Lsn(150)),
                    ..p
                }),
                Content::Diff(_) => None,
            },
            wal: Some(WalState {
                start: Lsn(100),
                end: Lsn(230),
                last_name: Some("wal-0002".into()),
                segments: vec![
                    segment("wal-0001", 100, 50, 4),
                    segment("wal-0002", 150, 80, 5),
                ],
            }),
            gc: Default::default(),
        }),
        ..v1_pages()
    };
    let diff = Manifest {
        format: 2,
        generation: Generation(9),
        parent: Some(Generation(8)),
        content: Content::Diff(StateDiff {
            chain: 1,
            pages: None,
            wal: Some(WalDiff {
                drop_head: 1,
                drop_tail: 0,
                append: vec![segment("wal-0003", 230, 20, 6)],
                start: Lsn(150),
                end: Lsn(250),
                last_name: Some("wal-0003".into()),
            }),
            gc: None,
        }),
        ..v1_pages()
    };
    for (name, m) in [
        ("manifest-full-v2.cmf", both.clone()),
        ("manifest-diff-v2.cmf", diff.clone()),
    ] {
        let golden = fixture(name, &m.encode());
        assert_eq!(m.encode(), golden, "{name}: manifest encoding changed");
        assert_eq!(Manifest::decode(name, &golden).unwrap(), m);
    }
    let (Content::Full(mut state), Content::Diff(d)) = (both.content, diff.content) else {
        panic!("fixture shapes")
    };
    state.apply(&d).unwrap();
    let wal = state.wal.unwrap();
    assert_eq!(
        (wal.start, wal.end, wal.segments.len()),
        (Lsn(150), Lsn(250), 2)
    );
}
