//! Read repair: the coordinator compares what replicas answered, answers with the causal
//! merge, and writes the merge back to every replica that was behind.
//!
//! With digest reads one replica sends its full object and the others only a digest (a hash
//! of the causal metadata and value hashes, [`Object::digest`]). A digest equal to the digest
//! of a full object we hold proves that replica holds the same object, so it is *resolved*
//! without moving its value. A digest equal to no full object is *unresolved*: the coordinator
//! fetches that replica's full object before answering. Versions are merged causally, never by
//! timestamp: dominated versions disappear, concurrent ones stay as siblings, tombstones win
//! over what they saw like any other write.
//!
//! [`resolve`] is the whole decision, a pure function tested with a table of cases below.

use crate::version::Object;
use crate::NodeId;

/// What the coordinator knows of one replica's copy (borrowed: deciding copies nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaCopy<'a> {
    /// The full object (an absent key is the empty object).
    Full(&'a Object),
    /// Only the digest of the replica's object.
    Digest(u64),
}

/// The decision for a set of replica copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The causal merge of every full copy: the answer.
    pub merged: Object,
    /// Replicas whose copy is known (full, or digest equal to a full copy).
    pub resolved: Vec<NodeId>,
    /// Replicas known only by a digest that matches no full copy: fetch them in full.
    pub unresolved: Vec<NodeId>,
    /// Resolved replicas whose copy differs from `merged`: write `merged` to them.
    pub stale: Vec<NodeId>,
}

impl Resolution {
    /// True when the replicas disagreed (some copy differs from the answer, or is unknown).
    pub fn found_inconsistency(&self) -> bool {
        !self.stale.is_empty() || !self.unresolved.is_empty()
    }
}

/// The digest of a missing object, so "absent" compares like any other copy.
pub fn absent_digest() -> u64 {
    Object::empty().digest()
}

/// Merges the full copies and says, for every replica, whether it is resolved and stale.
pub fn resolve<'a>(copies: impl IntoIterator<Item = (&'a NodeId, ReplicaCopy<'a>)>) -> Resolution {
    let mut merged = Object::empty();
    // (replica, digest of its copy, whether the copy is full): one digest per copy.
    let mut known: Vec<(&NodeId, u64, bool)> = Vec::new();
    for (node, copy) in copies {
        match copy {
            ReplicaCopy::Full(object) => {
                merged = merged.merge(object);
                known.push((node, object.digest(), true));
            }
            ReplicaCopy::Digest(digest) => known.push((node, digest, false)),
        }
    }
    let full_digests: Vec<u64> = known.iter().filter(|k| k.2).map(|k| k.1).collect();
    let merged_digest = merged.digest();
    let mut resolution = Resolution {
        merged,
        resolved: Vec::new(),
        unresolved: Vec::new(),
        stale: Vec::new(),
    };
    for (node, digest, full) in known {
        if !full && !full_digests.contains(&digest) {
            resolution.unresolved.push(node.clone());
            continue;
        }
        resolution.resolved.push(node.clone());
        if digest != merged_digest {
            resolution.stale.push(node.clone());
        }
    }
    resolution
}

#[cfg(test)]
mod tests;
