//! Which range (or range-and-peer pair) to repair next.
//!
//! Order (issue 18's urgency): targets whose tombstones wait to be reaped and lack only this
//! exchange (tombstones near their reap deadline hold disk and every read of them), then
//! targets marked because hints for them were dropped or expired (data is known to be
//! missing), then targets whose replica published a Merkle root (on gossip) that differs from
//! this node's for a range both have left quiet (a divergence is proven, not suspected), then
//! targets whose replica just came back up (it missed writes while down), then
//! the target that has gone longest without a successful sync (never synced first), but only
//! once `interval_ms` has passed since its last success. Ties go to the earliest mark, then to
//! the target's order, so the queue is deterministic. A failed attempt keeps its marks and
//! waits a backoff (doubling up to a ceiling) before it is eligible again.
//!
//! The queue holds one entry per target the node repairs (bounded by ranges x peers), and
//! `next` scans them: a few hundred entries, a few times a second.

use crate::Millis;
use std::collections::BTreeMap;

/// Why a target is due, in priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RepairReason {
    /// Tombstones of the range are old enough to reap and wait for a converged exchange
    /// with this peer.
    ReapWaiting,
    /// Hints for it were dropped or expired.
    HintsLost,
    /// The peer's quiet Merkle root of the range, published on gossip, differs from this
    /// node's quiet root (`node/anti_entropy.rs`, "roots on gossip").
    RootsDiffer,
    /// A replica came back up.
    ReplicaRecovered,
    /// Periodic: longest since the last successful sync.
    Scheduled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairQueueConfig {
    /// A target is scheduled again this long after its last successful sync
    /// (`[anti_entropy] interval_s`).
    pub interval_ms: Millis,
    /// Wait after a first failure; doubles on each further failure...
    pub retry_backoff_ms: Millis,
    /// ...up to this.
    pub max_retry_backoff_ms: Millis,
}

