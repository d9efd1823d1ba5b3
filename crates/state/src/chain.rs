//! Materialising a generation's whole state from its manifest chain: the full manifest
//! the chain leads back to, then each diff after it, in order.
//!
//! Contract: [`materialize`] reads at most one full manifest and the diffs after it (their
//! number is bounded by the publisher), from the local state or, for objects it lacks,
//! from the store (verified, then recorded locally, unless the state is open read-only). A chain that does not fit together
//! (a diff that does not apply, a "full" generation that is a diff) is
//! [`StateError::Corrupt`] naming the object. Nothing is written but imported objects, so
//! a crash leaves only what was imported. Retries: the store's. Cancellation: dropping the
//! future.

use cairn_core::{keys, Content, DbId, DbState, Generation, Manifest, TenantId};
use cairn_remote_store::RemoteStore;

use crate::error::StateError;
use crate::publish::fetch_manifest;
use crate::StateDb;

/// Generation `g`'s manifest and whole state.
pub async fn materialize(
    state: &StateDb,
    store: &RemoteStore,
    tenant: &TenantId,
    db: &DbId,
    g: Generation,
) -> Result<(Manifest, DbState), StateError> {
    let top = fetch_manifest(state, store, tenant, db, g).await?;
    let full = Generation(g.0 - u64::from(top.chain()));
    let mut st = match &top.content {
        Content::Full(s) => return Ok((top.clone(), s.clone())),
        Content::Diff(_) => {
            let base = fetch_manifest(state, store, tenant, db, full).await?;
            match base.content {
                Content::Full(s) => s,
                Content::Diff(_) => {
                    return Err(StateError::Corrupt {
                        key: keys::manifest_key(tenant, db, full),
                        reason: format!(
                            "generation {g}'s chain leads back to generation {full}, which is not a full manifest"
                        ),
                    })
                }
            }
        }
    };
    for h in full.0 + 1..g.0 {
        let m = fetch_manifest(state, store, tenant, db, Generation(h)).await?;
        apply(&mut st, &m, full)?;
    }
    apply(&mut st, &top, full)?;
    Ok((top, st))
}

/// Applies diff manifest `m` (on the chain from full generation `full`) to `st`.
pub fn apply(st: &mut DbState, m: &Manifest, full: Generation) -> Result<(), StateError> {
    let key = || keys::manifest_key(&m.tenant, &m.db, m.generation);
    match &m.content {
        Content::Diff(d) if m.generation.0 - u64::from(d.chain) == full.0 => {
            st.apply(d).map_err(|reason| StateError::Corrupt {
                key: key(),
                reason: format!(
                    "diff does not apply to generation {}: {reason}",
                    m.generation.0 - 1
                ),
            })
        }
        _ => Err(StateError::Corrupt {
            key: key(),
            reason: format!(
                "expected a diff on the chain from full generation {full}, found {}",
                match &m.content {
                    Content::Full(_) => "a full manifest".to_string(),
                    Content::Diff(d) => format!("a diff {} back from its full", d.chain),
                }
            ),
        }),
    }
}

/// States of successive generations, applying each diff to the previous state instead of
/// materialising every generation from its full manifest.
#[derive(Default)]
pub struct Walk {
    last: Option<(Generation, Generation, DbState)>,
}

impl Walk {
    /// Generation `g`'s manifest and state; cheapest when called in ascending order.
    pub async fn state(
        &mut self,
        state: &StateDb,
        store: &RemoteStore,
        tenant: &TenantId,
        db: &DbId,
        g: Generation,
    ) -> Result<(Manifest, DbState), StateError> {
        let m = fetch_manifest(state, store, tenant, db, g).await?;
        let next = match (&m.content, self.last.take()) {
            (Content::Full(s), _) => (g, s.clone()),
            (Content::Diff(d), Some((lg, full, mut st)))
                if lg.0 + 1 == g.0 && g.0 - u64::from(d.chain) == full.0 =>
            {
                apply(&mut st, &m, full)?;
                (full, st)
            }
            (Content::Diff(d), _) => {
                let (_, st) = materialize(state, store, tenant, db, g).await?;
                (Generation(g.0 - u64::from(d.chain)), st)
            }
        };
        let st = next.1.clone();
        self.last = Some((g, next.0, next.1));
        Ok((m, st))
    }
}
