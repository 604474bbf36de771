//! The clients: unique-key writers (each key written once at `w=quorum`, some then deleted
//! with the write's context), quorum readers, and read-modify-write clients on a small set
//! of keys. Every operation goes to a node drawn from a seeded RNG and is recorded with its
//! invoke and complete times and its outcome.

use crate::checker::{Action, Op, Outcome};
use mendkv_client::{Client, ClientError, ReadResult};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a timed put gives back: the timeout's verdict around the client's answer.
type PutResult = Result<Result<Option<String>, ClientError>, tokio::time::error::Elapsed>;

pub const BUCKET: &str = "chaos";
/// Bounds the keys (and so the final snapshot's requests) of one writer in one run.
const MAX_KEYS_PER_WRITER: u64 = 1_500;
/// Pause between one client's operations: it bounds the load on a small machine so the
/// faults, not CPU starvation, decide the outcomes.
const PACE: Duration = Duration::from_millis(15);

/// The client side of a run, shared by every client task.
pub struct Workload {
    pub started: Instant,
    /// One client per node slot, joiners' slots included (index `i` is `n{i+1}`).
    pub clients: Vec<Client>,
    /// Bit `i` set: node `i` takes client requests (started, not yet departed). Joins set
    /// it when the node starts; a decommission clears it just before the node is stopped.
    pub serving: AtomicU64,
    /// Per-operation deadline; an operation past it is `Unknown`.
    pub op_timeout: Duration,
    pub stop: AtomicBool,
    pub history: Mutex<Vec<Op>>,
    /// Unique keys whose write was invoked, for the readers.
    pub written_keys: Mutex<Vec<String>>,
    pub rmw_keys: Vec<String>,
    /// `quorum` unless the run checks the checker (`one` must produce violations).
    pub read_level: &'static str,
    pub write_level: &'static str,
}

/// Jepsen's classification of an HTTP outcome.
pub fn classify<T>(
    result: &Result<Result<T, ClientError>, tokio::time::error::Elapsed>,
) -> Outcome {
    match result {
        Ok(Ok(_)) => Outcome::Ok,
        // A 4xx is a refusal of the request itself: nothing was written.
        Ok(Err(ClientError::Api { status, .. })) if (400..500).contains(status) => Outcome::Failed,
        // 503/504/507, broken connections and timeouts: it may have been applied somewhere.
        _ => Outcome::Unknown,
    }
}

/// The live values of a read (empty when not found).
pub fn values_of(read: &ReadResult) -> Vec<String> {
    match read {
        ReadResult::Value { value, .. } => vec![String::from_utf8_lossy(value).into_owned()],
        ReadResult::Siblings { siblings, .. } => siblings
            .iter()
            .map(|s| String::from_utf8_lossy(&s.value).into_owned())
            .collect(),
        ReadResult::NotFound { .. } => Vec::new(),
    }
}

impl Workload {
    pub fn micros(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || crate::interrupted()
    }

    fn record(&self, client: u32, node: usize, action: Action, invoke_us: u64, outcome: Outcome) {
        let op = Op {
            client,
            node,
            action,
            invoke_us,
            complete_us: self.micros(),
            outcome,
        };
        self.history.lock().expect("history lock").push(op);
    }

    /// A bit mask with the first `count` nodes serving.
    pub fn first_serving(count: usize) -> AtomicU64 {
        AtomicU64::new((1u64 << count) - 1)
    }

    pub fn set_serving(&self, index: usize, serving: bool) {
        if serving {
            self.serving.fetch_or(1 << index, Ordering::Relaxed);
        } else {
            self.serving.fetch_and(!(1 << index), Ordering::Relaxed);
        }
    }

    /// The node (index) an operation goes to: one of those serving, drawn from `rng`.
    fn node(&self, rng: &mut ChaCha8Rng) -> usize {
        let mask = self.serving.load(Ordering::Relaxed);
        let serving: Vec<usize> = (0..self.clients.len())
            .filter(|i| mask & (1 << i) != 0)
            .collect();
        serving[rng.gen_range(0..serving.len())]
    }

