//! A run from start to verdict: [`run_seed`], the heal-and-check phase at its end, and the
//! [`RunReport`].

use crate::checker::{self, CheckReport};
use crate::config::SimConfig;
use crate::event_loop::Simulation;
use crate::trace::describe_object;
use crate::workload::{ContextSource, History, OpId, OpKind, Outcome};
use crate::{QUIET_MS, REQUEST_TIMEOUT_MS};

/// How much longer than the quiet period a run waits for hinted handoff to drain, where a
/// hint may hold the last copy of a write.
pub const HINT_GRACE_MS: Millis = 60_000;
/// How much longer than the quiet period a run without read repair waits for anti-entropy
/// to converge the replicas.
pub const ANTI_ENTROPY_GRACE_MS: Millis = 60_000;
/// How long the final phase waits for a cluster change (membership fault) to complete.
pub const MEMBERSHIP_GRACE_MS: Millis = 180_000;
use mendkv_core::config::FsyncPolicy;
use mendkv_core::quorum::ConsistencyLevel;
use mendkv_core::storage::Storage;
use mendkv_core::version::Object;
use mendkv_core::Millis;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// What a run did and what the checkers found.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub config: SimConfig,
    pub check: CheckReport,
    /// Events handled.
    pub steps: u64,
    /// Virtual time at the end.
    pub sim_ms: Millis,
    /// Set when the run stopped at its step or time bound.
    pub bound: Option<String>,
    /// (ok, failed, unknown, pending) of the workload's operations.
    pub tally: (usize, usize, usize, usize),
    /// The parameters the seed chose (network, workload, clocks).
    pub params: String,
    pub history: History,
    pub trace: Option<String>,
    /// Tombstones named in `Reap` messages (the reapers' requests to their peers).
    pub tombstones_reaped: u64,
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.bound.is_none()
            && self.check.safe()
            && (!self.config.require_convergence || self.check.converged())
    }

    /// One line: seed, verdict, checker figures.
    pub fn summary(&self) -> String {
        let (ok, failed, unknown, pending) = self.tally;
        let mut line = format!(
            "seed {} {}: {} | ops ok={ok} failed={failed} unknown={unknown} pending={pending} | {} events, {:.1}s simulated",
            self.config.seed,
            if self.passed() { "passed" } else { "FAILED" },
            self.check,
            self.steps,
            self.sim_ms as f64 / 1000.0
        );
        if self.tombstones_reaped > 0 {
            write!(line, " | {} tombstones reaped", self.tombstones_reaped).ok();
        }
        if let Some(bound) = &self.bound {
            write!(line, " | {bound}").ok();
        }
        line
    }

    /// The history of the keys involved in violations, for failure reports.
    pub fn key_histories(&self, max_keys: usize) -> String {
        let mut out = String::new();
        for key in self.check.keys().into_iter().take(max_keys) {
            writeln!(out, "history of {key}:").ok();
            for op in self.history.for_key(&key) {
                writeln!(out, "  {op}").ok();
            }
        }
        out
    }
}

/// Runs one seed from start to verdict.
pub fn run_seed(config: &SimConfig) -> RunReport {
    let (mut report, _) = run_once(config, BTreeSet::new());
    // A resurrected or stale value is often one the cluster applied more than once (a
    // duplicated or retried `Coordinate`). Replay the seed watching those values and say
    // under which dots they travelled.
    let suspects: BTreeSet<String> = report
        .check
        .resurrected
        .iter()
        .chain(&report.check.stale)
        .filter_map(|v| v.value.clone())
        .collect();
    if !suspects.is_empty() {
        let mut quiet = config.clone();
        quiet.trace = false;
        let (_, dots) = run_once(&quiet, suspects);
        for v in report
            .check
            .resurrected
            .iter_mut()
            .chain(report.check.stale.iter_mut())
        {
            let seen = v.value.as_ref().and_then(|value| dots.get(value));
            if let Some(seen) = seen.filter(|d| d.len() > 1) {
                let list: Vec<&str> = seen.iter().map(String::as_str).collect();
                write!(
                    v.detail,
                    " [the cluster applied this write {} times: dots {}]",
                    seen.len(),
                    list.join(", ")
                )
                .ok();
            }
        }
    }
    report
}

/// One run; also returns the dots under which the `watch`ed values travelled.
fn run_once(
    config: &SimConfig,
    watch: BTreeSet<String>,
) -> (RunReport, BTreeMap<String, BTreeSet<String>>) {
    let mut sim = Simulation::new(config.clone());
    sim.watch = watch;
    sim.start_workload();
    sim.run_until(|s| s.workload_done(), Millis::MAX);
    let check = sim.finish();
    let dots = std::mem::take(&mut sim.watched_dots);
    (sim.report(check), dots)
}

