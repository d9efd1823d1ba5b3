//! Page digests (and the SQLite WAL position of the same snapshot): per chunk, one XXH3-128 per page of this state directory's latest
//! published generation, so a checkpoint without the engine's dirty pages finds changed
//! pages by reading each chunk once, without downloading anything.
//!
//! Contract: records are written only in the batch that records a published generation
//! (see [`crate::LocalUpdates`]), so they never describe unpublished state; each is tagged
//! with its chain's tip, so a record that describes another chain is never used. A record
//! that fails to decode counts as absent: it costs a full read of the chunk, not an error.
//! Nothing here retries or is cancellable.

use std::collections::HashSet;

use cairn_core::{DbId, Manifest, TenantId, WalPosition};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::catalog::LocalUpdates;
use crate::db::sub_key;
use crate::error::StateError;
use crate::StateDb;

/// Per-page XXH3-128 digests of one chunk, valid for the chain whose newest blob is `tip`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkDigests {
    /// Chunk index.
    pub index: u64,
    /// Name of the newest blob of the chunk's chain (base or last delta) these digests
    /// describe; stale digests (another writer's generation, a crash) never match.
    pub tip: String,
    /// Page size the digests were taken with.
    pub page_size: u32,
    /// One digest per page of the chunk.
    pub digests: Vec<u128>,
}

impl ChunkDigests {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.tip.len() + 16 * self.digests.len());
        v.extend_from_slice(&(self.tip.len() as u32).to_le_bytes());
        v.extend_from_slice(self.tip.as_bytes());
        v.extend_from_slice(&self.page_size.to_le_bytes());
        v.extend_from_slice(&cairn_core::address::digests_to_bytes(&self.digests));
        v
    }

    fn decode(index: u64, v: &[u8]) -> Option<Self> {
        let n = u32::from_le_bytes(v.get(0..4)?.try_into().ok()?) as usize;
        let tip = std::str::from_utf8(v.get(4..4 + n)?).ok()?.to_string();
        let page_size = u32::from_le_bytes(v.get(4 + n..8 + n)?.try_into().ok()?);
        let digests = cairn_core::address::digests_from_bytes(v.get(8 + n..)?)?;
        Some(Self {
            index,
            tip,
            page_size,
            digests,
        })
    }
}

fn decode_position(v: &[u8]) -> Option<(u64, WalPosition)> {
    if v.len() != 28 {
        return None;
    }
    let g = u64::from_be_bytes(v[..8].try_into().ok()?);
    let w = |i: usize| {
        let at = 8 + 4 * i;
        v[at..at + 4].try_into().ok().map(u32::from_be_bytes)
    };
    Some((
        g,
        WalPosition {
            salts: (w(0)?, w(1)?),
            frame: w(2)?,
            checksum: (w(3)?, w(4)?),
        },
    ))
}

impl StateDb {
    /// The page digests recorded for chunk `index`, if any (undecodable records count as
    /// absent: they only cost a rescan).
    pub fn chunk_digests(
        &self,
        tenant: &TenantId,
        db: &DbId,
        index: u64,
    ) -> Result<Option<ChunkDigests>, StateError> {
        Ok(self
            .get("pagedigests", &sub_key(tenant, db, &index.to_be_bytes()))?
            .and_then(|v| ChunkDigests::decode(index, &v)))
    }

    /// The SQLite WAL position recorded with this state directory's latest published page
    /// generation of the database, with that generation's number. A record that fails to
    /// decode counts as absent (it costs a full page-digest scan, not an error).
    pub fn wal_position(
        &self,
        tenant: &TenantId,
        db: &DbId,
    ) -> Result<Option<(u64, WalPosition)>, StateError> {
        Ok(self
            .get("walpositions", &crate::db::db_key(tenant, db))?
            .and_then(|v| decode_position(&v)))
    }

    /// Adds to `b` the WAL position of `m`'s page snapshot.
    pub(crate) fn put_wal_position(
        &self,
        b: &mut WriteBatch,
        m: &Manifest,
        p: WalPosition,
    ) -> Result<(), StateError> {
        let mut v = m.generation.0.to_be_bytes().to_vec();
        for w in [p.salts.0, p.salts.1, p.frame, p.checksum.0, p.checksum.1] {
            v.extend_from_slice(&w.to_be_bytes());
        }
        b.put_cf(
            self.cf("walpositions")?,
            crate::db::db_key(&m.tenant, &m.db),
            v,
        );
        Ok(())
    }

