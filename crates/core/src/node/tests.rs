//! Small in-process cluster tests of the node; the simulator has the fault-injecting ones.

use super::*;
use crate::anti_entropy::ExchangeId;
use crate::control::{RepairQueue, RepairQueueConfig};
use crate::message::ReplicaError;
use crate::storage::MemoryStorage;
use crate::version::Actor;
use bytes::Bytes;

mod buckets;
mod membership;
mod repair_runs;
mod roots;
mod storage_full;

struct TestCluster {
    nodes: Vec<Node<MemoryStorage>>,
    replies: Vec<(usize, ClientRequestId, ClientResponse)>,
    /// Nodes whose messages are dropped (as if stopped).
    stopped: Vec<bool>,
    /// The time messages are handled at (set by `tick`).
    now: Millis,
}

impl TestCluster {
    fn new(n: usize) -> Self {
        Self::with_config(n, |_| {})
    }

    fn with_config(n: usize, configure: impl Fn(&mut NodeConfig)) -> Self {
        let infos: Vec<MemberInfo> = (0..n)
            .map(|i| MemberInfo {
                id: NodeId::new(format!("n{i}")),
                peer_address: format!("p{i}"),
                http_address: format!("h{i}"),
            })
            .collect();
        let nodes = infos
            .iter()
            .map(|info| {
                let mut config = NodeConfig::new(info.id.as_str());
                configure(&mut config);
                let mut node = Node::new(config, MemoryStorage::new(), 0).unwrap();
                for other in &infos {
                    node.handle_member_discovered(other.clone());
                }
                node
            })
            .collect();
        TestCluster {
            nodes,
            replies: vec![],
            stopped: vec![false; n],
            now: 0,
        }
    }

    fn index(&self, id: &NodeId) -> usize {
        self.nodes.iter().position(|n| n.id() == id).unwrap()
    }

