use super::*;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn id(name: &str) -> NodeId {
    NodeId::new(name)
}

fn gossiper_with(name: &str, generation: u64, seeds: &[&str], config: GossipConfig) -> Gossiper {
    let state = initial_state(
        NodeStatus::Normal,
        &format!("{name}:7000"),
        &format!("{name}:8000"),
        16,
    );
    Gossiper::new(
        id(name),
        generation,
        state,
        seeds.iter().map(|s| id(s)).collect(),
        config,
        0,
    )
    .expect("valid config")
}

fn gossiper(name: &str, seeds: &[&str]) -> Gossiper {
    gossiper_with(name, 1, seeds, GossipConfig::default())
}

/// Delivers messages reliably among `nodes` until none is left; returns how many went.
fn deliver_all(
    nodes: &mut [Gossiper],
    now: Millis,
    mut pending: Vec<(NodeId, NodeId, GossipMessage)>,
) -> usize {
    let mut delivered = 0;
    while let Some((from, to, message)) = pending.pop() {
        delivered += 1;
        if let Some(target) = nodes.iter_mut().find(|g| *g.id() == to) {
            for (next, reply) in target.handle_message(now, &from, message) {
                pending.push((to.clone(), next, reply));
            }
        }
    }
    delivered
}

/// One full exchange from `a` to `b`, delivered reliably.
fn exchange(nodes: &mut [Gossiper], a: usize, b: usize, now: Millis) {
    let to = nodes[b].id().clone();
    let from = nodes[a].id().clone();
    let syn = nodes[a].start_exchange(&to);
    deliver_all(nodes, now, vec![(from, to, syn)]);
}

/// Every node's view of every node, without the local learn times.
/// One node's state as another node sees it: id, generation, heartbeat, entries.
type View = (NodeId, Generation, Version, Vec<(AppKey, VersionedValue)>);

fn view(gossiper: &Gossiper) -> Vec<View> {
    gossiper
        .members()
        .map(|(id, state)| {
            let entries = state.entries().map(|(k, v)| (k, v.clone())).collect();
            (
                id.clone(),
                state.generation(),
                state.heartbeat_version(),
                entries,
            )
        })
        .collect()
}

// Two nodes that know only a seed end up knowing each other, with addresses.
#[test]
fn a_node_learns_the_cluster_from_its_seed() {
    let mut nodes = vec![
        gossiper("a", &[]),
        gossiper("b", &["a"]),
        gossiper("c", &["a"]),
    ];
    for round in 0..4 {
        for i in [1, 2, 0] {
            let peers: Vec<NodeId> = nodes
                .iter()
                .map(|g| g.id().clone())
                .filter(|p| p != nodes[i].id())
                .collect();
            for peer in peers {
                let j = nodes.iter().position(|g| *g.id() == peer).unwrap();
                if nodes[i].member(&peer).is_some() || nodes[i].seeds().any(|s| *s == peer) {
                    exchange(&mut nodes, i, j, round * 500);
                }
            }
        }
    }
    for g in &nodes {
        assert_eq!(g.member_count(), 3, "{} knows {:?}", g.id(), g.digests());
        let info = g.member_info(&id("c")).expect("c's addresses");
        assert_eq!(info.peer_address, "c:7000");
        assert_eq!(info.http_address, "c:8000");
    }
    let events = nodes[1].take_events();
    assert!(events.contains(&GossipEvent::NodeJoined { node: id("c") }));
    assert!(events.contains(&GossipEvent::StateChanged {
        node: id("c"),
        key: AppKey::Status
    }));
}

// A local change takes the next version and spreads; republishing the same value does not.
#[test]
fn set_local_bumps_the_version_once_per_change() {
    let mut a = gossiper("a", &[]);
    let before = a.local_state().max_version();
    assert_eq!(
        a.set_local(AppKey::DataBytes, AppValue::Count(7), 10),
        Ok(true)
    );
    assert_eq!(a.local_state().max_version(), before + 1);
    assert_eq!(
        a.set_local(AppKey::DataBytes, AppValue::Count(7), 20),
        Ok(false)
    );
    assert_eq!(a.local_state().max_version(), before + 1);
    assert_eq!(a.local_state().data_bytes(), Some(7));
    let mut nodes = vec![a, gossiper("b", &["a"])];
    exchange(&mut nodes, 1, 0, 30);
    assert_eq!(
        nodes[1].member(&id("a")).and_then(|s| s.data_bytes()),
        Some(7)
    );
}

