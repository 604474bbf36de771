//! The nemesis schedule: which fault, when, for how long, drawn from one seed, so a run's
//! faults are replayed exactly by its seed (the timing of client operations is not).
//!
//! Two lanes: the faults ([`draw`]: one at a time, each healed before the next) and the
//! cluster changes ([`draw_changes`]: joins and decommissions, which take as long as the
//! cluster needs, so they run beside the faults rather than in their sequence). The changes
//! are drawn from their own stream of the seed, so a seed's faults are what they were before
//! the changes lane existed.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;

/// One fault. Nodes are indices (0 is `n1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The nodes in `minority` are cut off from the others (both directions).
    MajorityMinority { minority: Vec<usize> },
    /// One node cut off from every other node.
    Isolate { node: usize },
    /// Two halves that cannot see each other, and one `bridge` node that sees both.
    Bridge { bridge: usize },
    /// Packets from `from` to `to` are dropped; `to` to `from` still flows.
    OneWay { from: usize, to: usize },
    /// SIGKILL, then a restart on the same data directory when the fault ends.
    Kill { node: usize },
    /// SIGSTOP, then SIGCONT when the fault ends.
    Pause { node: usize },
}

/// The kinds the schedule draws from, one of them per fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    MajorityMinority,
    Isolate,
    Bridge,
    OneWay,
    Kill,
    Pause,
}

impl FaultKind {
    /// The kinds drawn today.
    pub const ENABLED: [FaultKind; 6] = [
        FaultKind::MajorityMinority,
        FaultKind::Isolate,
        FaultKind::Bridge,
        FaultKind::OneWay,
        FaultKind::Kill,
        FaultKind::Pause,
    ];
}

impl Fault {
    /// The nodes the fault names: when one of them has left the cluster, the fault is skipped.
    pub fn named_nodes(&self) -> Vec<usize> {
        match self {
            Fault::MajorityMinority { minority } => minority.clone(),
            Fault::Isolate { node } | Fault::Kill { node } | Fault::Pause { node } => vec![*node],
            Fault::Bridge { bridge } => vec![*bridge],
            Fault::OneWay { from, to } => vec![*from, *to],
        }
    }

    /// Directed links whose packets are dropped, as (from, to): `to` drops what `from` sends.
    /// `members` are the nodes running now (a joined node is on the majority's side, a
    /// departed one on no side).
    pub fn dropped_links(&self, members: &[usize]) -> Vec<(usize, usize)> {
        let cut = |left: &[usize], right: &[usize]| {
            let mut links = Vec::new();
            for &a in left {
                for &b in right {
                    links.push((a, b));
                    links.push((b, a));
                }
            }
            links
        };
        match self {
            Fault::MajorityMinority { minority } => {
                let majority: Vec<usize> = members
                    .iter()
                    .copied()
                    .filter(|n| !minority.contains(n))
                    .collect();
                cut(minority, &majority)
            }
            Fault::Isolate { node } => {
                let others: Vec<usize> = members.iter().copied().filter(|n| n != node).collect();
                cut(&[*node], &others)
            }
            Fault::Bridge { bridge } => {
                let others: Vec<usize> = members.iter().copied().filter(|n| n != bridge).collect();
                let (left, right) = others.split_at(others.len() / 2);
                cut(left, right)
            }
            Fault::OneWay { from, to } => vec![(*from, *to)],
            Fault::Kill { .. } | Fault::Pause { .. } => Vec::new(),
        }
    }

    /// The node that is cut off alone from every other node, if any: it must refuse
    /// `w=quorum` writes (the minority probe).
    pub fn alone(&self, members: &[usize]) -> Option<usize> {
        match self {
            Fault::Isolate { node } => Some(*node),
            Fault::MajorityMinority { minority } if minority.len() == 1 && members.len() > 1 => {
                Some(minority[0])
            }
            _ => None,
        }
    }

    pub fn is_partition(&self) -> bool {
        !matches!(self, Fault::Kill { .. } | Fault::Pause { .. })
    }
}

fn name(node: usize) -> String {
    format!("n{}", node + 1)
}

