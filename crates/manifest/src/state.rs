//! The local state database (RocksDB).
//!
//! Column families and keys (`\0` separates tenant and database names, which never
//! contain it; numbers are big-endian so keys sort numerically):
//!
//! | family | key | value |
//! |---|---|---|
//! | `meta` | `writer_id`, `changelog_seq` | writer identity, last change-log number |
//! | `dbs` | tenant `\0` db | [`DbRecord`] (JSON) |
//! | `generations` | tenant `\0` db `\0` generation | encoded manifest |
//! | `catalog` | tenant `\0` db `\0` blob name | [`cairn_core::BlobRef`] (JSON) |
//! | `changelog` | sequence number | change event (JSON) |
//! | `pagedigests` | tenant `\0` db `\0` chunk index | [`ChunkDigests`] of this writer's latest generation |
//! | `jobs`, `leases`, `pins` | reserved for the job queue, leases and pins |

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cairn_core::{BlobKind, BlobRef, DbId, Digest128, Generation, Manifest, SourceKind, TenantId};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::error::ManifestError;

const CFS: &[&str] = &[
    "meta",
    "dbs",
    "generations",
    "catalog",
    "changelog",
    "pagedigests",
    "jobs",
    "leases",
    "pins",
];

/// Per-page XXH3-128 digests of one chunk, valid for the chain whose newest blob is `tip`.
/// They let a checkpoint without the engine's dirty marks find changed pages by reading the
/// chunk once, without downloading anything.
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

/// Local changes committed in the same batch as a published generation.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalUpdates<'a> {
    /// Page digests to write.
    pub digests: &'a [ChunkDigests],
    /// With `Some(n)`, page digests of chunks `n..` are deleted.
    pub chunks: Option<u64>,
    /// A job record (id, encoded record) to write.
    pub job: Option<(u64, &'a [u8])>,
}

/// One job item: its key (after the job's prefix) and value.
pub type JobItem = (Vec<u8>, Vec<u8>);

fn job_key(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'r');
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn job_item_prefix(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'i');
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// What the catalog knows of one database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbRecord {
    /// Source kind of the database.
    pub kind: SourceKind,
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

#[derive(Serialize, Deserialize)]
struct ChangeEvent<'a> {
    event: &'a str,
    tenant: &'a str,
    db: &'a str,
    generation: u64,
}

/// The local state database.
pub struct StateDb {
    db: DB,
    path: PathBuf,
    seq_lock: Mutex<()>,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").field("path", &self.path).finish()
    }
}

fn db_key(tenant: &TenantId, db: &DbId) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.as_str().len() + db.as_str().len() + 1);
    k.extend_from_slice(tenant.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(db.as_str().as_bytes());
    k
}

fn sub_key(tenant: &TenantId, db: &DbId, rest: &[u8]) -> Vec<u8> {
    let mut k = db_key(tenant, db);
    k.push(0);
    k.extend_from_slice(rest);
    k
}

