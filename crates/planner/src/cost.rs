//! The per-chunk cost model: write a delta on top of the chunk's chain, or rewrite the
//! chunk as a new base.
//!
//! Costs are in bytes. Uploading an object costs its size plus `object_cost_bytes` (the
//! request overhead, expressed as bytes). A delta also makes every later restore of this
//! chunk read more: the chain's delta bytes, any base bytes beyond the chunk's length, and
//! one more object; that extra read is charged at `restore_weight` per byte.
//!
//! ```text
//! cost(full)  = chunk_len + object_cost
//! cost(delta) = delta_len + object_cost
//!             + restore_weight × (chain_delta_bytes + delta_len + max(0, base_len − chunk_len)
//!                                 + (depth + 1) × object_cost)
//! ```
//!
//! A delta is chosen when it is cheaper, the chain stays within `max_chain_depth`, and no
//! more than `max_dirty_fraction` of the chunk's pages changed. A chunk with no change and
//! the same length keeps its chain untouched.

use serde::{Deserialize, Serialize};

use cairn_core::delta::delta_len;

/// Tunables of the cost model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Longest delta chain allowed; a chunk whose chain would grow past it is rewritten.
    pub max_chain_depth: usize,
    /// Per-object overhead (request cost, latency) expressed in bytes.
    pub object_cost_bytes: u64,
    /// Weight of one extra byte a future restore must read, relative to one uploaded byte.
    pub restore_weight: f64,
    /// Above this fraction of dirty pages a chunk is always rewritten.
    pub max_dirty_fraction: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            max_chain_depth: 32,
            object_cost_bytes: 64 * 1024,
            restore_weight: 0.25,
            max_dirty_fraction: 0.5,
        }
    }
}

/// The chunk's chain at the previous generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainInfo {
    /// Number of deltas on top of the base.
    pub depth: usize,
    /// Payload length of the base.
    pub base_len: u64,
    /// Payload bytes of all deltas.
    pub delta_bytes: u64,
    /// Chunk length at the previous generation.
    pub chunk_len: u64,
}

/// What is known about one chunk now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInput {
    /// Chunk length now.
    pub chunk_len: u64,
    /// Page size.
    pub page_size: u32,
    /// The previous chain, if the chunk existed and its page state is known.
    pub prev: Option<ChainInfo>,
    /// Pages that changed (including pages past the previous end of the chunk); `None`
    /// when unknown, which forces a rewrite.
    pub dirty_pages: Option<u64>,
}

/// Why a chunk is rewritten in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullReason {
    /// The chunk is new (or its previous state is unknown here).
    NoChain,
    /// Which pages changed is unknown.
    DirtyUnknown,
    /// The chain reached `max_chain_depth`.
    ChainTooDeep,
    /// More than `max_dirty_fraction` of the pages changed.
    TooDirty,
    /// A full rewrite costs less than a delta under the model.
    Cheaper,
}

/// The decision for one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkDecision {
    /// Nothing changed: keep the previous chain.
    Unchanged,
    /// Append a delta of the dirty pages.
    Delta,
    /// Write a new base.
    Full(FullReason),
}

