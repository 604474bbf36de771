//! The checker: a recorded history and the final state in, a verdict out. Pure (no IO, no
//! clock), so every rule has a unit test that feeds it a history breaking that rule.
//!
//! Jepsen's model: every operation has an invoke and a complete time and ends `Ok`
//! (acknowledged), `Failed` (certainly not applied: the node refused it as bad input) or
//! `Unknown` (timeouts, 503s, broken connections: it may or may not have been applied, now or
//! later through hints and anti-entropy). Only `Ok` creates obligations; only `Failed` is
//! allowed to be absent from what the store may return.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Microseconds since the run started (monotonic clock).
pub type Micros = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A unique key written once, at `w=quorum`.
    Write { key: String, value: String },
    /// The delete of a unique key after its write was acknowledged (with the write's context).
    Delete { key: String },
    /// A read at `r=quorum`: the live values it returned (empty: not found), or `None` when
    /// the read failed and says nothing.
    Read {
        key: String,
        observed: Option<Vec<String>>,
    },
    /// The write of a read-modify-write client: `value` written with the context of a read
    /// that returned `observed`, so it supersedes exactly those values.
    RmwWrite {
        key: String,
        value: String,
        observed: Vec<String>,
    },
}

impl Action {
    pub fn key(&self) -> &str {
        match self {
            Action::Write { key, .. }
            | Action::Delete { key }
            | Action::Read { key, .. }
            | Action::RmwWrite { key, .. } => key,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub client: u32,
    /// The node (0-based index: `n{node+1}`) the client sent it to, its coordinator.
    pub node: usize,
    pub action: Action,
    pub invoke_us: Micros,
    pub complete_us: Micros,
    pub outcome: Outcome,
}

/// A `w=quorum` write sent to a node cut off from every other node while it was cut off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MinorityProbe {
    pub node: String,
    /// `Ok` here is a violation: one node alone is never a quorum.
    pub outcome: Outcome,
    /// How long the node took to answer; `None` when it did not answer before the client
    /// gave up.
    pub answered_ms: Option<u64>,
}

/// One sibling as `/admin/local` shows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredSibling {
    pub value: String,
    pub tombstone: bool,
}

/// One node's own copy of a key (`GET /admin/local`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCopy {
    pub node: String,
    pub siblings: Vec<StoredSibling>,
    pub context: String,
}

impl StoredCopy {
    fn live_values(&self) -> impl Iterator<Item = &str> {
        self.siblings
            .iter()
            .filter(|s| !s.tombstone)
            .map(|s| s.value.as_str())
    }

    /// What replicas must agree on: the versions (the context is a MAC of the causal
    /// metadata, equal exactly when the versions are) and the sibling values.
    fn fingerprint(&self) -> (Vec<StoredSibling>, &str) {
        let mut siblings = self.siblings.clone();
        siblings.sort();
        (siblings, &self.context)
    }
}

/// What the end of a run found for one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FinalKey {
    /// The `r=all` read: live values (empty: not found), `None` when it failed.
    pub read_all: Option<Vec<String>>,
    /// The coordinator of the `r=all` read that answered (for violation lines).
    pub read_all_through: Option<String>,
    /// Every node's own copy (nodes that hold nothing are absent).
    pub copies: Vec<StoredCopy>,
}

impl FinalKey {
    /// The nodes whose copy holds `value` live.
    fn holders(&self, value: &str) -> Vec<&str> {
        self.copies
            .iter()
            .filter(|c| c.live_values().any(|v| v == value))
            .map(|c| c.node.as_str())
            .collect()
    }

    /// Each node's copy in one word per sibling (`n2=[v,tomb]`), for violation lines.
    fn describe_copies(&self) -> String {
        let copies: Vec<String> = self
            .copies
            .iter()
            .map(|c| {
                let siblings: Vec<&str> = c
                    .siblings
                    .iter()
                    .map(|s| if s.tombstone { "tombstone" } else { "live" })
                    .collect();
                format!("{}=[{}]", c.node, siblings.join(","))
            })
            .collect();
        if copies.is_empty() {
            "none".to_string()
        } else {
            copies.join(" ")
        }
    }