// Frequency tuning: a change brings the next round forward to the fast interval.
#[test]
fn a_change_speeds_up_the_rounds() {
    let mut a = gossiper("a", &["b"]);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Publishing the initial state made the first rounds fast; later ones are slow.
    a.handle_tick(0, &mut rng);
    assert!(a.next_deadline() <= a.config().fast_interval_ms * 11 / 10);
    a.handle_tick(5000, &mut rng);
    let slow = a.next_deadline();
    assert!(slow >= 5000 + a.config().interval_ms * 9 / 10, "{slow}");
    a.set_local(AppKey::HintsPending, AppValue::Count(3), 5100)
        .unwrap();
    assert!(a.next_deadline() <= 5100 + a.config().fast_interval_ms);
}

// A value that could not fit in a message is refused instead of blocking gossip forever.
#[test]
fn oversize_local_values_are_refused() {
    let mut a = gossiper("a", &[]);
    let huge = AppValue::Bytes(vec![0; 40_000]);
    assert!(matches!(
        a.set_local(AppKey::Extension(1), huge, 0),
        Err(GossipError::ValueTooLarge { .. })
    ));
    for k in 0..(MAX_APP_KEYS - a.local_state().application_len()) as u16 {
        a.set_local(AppKey::Extension(k), AppValue::Count(1), 0)
            .unwrap();
    }
    assert_eq!(
        a.set_local(AppKey::Extension(999), AppValue::Count(1), 0),
        Err(GossipError::TooManyKeys)
    );
}

fn delta_of(gossiper: &Gossiper, node: &str) -> Delta {
    let state = gossiper.member(&id(node)).unwrap();
    Delta {
        node: id(node),
        generation: state.generation(),
        after: 0,
        heartbeat: Some(state.heartbeat_version()),
        entries: state.entries().map(|(k, v)| (k, v.clone())).collect(),
    }
}

// A node announcing another's id with an older generation overwrites nothing.
#[test]
fn an_older_generation_cannot_overwrite() {
    let mut b = gossiper("b", &[]);
    let new_c = gossiper_with("c", 5, &[], GossipConfig::default());
    b.handle_message(
        0,
        &id("c"),
        GossipMessage::Ack2 {
            deltas: vec![delta_of(&new_c, "c")],
        },
    );
    let mut old_c = gossiper_with("c", 4, &[], GossipConfig::default());
    old_c
        .set_local(AppKey::PeerAddress, AppValue::Text("evil:1".into()), 0)
        .unwrap();
    b.handle_message(
        10,
        &id("x"),
        GossipMessage::Ack2 {
            deltas: vec![delta_of(&old_c, "c")],
        },
    );
    assert_eq!(b.stats().stale_generation_rejected, 1);
    let c = b.member(&id("c")).unwrap();
    assert_eq!((c.generation(), c.peer_address()), (5, Some("c:7000")));
}

// Nobody else may change this node's state.
#[test]
fn state_about_oneself_is_never_taken_from_others() {
    let mut a = gossiper("a", &[]);
    let mut impostor = gossiper_with("a", 9, &[], GossipConfig::default());
    impostor
        .set_local(AppKey::Status, AppValue::Status(NodeStatus::Left), 0)
        .unwrap();
    a.handle_message(
        0,
        &id("x"),
        GossipMessage::Ack2 {
            deltas: vec![delta_of(&impostor, "a")],
        },
    );
    assert_eq!(a.stats().self_state_rejected, 1);
    assert_eq!(
        (a.generation(), a.local_state().status()),
        (1, Some(NodeStatus::Normal))
    );
}

// A restart (new generation) replaces the old state at once and is reported.
#[test]
fn a_restart_is_recognised_at_once() {
    let mut nodes = vec![gossiper("a", &[]), gossiper("b", &["a"])];
    exchange(&mut nodes, 1, 0, 0);
    nodes[1]
        .set_local(AppKey::HintsPending, AppValue::Count(9), 5)
        .unwrap();
    exchange(&mut nodes, 1, 0, 10);
    assert_eq!(nodes[0].member(&id("b")).unwrap().hints_pending(), Some(9));
    nodes[0].take_events();
    nodes[1] = gossiper_with("b", 2, &["a"], GossipConfig::default());
    exchange(&mut nodes, 1, 0, 20);
    let b = nodes[0].member(&id("b")).unwrap();
    assert_eq!((b.generation(), b.hints_pending()), (2, None));
    let events = nodes[0].take_events();
    assert!(
        events.contains(&GossipEvent::NodeRestarted {
            node: id("b"),
            generation: 2
        }),
        "{events:?}"
    );
    assert_eq!(nodes[0].liveness(&id("b")), Liveness::Up);
}

