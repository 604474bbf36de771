//! Hinted handoff: a write that cannot reach a replica is kept, durably, on the coordinator
//! as a *hint* for that replica, and replayed when the replica is seen up again.
//!
//! - Records live in the storage's hint partition: key `[target len][target][bucket len]
//!   [bucket][key]`, so all hints for one key and one target are a single record, and a new
//!   hint for them is merged into it causally (*coalescing*: 1,000 missed updates of a key
//!   are delivered as one write).
//! - The [`HintQueue`] is the in-memory index of those records: delivery order (deletes
//!   first, then oldest), counts and bytes per target, budgets. It holds metadata only, so its
//!   memory is bounded by the hint budgets, and it is rebuilt by one scan at start.
//! - A hint is removed only after the target acknowledged it durably; a crash of either side
//!   replays it, which is harmless because writes merge causally.

mod queue;

pub use queue::{HintQueue, QueuedHint};

use crate::version::Object;
use crate::{Millis, NodeId};
use serde::{Deserialize, Serialize};

/// The format byte of hint records (2 added `stands_in`).
const HINT_FORMAT: u8 = 2;
/// Records written before `stands_in` existed: object and created time only.
const HINT_FORMAT_WITHOUT_STAND_IN: u8 = 1;

#[derive(Debug, Clone, PartialEq)]
pub struct HintedHandoffConfig {
    pub enabled: bool,
    /// A hint older than this is dropped (and its range marked for anti-entropy).
    pub ttl_ms: Millis,
    /// Distinct hinted keys kept per target node; beyond it new hints are dropped.
    pub max_hints_per_node: usize,
    /// Bytes of hints (key plus encoded record) kept in total; beyond it new hints are dropped.
    pub max_bytes_total: u64,
    /// Hints replayed per second per node (0 = unlimited).
    pub delivery_rate_per_s: u64,
    /// Hints per delivery message.
    pub batch_size: usize,
}

impl Default for HintedHandoffConfig {
    fn default() -> Self {
        HintedHandoffConfig {
            enabled: true,
            ttl_ms: 10_800_000,
            max_hints_per_node: 100_000,
            max_bytes_total: 256 << 20,
            delivery_rate_per_s: 10_000,
            batch_size: 128,
        }
    }
}

/// Why a hint was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    /// `max_hints_per_node` reached for the target.
    NodeBudget,
    /// `max_bytes_total` reached.
    TotalBudget,
    /// The target is not (or no longer) a member.
    UnknownTarget,
    /// The stored record could not be decoded.
    Corrupt,
    /// Hinted handoff is disabled.
    Disabled,
    /// The target was removed from the cluster (`remove-node`): it will never take them.
    Removed,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NodeBudget => "node_budget",
            DropReason::TotalBudget => "total_budget",
            DropReason::UnknownTarget => "unknown_target",
            DropReason::Corrupt => "corrupt",
            DropReason::Disabled => "disabled",
            DropReason::Removed => "removed",
        }
    }

    pub const ALL: [DropReason; 5] = [
        DropReason::NodeBudget,
        DropReason::TotalBudget,
        DropReason::UnknownTarget,
        DropReason::Corrupt,
        DropReason::Disabled,
    ];
}

/// What is stored for one (target, bucket, key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintRecord {
    pub object: Object,
    /// When the oldest write in this hint was hinted (TTL counts from here).
    pub created_ms: Millis,
    /// Some write in this hint was kept by a sloppy quorum's fallback and counted toward the
    /// write's acknowledgement: the hint may hold the write's only copy (at RF 1 it always
    /// does), so when its target is removed the key's new replicas take it instead of it
    /// being dropped. (It still expires with the TTL, which the tombstone reaper relies on.)
    pub stands_in: bool,
}

/// The record as format 1 stored it.
#[derive(Deserialize)]
struct HintRecordWithoutStandIn {
    object: Object,
    created_ms: Millis,
}

impl HintRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![HINT_FORMAT];
        // Serialising plain data into a Vec cannot fail.
        bytes.extend(postcard::to_stdvec(self).unwrap_or_default());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Option<HintRecord> {
        match bytes.split_first() {
            Some((&HINT_FORMAT, body)) => postcard::from_bytes(body).ok(),
            // An older record cannot say whether a sloppy quorum counted it, so it is kept as
            // if it might be the only copy.
            Some((&HINT_FORMAT_WITHOUT_STAND_IN, body)) => {
                postcard::from_bytes::<HintRecordWithoutStandIn>(body)
                    .ok()
                    .map(|old| HintRecord {
                        object: old.object,
                        created_ms: old.created_ms,
                        stands_in: true,
                    })
            }
            _ => None,
        }
    }
}

fn push_short(out: &mut Vec<u8>, text: &[u8]) {
    out.push(text.len().min(255) as u8);
    out.extend_from_slice(&text[..text.len().min(255)]);
}

/// The storage key of the hint for (target, bucket, key).
pub fn hint_key(target: &NodeId, bucket: &str, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + target.as_str().len() + bucket.len() + key.len());
    push_short(&mut out, target.as_str().as_bytes());
    push_short(&mut out, bucket.as_bytes());
    out.extend_from_slice(key);
    out
}

/// Parses a hint key; `None` for a corrupt one.
pub fn parse_hint_key(bytes: &[u8]) -> Option<(NodeId, String, Vec<u8>)> {
    let (&target_len, rest) = bytes.split_first()?;
    let (target, rest) = rest.split_at_checked(target_len as usize)?;
    let (&bucket_len, rest) = rest.split_first()?;
    let (bucket, key) = rest.split_at_checked(bucket_len as usize)?;
    let target = std::str::from_utf8(target).ok()?;
    let bucket = std::str::from_utf8(bucket).ok()?;
    Some((NodeId::new(target), bucket.to_string(), key.to_vec()))
}

#[cfg(test)]
mod tests;