    /// The values the store holds at the end: the `r=all` read, and whatever any replica
    /// still holds (so a value is "lost" only when neither has it).
    fn live_values(&self) -> BTreeSet<&str> {
        let mut values: BTreeSet<&str> = self.copies.iter().flat_map(|c| c.live_values()).collect();
        if let Some(read) = &self.read_all {
            values.extend(read.iter().map(String::as_str));
        }
        values
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FinalState {
    pub keys: BTreeMap<String, FinalKey>,
    /// How many nodes must hold each key once converged: min(replication factor, nodes).
    pub replicas_per_key: usize,
    /// A cluster change happened: nodes that lost a range may keep a copy of its keys (a
    /// restart between the change and the cleanup scan leaves it, by design), so a key is
    /// converged when at least `replicas_per_key` copies agree, whatever extra copies say.
    pub leftovers_allowed: bool,
}

impl FinalState {
    pub fn converged(&self, copies: &[StoredCopy]) -> bool {
        is_converged(copies, self.replicas_per_key, self.leftovers_allowed)
    }

    /// The live values the store keeps for `key` at the end: the `r=all` read and the
    /// copies of its replicas. After a cluster change, copies outside the agreeing group of
    /// at least RF are leftovers on nodes that no longer own the key (see
    /// [`FinalState::leftovers_allowed`]); no read reaches them, so they are not kept values.
    fn kept(&self, key: &str) -> BTreeSet<&str> {
        let Some(found) = self.keys.get(key) else {
            return BTreeSet::new();
        };
        let mut groups: BTreeMap<_, Vec<&StoredCopy>> = BTreeMap::new();
        for copy in &found.copies {
            groups.entry(copy.fingerprint()).or_default().push(copy);
        }
        let owners: Vec<&StoredCopy> = match groups.into_values().max_by_key(Vec::len) {
            Some(group)
                if self.leftovers_allowed
                    && found.copies.len() > self.replicas_per_key
                    && group.len() >= self.replicas_per_key =>
            {
                group
            }
            _ => found.copies.iter().collect(),
        };
        let mut values: BTreeSet<&str> = owners.iter().flat_map(|c| c.live_values()).collect();
        if let Some(read) = &found.read_all {
            values.extend(read.iter().map(String::as_str));
        }
        values
    }
}

/// Whether the copies of one key agree and are on as many nodes as they must be (see
/// [`FinalState::leftovers_allowed`] for what extra copies may do). Used by the settle loop
/// as well as by the verdict.
pub fn is_converged(
    copies: &[StoredCopy],
    replicas_per_key: usize,
    leftovers_allowed: bool,
) -> bool {
    if copies.is_empty() {
        return true;
    }
    if copies.len() < replicas_per_key || (copies.len() > replicas_per_key && !leftovers_allowed) {
        return false;
    }
    let mut agreeing: BTreeMap<_, usize> = BTreeMap::new();
    for copy in copies {
        *agreeing.entry(copy.fingerprint()).or_default() += 1;
    }
    let most = agreeing.values().copied().max().unwrap_or(0);
    if copies.len() == replicas_per_key {
        most == copies.len()
    } else {
        most >= replicas_per_key
    }
}

/// Violations, each described in one line (key, value, times) so a reader can find it in the
/// logs. Every list must be empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Acknowledged, not superseded, and missing at the end.
    pub lost: Vec<String>,
    /// A quorum read invoked after an acknowledgement completed that did not return it.
    pub missed: Vec<String>,
    /// A value that was never written (or was refused) came back.
    pub unexpected: Vec<String>,
    /// A key whose delete was acknowledged came back.
    pub resurrected: Vec<String>,
    /// Replicas that still disagree (or are missing) after the settle time.
    pub divergent: Vec<String>,
    /// A node cut off alone acknowledged a `w=quorum` write.
    pub minority_acked: Vec<String>,
    /// A node cut off alone did not answer at all before the client gave up.
    pub minority_unanswered: Vec<String>,
    /// Not a violation: a deleted key whose value is still live on a copy outside the
    /// agreeing owners (a node that lost the range before it got the tombstone, and whose
    /// cleanup has not run yet). No read reaches it; counted to see how often it happens.
    pub deleted_leftovers: Vec<String>,
}

impl Verdict {
    pub fn violations(&self) -> usize {
        self.lost.len()
            + self.missed.len()
            + self.unexpected.len()
            + self.resurrected.len()
            + self.divergent.len()
            + self.minority_acked.len()
            + self.minority_unanswered.len()
    }

