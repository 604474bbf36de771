//! Causal versioning: dotted version vectors, siblings, tombstones and the opaque context.
//!
//! An [`Object`] is what a replica stores for one key: a *causal context* (a version
//! vector that summarises every write the object has seen, including the ones it has
//! since superseded) and a set of *siblings*, each tagged with the unique *dot*
//! `(actor, counter)` of the write that created it. This is the "dotted version vector
//! set" of Riak 2.x: a dot is kept apart from the context, so concurrent writes through
//! the same actor never hide each other.
//!
//! Two rules make the algebra work:
//! - A dot names exactly one write. Actors are `(node, epoch)` pairs and the epoch grows
//!   on every start, so a node that lost un-synced writes in a crash never reuses a dot.
//! - Only a replica that holds the key coordinates a write (the "actor"), so the dot it
//!   creates, `local.context[actor] + 1`, keeps every context downward closed.
//!
//! [`Object::merge`] is the join of a semilattice (commutative, associative, idempotent):
//! the property tests in `tests` prove it.
//!
//! # Last-write-wins objects
//! An object of an `lww` bucket ([`crate::bucket`]) has the same shape, so its encoding (and
//! everything stored before LWW existed) is unchanged: exactly one sibling whose dot has the
//! reserved epoch [`LWW_EPOCH`], the node of the coordinating actor and, as counter, the
//! write's packed HLC timestamp; its context is that one dot. [`Object::merge`] dispatches:
//! when either side is LWW, the result is the LWW sibling greatest by (timestamp, node,
//! value) over both sides, alone. That is a maximum under a total order, so it is a
//! semilattice join too, and the combined order (every causal object below every LWW one)
//! keeps merge associative across the two kinds. No epoch of a real node reaches
//! `LWW_EPOCH` (`u32::MAX` starts), so no causal dot is ever mistaken for an LWW one.

mod context;

pub use context::{
    CausalContext, ContextError, ContextKey, MAX_CONTEXT_ACTORS, MAX_CONTEXT_ENCODED_BYTES,
    MAX_COUNTER,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// The epoch that marks an LWW dot (see the module doc); never a real node's epoch.
pub const LWW_EPOCH: u32 = u32::MAX;

/// Who created a write: a node (by the 64-bit hash of its id) in one of its epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Actor {
    pub node_hash: u64,
    pub epoch: u32,
}

impl Actor {
    pub fn new(node_id: &str, epoch: u32) -> Self {
        Actor {
            node_hash: xxhash_rust::xxh3::xxh3_64(node_id.as_bytes()),
            epoch,
        }
    }
}

/// The unique name of one write: the actor that coordinated it and its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// A version vector: for each actor, the highest counter seen (all lower ones included).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector {
    entries: BTreeMap<Actor, u64>,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, actor: &Actor) -> u64 {
        self.entries.get(actor).copied().unwrap_or(0)
    }

    pub fn covers(&self, dot: &Dot) -> bool {
        self.get(&dot.actor) >= dot.counter
    }

    /// Records a dot; the vector only ever grows.
    pub fn add(&mut self, dot: &Dot) {
        let entry = self.entries.entry(dot.actor).or_insert(0);
        *entry = (*entry).max(dot.counter);
    }

    /// Pointwise maximum.
    pub fn join(&mut self, other: &VersionVector) {
        for (actor, counter) in &other.entries {
            let entry = self.entries.entry(*actor).or_insert(0);
            *entry = (*entry).max(*counter);
        }
    }

    /// `Some(Less)` when self happened before other, `None` when they are concurrent.
    pub fn partial_cmp_causal(&self, other: &VersionVector) -> Option<Ordering> {
        let self_le = self.entries.iter().all(|(a, c)| other.get(a) >= *c);
        let other_le = other.entries.iter().all(|(a, c)| self.get(a) >= *c);
        match (self_le, other_le) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Less),
            (false, true) => Some(Ordering::Greater),
            (false, false) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Actor, &u64)> {
        self.entries.iter()
    }
}

impl FromIterator<(Actor, u64)> for VersionVector {
    fn from_iter<T: IntoIterator<Item = (Actor, u64)>>(iter: T) -> Self {
        let mut vv = VersionVector::new();
        for (actor, counter) in iter {
            if counter > 0 {
                vv.add(&Dot { actor, counter });
            }
        }
        vv
    }
}

/// What a write stored: bytes with their content type, or a deletion marker. Ordered only
/// to break exact LWW ties deterministically (same timestamp and node, after a restart).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Value {
    Data { bytes: Bytes, content_type: String },
    Tombstone,
}

impl Value {
    pub fn is_tombstone(&self) -> bool {
        matches!(self, Value::Tombstone)
    }