fn names(nodes: &[usize]) -> String {
    nodes.iter().map(|&n| name(n)).collect::<Vec<_>>().join(",")
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::MajorityMinority { minority } => {
                write!(f, "partition minority [{}]", names(minority))
            }
            Fault::Isolate { node } => write!(f, "isolate {}", name(*node)),
            Fault::Bridge { bridge } => write!(f, "bridge through {}", name(*bridge)),
            Fault::OneWay { from, to } => write!(f, "drop {} -> {}", name(*from), name(*to)),
            Fault::Kill { node } => write!(f, "kill -9 {}", name(*node)),
            Fault::Pause { node } => write!(f, "SIGSTOP {}", name(*node)),
        }
    }
}

/// One fault of the schedule: in force from `start_ms` (since the workload started) for
/// `duration_ms`, then healed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub start_ms: u64,
    pub duration_ms: u64,
    pub fault: Fault,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>6.1}s +{:>4.1}s  {}",
            self.start_ms as f64 / 1000.0,
            self.duration_ms as f64 / 1000.0,
            self.fault
        )
    }
}

/// Draws the schedule of a run: faults one at a time, each 2-8 s, with 1-4 s of calm
/// between them (so hints and reconnects happen under load, not only at the end), from
/// `warmup_ms` until `duration_ms`.
pub fn draw(seed: u64, nodes: usize, duration_ms: u64) -> Vec<Step> {
    const WARMUP_MS: u64 = 2_000;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut at = WARMUP_MS;
    loop {
        let length = rng.gen_range(2_000..=8_000);
        if at + length > duration_ms {
            break;
        }
        if let Some(fault) = draw_fault(&mut rng, nodes) {
            steps.push(Step {
                start_ms: at,
                duration_ms: length,
                fault,
            });
        }
        at += length + rng.gen_range(1_000..=4_000);
    }
    steps
}

fn draw_fault(rng: &mut ChaCha8Rng, nodes: usize) -> Option<Fault> {
    if nodes < 2 {
        return None;
    }
    let any = |rng: &mut ChaCha8Rng| rng.gen_range(0..nodes);
    let kind = *FaultKind::ENABLED.choose(rng)?;
    let fault = match kind {
        FaultKind::MajorityMinority => {
            let mut all: Vec<usize> = (0..nodes).collect();
            all.shuffle(rng);
            let mut minority = all[..(nodes - 1) / 2].to_vec();
            minority.sort_unstable();
            Fault::MajorityMinority { minority }
        }
        FaultKind::Isolate => Fault::Isolate { node: any(rng) },
        FaultKind::Bridge => Fault::Bridge { bridge: any(rng) },
        FaultKind::OneWay => {
            let from = any(rng);
            let to = (from + rng.gen_range(1..nodes)) % nodes;
            Fault::OneWay { from, to }
        }
        FaultKind::Kill => Fault::Kill { node: any(rng) },
        FaultKind::Pause => Fault::Pause { node: any(rng) },
    };
    Some(fault)
}

/// A cluster change. Nodes are indices as in [`Fault`]; a joiner takes the next free one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Start a fresh node (empty data directory, the first nodes as seeds) and wait until
    /// every member sees it `normal`.
    Join { node: usize },
    /// `POST /admin/decommission` on the node, wait until every other member sees it `left`,
    /// then stop it for good.
    Decommission { node: usize },
    /// Kill -9 the node for good (no restart), `POST /admin/remove-node/{id}` on a survivor
    /// once the survivors see it down, wait until every survivor sees it `left`.
    Remove { node: usize },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Join { node } => write!(f, "join {}", name(*node)),
            Change::Decommission { node } => write!(f, "decommission {}", name(*node)),
            Change::Remove { node } => write!(f, "kill -9 {} for good, remove-node", name(*node)),
        }
    }
}

/// One change of the changes lane: begun `start_ms` after the workload started, or when the
/// change before it has finished if that is later (the cluster runs one change at a time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeStep {
    pub start_ms: u64,
    pub change: Change,
}

impl fmt::Display for ChangeStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>6.1}s (or after the change before)  {}",
            self.start_ms as f64 / 1000.0,
            self.change
        )
    }
}