    /// Adds to `b` the deletion of every chunk's digests whose tip is in `gone`.
    pub(crate) fn forget_digests_of(
        &self,
        b: &mut WriteBatch,
        tenant: &TenantId,
        db: &DbId,
        gone: &HashSet<&str>,
    ) -> Result<(), StateError> {
        let pd = self.cf("pagedigests")?;
        let prefix = sub_key(tenant, db, &[]);
        for item in self
            .db
            .iterator_cf(pd, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(self.rocks("scan page digests"))?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            let Ok(index) = <[u8; 8]>::try_from(rest).map(u64::from_be_bytes) else {
                continue;
            };
            // An undecodable record is useless anyway.
            match ChunkDigests::decode(index, &v) {
                Some(d) if !gone.contains(d.tip.as_str()) => {}
                _ => b.delete_cf(pd, &k),
            }
        }
        Ok(())
    }

    /// Adds the digest writes and truncation of `local` to a generation's batch.
    pub(crate) fn put_digests(
        &self,
        b: &mut WriteBatch,
        m: &Manifest,
        local: &LocalUpdates<'_>,
    ) -> Result<(), StateError> {
        let pd = self.cf("pagedigests")?;
        for d in local.digests {
            b.put_cf(
                pd,
                sub_key(&m.tenant, &m.db, &d.index.to_be_bytes()),
                d.encode(),
            );
        }
        if let Some(n) = local.chunks {
            b.delete_range_cf(
                pd,
                sub_key(&m.tenant, &m.db, &n.to_be_bytes()),
                sub_key(&m.tenant, &m.db, &u64::MAX.to_be_bytes()),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::manifest;
    use cairn_core::JobId;

    #[test]
    fn page_digests_are_replaced_and_truncated_with_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDb::open(dir.path()).unwrap();
        let t = TenantId::new("t").unwrap();
        let d = DbId::new("d").unwrap();
        let cd = |i: u64, tip: &str| ChunkDigests {
            index: i,
            tip: tip.into(),
            page_size: 4096,
            digests: vec![i.into(), 7],
        };
        let pos = WalPosition {
            salts: (1, u32::MAX),
            frame: 77,
            checksum: (3, 4),
        };
        s.record_generation_with(
            &manifest(1, &[]),
            &LocalUpdates {
                digests: &[cd(0, "a"), cd(1, "b"), cd(2, "c")],
                chunks: Some(3),
                job: Some((JobId(9), b"done")),
                wal_position: Some(pos),
            },
        )
        .unwrap();
        assert_eq!(s.chunk_digests(&t, &d, 1).unwrap(), Some(cd(1, "b")));
        assert_eq!(s.wal_position(&t, &d).unwrap(), Some((1, pos)));
        s.record_generation_with(
            &manifest(2, &[]),
            &LocalUpdates {
                digests: &[cd(0, "z")],
                chunks: Some(1),
                job: None,
                wal_position: None,
            },
        )
        .unwrap();
        assert_eq!(s.chunk_digests(&t, &d, 0).unwrap(), Some(cd(0, "z")));
        assert_eq!(s.chunk_digests(&t, &d, 1).unwrap(), None);
        assert_eq!(s.chunk_digests(&t, &d, 2).unwrap(), None);
        assert_eq!(s.job(JobId(9)).unwrap().as_deref(), Some(&b"done"[..]));
    }

    #[test]
    fn digests_of_a_collected_chain_are_forgotten_with_its_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDb::open(dir.path()).unwrap();
        let t = TenantId::new("t").unwrap();
        let d = DbId::new("d").unwrap();
        let cd = |i: u64, tip: &str| ChunkDigests {
            index: i,
            tip: tip.into(),
            page_size: 4096,
            digests: vec![1],
        };
        s.record_generation_with(
            &manifest(1, &[]),
            &LocalUpdates {
                digests: &[cd(0, "a"), cd(1, "b"), cd(2, "c")],
                chunks: Some(3),
                job: None,
                wal_position: None,
            },
        )
        .unwrap();
        s.forget_blobs(&t, &d, &["b".to_string(), "x".to_string()])
            .unwrap();
        assert_eq!(s.chunk_digests(&t, &d, 0).unwrap(), Some(cd(0, "a")));
        assert_eq!(s.chunk_digests(&t, &d, 1).unwrap(), None);
        assert_eq!(s.chunk_digests(&t, &d, 2).unwrap(), Some(cd(2, "c")));
    }
}
