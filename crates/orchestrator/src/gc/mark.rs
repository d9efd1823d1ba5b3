//! Marking: which generations a collection keeps and every blob something still uses.
//!
//! The marked blobs are those of the retained generations (following each generation's
//! manifest chain and every chunk's delta chain: a base written by an expired generation
//! but used by a retained one stays), of pinned generations, of generations a store lease
//! holds, and those recorded by unfinished checkpoints of this state directory. Nothing
//! here writes but the store-clock object; a crash loses nothing.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use cairn_core::{DbId, Generation};
use cairn_planner::gc::{self as rules, GenInfo, Kept, Reason, Retention};

use super::{GcOptions, GcPlan};
use crate::queue::{Job, JobItems, JobSpec};
use crate::{CairnError, Checkpointer, GenerationState};

pub(super) struct Marks {
    /// Why each marked blob is kept.
    pub reasons: BTreeMap<String, Reason>,
    /// Retention's decision.
    pub kept: Kept,
    /// The store's clock when marking started.
    pub store_now_ms: u64,
}

/// Marks every blob of the generations in `holds` (ascending), with their reasons.
async fn mark_generations(
    cp: &Checkpointer,
    db: &DbId,
    holds: &BTreeMap<u64, Reason>,
    reasons: &mut BTreeMap<String, Reason>,
) -> Result<(), CairnError> {
    let mut walk = cairn_state::Walk::default();
    for (g, why) in holds {
        let (_, st) = match walk
            .state(&cp.state, &cp.store, &cp.cfg.tenant, db, Generation(*g))
            .await
        {
            Ok(s) => s,
            // A lease or pin naming a generation that does not exist holds nothing.
            Err(cairn_state::StateError::Store(cairn_remote_store::StoreError::NotFound {
                ..
            })) => continue,
            Err(e) => return Err(e.into()),
        };
        for b in st.blobs() {
            reasons.entry(b.name()).or_insert_with(|| why.clone());
        }
    }
    Ok(())
}

impl Marks {
    pub(super) async fn collect(
        cp: &Checkpointer,
        job: &Job<'_>,
        db: &DbId,
        latest: &GenerationState,
        opts: &GcOptions,
    ) -> Result<Marks, CairnError> {
        let tenant = &cp.cfg.tenant;
        let mut infos = Vec::new();
        for g in cp.generations(db).await? {
            if latest.state.gc.is_expired(g.0) {
                continue;
            }
            let m = cairn_state::fetch_manifest(&cp.state, &cp.store, tenant, db, g).await?;
            infos.push(GenInfo {
                generation: g.0,
                created_unix_ms: m.created_unix_ms,
                gc: m.gc,
            });
        }
        let pins = cp.pins(db).await?;
        let store_now_ms = cp.store_now_ms(tenant, db).await?;
        let leases = cp.held_leases(db, store_now_ms).await?;
        let policy = Retention {
            keep_last: opts.keep_last,
            keep_within_ms: opts.keep_within.map(|d| d.as_millis() as u64),
        };
        let kept = rules::retain(&infos, &policy, &pins, cp.env.now_ms());
        let mut holds: BTreeMap<u64, Reason> = BTreeMap::new();
        for g in &kept.retained {
            let why = if pins.contains(g) {
                Reason::Pin(*g)
            } else {
                Reason::Retained(*g)
            };
            holds.insert(*g, why);
        }
        for l in &leases {
            for g in &l.generations {
                holds
                    .entry(*g)
                    .or_insert_with(|| Reason::Lease(l.id.clone()));
            }
        }
        let mut reasons = BTreeMap::new();
        mark_generations(cp, db, &holds, &mut reasons).await?;
        // Blobs unfinished checkpoints of this state directory recorded: kept for them.
        for rec in cp.jobs()? {
            let own = matches!(&rec.spec, JobSpec::Checkpoint { db: d, .. } if d == db);
            if !own || !rec.state.is_unfinished() || rec.id == job.id() {
                continue;
            }
            let items = JobItems::decode(rec.id, cp.state.job_items(rec.id)?)?;
            let why = Reason::InFlight(rec.id.to_string());
            let blobs = items
                .chunks
                .values()
                .filter_map(|c| c.new_blob)
                .chain(items.segments.values().map(|s| s.entry.blob));
            for b in blobs {
                reasons.entry(b.name()).or_insert_with(|| why.clone());
            }
        }
        Ok(Marks {
            reasons,
            kept,
            store_now_ms,
        })
    }
}

/// After the collection's generation is published: the planned deletions that pins and
/// leases (taken since the marking) now hold.
pub(super) async fn rescue(
    cp: &Checkpointer,
    db: &DbId,
    plan: &GcPlan,
) -> Result<HashSet<String>, CairnError> {
    let now = cp.store_now_ms(&cp.cfg.tenant, db).await?;
    let retained: BTreeSet<u64> = plan.retained.iter().copied().collect();
    let mut holds: BTreeMap<u64, Reason> = BTreeMap::new();
    for g in cp.pins(db).await? {
        if !retained.contains(&g) {
            holds.insert(g, Reason::Pin(g));
        }
    }
    for l in cp.held_leases(db, now).await? {
        for g in l.generations {
            if !retained.contains(&g) {
                holds
                    .entry(g)
                    .or_insert_with(|| Reason::Lease(l.id.clone()));
            }
        }
    }
    let mut reasons = BTreeMap::new();
    mark_generations(cp, db, &holds, &mut reasons).await?;
    Ok(plan
        .delete
        .iter()
        .filter(|(n, _)| reasons.contains_key(n))
        .map(|(n, _)| n.clone())
        .collect())
}
