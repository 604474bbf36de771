//! The checkers that judge a run once faults have stopped and the cluster has healed.
//!
//! They read only the [`History`] (what clients saw) and, for convergence, what each replica
//! stores. The final reads are made at level `all` through the protocol, so the final value
//! of a key is the causal join of every replica's object.
//!
//! # Rules
//! Let `n` be the number of replicas of a key and `required(level)` the replicas a level
//! needs. A write acknowledged at level `w` is durable on `required(w)` replicas when it is
//! acknowledged (group commit: nothing is acknowledged before an fsync covers it).
//!
//! - **lost**: an acknowledged put whose value the final read does not return, although no
//!   other write to the key could have superseded it. A write *could* supersede another
//!   only through its causal context: a blind put supersedes nothing; a write whose context
//!   came from a read could have covered the value only if that read returned it (the
//!   first context to cover a dot is taken from an object holding it); a write whose
//!   context came from an earlier write's answer (its actor's object, content unknown)
//!   could have seen the value if that answer arrived after the value's write was invoked;
//!   a delete without context reads first, so it could have seen the value if it ended (or
//!   may still end) after the value's write was invoked.
//!   Concurrent writes make siblings, and siblings are returned, so they are not losses.
//! - **missed**: a successful read at level `r`, invoked after a put was acknowledged at
//!   level `w` with `required(w) + required(r) > n`, that did not return the put's value
//!   although no write that could have superseded it (same rule as for lost) had been
//!   invoked before the read ended. Quorum intersection promises that read the value.
//! - **unexpected**: a successful read (during the run or final) returned a value no client
//!   ever wrote.
//! - **resurrected** / **stale**: the final read returns a value that an acknowledged write
//!   *certainly* superseded: the value's put was acknowledged at level `w` before a read at
//!   level `r` with `required(w) + required(r) > n` was invoked (so that read saw it), and
//!   an acknowledged delete (resurrected) or put (stale) carried that read's context (or was
//!   a delete without context that did that read itself).
//! - **converged**: every replica in a key's preference list stores the same object
//!   (context and siblings) at the very end. The final reads at `all` read-repair every key,
//!   so this holds under every fault since read repair exists; what the cluster mends by
//!   itself is reported as the number of keys still apart *before* the final reads (it
//!   falls as hinted handoff and anti-entropy arrive; it is 0 without faults).

use crate::workload::{ContextSource, History, OkResult, Op, OpId, OpKind, Outcome};
use mendkv_core::quorum::ConsistencyLevel;
use mendkv_core::version::{lww_order, Sibling, Value};
use mendkv_core::Millis;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What a run's configuration does not promise, value by value. The rules above assume
/// `fsync = always` and strict quorums; two swarm modes promise less, and a value they
/// touched is excused from exactly the rules whose premise they break (and counted in
/// [`CheckReport::excused`]):
///
/// - **periodic fsync** acknowledges a write before it is durable, so a crash may take it
///   from a replica. A read that quorum intersection promised the value may miss it once a
///   crash dropped it from some replica (missed; and the read may not have seen it, so a
///   write with its context need not supersede it: resurrected / stale). A crash may also
///   undo the superseding write itself, so a key whose unsynced writes a crash rolled back
///   after the superseder was invoked is excused from resurrected / stale (coarser: the
///   superseder may be a tombstone, which carries no value to follow). An acknowledged
///   value is excused from lost only if a crash took it from the *last* node holding it
///   (object or hint, synced or not): while any copy lives, repair must bring it back.
/// - **sloppy quorum** counts a fallback's hint toward the level, so the write's quorum need
///   not intersect a later read's: values that travelled as hinted writes are excused from
///   missed, resurrected and stale. Not from lost: the hint is durable and handed off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeakerPromises {
    /// Values a crash took from some replica's unsynced writes, and when it first did.
    pub dropped_by_crash: BTreeMap<String, Millis>,
    /// Values a crash took from the last node that held them.
    pub gone_by_crash: BTreeSet<String>,
    /// Keys whose unsynced writes a crash rolled back on some node, and when.
    pub rolled_back: BTreeMap<String, Vec<Millis>>,
    /// Values written to a fallback by a sloppy quorum, and when first seen there.
    pub hinted: BTreeMap<String, Millis>,
}

