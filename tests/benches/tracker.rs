//! Hot-path cost of the engine-facing `DirtyTracker`: nanoseconds per `mark`, from one
//! thread and from two at once, and with a drain running concurrently; next to a plain
//! `fetch_or` on one shared atomic word as the floor, measured in the same run.
//!
//! `cargo bench -p cairn-tests --bench tracker` (env `CAIRN_BENCH_MARKS`, default 50 M).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cairn_core::DirtyTracker;

const PAGES: u64 = 1 << 22; // 16 GiB of 4 KiB pages

fn pages(seed: u64, n: usize) -> Vec<u64> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % PAGES
        })
        .collect()
}

fn ns_per(n: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let n: usize = std::env::var("CAIRN_BENCH_MARKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000_000);
    let work = pages(42, n);
    let tracker = DirtyTracker::new(PAGES);
    // Warm up: allocate every block once, as a running engine would have.
    for p in (0..PAGES).step_by(1 << 14) {
        tracker.mark(p);
    }
    tracker.drain();

    let floor_word = AtomicU64::new(0);
    let floor = ns_per(n, || {
        for p in &work {
            floor_word.fetch_or(1 << (p % 64), Ordering::Release);
        }
    });
    let one = ns_per(n, || {
        for p in &work {
            black_box(tracker.mark(*p));
        }
    });
    let drained = tracker.drain().pages.len();

    let tracker = Arc::new(tracker);
    let two = {
        let halves: Vec<Vec<u64>> = vec![work[..n / 2].to_vec(), work[n / 2..].to_vec()];
        let t = Instant::now();
        let handles: Vec<_> = halves
            .into_iter()
            .map(|h| {
                let tr = Arc::clone(&tracker);
                std::thread::spawn(move || {
                    for p in &h {
                        black_box(tr.mark(*p));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        // Per mark per thread: wall time × threads / marks.
        t.elapsed().as_nanos() as f64 * 2.0 / n as f64
    };
    tracker.drain();

    let stop = Arc::new(AtomicBool::new(false));
    let drainer = {
        let (tr, stop) = (Arc::clone(&tracker), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut drains = 0u64;
            while !stop.load(Ordering::Relaxed) {
                black_box(tr.drain());
                drains += 1;
            }
            drains
        })
    };
    let with_drain = ns_per(n, || {
        for p in &work {
            black_box(tracker.mark(*p));
        }
    });
    stop.store(true, Ordering::Relaxed);
    let drains = drainer.join().unwrap();

    println!("DirtyTracker::mark over {PAGES} pages, {n} random marks ({drained} distinct pages):");
    println!("  one shared atomic fetch_or (floor):    {floor:6.2} ns");
    println!(
        "  mark, one thread:                      {one:6.2} ns  ({:.2}x the floor)",
        one / floor
    );
    println!("  mark, two threads at once:             {two:6.2} ns per mark per thread");
    println!(
        "  mark while another thread drains:      {with_drain:6.2} ns  ({drains} drains meanwhile)"
    );
}
