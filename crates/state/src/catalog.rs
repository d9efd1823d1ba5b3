//! The catalog: every known generation's manifest, the blobs those manifests reference
//! (for dedup, confirmed by XXH3-128) and each database's latest generation.
//!
//! Contract: the catalog holds only what is published (by this state directory or imported
//! from the store): [`StateDb::record_generation_with`] writes a generation, its blobs, the
//! database record and the publisher's local updates (page digests, its job record) in one
//! synced batch, so a crash leaves all of it or none. Nothing here retries or is
//! cancellable; each call is one RocksDB operation.

use cairn_core::{BlobRef, DbId, Generation, Manifest, TenantId};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::db::{db_key, sub_key};
use crate::digests::ChunkDigests;
use crate::error::StateError;
use crate::jobs::job_key;
use crate::StateDb;

/// What the catalog knows of one database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbRecord {
    /// Latest generation known (published by anyone).
    pub latest: Generation,
}

/// Result of a dedup lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobLookup {
    /// A blob with the same CRC64, length and XXH3-128 is already stored.
    Found(BlobRef),
    /// Not stored; use this alias so the name cannot collide with a different payload
    /// that shares the CRC64 and length.
    New {
        /// The alias to give the new blob.
        alias: u32,
    },
}

/// Local changes committed in the same batch as a published generation.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalUpdates<'a> {
    /// Page digests to write.
    pub digests: &'a [ChunkDigests],
    /// With `Some(n)`, page digests of chunks `n..` are deleted.
    pub chunks: Option<u64>,
    /// A job record (id, encoded record) to write.
    pub job: Option<(cairn_core::JobId, &'a [u8])>,
    /// The SQLite WAL position the generation's page snapshot was taken at (see
    /// [`StateDb::wal_position`]); `None` leaves the recorded one, which names an older
    /// generation and so is not used for this one's children.
    pub wal_position: Option<cairn_core::WalPosition>,
}

fn encode<T: Serialize>(key: impl FnOnce() -> String, v: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(v).map_err(|source| StateError::Encode { key: key(), source })
}