    /// Every violation, named by its rule.
    pub fn lines(&self) -> Vec<String> {
        let rules: [(&str, &Vec<String>); 7] = [
            ("lost", &self.lost),
            ("missed", &self.missed),
            ("unexpected", &self.unexpected),
            ("resurrected", &self.resurrected),
            ("divergent", &self.divergent),
            ("minority-acked", &self.minority_acked),
            ("minority-unanswered", &self.minority_unanswered),
        ];
        rules
            .iter()
            .flat_map(|(rule, list)| list.iter().map(move |line| format!("{rule}: {line}")))
            .collect()
    }
}

/// The successful reads of `key` with what they returned.
fn reads_of<'a>(
    history: &'a [Op],
    key: &'a str,
) -> impl Iterator<Item = (&'a Op, &'a Vec<String>)> {
    history.iter().filter_map(move |op| match &op.action {
        Action::Read {
            key: read_key,
            observed: Some(values),
        } if read_key == key && op.outcome == Outcome::Ok => Some((op, values)),
        _ => None,
    })
}

/// The unique-key writes and deletes of one key.
#[derive(Default)]
struct UniqueKey<'a> {
    write: Option<&'a Op>,
    deletes: Vec<&'a Op>,
}

/// The read-modify-write values of the history: what each write's context superseded.
struct Supersession<'a> {
    observed: HashMap<&'a str, &'a [String]>,
}

impl<'a> Supersession<'a> {
    fn new(history: &'a [Op]) -> Self {
        let observed = history
            .iter()
            .filter(|op| op.outcome != Outcome::Failed)
            .filter_map(|op| match &op.action {
                Action::RmwWrite {
                    value, observed, ..
                } => Some((value.as_str(), observed.as_slice())),
                _ => None,
            })
            .collect();
        Supersession { observed }
    }

    /// Whether `target` is among `present` or superseded, directly or through a chain of
    /// contexts, by one of them (then its absence is allowed: a later write saw it).
    fn accounted_for<'b>(&self, target: &str, present: impl IntoIterator<Item = &'b str>) -> bool
    where
        'a: 'b,
    {
        self.accounted(present).contains(target)
    }

    /// Everything `present` accounts for: those values and every value their chains of
    /// contexts superseded. Computed once per read, then asked for each acknowledged write
    /// (asking write by write walked the chains again each time: minutes per run in a debug
    /// build once chains are thousands long).
    fn accounted<'b>(&self, present: impl IntoIterator<Item = &'b str>) -> HashSet<&'b str>
    where
        'a: 'b,
    {
        let mut stack: Vec<&'b str> = present.into_iter().collect();
        let mut seen: HashSet<&'b str> = HashSet::new();
        while let Some(value) = stack.pop() {
            if !seen.insert(value) {
                continue;
            }
            if let Some(observed) = self.observed.get(value) {
                stack.extend(observed.iter().map(String::as_str));
            }
        }
        seen
    }
}