impl Default for RepairQueueConfig {
    fn default() -> Self {
        RepairQueueConfig {
            interval_ms: 300_000,
            retry_backoff_ms: 1_000,
            max_retry_backoff_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    last_success: Option<Millis>,
    reap_waiting_at: Option<Millis>,
    hints_lost_at: Option<Millis>,
    roots_differ_at: Option<Millis>,
    recovered_at: Option<Millis>,
    /// When the attempt in flight started (marks made after it survive its success).
    started_at: Option<Millis>,
    failures: u32,
    retry_at: Millis,
}

impl Entry {
    /// The entry's priority if it may run now: lower sorts first.
    fn priority(&self, now: Millis, interval_ms: Millis) -> Option<(RepairReason, Millis)> {
        if self.started_at.is_some() || now < self.retry_at {
            return None;
        }
        if let Some(at) = self.reap_waiting_at {
            return Some((RepairReason::ReapWaiting, at));
        }
        if let Some(at) = self.hints_lost_at {
            return Some((RepairReason::HintsLost, at));
        }
        if let Some(at) = self.roots_differ_at {
            return Some((RepairReason::RootsDiffer, at));
        }
        if let Some(at) = self.recovered_at {
            return Some((RepairReason::ReplicaRecovered, at));
        }
        match self.last_success {
            None => Some((RepairReason::Scheduled, 0)),
            Some(at) if now.saturating_sub(at) >= interval_ms => {
                Some((RepairReason::Scheduled, at))
            }
            Some(_) => None,
        }
    }

    /// When the entry becomes eligible (ignoring `started_at`).
    fn eligible_at(&self, interval_ms: Millis) -> Millis {
        let marked = self.reap_waiting_at.is_some()
            || self.hints_lost_at.is_some()
            || self.roots_differ_at.is_some()
            || self.recovered_at.is_some();
        let due = if marked {
            0
        } else {
            self.last_success
                .map_or(0, |at| at.saturating_add(interval_ms))
        };
        due.max(self.retry_at)
    }
}

#[derive(Debug, Clone)]
pub struct RepairQueue<T: Ord + Clone> {
    config: RepairQueueConfig,
    entries: BTreeMap<T, Entry>,
}

impl<T: Ord + Clone> RepairQueue<T> {
    pub fn new(config: RepairQueueConfig) -> Self {
        RepairQueue {
            config,
            entries: BTreeMap::new(),
        }
    }

    /// Sets the targets (after a ring change): known ones keep their state, new ones start
    /// never synced, gone ones are forgotten.
    pub fn set_targets(&mut self, targets: impl IntoIterator<Item = T>) {
        let mut old = std::mem::take(&mut self.entries);
        for target in targets {
            let entry = old.remove(&target).unwrap_or_default();
            self.entries.insert(target, entry);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Hints for `target` were dropped or expired. False when the target is unknown.
    pub fn mark_hints_lost(&mut self, target: &T, now: Millis) -> bool {
        self.entries
            .get_mut(target)
            .map(|e| {
                e.hints_lost_at.get_or_insert(now);
            })
            .is_some()
    }

    /// A replica of `target` came back up. False when the target is unknown.
    pub fn mark_replica_recovered(&mut self, target: &T, now: Millis) -> bool {
        self.entries
            .get_mut(target)
            .map(|e| {
                e.recovered_at.get_or_insert(now);
            })
            .is_some()
    }

    /// Marks every target `matches` selects (say, every range of a peer that came back);
    /// returns how many.
    pub fn mark_matching(
        &mut self,
        reason: RepairReason,
        now: Millis,
        matches: impl Fn(&T) -> bool,
    ) -> usize {
        let mut marked = 0;
        for (_, entry) in self.entries.iter_mut().filter(|(t, _)| matches(t)) {
            match reason {
                RepairReason::ReapWaiting => {
                    entry.reap_waiting_at.get_or_insert(now);
                }
                RepairReason::HintsLost => {
                    entry.hints_lost_at.get_or_insert(now);
                }
                RepairReason::RootsDiffer => {
                    entry.roots_differ_at.get_or_insert(now);
                }
                RepairReason::ReplicaRecovered => {
                    entry.recovered_at.get_or_insert(now);
                }
                // A scheduled sync is due by itself; marking makes it due now.
                RepairReason::Scheduled => entry.last_success = None,
            }
            marked += 1;
        }
        marked
    }

    /// The next target to repair, without taking it.
    pub fn peek(&self, now: Millis) -> Option<(&T, RepairReason)> {
        self.entries
            .iter()
            .filter_map(|(t, e)| e.priority(now, self.config.interval_ms).map(|p| (p, t)))
            .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)))
            .map(|((reason, _), t)| (t, reason))
    }

    /// Takes the next target to repair; it stays out of the queue until `complete`.
    pub fn next(&mut self, now: Millis) -> Option<(T, RepairReason)> {
        let (target, reason) = self.peek(now).map(|(t, r)| (t.clone(), r))?;
        if let Some(entry) = self.entries.get_mut(&target) {
            entry.started_at = Some(now);
        }
        Some((target, reason))
    }

    /// The attempt on `target` ended. On success its marks made before the attempt are
    /// cleared and its sync time recorded; on failure it waits a backoff.
    pub fn complete(&mut self, target: &T, now: Millis, success: bool) {
        let config = &self.config;
        let Some(entry) = self.entries.get_mut(target) else {
            return;
        };
        let started = entry.started_at.take().unwrap_or(now);
        if success {
            entry.last_success = Some(now);
            entry.reap_waiting_at = entry.reap_waiting_at.filter(|&at| at > started);
            entry.hints_lost_at = entry.hints_lost_at.filter(|&at| at > started);
            entry.roots_differ_at = entry.roots_differ_at.filter(|&at| at > started);
            entry.recovered_at = entry.recovered_at.filter(|&at| at > started);
            entry.failures = 0;
            entry.retry_at = 0;
        } else {
            entry.failures = entry.failures.saturating_add(1);
            let shift = (entry.failures - 1).min(32);
            let backoff = config
                .retry_backoff_ms
                .saturating_mul(1u64 << shift)
                .min(config.max_retry_backoff_ms);
            entry.retry_at = now.saturating_add(backoff);
        }
    }

    /// The earliest time some target becomes eligible (for the node's timer); `None` when
    /// every target is in flight.
    pub fn next_due_at(&self) -> Option<Millis> {
        self.entries
            .values()
            .filter(|e| e.started_at.is_none())
            .map(|e| e.eligible_at(self.config.interval_ms))
            .min()
    }

    /// Targets taken by `next` and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.started_at.is_some())
            .count()
    }

