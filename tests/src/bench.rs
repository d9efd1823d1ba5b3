//! Helpers shared by the benchmarks: repeated measurements summarised as the median with
//! its min–max, and goals judged on the whole range.
//!
//! A benchmark measures each figure in at least three runs, alternating the order of the
//! sides it compares from run to run, and computes each ratio within a run (both sides
//! measured next to each other). [`Spread`] then reports the median and the range over the
//! runs, and [`Goal::verdict`] calls a goal met only if every run met it: a range that
//! straddles the goal is "not met".

use std::fmt;

/// An environment variable parsed as a number, or `default`.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs per figure: `CAIRN_BENCH_RUNS`, at least 3 (default 3).
pub fn runs() -> usize {
    env_or("CAIRN_BENCH_RUNS", 3usize).max(3)
}

/// Median and range of one figure over the runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The median (the mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Spread {
    /// The spread of `values` (all zero if there are none).
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Self {
                median: 0.0,
                min: 0.0,
                max: 0.0,
                n,
            };
        }
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        }
    }

    /// Formats with `digits` decimals: `median (min–max)`.
    pub fn show(&self, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = digits
        )
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.show(3))
    }
}

/// A goal for a figure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// Every run at or below the bound.
    AtMost(f64),
    /// Every run at or above the bound.
    AtLeast(f64),
}

impl Goal {
    /// "met" if the whole range meets the goal, "not met" otherwise (a range straddling
    /// the goal included).
    pub fn verdict(&self, s: &Spread) -> &'static str {
        let met = match *self {
            Goal::AtMost(b) => s.n > 0 && s.max <= b,
            Goal::AtLeast(b) => s.n > 0 && s.min >= b,
        };
        if met {
            "met"
        } else {
            "not met"
        }
    }
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Goal::AtMost(b) => write!(f, "<= {b}"),
            Goal::AtLeast(b) => write!(f, ">= {b}"),
        }
    }
}

/// One line of a ratio table: label, `median (min–max)`, and the goal with its verdict.
pub fn ratio_line(label: &str, values: &[f64], goal: Option<Goal>) -> String {
    let s = Spread::of(values);
    match goal {
        Some(g) => format!("  {label:<58} {s}  [goal {g}: {}]", g.verdict(&s)),
        None => format!("  {label:<58} {s}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn spread_and_verdicts() {
        let s = Spread::of(&[1.2, 0.9, 1.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (1.0, 0.9, 1.2, 3));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(s.show(2), "1.00 (0.90–1.20)");
        assert_eq!(Goal::AtMost(1.1).verdict(&s), "not met", "straddles");
        assert_eq!(Goal::AtMost(1.2).verdict(&s), "met");
        assert_eq!(Goal::AtLeast(0.9).verdict(&s), "met");
        assert_eq!(Goal::AtLeast(0.95).verdict(&s), "not met");
        assert_eq!(Goal::AtMost(1.0).verdict(&Spread::of(&[])), "not met");
    }
}