/// Faults are drawn over the first `initial` nodes; a node that joined during the run
/// (index `initial` or above, a member now) takes the place of the drawn node of a
/// single-node fault (kill, pause, isolate) one time in three, and always when the drawn
/// node has left, so joiners are faulted too. Seeded by the run's seed and the step's
/// number; whether a joiner is a member by then depends on how fast its join went, so the
/// run's log says where each fault went.
pub fn aim_at_joiners(
    seed: u64,
    number: usize,
    fault: &Fault,
    members: &[usize],
    initial: usize,
) -> Fault {
    /// Separates this draw's random stream from the schedule's (same seed).
    const JOINERS_STREAM: u64 = 0x6a6f_696e_6572_7321;
    let joiners: Vec<usize> = members.iter().copied().filter(|&n| n >= initial).collect();
    if joiners.is_empty() {
        return fault.clone();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ JOINERS_STREAM ^ (number as u64).wrapping_mul(0x9e37_79b9),
    );
    let joiner = joiners[rng.gen_range(0..joiners.len())];
    let mut retarget = |node: usize| {
        if !members.contains(&node) || rng.gen_ratio(1, 3) {
            joiner
        } else {
            node
        }
    };
    match *fault {
        Fault::Kill { node } => Fault::Kill {
            node: retarget(node),
        },
        Fault::Pause { node } => Fault::Pause {
            node: retarget(node),
        },
        Fault::Isolate { node } => Fault::Isolate {
            node: retarget(node),
        },
        _ => fault.clone(),
    }
}

/// The node slots a run needs: the first `nodes` plus one per join.
pub fn slots(nodes: usize, changes: &[ChangeStep]) -> usize {
    nodes
        + changes
            .iter()
            .filter(|c| matches!(c.change, Change::Join { .. }))
            .count()
}

/// Draws the changes lane of a run, a seeded choice among: nothing, a join, a decommission,
/// a join then a decommission, a decommission then a join; then, half of the time when more
/// than `replication_factor` members remain, the removal of a dead node (any member, a
/// joiner included). A decommission or removal is drawn only while more than
/// `replication_factor` nodes would remain members, so the cluster always ends with at
/// least that many (a node refuses otherwise). The first change starts in the first quarter
/// of the run, each next one 1-5 s after the one before was drawn to start, so they usually
/// overlap faults. The removal has a random stream of its own, so the plans drawn before it
/// existed are drawn the same; it goes last or, half of the time when it can, first
/// ([`early_removal`]).
pub fn draw_changes(
    seed: u64,
    nodes: usize,
    replication_factor: usize,
    duration_ms: u64,
) -> Vec<ChangeStep> {
    /// Separates the changes' random stream from the faults' (same seed).
    const CHANGES_STREAM: u64 = 0x6d65_6d62_6572_7321;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ CHANGES_STREAM);
    #[derive(Clone, Copy)]
    enum Plan {
        Nothing,
        Join,
        Decommission,
        JoinThenDecommission,
        DecommissionThenJoin,
    }
    let mut plans = vec![Plan::Nothing, Plan::Join, Plan::JoinThenDecommission];
    if nodes > replication_factor {
        plans.extend([Plan::Decommission, Plan::DecommissionThenJoin]);
    }
    let plan = *plans.choose(&mut rng).expect("plans is not empty");
    let kinds: &[bool] = match plan {
        // true: a join; false: a decommission.
        Plan::Nothing => &[],
        Plan::Join => &[true],
        Plan::Decommission => &[false],
        Plan::JoinThenDecommission => &[true, false],
        Plan::DecommissionThenJoin => &[false, true],
    };
    let mut members: Vec<usize> = (0..nodes).collect();
    let mut next_slot = nodes;
    let mut at = rng.gen_range(3_000..=(duration_ms / 4).max(3_000));
    let mut steps = Vec::new();
    for &join in kinds {
        let change = if join {
            let node = next_slot;
            next_slot += 1;
            members.push(node);
            Change::Join { node }
        } else {
            debug_assert!(members.len() > replication_factor);
            let node = members.remove(rng.gen_range(0..members.len()));
            Change::Decommission { node }
        };
        steps.push(ChangeStep {
            start_ms: at,
            change,
        });
        at += rng.gen_range(1_000..=5_000);
    }
    /// Separates the removal's random stream from the plans' (same seed).
    const REMOVAL_STREAM: u64 = 0x7265_6d6f_7665_2121;
    let mut removal_rng = ChaCha8Rng::seed_from_u64(seed ^ REMOVAL_STREAM);
    if members.len() > replication_factor && removal_rng.gen_bool(0.5) {
        let node = members.remove(removal_rng.gen_range(0..members.len()));
        let last = ChangeStep {
            start_ms: at,
            change: Change::Remove { node },
        };
        // Placed last, the removal begins only once the changes before it finished (joins
        // take 40-75 s), which is after the faults and often after the client load. Half of
        // the time it goes first instead, at the first change's time, so a node dies for good
        // and is removed while the faults lane and the clients are busy; that needs a node
        // the lane does not decommission later, and room for every later decommission.
        match early_removal(&steps, nodes, replication_factor, &mut removal_rng) {
            Some(early) => steps.insert(0, early),
            None => steps.push(last),
        }
    }
    steps
}

