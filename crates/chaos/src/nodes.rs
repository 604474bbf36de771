//! The `mendkv server` processes, one per node namespace: start, kill -9, restart on the
//! same data directory, SIGSTOP/SIGCONT. Dropping [`Nodes`] kills every process it started
//! (and each server also dies with the thread that started it, by `PR_SET_PDEATHSIG`, if the
//! harness itself is killed).

use crate::topology::node_address;
use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const PEER_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 8000;

/// Server settings for chaos runs: short timeouts and intervals, so that failures are
/// answered quickly and convergence after the heal happens within the settle time without an
/// operator's `mendkv repair`.
pub struct ServerSettings {
    pub request_timeout_ms: u64,
    pub anti_entropy_interval_s: u64,
}

struct Node {
    id: String,
    namespace: String,
    data_dir: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Started at least once: a joiner's slot is not until its join.
    started: bool,
    /// Decommissioned and stopped for good: never revived.
    departed: bool,
}

pub struct Nodes {
    binary: PathBuf,
    env: Vec<(String, String)>,
    seeds: Vec<String>,
    nodes: Vec<Node>,
}

impl Nodes {
    /// Starts a server in each of the first `initial` namespaces, data directories under
    /// `data_root`; the other namespaces are slots for joiners ([`Nodes::join`]). Every node's
    /// seeds are the first `initial` nodes (a joiner is found through gossip, as an operator's
    /// new node would be).
    pub fn start(
        binary: &Path,
        namespaces: &[String],
        initial: usize,
        data_root: &Path,
        settings: &ServerSettings,
    ) -> Result<Nodes> {
        let env = vec![
            (
                "MENDKV_CONSISTENCY__REQUEST_TIMEOUT_MS".to_string(),
                settings.request_timeout_ms.to_string(),
            ),
            (
                "MENDKV_ANTI_ENTROPY__INTERVAL_S".to_string(),
                settings.anti_entropy_interval_s.to_string(),
            ),
            (
                "MENDKV_CLUSTER__SECRET".to_string(),
                "chaos-secret".to_string(),
            ),
            ("RUST_LOG".to_string(), "warn".to_string()),
        ];
        let seeds = (0..initial)
            .map(|i| format!("{}:{PEER_PORT}", node_address(i)))
            .collect();
        let mut nodes = Nodes {
            binary: binary.to_path_buf(),
            env,
            seeds,
            nodes: Vec::new(),
        };
        for (index, namespace) in namespaces.iter().enumerate() {
            let id = format!("n{}", index + 1);
            let data_dir = data_root.join(&id);
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            nodes.nodes.push(Node {
                id,
                namespace: namespace.clone(),
                data_dir,
                child: None,
                paused: false,
                started: false,
                departed: false,
            });
        }
        for index in 0..initial {
            nodes.spawn(index)?;
        }
        Ok(nodes)
    }

    /// Starts the server of a joiner's slot (fresh data directory, the seeds).
    pub fn join(&mut self, index: usize) -> Result<()> {
        self.spawn(index)
    }

    /// Stops a decommissioned node for good (kill -9: it has left, nothing of it is needed).
    pub fn retire(&mut self, index: usize) {
        self.kill(index);
        self.nodes[index].departed = true;
    }

    /// The nodes running now (or killed or paused by a fault, to be revived): started and
    /// not departed.
    pub fn members(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].started && !self.nodes[i].departed)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn id(&self, index: usize) -> &str {
        &self.nodes[index].id
    }

    pub fn url(index: usize) -> String {
        format!("http://{}:{HTTP_PORT}", node_address(index))
    }

    fn spawn(&mut self, index: usize) -> Result<()> {
        let address = node_address(index);
        let node = &mut self.nodes[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.data_dir.with_extension("log"))
            .context("server log file")?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.namespace])
            .arg(&self.binary)
            .args(["server", "--node-id", &node.id])
            .args(["--listen", &format!("{address}:{PEER_PORT}")])
            .args(["--http", &format!("{address}:{HTTP_PORT}")])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (other, seed) in self.seeds.iter().enumerate() {
            if other != index {
                command.args(["--seed", seed]);
            }
        }
        // SAFETY: prctl is async-signal-safe; the child dies when this thread does, so a
        // killed harness leaves no server behind (`ip netns exec` execs the server itself).
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        node.child = Some(command.spawn().context("starting mendkv server")?);
        node.paused = false;
        node.started = true;
        Ok(())
    }

    fn signal(&self, index: usize, signal: libc::c_int) {
        if let Some(child) = &self.nodes[index].child {
            // SAFETY: a pid of our own child that has not been waited for yet.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGKILL: no shutdown, no final fsync.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.nodes[index].paused = false;
    }

    pub fn pause(&mut self, index: usize) {
        self.signal(index, libc::SIGSTOP);
        self.nodes[index].paused = self.nodes[index].child.is_some();
    }

    /// Continues a paused node and restarts a killed one (same data directory). A slot
    /// never started and a departed node stay as they are.
    pub fn revive(&mut self, index: usize) -> Result<()> {
        if !self.nodes[index].started || self.nodes[index].departed {
            return Ok(());
        }
        if self.nodes[index].paused {
            self.signal(index, libc::SIGCONT);
            self.nodes[index].paused = false;
        }
        if self.nodes[index].child.is_none() {
            self.spawn(index)?;
        }
        Ok(())
    }

    /// Whether a server exited by itself (a crash: a failure of the run).
    pub fn exited(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        for node in &mut self.nodes {
            if let Some(child) = &mut node.child {
                if let Ok(Some(status)) = child.try_wait() {
                    exited.push(format!("{} exited by itself: {status}", node.id));
                    node.child = None;
                }
            }
        }
        exited
    }

    pub fn log_path(&self, index: usize) -> PathBuf {
        self.nodes[index].data_dir.with_extension("log")
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill(index);
        }
    }
}