impl StateDb {
    /// What the catalog knows of a database.
    pub fn db_record(&self, tenant: &TenantId, db: &DbId) -> Result<Option<DbRecord>, StateError> {
        match self.get("dbs", &db_key(tenant, db))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StateError::Corrupt {
                    key: format!("dbs/{tenant}/{db}"),
                    reason: e.to_string(),
                }),
        }
    }

    /// Whether a generation's manifest is recorded locally.
    pub fn has_generation(
        &self,
        tenant: &TenantId,
        db: &DbId,
        g: Generation,
    ) -> Result<bool, StateError> {
        Ok(self
            .get("generations", &sub_key(tenant, db, &g.0.to_be_bytes()))?
            .is_some())
    }

    /// The manifest of a generation, if recorded locally.
    pub fn manifest(
        &self,
        tenant: &TenantId,
        db: &DbId,
        g: Generation,
    ) -> Result<Option<Manifest>, StateError> {
        match self.get("generations", &sub_key(tenant, db, &g.0.to_be_bytes()))? {
            None => Ok(None),
            Some(v) => Ok(Some(Manifest::decode(
                &format!("local generation {g} of {tenant}/{db}"),
                &v,
            )?)),
        }
    }

    /// Generations recorded locally, ascending.
    pub fn generations(&self, tenant: &TenantId, db: &DbId) -> Result<Vec<Generation>, StateError> {
        let prefix = sub_key(tenant, db, &[]);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf("generations")?,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, _) = item.map_err(self.rocks("scan generations"))?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            let bytes: [u8; 8] = rest.try_into().map_err(|_| StateError::Corrupt {
                key: format!("generations/{tenant}/{db}"),
                reason: "malformed generation key".into(),
            })?;
            out.push(Generation(u64::from_be_bytes(bytes)));
        }
        Ok(out)
    }

    /// Looks up a payload in the catalog by content address, confirmed by XXH3-128: the
    /// first stored blob of that payload that `accept` takes, or else the alias that gives
    /// `wanted` (a new reference to the payload) a name no stored blob has.
    pub fn find_blob(
        &self,
        tenant: &TenantId,
        db: &DbId,
        wanted: &BlobRef,
        accept: impl Fn(&BlobRef) -> bool,
    ) -> Result<BlobLookup, StateError> {
        let base = *wanted;
        // Every name of this content address, of either scheme, shares this prefix.
        let legacy = BlobRef { scheme: 0, ..base };
        let prefix = sub_key(tenant, db, legacy.name_base().as_bytes());
        let new_base = base.name_base();
        let mut aliases = 0u32;
        for item in self.db.iterator_cf(
            self.cf("catalog")?,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item.map_err(self.rocks("scan catalog"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            // Names are `<base name>` or `<base name>-<alias>`; skip longer lengths that
            // merely share a hex prefix.
            let rest = &k[prefix.len()..];
            if !(rest.is_empty() || rest.first() == Some(&b'-')) {
                continue;
            }
            let known: BlobRef = serde_json::from_slice(&v).map_err(|e| StateError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?;
            if known.same_payload(&base) && accept(&known) {
                return Ok(BlobLookup::Found(known));
            }
            if known.name_base() == new_base {
                aliases = aliases.max(known.alias + 1);
            }
        }
        Ok(BlobLookup::New { alias: aliases })
    }

    /// Every stored blob of the payload `wanted` references (any name, any epoch).
    pub fn same_payload(
        &self,
        tenant: &TenantId,
        db: &DbId,
        wanted: &BlobRef,
    ) -> Result<Vec<BlobRef>, StateError> {
        let legacy = BlobRef {
            scheme: 0,
            epoch: 0,
            alias: 0,
            ..*wanted
        };
        let prefix = sub_key(tenant, db, legacy.name_base().as_bytes());
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf("catalog")?,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item.map_err(self.rocks("scan catalog"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let rest = &k[prefix.len()..];
            if !(rest.is_empty() || rest.first() == Some(&b'-')) {
                continue;
            }
            let known: BlobRef = serde_json::from_slice(&v).map_err(|e| StateError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?;
            if known.same_payload(wanted) {
                out.push(known);
            }
        }
        Ok(out)
    }

    /// Removes blobs from the catalog (garbage collection deleted them), with the page
    /// digests of any chunk whose chain ended in one of them: they describe a generation
    /// that is gone.
    pub fn forget_blobs(
        &self,
        tenant: &TenantId,
        db: &DbId,
        names: &[String],
    ) -> Result<(), StateError> {
        if names.is_empty() {
            return Ok(());
        }
        let cf = self.cf("catalog")?;
        let mut b = WriteBatch::default();
        for n in names {
            b.delete_cf(cf, sub_key(tenant, db, n.as_bytes()));
        }
        let gone: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        self.forget_digests_of(&mut b, tenant, db, &gone)?;
        self.write(b)
    }

    fn put_blob(
        &self,
        b: &mut WriteBatch,
        tenant: &TenantId,
        db: &DbId,
        blob: &BlobRef,
    ) -> Result<(), StateError> {
        let v = encode(|| blob.name(), blob)?;
        b.put_cf(
            self.cf("catalog")?,
            sub_key(tenant, db, blob.name().as_bytes()),
            v,
        );
        Ok(())
    }

    /// Records a published generation in one atomic batch: its manifest, the blobs it
    /// names (all of a full manifest, the new ones of a diff) and the database's latest
    /// generation.
    pub fn record_generation(&self, m: &Manifest) -> Result<(), StateError> {
        self.record_generation_with(m, &LocalUpdates::default())
    }

    /// Like [`StateDb::record_generation`], with the writer's other local changes in the
    /// same batch (see [`LocalUpdates`]).
    pub fn record_generation_with(
        &self,
        m: &Manifest,
        local: &LocalUpdates<'_>,
    ) -> Result<(), StateError> {
        let _serial = self.serial();
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf("generations")?,
            sub_key(&m.tenant, &m.db, &m.generation.0.to_be_bytes()),
            m.encode(),
        );
        for blob in m.blobs() {
            self.put_blob(&mut b, &m.tenant, &m.db, &blob)?;
        }
        let latest = match self.db_record(&m.tenant, &m.db)? {
            Some(r) if r.latest > m.generation => r.latest,
            _ => m.generation,
        };
        let rec = DbRecord { latest };
        let rec = encode(|| format!("dbs/{}/{}", m.tenant, m.db), &rec)?;
        b.put_cf(self.cf("dbs")?, db_key(&m.tenant, &m.db), rec);
        self.put_digests(&mut b, m, local)?;
        if let Some(p) = local.wal_position {
            // An older position stays, but names an older generation: it is never used.
            self.put_wal_position(&mut b, m, p)?;
        }
        if let Some((id, record)) = local.job {
            b.put_cf(self.cf("jobs")?, job_key(id), record);
        }
        self.write(b)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cairn_core::{BlobKind, Content, DbState, Digest128, SegmentEntry, WalState};

    pub(crate) fn manifest(g: u64, blobs: &[BlobRef]) -> Manifest {
        let mut lsn = 0;
        let segments = blobs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let e = SegmentEntry {
                    name: format!("s{i:03}"),
                    lsn_start: cairn_core::Lsn(lsn),
                    lsn_end: cairn_core::Lsn(lsn + b.len),
                    len: b.len,
                    blob: *b,
                };
                lsn += b.len;
                e
            })
            .collect();
        let segments: Vec<SegmentEntry> = segments;
        let mut m = crate::fixtures::manifest(g, "w", 0);
        m.content = Content::Full(DbState {
            pages: None,
            wal: Some(WalState {
                start: cairn_core::Lsn(0),
                end: cairn_core::Lsn(lsn),
                last_name: segments.last().map(|s| s.name.clone()),
                segments,
            }),
            gc: Default::default(),
        });
        m
    }

    /// Scheme-1 blobs; XXH3 values below 2^64 share their name's XXH3 part, so payloads
    /// that differ in the low half collide on the name base and need aliases.
    fn blob(crc: u64, len: u64, x: u128, alias: u32) -> BlobRef {
        BlobRef {
            alias,
            ..BlobRef::new(BlobKind::Segment, crc, len, Digest128(x))
        }
    }

    #[test]
    fn generations_and_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDb::open(dir.path()).unwrap();
        let t = TenantId::new("t").unwrap();
        let d = DbId::new("d").unwrap();
        let w = s.writer_id(|| 42).unwrap();
        assert_eq!(w, s.writer_id(|| 7).unwrap());
        s.record_generation(&manifest(1, &[blob(5, 10, 1, 0)]))
            .unwrap();
        s.record_generation(&manifest(2, &[blob(5, 10, 1, 0), blob(6, 10, 2, 0)]))
            .unwrap();
        assert_eq!(
            s.generations(&t, &d).unwrap(),
            vec![Generation(1), Generation(2)]
        );
        assert_eq!(s.db_record(&t, &d).unwrap().unwrap().latest, Generation(2));
        assert_eq!(
            s.manifest(&t, &d, Generation(2)).unwrap().unwrap(),
            manifest(2, &[blob(5, 10, 1, 0), blob(6, 10, 2, 0)])
        );
        // Dedup: same address and digest is found; same address, other digest gets an alias.
        assert_eq!(
            s.find_blob(
                &t,
                &d,
                &BlobRef::new(BlobKind::Segment, 5, 10, Digest128(1)),
                |_| true
            )
            .unwrap(),
            BlobLookup::Found(blob(5, 10, 1, 0))
        );
        assert_eq!(
            s.find_blob(
                &t,
                &d,
                &BlobRef::new(BlobKind::Segment, 5, 10, Digest128(9)),
                |_| true
            )
            .unwrap(),
            BlobLookup::New { alias: 1 }
        );
        s.record_generation(&manifest(3, &[blob(5, 10, 9, 1)]))
            .unwrap();
        assert_eq!(
            s.find_blob(
                &t,
                &d,
                &BlobRef::new(BlobKind::Segment, 5, 10, Digest128(9)),
                |_| true
            )
            .unwrap(),
            BlobLookup::Found(blob(5, 10, 9, 1))
        );
        assert_eq!(
            s.find_blob(
                &t,
                &d,
                &BlobRef::new(BlobKind::Segment, 5, 10, Digest128(3)),
                |_| true
            )
            .unwrap(),
            BlobLookup::New { alias: 2 }
        );
        // A legacy (scheme 0) name never collides with a scheme-1 one.
        let legacy = BlobRef {
            scheme: 0,
            epoch: 0,
            ..blob(7, 10, 1, 0)
        };
        s.record_generation(&manifest(4, &[legacy])).unwrap();
        assert_eq!(
            s.find_blob(
                &t,
                &d,
                &BlobRef::new(BlobKind::Segment, 7, 10, Digest128(2)),
                |_| true
            )
            .unwrap(),
            BlobLookup::New { alias: 0 }
        );
        assert_eq!(
            s.find_blob(
                &t,
                &d,
                &BlobRef::new(BlobKind::Segment, 7, 10, Digest128(1)),
                |_| true
            )
            .unwrap(),
            BlobLookup::Found(legacy)
        );
        // A stored blob the caller does not accept (another GC epoch, say) is not reused,
        // and the new name does not collide with it.
        let e1 = BlobRef {
            epoch: 1,
            ..BlobRef::new(BlobKind::Segment, 5, 10, Digest128(1))
        };
        assert_eq!(
            s.find_blob(&t, &d, &e1, |b| b.epoch == 1).unwrap(),
            BlobLookup::New { alias: 0 }
        );
        // A length that shares a hex prefix (0x10 vs 0x100) is a different address.
        assert_eq!(
            s.find_blob(
                &t,
                &d,
                &BlobRef::new(BlobKind::Segment, 5, 16, Digest128(1)),
                |_| true
            )
            .unwrap(),
            BlobLookup::New { alias: 0 }
        );
    }
}
