//! Cluster changes in the in-process cluster: a join streams, a decommission hands over, a
//! removal re-replicates, and every acknowledged write stays readable at quorum.

use super::*;

fn put_key(cluster: &mut TestCluster, at: usize, key: &str) -> ClientResponse {
    cluster.request(
        at,
        ClientRequest::Put {
            bucket: "b".into(),
            key: key.as_bytes().to_vec(),
            context: CausalContext::empty(),
            value: data(key),
            level: ConsistencyLevel::Quorum,
        },
    )
}

fn read_key(cluster: &mut TestCluster, at: usize, key: &str) -> Option<Vec<u8>> {
    match cluster.request(
        at,
        ClientRequest::Get {
            bucket: "b".into(),
            key: key.as_bytes().to_vec(),
            level: ConsistencyLevel::Quorum,
        },
    ) {
        ClientResponse::Object(object) => object.live_values().find_map(|s| match &s.value {
            Value::Data { bytes, .. } => Some(bytes.to_vec()),
            Value::Tombstone => None,
        }),
        _ => None,
    }
}

/// Ticks every node a second at a time until `done` holds (at most `seconds`).
fn tick_until(
    cluster: &mut TestCluster,
    seconds: u64,
    mut done: impl FnMut(&TestCluster) -> bool,
) -> bool {
    let start = cluster.now;
    for second in 1..=seconds {
        if done(cluster) {
            return true;
        }
        cluster.tick(start + second * 250);
    }
    done(cluster)
}

/// A node that gossip describes to every node, with seeds, as a new member.
fn add_node(cluster: &mut TestCluster, i: usize) {
    let mut config = NodeConfig::new(format!("n{i}"));
    config.learn_epoch_from_peers = true;
    let now = cluster.now;
    let node = Node::new(config, MemoryStorage::new(), now).unwrap();
    cluster.nodes.push(node);
    cluster.stopped.push(false);
    cluster.nodes[i].handle_seed_discovered(now, member(0));
    cluster.run();
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("key-{i}")).collect()
}

fn stored_keys(node: &Node<MemoryStorage>) -> usize {
    node.storage().objects().len()
}

#[test]
fn a_join_streams_its_ranges_and_old_owners_clean_up() {
    let mut cluster = gossiping_cluster(3);
    let keys = keys(200);
    for key in &keys {
        assert!(matches!(
            put_key(&mut cluster, 0, key),
            ClientResponse::Written { .. }
        ));
    }
    let before: Vec<usize> = cluster.nodes.iter().map(stored_keys).collect();
    add_node(&mut cluster, 3);
    assert_eq!(
        cluster.nodes[3].own_state(),
        crate::gossip::NodeStatus::Joining
    );
    // Writes keep landing during the join.
    let mut during = Vec::new();
    let joined = tick_until(&mut cluster, 400, |c| {
        c.nodes
            .iter()
            .all(|n| n.peer_state(&NodeId::new("n3")) == crate::gossip::NodeStatus::Normal)
    });
    for i in 0..20 {
        let key = format!("during-{i}");
        assert!(matches!(
            put_key(&mut cluster, i % 4, &key),
            ClientResponse::Written { .. }
        ));
        during.push(key);
    }
    assert!(joined, "n3 became normal everywhere");
    // At `normal` the joiner holds every key it owns, and the streaming counter counts each
    // of them (its own pulls and what the old owners' exchanges pushed into its ranges).
    let n3 = NodeId::new("n3");
    let ring = cluster.nodes[0].ring().clone();
    let owned = keys
        .iter()
        .filter(|k| {
            ring.preference_list_for_key("b", k.as_bytes())
                .contains(&n3)
        })
        .count();
    let held = keys
        .iter()
        .filter(|k| {
            cluster.nodes[3]
                .storage()
                .get("b", k.as_bytes())
                .unwrap()
                .is_some()
        })
        .count();
    assert_eq!(held, owned, "n3 holds every key it owns");
    let streamed = cluster.nodes[3].stats()[Counter::StreamingKeysIn];
    assert!(
        streamed >= owned as u64,
        "streamed {streamed} < owned {owned}"
    );
    // ... about once each: the old owners' scheduled exchanges with the joiner wait for the
    // change (the second source of each pull sends only what the first lacked).
    assert!(
        streamed < owned as u64 * 3 / 2,
        "streamed {streamed} objects for the {owned} owned: sent more than once"
    );
    assert!(stored_keys(&cluster.nodes[3]) > 0);
    // Cleanup once everyone acknowledged the final layout.
    let cleaned = tick_until(&mut cluster, 400, |c| {
        c.nodes[..3]
            .iter()
            .map(|n| n.stats()[Counter::CleanupKeys])
            .sum::<u64>()
            > 0
    });
    assert!(cleaned, "old owners dropped ranges they no longer own");
    // Every key had a copy on each of the three old nodes; n3 took over part of them.
    let after: Vec<usize> = cluster.nodes[..3].iter().map(stored_keys).collect();
    let all_keys = keys.len() + during.len();
    assert!(
        after.iter().all(|a| *a < all_keys),
        "{before:?} -> {after:?} of {all_keys}"
    );
    for key in keys.iter().chain(&during) {
        for at in 0..4 {
            assert_eq!(
                read_key(&mut cluster, at, key),
                Some(key.as_bytes().to_vec()),
                "{key} through n{at}"
            );
        }
    }
}

