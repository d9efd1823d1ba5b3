//! Retention and sweep decisions of garbage collection, as pure functions: which
//! generations a policy keeps, and which listed blobs a sweep deletes. No I/O, no clock
//! (the caller passes "now"), so the rules are property-tested.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

/// One generation, as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenInfo {
    /// The generation.
    pub generation: u64,
    /// Its creation time, from its publisher's clock (ms since the Unix epoch).
    pub created_unix_ms: u64,
    /// Published by garbage collection: it only copies its parent's data.
    pub gc: bool,
}

/// A retention policy. Without either rule, every generation is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the newest N data generations.
    pub keep_last: Option<u64>,
    /// Keep data generations created within this many milliseconds before now.
    pub keep_within_ms: Option<u64>,
}

/// The generations a policy keeps and those it expires.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// Retained, ascending.
    pub retained: Vec<u64>,
    /// Expired, ascending.
    pub expired: Vec<u64>,
}

/// Applies `policy` to `gens` (ascending, the already expired left out). The newest
/// generation, the newest data generation and pinned ones are always kept; otherwise a
/// data generation is kept if any rule keeps it (the union of the rules); a generation
/// published by garbage collection is kept only when it is the newest (its data is its
/// parent's, restorable through that one).
pub fn retain(gens: &[GenInfo], policy: &Retention, pinned: &BTreeSet<u64>, now_ms: u64) -> Kept {
    let newest = gens.last().map(|g| g.generation);
    let newest_data = gens.iter().rev().find(|g| !g.gc).map(|g| g.generation);
    let data: Vec<&GenInfo> = gens.iter().filter(|g| !g.gc).collect();
    let by_count: BTreeSet<u64> = match policy.keep_last {
        Some(n) => data
            .iter()
            .rev()
            .take(usize::try_from(n).unwrap_or(usize::MAX))
            .map(|g| g.generation)
            .collect(),
        None => BTreeSet::new(),
    };
    let no_rule = policy.keep_last.is_none() && policy.keep_within_ms.is_none();
    let mut out = Kept::default();
    for g in gens {
        let by_age = policy
            .keep_within_ms
            .is_some_and(|t| g.created_unix_ms >= now_ms.saturating_sub(t));
        let keep = Some(g.generation) == newest
            || Some(g.generation) == newest_data
            || pinned.contains(&g.generation)
            || (!g.gc && (no_rule || by_count.contains(&g.generation) || by_age));
        if keep {
            out.retained.push(g.generation);
        } else {
            out.expired.push(g.generation);
        }
    }
    out
}

/// Why a listed blob is kept.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// A retained generation references it.
    Retained(u64),
    /// A pinned generation references it.
    Pin(u64),
    /// A restore lease (its id) holds a generation that references it.
    Lease(String),
    /// An unfinished checkpoint of this state directory recorded it (job id).
    InFlight(String),
    /// Unreferenced, but younger than the grace period by the store's clock.
    Grace,
}

/// A blob the store lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The store's timestamp of it (ms since the Unix epoch).
    pub modified_ms: u64,
}

/// What a sweep does with the listed blobs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Blobs to delete (unreferenced and past the grace period).
    pub delete: Vec<Listed>,
    /// Blobs kept, with the first reason found.
    pub kept: Vec<(Listed, Reason)>,
}

