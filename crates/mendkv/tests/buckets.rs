//! Bucket properties over real processes: lww buckets, sibling limits, properties that
//! survive restarts, and repair of one bucket.

mod common;

use common::{eventually, TestCluster};
use mendkv_client::{ClientError, ReadResult};
use serde_json::json;
use std::time::Duration;

/// Polls until every running node reports `field` = `value` for `bucket`.
async fn wait_props(cluster: &TestCluster, bucket: &str, field: &str, value: serde_json::Value) {
    let clients: Vec<_> = (0..cluster.nodes.len())
        .map(|i| cluster.client(i))
        .collect();
    let what = format!("every node has {bucket}.{field} = {value}");
    eventually(Duration::from_secs(15), &what, || {
        let (clients, value) = (clients.clone(), value.clone());
        async move {
            for client in &clients {
                match client.bucket_props(bucket).await {
                    Ok(props) if props[field] == value => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;
}

/// Bad property changes get 400 and change nothing; a bucket never set has the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn props_validate_and_default() {
    let cluster = TestCluster::start(1, &[("MENDKV_BUCKETS__MAX_SIBLINGS", "50")]).await;
    let client = cluster.client(0);
    let props = client.bucket_props("fresh").await.unwrap();
    assert_eq!(
        props,
        json!({"resolution": "causal", "max_siblings": 50, "warn_siblings": 25})
    );
    for bad in [
        json!({"resolution": "newest"}),
        json!({"max_siblings": 0}),
        json!({"max_siblings": "3"}),
        json!({"allow_mult": false}),
    ] {
        match client.set_bucket_props("fresh", &bad).await {
            Err(ClientError::Api { status: 400, .. }) => {}
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(
        client.bucket_props("fresh").await.unwrap()["max_siblings"],
        50
    );
    match client.bucket_props("not a bucket!").await {
        Err(ClientError::Api {
            status: 400, code, ..
        }) => assert_eq!(code, "bad_request"),
        other => panic!("bad bucket name: {other:?}"),
    }
}

/// Blind writes through two nodes to an lww bucket give 200 with the later value, never 300.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lww_blind_writes_through_two_nodes_never_make_siblings() {
    let cluster = TestCluster::start(3, &[]).await;
    cluster
        .client(0)
        .set_bucket_props("fast", &json!({"resolution": "lww"}))
        .await
        .unwrap();
    wait_props(&cluster, "fast", "resolution", json!("lww")).await;
    for round in 0..20 {
        let value = format!("v{round}");
        cluster
            .client(round % 2)
            .put(
                "fast",
                b"k",
                value.clone().into_bytes(),
                None,
                Some("quorum"),
                None,
            )
            .await
            .unwrap();
        for reader in 0..3 {
            let read = cluster
                .client(reader)
                .get("fast", b"k", Some("quorum"))
                .await
                .unwrap();
            match read {
                ReadResult::Value { value: got, .. } => {
                    assert_eq!(got, value.as_bytes(), "round {round}, node {reader}")
                }
                other => panic!("round {round}, node {reader}: {other:?}"),
            }
        }
    }
    // A blind delete supersedes too.
    cluster
        .client(1)
        .delete("fast", b"k", Some("quorum"), None)
        .await
        .unwrap();
    let read = cluster
        .client(0)
        .get("fast", b"k", Some("quorum"))
        .await
        .unwrap();
    assert!(matches!(read, ReadResult::NotFound { .. }), "{read:?}");
}

/// A causal bucket with max_siblings 3 refuses the 4th blind write with 409 and accepts a
/// write with the context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_siblings_refuses_the_fourth_blind_write() {
    let cluster = TestCluster::start(3, &[]).await;
    cluster
        .client(2)
        .set_bucket_props("few", &json!({"max_siblings": 3}))
        .await
        .unwrap();
    wait_props(&cluster, "few", "max_siblings", json!(3)).await;
    let client = cluster.client(0);
    for value in ["a", "b", "c"] {
        client
            .put("few", b"k", value.into(), None, Some("all"), None)
            .await
            .unwrap();
    }
    match client
        .put("few", b"k", b"d".to_vec(), None, Some("all"), None)
        .await
    {
        Err(ClientError::Api {
            status: 409, code, ..
        }) => assert_eq!(code, "too_many_siblings"),
        other => panic!("expected 409: {other:?}"),
    }
    let read = client.get("few", b"k", Some("all")).await.unwrap();
    let ReadResult::Siblings { siblings, context } = read else {
        panic!("expected siblings: {read:?}");
    };
    assert_eq!(siblings.len(), 3);
    cluster
        .client(1)
        .put(
            "few",
            b"k",
            b"resolved".to_vec(),
            None,
            Some("all"),
            Some(&context),
        )
        .await
        .unwrap();
    let read = cluster
        .client(2)
        .get("few", b"k", Some("all"))
        .await
        .unwrap();
    assert!(
        matches!(read, ReadResult::Value { ref value, .. } if value == b"resolved"),
        "{read:?}"
    );
    // Metrics follow the node within a fraction of a second: poll until the refusal shows.
    eventually(Duration::from_secs(10), "the refusal is counted", || {
        let client = client.clone();
        async move {
            let text = client.metrics().await.unwrap_or_default();
            mendkv_client::metric_sum(&text, "mendkv_siblings_refused_total", &[]) == 1.0
        }
    })
    .await;
}

/// Properties survive a restart of every node (each reloads its own record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn props_survive_a_restart_of_every_node() {
    let mut cluster = TestCluster::start(3, &[]).await;
    cluster
        .client(1)
        .set_bucket_props("kept", &json!({"resolution": "lww", "warn_siblings": 7}))
        .await
        .unwrap();
    wait_props(&cluster, "kept", "warn_siblings", json!(7)).await;
    for node in &mut cluster.nodes {
        node.kill();
    }
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_all_up().await;
    for i in 0..3 {
        let props = cluster.client(i).bucket_props("kept").await.unwrap();
        assert_eq!(
            props,
            json!({"resolution": "lww", "max_siblings": 100, "warn_siblings": 7}),
            "node {i}"
        );
    }
}

/// `repair --bucket b1` repairs exactly b1's divergence and leaves b2's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_of_one_bucket_leaves_the_others_alone() {
    let mut cluster = TestCluster::start(
        3,
        &[
            ("MENDKV_HINTED_HANDOFF__ENABLED", "false"),
            ("MENDKV_READ_REPAIR__ENABLED", "false"),
            ("MENDKV_ANTI_ENTROPY__ENABLED", "false"),
        ],
    )
    .await;
    cluster.nodes[2].kill();
    let keys: Vec<String> = (0..10).map(|i| format!("key{i}")).collect();
    for bucket in ["b1", "b2"] {
        for key in &keys {
            cluster
                .client(0)
                .put(
                    bucket,
                    key.as_bytes(),
                    b"v".to_vec(),
                    None,
                    Some("one"),
                    None,
                )
                .await
                .unwrap();
        }
    }
    cluster.nodes[2].start();
    cluster.wait_all_up().await;
    let stale = cluster.client(2);
    for bucket in ["b1", "b2"] {
        for key in &keys {
            assert!(stale.local(bucket, key.as_bytes()).await.unwrap().is_none());
        }
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mendkv"))
        .args([
            "repair",
            "--bucket",
            "b1",
            "--node",
            &cluster.nodes[2].url(),
        ])
        .output()
        .expect("run mendkv repair");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(" done: ") && stdout.contains(", 10 repaired,"),
        "{stdout}"
    );
    for key in &keys {
        assert!(
            stale.local("b1", key.as_bytes()).await.unwrap().is_some(),
            "b1/{key}"
        );
        assert!(
            stale.local("b2", key.as_bytes()).await.unwrap().is_none(),
            "b2/{key}"
        );
    }
}