#[test]
fn decommission_hands_over_and_bad_requests_are_refused() {
    let mut cluster = gossiping_cluster(4);
    let keys = keys(100);
    for key in &keys {
        put_key(&mut cluster, 1, key);
    }
    // Remove-node of an unknown id and of an up node.
    assert!(matches!(
        cluster.request(
            0,
            ClientRequest::RemoveNode {
                node: NodeId::new("nope")
            }
        ),
        ClientResponse::NotFound(_)
    ));
    assert!(matches!(
        cluster.request(0, ClientRequest::RemoveNode { node: NodeId::new("n1") }),
        ClientResponse::Conflict(reason) if reason.contains("decommission it instead")
    ));
    assert!(matches!(
        cluster.request(3, ClientRequest::Decommission),
        ClientResponse::Change(_)
    ));
    // A second change while the first runs is refused (once gossip told the node).
    tick_until(&mut cluster, 4, |_| false);
    assert!(matches!(
        cluster.request(2, ClientRequest::Decommission),
        ClientResponse::Conflict(_)
    ));
    let left = tick_until(&mut cluster, 400, |c| {
        c.nodes[3].own_state() == crate::gossip::NodeStatus::Left
    });
    assert!(
        left,
        "{:?}",
        cluster.nodes[3].change_progress(&NodeId::new("n3"), 0)
    );
    cluster.stopped[3] = true;
    for key in &keys {
        for at in 0..3 {
            assert_eq!(
                read_key(&mut cluster, at, key),
                Some(key.as_bytes().to_vec())
            );
        }
    }
    // Three normal nodes at RF 3: one more decommission would leave too few.
    tick_until(&mut cluster, 40, |_| false);
    assert!(matches!(
        cluster.request(0, ClientRequest::Decommission),
        ClientResponse::Conflict(reason) if reason.contains("not enough nodes")
    ));
}

#[test]
fn removing_a_dead_node_re_replicates_and_drops_its_hints() {
    let mut cluster = gossiping_cluster(4);
    let keys = keys(100);
    for key in &keys {
        put_key(&mut cluster, 0, key);
    }
    cluster.stopped[3] = true;
    let n3 = NodeId::new("n3");
    cluster.nodes[0].handle_peer_status(cluster.now, &n3, PeerStatus::Down);
    // A write while n3 is down leaves hints for it.
    put_key(&mut cluster, 0, "while-down");
    assert!(matches!(
        cluster.request(0, ClientRequest::RemoveNode { node: n3.clone() }),
        ClientResponse::Change(_)
    ));
    let removed = tick_until(&mut cluster, 600, |c| {
        c.nodes[..3].iter().all(|n| n.is_removed(&n3))
    });
    assert!(removed, "{:?}", cluster.nodes[0].change_progress(&n3, 0));
    assert_eq!(cluster.nodes[0].hints_pending_for(&n3), 0);
    for key in keys
        .iter()
        .chain(std::iter::once(&"while-down".to_string()))
    {
        let copies = cluster.nodes[..3]
            .iter()
            .filter(|n| {
                n.storage()
                    .get("b", key.as_bytes())
                    .ok()
                    .flatten()
                    .is_some()
            })
            .count();
        assert_eq!(copies, 3, "{key} has RF copies on the live nodes");
    }
}

/// An object written once by `actor`, to keep as a hint that holds the only copy.
fn only_copy_object(actor: &str) -> crate::version::Object {
    let mut object = crate::version::Object::empty();
    object.apply_write(
        crate::version::Actor::new(actor, 1),
        &CausalContext::empty(),
        data("only-copy"),
    );
    object
}

/// A hint that stands in for the removed node (a sloppy quorum counted it, so it may be the
/// write's only copy) is not dropped with the others: the key's new replicas take it.
#[test]
fn removing_a_dead_node_hands_its_stand_in_hints_to_the_new_replicas() {
    let mut cluster = gossiping_cluster(4);
    let n3 = NodeId::new("n3");
    // A key n3 replicates and n0 does not: n0 holds its hint as a fallback would.
    let key = keys(100)
        .into_iter()
        .find(|key| {
            let owners = cluster.nodes[0]
                .ring()
                .preference_list_for_key("b", key.as_bytes());
            owners.contains(&n3) && !owners.contains(&NodeId::new("n0"))
        })
        .expect("some key is n3's and not n0's");
    let object = only_copy_object("n1");
    let now = cluster.now;
    assert!(cluster.nodes[0].store_hint(now, &n3, "b", key.as_bytes(), &object, true));
    cluster.stopped[3] = true;
    cluster.nodes[0].handle_peer_status(cluster.now, &n3, PeerStatus::Down);
    assert!(matches!(
        cluster.request(0, ClientRequest::RemoveNode { node: n3.clone() }),
        ClientResponse::Change(_)
    ));
    let on_new_replicas = tick_until(&mut cluster, 600, |c| {
        c.nodes[..3].iter().all(|n| n.is_removed(&n3))
            && c.nodes[1..3].iter().all(|n| {
                n.storage()
                    .get("b", key.as_bytes())
                    .ok()
                    .flatten()
                    .is_some()
            })
    });
    assert!(
        on_new_replicas,
        "{key} reached the replicas that replace n3"
    );
    assert_eq!(cluster.nodes[0].hints_pending_for(&n3), 0);
    assert_eq!(
        cluster.nodes[0].stats()[Counter::HintsDroppedRemoved],
        0,
        "the stand-in hint was not dropped"
    );
}