// Oversize and malformed input is dropped and counted, and changes nothing.
#[test]
fn bad_input_is_dropped_and_counted() {
    let mut a = gossiper("a", &[]);
    let before = view(&a);
    assert!(a.handle_bytes(0, &id("x"), &[0xff; 10]).is_empty());
    assert!(a
        .handle_bytes(0, &id("x"), &vec![0; a.config().max_message_bytes + 1])
        .is_empty());
    let too_many = GossipMessage::Syn {
        digests: (0..a.config().max_nodes + 1)
            .map(|i| Digest {
                node: id(&format!("n{i}")),
                generation: 1,
                max_version: 1,
            })
            .collect(),
        complete: true,
    };
    assert!(a.handle_message(0, &id("x"), too_many).is_empty());
    let empty_id = GossipMessage::Syn {
        digests: vec![Digest {
            node: id(""),
            generation: 1,
            max_version: 1,
        }],
        complete: false,
    };
    assert!(a.handle_message(0, &id("x"), empty_id).is_empty());
    let long_value = GossipMessage::Ack2 {
        deltas: vec![Delta {
            node: id("x"),
            generation: 1,
            after: 0,
            heartbeat: None,
            entries: vec![(
                AppKey::Extension(1),
                VersionedValue {
                    value: AppValue::Bytes(vec![1; 70_000]),
                    version: 1,
                },
            )],
        }],
    };
    assert!(a.handle_message(0, &id("x"), long_value).is_empty());
    let stats = a.stats();
    assert_eq!((stats.dropped_malformed, stats.dropped_oversize), (3, 2));
    assert_eq!(view(&a), before);
}

// At most max_nodes nodes are tracked; the rest are refused and counted.
#[test]
fn the_number_of_nodes_tracked_is_bounded() {
    let config = GossipConfig {
        max_nodes: 4,
        ..GossipConfig::default()
    };
    let mut a = gossiper_with("a", 1, &[], config.clone());
    let deltas: Vec<Delta> = (0..4)
        .map(|i| {
            delta_of(
                &gossiper_with(&format!("n{i}"), 1, &[], config.clone()),
                &format!("n{i}"),
            )
        })
        .collect();
    a.handle_message(0, &id("n0"), GossipMessage::Ack2 { deltas });
    assert_eq!(a.member_count(), 4);
    assert_eq!(a.stats().nodes_over_limit, 1);
}