/// Decides how to checkpoint one chunk. Pure and deterministic.
pub fn decide_chunk(input: &ChunkInput, model: &CostModel) -> ChunkDecision {
    let Some(prev) = input.prev else {
        return ChunkDecision::Full(FullReason::NoChain);
    };
    let Some(dirty) = input.dirty_pages else {
        return ChunkDecision::Full(FullReason::DirtyUnknown);
    };
    if dirty == 0 && prev.chunk_len == input.chunk_len {
        return ChunkDecision::Unchanged;
    }
    if prev.depth + 1 > model.max_chain_depth {
        return ChunkDecision::Full(FullReason::ChainTooDeep);
    }
    let pages = input.chunk_len.div_ceil(u64::from(input.page_size)).max(1);
    if dirty as f64 > model.max_dirty_fraction * pages as f64 {
        return ChunkDecision::Full(FullReason::TooDirty);
    }
    let obj = model.object_cost_bytes as f64;
    let d = delta_len(
        input.page_size,
        usize::try_from(dirty).unwrap_or(usize::MAX),
    ) as f64;
    let extra_read = prev.delta_bytes as f64
        + d
        + prev.base_len.saturating_sub(input.chunk_len) as f64
        + (prev.depth as f64 + 1.0) * obj;
    let cost_delta = d + obj + model.restore_weight * extra_read;
    let cost_full = input.chunk_len as f64 + obj;
    if cost_delta < cost_full {
        ChunkDecision::Delta
    } else {
        ChunkDecision::Full(FullReason::Cheaper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1024 * 1024;

    fn chunk(depth: usize, delta_bytes: u64, dirty: Option<u64>) -> ChunkInput {
        ChunkInput {
            chunk_len: 64 * MIB,
            page_size: 4096,
            prev: Some(ChainInfo {
                depth,
                base_len: 64 * MIB,
                delta_bytes,
                chunk_len: 64 * MIB,
            }),
            dirty_pages: dirty,
        }
    }

    #[test]
    fn few_dirty_pages_give_a_delta() {
        let m = CostModel::default();
        assert_eq!(
            decide_chunk(&chunk(0, 0, Some(1)), &m),
            ChunkDecision::Delta
        );
        assert_eq!(
            decide_chunk(&chunk(5, 3 * MIB, Some(164)), &m),
            ChunkDecision::Delta
        );
        assert_eq!(
            decide_chunk(&chunk(3, 0, Some(0)), &m),
            ChunkDecision::Unchanged
        );
    }

    #[test]
    fn heavy_churn_or_deep_chain_gives_a_rewrite() {
        let m = CostModel::default();
        assert_eq!(
            decide_chunk(&chunk(0, 0, Some(12_000)), &m),
            ChunkDecision::Full(FullReason::TooDirty)
        );
        assert_eq!(
            decide_chunk(&chunk(32, MIB, Some(1)), &m),
            ChunkDecision::Full(FullReason::ChainTooDeep)
        );
        assert_eq!(
            decide_chunk(&chunk(0, 0, None), &m),
            ChunkDecision::Full(FullReason::DirtyUnknown)
        );
        let mut new = chunk(0, 0, Some(1));
        new.prev = None;
        assert_eq!(
            decide_chunk(&new, &m),
            ChunkDecision::Full(FullReason::NoChain)
        );
        // A long chain whose deltas already add up to most of a chunk: rewriting is cheaper.
        assert_eq!(
            decide_chunk(&chunk(20, 300 * MIB, Some(100)), &m),
            ChunkDecision::Full(FullReason::Cheaper)
        );
    }

    #[test]
    fn a_grown_chunk_with_only_new_pages_is_a_delta() {
        let m = CostModel::default();
        let input = ChunkInput {
            chunk_len: 40 * MIB + 8192,
            page_size: 4096,
            prev: Some(ChainInfo {
                depth: 0,
                base_len: 40 * MIB,
                delta_bytes: 0,
                chunk_len: 40 * MIB,
            }),
            dirty_pages: Some(2),
        };
        assert_eq!(decide_chunk(&input, &m), ChunkDecision::Delta);
    }

    proptest! {
        #[test]
        fn decisions_are_deterministic_and_bounded(depth in 0usize..64, dirty in 0u64..20_000, delta_bytes in 0u64..(512 * MIB)) {
            let m = CostModel::default();
            let i = chunk(depth, delta_bytes, Some(dirty));
            let d = decide_chunk(&i, &m);
            prop_assert_eq!(d, decide_chunk(&i, &m));
            if d == ChunkDecision::Delta {
                prop_assert!(depth < m.max_chain_depth);
                prop_assert!(dirty as f64 <= m.max_dirty_fraction * 16384.0);
            }
        }
    }
}