    /// Bytes this value occupies, for size limits and metrics.
    pub fn size_bytes(&self) -> usize {
        match self {
            Value::Data {
                bytes,
                content_type,
            } => bytes.len() + content_type.len(),
            Value::Tombstone => 0,
        }
    }
}

/// One concurrent version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sibling {
    pub dot: Dot,
    pub value: Value,
}

/// Everything a replica stores for one key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Object {
    /// Every write this object has seen, live or superseded.
    context: VersionVector,
    /// Mutually concurrent versions, sorted by dot; each dot is covered by `context`.
    siblings: Vec<Sibling>,
}

impl Object {
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn context(&self) -> &VersionVector {
        &self.context
    }

    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    pub fn is_empty(&self) -> bool {
        self.siblings.is_empty()
    }

    /// Siblings that hold data (tombstones left out), as a client sees them.
    pub fn live_values(&self) -> impl Iterator<Item = &Sibling> {
        self.siblings.iter().filter(|s| !s.value.is_tombstone())
    }

    /// True when nothing but tombstones remain: the key reads as absent.
    pub fn is_deleted(&self) -> bool {
        self.siblings.iter().all(|s| s.value.is_tombstone())
    }

    /// The opaque context a client gets with a read.
    pub fn causal_context(&self) -> CausalContext {
        CausalContext::from_vector(self.context.clone())
    }

    /// Applies a write coordinated by `actor` on top of this (local) object.
    ///
    /// The write supersedes exactly the siblings the client's context has seen; others stay
    /// as concurrent siblings. The new dot follows the actor's last counter for this key,
    /// which keeps the context downward closed. Returns the dot of the new sibling.
    pub fn apply_write(
        &mut self,
        actor: Actor,
        client_context: &CausalContext,
        value: Value,
    ) -> Dot {
        self.apply_write_above(actor, client_context, value, 0)
    }

    /// [`Object::apply_write`] with a new dot above `counter_floor` too: for an actor whose
    /// earlier dots for this key may be gone from its object (a reaped tombstone), so that
    /// no dot is issued twice. Skipping counters is harmless: contexts are version vectors,
    /// and every dot of this actor at or below the floor was already superseded.
    pub fn apply_write_above(
        &mut self,
        actor: Actor,
        client_context: &CausalContext,
        value: Value,
        counter_floor: u64,
    ) -> Dot {
        let seen = client_context.vector();
        let counter = self
            .context
            .get(&actor)
            .max(seen.get(&actor))
            .max(counter_floor)
            .saturating_add(1);
        let dot = Dot { actor, counter };
        self.siblings.retain(|s| !seen.covers(&s.dot));
        self.context.join(seen);
        self.context.add(&dot);
        let position = self
            .siblings
            .binary_search_by(|s| s.dot.cmp(&dot))
            .unwrap_or_else(|p| p);
        self.siblings.insert(position, Sibling { dot, value });
        dot
    }

    /// True for an LWW object (its sibling carries an LWW dot).
    pub fn is_lww(&self) -> bool {
        self.lww_winner().is_some()
    }

    /// The HLC timestamp of an LWW object's write.
    pub fn lww_timestamp(&self) -> Option<crate::bucket::hlc::HlcTimestamp> {
        self.lww_winner()
            .map(|s| crate::bucket::hlc::HlcTimestamp::from_packed(s.dot.counter))
    }

    /// The LWW sibling that wins: greatest by (timestamp, node, value), [`lww_order`].
    pub fn lww_winner(&self) -> Option<&Sibling> {
        self.siblings
            .iter()
            .filter(|s| s.dot.actor.epoch == LWW_EPOCH)
            .max_by(|a, b| lww_order(a, b))
    }

    /// An LWW object holding exactly `sibling` (its context is the sibling's dot).
    fn lww_from(sibling: &Sibling) -> Object {
        let mut context = VersionVector::new();
        context.add(&sibling.dot);
        Object {
            context,
            siblings: vec![sibling.clone()],
        }
    }

    /// Applies an LWW write coordinated by `actor` at HLC time `timestamp` (which the caller
    /// took after observing this object's own timestamp, so it wins): the object becomes
    /// that write alone, whatever it held (a client context is not needed: it is ignored).
    /// Returns the write's dot.
    pub fn apply_lww_write(
        &mut self,
        actor: Actor,
        timestamp: crate::bucket::hlc::HlcTimestamp,
        value: Value,
    ) -> Dot {
        let dot = Dot {
            actor: Actor {
                node_hash: actor.node_hash,
                epoch: LWW_EPOCH,
            },
            counter: timestamp.packed(),
        };
        let written = Object::lww_from(&Sibling { dot, value });
        *self = self.merge(&written);
        dot
    }

