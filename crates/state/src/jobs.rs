//! Storage of the durable job queue: the whole key layout of the `jobs` column family.
//!
//! ```text
//! r <job id u64 BE>                    the job record (encoded by the orchestrator)
//! i <job id u64 BE> <item key>         the job's items, see [`ItemKey`]
//! ```
//!
//! Contract: a record and the items that go with a step are written in one synced batch
//! ([`StateDb::put_job`]), so after a crash a job's items always match its record's step.
//! Per-unit progress (a chunk or segment done) may be written relaxed
//! ([`StateDb::put_job_relaxed`]): one batch still, kept by a killed process, possibly
//! dropped by a power loss, which then only redoes those units.
//! Values are opaque here; their types belong to the orchestrator's job queue. Nothing
//! here retries or is cancellable: each call is one RocksDB operation.

use cairn_core::JobId;
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::error::StateError;
use crate::StateDb;

/// What a job item is, and for which chunk or segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ItemKey {
    /// A checkpoint's persisted plan (`plan`).
    Plan,
    /// The engine's dirty pages of a checkpoint, stored once at enqueue (`dirty`).
    Dirty,
    /// The engine's LSN ranges of a segment checkpoint's files, stored once (`ranges`).
    Ranges,
    /// A garbage collection's plan (`gcplan`).
    GcPlan,
    /// A checkpoint's finished chunk (`c` + index).
    Chunk(u64),
    /// That chunk's new page digests (`d` + index).
    ChunkDigests(u64),
    /// A checkpoint's finished new segment (`s` + position in the plan).
    Segment(u64),
    /// A restore's "written and synced" marker of a chunk (`r` + chunk index).
    Restored(u64),
    /// A restore's "written and synced" marker of a segment (`w` + its position).
    RestoredSegment(u64),
}

impl ItemKey {
    fn encode(self) -> Vec<u8> {
        let tagged = |tag: u8, i: u64| {
            let mut k = vec![tag];
            k.extend_from_slice(&i.to_be_bytes());
            k
        };
        match self {
            ItemKey::Plan => b"plan".to_vec(),
            ItemKey::Dirty => b"dirty".to_vec(),
            ItemKey::Ranges => b"ranges".to_vec(),
            ItemKey::GcPlan => b"gcplan".to_vec(),
            ItemKey::Chunk(i) => tagged(b'c', i),
            ItemKey::ChunkDigests(i) => tagged(b'd', i),
            ItemKey::Segment(i) => tagged(b's', i),
            ItemKey::Restored(i) => tagged(b'r', i),
            ItemKey::RestoredSegment(i) => tagged(b'w', i),
        }
    }

    fn decode(k: &[u8]) -> Option<Self> {
        match k {
            b"plan" => return Some(ItemKey::Plan),
            b"dirty" => return Some(ItemKey::Dirty),
            b"ranges" => return Some(ItemKey::Ranges),
            b"gcplan" => return Some(ItemKey::GcPlan),
            _ => {}
        }
        let (tag, rest) = k.split_first()?;
        let i = u64::from_be_bytes(<[u8; 8]>::try_from(rest).ok()?);
        match tag {
            b'c' => Some(ItemKey::Chunk(i)),
            b'd' => Some(ItemKey::ChunkDigests(i)),
            b's' => Some(ItemKey::Segment(i)),
            b'r' => Some(ItemKey::Restored(i)),
            b'w' => Some(ItemKey::RestoredSegment(i)),
            _ => None,
        }
    }
}

/// The key of a job's record.
pub(crate) fn job_key(id: JobId) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'r');
    k.extend_from_slice(&id.0.to_be_bytes());
    k
}

fn item_prefix(id: JobId) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'i');
    k.extend_from_slice(&id.0.to_be_bytes());
    k
}

/// One item write: `None` deletes the item.
pub type ItemWrite<'a> = (ItemKey, Option<&'a [u8]>);

