//! mendkv's chaos harness: real `mendkv server` processes, each in its own Linux network
//! namespace with its own address on a bridge, faulted by a seeded nemesis (nftables
//! partitions, kill -9 and restart, SIGSTOP/SIGCONT), under a recorded workload whose
//! history is checked in Jepsen's manner once the cluster has healed and converged.
//!
//! # Layout
//! - [`checker`]: pure; history and final state in, verdict (lost, missed, unexpected,
//!   resurrected, divergent, minority) out.
//! - [`schedule`]: the seeded fault schedule and the seeded joins and decommissions.
//! - [`topology`]: namespaces, the bridge, nftables rules; cleanup of leftovers.
//! - [`nodes`]: the server processes (start, kill -9, restart, pause, continue).
//! - [`workload`]: the clients and how each outcome is classified.
//! - [`run`]: one run from namespaces to verdict; [`campaign`]: many runs and their table.

pub mod checker;
pub mod nodes;
pub mod run;
pub mod schedule;
pub mod topology;
pub mod workload;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

pub use run::{run_once, RunOptions, RunReport};

static INTERRUPT: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Turns SIGINT and SIGTERM into a flag every loop of a run checks, so Ctrl-C ends the run
/// through its guards (servers killed, namespaces deleted) instead of leaving them behind.
pub fn install_interrupt_handler() -> std::io::Result<()> {
    let flag = INTERRUPT.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, flag.clone())?;
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPT
        .get()
        .is_some_and(|flag| flag.load(Ordering::Relaxed))
}

/// Runs of one campaign, and their table.
pub mod campaign {
    use super::*;
    use std::time::{Duration, Instant};

    /// Runs `runs` runs from `first` (seeds `first.seed`, `first.seed + 1`, ...; node counts
    /// cycling through `node_counts`, or `first.nodes` when it is empty), stopping early when
    /// another run of the average length so far would exceed `budget`. Cleans up leftovers
    /// of crashed harnesses first.
    pub fn run_many(
        first: &RunOptions,
        node_counts: &[usize],
        runs: usize,
        budget: Option<Duration>,
    ) -> Vec<anyhow::Result<RunReport>> {
        let swept = topology::sweep_leftovers();
        if !swept.is_empty() {
            println!("removed leftovers of an earlier run: {}", swept.join(" "));
        }
        let started = Instant::now();
        let mut reports = Vec::new();
        for index in 0..runs {
            let mut options = first.clone();
            options.seed = first.seed.wrapping_add(index as u64);
            if !node_counts.is_empty() {
                options.nodes = node_counts[index % node_counts.len()];
            }
            // Another run of the average length so far must fit in the budget.
            if let Some(budget) = budget.filter(|_| index > 0) {
                let per_run = started.elapsed() / index as u32;
                if started.elapsed() + per_run > budget {
                    break;
                }
            }
            let report = run_once(&options);
            match &report {
                Ok(report) => print!("{}", report.summary()),
                Err(e) => println!("run seed {} failed: {e:#}", options.seed),
            }
            let stop = report.is_err() && interrupted();
            reports.push(report);
            if stop {
                break;
            }
        }
        reports
    }

    /// The markdown table of a campaign (docs/benchmarks.md's format).
    pub fn table(reports: &[anyhow::Result<RunReport>]) -> String {
        let done: Vec<&RunReport> = reports.iter().filter_map(|r| r.as_ref().ok()).collect();
        let errors = reports.len() - done.len();
        let sum = |f: &dyn Fn(&RunReport) -> usize| done.iter().map(|r| f(r)).sum::<usize>();
        let mut converge: Vec<u64> = done.iter().filter_map(|r| r.converge_ms).collect();
        converge.sort_unstable();
        let median = converge
            .get(converge.len() / 2)
            .map_or("-".to_string(), |ms| {
                format!("{:.1} s", *ms as f64 / 1000.0)
            });
        let max = converge.last().map_or("-".to_string(), |ms| {
            format!("{:.1} s", *ms as f64 / 1000.0)
        });
        let mut text = String::new();
        let _ = writeln!(text, "| runs | operations (ok / unknown / failed) | kills | pauses | partitions | joins | decommissions | removals | faults on joiners | minority probes | lost | missed | unexpected | resurrected | divergent | crashes | stuck changes | not converged | harness errors | median (max) time to converge |");
        let _ = writeln!(
            text,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let _ = writeln!(
            text,
            "| {} | {} ({} / {} / {}) | {} | {} | {} | {} | {} | {} | {} | {} ({} acked) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {median} ({max}) |",
            reports.len(),
            sum(&|r| r.ops.total()),
            sum(&|r| r.ops.ok),
            sum(&|r| r.ops.unknown),
            sum(&|r| r.ops.failed),
            sum(&|r| r.kills),
            sum(&|r| r.pauses),
            sum(&|r| r.partitions),
            sum(&|r| r.joins),
            sum(&|r| r.decommissions),
            sum(&|r| r.removals),
            sum(&|r| r.faults_on_joiners),
            sum(&|r| r.probes.len()),
            sum(&|r| r.verdict.minority_acked.len()),
            sum(&|r| r.verdict.lost.len()),
            sum(&|r| r.verdict.missed.len()),
            sum(&|r| r.verdict.unexpected.len()),
            sum(&|r| r.verdict.resurrected.len()),
            sum(&|r| r.verdict.divergent.len()),
            sum(&|r| r.crashes.len()),
            sum(&|r| r.stuck_changes.len()),
            done.iter().filter(|r| r.converge_ms.is_none()).count(),
            errors,
        );
        text
    }

    /// Whether the campaign found nothing wrong (and every run finished).
    pub fn clean(reports: &[anyhow::Result<RunReport>]) -> bool {
        !reports.is_empty()
            && reports
                .iter()
                .all(|r| r.as_ref().is_ok_and(|r| r.violations() == 0))
    }
}