/// A leaving node forgets a hint only once an heir has stored it: a hand-over lost on the
/// way is sent again after its deadline, and the heir ends up with the hint.
#[test]
fn a_leaving_node_hands_over_hints_until_an_heir_has_stored_them() {
    let mut cluster = gossiping_cluster(4);
    let n2 = NodeId::new("n2");
    let object = only_copy_object("n3");
    let start = cluster.now;
    assert!(cluster.nodes[3].store_hint(start, &n2, "b", b"hinted", &object, true));
    // The first call starts the wait for replay; past it every hint is handed over.
    let n3 = &mut cluster.nodes[3];
    assert!(!n3.hand_over_hints(start));
    let past_wait = start + crate::node::membership::HINT_DELIVERY_WAIT_MS + 1;
    assert!(!n3.hand_over_hints(past_wait));
    assert_eq!(n3.membership.hand_overs.len(), 1, "handed over");
    // The hand-over is lost on the way: nothing reached an heir.
    while n3.poll_action().is_some() {}
    assert_eq!(n3.hints_pending_for(&n2), 1, "kept while no heir has it");
    let timeout = n3.config.request_timeout_ms;
    assert!(!n3.hand_over_hints(past_wait + 1));
    assert_eq!(n3.membership.hand_overs.len(), 1, "not sent twice at once");
    while n3.poll_action().is_some() {}
    // After its deadline it goes again, and this time arrives.
    cluster.now = past_wait + timeout + 1;
    let now = cluster.now;
    cluster.nodes[3].hand_over_hints(now);
    cluster.run();
    assert_eq!(cluster.nodes[3].hints_pending_for(&n2), 0);
    assert!(cluster.nodes[3].membership.hand_overs.is_empty());
    assert_eq!(cluster.nodes[3].stats()[Counter::HintsHandedOver], 1);
    let heirs: usize = (0..3)
        .map(|i| cluster.nodes[i].hints_pending_for(&n2))
        .sum();
    assert_eq!(heirs, 1, "an heir keeps the hint for n2");
}

/// While a new node decides between bootstrap and join, the members write to it too: a
/// write acknowledged meanwhile meets its level among the read ring plus the deciding node,
/// so it is on a quorum of the ring the node enters if it bootstraps without streaming.
#[test]
fn members_write_to_a_deciding_node() {
    let mut cluster = gossiping_cluster(3);
    add_node(&mut cluster, 3);
    let n3 = NodeId::new("n3");
    // n2 falls silent while still believed up, so n3 cannot decide: it waits for n2's list.
    cluster.stopped[2] = true;
    tick_until(&mut cluster, 8, |_| false);
    assert!(cluster.nodes[3].membership.deciding);
    let reason = cluster.nodes[3]
        .membership
        .reason
        .clone()
        .unwrap_or_default();
    assert!(reason.contains("n2 to see this node"), "{reason}");
    assert!(cluster.nodes[0].membership.layout.deciding().contains(&n3));
    let keys = keys(60);
    for key in &keys {
        assert!(matches!(
            put_key(&mut cluster, 0, key),
            ClientResponse::Written { .. }
        ));
    }
    let ring = crate::ring::Ring::new(
        (0..4)
            .map(|i| NodeId::new(format!("n{i}")))
            .collect::<Vec<_>>()
            .iter(),
        cluster.nodes[0].config.vnodes,
        3,
    );
    let stores = |i: usize, key: &str| {
        cluster.nodes[i]
            .storage()
            .get("b", key.as_bytes())
            .unwrap()
            .is_some()
    };
    let mut on_n3 = 0;
    for key in &keys {
        let list = ring.preference_list_for_key("b", key.as_bytes());
        let holding = list
            .iter()
            .filter(|id| stores(id.as_str()[1..].parse().unwrap(), key))
            .count();
        assert!(holding >= 2, "{key}: {holding} of {list:?}");
        on_n3 += usize::from(stores(3, key));
    }
    assert!(on_n3 > 0, "n3 received writes while deciding");
    // n2 is back. Whether n3 then joins by streaming (it saw n0's HAS_DATA) or bootstraps
    // (n2's list came first) depends on gossip order; every key reads back either way.
    cluster.stopped[2] = false;
    let joined = tick_until(&mut cluster, 400, |c| {
        c.nodes
            .iter()
            .all(|n| n.peer_state(&n3) == crate::gossip::NodeStatus::Normal)
    });
    assert!(joined);
    for key in &keys {
        for at in 0..4 {
            assert_eq!(
                read_key(&mut cluster, at, key),
                Some(key.as_bytes().to_vec())
            );
        }
    }
}

/// Found by the chaos harness (`mendkv-chaos --nodes 5 --seed 3007`): a joiner's transport
/// handshake reached n4 (cut off from most of the cluster) before the joiner's gossip
/// state did; n4 took it as a `normal` member, put it in the key's read list, met
/// `r=quorum` with its own copy and the joiner's empty answer, and missed writes
/// acknowledged a second before. With gossip running, a peer only the transport names is
/// placed nowhere until gossip describes it (as one described without a status already is).
#[test]
fn a_peer_named_by_the_transport_before_gossip_describes_it_is_placed_nowhere() {
    let mut cluster = gossiping_cluster(3);
    let newcomer = NodeId::new("n3");
    let before = cluster.nodes[0].ring().nodes().clone();
    cluster.nodes[0].handle_member_discovered(member(3));
    assert!(
        !cluster.nodes[0].ring().nodes().contains(&newcomer),
        "n3 is only a handshake away: ring {:?}",
        cluster.nodes[0].ring().nodes()
    );
    assert_eq!(cluster.nodes[0].ring().nodes(), &before);
    for key in keys(50) {
        let token = crate::ring::key_token("b", key.as_bytes());
        for list in cluster.nodes[0].membership.layout.write_lists(token) {
            assert!(!list.contains(&newcomer), "{key}: write list {list:?}");
        }
    }
}

