//! Merkle roots on gossip (`node/roots.rs`): quiet roots that differ schedule an exchange at
//! once, agreeing roots skip the periodic one, and a busy range is never compared.

use super::*;

const DAY_MS: Millis = 24 * 3600 * 1000;

/// Three gossiping nodes where only anti-entropy repairs (no hints, no read repair), with
/// `interval_ms` between periodic exchanges of a pair, settled: first exchanges done, roots
/// published and seen by every peer. Returns the cluster and the time reached.
fn roots_cluster(interval_ms: Millis, gossip_roots: bool) -> (TestCluster, Millis) {
    let mut cluster = TestCluster::with_config(3, |config| {
        config.hinted_handoff.enabled = false;
        config.read_repair.enabled = false;
        config.anti_entropy.interval_ms = interval_ms;
        config.anti_entropy.gossip_roots = gossip_roots;
    });
    for i in 0..3 {
        for j in (0..3).filter(|j| *j != i) {
            cluster.nodes[i].handle_seed_discovered(0, member(j));
        }
    }
    cluster.run();
    let mut now = 0;
    while now < 5_000 {
        now += 100;
        cluster.tick(now);
    }
    (cluster, now)
}

fn put_key(cluster: &mut TestCluster, key: &[u8], value: &str) {
    let response = cluster.request(
        0,
        ClientRequest::Put {
            bucket: "b".into(),
            key: key.to_vec(),
            context: CausalContext::empty(),
            value: data(value),
            level: ConsistencyLevel::Quorum,
        },
    );
    assert!(
        matches!(response, ClientResponse::Written { .. }),
        "{response:?}"
    );
}

/// Nodes 0 and 1 take a version of `key` that node 2 never hears of (as if every message
/// carrying it to node 2 was lost, and no hint kept: only anti-entropy can mend it).
fn write_missed_by_node_2(cluster: &mut TestCluster, key: &[u8], object: &Object) {
    for i in 0..2 {
        assert!(cluster.nodes[i].merge_local("b", key, object).unwrap());
    }
    cluster.run();
}

fn counter(cluster: &TestCluster, counter: Counter) -> u64 {
    cluster.nodes.iter().map(|n| n.stats().get(counter)).sum()
}

/// The range end of `key` as node `at` keys its trees.
fn range_end_of(cluster: &TestCluster, at: usize, key: &[u8]) -> u64 {
    let token = crate::ring::key_token("b", key);
    cluster.nodes[at]
        .anti_entropy
        .trees
        .locate(token)
        .expect("a replicated range")
        .0
        .end
}

fn published_ends(cluster: &TestCluster, at: usize) -> Vec<u64> {
    // What the node put in its gossip state (checked equal to what it holds as published).
    let gossiped = cluster.nodes[at]
        .cluster
        .gossiper
        .local_state()
        .tree_roots()
        .map_or(0, |list| list.len().saturating_sub(1));
    let published = &cluster.nodes[at].anti_entropy.roots.published;
    assert_eq!(gossiped, published.len());
    published.iter().map(|(end, _)| *end).collect()
}

/// A replica missed writes (no hints, no down/up event): once the range has
/// been quiet for the horizon, the published roots differ and the exchange starts at once,
/// though the periodic interval is a day, and it brings the replica up to date.
#[test]
fn roots_that_differ_schedule_an_exchange_at_once() {
    let (mut cluster, mut now) = roots_cluster(DAY_MS, true);
    // Every range of every node is quiet and published by now.
    let ranges = cluster.nodes[0].anti_entropy.trees.len();
    assert_eq!(published_ends(&cluster, 0).len(), ranges);
    assert_eq!(counter(&cluster, Counter::AntiEntropyRootsDiffer), 0);
    for i in 0..5 {
        write_missed_by_node_2(
            &mut cluster,
            format!("k{i}").as_bytes(),
            &written_object("v"),
        );
    }
    let written_at = now;
    let quiet_ms = cluster.nodes[0].roots_quiet_ms();
    let gossip_interval = cluster.nodes[0].config.gossip.interval_ms;
    let mut detected_at = None;
    while now < written_at + quiet_ms + 4 * gossip_interval {
        now += 10;
        cluster.tick(now);
        if detected_at.is_none() && counter(&cluster, Counter::AntiEntropyRootsDiffer) > 0 {
            detected_at = Some(now);
        }
    }
    let detected_at = detected_at.expect("the divergence was found by the roots");
    // Within two gossip intervals of the range going quiet (the horizon after the writes).
    assert!(
        detected_at <= written_at + quiet_ms + 2 * gossip_interval,
        "detected {} ms after the writes (quiet horizon {quiet_ms} ms)",
        detected_at - written_at
    );
    for i in 0..5 {
        let key = format!("k{i}").into_bytes();
        assert!(
            cluster.nodes[2].storage().get("b", &key).unwrap().is_some(),
            "k{i} repaired"
        );
    }
    // Converged: the roots agree again and nothing further is scheduled by them.
    let differ = counter(&cluster, Counter::AntiEntropyRootsDiffer);
    for _ in 0..50 {
        now += 100;
        cluster.tick(now);
    }
    assert_eq!(counter(&cluster, Counter::AntiEntropyRootsDiffer), differ);
    let published = cluster.nodes[0].cluster.gossiper.local_state().tree_roots();
    assert_eq!(
        published,
        cluster.nodes[2].cluster.gossiper.local_state().tree_roots()
    );
}