/// Decides for each listed blob: kept (referenced, by `marked`'s reason; or unreferenced
/// but modified less than `grace_ms` before the store's `now_ms`), or deleted.
pub fn sweep(
    listed: &[Listed],
    marked: &BTreeMap<String, Reason>,
    grace_ms: u64,
    now_ms: u64,
) -> Sweep {
    let mut out = Sweep::default();
    for l in listed {
        match marked.get(&l.name) {
            Some(r) => out.kept.push((l.clone(), r.clone())),
            None if l.modified_ms.saturating_add(grace_ms) > now_ms => {
                out.kept.push((l.clone(), Reason::Grace))
            }
            None => out.delete.push(l.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gens() -> impl Strategy<Value = Vec<GenInfo>> {
        proptest::collection::vec((0u64..10_000, any::<bool>()), 1..40).prop_map(|v| {
            let mut at = 0;
            v.into_iter()
                .enumerate()
                .map(|(i, (dt, gc))| {
                    at += dt;
                    GenInfo {
                        generation: i as u64 + 1,
                        created_unix_ms: at,
                        gc: gc && i > 0,
                    }
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn retention_keeps_what_it_must_and_partitions_the_generations(
            gens in gens(),
            keep_last in proptest::option::of(0u64..10),
            keep_within in proptest::option::of(0u64..50_000),
            pins in proptest::collection::btree_set(1u64..40, 0..4),
            now in 0u64..400_000,
        ) {
            let policy = Retention { keep_last, keep_within_ms: keep_within };
            let k = retain(&gens, &policy, &pins, now);
            let all: BTreeSet<u64> = gens.iter().map(|g| g.generation).collect();
            let r: BTreeSet<u64> = k.retained.iter().copied().collect();
            let e: BTreeSet<u64> = k.expired.iter().copied().collect();
            prop_assert!(r.is_disjoint(&e));
            prop_assert_eq!(r.union(&e).copied().collect::<BTreeSet<u64>>(), all.clone());
            prop_assert!(r.contains(&gens.last().unwrap().generation), "the newest is kept");
            for p in pins.iter().filter(|p| all.contains(p)) {
                prop_assert!(r.contains(p), "pinned {} kept", p);
            }
            let data: Vec<&GenInfo> = gens.iter().filter(|g| !g.gc).collect();
            if let Some(n) = keep_last {
                for g in data.iter().rev().take(n as usize) {
                    prop_assert!(r.contains(&g.generation));
                }
            }
            if let Some(t) = keep_within {
                for g in data.iter().filter(|g| g.created_unix_ms >= now.saturating_sub(t)) {
                    prop_assert!(r.contains(&g.generation));
                }
            }
            if keep_last.is_none() && keep_within.is_none() {
                for g in &data {
                    prop_assert!(r.contains(&g.generation), "no rule keeps every data generation");
                }
            }
        }

        #[test]
        fn a_sweep_never_deletes_a_marked_or_young_blob(
            blobs in proptest::collection::vec((0u8..20, 0u64..1000), 0..30),
            marked in proptest::collection::btree_set(0u8..20, 0..10),
            grace in 0u64..500,
            now in 0u64..1500,
        ) {
            let listed: Vec<Listed> = blobs.iter().enumerate().map(|(i, (n, t))| Listed {
                name: format!("b{n}-{i}"), size: 1, modified_ms: *t,
            }).collect();
            let marks: BTreeMap<String, Reason> = listed.iter()
                .filter(|l| marked.iter().any(|m| l.name.starts_with(&format!("b{m}-"))))
                .map(|l| (l.name.clone(), Reason::Retained(1)))
                .collect();
            let s = sweep(&listed, &marks, grace, now);
            prop_assert_eq!(s.delete.len() + s.kept.len(), listed.len());
            for d in &s.delete {
                prop_assert!(!marks.contains_key(&d.name));
                prop_assert!(d.modified_ms + grace <= now);
            }
        }
    }

    #[test]
    fn collection_generations_are_kept_only_when_newest() {
        let g = |generation, gc| GenInfo {
            generation,
            created_unix_ms: generation,
            gc,
        };
        let gens = [
            g(1, false),
            g(2, false),
            g(3, true),
            g(4, false),
            g(5, true),
        ];
        let policy = Retention {
            keep_last: Some(1),
            keep_within_ms: None,
        };
        let k = retain(&gens, &policy, &BTreeSet::from([1]), 100);
        assert_eq!(k.retained, vec![1, 4, 5]);
        assert_eq!(k.expired, vec![2, 3]);
    }
}
