//! Analysing one chunk: which of its pages changed since the previous generation, and
//! whether it becomes a delta, a new base, or stays as it was.
//!
//! Each byte is read once where it can be:
//! - a chunk whose previous state is unknown (new, or no page digests here) is staged as a
//!   new base in one read that also hashes it and digests its pages;
//! - a chunk with page digests is scanned once; the changed pages' bytes are kept on the
//!   way, so a delta needs no second read. Only a chunk found too changed for a delta is
//!   read a second time, by the staging of its new base;
//! - with the engine's dirty pages, only those pages are read (and, for a rewrite, the
//!   chunk once by staging).
//!
//! The page digests recorded for a new base are those computed while staging it, so they
//! always describe exactly the bytes of the blob. This runs on a blocking thread and has
//! no state of its own: a crash loses nothing but the staged file's `.partial` name.

use std::path::PathBuf;
use std::sync::Arc;

use cairn_core::delta::{encode_delta, DeltaHeader};
use cairn_core::{BlobKind, ChunkState};
use cairn_executor::{page_digest, read_pages, scan_pages, JobScratch, ReadAt, StagedBlob};
use cairn_planner::{decide_chunk, ChainInfo, ChunkDecision, ChunkInput, ChunkPlan, CostModel};
use cairn_state::ChunkDigests;

use crate::CairnError;

/// Everything needed to analyse one chunk off the async runtime.
pub(super) struct ChunkCtx {
    pub plan: ChunkPlan,
    pub page_size: u32,
    pub generation: u64,
    /// The chunk's chain in the parent generation, when chunk and page sizes line up.
    pub prev: Option<ChunkState>,
    /// Page digests that describe `prev`.
    pub stored: Option<ChunkDigests>,
    /// The engine's dirty pages within the chunk, if it supplied them.
    pub dirty: Option<Vec<u32>>,
    pub model: CostModel,
    pub file: Arc<dyn ReadAt>,
    pub path: PathBuf,
    pub scratch: JobScratch,
}

/// The outcome of analysing one chunk.
pub(super) enum Analysis {
    /// Nothing changed: the previous chain stays.
    Unchanged(ChunkState),
    /// A new base, staged.
    Full {
        staged: StagedBlob,
        digests: Vec<u128>,
        dirty: u64,
    },
    /// A delta on top of the previous chain.
    Delta {
        prev: ChunkState,
        payload: Vec<u8>,
        digests: Vec<u128>,
        dirty: u64,
    },
}

/// Pages of a chunk that changed and, where already known, the chunk's new digests and
/// the changed pages' bytes.
struct Changes {
    pages: Vec<u32>,
    digests: Option<Vec<u128>>,
    bytes: Option<Vec<u8>>,
}

fn chain(prev: &ChunkState) -> ChainInfo {
    ChainInfo {
        depth: prev.deltas.len(),
        base_len: prev.base.len,
        delta_bytes: prev.deltas.iter().map(|d| d.len).sum(),
        chunk_len: prev.len,
    }
}

/// Finds the changed pages of a chunk whose previous page digests are known.
fn changes(
    ctx: &ChunkCtx,
    stored: &ChunkDigests,
    prev: &ChunkState,
) -> Result<Changes, CairnError> {
    let ps = u64::from(ctx.page_size);
    let pages_now = usize::try_from(ctx.plan.len / ps).unwrap_or(usize::MAX);
    match &ctx.dirty {
        Some(marked) => {
            // Trusted: unmarked pages are unchanged, except pages past the old end.
            let prev_pages = usize::try_from(prev.len / ps).unwrap_or(usize::MAX);
            let mut pages: Vec<u32> = marked
                .iter()
                .copied()
                .filter(|p| (*p as usize) < pages_now)
                .collect();
            pages.extend((prev_pages..pages_now).filter_map(|p| u32::try_from(p).ok()));
            pages.sort_unstable();
            pages.dedup();
            Ok(Changes {
                pages,
                digests: None,
                bytes: None,
            })
        }
        None => {
            // More changed pages than this always means a rewrite (the cost model's
            // `max_dirty_fraction`), so bytes beyond it are not kept.
            let capture = (ctx.model.max_dirty_fraction * pages_now as f64).floor() as usize;
            let scan = scan_pages(
                &ctx.file,
                &ctx.path,
                ctx.plan.offset,
                ctx.plan.len,
                ctx.page_size,
                &stored.digests,
                capture,
            )?;
            Ok(Changes {
                pages: scan.changed,
                digests: Some(scan.digests),
                bytes: scan.captured,
            })
        }
    }
}