impl Simulation {
    /// Heals the cluster, lets it settle, reads every key at `all`, lets it settle again,
    /// and runs the checkers.
    pub fn finish(&mut self) -> CheckReport {
        self.heal_all();
        // A cluster change in progress completes before the final reads judge the data.
        let mut waited = 0;
        while self.membership_changing() && waited < MEMBERSHIP_GRACE_MS {
            self.membership_step();
            self.run_for(1_000);
            waited += 1_000;
        }
        if waited > 0 {
            let line = format!("the cluster change needed {waited} ms to complete");
            self.trace_line("sim", |_| line);
        }
        self.run_for(QUIET_MS);
        if self.hint_may_hold_the_last_copy() {
            // Under periodic fsync or a sloppy quorum a hint may hold the only copy of an
            // acknowledged write (its replica's copy died in a crash, or only fallbacks took
            // it). The repair breaker, tripped by the faults, holds hint replay for its
            // cooldown (30 s by default), longer than the quiet period: wait for the hints
            // to be handed off before the final reads judge what survived.
            let mut waited = 0;
            while waited < HINT_GRACE_MS && self.hints_pending() > 0 {
                self.run_for(1_000);
                waited += 1_000;
            }
            if waited > 0 {
                let line = format!("hinted handoff needed {waited} ms more to drain");
                self.trace_line("sim", |_| line);
            }
        }
        let apart_before = self.divergence().len();
        let keys: BTreeSet<String> = self
            .history
            .ops
            .iter()
            .filter(|o| !o.is_final)
            .map(|o| o.key.clone())
            .collect();
        let mut missing: Vec<String> = keys.into_iter().collect();
        for attempt in 0..3 {
            if missing.is_empty() || self.bound.is_some() {
                break;
            }
            self.trace_line("sim", |_| format!("final reads, attempt {}", attempt + 1));
            let mut ops = Vec::new();
            for key in &missing {
                let node = self.rng_work.gen_range(0..self.slots.len());
                let op = self.invoke(
                    None,
                    node,
                    OpKind::Get,
                    key,
                    ConsistencyLevel::All,
                    None,
                    ContextSource::Blind,
                    None,
                    true,
                    0,
                );
                ops.push((key.clone(), op));
            }
            let wait: Vec<OpId> = ops.iter().map(|(_, op)| *op).collect();
            self.run_until(
                |s| wait.iter().all(|op| *s.outcome(*op) != Outcome::Pending),
                QUIET_MS * 2,
            );
            missing = ops
                .into_iter()
                .filter(|(_, op)| !self.outcome(*op).is_ok())
                .map(|(k, _)| k)
                .collect();
            if !missing.is_empty() {
                self.run_for(REQUEST_TIMEOUT_MS);
            }
        }
        self.run_for(QUIET_MS);
        if self.config.options.read_repair.is_none() {
            // Without read repair the final reads mended nothing: convergence is anti-entropy's
            // (and hinted handoff's) alone. A pass over every (range, peer) at two exchanges
            // at a time can outlast the quiet period (rf 5 on 9 nodes), so give it up to
            // `ANTI_ENTROPY_GRACE_MS` more, checking each second.
            let mut waited = 0;
            while waited < ANTI_ENTROPY_GRACE_MS && !self.divergence().is_empty() {
                self.run_for(1_000);
                waited += 1_000;
            }
            if waited > 0 {
                let line = format!("anti-entropy needed {waited} ms more to converge");
                self.trace_line("sim", |_| line);
            }
        }
        let mut report =
            checker::check_history_with(&self.history, self.replicas(), &self.weaker_promises);
        report.unsynced_acknowledgements = self.unsynced_acknowledgements.clone();
        report.divergent = self.divergence();
        report.divergent_before_final_reads = apart_before;
        report
    }

    /// Keys whose replicas store different objects (or that a non-replica stores).
    pub fn divergence(&self) -> Vec<checker::Violation> {
        let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
        for slot in &self.slots {
            for (key, _) in slot.storage.objects() {
                keys.insert(key.key);
            }
        }
        let mut divergent = Vec::new();
        // Where tombstones are reaped within a run, a replica whose reaper has not yet
        // purged its tombstone (a lost `Reap`, a peer that was down) reads like one that
        // has: nothing. Reaping is behind, not apart.
        let reaping = self.reaping_within_run();
        for key in keys {
            let name = String::from_utf8_lossy(&key).into_owned();
            let replicas = self.preference_list(&name);
            let objects: Vec<(usize, Option<Object>)> = (0..self.slots.len())
                .map(|i| {
                    let object = self.stored(i, &name);
                    (i, object.filter(|o| !(reaping && o.is_deleted())))
                })
                .collect();
            let first = objects[replicas[0]].1.clone();
            let differs = replicas.iter().any(|&r| objects[r].1 != first);
            let misplaced: Vec<usize> = objects
                .iter()
                .filter(|(i, o)| o.is_some() && !replicas.contains(i))
                .map(|(i, _)| *i)
                .collect();
            if differs || !misplaced.is_empty() {
                let mut detail = String::new();
                for &r in &replicas {
                    match &objects[r].1 {
                        Some(o) => write!(detail, "n{r}={} ", describe_object(o, &self.names)).ok(),
                        None => write!(detail, "n{r}=none ").ok(),
                    };
                }
                if !misplaced.is_empty() {
                    write!(detail, "stored on non-replicas {misplaced:?}").ok();
                }
                divergent.push(checker::Violation {
                    key: name,
                    value: None,
                    detail: detail.trim_end().to_string(),
                });
            }
        }
        divergent
    }

    /// True when a hint may be the only copy of an acknowledged write (see `finish`).
    fn hint_may_hold_the_last_copy(&self) -> bool {
        self.config.options.fsync != FsyncPolicy::Always || self.config.options.sloppy_quorum
    }

    /// Hints stored on every node, delivered or not yet.
    pub fn hints_pending(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.storage.scan_hints().map(|h| h.len()).unwrap_or(0))
            .sum()
    }

    /// True when tombstones may be reaped within this run: the hint TTL (plus the two
    /// request timeouts reaping waits for) is shorter than a run.
    pub fn reaping_within_run(&self) -> bool {
        self.config.options.hint_ttl_ms + 2 * REQUEST_TIMEOUT_MS < self.config.max_sim_ms / 2
    }

    /// Ends a run: the figures and the verdict material.
    pub fn report(self, check: CheckReport) -> RunReport {
        RunReport {
            tally: self.history.tally(),
            config: self.config,
            check,
            steps: self.steps,
            sim_ms: self.now,
            bound: self.bound,
            params: self.params,
            history: self.history,
            trace: self.trace,
            tombstones_reaped: self.tombstones_reaped,
        }
    }
}
