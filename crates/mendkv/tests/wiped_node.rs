//! A node whose data directory is wiped comes back under the same id (SPEC section 6):
//! it must not reuse the dots it issued before, or its new writes would look already seen
//! to the replicas and vanish.

mod common;

use common::{eventually, TestCluster};
use mendkv_client::ReadResult;
use std::time::Duration;

fn generation_of(status: &serde_json::Value, id: &str) -> u64 {
    status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"] == id))
        .and_then(|n| n["generation"].as_u64())
        .unwrap_or(0)
}

fn values(read: &ReadResult) -> Vec<Vec<u8>> {
    match read {
        ReadResult::Value { value, .. } => vec![value.clone()],
        ReadResult::Siblings { siblings, .. } => siblings.iter().map(|s| s.value.clone()).collect(),
        ReadResult::NotFound { .. } => vec![],
    }
}

/// Writes coordinated by a node before and after its data directory was wiped: the one
/// after is kept by every replica (it learned a higher epoch from its peers first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_does_not_reuse_its_dots() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let third = cluster.client(2);
    for value in ["old-1", "old-2"] {
        third
            .put(
                "t",
                b"k",
                value.as_bytes().to_vec(),
                None,
                Some("all"),
                None,
            )
            .await
            .unwrap();
    }
    let old_generation = generation_of(&cluster.client(0).status().await.unwrap(), "node3");
    assert!(old_generation >= 1);

    cluster.nodes[2].kill();
    let data_dir = cluster.nodes[2].data_dir.clone();
    std::fs::remove_dir_all(&data_dir).unwrap();
    std::fs::create_dir_all(&data_dir).unwrap();
    cluster.nodes[2].start();

    // It answers 503 until a seed has told it its old epoch; then the write goes through.
    eventually(
        Duration::from_secs(20),
        "the wiped node accepts writes",
        || async {
            third
                .put("t", b"k", b"new".to_vec(), None, Some("all"), None)
                .await
                .is_ok()
        },
    )
    .await;
    let first = cluster.client(0);
    eventually(
        Duration::from_secs(20),
        "node1 sees node3's higher epoch",
        || async {
            let status = first.status().await.unwrap();
            generation_of(&status, "node3") > old_generation
        },
    )
    .await;
    let read = cluster.client(0).get("t", b"k", Some("all")).await.unwrap();
    assert!(
        values(&read).contains(&b"new".to_vec()),
        "the write after the wipe survives: {read:?}"
    );
    for i in 0..2 {
        let local = cluster.client(i).local("t", b"k").await.unwrap().unwrap();
        assert!(
            local.to_string().contains("bmV3"),
            "node{} holds the new value: {local}",
            i + 1
        );
    }
}