impl WeakerPromises {
    /// True when quorum intersection no longer promised a read ending at `by` the value.
    fn intersection_void(&self, value: &str, by: Millis) -> bool {
        self.hinted.contains_key(value)
            || self.dropped_by_crash.get(value).is_some_and(|&t| t <= by)
    }
}

/// One finding of a checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub key: String,
    pub detail: String,
    /// The client value involved, when there is one.
    pub value: Option<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.detail)
    }
}

/// Everything the checkers found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub lost: Vec<Violation>,
    /// Reads that overlapped an acknowledged write's quorum and did not return it.
    pub missed: Vec<Violation>,
    pub unexpected: Vec<Violation>,
    pub resurrected: Vec<Violation>,
    pub stale: Vec<Violation>,
    /// Keys whose final read failed even after the cluster healed.
    pub final_read_failures: Vec<Violation>,
    /// Answers that claimed a write durable before a sync covered it (the simulator's
    /// durability audit, checked on every such answer as it leaves a node).
    pub unsynced_acknowledgements: Vec<Violation>,
    /// Keys whose replicas hold different objects at the end (after the final reads, which
    /// read-repair what they read).
    pub divergent: Vec<Violation>,
    /// Keys whose replicas differed after the quiet period, before the final reads: what
    /// background repair (hinted handoff, anti-entropy) has not yet mended. Reported only.
    pub divergent_before_final_reads: usize,
    pub keys_checked: usize,
    /// Acknowledged puts that no write could have superseded, so the final read had to
    /// return them (the lost checker's reach in this run).
    pub writes_that_must_survive: usize,
    /// Acknowledged puts that an acknowledged write certainly superseded, so the final read
    /// must not return them (the resurrected / stale checkers' reach).
    pub writes_that_must_be_gone: usize,
    /// Checks skipped because the configuration did not promise them ([`WeakerPromises`]).
    pub excused: usize,
}

impl CheckReport {
    /// No safety violation (convergence aside).
    pub fn safe(&self) -> bool {
        self.lost.is_empty()
            && self.missed.is_empty()
            && self.unexpected.is_empty()
            && self.resurrected.is_empty()
            && self.stale.is_empty()
            && self.final_read_failures.is_empty()
            && self.unsynced_acknowledgements.is_empty()
    }

    pub fn converged(&self) -> bool {
        self.divergent.is_empty()
    }

    /// Every violation, labelled, for failure reports.
    pub fn violations(&self) -> impl Iterator<Item = (&'static str, &Violation)> {
        self.lost
            .iter()
            .map(|v| ("lost", v))
            .chain(self.missed.iter().map(|v| ("missed", v)))
            .chain(self.unexpected.iter().map(|v| ("unexpected", v)))
            .chain(self.resurrected.iter().map(|v| ("resurrected", v)))
            .chain(self.stale.iter().map(|v| ("stale", v)))
            .chain(self.final_read_failures.iter().map(|v| ("final-read", v)))
            .chain(
                self.unsynced_acknowledgements
                    .iter()
                    .map(|v| ("unsynced-ack", v)),
            )
            .chain(self.divergent.iter().map(|v| ("divergent", v)))
    }