/// Fresh nodes started together, none with data: none bootstraps while a live member has
/// not listed it as deciding (its writes might not reach it); once that member is known
/// down, the others bootstrap without streaming.
#[test]
fn fresh_nodes_bootstrap_only_once_every_live_member_lists_them() {
    let mut cluster = TestCluster::with_config(3, |config| config.learn_epoch_from_peers = true);
    for i in 0..3 {
        for j in (0..3).filter(|j| *j != i) {
            cluster.nodes[i].handle_seed_discovered(0, member(j));
        }
    }
    cluster.run();
    // n2 answers gossip but its ticks do not run, so it never lists the others as deciding.
    for step in 1..=8 {
        let now = step * 250;
        cluster.now = now;
        for node in &mut cluster.nodes[..2] {
            node.handle_tick(now);
        }
        cluster.run();
    }
    for i in 0..2 {
        let node = &cluster.nodes[i];
        assert!(node.membership.deciding, "n{i} must wait for n2");
        let reason = node.membership.reason.clone().unwrap_or_default();
        assert!(reason.contains("n2 to see this node"), "n{i}: {reason}");
    }
    let n2 = NodeId::new("n2");
    let now = cluster.now;
    for i in 0..2 {
        cluster.nodes[i].handle_peer_status(now, &n2, PeerStatus::Down);
    }
    let normal = tick_until(&mut cluster, 40, |c| {
        c.nodes[..2].iter().all(|n| {
            (0..2).all(|i| {
                n.peer_state(&NodeId::new(format!("n{i}"))) == crate::gossip::NodeStatus::Normal
            })
        })
    });
    assert!(normal);
    // Nothing had been written: no one streamed.
    assert!(cluster.nodes[..2]
        .iter()
        .all(|n| n.stats()[Counter::StreamingKeysIn] == 0));
    assert!(matches!(
        put_key(&mut cluster, 1, "k"),
        ClientResponse::Written { .. }
    ));
    assert_eq!(read_key(&mut cluster, 0, "k"), Some(b"k".to_vec()));
}

/// Without gossip (static member lists, as in the simulator's default runs), a member the
/// transport names is taken as normal: nothing else will ever describe it.
#[test]
fn without_gossip_a_member_named_by_the_transport_is_normal() {
    let mut cluster = TestCluster::new(3);
    cluster.nodes[0].handle_member_discovered(member(3));
    assert!(cluster.nodes[0].ring().nodes().contains(&NodeId::new("n3")));
}

/// A down member blocks changes (it cannot acknowledge them): a decommission is refused up
/// front naming it, a join waits and says for whom, and `remove-node` of the dead member is
/// accepted while the join is in progress; then both complete and every write is readable.
#[test]
fn a_down_member_blocks_changes_until_it_is_removed() {
    let mut cluster = gossiping_cluster(4);
    let keys = keys(100);
    for key in &keys {
        put_key(&mut cluster, 0, key);
    }
    let n3 = NodeId::new("n3");
    cluster.stopped[3] = true;
    for i in 0..3 {
        let now = cluster.now;
        cluster.nodes[i].handle_peer_status(now, &n3, PeerStatus::Down);
    }
    match cluster.request(1, ClientRequest::Decommission) {
        ClientResponse::Conflict(reason) => {
            assert!(
                reason.contains("n3 is down") && reason.contains("mendkv remove-node n3"),
                "{reason}"
            );
        }
        other => panic!("decommission with n3 down: {other:?}"),
    }
    // A join waits for n3, and says so.
    add_node(&mut cluster, 4);
    let n4 = NodeId::new("n4");
    tick_until(&mut cluster, 20, |_| false);
    let progress = cluster.nodes[4].change_progress(&n4, cluster.now);
    assert_eq!(progress.phase, "waiting", "{progress:?}");
    let reason = progress.reason.unwrap_or_default();
    assert!(
        reason.contains("n3") && reason.contains("remove-node n3"),
        "{reason}"
    );
    // Removing the dead node is accepted while the join is in progress, and unblocks it.
    assert!(matches!(
        cluster.request(0, ClientRequest::RemoveNode { node: n3.clone() }),
        ClientResponse::Change(_)
    ));
    let done = tick_until(&mut cluster, 1200, |c| {
        c.nodes[..3].iter().all(|n| n.is_removed(&n3))
            && c.nodes[..3]
                .iter()
                .all(|n| n.peer_state(&n4) == crate::gossip::NodeStatus::Normal)
    });
    assert!(
        done,
        "{:?} / {:?}",
        cluster.nodes[0].change_progress(&n3, cluster.now),
        cluster.nodes[4].change_progress(&n4, cluster.now)
    );
    for key in &keys {
        for at in [0, 1, 2, 4] {
            assert_eq!(
                read_key(&mut cluster, at, key),
                Some(key.as_bytes().to_vec()),
                "{key} through n{at}"
            );
        }
    }
}

/// A decommission still `streaming` when a dead node's removal would leave too few normal
/// nodes is cancelled, so the cluster never ends below RF nodes.
#[test]
fn a_removal_cancels_a_decommission_that_would_leave_too_few_nodes() {
    let mut cluster = gossiping_cluster(4);
    for key in &keys(20) {
        put_key(&mut cluster, 0, key);
    }
    // One range at a time, so the decommission is still streaming when the removal comes.
    for node in &mut cluster.nodes {
        node.config.anti_entropy.stream_concurrency = 1;
    }
    assert!(matches!(
        cluster.request(3, ClientRequest::Decommission),
        ClientResponse::Change(_)
    ));
    let n3 = NodeId::new("n3");
    let streaming = tick_until(&mut cluster, 40, |c| {
        c.nodes[3].change_progress(&n3, c.now).phase == "streaming"
    });
    assert!(streaming);
    let n2 = NodeId::new("n2");
    cluster.stopped[2] = true;
    for i in [0, 1, 3] {
        let now = cluster.now;
        cluster.nodes[i].handle_peer_status(now, &n2, PeerStatus::Down);
    }
    assert!(matches!(
        cluster.request(0, ClientRequest::RemoveNode { node: n2.clone() }),
        ClientResponse::Change(_)
    ));
    let done = tick_until(&mut cluster, 1200, |c| {
        [0, 1, 3].iter().all(|i| c.nodes[*i].is_removed(&n2))
    });
    assert!(
        done,
        "{:?}",
        cluster.nodes[0].change_progress(&n2, cluster.now)
    );
    assert_eq!(
        cluster.nodes[3].own_state(),
        crate::gossip::NodeStatus::Normal,
        "the decommission was cancelled"
    );
}