    /// The join of two replicas' objects. Causal objects: dominated versions disappear,
    /// concurrent ones stay as siblings. When either is LWW: the later write alone.
    pub fn merge(&self, other: &Object) -> Object {
        match (self.lww_winner(), other.lww_winner()) {
            (None, None) => self.merge_causal(other),
            (Some(a), None) => Object::lww_from(a),
            (None, Some(b)) => Object::lww_from(b),
            (Some(a), Some(b)) => match lww_order(a, b) {
                Ordering::Less => Object::lww_from(b),
                _ => Object::lww_from(a),
            },
        }
    }

    fn merge_causal(&self, other: &Object) -> Object {
        let mut siblings = Vec::with_capacity(self.siblings.len() + other.siblings.len());
        let (mut left, mut right) = (
            self.siblings.iter().peekable(),
            other.siblings.iter().peekable(),
        );
        loop {
            match (left.peek(), right.peek()) {
                (Some(l), Some(r)) if l.dot == r.dot => {
                    siblings.push((*l).clone());
                    left.next();
                    right.next();
                }
                (Some(l), Some(r)) if l.dot < r.dot => {
                    if !other.context.covers(&l.dot) {
                        siblings.push((*l).clone());
                    }
                    left.next();
                }
                (Some(_), Some(r)) => {
                    if !self.context.covers(&r.dot) {
                        siblings.push((*r).clone());
                    }
                    right.next();
                }
                (Some(l), None) => {
                    if !other.context.covers(&l.dot) {
                        siblings.push((*l).clone());
                    }
                    left.next();
                }
                (None, Some(r)) => {
                    if !self.context.covers(&r.dot) {
                        siblings.push((*r).clone());
                    }
                    right.next();
                }
                (None, None) => break,
            }
        }
        let mut context = self.context.clone();
        context.join(&other.context);
        Object { context, siblings }
    }

    /// Merges `other` into self; true when self changed.
    pub fn merge_in(&mut self, other: &Object) -> bool {
        let merged = self.merge(other);
        let changed = merged != *self;
        *self = merged;
        changed
    }

    /// Total bytes of values, for size accounting.
    pub fn size_bytes(&self) -> usize {
        self.siblings.iter().map(|s| s.value.size_bytes()).sum()
    }

    /// Builds an object from parts, checking the invariants; for decoding and tests.
    pub fn from_parts(context: VersionVector, mut siblings: Vec<Sibling>) -> Option<Object> {
        siblings.sort_by_key(|s| s.dot);
        siblings.dedup_by(|a, b| a.dot == b.dot);
        let object = Object { context, siblings };
        object.is_well_formed().then_some(object)
    }

    /// The invariants every stored object keeps: each sibling's dot is in the context, and
    /// an LWW object is its one sibling with exactly that dot as context. Objects from
    /// peers are checked with it (a merge would normalise a malformed one anyway).
    pub fn is_well_formed(&self) -> bool {
        if !self.siblings.iter().all(|s| self.context.covers(&s.dot)) {
            return false;
        }
        match self.lww_winner() {
            None => true,
            Some(winner) => *self == Object::lww_from(winner),
        }
    }

    /// A stable 64-bit digest of the causal metadata and value hashes (for digest reads and
    /// Merkle leaves).
    pub fn digest(&self) -> u64 {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for (actor, counter) in self.context.iter() {
            hasher.update(&actor.node_hash.to_le_bytes());
            hasher.update(&actor.epoch.to_le_bytes());
            hasher.update(&counter.to_le_bytes());
        }
        hasher.update(&[0xff]);
        for sibling in &self.siblings {
            hasher.update(&sibling.dot.actor.node_hash.to_le_bytes());
            hasher.update(&sibling.dot.actor.epoch.to_le_bytes());
            hasher.update(&sibling.dot.counter.to_le_bytes());
            match &sibling.value {
                Value::Data {
                    bytes,
                    content_type,
                } => {
                    hasher.update(&[1]);
                    hasher.update(&xxhash_rust::xxh3::xxh3_64(bytes).to_le_bytes());
                    hasher.update(content_type.as_bytes());
                    hasher.update(&[0]);
                }
                Value::Tombstone => hasher.update(&[2]),
            }
        }
        hasher.digest()
    }
}

/// The LWW order: timestamp, then node, then value (only a node that reissued a timestamp
/// after a restart with its clock set back can tie on both). Public so the simulator's
/// checkers judge LWW histories by the very order replicas merge by.
pub fn lww_order(a: &Sibling, b: &Sibling) -> Ordering {
    (a.dot.counter, a.dot.actor.node_hash, &a.value).cmp(&(
        b.dot.counter,
        b.dot.actor.node_hash,
        &b.value,
    ))
}

#[cfg(test)]
mod tests;
