//! Operator repair runs (`POST /admin/repair`) against what the node knows of its cluster.

use super::*;
use crate::anti_entropy::RunState;

/// A run started on a node that has just restarted, before gossip told it its layout (it
/// knows only itself and its seed), used to take no (range, peer) and stay `running` with
/// 0 ranges forever (the repair benchmark's node 3 waited an hour). It now takes its
/// targets once the layout gives some, and repairs what the node missed.
#[test]
fn a_repair_run_started_before_the_layout_is_known_waits_for_it() {
    let mut cluster = gossiping_cluster(3);
    for i in 0..30 {
        cluster.request(
            0,
            ClientRequest::Put {
                bucket: "b".into(),
                key: format!("key-{i}").into_bytes(),
                context: CausalContext::empty(),
                value: data("v"),
                level: ConsistencyLevel::All,
            },
        );
    }
    // n2 restarts wiped of nothing but its view: a new Node over the same storage.
    let now = cluster.now;
    cluster.nodes[2].sync_now();
    let storage = cluster.take_storage(2);
    // Started with a seed, as `mendkv server --seed` is: it learns its cluster from peers.
    let mut config = NodeConfig::new("n2");
    config.learn_epoch_from_peers = true;
    let mut restarted = Node::new(config, storage, now).unwrap();
    restarted.handle_seed_discovered(now, member(0));
    let id = restarted.start_repair_run(now);
    let early = restarted.repair_run(id, now).unwrap();
    assert_eq!(early.state, RunState::Running);
    cluster.nodes[2] = restarted;
    cluster.run();
    let mut done = None;
    for step in 1..=2_000 {
        let status = cluster.nodes[2].repair_run(id, cluster.now).unwrap();
        if status.state != RunState::Running {
            done = Some(status);
            break;
        }
        cluster.tick(now + step * 50);
    }
    let status = done.unwrap_or_else(|| {
        panic!(
            "the run finished: {:?}, targets {:?}",
            cluster.nodes[2].repair_run(id, cluster.now),
            cluster.nodes[2]
                .membership
                .layout
                .repair_targets(&NodeId::new("n2"))
                .len()
        )
    });
    assert_eq!(status.state, RunState::Done, "{status:?}");
    assert!(
        status.ranges_total > 0,
        "the run took its targets once the layout was known: {status:?}"
    );
    assert_eq!(status.ranges_done, status.ranges_total, "{status:?}");
    let all_targets = cluster.nodes[2]
        .membership
        .layout
        .repair_targets(&NodeId::new("n2"))
        .len() as u64;
    assert_eq!(
        status.ranges_total, all_targets,
        "every replica peer, not the seed's only"
    );
}