    /// The keys involved in any violation, those of safety violations first.
    pub fn keys(&self) -> Vec<String> {
        let safety: BTreeSet<String> = self
            .violations()
            .filter(|(label, _)| *label != "divergent")
            .map(|(_, v)| v.key.clone())
            .collect();
        let rest: BTreeSet<String> = self
            .divergent
            .iter()
            .map(|v| v.key.clone())
            .filter(|k| !safety.contains(k))
            .collect();
        safety.into_iter().chain(rest).collect()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lost={} missed={} unexpected={} resurrected={} stale={} final-read-failures={} converged={}",
            self.lost.len(),
            self.missed.len(),
            self.unexpected.len(),
            self.resurrected.len(),
            self.stale.len(),
            self.final_read_failures.len(),
            if self.converged() {
                format!(
                    "yes ({} keys apart before the final reads)",
                    self.divergent_before_final_reads
                )
            } else {
                format!(
                    "no ({} divergent keys of {})",
                    self.divergent.len(),
                    self.keys_checked
                )
            }
        )?;
        write!(
            f,
            " (reach: {} writes had to survive, {} had to be gone)",
            self.writes_that_must_survive, self.writes_that_must_be_gone
        )?;
        if self.excused > 0 {
            write!(f, " ({} checks excused by the configuration)", self.excused)?;
        }
        Ok(())
    }
}

/// True when a successful read returned `value`.
fn returned(read: &Op, value: &str) -> bool {
    matches!(&read.outcome, Outcome::Ok(OkResult::Read { values }) if values.iter().any(|v| v == value))
}

/// Replicas a level needs out of `n`.
fn required(level: ConsistencyLevel, n: usize) -> usize {
    level.required(n)
}

/// Runs the history checkers (lost, unexpected, resurrected, stale, final reads). `replicas`
/// is the number of replicas of a key (min(RF, nodes)).
pub fn check_history(history: &History, replicas: usize) -> CheckReport {
    check_history_with(history, replicas, &WeakerPromises::default())
}

