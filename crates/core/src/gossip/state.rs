//! What a node says about itself: its *endpoint state*, a small versioned map.
//!
//! Every change a node makes to its own state (a heartbeat, a new status, a new load figure)
//! takes the next number of the node's version counter, so the entries of one node's state
//! are totally ordered by version and "the highest version I hold of node X" summarises
//! everything I know about X. Those per-node maxima, with the node's generation, are the
//! version vector that gossip compares.

/// The most application keys one node's state may have.
pub const MAX_APP_KEYS: usize = 64;
use crate::Millis;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A node's incarnation: it grows on every start (the node's epoch), so a restarted node's
/// fresh state replaces the old one everywhere.
pub type Generation = u64;

/// A number of a node's version counter (per generation; starts at 1).
pub type Version = u64;

/// Where a node stands in the cluster's life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Started, not yet serving its share of the ring.
    Joining,
    /// A full member.
    Normal,
    /// Handing its data over before it goes.
    Leaving,
    /// Gone for good; peers forget it after `left_forget_after_ms`.
    Left,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Joining => "joining",
            NodeStatus::Normal => "normal",
            NodeStatus::Leaving => "leaving",
            NodeStatus::Left => "left",
        }
    }
}

/// The keys of the application state. Postcard is not self-describing, so a key a later
/// release adds must travel as an [`AppKey::Extension`] to stay readable by older nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AppKey {
    /// [`AppValue::Status`].
    Status,
    /// [`AppValue::Text`]: the internal protocol address.
    PeerAddress,
    /// [`AppValue::Text`]: the client HTTP address.
    HttpAddress,
    /// [`AppValue::Count`]: how many tokens the node owns; the tokens derive from id and count.
    Vnodes,
    /// [`AppValue::Count`]: hints this node holds for others.
    HintsPending,
    /// [`AppValue::Count`]: bytes of data stored.
    DataBytes,
    /// [`AppValue::Roots`]: anti-entropy summaries (Merkle tree root per token range).
    TreeRoots,
    /// Room for keys added later.
    Extension(u16),
}

/// A value of the application state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppValue {
    Status(NodeStatus),
    Text(String),
    Count(u64),
    /// `(token range end, tree root hash)` pairs.
    Roots(Vec<(u64, u64)>),
    Bytes(Vec<u8>),
}

/// A value with the version its owner gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionedValue {
    pub value: AppValue,
    pub version: Version,
}

/// An entry as held locally: the value, and when this node learned it (flow control sends
/// the updates that waited longest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeldValue {
    pub(crate) versioned: VersionedValue,
    pub(crate) learned_at: Millis,
}

/// Everything known about one node, as its owner published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointState {
    generation: Generation,
    /// The version of the node's latest heartbeat (heartbeats take versions like any change).
    heartbeat: Version,
    heartbeat_learned_at: Millis,
    application: BTreeMap<AppKey, HeldValue>,
    /// The highest version of the application entries (heartbeats excluded).
    application_max_version: Version,
    max_version: Version,
}

