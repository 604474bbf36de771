//! Bucket properties, LWW writes and sibling limits through a small in-process cluster.

use super::*;
use crate::bucket::{PropsUpdate, Resolution};

fn set(cluster: &mut TestCluster, at: usize, update: PropsUpdate) -> ClientResponse {
    cluster.request(
        at,
        ClientRequest::SetBucketProps {
            bucket: "b".into(),
            update,
        },
    )
}

fn lww() -> PropsUpdate {
    PropsUpdate {
        resolution: Some(Resolution::Lww),
        ..PropsUpdate::default()
    }
}

/// Gossip rounds until every node holds `resolution` for bucket `b` (bounded).
fn spread(cluster: &mut TestCluster, resolution: Resolution) {
    for node in 0..cluster.nodes.len() {
        let seed = cluster.nodes[(node + 1) % cluster.nodes.len()].id().clone();
        let info = cluster.nodes[0].membership().get(&seed).cloned().unwrap();
        let now = cluster.now;
        cluster.nodes[node].handle_seed_discovered(now, info);
    }
    cluster.run();
    for round in 1..=200 {
        if cluster
            .nodes
            .iter()
            .all(|n| n.bucket_props("b").resolution == resolution)
        {
            return;
        }
        let now = cluster.now + 100 * round;
        cluster.tick(now);
    }
    panic!("bucket properties did not spread");
}

/// A change made through one node reaches every node by gossip and is stored durably.
#[test]
fn props_spread_to_every_node_and_are_stored() {
    let mut cluster = TestCluster::new(3);
    assert_eq!(
        cluster.nodes[1].bucket_props("b").resolution,
        Resolution::Causal
    );
    match set(&mut cluster, 0, lww()) {
        ClientResponse::BucketProps(p) => assert_eq!(p.resolution, Resolution::Lww),
        other => panic!("{other:?}"),
    }
    spread(&mut cluster, Resolution::Lww);
    // A restart reloads the table from storage.
    let storage = cluster.nodes[2].storage().clone();
    let restarted = Node::new(NodeConfig::new("n2"), storage, cluster.now).unwrap();
    assert_eq!(restarted.bucket_props("b").resolution, Resolution::Lww);
}

/// Bad values are refused and change nothing.
#[test]
fn bad_props_are_refused() {
    let mut cluster = TestCluster::new(1);
    let update = PropsUpdate {
        max_siblings: Some(0),
        ..PropsUpdate::default()
    };
    assert!(matches!(
        set(&mut cluster, 0, update),
        ClientResponse::Invalid(_)
    ));
    assert_eq!(cluster.nodes[0].bucket_props("b").max_siblings, 100);
}

/// Blind writes through two nodes to an lww bucket leave one value, the later one.
#[test]
fn lww_blind_writes_never_make_siblings() {
    let mut cluster = TestCluster::new(3);
    set(&mut cluster, 0, lww());
    spread(&mut cluster, Resolution::Lww);
    for (i, value) in ["a", "b", "c", "d"].iter().enumerate() {
        cluster.now += 1;
        let at = i % 2;
        let written = cluster.put(at, value, CausalContext::empty(), ConsistencyLevel::Quorum);
        assert!(
            matches!(written, ClientResponse::Written { .. }),
            "{written:?}"
        );
    }
    for node in 0..3 {
        assert_eq!(
            live(&cluster.get(node, ConsistencyLevel::All)),
            vec![data("d")]
        );
    }
    // Even with the clock standing still (or set back), a later write wins.
    cluster.now = 0;
    cluster.put(1, "e", CausalContext::empty(), ConsistencyLevel::All);
    assert_eq!(
        live(&cluster.get(2, ConsistencyLevel::All)),
        vec![data("e")]
    );
}

/// A node that has not heard of the switch to lww writes an LWW key the lww way, and a
/// causal object merged with an LWW one never makes siblings.
#[test]
fn a_stale_node_does_not_turn_lww_objects_into_siblings() {
    let mut cluster = TestCluster::new(3);
    set(&mut cluster, 0, lww());
    // Only n0 knows: n1 still believes the bucket causal.
    assert_eq!(
        cluster.nodes[1].bucket_props("b").resolution,
        Resolution::Causal
    );
    cluster.put(0, "a", CausalContext::empty(), ConsistencyLevel::All);
    cluster.now += 1;
    cluster.put(1, "b", CausalContext::empty(), ConsistencyLevel::All);
    for node in 0..3 {
        let object = local(&mut cluster, node).unwrap();
        assert!(object.is_lww());
        assert_eq!(live(&ClientResponse::Object(object)), vec![data("b")]);
    }
}