/// The ranges an old owner must clean up are durable: a node restarted after a join but
/// before its cleanup scan resumes it, and ends holding only keys it owns.
#[test]
fn cleanup_resumes_after_a_restart() {
    let mut cluster = gossiping_cluster(3);
    let keys = keys(200);
    for key in &keys {
        put_key(&mut cluster, 0, key);
    }
    add_node(&mut cluster, 3);
    let n3 = NodeId::new("n3");
    let joined = tick_until(&mut cluster, 400, |c| {
        c.nodes
            .iter()
            .all(|n| n.peer_state(&n3) == crate::gossip::NodeStatus::Normal)
    });
    assert!(joined);
    assert!(cluster.nodes[0].cleanup_ranges_pending() > 0);
    assert_eq!(cluster.nodes[0].stats()[Counter::CleanupKeys], 0);
    let held_before = stored_keys(&cluster.nodes[0]);
    // n0 stops before its scan (a crash keeps what was synced: sync first, as a crash
    // after the record's fsync would).
    let now = cluster.now;
    cluster.nodes[0].sync_now();
    let storage = cluster.take_storage(0);
    storage.crash(0);
    let mut restarted = Node::new(NodeConfig::new("n0"), storage, now).unwrap();
    assert!(
        restarted.cleanup_ranges_pending() > 0,
        "the ranges to clean were read back from the membership record"
    );
    for i in 1..4 {
        restarted.handle_seed_discovered(now, member(i));
    }
    cluster.nodes[0] = restarted;
    cluster.run();
    let cleaned = tick_until(&mut cluster, 400, |c| {
        c.nodes[0].cleanup_ranges_pending() == 0 && c.nodes[0].stats()[Counter::CleanupKeys] > 0
    });
    assert!(
        cleaned,
        "{} pending",
        cluster.nodes[0].cleanup_ranges_pending()
    );
    let node = &cluster.nodes[0];
    let held_after = stored_keys(node);
    assert!(held_after < held_before, "{held_before} -> {held_after}");
    for (stored, _) in node.storage().objects() {
        assert!(
            node.layout().owns(
                node.id(),
                crate::ring::key_token(&stored.bucket, &stored.key)
            ),
            "n0 kept a key it does not own"
        );
    }
    for key in &keys {
        for at in 0..4 {
            assert_eq!(
                read_key(&mut cluster, at, key),
                Some(key.as_bytes().to_vec()),
                "{key} through n{at}"
            );
        }
    }
}

/// A removed node that comes back with its old data is refused by its peers, not only by
/// its HTTP gate: its requests get no answer, its gossip does not undo the removal or
/// spread what it holds of others, it takes no writes, and it refuses clients itself.
#[test]
fn a_removed_node_that_comes_back_is_refused_by_its_peers() {
    let mut cluster = gossiping_cluster(4);
    for key in &keys(20) {
        put_key(&mut cluster, 0, key);
    }
    let n3 = NodeId::new("n3");
    cluster.stopped[3] = true;
    let now = cluster.now;
    cluster.nodes[0].handle_peer_status(now, &n3, PeerStatus::Down);
    assert!(matches!(
        cluster.request(0, ClientRequest::RemoveNode { node: n3.clone() }),
        ClientResponse::Change(_)
    ));
    let removed = tick_until(&mut cluster, 600, |c| {
        c.nodes[..3].iter().all(|n| n.is_removed(&n3))
    });
    assert!(removed);
    // A stopped node of the test cluster still sends (only messages to it fail): its gossip
    // may already have been refused.
    let mut logged: Vec<Vec<NodeId>> = cluster.nodes[..3]
        .iter_mut()
        .map(|n| n.take_newly_refused_peers())
        .collect();
    let refused_before: u64 = cluster.nodes[..3]
        .iter()
        .map(|n| n.stats()[Counter::PeerMessagesFromRemoved])
        .sum();

    // n3 comes back with its data.
    let now = cluster.now;
    let storage = cluster.take_storage(3);
    let mut back = Node::new(NodeConfig::new("n3"), storage, now).unwrap();
    for i in 0..3 {
        back.handle_seed_discovered(now, member(i));
    }
    cluster.nodes[3] = back;
    cluster.stopped[3] = false;
    cluster.run();
    tick_until(&mut cluster, 20, |_| false);

    assert!(cluster.nodes[3].is_refused(), "it learned it was removed");
    assert!(matches!(
        put_key(&mut cluster, 3, "through-the-removed-node"),
        ClientResponse::NotReady(reason) if reason.contains("removed")
    ));
    let refused: u64 = cluster.nodes[..3]
        .iter()
        .map(|n| n.stats()[Counter::PeerMessagesFromRemoved])
        .sum();
    assert!(refused > refused_before, "its peers refused its messages");
    for (i, node) in cluster.nodes[..3].iter_mut().enumerate() {
        logged[i].extend(node.take_newly_refused_peers());
    }
    assert!(
        logged
            .iter()
            .all(|l| l.is_empty() || l == std::slice::from_ref(&n3)),
        "each refused peer is logged once: {logged:?}"
    );
    assert!(logged.iter().any(|l| !l.is_empty()), "{logged:?}");
    for node in &cluster.nodes[..3] {
        assert!(node.is_removed(&n3), "its gossip did not undo the removal");
        assert_eq!(node.peer_state(&n3), crate::gossip::NodeStatus::Left);
    }

    // A request from it gets no answer; writes no longer reach it.
    let now = cluster.now;
    cluster.nodes[0].handle_message(
        now,
        &n3,
        Message::Read {
            request: 1,
            bucket: "b".into(),
            key: b"key-1".to_vec(),
        },
    );
    let mut answered = false;
    while let Some(action) = cluster.nodes[0].poll_action() {
        answered |= matches!(action, Action::Send { to, .. } if to == n3);
    }
    assert!(!answered, "a removed node's read is not served");
    assert_writes_skip(&mut cluster, 3);
}