impl EndpointState {
    pub(crate) fn new(generation: Generation) -> Self {
        EndpointState {
            generation,
            heartbeat: 0,
            heartbeat_learned_at: 0,
            application: BTreeMap::new(),
            application_max_version: 0,
            max_version: 0,
        }
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The version of the latest heartbeat known (0 when none arrived yet).
    pub fn heartbeat_version(&self) -> Version {
        self.heartbeat
    }

    /// The highest version held: everything the owner published up to it is known here
    /// (or was superseded by a later version of the same key).
    pub fn max_version(&self) -> Version {
        self.max_version
    }

    pub fn get(&self, key: AppKey) -> Option<&AppValue> {
        self.application.get(&key).map(|held| &held.versioned.value)
    }

    pub fn version_of(&self, key: AppKey) -> Option<Version> {
        self.application
            .get(&key)
            .map(|held| held.versioned.version)
    }

    /// The application state, by key.
    pub fn entries(&self) -> impl Iterator<Item = (AppKey, &VersionedValue)> {
        self.application
            .iter()
            .map(|(key, held)| (*key, &held.versioned))
    }

    /// `None` until the status entry arrived.
    pub fn status(&self) -> Option<NodeStatus> {
        match self.get(AppKey::Status) {
            Some(AppValue::Status(status)) => Some(*status),
            _ => None,
        }
    }

    pub fn peer_address(&self) -> Option<&str> {
        self.text(AppKey::PeerAddress)
    }

    pub fn http_address(&self) -> Option<&str> {
        self.text(AppKey::HttpAddress)
    }

    pub fn vnodes(&self) -> Option<u16> {
        self.count(AppKey::Vnodes)
            .and_then(|count| u16::try_from(count).ok())
    }

    pub fn hints_pending(&self) -> Option<u64> {
        self.count(AppKey::HintsPending)
    }

    pub fn data_bytes(&self) -> Option<u64> {
        self.count(AppKey::DataBytes)
    }

    pub fn tree_roots(&self) -> Option<&[(u64, u64)]> {
        match self.get(AppKey::TreeRoots) {
            Some(AppValue::Roots(roots)) => Some(roots),
            _ => None,
        }
    }

    fn text(&self, key: AppKey) -> Option<&str> {
        match self.get(key) {
            Some(AppValue::Text(text)) => Some(text),
            _ => None,
        }
    }

    fn count(&self, key: AppKey) -> Option<u64> {
        match self.get(key) {
            Some(AppValue::Count(count)) => Some(*count),
            _ => None,
        }
    }

    /// Takes a heartbeat version if it is newer; true when it was.
    pub(crate) fn apply_heartbeat(&mut self, version: Version, now: Millis) -> bool {
        if version <= self.heartbeat {
            return false;
        }
        self.heartbeat = version;
        self.heartbeat_learned_at = now;
        self.max_version = self.max_version.max(version);
        true
    }

    /// Takes an entry if it is newer than the one held; true when it was.
    pub(crate) fn apply_entry(&mut self, key: AppKey, entry: VersionedValue, now: Millis) -> bool {
        if self
            .application
            .get(&key)
            .is_some_and(|held| held.versioned.version >= entry.version)
        {
            return false;
        }
        self.max_version = self.max_version.max(entry.version);
        self.application_max_version = self.application_max_version.max(entry.version);
        self.application.insert(
            key,
            HeldValue {
                versioned: entry,
                learned_at: now,
            },
        );
        true
    }

    /// True when taking `entries` keeps the state within [`MAX_APP_KEYS`] keys.
    pub(crate) fn has_room_for(&self, entries: &[(AppKey, VersionedValue)]) -> bool {
        if entries.is_empty() {
            return true;
        }
        let new_keys = entries
            .iter()
            .filter(|(key, _)| !self.application.contains_key(key))
            .count();
        self.application.len() + new_keys <= MAX_APP_KEYS
    }

    pub(crate) fn application_len(&self) -> usize {
        self.application.len()
    }

    /// When the oldest update after `after` was learned here; `None` when there is none.
    pub(crate) fn oldest_update_after(&self, after: Version) -> Option<Millis> {
        let heartbeat = (self.heartbeat > after).then_some(self.heartbeat_learned_at);
        if self.application_max_version <= after {
            return heartbeat;
        }
        self.application
            .values()
            .filter(|held| held.versioned.version > after)
            .map(|held| held.learned_at)
            .chain(heartbeat)
            .min()
    }

    /// True when the only update after `after` is the heartbeat (the common case, cheap).
    pub(crate) fn only_heartbeat_after(&self, after: Version) -> bool {
        self.application_max_version <= after && self.heartbeat > after
    }

    /// The updates after `after`, in version order (the heartbeat is one of them). A prefix of this list is always a valid delta.
    pub(crate) fn updates_after(&self, after: Version) -> Vec<Update<'_>> {
        let mut updates: Vec<Update<'_>> = self
            .application
            .iter()
            .filter(|(_, held)| held.versioned.version > after)
            .map(|(key, held)| Update::Entry { key: *key, held })
            .collect();
        if self.heartbeat > after {
            updates.push(Update::Heartbeat {
                version: self.heartbeat,
            });
        }
        updates.sort_unstable_by_key(Update::version);
        updates
    }
}

/// One update of a node's state, borrowed for building a delta.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Update<'a> {
    Heartbeat { version: Version },
    Entry { key: AppKey, held: &'a HeldValue },
}

impl Update<'_> {
    pub(crate) fn version(&self) -> Version {
        match self {
            Update::Heartbeat { version, .. } => *version,
            Update::Entry { held, .. } => held.versioned.version,
        }
    }
}