    async fn read(&self, client: u32, key: &str, node: usize) -> Option<ReadResult> {
        let invoke_us = self.micros();
        let result = tokio::time::timeout(
            self.op_timeout,
            self.clients[node].get(BUCKET, key.as_bytes(), Some(self.read_level)),
        )
        .await;
        let outcome = classify(&result);
        let read = result.ok().and_then(Result::ok);
        self.record(
            client,
            node,
            Action::Read {
                key: key.to_string(),
                observed: read.as_ref().map(values_of),
            },
            invoke_us,
            outcome,
        );
        read
    }

    /// A put at the write level within the operation timeout, and when it was invoked.
    async fn put(
        &self,
        node: &Client,
        key: &str,
        value: &str,
        context: Option<&str>,
    ) -> (u64, PutResult) {
        let invoke_us = self.micros();
        let result = tokio::time::timeout(
            self.op_timeout,
            node.put(
                BUCKET,
                key.as_bytes(),
                value.as_bytes().to_vec(),
                None,
                Some(self.write_level),
                context,
            ),
        )
        .await;
        (invoke_us, result)
    }

    /// Writes fresh keys once each; a fifth of the acknowledged ones are then deleted.
    pub async fn unique_writer(self: Arc<Self>, client: u32, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut sequence = 0;
        while !self.stopped() && sequence < MAX_KEYS_PER_WRITER {
            let key = format!("u{client}-{sequence}");
            let value = format!("{key}:v");
            sequence += 1;
            self.written_keys
                .lock()
                .expect("keys lock")
                .push(key.clone());
            let node = self.node(&mut rng);
            let (invoke_us, result) = self.put(&self.clients[node], &key, &value, None).await;
            let outcome = classify(&result);
            self.record(
                client,
                node,
                Action::Write {
                    key: key.clone(),
                    value,
                },
                invoke_us,
                outcome,
            );
            if let Ok(Ok(context)) = result {
                if rng.gen_bool(0.2) {
                    self.delete(client, &key, context.as_deref(), &mut rng)
                        .await;
                }
            }
            tokio::time::sleep(PACE).await;
        }
    }

    async fn delete(&self, client: u32, key: &str, context: Option<&str>, rng: &mut ChaCha8Rng) {
        let node = self.node(rng);
        let invoke_us = self.micros();
        let result = tokio::time::timeout(
            self.op_timeout,
            self.clients[node].delete(BUCKET, key.as_bytes(), Some(self.write_level), context),
        )
        .await;
        let outcome = classify(&result);
        self.record(
            client,
            node,
            Action::Delete {
                key: key.to_string(),
            },
            invoke_us,
            outcome,
        );
    }

    /// Reads written keys (recent ones half of the time) and the read-modify-write keys.
    pub async fn quorum_reader(self: Arc<Self>, client: u32, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        while !self.stopped() {
            let key = if rng.gen_bool(0.25) {
                self.rmw_keys.choose(&mut rng).cloned()
            } else {
                let keys = self.written_keys.lock().expect("keys lock");
                let recent = keys.len().saturating_sub(50);
                let from = if rng.gen_bool(0.5) { recent } else { 0 };
                (from < keys.len()).then(|| keys[rng.gen_range(from..keys.len())].clone())
            };
            if let Some(key) = key {
                let node = self.node(&mut rng);
                self.read(client, &key, node).await;
            }
            tokio::time::sleep(PACE).await;
        }
    }

    /// Reads a key at quorum and writes a fresh value with the read's context, which
    /// supersedes exactly the values that read returned.
    pub async fn read_modify_writer(self: Arc<Self>, client: u32, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut sequence = 0u64;
        while !self.stopped() {
            let Some(key) = self.rmw_keys.choose(&mut rng).cloned() else {
                return;
            };
            let node = self.node(&mut rng);
            if let Some(read) = self.read(client, &key, node).await {
                let observed = values_of(&read);
                let value = format!("{key}:c{client}-{sequence}");
                sequence += 1;
                let node = self.node(&mut rng);
                let (invoke_us, result) = self
                    .put(&self.clients[node], &key, &value, read.context())
                    .await;
                let outcome = classify(&result);
                self.record(
                    client,
                    node,
                    Action::RmwWrite {
                        key,
                        value,
                        observed,
                    },
                    invoke_us,
                    outcome,
                );
            }
            tokio::time::sleep(PACE).await;
        }
    }
}
