//! The three messages of a gossip exchange (Scuttlebutt, as Cassandra runs it):
//!
//! ```text
//!   A --Syn{digests}------------------> B   "of each node I know: generation, max version"
//!   A <--Ack{deltas, requests}--------- B   "here is what you lack; send me what I lack"
//!   A --Ack2{deltas}------------------> B   "here it is"
//! ```
//!
//! Only changes travel: a delta carries the entries of one node's state newer than the
//! version the receiver said it holds, in version order, so any prefix of it is a valid
//! delta and a message that runs out of budget simply stops early.

use super::state::{AppKey, AppValue, Generation, Version, VersionedValue};
use crate::NodeId;
use serde::{Deserialize, Serialize};

/// The longest node id gossip accepts.
pub const MAX_NODE_ID_BYTES: usize = 256;

pub use super::state::MAX_APP_KEYS;

/// Bytes a message adds around its lists (enum tag, list lengths, flags), an upper bound.
pub(crate) const MESSAGE_OVERHEAD_BYTES: usize = 24;

/// "Of this node I hold this generation, up to this version." In an `Ack`'s requests it
/// means "send me what is newer than this".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub node: NodeId,
    pub generation: Generation,
    pub max_version: Version,
}

/// The part of one node's state the receiver lacks: every update of the node's state newer
/// than `after`, up to some version (a prefix, in version order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub node: NodeId,
    pub generation: Generation,
    /// The version the delta starts after. A receiver that holds less of this generation
    /// (e.g. it restarted and lost what the request was based on) must ignore the delta:
    /// taking it would leave a hole below its new max version.
    pub after: Version,
    /// The node's latest heartbeat version, when it is part of the delta.
    pub heartbeat: Option<Version>,
    pub entries: Vec<(AppKey, VersionedValue)>,
}

impl Delta {
    /// The newest version the delta carries (its entries and heartbeat), if any.
    pub fn newest_version(&self) -> Option<Version> {
        self.entries
            .iter()
            .map(|(_, entry)| entry.version)
            .chain(self.heartbeat)
            .max()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GossipMessage {
    /// Opens an exchange. `complete` says the digests list every node the sender knows, so
    /// the receiver may also send the nodes the sender has never heard of.
    Syn {
        digests: Vec<Digest>,
        complete: bool,
    },
    /// Answers a `Syn`: the deltas the sender lacks, and requests for what the answerer lacks.
    Ack {
        deltas: Vec<Delta>,
        requests: Vec<Digest>,
    },
    /// Closes an exchange: the deltas requested in the `Ack`.
    Ack2 { deltas: Vec<Delta> },
}

impl GossipMessage {
    /// The newest state this message claims the sender holds for `node`, if it mentions it,
    /// as `(generation, version)`: in its digests and deltas, and in an `Ack`'s requests for
    /// more of a generation it already holds part of (`max_version > 0`). A request from
    /// version 0 only echoes the generation of the digest it answers.
    pub fn state_claimed_for(&self, node: &NodeId) -> Option<(Generation, Version)> {
        let digests = |list: &[Digest]| {
            list.iter()
                .filter(|d| d.node == *node)
                .map(|d| (d.generation, d.max_version))
                .max()
        };
        let deltas = |list: &[Delta]| {
            list.iter()
                .filter(|d| d.node == *node)
                .map(|d| (d.generation, d.newest_version().unwrap_or(d.after)))
                .max()
        };
        match self {
            GossipMessage::Syn { digests: list, .. } => digests(list),
            GossipMessage::Ack {
                deltas: list,
                requests,
            } => {
                let held = requests
                    .iter()
                    .filter(|d| d.node == *node && d.max_version > 0)
                    .map(|d| (d.generation, d.max_version))
                    .max();
                deltas(list).max(held)
            }
            GossipMessage::Ack2 { deltas: list } => deltas(list),
        }
    }

    /// The exact size of the postcard encoding (computed without encoding; a test checks
    /// it against postcard).
    pub fn encoded_len(&self) -> usize {
        // The enum's variant index is a one-byte varint.
        1 + match self {
            GossipMessage::Syn { digests, .. } => digests_len(digests) + 1,
            GossipMessage::Ack { deltas, requests } => deltas_len(deltas) + digests_len(requests),
            GossipMessage::Ack2 { deltas } => deltas_len(deltas),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising into a Vec only fails on allocation failure.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            GossipMessage::Syn { .. } => "syn",
            GossipMessage::Ack { .. } => "ack",
            GossipMessage::Ack2 { .. } => "ack2",
        }
    }

    /// Checks the shape of a message from the network: list lengths, id lengths, entries per
    /// node. Sizes of values need no check of their own: the whole message is bounded.
    pub fn validate(&self, max_nodes: usize) -> Result<(), &'static str> {
        match self {
            GossipMessage::Syn { digests, .. } => validate_digests(digests, max_nodes),
            GossipMessage::Ack { deltas, requests } => {
                validate_digests(requests, max_nodes)?;
                validate_deltas(deltas, max_nodes)
            }
            GossipMessage::Ack2 { deltas } => validate_deltas(deltas, max_nodes),
        }
    }
}

fn validate_node(node: &NodeId) -> Result<(), &'static str> {
    let len = node.as_str().len();
    if len == 0 || len > MAX_NODE_ID_BYTES {
        return Err("node id empty or too long");
    }
    Ok(())
}