/// The removal drawn to go first in the lane (one time in two), or `None` when it goes
/// last: when the dice say so, or when no initial node can be removed first (every one is
/// decommissioned later, or the removal or a later decommission would then leave fewer
/// than `replication_factor` members).
fn early_removal(
    steps: &[ChangeStep],
    nodes: usize,
    replication_factor: usize,
    rng: &mut ChaCha8Rng,
) -> Option<ChangeStep> {
    if !rng.gen_bool(0.5) {
        return None;
    }
    // With one member fewer from the start, the cluster must still hold RF members, and
    // every decommission must still find more than RF before it.
    let mut members = nodes - 1;
    if members < replication_factor {
        return None;
    }
    for step in steps {
        match step.change {
            Change::Join { .. } => members += 1,
            Change::Decommission { .. } => {
                if members <= replication_factor {
                    return None;
                }
                members -= 1;
            }
            Change::Remove { .. } => members -= 1,
        }
    }
    let decommissioned: Vec<usize> = steps
        .iter()
        .filter_map(|step| match step.change {
            Change::Decommission { node } => Some(node),
            _ => None,
        })
        .collect();
    let candidates: Vec<usize> = (0..nodes).filter(|n| !decommissioned.contains(n)).collect();
    let node = *candidates.choose(rng)?;
    let start_ms = steps.first().map_or(3_000, |first| first.start_ms);
    Some(ChangeStep {
        start_ms,
        change: Change::Remove { node },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_schedule_every_time() {
        // Proves a run's faults are reproduced from its seed alone.
        assert_eq!(draw(42, 5, 60_000), draw(42, 5, 60_000));
        assert_ne!(draw(42, 5, 60_000), draw(43, 5, 60_000));
    }

    #[test]
    fn faults_fit_the_run_and_never_overlap() {
        // Proves the schedule ends before the run does and runs one fault at a time.
        for seed in 0..50 {
            let steps = draw(seed, 3, 45_000);
            assert!(!steps.is_empty());
            for pair in steps.windows(2) {
                assert!(pair[0].start_ms + pair[0].duration_ms < pair[1].start_ms);
            }
            let last = steps.last().expect("a step");
            assert!(last.start_ms + last.duration_ms <= 45_000);
        }
    }

    #[test]
    fn partitions_cut_the_links_they_say() {
        // Proves the dropped links of each partition shape.
        let minority = Fault::MajorityMinority {
            minority: vec![0, 1],
        };
        let five: Vec<usize> = (0..5).collect();
        let links = minority.dropped_links(&five);
        assert_eq!(links.len(), 2 * 2 * 3);
        assert!(links.contains(&(0, 4)) && links.contains(&(4, 0)));
        assert!(!links.contains(&(0, 1)) && !links.contains(&(2, 3)));

        let bridge = Fault::Bridge { bridge: 2 }.dropped_links(&five);
        assert!(bridge.iter().all(|&(a, b)| a != 2 && b != 2));
        assert!(bridge.contains(&(0, 3)) && !bridge.contains(&(0, 1)));

        let three = [0, 1, 2];
        assert_eq!(
            Fault::OneWay { from: 1, to: 0 }.dropped_links(&three),
            vec![(1, 0)]
        );
        assert_eq!(Fault::Isolate { node: 1 }.alone(&three), Some(1));
        assert_eq!(minority.alone(&five), None);
        assert_eq!(
            Fault::MajorityMinority { minority: vec![2] }.alone(&three),
            Some(2)
        );
    }

    #[test]
    fn a_joined_node_is_cut_off_with_the_majority_and_a_departed_one_not_at_all() {
        // Proves partitions are drawn over the nodes running now: isolating n1 after n4
        // joined and n2 left cuts n1 from n3 and n4 only.
        let links = Fault::Isolate { node: 0 }.dropped_links(&[0, 2, 3]);
        assert_eq!(links, vec![(0, 2), (2, 0), (0, 3), (3, 0)]);
        assert_eq!(Fault::OneWay { from: 1, to: 0 }.named_nodes(), vec![1, 0]);
    }

    #[test]
    fn joiners_take_some_single_node_faults_and_those_of_departed_nodes() {
        // Proves a node that joined is faulted too: never before any joiner is a member,
        // always in place of a drawn node that has left, and otherwise for some steps
        // (seeded: the same every time) but not all; partitions keep their drawn shape.
        let kill = Fault::Kill { node: 1 };
        assert_eq!(aim_at_joiners(9, 0, &kill, &[0, 1, 2], 3), kill);
        assert_eq!(
            aim_at_joiners(9, 0, &kill, &[0, 2, 3], 3),
            Fault::Kill { node: 3 },
            "n2 has left: the joiner n4 takes its fault"
        );
        let aimed: Vec<Fault> = (0..30)
            .map(|step| aim_at_joiners(9, step, &kill, &[0, 1, 2, 3], 3))
            .collect();
        let on_joiner = aimed
            .iter()
            .filter(|f| **f == Fault::Kill { node: 3 })
            .count();
        assert!(on_joiner > 0 && on_joiner < 30, "{on_joiner} of 30");
        let again: Vec<Fault> = (0..30)
            .map(|step| aim_at_joiners(9, step, &kill, &[0, 1, 2, 3], 3))
            .collect();
        assert_eq!(aimed, again);
        let bridge = Fault::Bridge { bridge: 0 };
        assert_eq!(aim_at_joiners(9, 0, &bridge, &[0, 1, 2, 3], 3), bridge);
    }

    #[test]
    fn changes_are_seeded_and_never_leave_fewer_than_rf_members() {
        // Proves the changes lane replays from the seed, draws each plan (and removals) over
        // a few seeds, and never decommissions or removes a cluster down below the
        // replication factor.
        assert_eq!(draw_changes(7, 3, 3, 60_000), draw_changes(7, 3, 3, 60_000));
        let (mut joins, mut decommissions, mut removals) = (0, 0, 0);
        for seed in 0..200 {
            for nodes in [3, 5] {
                let steps = draw_changes(seed, nodes, 3, 60_000);
                let mut members = nodes;
                let mut next = nodes;
                for step in &steps {
                    assert!(step.start_ms <= 60_000);
                    match step.change {
                        Change::Join { node } => {
                            assert_eq!(node, next, "a joiner takes the next slot");
                            next += 1;
                            members += 1;
                            joins += 1;
                        }
                        Change::Decommission { node } => {
                            assert!(node < next);
                            members -= 1;
                            decommissions += 1;
                        }
                        Change::Remove { node } => {
                            assert!(node < next);
                            members -= 1;
                            removals += 1;
                        }
                    }
                    assert!(members >= 3, "seed {seed}: {steps:?}");
                }
                assert_eq!(slots(nodes, &steps), next);
            }
        }
        assert!(joins > 0 && decommissions > 0 && removals > 0);
    }

    #[test]
    fn some_removals_go_first_and_never_remove_a_node_decommissioned_later() {
        // Proves removals are drawn at the start of the lane too (so they overlap the faults
        // and the client load), never of a node the lane decommissions later, and that the
        // lane still never goes below RF members (checked step by step above).
        let (mut first, mut last) = (0, 0);
        for seed in 0..400 {
            let steps = draw_changes(seed, 5, 3, 60_000);
            match steps
                .iter()
                .position(|s| matches!(s.change, Change::Remove { .. }))
            {
                Some(0) if steps.len() > 1 => {
                    first += 1;
                    let Change::Remove { node } = steps[0].change else {
                        unreachable!()
                    };
                    assert!(
                        node < 5,
                        "seed {seed}: only an initial node is removed first"
                    );
                    assert!(
                        !steps[1..]
                            .iter()
                            .any(|s| s.change == Change::Decommission { node }),
                        "seed {seed}: {steps:?}"
                    );
                    assert_eq!(steps[0].start_ms, steps[1].start_ms);
                }
                Some(i) if i == steps.len() - 1 => last += 1,
                Some(i) => panic!("seed {seed}: a removal in the middle at {i}: {steps:?}"),
                None => {}
            }
        }
        assert!(first > 20 && last > 20, "first {first}, last {last}");
    }
}