/// A causal bucket with max_siblings 3 refuses the 4th blind write (locally and through a
/// forwarding coordinator) and takes a write with the context.
#[test]
fn max_siblings_refuses_blind_writes_and_takes_a_resolving_one() {
    let mut cluster = TestCluster::new(4);
    let update = PropsUpdate {
        max_siblings: Some(3),
        warn_siblings: Some(2),
        ..PropsUpdate::default()
    };
    for at in 0..4 {
        set(&mut cluster, at, update);
    }
    let replicas = cluster.nodes[0].ring().preference_list_for_key("b", b"k");
    let outsider = (0..4)
        .find(|i| !replicas.contains(cluster.nodes[*i].id()))
        .unwrap();
    let actor = cluster.index(&replicas[0]);
    for value in ["a", "b", "c"] {
        let written = cluster.put(actor, value, CausalContext::empty(), ConsistencyLevel::All);
        assert!(
            matches!(written, ClientResponse::Written { .. }),
            "{written:?}"
        );
    }
    assert!(cluster.nodes[actor].stats()[Counter::SiblingsWarned] >= 2);
    assert_eq!(cluster.nodes[actor].take_sibling_warnings().len(), 2);
    let refused = cluster.put(actor, "d", CausalContext::empty(), ConsistencyLevel::All);
    assert!(
        matches!(refused, ClientResponse::TooManySiblings(_)),
        "{refused:?}"
    );
    // Through a node that is not a replica (it forwards to an actor): 409 too.
    let refused = cluster.put(outsider, "d", CausalContext::empty(), ConsistencyLevel::All);
    assert!(
        matches!(refused, ClientResponse::TooManySiblings(_)),
        "{refused:?}"
    );
    let refusals: u64 = cluster
        .nodes
        .iter()
        .map(|n| n.stats()[Counter::SiblingsRefused])
        .sum();
    assert_eq!(refusals, 2);
    assert_eq!(cluster.nodes[outsider].pending_operations(), 0);
    let context = match cluster.get(0, ConsistencyLevel::All) {
        ClientResponse::Object(o) => o.causal_context(),
        other => panic!("{other:?}"),
    };
    let resolved = cluster.put(outsider, "e", context, ConsistencyLevel::All);
    assert!(
        matches!(resolved, ClientResponse::Written { .. }),
        "{resolved:?}"
    );
    assert_eq!(
        live(&cluster.get(actor, ConsistencyLevel::All)),
        vec![data("e")]
    );
}

/// Merges from replicas never drop data because of the limit: siblings made elsewhere
/// arrive whole even past max_siblings.
#[test]
fn replica_merges_ignore_the_limit() {
    let mut cluster = TestCluster::new(2);
    let update = PropsUpdate {
        max_siblings: Some(1),
        ..PropsUpdate::default()
    };
    set(&mut cluster, 0, update);
    let mut object = Object::empty();
    for n in 0..3 {
        let actor = Actor {
            node_hash: n,
            epoch: 1,
        };
        object.apply_write(actor, &CausalContext::empty(), data("x"));
    }
    let now = cluster.now;
    cluster.nodes[0].handle_message(
        now,
        &NodeId::new("n1"),
        Message::Replicate {
            request: 1,
            bucket: "b".into(),
            key: b"k".to_vec(),
            object,
        },
    );
    cluster.run();
    assert_eq!(local(&mut cluster, 0).unwrap().siblings().len(), 3);
}

/// A one-bucket repair run moves exactly that bucket's missing keys, and does not count as
/// the ranges' sync (tombstone reaping must not trust it for the other buckets).
#[test]
fn bucket_repair_moves_only_that_bucket() {
    // No hints and no scheduled anti-entropy: only the run may move data.
    let mut cluster = TestCluster::with_config(3, |config| {
        config.hinted_handoff.enabled = false;
        config.anti_entropy.enabled = false;
    });
    cluster.stopped[2] = true;
    for bucket in ["b1", "b2"] {
        for i in 0..5 {
            let written = cluster.request(
                0,
                ClientRequest::Put {
                    bucket: bucket.into(),
                    key: format!("k{i}").into_bytes(),
                    context: CausalContext::empty(),
                    value: data("v"),
                    level: ConsistencyLevel::One,
                },
            );
            assert!(matches!(written, ClientResponse::Written { .. }));
        }
    }
    cluster.stopped[2] = false;
    let id = match cluster.request(
        2,
        ClientRequest::StartBucketRepair {
            bucket: "b1".into(),
        },
    ) {
        ClientResponse::RepairStarted { id } => id,
        other => panic!("{other:?}"),
    };
    for round in 1..=50 {
        let now = cluster.now + 10 * round;
        cluster.tick(now);
    }
    let status = cluster.nodes[2].repair_run(id, cluster.now).unwrap();
    assert_eq!(status.state, crate::anti_entropy::RunState::Done);
    assert_eq!(status.keys_repaired, 5);
    for i in 0..5 {
        let key = format!("k{i}").into_bytes();
        assert!(cluster.nodes[2]
            .storage()
            .get("b1", &key)
            .unwrap()
            .is_some());
        assert!(cluster.nodes[2]
            .storage()
            .get("b2", &key)
            .unwrap()
            .is_none());
    }
    assert!(cluster.nodes[2].anti_entropy.converged_at.is_empty());
}
