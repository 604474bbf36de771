//! Anti-entropy over real processes: `mendkv repair` after a node missed writes.

mod common;

use common::{eventually, write_keys, TestCluster};
use std::process::Command;
use std::time::Duration;

/// Only operator runs repair here: no hints, no read repair, no scheduled exchanges.
const ONLY_RUNS: [(&str, &str); 3] = [
    ("MENDKV_HINTED_HANDOFF__ENABLED", "false"),
    ("MENDKV_READ_REPAIR__ENABLED", "false"),
    ("MENDKV_ANTI_ENTROPY__ENABLED", "false"),
];

fn repair_command(url: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_mendkv"))
        .args(["repair", "--node", url])
        .output()
        .expect("run mendkv repair");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The number after `name` in the summary line.
fn figure(summary: &str, name: &str) -> u64 {
    let words: Vec<&str> = summary.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1].trim_end_matches(',') == name)
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {summary}"))
}

/// Stop one node of three, write 5,000 keys at quorum, start it, `mendkv repair`: every key
/// is on it, keys_repaired equals what it missed, and a second run finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_restores_a_node_that_missed_writes() {
    let mut cluster = TestCluster::start(3, &ONLY_RUNS).await;
    cluster.nodes[2].kill();
    let keys: Vec<String> = (0..5000).map(|i| format!("ae{i}")).collect();
    let writers = [cluster.client(0), cluster.client(1)];
    let mut tasks = Vec::new();
    for (i, chunk) in keys.chunks(500).enumerate() {
        let (client, chunk) = (writers[i % 2].clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            write_keys(&client, &chunk, b"v").await
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    cluster.nodes[2].start();
    cluster.wait_all_up().await;
    let url = cluster.nodes[2].url();
    let (ok, summary) = repair_command(&url);
    assert!(ok, "{summary}");
    assert_eq!(figure(&summary, "repaired"), 5000, "{summary}");
    let returning = cluster.client(2);
    for key in &keys {
        assert!(
            returning
                .local("t", key.as_bytes())
                .await
                .unwrap()
                .is_some(),
            "{key} missing"
        );
    }
    let (ok, summary) = repair_command(&url);
    assert!(ok, "{summary}");
    assert_eq!(
        figure(&summary, "different"),
        0,
        "roots equal after repair: {summary}"
    );
}

/// SIGKILL a peer in the middle of a run: the run reports failure; restart it: the next run
/// completes and the node has every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_interrupted_by_a_crash_fails_and_the_next_completes() {
    let mut env = ONLY_RUNS.to_vec();
    env.push(("MENDKV_ANTI_ENTROPY__RATE_LIMIT_BYTES_PER_S", "100000"));
    let mut cluster = TestCluster::start(3, &env).await;
    cluster.nodes[2].kill();
    let keys: Vec<String> = (0..1500).map(|i| format!("ak{i}")).collect();
    write_keys(&cluster.client(0), &keys, &[b'x'; 200]).await;
    cluster.nodes[2].start();
    cluster.wait_all_up().await;
    let returning = cluster.client(2);
    let id = returning.start_repair().await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the run has started repairing",
        || {
            let returning = returning.clone();
            async move {
                let status = returning.repair_status(id).await.unwrap_or_default();
                status["keys_repaired"].as_u64().unwrap_or(0) > 0 && status["state"] == "running"
            }
        },
    )
    .await;
    cluster.nodes[0].kill();
    eventually(Duration::from_secs(60), "the run ends", || {
        let returning = returning.clone();
        async move {
            returning
                .repair_status(id)
                .await
                .map(|s| s["state"] != "running")
                .unwrap_or(false)
        }
    })
    .await;
    assert_eq!(
        returning.repair_status(id).await.unwrap()["state"],
        "failed"
    );
    cluster.nodes[0].start();
    cluster.wait_all_up().await;
    let (ok, summary) = repair_command(&cluster.nodes[2].url());
    assert!(ok, "{summary}");
    for key in &keys {
        assert!(
            returning
                .local("t", key.as_bytes())
                .await
                .unwrap()
                .is_some(),
            "{key} missing"
        );
    }
}
