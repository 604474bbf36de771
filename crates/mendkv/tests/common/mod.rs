//! Harness for black-box tests: real `mendkv server` processes on loopback, free ports,
//! temporary data directories, and polling with deadlines (never fixed sleeps).

#![allow(dead_code)]

use mendkv_client::Client;
use mendkv_server::config::RUNTIME_THREADS_ENV;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct TestNode {
    pub id: String,
    pub http: String,
    pub peer: String,
    pub data_dir: PathBuf,
    pub seeds: Vec<String>,
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
}

impl TestNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url())
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("server.log"))
            .expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mendkv"));
        command
            .args([
                "server",
                "--node-id",
                &self.id,
                "--listen",
                &self.peer,
                "--http",
                &self.http,
            ])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for seed in &self.seeds {
            command.args(["--seed", seed]);
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        self.child = Some(command.spawn().expect("start mendkv server"));
    }

    /// SIGKILL: no clean shutdown, no final fsync.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `n` nodes where every node but the first has the first as its only seed.
    pub async fn start(n: usize, env: &[(&str, &str)]) -> Self {
        Self::start_with(n, env, |_| {}).await
    }

    /// As [`TestCluster::start`], with `prepare` run on each node (its data directory
    /// exists) before any starts: to mount something there or set its own environment.
    pub async fn start_with(
        n: usize,
        env: &[(&str, &str)],
        prepare: impl FnMut(&mut TestNode),
    ) -> Self {
        let cluster = Self::spawn_with(n, env, prepare);
        cluster.wait_all_up().await;
        cluster
    }

    /// As [`TestCluster::start_with`], without waiting for the cluster to form.
    pub fn spawn_with(
        n: usize,
        env: &[(&str, &str)],
        mut prepare: impl FnMut(&mut TestNode),
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        let mut seed = String::new();
        for i in 0..n {
            let peer = format!("127.0.0.1:{}", free_port());
            if i == 0 {
                seed = peer.clone();
            }
            let data_dir = dir.path().join(format!("node{}", i + 1));
            std::fs::create_dir_all(&data_dir).expect("data dir");
            // Every second node runs on tokio's current-thread runtime (`mendkv cluster`'s
            // choice), the others on the multi-thread one: every black-box test covers both.
            let mut env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if i % 2 == 1 && !env.iter().any(|(k, _)| k == RUNTIME_THREADS_ENV) {
                env.push((RUNTIME_THREADS_ENV.into(), "1".into()));
            }
            nodes.push(TestNode {
                id: format!("node{}", i + 1),
                http: format!("127.0.0.1:{}", free_port()),
                peer,
                data_dir,
                seeds: if i == 0 { vec![] } else { vec![seed.clone()] },
                env,
                child: None,
            });
        }
        for node in &mut nodes {
            prepare(node);
        }
        for node in &mut nodes {
            node.start();
        }
        TestCluster { nodes, _dir: dir }
    }

    /// Waits until every running node sees every node up and `normal` (a new node takes a
    /// request timeout or so to decide between bootstrap and join).
    pub async fn wait_all_up(&self) {
        eventually(
            Duration::from_secs(30),
            "every node sees every node up and normal",
            || self.formed(),
        )
        .await;
    }

    /// Whether every running node sees every node up and `normal`.
    pub async fn formed(&self) -> bool {
        let expected = self.nodes.len();
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let Ok(status) = node.client().status().await else {
                return false;
            };
            let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
            if nodes.len() != expected
                || nodes
                    .iter()
                    .any(|n| n["status"] != "up" || n["state"] != "normal")
            {
                return false;
            }
        }
        true
    }

    pub fn client(&self, i: usize) -> Client {
        self.nodes[i].client()
    }
}

/// Writes `value` to every key of bucket `t` at quorum through `client`.
pub async fn write_keys(client: &Client, keys: &[String], value: &[u8]) {
    for key in keys {
        client
            .put(
                "t",
                key.as_bytes(),
                value.to_vec(),
                None,
                Some("quorum"),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("write {key}: {e}"));
    }
}

/// Polls `check` until it holds or the deadline passes (then panics with `what`).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