/// Analyses one chunk (see the module documentation).
pub(super) fn analyse(ctx: ChunkCtx) -> Result<Analysis, CairnError> {
    let ps = u64::from(ctx.page_size);
    let pages_now = usize::try_from(ctx.plan.len / ps).unwrap_or(usize::MAX);
    let usable = match (&ctx.prev, &ctx.stored) {
        // A chain at its depth limit is rewritten whatever changed: skip the scan.
        (Some(prev), Some(stored)) if prev.deltas.len() < ctx.model.max_chain_depth => {
            Some((prev, stored, changes(&ctx, stored, prev)?))
        }
        _ => None,
    };
    let input = ChunkInput {
        chunk_len: ctx.plan.len,
        page_size: ctx.page_size,
        prev: usable.as_ref().map(|(prev, _, _)| chain(prev)),
        dirty_pages: usable.as_ref().map(|(_, _, c)| c.pages.len() as u64),
    };
    match (decide_chunk(&input, &ctx.model), usable) {
        (ChunkDecision::Unchanged, Some((prev, _, _))) => Ok(Analysis::Unchanged(prev.clone())),
        (ChunkDecision::Delta, Some((prev, stored, c))) => {
            let bytes = match c.bytes {
                Some(b) => b,
                None => read_pages(
                    &ctx.file,
                    &ctx.path,
                    ctx.plan.offset,
                    ctx.page_size,
                    &c.pages,
                )?,
            };
            let digests = match c.digests {
                Some(d) => d,
                None => {
                    let mut d = stored.digests.clone();
                    d.resize(pages_now, 0);
                    for (i, p) in c.pages.iter().enumerate() {
                        let page = &bytes[i * ps as usize..(i + 1) * ps as usize];
                        d[*p as usize] = page_digest(page);
                    }
                    d
                }
            };
            let header = DeltaHeader {
                page_size: ctx.page_size,
                chunk: ctx.plan.index,
                generation: ctx.generation,
                base_crc64: prev.base.crc64,
                chunk_len: ctx.plan.len,
            };
            let payload = encode_delta(&header, &c.pages, &bytes)?;
            Ok(Analysis::Delta {
                prev: prev.clone(),
                payload,
                digests,
                dirty: c.pages.len() as u64,
            })
        }
        (_, usable) => {
            let (staged, digests) = ctx.scratch.stage_range(
                BlobKind::Base,
                &ctx.file,
                &ctx.path,
                ctx.plan.offset,
                ctx.plan.len,
                Some(ctx.page_size),
            )?;
            let dirty = match (usable, &ctx.stored) {
                (Some((_, _, c)), _) if ctx.dirty.is_some() => c.pages.len() as u64,
                (_, Some(stored)) if ctx.prev.is_some() => digests
                    .iter()
                    .enumerate()
                    .filter(|(i, d)| stored.digests.get(*i) != Some(*d))
                    .count() as u64,
                _ => pages_now as u64,
            };
            Ok(Analysis::Full {
                staged,
                digests,
                dirty,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::delta::DeltaView;
    use cairn_core::{BlobRef, Digest128, JobId};
    use cairn_executor::Scratch;
    use cairn_quota::Budget;
    use std::fs::File;

    const PS: u32 = 4096;
    const PAGES: usize = 16;

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        scratch: JobScratch,
        data: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages");
        let data: Vec<u8> = (0..PAGES * PS as usize)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let scratch = Scratch::open(&dir.path().join("scratch"), Budget::root("s", 1 << 30))
            .unwrap()
            .job(JobId(1))
            .unwrap();
        Fixture {
            _dir: dir,
            path,
            scratch,
            data,
        }
    }

    fn digests(data: &[u8]) -> Vec<u128> {
        data.chunks(PS as usize).map(page_digest).collect()
    }

    fn prev_state(len: u64, depth: usize) -> ChunkState {
        let blob = |kind, c| BlobRef {
            kind,
            crc64: c,
            len,
            xxh3: Digest128(1),
            alias: 0,
            scheme: 0,
            epoch: 0,
        };
        ChunkState {
            index: 0,
            len,
            base: blob(BlobKind::Base, 77),
            deltas: (0..depth)
                .map(|i| blob(BlobKind::Delta, i as u64))
                .collect(),
        }
    }

    fn ctx(f: &Fixture, prev: Option<ChunkState>, stored: Option<Vec<u128>>) -> ChunkCtx {
        ChunkCtx {
            plan: ChunkPlan {
                index: 0,
                offset: 0,
                len: f.data.len() as u64,
            },
            page_size: PS,
            generation: 5,
            stored: stored.map(|digests| ChunkDigests {
                index: 0,
                tip: "t".into(),
                page_size: PS,
                digests,
            }),
            prev,
            dirty: None,
            model: CostModel {
                object_cost_bytes: 0,
                ..CostModel::default()
            },
            file: Arc::new(File::open(&f.path).unwrap()),
            path: f.path.clone(),
            scratch: f.scratch.clone(),
        }
    }

    fn rewrite(f: &mut Fixture, pages: &[usize]) -> Vec<u128> {
        let old = digests(&f.data);
        for p in pages {
            f.data[p * PS as usize + 3] ^= 0x5a;
        }
        std::fs::write(&f.path, &f.data).unwrap();
        old
    }

    #[test]
    fn an_unknown_chunk_is_staged_once_as_a_new_base_with_its_digests() {
        let f = fixture();
        let Analysis::Full {
            staged,
            digests: d,
            dirty,
        } = analyse(ctx(&f, Some(prev_state(f.data.len() as u64, 0)), None)).unwrap()
        else {
            panic!("not a full rewrite")
        };
        assert_eq!(dirty, PAGES as u64, "every page of an unknown chunk counts");
        assert_eq!(d, digests(&f.data));
        let obj = std::fs::read(&staged.path).unwrap();
        let (payload, _) = cairn_core::blob::decode_blob("t", &obj, Some(staged.blob)).unwrap();
        assert_eq!(payload, &f.data[..]);
    }

    #[test]
    fn unchanged_and_delta_chunks_follow_the_page_digests() {
        let mut f = fixture();
        let prev = prev_state(f.data.len() as u64, 1);
        let same = digests(&f.data);
        assert!(matches!(
            analyse(ctx(&f, Some(prev.clone()), Some(same))).unwrap(),
            Analysis::Unchanged(p) if p == prev
        ));
        let old = rewrite(&mut f, &[2, 9]);
        let Analysis::Delta {
            payload,
            digests: d,
            dirty,
            ..
        } = analyse(ctx(&f, Some(prev.clone()), Some(old))).unwrap()
        else {
            panic!("not a delta")
        };
        assert_eq!((dirty, d), (2, digests(&f.data)));
        let view = DeltaView::parse("d", &payload, 0, 77, PS).unwrap();
        let pages: Vec<(u32, Vec<u8>)> = view.iter().map(|(p, b)| (p, b.to_vec())).collect();
        assert_eq!(pages.len(), 2);
        for (p, bytes) in pages {
            let at = p as usize * PS as usize;
            assert_eq!(bytes, &f.data[at..at + PS as usize]);
        }
        assert_eq!(view.header.generation, 5);
    }

    #[test]
    fn a_chunk_too_changed_or_too_deep_is_rewritten_with_its_true_dirty_count() {
        let mut f = fixture();
        let prev = prev_state(f.data.len() as u64, 0);
        let many: Vec<usize> = (0..PAGES / 2 + 1).collect();
        let old = rewrite(&mut f, &many);
        let Analysis::Full {
            dirty, digests: d, ..
        } = analyse(ctx(&f, Some(prev), Some(old.clone()))).unwrap()
        else {
            panic!("more than half the pages changed: not a rewrite")
        };
        assert_eq!((dirty, d), (many.len() as u64, digests(&f.data)));
        let deep = prev_state(f.data.len() as u64, CostModel::default().max_chain_depth);
        let old = rewrite(&mut f, &[1]);
        let Analysis::Full { dirty, .. } = analyse(ctx(&f, Some(deep), Some(old))).unwrap() else {
            panic!("a chain at its depth limit is rewritten")
        };
        assert_eq!(dirty, 1);
    }

    #[test]
    fn the_engines_dirty_pages_are_trusted_and_only_they_are_read() {
        let mut f = fixture();
        let prev = prev_state(f.data.len() as u64, 0);
        let old = rewrite(&mut f, &[3, 4]);
        let mut c = ctx(&f, Some(prev), Some(old.clone()));
        // Page 4 changed too but is not marked: the engine's word is taken for it.
        c.dirty = Some(vec![3]);
        let Analysis::Delta {
            payload,
            digests: d,
            dirty,
            ..
        } = analyse(c).unwrap()
        else {
            panic!("not a delta")
        };
        assert_eq!(dirty, 1);
        let view = DeltaView::parse("d", &payload, 0, 77, PS).unwrap();
        assert_eq!(view.iter().map(|(p, _)| p).collect::<Vec<_>>(), vec![3]);
        let mut want = old;
        want[3] = digests(&f.data)[3];
        assert_eq!(d, want);
    }
}
