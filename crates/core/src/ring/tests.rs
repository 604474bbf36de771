use super::*;
use proptest::prelude::*;

fn nodes(n: usize) -> Vec<NodeId> {
    (0..n).map(|i| NodeId::new(format!("node-{i}"))).collect()
}

proptest! {
    /// A preference list always has min(RF, nodes) distinct nodes.
    #[test]
    fn preference_list_has_distinct_nodes(n in 1usize..12, rf in 1usize..5, vnodes in 1u16..32, token in any::<u64>()) {
        let members = nodes(n);
        let ring = Ring::new(&members, vnodes, rf);
        let list = ring.preference_list(token);
        prop_assert_eq!(list.len(), rf.min(n));
        let distinct: BTreeSet<_> = list.iter().collect();
        prop_assert_eq!(distinct.len(), list.len());
    }

    /// Adding a node changes a preference list only by bringing the new node in: every
    /// other node that leaves the list was pushed out by it (minimal movement).
    #[test]
    fn adding_a_node_moves_minimally(n in 2usize..10, token in any::<u64>()) {
        let members = nodes(n + 1);
        let before = Ring::new(&members[..n], 16, 3).preference_list(token);
        let after = Ring::new(&members, 16, 3).preference_list(token);
        let newcomer = &members[n];
        let removed: Vec<_> = before.iter().filter(|x| !after.contains(x)).collect();
        if after.contains(newcomer) {
            prop_assert!(removed.len() <= 1);
        } else {
            prop_assert_eq!(&before, &after);
        }
    }

    /// Every token falls in exactly one primary range, the one `range_for_token` names.
    #[test]
    fn ranges_partition_the_ring(n in 1usize..6, token in any::<u64>()) {
        let ring = Ring::new(&nodes(n), 8, 3);
        let containing: Vec<_> = ring.ranges().into_iter().filter(|(r, _)| r.contains(token)).collect();
        prop_assert_eq!(containing.len(), 1);
        prop_assert_eq!(Some(containing[0].0), ring.range_for_token(token));
    }
}

/// Ownership shares add up to the replication factor, each near its fair share.
#[test]
fn ownership_adds_up() {
    let members = nodes(5);
    let ring = Ring::new(&members, 64, 3);
    let total: f64 = members.iter().map(|m| ring.ownership(m)).sum();
    assert!((total - 3.0).abs() < 1e-6, "total {total}");
    for m in &members {
        let share = ring.ownership(m);
        assert!(share > 0.3 && share < 0.9, "{m}: {share}");
    }
}

/// With fewer nodes than RF, every node replicates every key.
#[test]
fn small_cluster_replicates_everywhere() {
    let ring = Ring::new(&nodes(2), 16, 3);
    assert_eq!(ring.preference_list_for_key("b", b"k").len(), 2);
    assert_eq!(ring.effective_replication(), 2);
}
