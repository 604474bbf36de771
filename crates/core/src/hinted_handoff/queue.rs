//! The in-memory index of stored hints: delivery order, per-target counts, byte budgets.

use super::{DropReason, HintedHandoffConfig};
use crate::{Millis, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// Delivery order within a target: deletes first, then oldest.
type OrderKey = (u8, Millis, String, Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    order: OrderKey,
    bytes: u64,
    /// Grows when a new hint is coalesced into this one; a delivery only removes the hint
    /// if nothing was coalesced into it meanwhile.
    version: u64,
}

#[derive(Debug, Default)]
struct TargetHints {
    order: BTreeSet<OrderKey>,
    entries: BTreeMap<(String, Vec<u8>), Entry>,
}

/// One hint as the queue knows it (the value stays in storage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedHint {
    pub bucket: String,
    pub key: Vec<u8>,
    pub created_ms: Millis,
    pub version: u64,
}

#[derive(Debug, Default)]
pub struct HintQueue {
    targets: BTreeMap<NodeId, TargetHints>,
    total_bytes: u64,
    total_hints: usize,
    next_version: u64,
}

impl HintQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether storing a hint of `bytes` (replacing `previous_bytes` when it coalesces into an
    /// existing one) stays within the budgets.
    pub fn check_budget(
        &self,
        config: &HintedHandoffConfig,
        target: &NodeId,
        bucket: &str,
        key: &[u8],
        bytes: u64,
    ) -> Result<(), DropReason> {
        let existing = self
            .targets
            .get(target)
            .and_then(|t| t.entries.get(&(bucket.to_string(), key.to_vec())));
        let previous_bytes = existing.map(|e| e.bytes).unwrap_or(0);
        if existing.is_none() && self.pending_for(target) >= config.max_hints_per_node {
            return Err(DropReason::NodeBudget);
        }
        if self.total_bytes - previous_bytes + bytes > config.max_bytes_total {
            return Err(DropReason::TotalBudget);
        }
        Ok(())
    }

    /// Records a stored hint (new, or coalesced into an existing one).
    pub fn upsert(
        &mut self,
        target: &NodeId,
        bucket: &str,
        key: &[u8],
        created_ms: Millis,
        bytes: u64,
        is_delete: bool,
    ) {
        self.next_version += 1;
        let hints = self.targets.entry(target.clone()).or_default();
        let id = (bucket.to_string(), key.to_vec());
        let order = (
            u8::from(!is_delete),
            created_ms,
            bucket.to_string(),
            key.to_vec(),
        );
        if let Some(old) = hints.entries.remove(&id) {
            hints.order.remove(&old.order);
            self.total_bytes -= old.bytes;
            self.total_hints -= 1;
        }
        hints.order.insert(order.clone());
        hints.entries.insert(
            id,
            Entry {
                order,
                bytes,
                version: self.next_version,
            },
        );
        self.total_bytes += bytes;
        self.total_hints += 1;
    }

    /// Removes a hint; with `only_version`, only if nothing was coalesced into it since.
    pub fn remove(
        &mut self,
        target: &NodeId,
        bucket: &str,
        key: &[u8],
        only_version: Option<u64>,
    ) -> bool {
        let Some(hints) = self.targets.get_mut(target) else {
            return false;
        };
        let id = (bucket.to_string(), key.to_vec());
        match hints.entries.get(&id) {
            Some(entry) if only_version.is_none_or(|v| v == entry.version) => {
                let entry = hints.entries.remove(&id).expect("just found");
                hints.order.remove(&entry.order);
                self.total_bytes -= entry.bytes;
                self.total_hints -= 1;
                if hints.entries.is_empty() {
                    self.targets.remove(target);
                }
                true
            }
            _ => false,
        }
    }

    /// The next hints to deliver to `target`, in delivery order.
    pub fn next_batch(&self, target: &NodeId, max: usize) -> Vec<QueuedHint> {
        let Some(hints) = self.targets.get(target) else {
            return vec![];
        };
        hints
            .order
            .iter()
            .take(max)
            .filter_map(|(_, created_ms, bucket, key)| {
                let entry = hints.entries.get(&(bucket.clone(), key.clone()))?;
                Some(QueuedHint {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    created_ms: *created_ms,
                    version: entry.version,
                })
            })
            .collect()
    }

    /// The created time of an existing hint (coalescing keeps the oldest).
    pub fn created_ms(&self, target: &NodeId, bucket: &str, key: &[u8]) -> Option<Millis> {
        let entry = self
            .targets
            .get(target)?
            .entries
            .get(&(bucket.to_string(), key.to_vec()))?;
        Some(entry.order.1)
    }

    pub fn pending_for(&self, target: &NodeId) -> usize {
        self.targets
            .get(target)
            .map(|t| t.entries.len())
            .unwrap_or(0)
    }

    /// The created time of the oldest hint kept for `target` (its age on a dashboard).
    /// Delivery order puts deletes first, then oldest, so the oldest is the first of either
    /// group.
    pub fn oldest_created_ms(&self, target: &NodeId) -> Option<Millis> {
        let order = &self.targets.get(target)?.order;
        let first_of = |group: u8| {
            order
                .range((group, 0, String::new(), Vec::new())..)
                .next()
                .filter(|o| o.0 == group)
                .map(|o| o.1)
        };
        match (first_of(0), first_of(1)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn targets(&self) -> impl Iterator<Item = &NodeId> {
        self.targets.keys()
    }

    pub fn total_hints(&self) -> usize {
        self.total_hints
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}
