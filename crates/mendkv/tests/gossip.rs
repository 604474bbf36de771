//! Gossip membership and phi-accrual failure detection over real processes.

mod common;

use common::{eventually, TestCluster};
use mendkv_client::Client;
use std::time::Duration;

async fn view_of(client: &Client, node: &str) -> Option<serde_json::Value> {
    let status = client.status().await.ok()?;
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"] == node)
        .cloned()
}

/// Nodes 2 and 3 know only node 1 as seed: all see 3 up; SIGKILL node 3: the others convict
/// it (phi past the threshold); restart it: up again, with a new generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_detection_and_restart() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let (a, b) = (cluster.client(0), cluster.client(1));
    eventually(
        Duration::from_secs(10),
        "node2 learns node3 through gossip",
        || {
            let b = b.clone();
            async move {
                view_of(&b, "node3")
                    .await
                    .is_some_and(|n| n["generation"].as_u64() > Some(0))
            }
        },
    )
    .await;
    let before = view_of(&a, "node3").await.unwrap()["generation"]
        .as_u64()
        .unwrap();
    cluster.nodes[2].kill();
    for client in [&a, &b] {
        eventually(Duration::from_secs(15), "node3 convicted by phi", || {
            let client = client.clone();
            async move {
                view_of(&client, "node3").await.is_some_and(|n| {
                    n["status"] == "down" && n["phi"].as_f64().unwrap_or(0.0) >= 8.0
                })
            }
        })
        .await;
    }
    cluster.nodes[2].start();
    for client in [&a, &b] {
        eventually(
            Duration::from_secs(15),
            "node3 up again with a new generation",
            || {
                let client = client.clone();
                async move {
                    view_of(&client, "node3").await.is_some_and(|n| {
                        n["status"] == "up" && n["generation"].as_u64().unwrap_or(0) > before
                    })
                }
            },
        )
        .await;
    }
    eventually(
        Duration::from_secs(10),
        "gossip bytes and phi are in the metrics",
        || {
            let a = a.clone();
            async move {
                let metrics = a.metrics().await.unwrap_or_default();
                let gossip_bytes = mendkv_client::metric_sum(
                    &metrics,
                    "mendkv_network_bytes_total",
                    &[("class", "gossip")],
                );
                gossip_bytes > 0.0 && metrics.contains("mendkv_peer_phi{peer=\"node3\"}")
            }
        },
    )
    .await;
}