/// Found by the chaos soak (seed 5003): a node killed -9 during its decommission restarts
/// knowing only itself and a seed, counted too few normal members and cancelled its own
/// decommission ("not enough nodes to hold RF copies"), which then never finished. The
/// cancellation is judged on a settled view of the cluster only.
#[test]
fn a_decommission_survives_a_restart_before_the_view_is_whole() {
    let mut cluster = gossiping_cluster(5);
    for key in keys(50) {
        put_key(&mut cluster, 0, &key);
    }
    assert!(matches!(
        cluster.request(4, ClientRequest::Decommission),
        ClientResponse::Change(_)
    ));
    tick_until(&mut cluster, 2, |_| false);
    assert_eq!(
        cluster.nodes[4].own_state(),
        crate::gossip::NodeStatus::Leaving
    );
    // kill -9 and restart with one seed: it knows only itself and n0 at first.
    let now = cluster.now;
    let storage = cluster.take_storage(4);
    storage.crash(0);
    let mut config = NodeConfig::new("n4");
    config.learn_epoch_from_peers = true;
    let mut restarted = Node::new(config, storage, now).unwrap();
    restarted.handle_seed_discovered(now, member(0));
    // Its timer fires before any gossip answer arrived.
    restarted.handle_tick(now + 1);
    assert_eq!(
        restarted.own_state(),
        crate::gossip::NodeStatus::Leaving,
        "{:?}",
        restarted.membership.reason
    );
    cluster.nodes[4] = restarted;
    cluster.run();
    let left = tick_until(&mut cluster, 400, |c| {
        c.nodes[4].own_state() == crate::gossip::NodeStatus::Left
    });
    assert!(
        left,
        "{:?} {:?}",
        cluster.nodes[4].own_state(),
        cluster.nodes[4].membership.reason
    );
}

/// The test cluster index of node `id` (`nK` is node K).
fn index_of(id: &NodeId) -> usize {
    id.as_str()[1..].parse().unwrap()
}

/// Every key is stored on each of its RF owners in `node`'s read ring.
fn assert_on_rf_owners(cluster: &TestCluster, node: usize, keys: &[String]) {
    let ring = cluster.nodes[node].ring().clone();
    for key in keys {
        let owners = ring.preference_list_for_key("b", key.as_bytes());
        assert_eq!(owners.len(), 3, "{key}: {owners:?}");
        for owner in &owners {
            let stored = cluster.nodes[index_of(owner)]
                .storage()
                .get("b", key.as_bytes())
                .ok()
                .flatten()
                .is_some();
            assert!(
                stored,
                "{key} missing on its owner {owner} (owners {owners:?})"
            );
        }
    }
}

/// Writes `count` keys named `{prefix}-{i}` through the live nodes in turn, one per 250 ms
/// tick; returns the acknowledged ones.
fn write_while_ticking(
    cluster: &mut TestCluster,
    prefix: &str,
    count: usize,
    live: &[usize],
) -> Vec<String> {
    let mut acked = Vec::new();
    for i in 0..count {
        let key = format!("{prefix}-{i}");
        if matches!(
            put_key(cluster, live[i % live.len()], &key),
            ClientResponse::Written { .. }
        ) {
            acked.push(key);
        }
        let now = cluster.now + 250;
        cluster.tick(now);
    }
    acked
}

/// A four-node cluster with data, and n4 joining it, killed (kill -9: its storage kept as
/// it would be on disk) while it streams its ranges, with writes before and during the
/// join; then the survivors' failure detectors call it down (writes go on meanwhile).
/// Returns the acknowledged keys and n4's storage.
fn a_joiner_killed_mid_stream(cluster: &mut TestCluster) -> (Vec<String>, MemoryStorage) {
    let mut acked: Vec<String> = Vec::new();
    for key in keys(150) {
        assert!(matches!(
            put_key(cluster, 0, &key),
            ClientResponse::Written { .. }
        ));
        acked.push(key);
    }
    add_node(cluster, 4);
    // One range at a time, so that a tick finds it between ranges (messages here arrive
    // at once: eight at a time pull these 150 keys in one tick).
    cluster.nodes[4].config.anti_entropy.stream_concurrency = 1;
    let n4 = NodeId::new("n4");
    let mut streaming = false;
    for i in 0..400 {
        let progress = cluster.nodes[4].change_progress(&n4, cluster.now);
        if progress.phase == "streaming" && progress.ranges_done > 0 {
            assert!(
                progress.ranges_done < progress.ranges_total,
                "killed mid-stream: {progress:?}"
            );
            streaming = true;
            break;
        }
        let key = format!("during-join-{i}");
        if matches!(
            put_key(cluster, i % 4, &key),
            ClientResponse::Written { .. }
        ) {
            acked.push(key);
        }
        let now = cluster.now + 250;
        cluster.tick(now);
    }
    assert!(streaming, "n4 streams");
    let storage = cluster.take_storage(4);
    storage.crash(0);
    cluster.stopped[4] = true;
    let mut i = 0;
    while cluster.nodes[..4]
        .iter()
        .any(|n| n.peer_liveness(&n4) != crate::gossip::Liveness::Down)
    {
        assert!(i < 200, "the failure detectors call n4 down");
        acked.extend(write_while_ticking(
            cluster,
            &format!("after-kill-{i}"),
            1,
            &[0, 1, 2, 3],
        ));
        i += 1;
    }
    // Its join is stuck: it cannot acknowledge, and no one else moves it.
    assert_eq!(
        cluster.nodes[0].peer_state(&n4),
        crate::gossip::NodeStatus::Joining
    );
    (acked, storage)
}