impl StateDb {
    /// Opens (creating) the state database in `<state_dir>/db`.
    pub fn open(state_dir: &Path) -> Result<Self, ManifestError> {
        let path = state_dir.join("db");
        std::fs::create_dir_all(&path).map_err(|e| ManifestError::Corrupt {
            key: path.display().to_string(),
            reason: format!("cannot create state directory: {e}"),
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("lock") || msg.contains("Resource temporarily unavailable") {
                ManifestError::Locked {
                    path: state_dir.display().to_string(),
                }
            } else {
                ManifestError::Rocks {
                    op: "open",
                    path: path.display().to_string(),
                    source: e,
                }
            }
        })?;
        Ok(Self {
            db,
            path,
            seq_lock: Mutex::new(()),
        })
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily, ManifestError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| ManifestError::Corrupt {
                key: name.to_string(),
                reason: "column family missing".into(),
            })
    }

    fn rocks(&self, op: &'static str) -> impl FnOnce(rocksdb::Error) -> ManifestError + '_ {
        move |source| ManifestError::Rocks {
            op,
            path: self.path.display().to_string(),
            source,
        }
    }

    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, ManifestError> {
        self.db
            .get_cf(self.cf(cf)?, key)
            .map_err(self.rocks("read"))
    }

    fn write(&self, batch: WriteBatch) -> Result<(), ManifestError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(self.rocks("write batch"))
    }

    /// This state directory's writer identity, created from `fresh` on first use.
    pub fn writer_id(&self, fresh: impl FnOnce() -> u64) -> Result<String, ManifestError> {
        if let Some(v) = self.get("meta", b"writer_id")? {
            return String::from_utf8(v).map_err(|_| ManifestError::Corrupt {
                key: "meta/writer_id".into(),
                reason: "not UTF-8".into(),
            });
        }
        let id = format!("{:016x}", fresh());
        let mut b = WriteBatch::default();
        b.put_cf(self.cf("meta")?, b"writer_id", id.as_bytes());
        self.write(b)?;
        Ok(id)
    }

    /// What the catalog knows of a database.
    pub fn db_record(
        &self,
        tenant: &TenantId,
        db: &DbId,
    ) -> Result<Option<DbRecord>, ManifestError> {
        match self.get("dbs", &db_key(tenant, db))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| ManifestError::Corrupt {
                    key: format!("dbs/{tenant}/{db}"),
                    reason: e.to_string(),
                }),
        }
    }

    /// Databases of a tenant known locally.
    pub fn databases(&self, tenant: &TenantId) -> Result<Vec<DbId>, ManifestError> {
        let mut prefix = tenant.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf("dbs")?,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, _) = item.map_err(self.rocks("scan databases"))?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            if let Ok(name) = std::str::from_utf8(rest) {
                if let Ok(id) = DbId::new(name) {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    /// Whether a generation's manifest is recorded locally.
    pub fn has_generation(
        &self,
        tenant: &TenantId,
        db: &DbId,
        g: Generation,
    ) -> Result<bool, ManifestError> {
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
    ) -> Result<Option<Manifest>, ManifestError> {
        match self.get("generations", &sub_key(tenant, db, &g.0.to_be_bytes()))? {
            None => Ok(None),
            Some(v) => Ok(Some(Manifest::decode(
                &format!("local generation {g} of {tenant}/{db}"),
                &v,
            )?)),
        }
    }

    /// Generations recorded locally, ascending.
    pub fn generations(
        &self,
        tenant: &TenantId,
        db: &DbId,
    ) -> Result<Vec<Generation>, ManifestError> {
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
            let bytes: [u8; 8] = rest.try_into().map_err(|_| ManifestError::Corrupt {
                key: format!("generations/{tenant}/{db}"),
                reason: "malformed generation key".into(),
            })?;
            out.push(Generation(u64::from_be_bytes(bytes)));
        }
        Ok(out)
    }

    /// Looks up a payload in the catalog by content address, confirmed by XXH3-128.
    pub fn find_blob(
        &self,
        tenant: &TenantId,
        db: &DbId,
        kind: BlobKind,
        crc64: u64,
        len: u64,
        xxh3: Digest128,
    ) -> Result<BlobLookup, ManifestError> {
        let base = BlobRef {
            kind,
            crc64,
            len,
            xxh3,
            alias: 0,
        };
        let prefix = sub_key(tenant, db, base.name().as_bytes());
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
            let known: BlobRef =
                serde_json::from_slice(&v).map_err(|e| ManifestError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: e.to_string(),
                })?;
            if known.same_payload(&base) {
                return Ok(BlobLookup::Found(known));
            }
            aliases = aliases.max(known.alias + 1);
        }
        Ok(BlobLookup::New { alias: aliases })
    }

    /// Records a blob in the catalog (used before a generation references it, e.g. when a
    /// blob is known to be uploaded).
    pub fn record_blob(
        &self,
        tenant: &TenantId,
        db: &DbId,
        blob: &BlobRef,
    ) -> Result<(), ManifestError> {
        let mut b = WriteBatch::default();
        self.put_blob(&mut b, tenant, db, blob)?;
        self.write(b)
    }

    fn put_blob(
        &self,
        b: &mut WriteBatch,
        tenant: &TenantId,
        db: &DbId,
        blob: &BlobRef,
    ) -> Result<(), ManifestError> {
        let v = serde_json::to_vec(blob).map_err(|e| ManifestError::Corrupt {
            key: blob.name(),
            reason: e.to_string(),
        })?;
        b.put_cf(
            self.cf("catalog")?,
            sub_key(tenant, db, blob.name().as_bytes()),
            v,
        );
        Ok(())
    }

    /// The page digests recorded for chunk `index`, if any (undecodable records count as
    /// absent: they only cost a rescan).
    pub fn chunk_digests(
        &self,
        tenant: &TenantId,
        db: &DbId,
        index: u64,
    ) -> Result<Option<ChunkDigests>, ManifestError> {
        Ok(self
            .get("pagedigests", &sub_key(tenant, db, &index.to_be_bytes()))?
            .and_then(|v| ChunkDigests::decode(index, &v)))
    }

    /// Records a published generation in one atomic batch: its manifest, the blobs it
    /// references, the database's latest generation and a change-log event.
    pub fn record_generation(&self, m: &Manifest) -> Result<(), ManifestError> {
        self.record_generation_with(m, &LocalUpdates::default())
    }

    /// Like [`StateDb::record_generation`], with the writer's other local changes in the
    /// same batch (see [`LocalUpdates`]).
    pub fn record_generation_with(
        &self,
        m: &Manifest,
        local: &LocalUpdates<'_>,
    ) -> Result<(), ManifestError> {
        let _seq = self.seq_lock.lock().map_err(|_| ManifestError::Corrupt {
            key: "meta/changelog_seq".into(),
            reason: "lock poisoned".into(),
        })?;
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
        let rec = DbRecord {
            kind: m.kind(),
            latest,
        };
        let rec = serde_json::to_vec(&rec).map_err(|e| ManifestError::Corrupt {
            key: format!("dbs/{}/{}", m.tenant, m.db),
            reason: e.to_string(),
        })?;
        b.put_cf(self.cf("dbs")?, db_key(&m.tenant, &m.db), rec);
        let seq = match self.get("meta", b"changelog_seq")? {
            Some(v) => v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0) + 1,
            None => 1,
        };
        b.put_cf(self.cf("meta")?, b"changelog_seq", seq.to_be_bytes());
        let ev = ChangeEvent {
            event: "generation_published",
            tenant: m.tenant.as_str(),
            db: m.db.as_str(),
            generation: m.generation.0,
        };
        let ev = serde_json::to_vec(&ev).map_err(|e| ManifestError::Corrupt {
            key: "changelog".into(),
            reason: e.to_string(),
        })?;
        b.put_cf(self.cf("changelog")?, seq.to_be_bytes(), ev);
        let pd = self.cf("pagedigests")?;
        for d in local.digests {
            b.put_cf(
                pd,
                sub_key(&m.tenant, &m.db, &d.index.to_be_bytes()),
                d.encode(),
            );
        }
        if let Some((id, record)) = local.job {
            b.put_cf(self.cf("jobs")?, job_key(id), record);
        }
        if let Some(n) = local.chunks {
            b.delete_range_cf(
                pd,
                sub_key(&m.tenant, &m.db, &n.to_be_bytes()),
                sub_key(&m.tenant, &m.db, &u64::MAX.to_be_bytes()),
            );
        }
        self.write(b)
    }

    /// Writes a job record and job items in one synced batch; `None` values delete items.
    pub fn put_job(
        &self,
        id: u64,
        record: &[u8],
        items: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(), ManifestError> {
        let cf = self.cf("jobs")?;
        let mut b = WriteBatch::default();
        b.put_cf(cf, job_key(id), record);
        for (k, v) in items {
            let mut key = job_item_prefix(id);
            key.extend_from_slice(k);
            match v {
                Some(v) => b.put_cf(cf, key, v),
                None => b.delete_cf(cf, key),
            }
        }
        self.write(b)
    }

    /// The next value of a named counter (1, 2, 3 …), durable across restarts.
    pub fn next_counter(&self, name: &str) -> Result<u64, ManifestError> {
        let _guard = self.seq_lock.lock().map_err(|_| ManifestError::Corrupt {
            key: format!("meta/{name}"),
            reason: "lock poisoned".into(),
        })?;
        let key = format!("counter/{name}");
        let next = match self.get("meta", key.as_bytes())? {
            Some(v) => v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0) + 1,
            None => 1,
        };
        let mut b = WriteBatch::default();
        b.put_cf(self.cf("meta")?, key.as_bytes(), next.to_be_bytes());
        self.write(b)?;
        Ok(next)
    }

    /// A job record.
    pub fn job(&self, id: u64) -> Result<Option<Vec<u8>>, ManifestError> {
        self.get("jobs", &job_key(id))
    }

    /// Every job record, by id.
    pub fn jobs(&self) -> Result<Vec<(u64, Vec<u8>)>, ManifestError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf("jobs")?,
            IteratorMode::From(b"r", Direction::Forward),
        ) {
            let (k, v) = item.map_err(self.rocks("scan jobs"))?;
            if k.first() != Some(&b'r') {
                break;
            }
            let id = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            if let Some(id) = id {
                out.push((id, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// A job's items (key after the job prefix, value), in key order.
    pub fn job_items(&self, id: u64) -> Result<Vec<JobItem>, ManifestError> {
        let prefix = job_item_prefix(id);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf("jobs")?,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item.map_err(self.rocks("scan job items"))?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push((rest.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Deletes a job's items, and with `record` its record too, in one batch.
    pub fn delete_job(&self, id: u64, record: bool) -> Result<(), ManifestError> {
        let cf = self.cf("jobs")?;
        let mut b = WriteBatch::default();
        let prefix = job_item_prefix(id);
        let mut end = job_item_prefix(id + 1);
        if id == u64::MAX {
            end = vec![b'j'];
        }
        b.delete_range_cf(cf, prefix, end);
        if record {
            b.delete_cf(cf, job_key(id));
        }
        self.write(b)
    }

    /// Change-log events after `after` (sequence number, JSON), oldest first.
    pub fn changes_since(&self, after: u64) -> Result<Vec<(u64, String)>, ManifestError> {
        let start = (after + 1).to_be_bytes();
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf("changelog")?,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = item.map_err(self.rocks("scan change log"))?;
            let seq = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            out.push((seq, String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::{ManifestBody, SegmentEntry, SegmentsState};

    fn manifest(g: u64, blobs: &[BlobRef]) -> Manifest {
        let mut lsn = 0;
        let segments = blobs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let e = SegmentEntry {
                    name: format!("s{i:03}"),
                    lsn_start: cairn_core::Lsn(lsn),
                    len: b.len,
                    blob: *b,
                };
                lsn += b.len;
                e
            })
            .collect();
        Manifest {
            format: 1,
            tenant: TenantId::new("t").unwrap(),
            db: DbId::new("d").unwrap(),
            generation: Generation(g),
            parent: (g > 1).then(|| Generation(g - 1)),
            writer: "w".into(),
            created_unix_ms: 0,
            job: None,
            body: ManifestBody::Segments(SegmentsState {
                segments,
                lsn_end: cairn_core::Lsn(lsn),
            }),
        }
    }

    fn blob(crc: u64, len: u64, x: u128, alias: u32) -> BlobRef {
        BlobRef {
            kind: BlobKind::Segment,
            crc64: crc,
            len,
            xxh3: Digest128(x),
            alias,
        }
    }

    #[test]
    fn generations_catalog_and_changelog() {
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
        assert_eq!(s.databases(&t).unwrap(), vec![d.clone()]);
        assert_eq!(s.changes_since(0).unwrap().len(), 2);
        assert_eq!(s.changes_since(1).unwrap()[0].0, 2);
        // Dedup: same address and digest is found; same address, other digest gets an alias.
        assert_eq!(
            s.find_blob(&t, &d, BlobKind::Segment, 5, 10, Digest128(1))
                .unwrap(),
            BlobLookup::Found(blob(5, 10, 1, 0))
        );
        assert_eq!(
            s.find_blob(&t, &d, BlobKind::Segment, 5, 10, Digest128(9))
                .unwrap(),
            BlobLookup::New { alias: 1 }
        );
        s.record_blob(&t, &d, &blob(5, 10, 9, 1)).unwrap();
        assert_eq!(
            s.find_blob(&t, &d, BlobKind::Segment, 5, 10, Digest128(9))
                .unwrap(),
            BlobLookup::Found(blob(5, 10, 9, 1))
        );
        assert_eq!(
            s.find_blob(&t, &d, BlobKind::Segment, 5, 10, Digest128(3))
                .unwrap(),
            BlobLookup::New { alias: 2 }
        );
        // A length that shares a hex prefix (0x10 vs 0x100) is a different address.
        assert_eq!(
            s.find_blob(&t, &d, BlobKind::Segment, 5, 16, Digest128(1))
                .unwrap(),
            BlobLookup::New { alias: 0 }
        );
    }

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
        s.record_generation_with(
            &manifest(1, &[]),
            &LocalUpdates {
                digests: &[cd(0, "a"), cd(1, "b"), cd(2, "c")],
                chunks: Some(3),
                job: Some((9, b"done")),
            },
        )
        .unwrap();
        assert_eq!(s.chunk_digests(&t, &d, 1).unwrap(), Some(cd(1, "b")));
        s.record_generation_with(
            &manifest(2, &[]),
            &LocalUpdates {
                digests: &[cd(0, "z")],
                chunks: Some(1),
                job: None,
            },
        )
        .unwrap();
        assert_eq!(s.chunk_digests(&t, &d, 0).unwrap(), Some(cd(0, "z")));
        assert_eq!(s.chunk_digests(&t, &d, 1).unwrap(), None);
        assert_eq!(s.chunk_digests(&t, &d, 2).unwrap(), None);
        assert_eq!(s.job(9).unwrap().as_deref(), Some(&b"done"[..]));
    }

    #[test]
    fn job_records_and_items() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDb::open(dir.path()).unwrap();
        s.put_job(1, b"one", &[(b"plan", Some(b"p")), (b"c1", Some(b"x"))])
            .unwrap();
        s.put_job(2, b"two", &[(b"plan", Some(b"q"))]).unwrap();
        s.put_job(1, b"one'", &[(b"c1", None), (b"c2", Some(b"y"))])
            .unwrap();
        assert_eq!(
            s.jobs().unwrap(),
            vec![(1, b"one'".to_vec()), (2, b"two".to_vec())]
        );
        assert_eq!(
            s.job_items(1).unwrap(),
            vec![
                (b"c2".to_vec(), b"y".to_vec()),
                (b"plan".to_vec(), b"p".to_vec())
            ]
        );
        s.delete_job(1, false).unwrap();
        assert!(s.job_items(1).unwrap().is_empty());
        assert_eq!(s.job_items(2).unwrap().len(), 1);
        s.delete_job(2, true).unwrap();
        assert_eq!(s.jobs().unwrap(), vec![(1, b"one'".to_vec())]);
    }

    #[test]
    fn second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _a = StateDb::open(dir.path()).unwrap();
        let err = StateDb::open(dir.path()).unwrap_err();
        assert!(matches!(err, ManifestError::Locked { .. }), "{err}");
    }
}