    /// Delivers every message and sync until nothing moves. Bounded (quinn-proto's
    /// `drive_bounded`): a protocol that keeps talking forever fails the test by name
    /// instead of hanging it.
    fn run(&mut self) {
        const MAX_ACTIONS: usize = 1_000_000;
        let mut actions = 0usize;
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                self.nodes[i].sync_now();
                while let Some(action) = self.nodes[i].poll_action() {
                    moved = true;
                    actions += 1;
                    assert!(
                        actions <= MAX_ACTIONS,
                        "TestCluster::run: still busy after {MAX_ACTIONS} actions (a message loop?)"
                    );
                    match action {
                        Action::Reply { client, response } => {
                            self.replies.push((i, client, response))
                        }
                        Action::Send { to, message } => {
                            let j = self.index(&to);
                            let from = self.nodes[i].id().clone();
                            let now = self.now;
                            if self.stopped[j] {
                                self.nodes[i].handle_send_failed(now, &to, &message);
                            } else {
                                self.nodes[j].handle_message(now, &from, message);
                            }
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn request(&mut self, at: usize, request: ClientRequest) -> ClientResponse {
        let client = self.replies.len() as u64 + 1000;
        let now = self.now;
        self.nodes[at].handle_client_request(now, client, request);
        self.run();
        let position = self
            .replies
            .iter()
            .position(|(_, c, _)| *c == client)
            .expect("a reply");
        self.replies.remove(position).2
    }

    fn put(
        &mut self,
        at: usize,
        value: &str,
        context: CausalContext,
        level: ConsistencyLevel,
    ) -> ClientResponse {
        self.request(
            at,
            ClientRequest::Put {
                bucket: "b".into(),
                key: b"k".to_vec(),
                context,
                value: data(value),
                level,
            },
        )
    }

    fn get(&mut self, at: usize, level: ConsistencyLevel) -> ClientResponse {
        self.request(
            at,
            ClientRequest::Get {
                bucket: "b".into(),
                key: b"k".to_vec(),
                level,
            },
        )
    }
}

fn data(value: &str) -> Value {
    Value::Data {
        bytes: Bytes::copy_from_slice(value.as_bytes()),
        content_type: "text/plain".into(),
    }
}

fn live(response: &ClientResponse) -> Vec<Value> {
    match response {
        ClientResponse::Object(o) => o.live_values().map(|s| s.value.clone()).collect(),
        other => panic!("not an object: {other:?}"),
    }
}

/// A quorum write through one node is read back at quorum through every node.
#[test]
fn read_your_write_through_every_node() {
    let mut cluster = TestCluster::new(3);
    assert!(matches!(
        cluster.put(0, "v1", CausalContext::empty(), ConsistencyLevel::Quorum),
        ClientResponse::Written { .. }
    ));
    for i in 0..3 {
        assert_eq!(
            live(&cluster.get(i, ConsistencyLevel::Quorum)),
            vec![data("v1")]
        );
    }
}

/// Two blind writes make siblings; a write with the read's context resolves them.
#[test]
fn siblings_and_resolution() {
    let mut cluster = TestCluster::new(3);
    cluster.put(0, "a", CausalContext::empty(), ConsistencyLevel::Quorum);
    cluster.put(1, "b", CausalContext::empty(), ConsistencyLevel::Quorum);
    let read = cluster.get(2, ConsistencyLevel::All);
    assert_eq!(live(&read).len(), 2);
    let ClientResponse::Object(object) = read else {
        unreachable!()
    };
    cluster.put(2, "c", object.causal_context(), ConsistencyLevel::Quorum);
    assert_eq!(
        live(&cluster.get(0, ConsistencyLevel::All)),
        vec![data("c")]
    );
}

/// With one replica stopped, quorum still works and `all` is unavailable with counts.
#[test]
fn one_replica_down() {
    let mut cluster = TestCluster::new(3);
    cluster.stopped[2] = true;
    assert!(matches!(
        cluster.put(0, "v", CausalContext::empty(), ConsistencyLevel::Quorum),
        ClientResponse::Written { .. }
    ));
    // The write fails as soon as the level is out of reach (fail fast), saying so.
    assert!(matches!(
        cluster.put(0, "v", CausalContext::empty(), ConsistencyLevel::All),
        ClientResponse::Unavailable { needed: 3, answered } if answered < 3
    ));
    assert_eq!(live(&cluster.get(1, ConsistencyLevel::Quorum)).len(), 2);
}

/// A plain delete (no context) reads first and deletes everything it saw.
#[test]
fn plain_delete_deletes() {
    let mut cluster = TestCluster::new(3);
    cluster.put(0, "a", CausalContext::empty(), ConsistencyLevel::Quorum);
    cluster.put(1, "b", CausalContext::empty(), ConsistencyLevel::Quorum);
    let response = cluster.request(
        2,
        ClientRequest::Delete {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: None,
            level: ConsistencyLevel::Quorum,
        },
    );
    assert!(matches!(response, ClientResponse::Written { .. }));
    let ClientResponse::Object(object) = cluster.get(0, ConsistencyLevel::All) else {
        panic!()
    };
    assert!(object.is_deleted());
}

/// Found by the simulator (seeds 98 and 250, `--faults all`): a plain delete at `all` whose
/// read found the key already deleted on some replicas but still live on others (here the
/// coordinator's own copy) was acknowledged without writing anything, so a read at `one`
/// from the stale replica returned the value the acknowledged delete superseded. The
/// delete must leave every replica its level needs holding the deletion.
#[test]
fn plain_delete_at_all_reaches_replicas_that_still_hold_the_value() {
    let mut cluster = TestCluster::new(3);
    let ClientResponse::Written { context } =
        cluster.put(0, "v", CausalContext::empty(), ConsistencyLevel::All)
    else {
        panic!("put failed")
    };
    // A delete at quorum while n2 is stopped: the tombstone reaches n0 and n1 only (n2's
    // hint waits for a handoff that this test never lets run).
    cluster.stopped[2] = true;
    let deleted = cluster.request(
        0,
        ClientRequest::Delete {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: Some(context),
            level: ConsistencyLevel::Quorum,
        },
    );
    assert!(matches!(deleted, ClientResponse::Written { .. }));
    cluster.stopped[2] = false;
    assert!(
        !cluster.nodes[2]
            .storage()
            .get("b", b"k")
            .unwrap()
            .unwrap()
            .is_deleted(),
        "n2 still holds the live value"
    );
    // A plain delete at `all` through n2 reads the tombstone from n0 and n1, its own live
    // copy, and merges to a deletion...
    let deleted = cluster.request(
        2,
        ClientRequest::Delete {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: None,
            level: ConsistencyLevel::All,
        },
    );
    assert!(matches!(deleted, ClientResponse::Written { .. }));
    // ...and once acknowledged, every replica holds a deletion: a read at `one` anywhere
    // finds the key deleted.
    for i in 0..3 {
        let ClientResponse::Object(object) = cluster.get(i, ConsistencyLevel::One) else {
            panic!("read failed")
        };
        assert!(object.is_deleted(), "n{i} still shows {object:?}");
    }
}

/// Acknowledgements wait for the sync under the default policy, and a failed sync turns
/// them into errors.
#[test]
fn acknowledgement_waits_for_sync() {
    let mut node = Node::new(NodeConfig::new("solo"), MemoryStorage::new(), 0).unwrap();
    node.handle_client_request(
        0,
        1,
        ClientRequest::Put {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: CausalContext::empty(),
            value: data("x"),
            level: ConsistencyLevel::One,
        },
    );
    assert_eq!(node.poll_action(), None, "held until durable");
    let ticket = node.begin_sync().unwrap();
    assert_eq!(node.poll_action(), None);
    node.finish_sync(ticket, Err(StorageError::Engine("disk full".into())));
    assert!(matches!(
        node.poll_action(),
        Some(Action::Reply {
            response: ClientResponse::StorageFailed(_),
            ..
        })
    ));
}

/// The epoch grows on every start, so actors never repeat.
#[test]
fn epoch_grows_across_restarts() {
    let storage = MemoryStorage::new();
    let first = Node::new(NodeConfig::new("n"), storage.clone(), 0)
        .unwrap()
        .epoch();
    let second = Node::new(NodeConfig::new("n"), storage, 0).unwrap().epoch();
    assert_eq!(second, first + 1);
}

fn local(cluster: &mut TestCluster, at: usize) -> Option<Object> {
    match cluster.request(
        at,
        ClientRequest::GetLocal {
            bucket: "b".into(),
            key: b"k".to_vec(),
        },
    ) {
        ClientResponse::Local(object) => object,
        other => panic!("{other:?}"),
    }
}

/// A replica that missed a write is found stale by a read and repaired before the answer
/// (blocking mode), and the repair is counted.
#[test]
fn read_repair_fixes_a_stale_replica() {
    let mut cluster = TestCluster::new(3);
    cluster.stopped[2] = true;
    cluster.put(0, "v1", CausalContext::empty(), ConsistencyLevel::Quorum);
    cluster.stopped[2] = false;
    assert_eq!(local(&mut cluster, 2), None, "stale before the read");
    assert_eq!(
        live(&cluster.get(1, ConsistencyLevel::All)),
        vec![data("v1")]
    );
    let repaired = local(&mut cluster, 2).expect("repaired");
    assert_eq!(repaired.live_values().count(), 1);
    assert_eq!(cluster.nodes[1].stats()[Counter::ReadRepairRepaired], 1);
    assert_eq!(cluster.nodes[1].stats()[Counter::ReadRepairWritesOk], 1);
}

/// Siblings held by two different stale replicas are merged by a read, never lost.
#[test]
fn read_repair_merges_siblings_from_two_replicas() {
    let mut cluster = TestCluster::new(3);
    cluster.stopped[1] = true;
    cluster.put(0, "a", CausalContext::empty(), ConsistencyLevel::One);
    cluster.stopped[1] = false;
    cluster.stopped[0] = true;
    cluster.put(1, "b", CausalContext::empty(), ConsistencyLevel::One);
    cluster.stopped[0] = false;
    let answer = cluster.get(2, ConsistencyLevel::All);
    assert_eq!(live(&answer).len(), 2);
    for i in 0..3 {
        assert_eq!(
            local(&mut cluster, i).unwrap().live_values().count(),
            2,
            "replica {i}"
        );
    }
}

impl TestCluster {
    /// Takes node `i`'s storage out of the cluster, as a stop does; a stand-in with empty
    /// storage holds its place until the caller puts a restarted node back.
    fn take_storage(&mut self, i: usize) -> MemoryStorage {
        let id = self.nodes[i].id().to_string();
        let stand_in = Node::new(NodeConfig::new(id), MemoryStorage::new(), self.now).unwrap();
        std::mem::replace(&mut self.nodes[i], stand_in).into_storage()
    }

    fn tick(&mut self, now: Millis) {
        self.now = now;
        for node in &mut self.nodes {
            node.handle_tick(now);
        }
        self.run();
    }
}

/// A write that cannot reach a replica leaves a durable hint; when the replica is back the
/// hint is replayed and removed.
#[test]
fn hints_are_stored_and_delivered() {
    let mut cluster = TestCluster::new(3);
    cluster.stopped[2] = true;
    cluster.put(0, "v1", CausalContext::empty(), ConsistencyLevel::Quorum);
    assert_eq!(cluster.nodes[0].hints_pending_for(&NodeId::new("n2")), 1);
    cluster.tick(10);
    assert_eq!(
        cluster.nodes[0].hints_pending(),
        1,
        "not delivered while down"
    );
    cluster.stopped[2] = false;
    cluster.tick(1000);
    assert_eq!(cluster.nodes[0].hints_pending(), 0);
    assert_eq!(cluster.nodes[0].stats()[Counter::HintsDelivered], 1);
    let local = local(&mut cluster, 2).expect("delivered");
    assert_eq!(local.live_values().next().unwrap().value, data("v1"));
}

/// 100 updates of one key while the target is down give one hint and one delivery of the
/// final value.
#[test]
fn hints_coalesce_per_key() {
    let mut cluster = TestCluster::new(3);
    cluster.stopped[2] = true;
    let mut context = CausalContext::empty();
    for i in 0..100 {
        match cluster.put(
            0,
            &format!("v{i}"),
            context.clone(),
            ConsistencyLevel::Quorum,
        ) {
            ClientResponse::Written { context: next } => context = next,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(cluster.nodes[0].hints_pending(), 1);
    cluster.stopped[2] = false;
    cluster.tick(1000);
    assert_eq!(cluster.nodes[0].stats()[Counter::HintsDelivered], 1);
    let local = local(&mut cluster, 2).unwrap();
    let values: Vec<_> = local.live_values().map(|s| s.value.clone()).collect();
    assert_eq!(values, vec![data("v99")]);
}

/// Expired hints are dropped, counted and leave a mark for anti-entropy.
#[test]
fn hints_expire() {
    let mut cluster = TestCluster::new(3);
    cluster.stopped[2] = true;
    cluster.put(0, "v1", CausalContext::empty(), ConsistencyLevel::Quorum);
    cluster.stopped[2] = false;
    let ttl = cluster.nodes[0].config().hinted_handoff.ttl_ms;
    cluster.tick(ttl + 1);
    assert_eq!(cluster.nodes[0].hints_pending(), 0);
    assert_eq!(cluster.nodes[0].stats()[Counter::HintsExpired], 1);
    assert_eq!(cluster.nodes[0].stats()[Counter::HintsDelivered], 0);
    assert_eq!(cluster.nodes[0].repair_marks().count(), 1);
}

/// Hints survive a restart of the node that holds them (they are in storage).
#[test]
fn hints_survive_a_restart_of_the_holder() {
    let storage = MemoryStorage::new();
    let mut node = Node::new(NodeConfig::new("a"), storage.clone(), 0).unwrap();
    for other in ["b", "c"] {
        node.handle_member_discovered(MemberInfo {
            id: NodeId::new(other),
            peer_address: String::new(),
            http_address: String::new(),
        });
    }
    node.handle_client_request(
        0,
        1,
        ClientRequest::Put {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: CausalContext::empty(),
            value: data("x"),
            level: ConsistencyLevel::One,
        },
    );
    while let Some(action) = node.poll_action() {
        if let Action::Send { to, message } = action {
            node.handle_send_failed(0, &to, &message);
        }
    }
    node.sync_now();
    assert_eq!(node.hints_pending(), 2);
    storage.crash(0);
    let restarted = Node::new(NodeConfig::new("a"), storage, 0).unwrap();
    assert_eq!(restarted.hints_pending(), 2);
}

/// A replica that missed writes (no hints, no read repair) gets exactly the missing keys
/// from an operator repair run; a second run finds nothing to repair.
#[test]
fn repair_run_brings_a_stale_replica_up_to_date() {
    let mut cluster = TestCluster::new(3);
    for node in &mut cluster.nodes {
        node.config.hinted_handoff.enabled = false;
        node.config.read_repair.enabled = false;
        // Only the operator's run repairs here (scheduled exchanges would race it).
        node.config.anti_entropy.enabled = false;
    }
    cluster.stopped[2] = true;
    for i in 0..50 {
        let request = ClientRequest::Put {
            bucket: "b".into(),
            key: format!("k{i}").into_bytes(),
            context: CausalContext::empty(),
            value: data("v"),
            level: ConsistencyLevel::Quorum,
        };
        cluster.request(0, request);
    }
    cluster.stopped[2] = false;
    let run = |cluster: &mut TestCluster, now: Millis| {
        let id = match cluster.request(2, ClientRequest::StartRepair) {
            ClientResponse::RepairStarted { id } => id,
            other => panic!("{other:?}"),
        };
        for step in 0..200 {
            cluster.tick(now + step * 10);
            if let Some(status) = cluster.nodes[2].repair_run(id, now + step * 10) {
                if status.state != RunState::Running {
                    return status;
                }
            }
        }
        panic!("repair run did not end");
    };
    let first = run(&mut cluster, 1_000);
    assert_eq!(first.state, RunState::Done);
    assert_eq!(first.keys_repaired, 50, "{first:?}");
    assert_eq!(first.keys_different, 50, "{first:?}");
    // The run measured what a mismatched leaf costs, and left no known debt (it converged).
    let per_leaf = cluster.nodes[2]
        .anti_entropy
        .bytes_per_leaf
        .expect("measured");
    assert!(per_leaf > 0.0, "{per_leaf}");
    assert!(cluster.nodes[2].repair_debt().is_empty());
    // A range left unmended toward node 0: its leaves, their estimated bytes, and the time
    // they take at the repair rate granted now.
    let range = cluster.nodes[2].anti_entropy.trees.ranges().next().unwrap();
    let peer = cluster.nodes[0].id().clone();
    cluster.nodes[2]
        .anti_entropy
        .repair_debt
        .insert((range, peer.clone()), 10);
    let rate = cluster.nodes[2].repair_rate_bytes_per_s();
    let debt = cluster.nodes[2].repair_debt();
    let expected_bytes = (per_leaf * 10.0) as u64;
    assert_eq!(
        debt,
        vec![super::RepairDebt {
            peer,
            mismatched_leaves: 10,
            estimated_bytes: Some(expected_bytes),
            eta_ms: Some(expected_bytes * 1000 / rate),
        }]
    );
    cluster.nodes[2].anti_entropy.repair_debt.clear();
    for i in 0..50 {
        let key = format!("k{i}").into_bytes();
        assert!(cluster.nodes[2].storage().get("b", &key).unwrap().is_some());
    }
    let second = run(&mut cluster, 10_000);
    assert_eq!(
        (
            second.state.as_str(),
            second.keys_repaired,
            second.keys_different
        ),
        ("done", 0, 0)
    );
}

/// Client failures open the circuit breaker, which pauses hint replay until the cooldown
/// has passed and the stress has aged out of the window.
#[test]
fn circuit_breaker_pauses_hint_replay() {
    let mut cluster = TestCluster::new(3);
    for node in &mut cluster.nodes {
        node.config.anti_entropy.enabled = false;
    }
    cluster.stopped[2] = true;
    for i in 0..60 {
        let request = ClientRequest::Put {
            bucket: "b".into(),
            key: format!("k{i}").into_bytes(),
            context: CausalContext::empty(),
            value: data("v"),
            level: ConsistencyLevel::All,
        };
        assert!(matches!(
            cluster.request(0, request),
            ClientResponse::Unavailable { .. }
        ));
    }
    assert!(
        cluster.nodes[0].repair_breaker_open(),
        "60 failed requests open it"
    );
    let pending = cluster.nodes[0].hints_pending();
    assert_eq!(pending, 60);
    cluster.stopped[2] = false;
    cluster.tick(1_000);
    assert_eq!(
        cluster.nodes[0].hints_pending(),
        60,
        "replay paused while open"
    );
    let config = cluster.nodes[0].config().circuit_breaker.clone();
    cluster.tick(config.cooldown_ms + config.window_ms + 1_000);
    assert_eq!(
        cluster.nodes[0].hints_pending(),
        0,
        "replay resumes after the cooldown"
    );
}

/// Sloppy quorum: with two of a key's three replicas down, a quorum write succeeds through
/// fallback nodes that keep hints, which reach the replicas when they return. Without it the
/// write is unavailable.
#[test]
fn sloppy_quorum_uses_fallback_nodes() {
    for sloppy in [false, true] {
        let mut cluster = TestCluster::new(5);
        for node in &mut cluster.nodes {
            node.config.sloppy_quorum = sloppy;
            node.config.anti_entropy.enabled = false;
        }
        let replicas = cluster.nodes[0].ring().preference_list_for_key("b", b"k");
        let [a, b, c] = [0, 1, 2].map(|i| cluster.index(&replicas[i]));
        cluster.stopped[b] = true;
        cluster.stopped[c] = true;
        let response = cluster.put(a, "v", CausalContext::empty(), ConsistencyLevel::Quorum);
        if !sloppy {
            assert!(
                matches!(response, ClientResponse::Unavailable { .. }),
                "{response:?}"
            );
            continue;
        }
        assert!(
            matches!(response, ClientResponse::Written { .. }),
            "{response:?}"
        );
        let fallback_hints: usize = (0..5)
            .filter(|i| ![a, b, c].contains(i))
            .map(|i| cluster.nodes[i].hints_pending())
            .sum();
        assert_eq!(
            fallback_hints, 2,
            "one hint per missing replica on the fallbacks"
        );
        cluster.stopped[b] = false;
        cluster.stopped[c] = false;
        cluster.tick(1_000);
        for i in [b, c] {
            assert!(
                local(&mut cluster, i).is_some(),
                "replica {i} got the write"
            );
        }
    }
}

/// The periodic verification rebuilds a range's tree from a scan: a write that bypassed the
/// tree upkeep is found (counted) and the tree corrected; a correct tree passes.
#[test]
fn tree_verification_finds_and_fixes_a_stale_tree() {
    let storage = MemoryStorage::new();
    let mut node = Node::new(NodeConfig::new("solo"), storage.clone(), 0).unwrap();
    node.handle_client_request(
        0,
        1,
        ClientRequest::Put {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: CausalContext::empty(),
            value: data("x"),
            level: ConsistencyLevel::One,
        },
    );
    node.sync_now();
    let interval = node.config().anti_entropy.verify_interval_ms;
    let ranges = node.ring().ranges().len() as u64;
    let mut now = 0;
    let mut full_pass = |node: &mut Node<MemoryStorage>| {
        for _ in 0..ranges {
            now += interval;
            node.handle_tick(now);
        }
    };
    full_pass(&mut node);
    assert_eq!(
        (
            node.stats()[Counter::TreeChecksOk],
            node.stats()[Counter::TreeChecksMismatch]
        ),
        (ranges, 0)
    );
    // Behind the node's back: the data changes, the tree does not.
    let mut other = Object::empty();
    other.apply_write(Actor::new("x", 1), &CausalContext::empty(), data("y"));
    storage.put("b", b"bypass", &other).unwrap();
    full_pass(&mut node);
    assert_eq!(node.stats()[Counter::TreeChecksMismatch], 1, "found");
    let bypass_token = crate::ring::key_token("b", b"bypass");
    let mismatched = node.take_tree_mismatches();
    assert!(
        matches!(mismatched.as_slice(), [range] if range.contains(bypass_token)),
        "the driver is told which range disagreed, to name it in the log: {mismatched:?}"
    );
    assert!(node.take_tree_mismatches().is_empty(), "drained");
    full_pass(&mut node);
    assert_eq!(
        node.stats()[Counter::TreeChecksMismatch],
        1,
        "fixed: the next pass agrees"
    );
}

fn reaping_cluster() -> TestCluster {
    let mut cluster = TestCluster::new(3);
    for node in &mut cluster.nodes {
        node.config.hinted_handoff.ttl_ms = 60_000;
        node.config.anti_entropy.verify_interval_ms = 1_000;
        node.config.anti_entropy.interval_ms = 5_000;
        node.anti_entropy.repair_queue = RepairQueue::new(RepairQueueConfig {
            interval_ms: 5_000,
            ..RepairQueueConfig::default()
        });
        node.align_trees();
    }
    cluster
}

fn stored_anywhere(cluster: &TestCluster) -> usize {
    cluster
        .nodes
        .iter()
        .filter(|n| n.storage().get("b", b"k").unwrap().is_some())
        .count()
}

/// A tombstone every replica holds is purged everywhere once it is older than the hint TTL
/// and exchanges with every peer have converged since; the key stays deleted.
#[test]
fn tombstones_are_reaped_once_every_replica_holds_them() {
    let mut cluster = reaping_cluster();
    cluster.put(0, "v", CausalContext::empty(), ConsistencyLevel::All);
    let deleted = cluster.request(
        1,
        ClientRequest::Delete {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: None,
            level: ConsistencyLevel::All,
        },
    );
    assert!(matches!(deleted, ClientResponse::Written { .. }));
    assert_eq!(stored_anywhere(&cluster), 3, "tombstones on every replica");
    for step in 1..=600 {
        cluster.tick(step * 500);
    }
    assert_eq!(stored_anywhere(&cluster), 0, "reaped on every replica");
    let reaped: u64 = cluster
        .nodes
        .iter()
        .map(|n| n.stats()[Counter::TombstonesReaped])
        .sum();
    assert!(reaped >= 3, "{reaped}");
    let ClientResponse::Object(object) = cluster.get(2, ConsistencyLevel::All) else {
        panic!()
    };
    assert!(object.is_empty(), "the key stays deleted");
}

/// Found by the simulator's swarm (seed 278, rf=1, a 2 s hint TTL): once a tombstone was
/// reaped, the actor's next write to the key reused the tombstone's dot, so a context read
/// from the tombstone (which never saw the new write) superseded it and an acknowledged
/// write was lost. The actor's new dots must lie above every dot it reaped.
#[test]
fn a_write_after_reaping_never_reuses_a_reaped_dot() {
    let mut cluster = reaping_cluster();
    let ClientResponse::Written { context: before } =
        cluster.put(0, "v", CausalContext::empty(), ConsistencyLevel::All)
    else {
        panic!("put failed")
    };
    let deleted = cluster.request(
        0,
        ClientRequest::Delete {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: Some(before.clone()),
            level: ConsistencyLevel::All,
        },
    );
    assert!(matches!(deleted, ClientResponse::Written { .. }));
    let ClientResponse::Object(tombstone) = cluster.get(0, ConsistencyLevel::All) else {
        panic!("read failed")
    };
    let seen_tombstone = tombstone.causal_context();
    for step in 1..=600 {
        cluster.tick(step * 500);
    }
    assert_eq!(stored_anywhere(&cluster), 0, "reaped on every replica");
    // A client still holding the context from before the delete writes again...
    cluster.put(0, "new", before, ConsistencyLevel::All);
    // ...and another, holding the tombstone's context, writes concurrently: it never saw
    // "new", so both must stay as siblings.
    cluster.put(0, "other", seen_tombstone, ConsistencyLevel::All);
    let mut values = live(&cluster.get(0, ConsistencyLevel::All));
    values.sort_by_key(|v| format!("{v:?}"));
    assert_eq!(values, vec![data("new"), data("other")]);
}

/// While one replica cannot confirm (it is down), nobody purges the tombstone.
#[test]
fn tombstones_stay_while_a_replica_is_unconfirmed() {
    let mut cluster = reaping_cluster();
    cluster.put(0, "v", CausalContext::empty(), ConsistencyLevel::All);
    cluster.request(
        1,
        ClientRequest::Delete {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: None,
            level: ConsistencyLevel::All,
        },
    );
    cluster.stopped[2] = true;
    for step in 1..=600 {
        cluster.tick(step * 500);
    }
    assert_eq!(
        stored_anywhere(&cluster),
        3,
        "no reaping without every replica's confirmation"
    );
}

/// After the cooldown the breaker lets one scheduled exchange through; when it ends well and
/// the stress is gone, the breaker closes and scheduled exchanges resume.
#[test]
fn circuit_breaker_closes_after_a_good_probe() {
    let mut cluster = TestCluster::new(3);
    cluster.stopped[2] = true;
    for i in 0..60 {
        let request = ClientRequest::Put {
            bucket: "b".into(),
            key: format!("k{i}").into_bytes(),
            context: CausalContext::empty(),
            value: data("v"),
            level: ConsistencyLevel::All,
        };
        cluster.request(0, request);
    }
    assert!(cluster.nodes[0].repair_breaker_open());
    cluster.stopped[2] = false;
    let config = cluster.nodes[0].config().circuit_breaker.clone();
    let after = config.cooldown_ms + config.window_ms + 1_000;
    cluster.tick(after);
    cluster.tick(after + 1_000);
    assert!(
        !cluster.nodes[0].repair_breaker_open(),
        "closed after the probe"
    );
    let before = cluster.nodes[0].stats()[Counter::AntiEntropyExchangesOk];
    cluster.tick(after + 2_000);
    assert!(
        cluster.nodes[0].stats()[Counter::AntiEntropyExchangesOk] > before,
        "exchanges resume"
    );
}

/// A three-node cluster's first node, with a write request from the second already handled
/// and its reply held: `finish_sync(Err)` must turn the reply into an error.
fn failed_sync_reply(request: Message) -> Message {
    let mut cluster = TestCluster::new(3);
    let peer = cluster.nodes[1].id().clone();
    let node = &mut cluster.nodes[0];
    node.handle_message(0, &peer, request);
    assert_eq!(node.poll_action(), None, "the reply waits for the sync");
    let ticket = node.begin_sync().expect("the write needs a sync");
    node.finish_sync(ticket, Err(StorageError::Engine("injected".into())));
    match node.poll_action() {
        Some(Action::Send { to, message }) if to == peer => message,
        other => panic!("expected a reply to the peer, got {other:?}"),
    }
}

/// An anti-entropy request of exchange 9 as a peer would send it (full 8-byte hashes).
fn exchange_request(
    range: crate::ring::TokenRange,
    seq: u32,
    body: crate::anti_entropy::exchange::RequestBody,
) -> Message {
    Message::AntiEntropy {
        request: crate::anti_entropy::ExchangeRequest {
            exchange: ExchangeId(9),
            seq,
            range,
            shape: crate::anti_entropy::TreeShape::DEFAULT,
            probe: crate::anti_entropy::exchange::Probe {
                salt: 0,
                node_hash_bytes: 8,
                item_hash_bytes: 8,
            },
            body,
            bucket: None,
        },
    }
}

fn written_object(value: &str) -> Object {
    let mut object = Object::empty();
    object.apply_write(Actor::new("n1", 1), &CausalContext::empty(), data(value));
    object
}

/// Every reply that acknowledges durability becomes an error when its sync fails: a
/// replicate, a sloppy quorum's hinted write, a read repair, a hint batch, a coordinated
/// write and an anti-entropy transfer.
#[test]
fn a_failed_sync_fails_every_durable_reply() {
    let object = written_object("v");
    let replicate = Message::Replicate {
        request: 1,
        bucket: "b".into(),
        key: b"k".to_vec(),
        object: object.clone(),
    };
    assert!(matches!(
        failed_sync_reply(replicate),
        Message::ReplicateReply {
            result: Err(ReplicaError::Storage(_)),
            ..
        }
    ));
    let hinted = Message::HintedWrite {
        request: 2,
        intended: NodeId::new("n2"),
        bucket: "b".into(),
        key: b"k".to_vec(),
        object: object.clone(),
    };
    assert!(matches!(
        failed_sync_reply(hinted),
        Message::ReplicateReply {
            result: Err(ReplicaError::Storage(_)),
            ..
        }
    ));
    let repair = Message::RepairWrite {
        request: 3,
        bucket: "b".into(),
        key: b"k".to_vec(),
        object: object.clone(),
    };
    assert!(matches!(
        failed_sync_reply(repair),
        Message::RepairWriteReply {
            result: Err(ReplicaError::Storage(_)),
            ..
        }
    ));
    let batch = Message::HintBatch {
        request: 4,
        hints: vec![crate::anti_entropy::RepairObject {
            bucket: "b".into(),
            key: b"k".to_vec(),
            object: object.clone(),
        }],
    };
    assert!(matches!(
        failed_sync_reply(batch),
        Message::HintBatchReply {
            result: Err(ReplicaError::Storage(_)),
            ..
        }
    ));
    let coordinate = Message::Coordinate {
        request: 5,
        bucket: "b".into(),
        key: b"k".to_vec(),
        context: CausalContext::empty(),
        value: data("w"),
    };
    assert!(matches!(
        failed_sync_reply(coordinate),
        Message::CoordinateReply {
            result: Err(ReplicaError::Storage(_)),
            ..
        }
    ));
    let cluster = TestCluster::new(3);
    let key_range = cluster.nodes[0]
        .ring()
        .range_for_token(crate::ring::key_token("b", b"k"))
        .unwrap();
    use crate::anti_entropy::exchange::{Refusal, RequestBody, ResponseBody};
    let transfer = exchange_request(
        key_range,
        1,
        RequestBody::Transfer {
            objects: vec![crate::anti_entropy::RepairObject {
                bucket: "b".into(),
                key: b"k".to_vec(),
                object,
            }],
            want: vec![],
            coded_want: None,
        },
    );
    let reply = failed_sync_reply(transfer);
    assert!(
        matches!(
            &reply,
            Message::AntiEntropyReply { response }
                if matches!(response.body, ResponseBody::Refused(Refusal::Storage(_)))
        ),
        "{reply:?}"
    );
}

/// Bounds hold on what a write would store, not only on what a context decodes to: a
/// context one step from the counter limit, or one naming more actors than a context may,
/// is refused with `Invalid` and changes nothing, so honest reads keep working.
#[test]
fn writes_that_would_break_context_limits_change_nothing() {
    use crate::version::{VersionVector, MAX_CONTEXT_ACTORS, MAX_COUNTER};
    let mut cluster = TestCluster::new(3);
    assert!(matches!(
        cluster.put(0, "v", CausalContext::empty(), ConsistencyLevel::All),
        ClientResponse::Written { .. }
    ));
    let before = local(&mut cluster, 0);
    let own_actor = Actor::new("n0", cluster.nodes[0].epoch());
    let near_overflow: VersionVector = [(own_actor, MAX_COUNTER - 1)].into_iter().collect();
    let reply = cluster.put(
        0,
        "w",
        CausalContext::from_vector(near_overflow),
        ConsistencyLevel::All,
    );
    assert!(matches!(reply, ClientResponse::Invalid(_)), "{reply:?}");
    let invented: VersionVector = (0..MAX_CONTEXT_ACTORS as u32)
        .map(|i| (Actor::new("invented", i), 1))
        .collect();
    let reply = cluster.put(
        0,
        "w",
        CausalContext::from_vector(invented),
        ConsistencyLevel::All,
    );
    assert!(matches!(reply, ClientResponse::Invalid(_)), "{reply:?}");
    assert_eq!(local(&mut cluster, 0), before, "nothing changed");
    assert!(CausalContext::within_limits(
        before.expect("stored").context()
    ));
}

fn member(i: usize) -> MemberInfo {
    MemberInfo {
        id: NodeId::new(format!("n{i}")),
        peer_address: format!("p{i}"),
        http_address: format!("h{i}"),
    }
}

/// A cluster whose nodes gossip (each has the others as seed contacts) and have heard of
/// each other's generations.
fn gossiping_cluster(n: usize) -> TestCluster {
    let mut cluster = TestCluster::new(n);
    for i in 0..n {
        for j in (0..n).filter(|j| *j != i) {
            cluster.nodes[i].handle_seed_discovered(0, member(j));
        }
    }
    cluster.run();
    for second in 1..=3 {
        cluster.tick(second * 1000);
    }
    cluster
}

/// Node `i`'s seed (n0) answers its handshake, and gossip runs until `i` has its epoch
/// confirmed.
fn answer_through_seed(cluster: &mut TestCluster, i: usize) {
    let now = cluster.now;
    cluster.nodes[i].handle_seed_discovered(now, member(0));
    cluster.run();
    let start = cluster.now;
    for step in 1..=20 {
        if cluster.nodes[i].epoch_confirmed() {
            break;
        }
        cluster.tick(start + step * 1000);
    }
    assert!(cluster.nodes[i].epoch_confirmed(), "gossip answered");
}

/// A node whose data directory was wiped starts at epoch 1 again; it must not issue dots
/// until gossip has told it the epoch it ran under, then continue above it, so a write it
/// coordinates is never mistaken for one the replicas already hold.
#[test]
fn a_wiped_node_learns_its_epoch_from_peers_before_coordinating() {
    let mut cluster = gossiping_cluster(3);
    let written = cluster.put(2, "old", CausalContext::empty(), ConsistencyLevel::All);
    assert!(matches!(written, ClientResponse::Written { .. }));
    let old_epoch = cluster.nodes[2].epoch();

    // Wipe n2's disk and start it again under the same id.
    let mut config = NodeConfig::new("n2");
    config.learn_epoch_from_peers = true;
    let mut wiped = Node::new(config, MemoryStorage::new(), cluster.now).unwrap();
    for i in 0..3 {
        wiped.handle_member_discovered(member(i));
    }
    assert_eq!(wiped.epoch(), 1, "the record is gone");
    assert!(!wiped.epoch_confirmed());
    cluster.nodes[2] = wiped;
    // Its seed answers the handshake a moment later: until then it must refuse.
    let refused = cluster.put(
        2,
        "too early",
        CausalContext::empty(),
        ConsistencyLevel::All,
    );
    assert!(
        matches!(refused, ClientResponse::NotReady(_)),
        "{refused:?}"
    );

    answer_through_seed(&mut cluster, 2);
    assert!(cluster.nodes[2].epoch() > old_epoch);
    assert_eq!(cluster.nodes[2].stats()[Counter::EpochsLearnedFromPeers], 1);

    let written = cluster.put(2, "new", CausalContext::empty(), ConsistencyLevel::All);
    assert!(
        matches!(written, ClientResponse::Written { .. }),
        "{written:?}"
    );
    // The wiped node rejoins as `joining` (it must stream its ranges back before it owns
    // them), so the write's replicas are the two others for now.
    for i in 0..2 {
        let object = local(&mut cluster, i).expect("stored");
        assert!(
            object.live_values().any(|s| s.value == data("new")),
            "n{i} kept the new write: {object:?}"
        );
    }
}

/// Found by the simulator (seed 1393): a wiped node that crashed again before any peer had
/// confirmed its epoch found, at its next start, the epoch record its unconfirmed start had
/// written, trusted it, and ran under epoch 2, its previous life's: the same actor and the
/// same request ids, so a peer answered its new write with the cached answer to the old
/// request of that id (another key's object) and the write was acknowledged unapplied.
/// Until confirmed, every start must ask its peers, and continue above what they know.
#[test]
fn a_wiped_node_that_restarts_before_confirming_still_learns_its_epoch() {
    let mut cluster = gossiping_cluster(3);
    let written = cluster.put(2, "old", CausalContext::empty(), ConsistencyLevel::All);
    assert!(matches!(written, ClientResponse::Written { .. }));
    let old_epoch = cluster.nodes[2].epoch();
    let config = || {
        let mut config = NodeConfig::new("n2");
        config.learn_epoch_from_peers = true;
        config
    };
    // Wiped, started (epoch 1, unconfirmed), and crashed before hearing from anyone.
    let storage = MemoryStorage::new();
    let wiped = Node::new(config(), storage, cluster.now).unwrap();
    assert!(!wiped.epoch_confirmed());
    let storage = wiped.into_storage();
    storage.crash(0);
    // The next start must still wait for its peers, even though an epoch record exists.
    let mut restarted = Node::new(config(), storage, cluster.now).unwrap();
    assert!(
        !restarted.epoch_confirmed(),
        "epoch {} trusted before any peer answered (the old life ran under {old_epoch})",
        restarted.epoch()
    );
    for i in 0..3 {
        restarted.handle_member_discovered(member(i));
    }
    cluster.nodes[2] = restarted;
    answer_through_seed(&mut cluster, 2);
    assert!(cluster.nodes[2].epoch() > old_epoch);
    // Confirmed durably: a later start trusts its record (and grows it) without asking.
    let now = cluster.now;
    let storage = cluster.take_storage(2);
    let confirmed_epoch = {
        let again = Node::new(config(), storage, now).unwrap();
        assert!(again.epoch_confirmed(), "a confirmed record is trusted");
        again.epoch()
    };
    assert!(confirmed_epoch > old_epoch + 1);
}

/// A wiped node whose first answer comes from a peer that restarted too and has not heard of
/// it yet (sim seed 6074: every crashed node restarts at the same moment) must not take that
/// answer as "new to the cluster": it waits for a majority of its live peers, one of which
/// holds its old generation, and continues above it.
#[test]
fn a_wiped_node_is_not_confirmed_by_one_peer_that_never_heard_of_it() {
    let mut cluster = gossiping_cluster(3);
    let written = cluster.put(2, "old", CausalContext::empty(), ConsistencyLevel::All);
    assert!(matches!(written, ClientResponse::Written { .. }));
    let old_epoch = cluster.nodes[2].epoch();

    // n1 restarts (its data kept, its gossip state gone): it knows nothing of n2 yet.
    let now = cluster.now;
    let n1_storage = cluster.take_storage(1);
    let mut restarted = Node::new(NodeConfig::new("n1"), n1_storage, now).unwrap();
    // n2's disk is wiped; it starts again under the same id.
    let mut config = NodeConfig::new("n2");
    config.learn_epoch_from_peers = true;
    let mut wiped = Node::new(config, MemoryStorage::new(), now).unwrap();
    for i in 0..3 {
        restarted.handle_member_discovered(member(i));
        wiped.handle_member_discovered(member(i));
    }
    cluster.nodes[1] = restarted;
    cluster.nodes[2] = wiped;
    cluster.nodes[2].handle_seed_discovered(now, member(1));
    cluster.run();
    assert!(
        !cluster.nodes[2].epoch_confirmed(),
        "one answer of two live peers, from a peer that never heard of n2, confirms nothing"
    );
    assert_eq!(cluster.nodes[2].epoch(), 1);

    // n0, which ran all along, answers too: it names n2's old generation.
    cluster.nodes[2].handle_seed_discovered(now, member(0));
    cluster.run();
    assert!(cluster.nodes[2].epoch_confirmed());
    assert!(cluster.nodes[2].epoch() > old_epoch);
    assert_eq!(cluster.nodes[2].stats()[Counter::EpochsLearnedFromPeers], 1);
}

/// A node that starts with no record and was never in the cluster is confirmed by the
/// first gossip answer, which claims nothing about it, and keeps epoch 1.
#[test]
fn a_new_node_is_confirmed_by_the_first_gossip_answer() {
    // n1 was never in n0's gossip: a new node, not a wiped one.
    let mut cluster = TestCluster::new(2);
    let mut config = NodeConfig::new("n1");
    config.learn_epoch_from_peers = true;
    let mut fresh = Node::new(config, MemoryStorage::new(), 0).unwrap();
    for i in 0..2 {
        fresh.handle_member_discovered(member(i));
    }
    cluster.nodes[1] = fresh;
    assert!(!cluster.nodes[1].epoch_confirmed());
    let now = cluster.now;
    cluster.nodes[1].handle_seed_discovered(now, member(0));
    cluster.run();
    assert!(cluster.nodes[1].epoch_confirmed());
    assert_eq!(cluster.nodes[1].epoch(), 1);
    assert_eq!(cluster.nodes[1].stats()[Counter::EpochsLearnedFromPeers], 0);
}

/// The repair controller drives the node's repair byte budget: with no foreground traffic
/// the rate climbs to the ceiling, and the reason says so; switched off, the fixed knob
/// stays.
#[test]
fn the_repair_rate_follows_foreground_load() {
    let mut node = Node::new(NodeConfig::new("solo"), MemoryStorage::new(), 0).unwrap();
    let ceiling = node.config().repair_controller.ceiling_bytes_per_s;
    assert_eq!(
        node.repair_rate_bytes_per_s(),
        node.config().anti_entropy.rate_limit_bytes_per_s
    );
    for second in 1..=10 {
        node.handle_tick(second * 1000);
    }
    assert_eq!(node.repair_rate_bytes_per_s(), ceiling);
    assert_eq!(node.repair_rate_reason().as_str(), "idle");

    let mut config = NodeConfig::new("fixed");
    config.repair_controller.enabled = false;
    let mut fixed = Node::new(config, MemoryStorage::new(), 0).unwrap();
    for second in 1..=10 {
        fixed.handle_tick(second * 1000);
    }
    assert_eq!(
        fixed.repair_rate_bytes_per_s(),
        fixed.config().anti_entropy.rate_limit_bytes_per_s
    );
    assert_eq!(fixed.repair_rate_reason().as_str(), "fixed");
}

/// A node that starts over more objects than it scans at once serves at once: its trees
/// build in the background (ticks come soon while they do), a read is answered before they
/// are done, writes during the build are kept, and the finished trees equal a rebuild from
/// the data.
#[test]
fn trees_build_in_the_background_after_a_start_with_much_data() {
    let storage = MemoryStorage::new();
    let mut object = Object::empty();
    object.apply_write(Actor::new("old", 1), &CausalContext::empty(), data("v"));
    let stored = anti_entropy::TREE_BUILD_AT_ONCE * 2;
    for i in 0..stored {
        storage
            .put("b", format!("key-{i}").as_bytes(), &object)
            .unwrap();
    }
    storage.sync().unwrap();
    let mut node = Node::new(NodeConfig::new("n0"), storage.clone(), 0).unwrap();
    assert!(
        node.anti_entropy.trees.is_building(),
        "more than one start's budget"
    );
    assert!(node.next_deadline() <= anti_entropy::TREE_BUILD_TICK_MS);
    node.handle_client_request(
        0,
        1,
        ClientRequest::Get {
            bucket: "b".into(),
            key: b"key-7".to_vec(),
            level: ConsistencyLevel::One,
        },
    );
    let mut answered = false;
    while let Some(action) = node.poll_action() {
        if let Action::Reply {
            client: 1,
            response,
        } = action
        {
            assert_eq!(live(&response), vec![data("v")]);
            answered = true;
        }
    }
    assert!(answered, "a read is served while the trees build");
    let mut now = 0;
    let mut ticks = 0;
    while node.anti_entropy.trees.is_building() {
        // A write in the middle of the build, as a client would make it.
        if ticks == 3 {
            node.handle_client_request(
                now,
                2,
                ClientRequest::Put {
                    bucket: "b".into(),
                    key: format!("key-{}", stored - 1).into_bytes(),
                    context: CausalContext::empty(),
                    value: data("new"),
                    level: ConsistencyLevel::One,
                },
            );
            node.sync_now();
            while node.poll_action().is_some() {}
        }
        now = node.next_deadline().max(now);
        node.handle_tick(now);
        ticks += 1;
        assert!(
            ticks < 10 * stored / anti_entropy::TREE_BUILD_PER_TICK,
            "the build ends"
        );
    }
    let ranges: Vec<crate::ring::TokenRange> = node.anti_entropy.trees.ranges().collect();
    assert_eq!(node.stats()[Counter::TreeRebuilds], ranges.len() as u64);
    let mut rebuilt = crate::anti_entropy::RangeTrees::new(
        *node.anti_entropy.trees.hasher(),
        node.anti_entropy.trees.shape(),
    );
    rebuilt.set_ranges(ranges.iter().copied());
    for range in &ranges {
        let rows = storage.scan_range(*range).unwrap();
        rebuilt.rebuild(
            *range,
            rows.iter()
                .map(|(b, k, o)| (b.as_str(), k.as_slice(), o.digest())),
        );
        assert!(node.anti_entropy.trees.is_ready(*range));
        assert_eq!(
            node.anti_entropy.trees.tree_mut(*range).unwrap().root(),
            rebuilt.tree_mut(*range).unwrap().root(),
            "{range:?}"
        );
    }
}

/// The repair controller's baseline travels by gossip: a node that measured one publishes
/// it, a node without its own adopts the peers' median (a restarted node under repair has
/// no quiet window to measure in).
#[test]
fn a_node_without_a_repair_baseline_adopts_its_peers() {
    let mut cluster = gossiping_cluster(3);
    let quiet = crate::control::ForegroundSignals {
        requests: 1_000,
        error_rate: 0.0,
        p99_ms: Some(7),
        in_flight: 1,
    };
    let now = cluster.now + 60_000;
    let _ = cluster.nodes[0]
        .control
        .controller
        .adjust(now, &quiet, false);
    assert_eq!(
        cluster.nodes[0]
            .control
            .controller
            .learned_baseline_p99_ms(),
        Some(7)
    );
    assert_eq!(cluster.nodes[1].control.controller.baseline_p99_ms(), None);
    for step in 1..=20 {
        cluster.tick(now + step * 1_000);
    }
    for i in 1..3 {
        let controller = &cluster.nodes[i].control.controller;
        assert_eq!(controller.baseline_p99_ms(), Some(7), "n{i} adopted n0's");
        assert_eq!(
            controller.learned_baseline_p99_ms(),
            None,
            "n{i} measured none"
        );
    }
}

/// A wiped node hears first from a peer that holds an older life of it (generation 2) and
/// continues under 3, confirmed; then another peer describes the life that had already run
/// under 3, with versions above any this life issued. That is an earlier life under the
/// same generation (simulator seed 1887: the peer kept that life's join phase, and the new
/// join never completed), so the node continues above it, and a join it decided under 3
/// moves to the new generation (seed 1643: a removal of the life at 3 kept it refused). A
/// claim of its generation within its own versions is just a peer that heard of it.
#[test]
fn a_wiped_node_outgrows_an_earlier_life_under_the_generation_it_adopted() {
    use crate::gossip::{Digest, GossipMessage};
    let mut config = NodeConfig::new("n2");
    config.learn_epoch_from_peers = true;
    let mut node = Node::new(config, MemoryStorage::new(), 0).unwrap();
    for i in 0..3 {
        node.handle_member_discovered(member(i));
    }
    let claim = |generation, max_version| {
        Message::Gossip(GossipMessage::Syn {
            digests: vec![Digest {
                node: NodeId::new("n2"),
                generation,
                max_version,
            }],
            complete: true,
        })
    };
    node.handle_message(10, &NodeId::new("n1"), claim(2, 40));
    assert_eq!(node.epoch(), 3);
    assert!(node.epoch_confirmed());
    // As if it had decided to join under generation 3.
    node.membership.joined_generation = 3;

    let own = node.cluster.gossiper.local_state().max_version();
    node.handle_message(20, &NodeId::new("n0"), claim(3, own));
    assert_eq!(
        node.epoch(),
        3,
        "a peer that heard of this life claims nothing new"
    );

    node.handle_message(30, &NodeId::new("n0"), claim(3, own + 500));
    assert_eq!(node.epoch(), 4, "an earlier life ran under 3");
    assert_eq!(node.stats()[Counter::EpochsLearnedFromPeers], 2);
    assert_eq!(node.membership.joined_generation, 4);
    assert_eq!(
        node.cluster
            .gossiper
            .local_state()
            .get(super::membership::JOINED_KEY),
        Some(&crate::gossip::AppValue::Count(4))
    );
}
