//! Leases on ranges of a database's WAL, durable in the state directory.
//!
//! Contract: a lease says "keep `[start, end)` of this database's local WAL": the
//! truncation watermark never passes the start of a lease in force, and a head truncation
//! that overlaps one waits for it (or cancels the job holding it). A lease is in force
//! until it is released or its expiry, read from the caller's (injected) clock, passes; an
//! expired lease is simply ignored, and removed by the next write to the database's
//! leases. Each change is one synced batch, so leases survive restarts. Nothing here
//! retries or is cancellable.

use cairn_core::{DbId, JobId, Lsn, TenantId};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::db::sub_key;
use crate::error::StateError;
use crate::StateDb;

/// A lease on `[start, end)` of a database's WAL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Identity (random, printed as 16 hex digits).
    pub id: u64,
    /// First LSN covered.
    pub start: Lsn,
    /// One past the last LSN covered.
    pub end: Lsn,
    /// When it lapses, milliseconds since the Unix epoch.
    pub expires_unix_ms: u64,
    /// The job holding it, if a job does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<JobId>,
}

impl Lease {
    /// Whether the lease is in force at `now_ms`.
    pub fn active(&self, now_ms: u64) -> bool {
        self.expires_unix_ms > now_ms
    }
}

impl StateDb {
    /// Every lease of a database, expired ones included, by id.
    pub fn leases(&self, tenant: &TenantId, db: &DbId) -> Result<Vec<Lease>, StateError> {
        let prefix = sub_key(tenant, db, &[]);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf("leases")?,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item.map_err(self.rocks("scan leases"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(|e| StateError::Corrupt {
                key: format!("leases/{tenant}/{db}"),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Writes (creates or renews) a lease, dropping the database's leases that expired
    /// before `now_ms`, in one batch.
    pub fn put_lease(
        &self,
        tenant: &TenantId,
        db: &DbId,
        lease: &Lease,
        now_ms: u64,
    ) -> Result<(), StateError> {
        let cf = self.cf("leases")?;
        let mut b = WriteBatch::default();
        for old in self
            .leases(tenant, db)?
            .iter()
            .filter(|l| !l.active(now_ms))
        {
            b.delete_cf(cf, sub_key(tenant, db, &old.id.to_be_bytes()));
        }
        let v = serde_json::to_vec(lease).map_err(|source| StateError::Encode {
            key: format!("leases/{tenant}/{db}/{:016x}", lease.id),
            source,
        })?;
        b.put_cf(cf, sub_key(tenant, db, &lease.id.to_be_bytes()), v);
        self.write(b)
    }

    /// Removes a lease; returns whether it existed.
    pub fn delete_lease(&self, tenant: &TenantId, db: &DbId, id: u64) -> Result<bool, StateError> {
        let key = sub_key(tenant, db, &id.to_be_bytes());
        let cf = self.cf("leases")?;
        if self
            .db
            .get_cf(cf, &key)
            .map_err(self.rocks("read lease"))?
            .is_none()
        {
            return Ok(false);
        }
        let mut b = WriteBatch::default();
        b.delete_cf(cf, key);
        self.write(b)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_survive_reopen_and_lapse_by_the_given_clock() {
        let dir = tempfile::tempdir().unwrap();
        let t = TenantId::new("t").unwrap();
        let d = DbId::new("d").unwrap();
        let lease = |id, exp| Lease {
            id,
            start: Lsn(10),
            end: Lsn(20),
            expires_unix_ms: exp,
            holder: None,
        };
        {
            let s = StateDb::open(dir.path()).unwrap();
            s.put_lease(&t, &d, &lease(1, 1_000), 0).unwrap();
            s.put_lease(&t, &d, &lease(2, 5_000), 0).unwrap();
        }
        let s = StateDb::open(dir.path()).unwrap();
        let all = s.leases(&t, &d).unwrap();
        assert_eq!(all, vec![lease(1, 1_000), lease(2, 5_000)]);
        assert!(all[0].active(999) && !all[0].active(1_000));
        // A write at t=2000 drops the lapsed lease 1.
        s.put_lease(&t, &d, &lease(3, 9_000), 2_000).unwrap();
        let ids: Vec<u64> = s.leases(&t, &d).unwrap().iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert!(s.delete_lease(&t, &d, 2).unwrap());
        assert!(!s.delete_lease(&t, &d, 2).unwrap());
        assert!(s
            .leases(&t, &DbId::new("other").unwrap())
            .unwrap()
            .is_empty());
    }
}
