//! Read repair over real processes (the Cassandra dtest pattern).

mod common;

use common::{eventually, write_keys, TestCluster};
use mendkv_client::{metric_sum, ReadResult};
use std::time::Duration;

/// A replica that was down during writes is proven stale with /admin/local; quorum and `all`
/// reads through each node repair it, and the metric counts the repairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_repair_a_stale_replica() {
    let mut cluster = TestCluster::start(
        3,
        &[
            ("MENDKV_READ_REPAIR__BACKGROUND_CHANCE", "0"),
            ("MENDKV_HINTED_HANDOFF__ENABLED", "false"),
            ("MENDKV_ANTI_ENTROPY__ENABLED", "false"),
        ],
    )
    .await;
    cluster.nodes[2].kill();
    let keys: Vec<String> = (0..20).map(|i| format!("rr{i}")).collect();
    write_keys(&cluster.client(0), &keys, b"fresh").await;
    cluster.nodes[2].start();
    cluster.wait_all_up().await;
    for key in &keys {
        assert!(
            cluster
                .client(2)
                .local("t", key.as_bytes())
                .await
                .unwrap()
                .is_none(),
            "{key} should be stale"
        );
    }
    // Quorum reads through the stale node itself repair it (it is its own data replica).
    for key in &keys[..10] {
        let read = cluster
            .client(2)
            .get("t", key.as_bytes(), Some("quorum"))
            .await
            .unwrap();
        assert!(
            matches!(read, ReadResult::Value { ref value, .. } if value == b"fresh"),
            "{key}: {read:?}"
        );
    }
    // Reads at `all` through the other nodes repair the rest.
    for (i, key) in keys[10..].iter().enumerate() {
        let read = cluster
            .client(i % 2)
            .get("t", key.as_bytes(), Some("all"))
            .await
            .unwrap();
        assert!(
            matches!(read, ReadResult::Value { ref value, .. } if value == b"fresh"),
            "{key}: {read:?}"
        );
    }
    for key in &keys {
        let local = cluster
            .client(2)
            .local("t", key.as_bytes())
            .await
            .unwrap()
            .expect("repaired");
        assert_eq!(local["siblings"][0]["value_base64"], "ZnJlc2g=", "{key}");
    }
    // Metrics follow the node within a fraction of a second: poll until they show the repairs.
    let clients: Vec<_> = (0..3).map(|i| cluster.client(i)).collect();
    eventually(Duration::from_secs(10), "metrics count 20 repairs", || {
        let clients = clients.clone();
        async move {
            let (mut repaired, mut writes_ok) = (0.0, 0.0);
            for client in &clients {
                let text = client.metrics().await.unwrap_or_default();
                repaired += metric_sum(
                    &text,
                    "mendkv_read_repair_total",
                    &[("outcome", "repaired")],
                );
                writes_ok += metric_sum(
                    &text,
                    "mendkv_repairs_total",
                    &[("mechanism", "read_repair"), ("outcome", "ok")],
                );
            }
            repaired == 20.0 && writes_ok == 20.0
        }
    })
    .await;
}