/// Judges a run: `history` (every client operation), `probes` (writes to an isolated node)
/// and `final_state` (after the heal and the settle time).
pub fn check(history: &[Op], probes: &[MinorityProbe], final_state: &FinalState) -> Verdict {
    let mut verdict = Verdict::default();

    // Which values may legitimately appear under which key: anything written that was not
    // certainly refused.
    let mut written: HashMap<&str, &str> = HashMap::new();
    let mut unique: BTreeMap<&str, UniqueKey> = BTreeMap::new();
    let mut rmw_acked: Vec<&Op> = Vec::new();
    for op in history {
        match &op.action {
            Action::Write { key, value } => {
                if op.outcome != Outcome::Failed {
                    written.insert(value, key);
                }
                unique.entry(key).or_default().write = Some(op);
            }
            Action::Delete { key } => unique.entry(key).or_default().deletes.push(op),
            Action::RmwWrite { key, value, .. } => {
                if op.outcome != Outcome::Failed {
                    written.insert(value, key);
                }
                if op.outcome == Outcome::Ok {
                    rmw_acked.push(op);
                }
            }
            Action::Read { .. } => {}
        }
    }
    let supersession = Supersession::new(history);
    let empty = FinalKey::default();
    let final_of = |key: &str| final_state.keys.get(key).unwrap_or(&empty);

    // Unexpected: anything read, or held at the end, that was never written under that key.
    let mut report_unexpected = |key: &str, value: &str, place: &str| {
        if written.get(value) != Some(&key) {
            verdict
                .unexpected
                .push(format!("key {key} returned {value:?} ({place})"));
        }
    };
    for op in history {
        if let Action::Read {
            key,
            observed: Some(values),
        } = &op.action
        {
            for value in values {
                report_unexpected(key, value, &format!("read at {} us", op.invoke_us));
            }
        }
    }
    for (key, found) in &final_state.keys {
        for value in found.live_values() {
            report_unexpected(key, value, "at the end");
        }
    }

    // Unique keys: an acknowledged write is read by every later quorum read and held at the
    // end, unless a delete may have removed it; an acknowledged delete is final.
    for (key, record) in &unique {
        let Some(write) = record.write.filter(|w| w.outcome == Outcome::Ok) else {
            continue;
        };
        let Action::Write { value, .. } = &write.action else {
            continue;
        };
        let acked_delete = record
            .deletes
            .iter()
            .filter(|d| d.outcome == Outcome::Ok)
            .map(|d| d.complete_us)
            .min();
        for (read, values) in reads_of(history, key) {
            let returned = values.contains(value);
            let delete_may_precede = record
                .deletes
                .iter()
                .any(|d| d.outcome != Outcome::Failed && d.invoke_us < read.complete_us);
            if read.invoke_us > write.complete_us && !returned && !delete_may_precede {
                verdict.missed.push(format!(
                    "key {key}: write acknowledged at {} us through n{}, read invoked at {} us through n{} returned {values:?}",
                    write.complete_us,
                    write.node + 1,
                    read.invoke_us,
                    read.node + 1
                ));
            }
            if let Some(deleted_us) = acked_delete {
                if read.invoke_us > deleted_us && returned {
                    verdict.resurrected.push(format!(
                        "key {key}: delete acknowledged at {deleted_us} us, read invoked at {} us returned {value:?}",
                        read.invoke_us
                    ));
                }
            }
        }
        let at_end = final_of(key).live_values();
        let may_be_deleted = record.deletes.iter().any(|d| d.outcome != Outcome::Failed);
        if !may_be_deleted && !at_end.contains(value.as_str()) {
            verdict.lost.push(format!(
                "key {key}: {value:?} acknowledged at {} us, at the end {at_end:?}",
                write.complete_us
            ));
        }
        if acked_delete.is_some()
            && at_end.contains(value.as_str())
            && !final_state.kept(key).contains(value.as_str())
        {
            verdict.deleted_leftovers.push(format!(
                "key {key}: deleted, live on {} outside the owners (copies {})",
                final_of(key).holders(value).join(","),
                final_of(key).describe_copies()
            ));
        }
        if acked_delete.is_some() && final_state.kept(key).contains(value.as_str()) {
            let deletes: Vec<String> = record
                .deletes
                .iter()
                .map(|d| {
                    format!(
                        "{:?} {}..{} us through n{}",
                        d.outcome,
                        d.invoke_us,
                        d.complete_us,
                        d.node + 1
                    )
                })
                .collect();
            verdict.resurrected.push(format!(
                "key {key}: written {}..{} us through n{}, deleted ({}), at the end {at_end:?} (held by {}; copies {}; r=all read {:?} through {})",
                write.invoke_us,
                write.complete_us,
                write.node + 1,
                deletes.join(", "),
                final_of(key).holders(value).join(","),
                final_of(key).describe_copies(),
                final_of(key).read_all,
                final_of(key).read_all_through.as_deref().unwrap_or("-")
            ));
        }
    }

    // Read-modify-write keys: siblings are allowed; what is not allowed is an acknowledged
    // value that is neither present nor superseded by a present value's chain of contexts.
    let mut rmw_by_key: BTreeMap<&str, Vec<(&str, &Op)>> = BTreeMap::new();
    for write in &rmw_acked {
        if let Action::RmwWrite { key, value, .. } = &write.action {
            rmw_by_key.entry(key).or_default().push((value, write));
        }
    }
    for (key, writes) in &rmw_by_key {
        for (read, values) in reads_of(history, key) {
            let accounted = supersession.accounted(values.iter().map(String::as_str));
            for &(value, write) in writes {
                if read.invoke_us > write.complete_us && !accounted.contains(value) {
                    verdict.missed.push(format!(
                        "key {key}: {value:?} acknowledged at {} us through n{}, read invoked at {} us through n{} returned {values:?}",
                        write.complete_us,
                        write.node + 1,
                        read.invoke_us,
                        read.node + 1
                    ));
                }
            }
        }
    }
    for write in rmw_acked {
        let Action::RmwWrite { key, value, .. } = &write.action else {
            continue;
        };
        let at_end = final_of(key).live_values();
        if !supersession.accounted_for(value, at_end.iter().copied()) {
            verdict.lost.push(format!(
                "key {key}: {value:?} acknowledged at {} us, neither present nor superseded at the end {at_end:?}",
                write.complete_us
            ));
        }
    }

    for (key, found) in &final_state.keys {
        if !final_state.converged(&found.copies) {
            let holders: Vec<String> = found
                .copies
                .iter()
                .map(|c| format!("{}={:?}", c.node, c.fingerprint().0))
                .collect();
            verdict.divergent.push(format!(
                "key {key}: {} of {} replicas hold it: {}",
                found.copies.len(),
                final_state.replicas_per_key,
                holders.join(" ")
            ));
        }
    }

    for probe in probes {
        if probe.outcome == Outcome::Ok {
            verdict.minority_acked.push(format!(
                "node {} acknowledged a w=quorum write while alone",
                probe.node
            ));
        }
        if probe.answered_ms.is_none() {
            verdict.minority_unanswered.push(format!(
                "node {} did not answer a w=quorum write while alone",
                probe.node
            ));
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(action: Action, invoke_us: Micros, complete_us: Micros, outcome: Outcome) -> Op {
        Op {
            node: 0,
            client: 0,
            action,
            invoke_us,
            complete_us,
            outcome,
        }
    }

    fn write(key: &str, value: &str, at: Micros, outcome: Outcome) -> Op {
        op(
            Action::Write {
                key: key.into(),
                value: value.into(),
            },
            at,
            at + 10,
            outcome,
        )
    }

    fn read(key: &str, values: &[&str], at: Micros) -> Op {
        op(
            Action::Read {
                key: key.into(),
                observed: Some(values.iter().map(|v| v.to_string()).collect()),
            },
            at,
            at + 10,
            Outcome::Ok,
        )
    }

    fn rmw(key: &str, value: &str, observed: &[&str], at: Micros, outcome: Outcome) -> Op {
        op(
            Action::RmwWrite {
                key: key.into(),
                value: value.into(),
                observed: observed.iter().map(|v| v.to_string()).collect(),
            },
            at,
            at + 10,
            outcome,
        )
    }

    fn copy(node: &str, values: &[&str], tombstone: bool) -> StoredCopy {
        StoredCopy {
            node: node.into(),
            siblings: values
                .iter()
                .map(|v| StoredSibling {
                    value: v.to_string(),
                    tombstone,
                })
                .collect(),
            context: format!("ctx-{values:?}-{tombstone}"),
        }
    }

    /// Three agreeing replicas holding `values` live, read back by `r=all`.
    fn held(values: &[&str]) -> FinalKey {
        FinalKey {
            read_all: Some(values.iter().map(|v| v.to_string()).collect()),
            copies: ["n1", "n2", "n3"]
                .iter()
                .map(|n| copy(n, values, false))
                .collect(),
            ..FinalKey::default()
        }
    }

    fn final_state(keys: Vec<(&str, FinalKey)>) -> FinalState {
        FinalState {
            keys: keys.into_iter().map(|(k, f)| (k.to_string(), f)).collect(),
            replicas_per_key: 3,
            leftovers_allowed: false,
        }
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        // Proves the rules do not fire on a history that keeps every promise.
        let history = vec![
            write("u1", "a", 0, Outcome::Ok),
            read("u1", &["a"], 20),
            write("u2", "b", 0, Outcome::Unknown),
            read("u2", &[], 30),
            rmw("r", "x", &[], 0, Outcome::Ok),
            rmw("r", "y", &["x"], 20, Outcome::Ok),
            read("r", &["y"], 40),
        ];
        let end = final_state(vec![
            ("u1", held(&["a"])),
            ("u2", held(&[])),
            ("r", held(&["y"])),
        ]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict, Verdict::default(), "{:?}", verdict.lines());
    }

    #[test]
    fn an_acknowledged_write_missing_at_the_end_is_lost() {
        // Proves the lost rule: acknowledged, never deleted, neither read nor held at the end.
        let history = vec![write("u1", "a", 0, Outcome::Ok)];
        let end = final_state(vec![(
            "u1",
            FinalKey {
                read_all: Some(vec![]),
                copies: vec![],
                ..FinalKey::default()
            },
        )]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict.lost.len(), 1, "{:?}", verdict.lines());
        assert_eq!(verdict.violations(), 1);
    }

    #[test]
    fn a_value_held_by_one_replica_is_not_lost_but_divergent() {
        // Proves lost looks at /admin/local too, and that a lone copy is a divergence.
        let history = vec![write("u1", "a", 0, Outcome::Ok)];
        let end = final_state(vec![(
            "u1",
            FinalKey {
                read_all: None,
                copies: vec![copy("n2", &["a"], false)],
                ..FinalKey::default()
            },
        )]);
        let verdict = check(&history, &[], &end);
        assert!(verdict.lost.is_empty(), "{:?}", verdict.lines());
        assert_eq!(verdict.divergent.len(), 1, "{:?}", verdict.lines());
    }

    #[test]
    fn a_quorum_read_after_the_acknowledgement_without_the_value_is_missed() {
        // Proves the missed rule, and that a read invoked before the ack is not held to it.
        let history = vec![
            write("u1", "a", 100, Outcome::Ok),
            read("u1", &[], 50),
            read("u1", &[], 200),
        ];
        let end = final_state(vec![("u1", held(&["a"]))]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict.missed.len(), 1, "{:?}", verdict.lines());
        assert!(verdict.missed[0].contains("read invoked at 200"));
    }

    #[test]
    fn an_unknown_delete_excuses_a_missing_value() {
        // Proves a delete that may have happened (timeout) is not held against the reads.
        let history = vec![
            write("u1", "a", 0, Outcome::Ok),
            op(
                Action::Delete { key: "u1".into() },
                50,
                60,
                Outcome::Unknown,
            ),
            read("u1", &[], 100),
        ];
        let end = final_state(vec![(
            "u1",
            FinalKey {
                read_all: Some(vec![]),
                copies: vec![],
                ..FinalKey::default()
            },
        )]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict, Verdict::default(), "{:?}", verdict.lines());
    }

    #[test]
    fn a_value_never_written_is_unexpected() {
        // Proves the unexpected rule for reads, for the end state and for refused writes.
        let history = vec![
            write("u1", "a", 0, Outcome::Ok),
            write("u2", "b", 0, Outcome::Failed),
            read("u1", &["a", "zzz"], 20),
        ];
        let end = final_state(vec![("u1", held(&["a"])), ("u2", held(&["b"]))]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict.unexpected.len(), 2, "{:?}", verdict.lines());
    }

    #[test]
    fn a_value_under_another_key_is_unexpected() {
        // Proves values are checked per key, not only globally.
        let history = vec![
            write("u1", "a", 0, Outcome::Ok),
            write("u2", "b", 0, Outcome::Ok),
            read("u2", &["b", "a"], 30),
        ];
        let end = final_state(vec![("u1", held(&["a"])), ("u2", held(&["b"]))]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict.unexpected.len(), 1, "{:?}", verdict.lines());
    }

    #[test]
    fn a_deleted_key_that_comes_back_is_resurrected() {
        // Proves the resurrected rule, in a later read and at the end.
        let history = vec![
            write("u1", "a", 0, Outcome::Ok),
            op(Action::Delete { key: "u1".into() }, 20, 30, Outcome::Ok),
            read("u1", &["a"], 40),
        ];
        let end = final_state(vec![("u1", held(&["a"]))]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict.resurrected.len(), 2, "{:?}", verdict.lines());
        assert!(verdict.lost.is_empty());
    }

    #[test]
    fn replicas_that_disagree_are_divergent() {
        // Proves the divergence rule: equal fingerprints on every replica, or a violation.
        let history = vec![write("u1", "a", 0, Outcome::Ok)];
        let mut found = held(&["a"]);
        found.copies[2].context = "older".into();
        let end = final_state(vec![("u1", found)]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict.divergent.len(), 1, "{:?}", verdict.lines());
    }

    #[test]
    fn after_a_cluster_change_extra_copies_are_leftovers_but_rf_must_agree() {
        // Proves the convergence rule of runs with joins or decommissions: a fourth, stale
        // copy on a node that lost the range is allowed, fewer than RF agreeing copies is
        // still divergent, and without a change the fourth copy is divergent.
        let history = vec![write("u1", "a", 0, Outcome::Ok)];
        let mut found = held(&["a"]);
        found.copies.push(copy("n4", &[], false));
        let mut end = final_state(vec![("u1", found.clone())]);
        assert_eq!(check(&history, &[], &end).divergent.len(), 1);
        end.leftovers_allowed = true;
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict, Verdict::default(), "{:?}", verdict.lines());
        found.copies[0].context = "older".into();
        let end = FinalState {
            leftovers_allowed: true,
            ..final_state(vec![("u1", found)])
        };
        assert_eq!(check(&history, &[], &end).divergent.len(), 1);
    }

    #[test]
    fn a_deleted_value_on_a_leftover_copy_is_not_resurrected_but_on_the_owners_it_is() {
        // Proves the end-of-run resurrection rule after a cluster change: RF agreeing
        // tombstones plus a stale copy on a fourth node (a leftover) pass; without a change,
        // or when the r=all read returns the value, the deleted value is resurrected.
        let history = vec![
            write("u1", "a", 0, Outcome::Ok),
            Op {
                action: Action::Delete { key: "u1".into() },
                ..op(
                    Action::Read {
                        key: "u1".into(),
                        observed: None,
                    },
                    20,
                    30,
                    Outcome::Ok,
                )
            },
        ];
        let mut found = FinalKey {
            read_all: Some(Vec::new()),
            copies: ["n1", "n2", "n3"]
                .iter()
                .map(|n| copy(n, &["a"], true))
                .collect(),
            ..FinalKey::default()
        };
        found.copies.push(copy("n4", &["a"], false));
        let mut end = final_state(vec![("u1", found.clone())]);
        end.leftovers_allowed = true;
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict.deleted_leftovers.len(), 1, "{verdict:?}");
        assert_eq!(verdict.violations(), 0, "{:?}", verdict.lines());
        end.leftovers_allowed = false;
        assert_eq!(check(&history, &[], &end).resurrected.len(), 1);
        found.read_all = Some(vec!["a".into()]);
        let end = FinalState {
            leftovers_allowed: true,
            ..final_state(vec![("u1", found)])
        };
        assert_eq!(check(&history, &[], &end).resurrected.len(), 1);
    }

    #[test]
    fn an_acknowledged_rmw_value_must_stay_unless_superseded() {
        // Proves the causal rule: "x" acknowledged, no write saw it, gone at the end: lost,
        // and a later read without it (or a successor) is missed.
        let history = vec![
            rmw("r", "x", &[], 0, Outcome::Ok),
            rmw("r", "y", &[], 5, Outcome::Ok),
            read("r", &["y"], 100),
        ];
        let end = final_state(vec![("r", held(&["y"]))]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict.lost.len(), 1, "{:?}", verdict.lines());
        assert_eq!(verdict.missed.len(), 1, "{:?}", verdict.lines());
    }

    #[test]
    fn siblings_and_chains_of_contexts_are_allowed() {
        // Proves siblings pass, and that supersession is transitive: z saw y, y saw x.
        let history = vec![
            rmw("r", "x", &[], 0, Outcome::Ok),
            rmw("r", "y", &["x"], 20, Outcome::Unknown),
            rmw("r", "z", &["y"], 40, Outcome::Ok),
            rmw("r", "w", &[], 40, Outcome::Ok),
            read("r", &["z", "w"], 100),
        ];
        let end = final_state(vec![("r", held(&["w", "z"]))]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict, Verdict::default(), "{:?}", verdict.lines());
    }

    #[test]
    fn a_refused_write_supersedes_nothing() {
        // Proves a certainly-refused write's context does not excuse a missing value.
        let history = vec![
            rmw("r", "x", &[], 0, Outcome::Ok),
            rmw("r", "y", &["x"], 20, Outcome::Failed),
        ];
        let end = final_state(vec![("r", held(&[]))]);
        let verdict = check(&history, &[], &end);
        assert_eq!(verdict.lost.len(), 1, "{:?}", verdict.lines());
    }

    #[test]
    fn an_isolated_node_that_acknowledges_or_hangs_is_reported() {
        // Proves the minority rules: an acknowledgement and a missing answer both count.
        let probes = vec![
            MinorityProbe {
                node: "n1".into(),
                outcome: Outcome::Unknown,
                answered_ms: Some(900),
            },
            MinorityProbe {
                node: "n2".into(),
                outcome: Outcome::Ok,
                answered_ms: Some(3),
            },
            MinorityProbe {
                node: "n3".into(),
                outcome: Outcome::Unknown,
                answered_ms: None,
            },
        ];
        let verdict = check(&[], &probes, &FinalState::default());
        assert_eq!(verdict.minority_acked.len(), 1);
        assert_eq!(verdict.minority_unanswered.len(), 1);
        assert_eq!(verdict.violations(), 2);
    }
}
