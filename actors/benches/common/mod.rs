//! What the benchmark binaries share: percentiles, the result table, run sizes.
//!
//! Included as `mod common;` by `kernel.rs`, `gateway.rs` and `storm.rs` (which uses only
//! part of it); each adds what only it needs (inherent impls may live in any module of the
//! same crate).

use std::fmt::Write as _;
use std::time::Duration;

/// Percentiles of a sample, in microseconds.
#[derive(Clone, Copy)]
pub struct Stats {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let at = |q: f64| -> f64 {
            if us.is_empty() {
                return f64::NAN;
            }
            let i = ((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1;
            us[i]
        };
        Stats {
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// One line of the final table.
pub struct Row {
    pub bench: String,
    pub metric: String,
    pub value: String,
    pub goal: String,
    pub verdict: &'static str,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// A smoke run's figures say nothing about the goals: no verdicts.
    pub no_verdicts: bool,
}

impl Report {
    pub fn add(
        &mut self,
        bench: &str,
        metric: &str,
        value: String,
        goal: &str,
        pass: Option<bool>,
    ) {
        let verdict = match pass.filter(|_| !self.no_verdicts) {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "",
        };
        self.rows.push(Row {
            bench: bench.to_string(),
            metric: metric.to_string(),
            value,
            goal: goal.to_string(),
            verdict,
        });
    }

    pub fn print(&self) {
        let w = |f: fn(&Row) -> &str, head: &str| {
            self.rows
                .iter()
                .map(|r| f(r).chars().count())
                .chain([head.len()])
                .max()
                .unwrap_or(0)
        };
        let (wb, wm, wv, wg) = (
            w(|r| &r.bench, "benchmark"),
            w(|r| &r.metric, "metric"),
            w(|r| &r.value, "value"),
            w(|r| &r.goal, "goal"),
        );
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n| {:wb$} | {:wm$} | {:>wv$} | {:wg$} | verdict |",
            "benchmark", "metric", "value", "goal"
        );
        let _ = writeln!(
            out,
            "|{}|{}|{}|{}|---------|",
            "-".repeat(wb + 2),
            "-".repeat(wm + 2),
            "-".repeat(wv + 2),
            "-".repeat(wg + 2)
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {:wb$} | {:wm$} | {:>wv$} | {:wg$} | {:7} |",
                r.bench, r.metric, r.value, r.goal, r.verdict
            );
        }
        print!("{out}");
    }
}

pub fn ms(v_us: f64) -> String {
    format!("{:.2} ms", v_us / 1000.0)
}

/// How big a run is.
#[derive(Clone, Copy, PartialEq)]
pub enum Size {
    /// Toy sizes, unoptimized: `cargo test` checks that every section still runs.
    Smoke,
    /// Smaller sizes for a quick look (`-- quick`).
    Quick,
    /// The sizes the goals are stated for.
    Full,
}

impl Size {
    pub fn pick<T>(self, smoke: T, quick: T, full: T) -> T {
        match self {
            Size::Smoke => smoke,
            Size::Quick => quick,
            Size::Full => full,
        }
    }
}