impl StateDb {
    /// Writes a job record and item changes in one synced batch.
    pub fn put_job(
        &self,
        id: JobId,
        record: &[u8],
        items: &[ItemWrite<'_>],
    ) -> Result<(), StateError> {
        self.write(self.job_batch(id, record, items)?)
    }

    /// [`StateDb::put_job`] without the fsync, for progress whose loss in a power failure
    /// only means redoing that work (see [`StateDb`]'s relaxed writes): a killed process
    /// keeps it.
    pub fn put_job_relaxed(
        &self,
        id: JobId,
        record: &[u8],
        items: &[ItemWrite<'_>],
    ) -> Result<(), StateError> {
        self.write_relaxed(self.job_batch(id, record, items)?)
    }

    fn job_batch(
        &self,
        id: JobId,
        record: &[u8],
        items: &[ItemWrite<'_>],
    ) -> Result<WriteBatch, StateError> {
        let cf = self.cf("jobs")?;
        let mut b = WriteBatch::default();
        b.put_cf(cf, job_key(id), record);
        for (k, v) in items {
            let mut key = item_prefix(id);
            key.extend_from_slice(&k.encode());
            match v {
                Some(v) => b.put_cf(cf, key, v),
                None => b.delete_cf(cf, key),
            }
        }
        Ok(b)
    }

    /// A job record.
    pub fn job(&self, id: JobId) -> Result<Option<Vec<u8>>, StateError> {
        self.get("jobs", &job_key(id))
    }

    /// Every job record, by id.
    pub fn jobs(&self) -> Result<Vec<(JobId, Vec<u8>)>, StateError> {
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
                out.push((JobId(id), v.to_vec()));
            }
        }
        Ok(out)
    }

    /// A job's items, in key order. An item key this build does not know is an error
    /// naming the job: its record cannot be trusted to be resumed.
    pub fn job_items(&self, id: JobId) -> Result<Vec<(ItemKey, Vec<u8>)>, StateError> {
        let prefix = item_prefix(id);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf("jobs")?,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item.map_err(self.rocks("scan job items"))?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            let key = ItemKey::decode(rest).ok_or_else(|| StateError::Corrupt {
                key: format!("jobs/{id}/{}", String::from_utf8_lossy(rest)),
                reason: "unknown job item".into(),
            })?;
            out.push((key, v.to_vec()));
        }
        Ok(out)
    }

    /// Deletes a job's items, and with `record` its record too, in one batch.
    pub fn delete_job(&self, id: JobId, record: bool) -> Result<(), StateError> {
        let cf = self.cf("jobs")?;
        let mut b = WriteBatch::default();
        let end = match id.0.checked_add(1) {
            Some(next) => item_prefix(JobId(next)),
            None => vec![b'j'],
        };
        b.delete_range_cf(cf, item_prefix(id), end);
        if record {
            b.delete_cf(cf, job_key(id));
        }
        self.write(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_keys_roundtrip_in_the_documented_layout() {
        for k in [
            ItemKey::Plan,
            ItemKey::Dirty,
            ItemKey::Chunk(7),
            ItemKey::ChunkDigests(u64::MAX),
            ItemKey::Segment(0),
            ItemKey::Restored(3),
            ItemKey::Ranges,
            ItemKey::GcPlan,
            ItemKey::RestoredSegment(9),
        ] {
            assert_eq!(ItemKey::decode(&k.encode()), Some(k));
        }
        assert_eq!(ItemKey::Chunk(1).encode(), b"c\0\0\0\0\0\0\0\x01".to_vec());
        assert_eq!(ItemKey::decode(b"x\0\0\0\0\0\0\0\x01"), None);
        assert_eq!(ItemKey::decode(b"c\x01"), None);
    }

    #[test]
    fn job_records_and_items() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDb::open(dir.path()).unwrap();
        let (one, two) = (JobId(1), JobId(2));
        s.put_job(
            one,
            b"one",
            &[(ItemKey::Plan, Some(b"p")), (ItemKey::Chunk(1), Some(b"x"))],
        )
        .unwrap();
        s.put_job(two, b"two", &[(ItemKey::Plan, Some(b"q"))])
            .unwrap();
        s.put_job(
            one,
            b"one'",
            &[(ItemKey::Chunk(1), None), (ItemKey::Chunk(2), Some(b"y"))],
        )
        .unwrap();
        assert_eq!(
            s.jobs().unwrap(),
            vec![(one, b"one'".to_vec()), (two, b"two".to_vec())]
        );
        assert_eq!(
            s.job_items(one).unwrap(),
            vec![
                (ItemKey::Chunk(2), b"y".to_vec()),
                (ItemKey::Plan, b"p".to_vec())
            ]
        );
        s.delete_job(one, false).unwrap();
        assert!(s.job_items(one).unwrap().is_empty());
        assert_eq!(s.job_items(two).unwrap().len(), 1);
        s.delete_job(two, true).unwrap();
        assert_eq!(s.jobs().unwrap(), vec![(one, b"one'".to_vec())]);
        s.delete_job(JobId(u64::MAX), true).unwrap();
    }
}