/// Removes the dead joiner n4 through n1 and waits until every survivor completed it, with
/// writes going on; returns the keys acknowledged meanwhile. Throughout, no survivor places
/// n4 in its old (so its read) ring, and the removal streams nothing: the joiner was never
/// the only copy of anything, so there is nothing to re-replicate.
fn remove_the_dead_joiner(cluster: &mut TestCluster) -> Vec<String> {
    let n4 = NodeId::new("n4");
    let streamed = |c: &TestCluster| -> Vec<u64> {
        c.nodes[..4]
            .iter()
            .map(|n| n.stats()[Counter::StreamingRangesDone])
            .collect()
    };
    let streamed_before = streamed(cluster);
    match cluster.request(1, ClientRequest::RemoveNode { node: n4.clone() }) {
        ClientResponse::Change(progress) => {
            assert_eq!(progress.change.as_deref(), Some("remove"), "{progress:?}")
        }
        other => panic!("remove-node of the dead joiner: {other:?}"),
    }
    let mut acked = Vec::new();
    for i in 0..600 {
        for (j, node) in cluster.nodes[..4].iter().enumerate() {
            assert!(
                !node.layout().old_ring().nodes().contains(&n4),
                "n{j} placed the dead joiner among the owners: {:?}",
                node.change_progress(&n4, cluster.now)
            );
        }
        assert_eq!(streamed(cluster), streamed_before, "the removal streamed");
        if cluster.nodes[..4].iter().all(|n| n.is_removed(&n4)) {
            return acked;
        }
        acked.extend(write_while_ticking(
            cluster,
            &format!("removal-{i}"),
            1,
            &[0, 1, 2, 3],
        ));
    }
    panic!(
        "the removal did not finish: {:?}",
        cluster.nodes[1].change_progress(&n4, cluster.now)
    );
}

/// No ring of the survivors holds n4 any more, and no change is left active.
fn assert_in_no_ring(cluster: &TestCluster, survivors: &[usize], gone: &NodeId) {
    for &i in survivors {
        let node = &cluster.nodes[i];
        let layout = node.layout();
        assert!(layout.active().is_none(), "n{i}: {:?}", layout.active());
        for ring in [layout.old_ring(), layout.new_ring(), layout.partition()] {
            assert!(!ring.nodes().contains(gone), "n{i}: {:?}", ring.nodes());
        }
        assert_eq!(
            node.change_progress(gone, cluster.now).state,
            "left",
            "n{i}"
        );
    }
}

/// Issue 13: a joiner that died while streaming blocked every later change for good (it
/// cannot acknowledge, and `remove-node` took only normal or leaving nodes). It can be
/// removed now: the removal finishes, no ring holds it, every acknowledged key (before,
/// during the join, after the kill, during the removal) is on its RF owners, and the dead
/// joiner that comes back with its data is refused by its peers.
#[test]
fn a_joiner_killed_mid_stream_can_be_removed() {
    let mut cluster = gossiping_cluster(4);
    let (mut acked, storage) = a_joiner_killed_mid_stream(&mut cluster);
    let n4 = NodeId::new("n4");
    acked.extend(remove_the_dead_joiner(&mut cluster));
    assert_in_no_ring(&cluster, &[0, 1, 2, 3], &n4);
    assert_on_rf_owners(&cluster, 0, &acked);
    for key in &acked {
        assert_eq!(
            read_key(&mut cluster, 2, key),
            Some(key.as_bytes().to_vec()),
            "{key}"
        );
    }

    // n4 comes back with its data: it stays removed.
    let refused_before: u64 = cluster.nodes[..4]
        .iter()
        .map(|n| n.stats()[Counter::PeerMessagesFromRemoved])
        .sum();
    let now = cluster.now;
    let mut config = NodeConfig::new("n4");
    config.learn_epoch_from_peers = true;
    let mut back = Node::new(config, storage, now).unwrap();
    assert_eq!(back.own_state(), crate::gossip::NodeStatus::Joining);
    for i in 0..4 {
        back.handle_seed_discovered(now, member(i));
    }
    cluster.nodes[4] = back;
    cluster.stopped[4] = false;
    cluster.run();
    tick_until(&mut cluster, 20, |_| false);
    assert!(cluster.nodes[4].is_refused(), "it learned it was removed");
    let refused: u64 = cluster.nodes[..4]
        .iter()
        .map(|n| n.stats()[Counter::PeerMessagesFromRemoved])
        .sum();
    assert!(refused > refused_before, "its peers refused its messages");
    assert_in_no_ring(&cluster, &[0, 1, 2, 3], &n4);
    assert!(matches!(
        put_key(&mut cluster, 4, "through-the-removed-joiner"),
        ClientResponse::NotReady(reason) if reason.contains("removed")
    ));
    assert_writes_skip(&mut cluster, 4);
}

