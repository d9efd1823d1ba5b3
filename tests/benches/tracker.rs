//! Hot-path cost of the engine-facing `DirtyTracker`: nanoseconds per `mark`, from one
//! thread and from two at once, and with a drain running concurrently; next to a plain
//! `fetch_or` on one shared atomic word as the floor, measured in the same run.
//!
//! Every figure is measured in `CAIRN_BENCH_RUNS` runs (default and minimum 3), the floor
//! and the one-thread `mark` in alternating order, and printed as the median with its
//! min–max ([`cairn_tests::bench`]); the ratio to the floor is taken within each run.
//!
//! `cargo bench -p cairn-tests --bench tracker` (env `CAIRN_BENCH_MARKS`, default 50 M
//! marks per measurement).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cairn_core::DirtyTracker;
use cairn_tests::bench::{env_or, runs, Spread};

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

/// One run: (floor, one thread, two threads, with a drain, drains meanwhile, distinct
/// pages marked).
fn run(work: &[u64], flip: bool) -> (f64, f64, f64, f64, u64, usize) {
    let n = work.len();
    let tracker = DirtyTracker::new(PAGES);
    // Warm up: allocate every block once, as a running engine would have.
    for p in (0..PAGES).step_by(1 << 14) {
        tracker.mark(p);
    }
    tracker.drain();
    let floor_word = AtomicU64::new(0);
    let floor = || {
        ns_per(n, || {
            for p in work {
                floor_word.fetch_or(1 << (p % 64), Ordering::Release);
            }
        })
    };
    let one = || {
        ns_per(n, || {
            for p in work {
                black_box(tracker.mark(*p));
            }
        })
    };
    let (floor, one) = if flip {
        let o = one();
        (floor(), o)
    } else {
        let f = floor();
        (f, one())
    };
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
        for p in work {
            black_box(tracker.mark(*p));
        }
    });
    stop.store(true, Ordering::Relaxed);
    let drains = drainer.join().unwrap();
    (floor, one, two, with_drain, drains, drained)
}

fn main() {
    let n: usize = env_or("CAIRN_BENCH_MARKS", 50_000_000);
    let runs = runs();
    let work = pages(42, n);
    let mut v: [Vec<f64>; 5] = Default::default();
    let mut distinct = 0;
    for r in 0..runs {
        let (floor, one, two, with_drain, drains, drained) = run(&work, !r.is_multiple_of(2));
        distinct = drained;
        println!(
            "run {}: floor {floor:.2} ns, mark {one:.2} ns, two threads {two:.2} ns, with a drain {with_drain:.2} ns ({drains} drains)",
            r + 1
        );
        for (i, x) in [floor, one, two, with_drain, drains as f64]
            .into_iter()
            .enumerate()
        {
            v[i].push(x);
        }
    }
    let ratio: Vec<f64> = v[1].iter().zip(&v[0]).map(|(m, f)| m / f).collect();
    let s = |i: usize| Spread::of(&v[i]).show(2);
    println!();
    println!(
        "DirtyTracker::mark over {PAGES} pages, {n} random marks ({distinct} distinct pages), {runs} runs, median (min–max):"
    );
    println!("  one shared atomic fetch_or (floor):    {} ns", s(0));
    println!(
        "  mark, one thread:                      {} ns  ({}x the floor)",
        s(1),
        Spread::of(&ratio).show(2)
    );
    println!(
        "  mark, two threads at once:             {} ns per mark per thread",
        s(2)
    );
    println!(
        "  mark while another thread drains:      {} ns  ({} drains meanwhile)",
        s(3),
        Spread::of(&v[4]).show(0)
    );
}
