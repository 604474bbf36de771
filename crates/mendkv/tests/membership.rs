//! Cluster changes over real processes (SPEC section 7): under a continuous writer and
//! reader at quorum, two nodes join, one is decommissioned, one is killed and removed; every
//! acknowledged write is read back at quorum through every remaining node, the departed
//! nodes' data has RF copies on the live nodes, and the old owners' disks shrank. While node4
//! is down a decommission is refused, naming it. The removed node then comes back with its
//! old data: it refuses clients, its peers refuse it (counted, logged), it stays `left` and
//! takes no writes.

mod common;

use common::{eventually, free_port, write_keys, TestCluster, TestNode};
use mendkv_client::{member_state, metric_sum, Client, ClientError, ReadResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long one change may take in a debug build on a shared machine.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

async fn wait_state(clients: &[Client], id: &str, state: &str) {
    eventually(
        CHANGE_TIMEOUT,
        &format!("every node sees {id} {state}"),
        || {
            let clients = clients.to_vec();
            async move {
                for client in &clients {
                    let Ok(status) = client.status().await else {
                        return false;
                    };
                    let seen = member_state(&status, id);
                    // A departed node may already be forgotten by gossip.
                    if seen.as_deref() != Some(state) && !(state == "left" && seen.is_none()) {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
}

fn value_of(read: &ReadResult) -> Option<Vec<u8>> {
    match read {
        ReadResult::Value { value, .. } => Some(value.clone()),
        ReadResult::Siblings { siblings, .. } => siblings.first().map(|s| s.value.clone()),
        ReadResult::NotFound { .. } => None,
    }
}

fn new_node(cluster: &TestCluster, id: &str) -> TestNode {
    let data_dir = cluster.nodes[0].data_dir.with_file_name(id);
    std::fs::create_dir_all(&data_dir).expect("data dir");
    TestNode {
        id: id.to_string(),
        http: format!("127.0.0.1:{}", free_port()),
        peer: format!("127.0.0.1:{}", free_port()),
        data_dir,
        seeds: vec![cluster.nodes[0].peer.clone()],
        env: vec![],
        child: None,
    }
}

async fn cleanup_keys(client: &Client) -> f64 {
    let text = client.metrics().await.unwrap_or_default();
    metric_sum(&text, "mendkv_cleanup_keys_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_decommission_and_removal_lose_no_acknowledged_write() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let initial: Vec<String> = (0..300).map(|i| format!("initial-{i}")).collect();
    write_keys(&cluster.client(0), &initial, b"v").await;

    // The continuous writer and reader: unique keys at quorum through the first three nodes
    // (which stay); a read of an acknowledged key that misses it is a lost write.
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let missed: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<Client> = (0..3).map(|i| cluster.client(i)).collect();
    let load = {
        let (acked, missed, stop, clients) =
            (acked.clone(), missed.clone(), stop.clone(), clients.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("live-{i}");
                let client = &clients[i % clients.len()];
                let written = client
                    .put(
                        "t",
                        key.as_bytes(),
                        b"x".to_vec(),
                        None,
                        Some("quorum"),
                        None,
                    )
                    .await;
                if written.is_ok() {
                    acked.lock().unwrap().push(key);
                }
                let check = { acked.lock().unwrap().get(i / 2).cloned() };
                if let Some(check) = check {
                    let reader = &clients[(i + 1) % clients.len()];
                    if let Ok(read) = reader.get("t", check.as_bytes(), Some("quorum")).await {
                        if value_of(&read).is_none() {
                            missed.lock().unwrap().push(check);
                        }
                    }
                }
                i += 1;
            }
        })
    };

    // Two nodes join, one after the other.
    for id in ["node4", "node5"] {
        let mut node = new_node(&cluster, id);
        node.start();
        cluster.nodes.push(node);
        let all: Vec<Client> = cluster.nodes.iter().map(|n| n.client()).collect();
        wait_state(&all, id, "normal").await;
    }
    let clients_all: Vec<Client> = cluster.nodes.iter().map(|n| n.client()).collect();
    eventually(CHANGE_TIMEOUT, "old owners clean up", || {
        let clients = clients_all[..3].to_vec();
        async move {
            let mut total = 0.0;
            for client in &clients {
                total += cleanup_keys(client).await;
            }
            total > 0.0
        }
    })
    .await;

    // Bad input while nothing changes.
    match cluster.client(0).remove_node("nosuch").await {
        Err(ClientError::Api { status: 404, .. }) => {}
        other => panic!("remove-node of an unknown id: {other:?}"),
    }
    match cluster.client(0).remove_node("node2").await {
        Err(ClientError::Api {
            status: 409,
            message,
            ..
        }) => {
            assert!(message.contains("decommission it instead"), "{message}")
        }
        other => panic!("remove-node of an up node: {other:?}"),
    }

    // Decommission node5, then stop it.
    cluster
        .client(4)
        .decommission()
        .await
        .expect("decommission");
    wait_state(&clients_all[..4], "node5", "left").await;
    cluster.nodes[4].kill();

    // Kill node4 for good and remove it.
    cluster.nodes[3].kill();
    eventually(CHANGE_TIMEOUT, "node4 is seen down", || {
        let client = cluster.client(0);
        async move {
            let Ok(status) = client.status().await else {
                return false;
            };
            status["nodes"]
                .as_array()
                .and_then(|n| n.iter().find(|n| n["id"] == "node4"))
                .is_some_and(|n| n["status"] == "down")
        }
    })
    .await;
    // A change with a member down would stall: a decommission is refused up front, naming
    // the down member and the way out.
    match cluster.client(0).decommission().await {
        Err(ClientError::Api {
            status: 409,
            message,
            ..
        }) => {
            assert!(
                message.contains("node4 is down") && message.contains("remove-node node4"),
                "{message}"
            )
        }
        other => panic!("decommission with node4 down: {other:?}"),
    }
    cluster
        .client(0)
        .remove_node("node4")
        .await
        .expect("remove-node");
    wait_state(&clients_all[..3], "node4", "left").await;

    // Three nodes at RF 3: one more decommission is refused.
    match cluster.client(0).decommission().await {
        Err(ClientError::Api {
            status: 409,
            message,
            ..
        }) => {
            assert!(message.contains("not enough nodes"), "{message}")
        }
        other => panic!("decommission of one of the last RF nodes: {other:?}"),
    }

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let missed = missed.lock().unwrap().clone();
    assert!(
        missed.is_empty(),
        "reads missed acknowledged writes: {missed:?}"
    );
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    for key in initial.iter().chain(&acked) {
        for i in 0..3 {
            let read = cluster
                .client(i)
                .get("t", key.as_bytes(), Some("quorum"))
                .await
                .unwrap_or_else(|e| panic!("read {key} through node{}: {e}", i + 1));
            assert!(value_of(&read).is_some(), "{key} through node{}", i + 1);
        }
    }
    // The departed nodes' data has RF copies on the three live nodes.
    for key in initial.iter().chain(&acked) {
        for i in 0..3 {
            let local = cluster.client(i).local("t", key.as_bytes()).await.unwrap();
            assert!(local.is_some(), "{key} on node{}", i + 1);
        }
    }

    // node4 comes back with its old data: it refuses clients, and its peers refuse it.
    cluster.nodes[3].start();
    let back = cluster.nodes[3].client();
    eventually(CHANGE_TIMEOUT, "node4 refuses writes as removed", || {
        let back = back.clone();
        async move {
            matches!(
                back.put("t", b"to-removed", b"x".to_vec(), None, Some("quorum"), None).await,
                Err(ClientError::Api { status: 503, message, .. }) if message.contains("removed")
            )
        }
    })
    .await;
    eventually(CHANGE_TIMEOUT, "node1 refuses node4's messages", || {
        let client = cluster.client(0);
        async move {
            let text = client.metrics().await.unwrap_or_default();
            metric_sum(&text, "mendkv_peer_messages_from_removed_total", &[]) > 0.0
        }
    })
    .await;
    // The log lines are written with the metrics export (every 200 ms): poll for them.
    let log_has = |nodes: Vec<usize>, line: &'static str| {
        let paths: Vec<std::path::PathBuf> = nodes
            .iter()
            .map(|i| cluster.nodes[*i].data_dir.join("server.log"))
            .collect();
        move || {
            let paths = paths.clone();
            async move {
                paths.iter().any(|path| {
                    std::fs::read_to_string(path)
                        .unwrap_or_default()
                        .contains(line)
                })
            }
        }
    };
    eventually(
        CHANGE_TIMEOUT,
        "a peer logs the refusal",
        log_has(vec![0, 1, 2], "refusing a node removed from the cluster"),
    )
    .await;
    eventually(
        CHANGE_TIMEOUT,
        "node4 logs that it was removed",
        log_has(vec![3], "this node was removed from the cluster"),
    )
    .await;
    // Its gossip did not bring it back, and writes do not reach it.
    wait_state(&clients_all[..3], "node4", "left").await;
    cluster
        .client(0)
        .put(
            "t",
            b"after-return",
            b"x".to_vec(),
            None,
            Some("quorum"),
            None,
        )
        .await
        .expect("write with node4 back");
    let on_removed = back.local("t", b"after-return").await;
    assert!(
        matches!(on_removed, Ok(None)),
        "the removed node took a write: {on_removed:?}"
    );
}