/// [`check_history`] for a configuration that promises less ([`WeakerPromises`]).
pub fn check_history_with(
    history: &History,
    replicas: usize,
    weaker: &WeakerPromises,
) -> CheckReport {
    let mut report = CheckReport::default();
    let writer_of: BTreeMap<&str, &Op> = history
        .ops
        .iter()
        .filter_map(|op| op.value.as_deref().map(|v| (v, op)))
        .collect();

    // unexpected: any successful read returning a value nobody wrote.
    for op in &history.ops {
        if let Outcome::Ok(OkResult::Read { values }) = &op.outcome {
            for value in values {
                if !writer_of.contains_key(value.as_str()) {
                    report.unexpected.push(Violation {
                        key: op.key.clone(),
                        value: Some(value.clone()),
                        detail: format!("op{} read {value:?}, which no client wrote", op.id),
                    });
                }
            }
        }
    }

    // The final value of every key: its last successful final read.
    let keys: BTreeSet<&str> = history
        .ops
        .iter()
        .filter(|op| !op.is_final)
        .map(|op| op.key.as_str())
        .collect();
    report.keys_checked = keys.len();
    let mut finals: BTreeMap<&str, &[String]> = BTreeMap::new();
    for op in history.ops.iter().filter(|op| op.is_final) {
        if let Outcome::Ok(OkResult::Read { values }) = &op.outcome {
            finals.insert(op.key.as_str(), values);
        }
    }
    for key in &keys {
        if !finals.contains_key(key) {
            report.final_read_failures.push(Violation {
                key: key.to_string(),
                value: None,
                detail: "no final read succeeded after the cluster healed".into(),
            });
        }
    }

    let completed_at = |id: crate::workload::OpId| {
        history
            .get(id)
            .and_then(|o| o.completed)
            .unwrap_or(u64::MAX)
    };
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history.ops.iter().filter(|o| !o.is_final) {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let acked_puts = || {
        history.ops.iter().filter(|o| {
            o.kind == OpKind::Put && o.outcome.is_ok() && o.value.is_some() && is_causal(&o.key)
        })
    };
    // For every acknowledged put, the earliest invocation of a write that could have
    // superseded it (none: nothing could).
    let mut earliest_superseder: BTreeMap<crate::workload::OpId, Millis> = BTreeMap::new();
    for w in acked_puts() {
        let value = w.value.as_deref().unwrap_or_default();
        let could_supersede = |x: &&&Op| {
            x.id != w.id
                && x.kind.is_write()
                && x.outcome.may_have_effect()
                && match x.context {
                    ContextSource::Blind => false,
                    ContextSource::ReadsFirst => x.end_or_never() >= w.invoked,
                    ContextSource::FromOp(r) => match history.get(r) {
                        // A read's context covers the value only if the read returned it:
                        // the first context to cover a dot comes from an object that held
                        // it, and merging never drops a dot that no context covers yet.
                        Some(read) if read.kind == OpKind::Get => {
                            returned(read, value) && completed_at(r) >= w.invoked
                        }
                        // A write's context is its actor's whole object: unknown content.
                        _ => completed_at(r) >= w.invoked,
                    },
                }
        };
        let first = by_key
            .get(w.key.as_str())
            .into_iter()
            .flatten()
            .filter(could_supersede)
            .map(|x| x.invoked)
            .min();
        if let Some(at) = first {
            earliest_superseder.insert(w.id, at);
        }
    }

    // missed: a read whose level overlapped an acknowledged write's quorum, invoked after
    // the acknowledgement, that did not return the value although nothing could have
    // superseded it before the read ended.
    for w in acked_puts() {
        let value = w.value.as_deref().unwrap_or_default();
        let acked_at = w.completed.unwrap_or(u64::MAX);
        let need_w = required(w.level, replicas);
        let superseded_from = earliest_superseder.get(&w.id).copied().unwrap_or(u64::MAX);
        for r in by_key.get(w.key.as_str()).into_iter().flatten() {
            if r.kind != OpKind::Get
                || !r.outcome.is_ok()
                || r.invoked <= acked_at
                || need_w + required(r.level, replicas) <= replicas
                || returned(r, value)
                || superseded_from <= r.completed.unwrap_or(u64::MAX)
            {
                continue;
            }
            if weaker.intersection_void(value, r.completed.unwrap_or(u64::MAX)) {
                report.excused += 1;
                continue;
            }
            report.missed.push(Violation {
                key: w.key.clone(),
                value: Some(value.to_string()),
                detail: format!(
                    "op{} get at {} (invoked {}ms) returned {} without {value}, which op{} put at {} and had acknowledged at {acked_at}ms; nothing could have superseded it by then",
                    r.id,
                    r.level,
                    r.invoked,
                    r.outcome,
                    w.id,
                    w.level
                ),
            });
            break; // one missed read per write is enough to report
        }
    }

    // lost: acknowledged puts missing from the final read with no possible superseder.
    for w in acked_puts() {
        let Some(value) = &w.value else { continue };
        let Some(final_values) = finals.get(w.key.as_str()) else {
            continue;
        };
        if earliest_superseder.contains_key(&w.id) {
            continue;
        }
        if weaker.gone_by_crash.contains(value) {
            report.excused += 1;
            continue;
        }
        report.writes_that_must_survive += 1;
        if !final_values.contains(value) {
            report.lost.push(Violation {
                key: w.key.clone(),
                value: Some(value.clone()),
                detail: format!(
                    "op{} put {value} at {} was acknowledged at {}ms; the final read returned [{}] and no later write could have superseded it",
                    w.id,
                    w.level,
                    w.completed.unwrap_or(0),
                    final_values.join(",")
                ),
            });
        }
    }

    // resurrected / stale: acknowledged puts that an acknowledged write certainly
    // superseded must be gone from the final read.
    for w in history
        .ops
        .iter()
        .filter(|o| o.kind == OpKind::Put && o.outcome.is_ok() && is_causal(&o.key))
    {
        let Some(value) = &w.value else { continue };
        let Some(final_values) = finals.get(w.key.as_str()) else {
            continue;
        };
        let acked_at = w.completed.unwrap_or(u64::MAX);
        let need_w = required(w.level, replicas);
        let overlaps = |level: ConsistencyLevel| need_w + required(level, replicas) > replicas;
        // The read that saw the value: the write's own read for a delete without context.
        let seen_by = |x: &Op| -> Option<OpId> {
            match x.context {
                ContextSource::Blind => None,
                ContextSource::ReadsFirst => Some(x.id),
                ContextSource::FromOp(r) => Some(r),
            }
        };
        let certain = history.for_key(&w.key).find(|x| {
            x.kind.is_write()
                && !x.is_final
                && x.outcome.is_ok()
                && match x.context {
                    ContextSource::Blind => false,
                    ContextSource::ReadsFirst => overlaps(x.level) && x.invoked > acked_at,
                    ContextSource::FromOp(r) => history.get(r).is_some_and(|read| {
                        read.kind == OpKind::Get
                            && read.outcome.is_ok()
                            && overlaps(read.level)
                            && read.invoked > acked_at
                    }),
                }
        });
        let Some(x) = certain else { continue };
        let read_ended = seen_by(x)
            .and_then(|r| history.get(r))
            .and_then(|r| r.completed)
            .unwrap_or(u64::MAX);
        let undone = weaker
            .rolled_back
            .get(&w.key)
            .is_some_and(|times| times.iter().any(|&t| t >= x.invoked));
        if undone || weaker.intersection_void(value, read_ended) {
            report.excused += 1;
            continue;
        }
        report.writes_that_must_be_gone += 1;
        if final_values.contains(value) {
            let violation = Violation {
                key: w.key.clone(),
                value: Some(value.clone()),
                detail: format!(
                    "final read returned {value} (op{}, acknowledged at {}ms), which op{} ({} at {}, acknowledged) superseded",
                    w.id,
                    acked_at,
                    x.id,
                    x.kind.as_str(),
                    x.level
                ),
            };
            if x.kind == OpKind::Delete {
                report.resurrected.push(violation);
            } else {
                report.stale.push(violation);
            }
        }
    }
    check_lww_keys(history, replicas, weaker, &mut report);
    report
}

/// True for a key of the causal bucket (the rules above); the others are LWW keys.
fn is_causal(key: &str) -> bool {
    crate::bucket_of(key) == crate::BUCKET
}

/// The rules for keys of the LWW bucket, where a write supersedes exactly the versions with
/// a smaller stamp (HLC timestamp, then node, then value: [`lww_order`]). Every successful
/// answer records the version it showed ([`Op::lww`]), so the rules compare stamps:
///
/// - **lost**: an acknowledged put whose stamp is above the final read's version: nothing
///   with a larger stamp superseded it, yet it is gone. When the final read finds nothing
///   (a reaped tombstone leaves no stamp), only a delete that may have taken effect with an
///   unknown or larger stamp excuses it.
/// - **missed**: a read at `r`, invoked after a write was acknowledged at `w` with
///   `required(w) + required(r) > n`, that showed a version below the write's stamp (or
///   nothing, with no delete to excuse it as above). Nothing after an acknowledged delete
///   is that delete's own effect: its tombstone may have been reaped once every replica
///   held it (SPEC: tombstones are reaped only then), and a reaped tombstone reads as an
///   absent key, which is what the delete promised.
/// - **resurrected**: the final read returns a live value below an acknowledged delete.
///
/// Under clock skew a write acknowledged later may carry a smaller stamp and lose: that is
/// LWW, not a loss, and these rules agree (it is superseded by a larger stamp).
fn check_lww_keys(
    history: &History,
    replicas: usize,
    weaker: &WeakerPromises,
    report: &mut CheckReport,
) {
    let below = |version: &Option<Sibling>, stamp: &Sibling| match version {
        Some(v) => lww_order(v, stamp) == Ordering::Less,
        None => true,
    };
    let mut finals: BTreeMap<&str, &Op> = BTreeMap::new();
    for op in history
        .ops
        .iter()
        .filter(|op| op.is_final && !is_causal(&op.key))
    {
        if op.outcome.is_ok() {
            finals.insert(op.key.as_str(), op);
        }
    }
    // A delete that may have taken effect and whose tombstone, reaped, would leave nothing
    // that outranks `stamp` by the time `by`.
    let reaped_delete_could_outrank = |key: &str, stamp: &Sibling, by: Millis| {
        history.for_key(key).any(|d| {
            d.kind == OpKind::Delete
                && !d.is_final
                && d.outcome.may_have_effect()
                && d.invoked <= by
                && d.lww
                    .as_ref()
                    .is_none_or(|t| lww_order(t, stamp) == Ordering::Greater)
        })
    };
    let acked_writes = history
        .ops
        .iter()
        .filter(|o| o.kind.is_write() && !o.is_final && o.outcome.is_ok() && !is_causal(&o.key));
    for w in acked_writes {
        let Some(stamp) = &w.lww else { continue };
        let acked_at = w.completed.unwrap_or(u64::MAX);
        let need_w = required(w.level, replicas);
        let excused = match &w.value {
            Some(value) => weaker.gone_by_crash.contains(value),
            None => weaker.rolled_back.contains_key(&w.key),
        };
        if let Some(last) = finals.get(w.key.as_str()) {
            let shown = &last.lww;
            let empty_excused =
                shown.is_none() && reaped_delete_could_outrank(&w.key, stamp, u64::MAX);
            if excused {
                report.excused += 1;
            } else if w.kind == OpKind::Put {
                report.writes_that_must_survive += 1;
                if below(shown, stamp) && !empty_excused {
                    report.lost.push(Violation {
                        key: w.key.clone(),
                        value: w.value.clone(),
                        detail: format!(
                            "op{} put {} at {} was acknowledged at {acked_at}ms; the final read \
                             showed {} (a smaller stamp) instead",
                            w.id,
                            w.value.as_deref().unwrap_or_default(),
                            w.level,
                            describe_version(shown)
                        ),
                    });
                }
            } else if let Some(Sibling {
                value: value @ Value::Data { .. },
                ..
            }) = shown
            {
                if below(shown, stamp) {
                    report.resurrected.push(Violation {
                        key: w.key.clone(),
                        value: crate::workload::value_text(value),
                        detail: format!(
                            "final read returned {}, below op{}'s delete at {} \
                             (acknowledged at {acked_at}ms)",
                            describe_version(shown),
                            w.id,
                            w.level
                        ),
                    });
                }
            }
        }
        for r in history.for_key(&w.key) {
            if r.kind != OpKind::Get
                || r.is_final
                || !r.outcome.is_ok()
                || r.invoked <= acked_at
                || need_w + required(r.level, replicas) <= replicas
                || !below(&r.lww, stamp)
            {
                continue;
            }
            let read_ended = r.completed.unwrap_or(u64::MAX);
            if r.lww.is_none()
                && (w.kind == OpKind::Delete
                    || reaped_delete_could_outrank(&w.key, stamp, read_ended))
            {
                continue;
            }
            let void = match &w.value {
                Some(value) => weaker.intersection_void(value, read_ended),
                None => weaker.rolled_back.contains_key(&w.key) || !weaker.hinted.is_empty(),
            };
            if void {
                report.excused += 1;
                continue;
            }
            report.missed.push(Violation {
                key: w.key.clone(),
                value: w.value.clone(),
                detail: format!(
                    "op{} get at {} (invoked {}ms) showed {}, below op{}'s {} {}at {} \
                     acknowledged at {acked_at}ms",
                    r.id,
                    r.level,
                    r.invoked,
                    describe_version(&r.lww),
                    w.id,
                    w.kind.as_str(),
                    w.value
                        .as_deref()
                        .map(|v| format!("{v} "))
                        .unwrap_or_default(),
                    w.level
                ),
            });
            break; // one missed read per write is enough to report
        }
    }
}

/// An LWW version in a few words: its value (or tombstone) and stamp.
fn describe_version(version: &Option<Sibling>) -> String {
    match version {
        None => "nothing".into(),
        Some(s) => format!(
            "{} (stamp {}/{:x})",
            crate::workload::value_text(&s.value).unwrap_or_else(|| "tombstone".into()),
            s.dot.counter,
            s.dot.actor.node_hash
        ),
    }
}
