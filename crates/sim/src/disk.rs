//! The disk model: syncs in virtual time (one at a time per node, 0-5 ms, sometimes up to
//! 40 ms) started by group commit (`fsync = always`) or by a timer (`fsync = periodic`),
//! injected fsync failures, the durability audit that checks every answer claiming
//! durability against what the node's storage had synced, and the ledger of values a crash
//! took from a node's unsynced writes (what periodic fsync does not promise to keep).

use crate::checker;
use crate::event_loop::{Event, Simulation, MAX_AWAITING_DURABLE_ANSWERS};
use crate::workload;
use mendkv_core::config::FsyncPolicy;
use mendkv_core::hinted_handoff::HintRecord;
use mendkv_core::message::{DurableAnswerKey, Message};
use mendkv_core::node::SyncTicket;
use mendkv_core::storage::{MemoryStorage, ObjectKey, Storage, StorageError};
use mendkv_core::version::Object;
use mendkv_core::NodeId;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};

impl Simulation {
    /// Group commit, as the server runs it: under `fsync = always`, when node `i` needs a
    /// sync and none is under way, one starts now. Under `periodic` only the timer starts
    /// syncs ([`Simulation::periodic_sync`]), as in the server.
    pub(crate) fn start_sync_if_needed(&mut self, i: usize) {
        if self.config.options.fsync == FsyncPolicy::Always {
            self.start_sync(i);
        }
    }

    /// Starts a sync of node `i` unless one is under way; it finishes after a random latency.
    fn start_sync(&mut self, i: usize) {
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

    /// Arms node `i`'s periodic fsync timer (after a start or restart) under `periodic`.
    pub(crate) fn schedule_periodic_sync(&mut self, i: usize) {
        if let FsyncPolicy::Periodic { interval_ms } = self.config.options.fsync {
            let incarnation = self.slots[i].incarnation;
            self.schedule(
                self.now + interval_ms,
                Event::PeriodicSync {
                    node: i,
                    incarnation,
                },
            );
        }
    }

    /// The periodic fsync timer of node `i` fired: sync what is unsynced, rearm.
    pub(crate) fn periodic_sync(&mut self, i: usize, incarnation: u64) {
        let slot = &self.slots[i];
        if slot.incarnation != incarnation || !slot.alive() {
            return;
        }
        self.start_sync(i);
        self.schedule_periodic_sync(i);
    }

    /// Node `at` handled a write request from `from`: its successful answer must wait for
    /// every write made so far.
    pub(crate) fn expect_durable_answer(&mut self, at: usize, from: usize, key: DurableAnswerKey) {
        // Only `fsync = always` promises durability before the answer; the policy is the
        // run's, the same for every node and life.
        if self.config.options.fsync != FsyncPolicy::Always {
            return;
        }
        let slot = &self.slots[at];
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

    /// Under `fsync = periodic` a crash may take acknowledged writes with it. Called with
    /// the values node `i` held or was writing just before its crash
    /// ([`values_a_crash_may_take`]) and its objects then: records the values the crash took from it,
    /// and those it took from the last node holding them (see [`checker::WeakerPromises`]).
    pub(crate) fn record_crash_losses(
        &mut self,
        i: usize,
        before: BTreeSet<String>,
        objects_before: Vec<(ObjectKey, Object)>,
    ) {
        let after = values_held(&self.slots[i].storage);
        let now = self.now;
        let objects_after: BTreeMap<ObjectKey, Object> =
            self.slots[i].storage.objects().into_iter().collect();
        let mut keys_before = BTreeSet::new();
        for (key, object) in objects_before {
            if objects_after.get(&key) != Some(&object) {
                self.weaker_promises
                    .rolled_back
                    .entry(String::from_utf8_lossy(&key.key).into_owned())
                    .or_default()
                    .push(now);
            }
            keys_before.insert(key);
        }
        // A dropped removal (a reaped tombstone) brings a key back: a rollback too.
        for key in objects_after.keys().filter(|k| !keys_before.contains(*k)) {
            self.weaker_promises
                .rolled_back
                .entry(String::from_utf8_lossy(&key.key).into_owned())
                .or_default()
                .push(now);
        }
        for value in before.difference(&after) {
            self.weaker_promises
                .dropped_by_crash
                .entry(value.clone())
                .or_insert(now);
            let elsewhere = self
                .slots
                .iter()
                .enumerate()
                .any(|(j, s)| j != i && values_held(&s.storage).contains(value));
            if !elsewhere {
                self.weaker_promises.gone_by_crash.insert(value.clone());
            }
        }
    }
}

/// Every client value a storage holds, as a sibling of an object or of a hint (pending
/// writes included).
pub(crate) fn values_held(storage: &MemoryStorage) -> BTreeSet<String> {
    let objects: Vec<Object> = storage.objects().into_iter().map(|(_, o)| o).collect();
    let hints: Vec<Vec<u8>> = storage
        .scan_hints()
        .unwrap_or_default()
        .into_iter()
        .map(|(_, record)| record)
        .collect();
    values_in(&objects, &hints)
}

/// What a crash that keeps the first `keep` unsynced writes may take from `storage`: every
/// value it holds now, and every value its dropped writes carried, also those a later
/// unsynced write had already replaced (an LWW put overwritten before the sync: once the
/// crash drops both, the older synced version is back and the replaced value is gone too).
pub(crate) fn values_a_crash_may_take(storage: &MemoryStorage, keep: usize) -> BTreeSet<String> {
    let (objects, hints) = storage.unsynced_writes_from(keep);
    let mut values = values_in(&objects, &hints);
    values.extend(values_held(storage));
    values
}

/// The client values of these objects and encoded hint records (siblings, tombstones aside).
fn values_in(objects: &[Object], hints: &[Vec<u8>]) -> BTreeSet<String> {
    let mut values = BTreeSet::new();
    let mut add = |object: &Object| {
        for sibling in object.siblings() {
            if let Some(v) = workload::value_text(&sibling.value) {
                values.insert(v);
            }
        }
    };
    for object in objects {
        add(object);
    }
    for record in hints {
        if let Some(hint) = HintRecord::decode(record) {
            add(&hint.object);
        }
    }
    values
}