/// Once the dead joiner is removed its abandoned join no longer holds the cluster: a fifth
/// node joins and becomes normal everywhere, and every acknowledged key is on its RF owners
/// of the final ring.
#[test]
fn after_a_dead_joiner_is_removed_another_node_joins() {
    let mut cluster = gossiping_cluster(4);
    let (mut acked, _storage) = a_joiner_killed_mid_stream(&mut cluster);
    acked.extend(remove_the_dead_joiner(&mut cluster));
    add_node(&mut cluster, 5);
    let n5 = NodeId::new("n5");
    let live = [0, 1, 2, 3, 5];
    let mut joined = false;
    for i in 0..800 {
        joined = live
            .iter()
            .all(|&j| cluster.nodes[j].peer_state(&n5) == crate::gossip::NodeStatus::Normal)
            && live
                .iter()
                .all(|&j| cluster.nodes[j].layout().active().is_none());
        if joined {
            break;
        }
        acked.extend(write_while_ticking(
            &mut cluster,
            &format!("second-join-{i}"),
            1,
            &live,
        ));
    }
    assert!(
        joined,
        "{:?}",
        cluster.nodes[5].change_progress(&n5, cluster.now)
    );
    assert!(cluster.nodes[0].ring().nodes().contains(&n5));
    for &i in &live {
        assert_on_rf_owners(&cluster, i, &acked);
    }
    for key in &acked {
        assert_eq!(
            read_key(&mut cluster, 5, key),
            Some(key.as_bytes().to_vec()),
            "{key}"
        );
    }
}

/// A joiner that is up is not removed (409, as for any up node): it is decommissioned, or
/// its join completes.
#[test]
fn removing_an_up_joiner_is_a_conflict() {
    let mut cluster = gossiping_cluster(4);
    for key in keys(50) {
        put_key(&mut cluster, 0, &key);
    }
    add_node(&mut cluster, 4);
    let n4 = NodeId::new("n4");
    let streaming = tick_until(&mut cluster, 400, |c| {
        c.nodes[4].change_progress(&n4, c.now).phase == "streaming"
    });
    assert!(streaming);
    assert!(matches!(
        cluster.request(1, ClientRequest::RemoveNode { node: n4.clone() }),
        ClientResponse::Conflict(reason) if reason.contains("is up")
    ));
    let joined = tick_until(&mut cluster, 400, |c| {
        c.nodes
            .iter()
            .all(|n| n.peer_state(&n4) == crate::gossip::NodeStatus::Normal)
    });
    assert!(joined, "the join completes");
    assert!(!cluster.nodes[0].is_removed(&n4));
}

/// A node removed while it was dead and still deciding between bootstrap and join (it took
/// replica writes meanwhile) that comes back with its data stays removed: it does not
/// decide again, which would announce a join generation above the removal's and lift it.
#[test]
fn a_deciding_node_removed_while_dead_stays_removed_when_it_comes_back() {
    let mut cluster = gossiping_cluster(4);
    add_node(&mut cluster, 4);
    let n4 = NodeId::new("n4");
    // n3 falls silent while still believed up, so n4 cannot decide: it waits for n3's list.
    cluster.stopped[3] = true;
    tick_until(&mut cluster, 8, |_| false);
    assert!(cluster.nodes[4].membership.deciding);
    for key in keys(30) {
        assert!(matches!(
            put_key(&mut cluster, 0, &key),
            ClientResponse::Written { .. }
        ));
    }
    assert!(stored_keys(&cluster.nodes[4]) > 0, "it took replica writes");
    // n4 dies still deciding; n3 is back.
    let storage = cluster.take_storage(4);
    cluster.stopped[4] = true;
    cluster.stopped[3] = false;
    let down = tick_until(&mut cluster, 200, |c| {
        c.nodes[..4]
            .iter()
            .all(|n| n.peer_liveness(&n4) == crate::gossip::Liveness::Down)
    });
    assert!(down);
    assert!(matches!(
        cluster.request(1, ClientRequest::RemoveNode { node: n4.clone() }),
        ClientResponse::Change(_)
    ));
    let removed = tick_until(&mut cluster, 600, |c| {
        c.nodes[..4].iter().all(|n| n.is_removed(&n4))
    });
    assert!(
        removed,
        "{:?}",
        cluster.nodes[1].change_progress(&n4, cluster.now)
    );
    assert_in_no_ring(&cluster, &[0, 1, 2, 3], &n4);

    // It comes back with its data.
    let now = cluster.now;
    let mut config = NodeConfig::new("n4");
    config.learn_epoch_from_peers = true;
    let mut back = Node::new(config, storage, now).unwrap();
    assert!(back.membership.deciding);
    for i in 0..4 {
        back.handle_seed_discovered(now, member(i));
    }
    cluster.nodes[4] = back;
    cluster.stopped[4] = false;
    cluster.run();
    tick_until(&mut cluster, 40, |_| false);
    assert!(cluster.nodes[4].is_refused(), "it learned it was removed");
    assert!(cluster.nodes[4].membership.deciding, "and did not decide");
    for node in &cluster.nodes[..4] {
        assert!(node.is_removed(&n4), "its removal was not lifted");
    }
    assert_in_no_ring(&cluster, &[0, 1, 2, 3], &n4);
}

/// A write through node 0 after node `removed` came back is acknowledged without it: its
/// storage never gets the key.
fn assert_writes_skip(cluster: &mut TestCluster, removed: usize) {
    assert!(matches!(
        put_key(cluster, 0, "after-its-return"),
        ClientResponse::Written { .. }
    ));
    assert!(cluster.nodes[removed]
        .storage()
        .get("b", b"after-its-return")
        .ok()
        .flatten()
        .is_none());
}
