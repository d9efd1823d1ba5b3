//! The driver's workload: batch `seq` of seed `s` is a pure function of `(s, seq)`, so a
//! run killed and restarted at any batch continues the same history, and a test can
//! recompute the state after any batch. Pure (splitmix64, no I/O, no global state).

use std::collections::BTreeMap;

use crate::error::{invalid, Result};
use crate::page::{entry_size, page_of, PAGE_CAPACITY};
use crate::wal::Op;

/// Longest value the workload writes.
pub const MAX_WORKLOAD_VALUE: usize = 120;
/// Most operations in one batch.
pub const MAX_BATCH: u64 = 8;

/// A deterministic stream of batches over a fixed key space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The seed.
    pub seed: u64,
    /// Keys `key-000000` … in use.
    pub keys: u32,
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Workload {
    /// Key number `i`.
    pub fn key(i: u32) -> Vec<u8> {
        format!("key-{i:06}").into_bytes()
    }

    /// Batch number `seq`: 1 to 8 operations, about 85% puts of 8 to 120 bytes and 15%
    /// deletes; three in four go to a hot tenth of the keys, the rest anywhere.
    pub fn batch(&self, seq: u64) -> Vec<Op> {
        let mut st = self.seed ^ seq.wrapping_mul(0xD134_2543_DE82_EF95);
        let n = 1 + splitmix64(&mut st) % MAX_BATCH;
        (0..n)
            .map(|_| {
                let all = u64::from(self.keys.max(1));
                let hot = splitmix64(&mut st) % 4 < 3;
                let span = if hot { (all / 10).max(1) } else { all };
                let key = Self::key((splitmix64(&mut st) % span) as u32);
                if splitmix64(&mut st) % 100 < 15 {
                    Op::Delete { key }
                } else {
                    let len = 8 + (splitmix64(&mut st) % (MAX_WORKLOAD_VALUE as u64 - 7)) as usize;
                    let mut x = splitmix64(&mut st);
                    let value = (0..len)
                        .map(|_| b'a' + (splitmix64(&mut x) % 26) as u8)
                        .collect();
                    Op::Put { key, value }
                }
            })
            .collect()
    }

    /// Refuses a key space that could overflow a page of a database with `data_pages`
    /// data pages (every key at its longest value), so the driver never meets
    /// [`crate::KvError::PageFull`].
    pub fn check_fits(&self, data_pages: u32) -> Result<()> {
        let mut load: BTreeMap<u32, usize> = BTreeMap::new();
        let value = [0u8; MAX_WORKLOAD_VALUE];
        for i in 0..self.keys {
            let k = Self::key(i);
            *load.entry(page_of(&k, data_pages)).or_default() += entry_size(&k, &value);
        }
        match load.iter().max_by_key(|(_, b)| **b) {
            Some((page, bytes)) if *bytes > PAGE_CAPACITY => Err(invalid(
                "workload",
                format!(
                    "{} keys over {data_pages} pages could overflow page {page} ({bytes} bytes > {PAGE_CAPACITY}); use fewer keys or more pages",
                    self.keys
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Applies a batch to a plain map (the model a test checks the engine against).
pub fn apply(model: &mut BTreeMap<Vec<u8>, Vec<u8>>, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Put { key, value } => {
                model.insert(key.clone(), value.clone());
            }
            Op::Delete { key } => {
                model.remove(key);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_a_function_of_seed_and_seq() {
        let w = Workload { seed: 7, keys: 100 };
        assert_eq!(w.batch(5), w.batch(5));
        assert_ne!(w.batch(5), w.batch(6));
        assert_ne!(w.batch(5), Workload { seed: 8, keys: 100 }.batch(5));
        for s in 0..200 {
            let b = w.batch(s);
            assert!(!b.is_empty() && b.len() as u64 <= MAX_BATCH);
        }
    }

    #[test]
    fn a_crowded_key_space_is_refused() {
        assert!(Workload {
            seed: 1,
            keys: 2000
        }
        .check_fits(512)
        .is_ok());
        assert!(Workload {
            seed: 1,
            keys: 2000
        }
        .check_fits(8)
        .is_err());
    }
}