/// Replicas in sync: every periodic exchange is skipped while the roots agree (counted),
/// until a pair's full exchange falls due; with roots off the same schedule exchanges.
#[test]
fn agreeing_roots_skip_the_periodic_exchange() {
    let exchanges_in_a_minute = |gossip_roots: bool| {
        let (mut cluster, mut now) = roots_cluster(5_000, gossip_roots);
        for node in &mut cluster.nodes {
            node.config.anti_entropy.full_exchange_interval_ms = 10 * 60_000;
        }
        put_key(&mut cluster, b"k", "v");
        let start = now;
        let before = counter(&cluster, Counter::AntiEntropyExchangesOk);
        while now < start + 60_000 {
            now += 100;
            cluster.tick(now);
        }
        (
            counter(&cluster, Counter::AntiEntropyExchangesOk) - before,
            counter(&cluster, Counter::AntiEntropyExchangesSkippedRootsAgree),
        )
    };
    let (with_roots, skipped) = exchanges_in_a_minute(true);
    let (without_roots, skipped_without) = exchanges_in_a_minute(false);
    assert_eq!(skipped_without, 0);
    assert!(
        without_roots > 100,
        "{without_roots} exchanges without roots"
    );
    assert!(skipped > 100, "{skipped} skipped");
    // Only the first exchanges of the pairs the write touched, before their roots were
    // quiet again, may run.
    assert!(
        with_roots * 10 < without_roots,
        "{with_roots} exchanges with roots, {without_roots} without"
    );
}

/// A pair whose roots agree still gets a full exchange every `full_exchange_interval_ms`.
#[test]
fn the_full_exchange_still_runs_when_roots_agree() {
    let (mut cluster, mut now) = roots_cluster(1_000, true);
    for node in &mut cluster.nodes {
        node.config.anti_entropy.full_exchange_interval_ms = 20_000;
    }
    let pairs: u64 = cluster
        .nodes
        .iter()
        .map(|n| n.anti_entropy.repair_queue.len() as u64)
        .sum();
    let before = counter(&cluster, Counter::AntiEntropyExchangesOk);
    let start = now;
    while now < start + 30_000 {
        now += 100;
        cluster.tick(now);
    }
    let ran = counter(&cluster, Counter::AntiEntropyExchangesOk) - before;
    // Every pair once in the 30 s (its full exchange, 20 s after the first), not every second.
    assert!(
        ran >= pairs && ran < 3 * pairs,
        "{ran} exchanges for {pairs} pairs"
    );
}

/// While a range keeps taking writes its root is withdrawn and never compared, even though a
/// replica misses every write; once the writes stop the divergence is found.
#[test]
fn a_busy_range_is_not_compared() {
    let (mut cluster, mut now) = roots_cluster(DAY_MS, true);
    let end = range_end_of(&cluster, 0, b"k");
    let gossip_interval = cluster.nodes[0].config.gossip.interval_ms;
    let mut object = Object::empty();
    for i in 0..40 {
        // Node 2 misses every write (and gossips as usual, so it is never thought down).
        object.apply_write(
            Actor::new("w", 1),
            &CausalContext::empty(),
            data(&format!("v{i}")),
        );
        write_missed_by_node_2(&mut cluster, b"k", &object);
        now += 100;
        cluster.tick(now);
        if i > 0 {
            assert!(!published_ends(&cluster, 0).contains(&end), "write {i}");
            assert!(!published_ends(&cluster, 1).contains(&end), "write {i}");
        }
        assert_eq!(counter(&cluster, Counter::AntiEntropyRootsDiffer), 0);
    }
    let stopped_at = now;
    let quiet_ms = cluster.nodes[0].roots_quiet_ms();
    while now < stopped_at + quiet_ms + 2 * gossip_interval {
        now += 10;
        cluster.tick(now);
    }
    assert!(published_ends(&cluster, 0).contains(&end));
    assert!(counter(&cluster, Counter::AntiEntropyRootsDiffer) > 0);
    assert!(cluster.nodes[2].storage().get("b", b"k").unwrap().is_some());
}
