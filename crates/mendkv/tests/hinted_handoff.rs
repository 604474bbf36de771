//! Hinted handoff over real processes.

mod common;

use common::{eventually, write_keys, TestCluster};
use mendkv_client::Client;
use std::time::Duration;

/// Hints held for `target` by the nodes behind `clients`, from /cluster/status; `u64::MAX`
/// while a holder does not answer or does not list the target yet (so "0 pending" is never
/// read from a node that is down or still rejoining).
async fn pending_for(clients: &[Client], target: &str) -> u64 {
    let mut total = 0;
    for client in clients {
        let Ok(status) = client.status().await else {
            return u64::MAX;
        };
        let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
        // A holder that restarted may not know the target again yet: not an answer.
        let Some(node) = nodes.iter().find(|n| n["id"] == target) else {
            return u64::MAX;
        };
        total += node["hints_pending"].as_u64().unwrap_or(0);
    }
    total
}

async fn holds_all(client: &Client, keys: &[String]) -> bool {
    for key in keys {
        match client.local("t", key.as_bytes()).await {
            Ok(Some(_)) => {}
            _ => return false,
        }
    }
    true
}

const NO_READ_REPAIR: (&str, &str) = ("MENDKV_READ_REPAIR__ENABLED", "false");
const NO_ANTI_ENTROPY: (&str, &str) = ("MENDKV_ANTI_ENTROPY__ENABLED", "false");

/// Stop one node of three, write 1,000 keys at quorum: hints pile up, coalesced per key;
/// start it again: every key reaches it and pending drops to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_bring_a_returning_node_up_to_date() {
    let mut cluster = TestCluster::start(3, &[NO_READ_REPAIR, NO_ANTI_ENTROPY]).await;
    cluster.nodes[2].kill();
    let keys: Vec<String> = (0..1000).map(|i| format!("h{i}")).collect();
    let writers = [cluster.client(0), cluster.client(1)];
    for (i, half) in keys.chunks(500).enumerate() {
        write_keys(&writers[i % 2], half, b"v").await;
    }
    // One key updated 100 times coalesces into one hint.
    let mut context = None;
    for i in 0..100 {
        context = writers[0]
            .put(
                "t",
                b"hot",
                format!("u{i}").into_bytes(),
                None,
                Some("quorum"),
                context.as_deref(),
            )
            .await
            .unwrap();
    }
    assert_eq!(pending_for(&writers, "node3").await, 1001);
    cluster.nodes[2].start();
    let returning = cluster.client(2);
    eventually(Duration::from_secs(60), "all hints are delivered", || {
        let writers = writers.clone();
        async move { pending_for(&writers, "node3").await == 0 }
    })
    .await;
    assert!(
        holds_all(&returning, &keys).await,
        "every key is on the returning node"
    );
    let hot = returning.local("t", b"hot").await.unwrap().unwrap();
    assert_eq!(hot["siblings"].as_array().unwrap().len(), 1);
    assert_eq!(
        hot["siblings"][0]["value_base64"], "dTk5",
        "the final value u99"
    );
}

/// Kill -9 the hint holder in the middle of delivery, restart it: delivery resumes and
/// nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_survives_a_crash_of_the_holder() {
    let mut cluster = TestCluster::start(
        3,
        &[
            NO_READ_REPAIR,
            NO_ANTI_ENTROPY,
            ("MENDKV_HINTED_HANDOFF__DELIVERY_RATE_PER_S", "200"),
        ],
    )
    .await;
    cluster.nodes[2].kill();
    let keys: Vec<String> = (0..600).map(|i| format!("c{i}")).collect();
    let holder = cluster.client(0);
    write_keys(&holder, &keys, b"v").await;
    cluster.nodes[2].start();
    let holders = [holder.clone()];
    eventually(Duration::from_secs(30), "delivery has started", || {
        let holders = holders.clone();
        async move {
            let pending = pending_for(&holders, "node3").await;
            pending > 0 && pending < 600
        }
    })
    .await;
    cluster.nodes[0].kill();
    cluster.nodes[0].start();
    eventually(Duration::from_secs(60), "delivery resumes and ends", || {
        let holders = holders.clone();
        async move { pending_for(&holders, "node3").await == 0 }
    })
    .await;
    assert!(
        holds_all(&cluster.client(2), &keys).await,
        "no hint was lost"
    );
    eventually(
        Duration::from_secs(10),
        "the metric counts deliveries",
        || {
            let holder = holder.clone();
            async move {
                let metrics = holder.metrics().await.unwrap_or_default();
                mendkv_client::metric_sum(&metrics, "mendkv_hints_delivered_total", &[]) > 0.0
            }
        },
    )
    .await;
}