    /// Time of the last successful sync of a target.
    pub fn last_success(&self, target: &T) -> Option<Millis> {
        self.entries.get(target).and_then(|e| e.last_success)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(targets: &[u32]) -> RepairQueue<u32> {
        let mut q = RepairQueue::new(RepairQueueConfig {
            interval_ms: 1000,
            retry_backoff_ms: 100,
            max_retry_backoff_ms: 400,
        });
        q.set_targets(targets.iter().copied());
        q
    }

    #[derive(Debug)]
    enum Op {
        MarkHints(u32),
        MarkRecovered(u32),
        MarkReap(u32),
        MarkRootsDiffer(u32),
        Next(Option<(u32, RepairReason)>),
        Done(u32, bool),
    }

    /// Table: the order the queue hands out targets, at each time, after marks and outcomes.
    #[test]
    fn order_follows_the_priorities() {
        use Op::*;
        use RepairReason::*;
        let cases: Vec<(&str, Vec<(Millis, Op)>)> = vec![
            (
                "never synced targets go in target order, then nothing until the interval",
                vec![
                    (0, Next(Some((1, Scheduled)))),
                    (0, Done(1, true)),
                    (0, Next(Some((2, Scheduled)))),
                    (5, Done(2, true)),
                    (6, Next(Some((3, Scheduled)))),
                    (7, Done(3, true)),
                    (10, Next(None)),
                    (1000, Next(Some((1, Scheduled)))),
                    (1000, Next(None)),
                    (1005, Next(Some((2, Scheduled)))),
                    (1006, Next(None)),
                    (1007, Next(Some((3, Scheduled)))),
                ],
            ),
            (
                "hint loss beats recovery beats schedule",
                vec![
                    (0, MarkRecovered(2)),
                    (1, MarkHints(3)),
                    (2, Next(Some((3, HintsLost)))),
                    (2, Next(Some((2, ReplicaRecovered)))),
                    (2, Next(Some((1, Scheduled)))),
                ],
            ),
            (
                "tombstones waiting to be reaped beat hint loss",
                vec![
                    (0, MarkHints(3)),
                    (1, MarkReap(2)),
                    (2, Next(Some((2, ReapWaiting)))),
                    (2, Next(Some((3, HintsLost)))),
                    (2, Next(Some((1, Scheduled)))),
                ],
            ),
            (
                "roots that differ come after hint loss and before recovery, at once",
                vec![
                    (0, Next(Some((1, Scheduled)))),
                    (0, Done(1, true)),
                    (0, Next(Some((2, Scheduled)))),
                    (0, Done(2, true)),
                    (0, Next(Some((3, Scheduled)))),
                    (0, Done(3, true)),
                    (10, MarkRecovered(1)),
                    (11, MarkRootsDiffer(2)),
                    (12, MarkHints(3)),
                    (13, Next(Some((3, HintsLost)))),
                    (13, Next(Some((2, RootsDiffer)))),
                    (13, Done(2, true)),
                    (14, Next(Some((1, ReplicaRecovered)))),
                    (14, Next(None)),
                ],
            ),
            (
                "earliest mark first within a class",
                vec![
                    (0, MarkHints(3)),
                    (1, MarkHints(1)),
                    (2, Next(Some((3, HintsLost)))),
                    (2, Next(Some((1, HintsLost)))),
                ],
            ),
            (
                "failure backs off (100, 200, 400, 400 ms) and keeps the mark",
                vec![
                    (0, MarkHints(2)),
                    (0, Next(Some((2, HintsLost)))),
                    (0, Done(2, false)),
                    (50, Next(Some((1, Scheduled)))),
                    (99, Next(Some((3, Scheduled)))),
                    (100, Next(Some((2, HintsLost)))),
                    (100, Done(2, false)),
                    (299, Next(None)),
                    (300, Next(Some((2, HintsLost)))),
                    (300, Done(2, false)),
                    (700, Next(Some((2, HintsLost)))),
                    (700, Done(2, false)),
                    (1100, Next(Some((2, HintsLost)))),
                    (1100, Done(2, true)),
                    (1100, Next(None)),
                ],
            ),
            (
                "a mark made during an attempt survives its success",
                vec![
                    (0, Next(Some((1, Scheduled)))),
                    (5, MarkHints(1)),
                    (10, Done(1, true)),
                    (11, Next(Some((1, HintsLost)))),
                ],
            ),
            (
                "the longest since the last success goes first",
                vec![
                    (0, Next(Some((1, Scheduled)))),
                    (0, Next(Some((2, Scheduled)))),
                    (0, Next(Some((3, Scheduled)))),
                    (30, Done(3, true)),
                    (20, Done(2, true)),
                    (40, Done(1, true)),
                    (2000, Next(Some((2, Scheduled)))),
                    (2000, Next(Some((3, Scheduled)))),
                    (2000, Next(Some((1, Scheduled)))),
                ],
            ),
        ];
        for (name, ops) in cases {
            let mut q = queue(&[1, 2, 3]);
            for (i, (now, op)) in ops.into_iter().enumerate() {
                match op {
                    MarkHints(t) => assert!(q.mark_hints_lost(&t, now)),
                    MarkRecovered(t) => assert!(q.mark_replica_recovered(&t, now)),
                    MarkReap(t) => {
                        assert_eq!(q.mark_matching(ReapWaiting, now, |x| *x == t), 1)
                    }
                    MarkRootsDiffer(t) => {
                        assert_eq!(q.mark_matching(RootsDiffer, now, |x| *x == t), 1)
                    }
                    Next(want) => assert_eq!(q.next(now), want, "{name}: step {i} at {now}"),
                    Done(t, ok) => q.complete(&t, now, ok),
                }
            }
        }
    }

    /// Marking by predicate: a peer back up marks all its (range, peer) targets.
    #[test]
    fn mark_matching_marks_a_peers_targets() {
        let mut q: RepairQueue<(u32, char)> = RepairQueue::new(RepairQueueConfig::default());
        q.set_targets([(1, 'a'), (1, 'b'), (2, 'a'), (2, 'b')]);
        for t in [(1, 'a'), (1, 'b'), (2, 'a'), (2, 'b')] {
            assert_eq!(q.next(0).map(|(t, _)| t), Some(t));
            q.complete(&t, 0, true);
        }
        assert_eq!(q.next(10), None);
        assert_eq!(
            q.mark_matching(RepairReason::ReplicaRecovered, 10, |t| t.1 == 'b'),
            2
        );
        assert_eq!(
            q.mark_matching(RepairReason::HintsLost, 11, |t| *t == (2, 'a')),
            1
        );
        assert_eq!(q.next(12), Some(((2, 'a'), RepairReason::HintsLost)));
        assert_eq!(q.next(12), Some(((1, 'b'), RepairReason::ReplicaRecovered)));
        assert_eq!(q.next(12), Some(((2, 'b'), RepairReason::ReplicaRecovered)));
        assert_eq!(q.next(12), None);
        assert_eq!(
            q.mark_matching(RepairReason::Scheduled, 13, |t| t.0 == 1),
            2
        );
        assert_eq!(q.next(13), Some(((1, 'a'), RepairReason::Scheduled)));
    }

    /// Ring changes keep the state of targets that stay and forget the others.
    #[test]
    fn set_targets_keeps_known_state() {
        let mut q = queue(&[1, 2]);
        assert_eq!(q.next(0), Some((1, RepairReason::Scheduled)));
        q.complete(&1, 10, true);
        q.set_targets([1, 3]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.last_success(&1), Some(10));
        assert!(!q.mark_hints_lost(&2, 11));
        assert_eq!(q.next(11), Some((3, RepairReason::Scheduled)));
        assert_eq!(q.next_due_at(), Some(1010));
        assert_eq!(q.in_flight(), 1);
    }
}