fn validate_digests(digests: &[Digest], max_nodes: usize) -> Result<(), &'static str> {
    if digests.len() > max_nodes {
        return Err("more digests than nodes tracked");
    }
    digests.iter().try_for_each(|d| validate_node(&d.node))
}

fn validate_deltas(deltas: &[Delta], max_nodes: usize) -> Result<(), &'static str> {
    if deltas.len() > max_nodes {
        return Err("more deltas than nodes tracked");
    }
    for delta in deltas {
        validate_node(&delta.node)?;
        if delta.entries.len() > MAX_APP_KEYS {
            return Err("too many entries in a delta");
        }
        if delta
            .entries
            .iter()
            .any(|(_, entry)| entry.version <= delta.after || !value_is_well_formed(&entry.value))
            || delta
                .heartbeat
                .is_some_and(|version| version <= delta.after)
        {
            return Err("update not after the delta's start, or a malformed value");
        }
    }
    Ok(())
}

fn value_is_well_formed(value: &AppValue) -> bool {
    match value {
        AppValue::Roots(roots) => roots.windows(2).all(|pair| pair[0].0 < pair[1].0),
        _ => true,
    }
}

fn digests_len(digests: &[Digest]) -> usize {
    varint_len(digests.len())
        + digests
            .iter()
            .map(|d| digest_len(&d.node, d.generation, d.max_version))
            .sum::<usize>()
}

fn deltas_len(deltas: &[Delta]) -> usize {
    varint_len(deltas.len()) + deltas.iter().map(delta_len).sum::<usize>()
}

/// The size of a delta's encoding.
pub(crate) fn delta_len(delta: &Delta) -> usize {
    let id = delta.node.as_str().len();
    varint_len(id)
        + id
        + varint_len_u64(delta.generation)
        + varint_len_u64(delta.after)
        + 1
        + delta.heartbeat.map_or(0, varint_len_u64)
        + varint_len(delta.entries.len())
        + delta
            .entries
            .iter()
            .map(|(key, entry)| encoded_len(&(key, entry)))
            .sum::<usize>()
}

/// The exact size of a value's postcard encoding.
pub(crate) fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .unwrap_or(usize::MAX)
}

/// Bytes of the varint postcard writes for a length.
pub(crate) fn varint_len(n: usize) -> usize {
    varint_len_u64(n as u64)
}

/// Bytes of the varint postcard writes for a u64.
pub(crate) fn varint_len_u64(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// The size of a digest's encoding, without serialising it.
pub(crate) fn digest_len(node: &NodeId, generation: Generation, max_version: Version) -> usize {
    let id = node.as_str().len();
    varint_len(id) + id + varint_len_u64(generation) + varint_len_u64(max_version)
}
