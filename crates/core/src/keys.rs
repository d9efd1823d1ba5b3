//! The object key layout under a store's root. Everything of one database lives under
//! `tenants/<tenant>/dbs/<db>/`: immutable blobs under `blobs/`, one manifest object per
//! published generation under `manifests/`, zero-padded so that listing order is
//! generation order.

use crate::address::BlobRef;
use crate::ids::{DbId, Generation, TenantId};

const MANIFEST_SUFFIX: &str = ".cmf";

/// `tenants/<tenant>/dbs/`
pub fn dbs_prefix(tenant: &TenantId) -> String {
    format!("tenants/{tenant}/dbs/")
}

/// `tenants/<tenant>/dbs/<db>`
pub fn db_prefix(tenant: &TenantId, db: &DbId) -> String {
    format!("tenants/{tenant}/dbs/{db}")
}

/// `…/<db>/blobs/`
pub fn blobs_prefix(tenant: &TenantId, db: &DbId) -> String {
    format!("{}/blobs/", db_prefix(tenant, db))
}

/// `…/<db>/blobs/<blob name>`
pub fn blob_key(tenant: &TenantId, db: &DbId, blob: &BlobRef) -> String {
    format!("{}{}", blobs_prefix(tenant, db), blob.name())
}

/// `…/<db>/manifests/`
pub fn manifests_prefix(tenant: &TenantId, db: &DbId) -> String {
    format!("{}/manifests/", db_prefix(tenant, db))
}

/// `…/<db>/manifests/<generation, 20 digits>.cmf`
pub fn manifest_key(tenant: &TenantId, db: &DbId, generation: Generation) -> String {
    format!(
        "{}{:020}{MANIFEST_SUFFIX}",
        manifests_prefix(tenant, db),
        generation.0
    )
}

/// `…/<db>/pins/`: operator pins, one object per pinned generation.
pub fn pins_prefix(tenant: &TenantId, db: &DbId) -> String {
    format!("{}/pins/", db_prefix(tenant, db))
}

/// `…/<db>/pins/<generation, 20 digits>.pin`
pub fn pin_key(tenant: &TenantId, db: &DbId, generation: Generation) -> String {
    format!("{}{:020}.pin", pins_prefix(tenant, db), generation.0)
}

/// `…/<db>/leases/`: leases that restores and verifies hold in the store.
pub fn store_leases_prefix(tenant: &TenantId, db: &DbId) -> String {
    format!("{}/leases/", db_prefix(tenant, db))
}

/// `…/<db>/leases/<id, 16 hex>.lease`
pub fn store_lease_key(tenant: &TenantId, db: &DbId, id: u64) -> String {
    format!("{}{id:016x}.lease", store_leases_prefix(tenant, db))
}

/// `…/<db>/gc/clock`: an object garbage collection writes to read the store's clock.
pub fn gc_clock_key(tenant: &TenantId, db: &DbId) -> String {
    format!("{}/gc/clock", db_prefix(tenant, db))
}

/// The generation named by a pin key, if it is one.
pub fn parse_pin_key(key: &str) -> Option<Generation> {
    let file = key.rsplit('/').next()?;
    let digits = file.strip_suffix(".pin")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Generation)
}

/// The generation named by a manifest key (or its last path segment), if it is one.
pub fn parse_manifest_key(key: &str) -> Option<Generation> {
    let file = key.rsplit('/').next()?;
    let digits = file.strip_suffix(MANIFEST_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_keys_roundtrip_and_sort() {
        let t = TenantId::new("t").unwrap();
        let d = DbId::new("d").unwrap();
        let k9 = manifest_key(&t, &d, Generation(9));
        let k10 = manifest_key(&t, &d, Generation(10));
        assert!(k9 < k10);
        assert_eq!(parse_manifest_key(&k10), Some(Generation(10)));
        assert_eq!(parse_manifest_key("x/12.cmf"), None);
        assert_eq!(parse_manifest_key("x/00000000000000000001.tmp"), None);
        let pin = pin_key(&t, &d, Generation(42));
        assert_eq!(parse_pin_key(&pin), Some(Generation(42)));
        assert!(pin.starts_with(&pins_prefix(&t, &d)));
        assert!(store_lease_key(&t, &d, 255).ends_with("00000000000000ff.lease"));
    }
}