// A node that left is forgotten after the delay, and stale gossip cannot bring it back.
#[test]
fn a_node_that_left_is_forgotten() {
    let config = GossipConfig {
        left_forget_after_ms: 5_000,
        ..GossipConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut nodes = vec![
        gossiper_with("a", 1, &[], config.clone()),
        gossiper_with("b", 1, &["a"], config.clone()),
    ];
    exchange(&mut nodes, 1, 0, 0);
    let stale_b = delta_of(&nodes[1], "b");
    nodes[1]
        .set_local(AppKey::Status, AppValue::Status(NodeStatus::Left), 100)
        .unwrap();
    exchange(&mut nodes, 1, 0, 100);
    assert_eq!(nodes[0].liveness(&id("b")), Liveness::Down);
    nodes[0].handle_tick(4_000, &mut rng);
    assert!(nodes[0].member(&id("b")).is_some());
    nodes[0].handle_tick(5_200, &mut rng);
    assert!(nodes[0].member(&id("b")).is_none());
    assert!(nodes[0]
        .take_events()
        .contains(&GossipEvent::NodeForgotten { node: id("b") }));
    nodes[0].handle_message(
        5_300,
        &id("c"),
        GossipMessage::Ack2 {
            deltas: vec![stale_b],
        },
    );
    assert!(nodes[0].member(&id("b")).is_none());
    // A new generation (the node rejoined) is welcome.
    let rejoined = gossiper_with("b", 2, &[], config);
    nodes[0].handle_message(
        5_400,
        &id("b"),
        GossipMessage::Ack2 {
            deltas: vec![delta_of(&rejoined, "b")],
        },
    );
    assert_eq!(nodes[0].member(&id("b")).map(|s| s.generation()), Some(2));
}

// A silent peer becomes suspect, then down; a new heartbeat brings it back up.
#[test]
fn silence_convicts_and_a_heartbeat_acquits() {
    let config = GossipConfig::default();
    let interval = config.interval_ms;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut nodes = vec![gossiper("a", &[]), gossiper("b", &["a"])];
    let mut now = 0;
    while now < 30_000 {
        nodes[1].handle_tick(now, &mut rng);
        exchange(&mut nodes, 1, 0, now);
        nodes[0].handle_tick(now, &mut rng);
        now += interval;
    }
    assert_eq!(nodes[0].liveness(&id("b")), Liveness::Up);
    assert!(nodes[0].phi(&id("b"), now) < 1.0);
    nodes[0].take_events();
    let crash = now - interval;
    let mut down_at = None;
    while down_at.is_none() && now < crash + 20_000 {
        let deadline = nodes[0].next_deadline();
        now = deadline.max(now + 1);
        nodes[0].handle_tick(now, &mut rng);
        if nodes[0].liveness(&id("b")) == Liveness::Down {
            down_at = Some(now);
        }
    }
    let down_at = down_at.expect("b convicted");
    assert!(
        down_at - crash <= 5_000,
        "convicted {} ms after the last heartbeat",
        down_at - crash
    );
    assert!(nodes[0].phi(&id("b"), down_at) >= config.phi_convict_threshold);
    let events = nodes[0].take_events();
    assert_eq!(
        events,
        vec![
            GossipEvent::NodeSuspect { node: id("b") },
            GossipEvent::NodeDown { node: id("b") }
        ]
    );
    nodes[1].handle_tick(now, &mut rng);
    exchange(&mut nodes, 1, 0, now);
    assert_eq!(nodes[0].liveness(&id("b")), Liveness::Up);
    assert_eq!(
        nodes[0].take_events(),
        vec![GossipEvent::NodeUp { node: id("b") }]
    );
}

// The byte counts and the budget arithmetic match postcard's real encoding, every message
// stays within the budget, and a budget-starved cluster still converges.
#[test]
fn messages_respect_the_budget_and_sizes_are_exact() {
    let config = GossipConfig {
        max_message_bytes: 1024,
        ..GossipConfig::default()
    };
    let mut nodes: Vec<Gossiper> = (0..40)
        .map(|i| {
            gossiper_with(
                &format!("node-with-a-long-name-{i:03}"),
                1,
                &["node-with-a-long-name-000"],
                config.clone(),
            )
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut now = 0;
    let mut truncated = 0;
    for _ in 0..200 {
        let mut pending = Vec::new();
        for g in nodes.iter_mut() {
            let from = g.id().clone();
            for (to, message) in g.handle_tick(now, &mut rng) {
                pending.push((from.clone(), to, message));
            }
        }
        while let Some((from, to, message)) = pending.pop() {
            let bytes = message.encode();
            assert!(
                bytes.len() <= config.max_message_bytes,
                "{} bytes",
                bytes.len()
            );
            assert_eq!(bytes.len(), message.encoded_len());
            let target = nodes.iter_mut().find(|g| *g.id() == to).unwrap();
            for (next, reply) in target.handle_bytes(now, &from, &bytes) {
                pending.push((to.clone(), next, reply));
            }
        }
        now += config.interval_ms;
        truncated = nodes
            .iter()
            .map(|g| g.stats().truncated_messages)
            .sum::<u64>();
        if nodes
            .iter()
            .all(|g| g.member_count() == 40 && g.members().all(|(_, s)| s.vnodes() == Some(16)))
        {
            break;
        }
    }
    assert!(truncated > 0, "the budget never bit");
    for g in &nodes {
        assert_eq!(g.member_count(), 40);
        assert!(g.members().all(|(_, s)| s.vnodes() == Some(16)));
        let stats = g.stats();
        assert_eq!(stats.dropped_malformed + stats.dropped_oversize, 0);
    }
    let out: u64 = nodes.iter().map(|g| g.stats().bytes_out).sum();
    let into: u64 = nodes.iter().map(|g| g.stats().bytes_in).sum();
    assert_eq!(
        out, into,
        "bytes counted on sending must equal bytes received"
    );
}

// ----- property tests ---------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    /// A node runs a round (heartbeat and Syns into the network).
    Tick(usize),
    /// A node publishes a change.
    Set(usize, u8, u64),
    /// The network delivers message `i` (modulo its length), keeping a copy when `duplicate`.
    Deliver(usize, bool),
    /// The network loses message `i`.
    Lose(usize),
    /// A node restarts with a new generation and an empty view.
    Restart(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..4usize).prop_map(Step::Tick),
        2 => (0..4usize, 0..6u8, any::<u64>()).prop_map(|(n, k, v)| Step::Set(n, k, v)),
        6 => (any::<usize>(), any::<bool>()).prop_map(|(i, d)| Step::Deliver(i, d)),
        1 => any::<usize>().prop_map(Step::Lose),
        1 => (0..4usize).prop_map(Step::Restart),
    ]
}

const NAMES: [&str; 4] = ["p0", "p1", "p2", "p3"];

fn value_for(k: u8, v: u64) -> (AppKey, AppValue) {
    match k {
        0 => (AppKey::DataBytes, AppValue::Count(v)),
        1 => (AppKey::HintsPending, AppValue::Count(v % 3)),
        2 => (
            AppKey::Status,
            AppValue::Status(if v.is_multiple_of(2) {
                NodeStatus::Normal
            } else {
                NodeStatus::Leaving
            }),
        ),
        3 => (
            AppKey::TreeRoots,
            AppValue::Roots((0..(v % 5)).map(|i| (i, v)).collect()),
        ),
        _ => (
            AppKey::Extension(u16::from(k)),
            AppValue::Text(format!("{v:x}")),
        ),
    }
}

/// Heals: every ordered pair exchanges, reliably, until nothing changes (bounded).
fn heal(nodes: &mut [Gossiper], now: Millis) {
    for _ in 0..64 {
        let before: Vec<_> = nodes.iter().map(view).collect();
        for a in 0..nodes.len() {
            for b in 0..nodes.len() {
                if a != b {
                    exchange(nodes, a, b, now);
                }
            }
        }
        if nodes.iter().map(view).collect::<Vec<_>>() == before {
            return;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    // Whatever the interleaving, duplication, reordering and loss of messages (and restarts),
    // versions never go backwards within a generation, and once the network heals every
    // node holds exactly what each owner published.
    #[test]
    fn digests_and_deltas_converge(steps in proptest::collection::vec(step(), 1..150), budget in prop_oneof![Just(1024usize), Just(64 * 1024)]) {
        let config = GossipConfig { max_message_bytes: budget, ..GossipConfig::default() };
        let mut generations = [1u64; 4];
        let mut nodes: Vec<Gossiper> = NAMES.iter().map(|n| gossiper_with(n, 1, &["p0"], config.clone())).collect();
        let mut network: Vec<(NodeId, NodeId, GossipMessage)> = Vec::new();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut now = 0;
        for step in steps {
            now += 7;
            match step {
                Step::Tick(n) => {
                    now += 600;
                    let from = nodes[n].id().clone();
                    for (to, message) in nodes[n].handle_tick(now, &mut rng) {
                        network.push((from.clone(), to, message));
                    }
                }
                Step::Set(n, k, v) => {
                    let (key, value) = value_for(k, v);
                    nodes[n].set_local(key, value, now).unwrap();
                }
                Step::Deliver(i, duplicate) if !network.is_empty() => {
                    let i = i % network.len();
                    let (from, to, message) = if duplicate { network[i].clone() } else { network.swap_remove(i) };
                    let j = NAMES.iter().position(|n| *n == to.as_str()).unwrap();
                    let before = nodes[j].digests();
                    for (next, reply) in nodes[j].handle_message(now, &from, message) {
                        network.push((to.clone(), next, reply));
                    }
                    for old in before {
                        if let Some(state) = nodes[j].member(&old.node) {
                            prop_assert!(state.generation() > old.generation
                                || (state.generation() == old.generation && state.max_version() >= old.max_version));
                        }
                    }
                }
                Step::Lose(i) if !network.is_empty() => {
                    let i = i % network.len();
                    network.swap_remove(i);
                }
                Step::Restart(n) => {
                    generations[n] += 1;
                    nodes[n] = gossiper_with(NAMES[n], generations[n], &["p0"], config.clone());
                }
                _ => {}
            }
        }
        heal(&mut nodes, now);
        let owners: Vec<_> = nodes.iter().map(|g| view(g).into_iter().find(|(id, ..)| id == g.id()).unwrap()).collect();
        for g in &nodes {
            prop_assert_eq!(&view(g), &owners, "{} disagrees", g.id());
            prop_assert_eq!(g.stats().dropped_malformed, 0);
        }
        // Old messages still in flight arrive late: they change nothing.
        for (from, to, message) in network.drain(..) {
            let j = NAMES.iter().position(|n| *n == to.as_str()).unwrap();
            nodes[j].handle_message(now, &from, message);
        }
        for g in &nodes {
            prop_assert_eq!(&view(g), &owners, "{} regressed", g.id());
        }
    }
}

// A late answer to a request made before a restart cannot leave a hole in the new view
// (the property test found this: the delta starts after versions the new life never saw).
#[test]
fn a_delta_that_starts_after_what_is_held_is_ignored() {
    let mut a = gossiper("a", &[]);
    a.set_local(AppKey::DataBytes, AppValue::Count(1), 0)
        .unwrap();
    let state = a.local_state().clone();
    let mut b = gossiper("b", &[]);
    let late = Delta {
        node: id("a"),
        generation: state.generation(),
        after: state.max_version() - 1,
        heartbeat: None,
        entries: vec![(
            AppKey::DataBytes,
            VersionedValue {
                value: AppValue::Count(1),
                version: state.max_version(),
            },
        )],
    };
    b.handle_message(0, &id("a"), GossipMessage::Ack2 { deltas: vec![late] });
    assert!(b.member(&id("a")).is_none());
    assert_eq!(b.stats().deltas_out_of_order, 1);
}

// A node that stalled itself does not convict everyone the moment it wakes up.
#[test]
fn a_local_pause_defers_the_verdicts() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut nodes = vec![gossiper("a", &[]), gossiper("b", &["a"])];
    let interval = nodes[0].config().interval_ms;
    let mut now = 0;
    while now < 20_000 {
        nodes[1].handle_tick(now, &mut rng);
        exchange(&mut nodes, 1, 0, now);
        nodes[0].handle_tick(now, &mut rng);
        now += interval;
    }
    // a stalls for 10 s; b keeps beating, and its news is waiting when a wakes up.
    now += 10_000;
    nodes[0].handle_tick(now, &mut rng);
    assert_eq!(nodes[0].liveness(&id("b")), Liveness::Up);
    assert_eq!(nodes[0].stats().local_pauses, 1);
    nodes[1].handle_tick(now, &mut rng);
    exchange(&mut nodes, 1, 0, now + 5);
    nodes[0].handle_tick(now + interval, &mut rng);
    nodes[0].handle_tick(now + 2 * interval, &mut rng);
    assert_eq!(nodes[0].liveness(&id("b")), Liveness::Up);
    assert!(!nodes[0]
        .take_events()
        .iter()
        .any(|e| matches!(e, GossipEvent::NodeDown { .. })));
}

fn arbitrary_value() -> impl Strategy<Value = AppValue> {
    prop_oneof![
        any::<u64>().prop_map(AppValue::Count),
        ".{0,40}".prop_map(AppValue::Text),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(AppValue::Bytes),
        proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20).prop_map(AppValue::Roots),
        Just(AppValue::Status(NodeStatus::Leaving)),
    ]
}

fn arbitrary_digest() -> impl Strategy<Value = Digest> {
    ("[a-z0-9-]{1,200}", any::<u64>(), any::<u64>()).prop_map(|(node, generation, max_version)| {
        Digest {
            node: id(&node),
            generation,
            max_version,
        }
    })
}

fn arbitrary_delta() -> impl Strategy<Value = Delta> {
    let entry = (any::<u16>(), arbitrary_value(), any::<u64>())
        .prop_map(|(k, value, version)| (AppKey::Extension(k), VersionedValue { value, version }));
    (
        arbitrary_digest(),
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        proptest::collection::vec(entry, 0..70),
    )
        .prop_map(|(d, after, heartbeat, entries)| Delta {
            node: d.node,
            generation: d.generation,
            after,
            heartbeat,
            entries,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    // The size arithmetic the budgets rely on is exactly postcard's, and messages round-trip.
    #[test]
    fn encoded_len_is_exact(
        digests in proptest::collection::vec(arbitrary_digest(), 0..40),
        deltas in proptest::collection::vec(arbitrary_delta(), 0..8),
        complete in any::<bool>(),
    ) {
        for message in [
            GossipMessage::Syn { digests: digests.clone(), complete },
            GossipMessage::Ack { deltas: deltas.clone(), requests: digests },
            GossipMessage::Ack2 { deltas },
        ] {
            let bytes = message.encode();
            prop_assert_eq!(message.encoded_len(), bytes.len());
            prop_assert_eq!(GossipMessage::decode(&bytes).ok(), Some(message));
        }
    }
}
