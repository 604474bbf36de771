//! The disk model: group-commit syncs in virtual time (one at a time per node, 0-5 ms,
//! sometimes up to 40 ms), injected fsync failures, and the durability audit that checks
//! every answer claiming durability against what the node's storage had synced.

use crate::checker;
use crate::event_loop::{Event, Simulation, MAX_AWAITING_DURABLE_ANSWERS};
use crate::run::node_config;
use mendkv_core::config::FsyncPolicy;
use mendkv_core::message::{DurableAnswerKey, Message};
use mendkv_core::node::SyncTicket;
use mendkv_core::storage::{Storage, StorageError};
use mendkv_core::NodeId;
use rand::Rng;

impl Simulation {
    /// Group commit, as the server runs it: when node `i` needs a sync and none is under way,
    /// one starts now and finishes after a random latency.
    pub(crate) fn start_sync_if_needed(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if !slot.syncing {
            if let Some(ticket) = slot.node.as_mut().and_then(|n| n.begin_sync()) {
                slot.syncing = true;
                let incarnation = slot.incarnation;
                let latency = if self.rng_disk.gen_bool(0.05) {
                    self.rng_disk.gen_range(5..=40)
                } else {
                    self.rng_disk.gen_range(0..=5)
                };
                let pending = slot.storage.pending_writes();
                self.trace_line(&format!("n{i}"), |_| {
                    format!("fsync start ({pending} writes, {latency}ms)")
                });
                self.schedule(
                    self.now + latency,
                    Event::SyncDone {
                        node: i,
                        incarnation,
                        ticket,
                    },
                );
            }
        }
    }

    /// A sync finished in virtual time: it succeeds (the storage makes its pending writes
    /// durable) unless the `fsync` fault or a scripted failure makes it fail, and the node
    /// learns the result.
    pub(crate) fn sync_done(&mut self, node: usize, incarnation: u64, ticket: SyncTicket) {
        let slot = &mut self.slots[node];
        if slot.incarnation != incarnation || !slot.alive() {
            return;
        }
        slot.syncing = false;
        let fail = self.fail_next_fsync.remove(&node)
            || (self.fsync_failure > 0.0 && self.rng_disk.gen_bool(self.fsync_failure));
        let result = if fail {
            Err(StorageError::Engine("injected fsync failure".into()))
        } else {
            slot.storage.sync()
        };
        if let Some(n) = slot.node.as_mut() {
            n.finish_sync(ticket, result);
        }
        self.trace_line(&format!("n{node}"), |_| {
            if fail {
                "fsync FAILED (injected)"
            } else {
                "fsync done"
            }
            .into()
        });
        self.flush(node);
    }

    /// Node `at` handled a write request from `from`: its successful answer must wait for
    /// every write made so far.
    pub(crate) fn expect_durable_answer(&mut self, at: usize, from: usize, key: DurableAnswerKey) {
        let slot = &self.slots[at];
        if node_config(&slot.id, self.config.seed, slot.incarnation).fsync != FsyncPolicy::Always {
            return;
        }
        if self.awaiting_durable_answer.len() >= MAX_AWAITING_DURABLE_ANSWERS {
            self.awaiting_durable_answer.pop_first();
        }
        // A duplicated request keeps its first record: its first answer is checked.
        self.awaiting_durable_answer
            .entry((at, slot.incarnation, from, key))
            .or_insert_with(|| slot.storage.writes_made());
    }

    /// The durability audit (issue: a failed fsync once released hint, repair and
    /// anti-entropy acknowledgements as successes): an answer that claims durability must
    /// find every write made before its request handled synced.
    pub(crate) fn audit_durable_answer(&mut self, from: usize, to: &NodeId, message: &Message) {
        let Some((key, claims_durable)) = message.durable_answer() else {
            return;
        };
        let Some(&j) = self.index.get(to) else {
            return;
        };
        let slot = &self.slots[from];
        let Some(writes) = self
            .awaiting_durable_answer
            .remove(&(from, slot.incarnation, j, key))
        else {
            return;
        };
        let synced = slot.storage.writes_synced();
        if claims_durable && synced < writes {
            let detail = format!(
                "n{from} acknowledged {key:?} to n{j} at {} ms with {} of its writes unsynced",
                self.now,
                writes - synced
            );
            self.unsynced_acknowledgements.push(checker::Violation {
                key: format!("n{from}"),
                detail,
                value: None,
            });
        }
    }
}
