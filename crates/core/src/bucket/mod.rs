//! Buckets: their properties, and the two ways a bucket resolves concurrent writes.
//!
//! # Properties
//! [`BucketProps`]: `resolution` (`causal`: dotted version vectors and siblings; `lww`: last
//! write wins by hybrid logical clock, ties by node), `max_siblings` and `warn_siblings`
//! (causal buckets). A bucket never set has the node's defaults (`[buckets]`).
//!
//! # How properties spread ([`PropsTable`])
//! Every node holds the table of every bucket whose properties were ever set, each entry
//! stamped with the HLC timestamp and node of the change that set it. Tables merge entry by
//! entry, the larger stamp winning, so merging is commutative, associative and idempotent
//! and every node ends with the same table whatever order it hears of changes in. A node
//! stores its table durably (a meta record) and publishes it in its gossip state
//! ([`PROPS_GOSSIP_KEY`]); a node that hears a newer entry in a peer's state takes it, stores
//! it and republishes. So a change reaches every node within a few gossip rounds, a node
//! that joins later learns every entry from any peer, and a restart of every node loses
//! nothing (each reloads its own record).
//!
//! # Resolution behind one interface
//! [`Resolution`] says how a coordinator applies a client write
//! ([`crate::version::Object::apply_write`] or [`crate::version::Object::apply_lww_write`]).
//! Merging never asks the bucket: an LWW object is recognisable from its encoding (its one
//! sibling's dot has the reserved epoch [`crate::version::LWW_EPOCH`]), and
//! [`crate::version::Object::merge`] resolves LWW objects by timestamp. So a node that has
//! not yet heard of a change to `lww` cannot turn an LWW object into siblings: read repair,
//! hints, anti-entropy and `Replicate` all merge the same way on every node.

pub mod hlc;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a bucket resolves concurrent writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Resolution {
    /// Dotted version vectors: concurrent writes become siblings.
    Causal,
    /// Last write wins by HLC timestamp, ties by node: never siblings.
    Lww,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Causal => "causal",
            Resolution::Lww => "lww",
        }
    }
}

impl std::str::FromStr for Resolution {
    type Err = PropsError;

    fn from_str(text: &str) -> Result<Self, PropsError> {
        match text {
            "causal" => Ok(Resolution::Causal),
            "lww" => Ok(Resolution::Lww),
            other => Err(PropsError::UnknownResolution(other.to_string())),
        }
    }
}

/// The largest `max_siblings` / `warn_siblings` accepted: beyond it a key's object would be
/// too large to read back anyway (every sibling is a value of up to `max_value_bytes`).
pub const MAX_SIBLINGS_LIMIT: u32 = 10_000;

/// How many buckets may have properties: the table travels in gossip, whose entries are
/// bounded (a quarter of `gossip.max_message_bytes`).
pub const MAX_BUCKETS_WITH_PROPS: usize = 128;

/// The gossip application key that carries a node's [`PropsTable`].
pub const PROPS_GOSSIP_KEY: crate::gossip::AppKey = crate::gossip::AppKey::Extension(1);

/// The meta record that holds a node's [`PropsTable`].
pub const PROPS_META: &str = "bucket_props";

/// A bucket's properties (SPEC sections 3 and 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BucketProps {
    pub resolution: Resolution,
    /// A causal write that would leave more siblings than this is refused (409).
    pub max_siblings: u32,
    /// A causal write that leaves at least this many siblings is logged and counted.
    pub warn_siblings: u32,
}

impl Default for BucketProps {
    /// SPEC section 4's defaults: causal, 100, 25.
    fn default() -> Self {
        BucketProps {
            resolution: Resolution::Causal,
            max_siblings: 100,
            warn_siblings: 25,
        }
    }
}

/// Why a properties change was refused (HTTP 400, nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropsError {
    #[error("resolution must be \"causal\" or \"lww\", not {0:?}")]
    UnknownResolution(String),
    #[error("{field} must be within 1..={MAX_SIBLINGS_LIMIT}, not {value}")]
    OutOfRange { field: &'static str, value: u64 },
    #[error("at most {MAX_BUCKETS_WITH_PROPS} buckets may have properties")]
    TooManyBuckets,
}

/// A change of properties: the fields a client sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PropsUpdate {
    pub resolution: Option<Resolution>,
    pub max_siblings: Option<u64>,
    pub warn_siblings: Option<u64>,
}

impl PropsUpdate {
    /// `current` with this update applied, or why it is refused.
    pub fn apply_to(&self, current: BucketProps) -> Result<BucketProps, PropsError> {
        let limit = |field: &'static str, value: Option<u64>, old: u32| match value {
            None => Ok(old),
            Some(v) if (1..=u64::from(MAX_SIBLINGS_LIMIT)).contains(&v) => Ok(v as u32),
            Some(value) => Err(PropsError::OutOfRange { field, value }),
        };
        Ok(BucketProps {
            resolution: self.resolution.unwrap_or(current.resolution),
            max_siblings: limit("max_siblings", self.max_siblings, current.max_siblings)?,
            warn_siblings: limit("warn_siblings", self.warn_siblings, current.warn_siblings)?,
        })
    }
}

/// Which change set an entry: the larger stamp wins (timestamp, then node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PropsStamp {
    pub timestamp: hlc::HlcTimestamp,
    pub node_hash: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StampedProps {
    pub props: BucketProps,
    pub stamp: PropsStamp,
}

/// Format version of an encoded table (the first byte).
const TABLE_FORMAT_VERSION: u8 = 1;

/// Why an encoded table could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableDecodeError {
    #[error("bucket properties table format {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("bucket properties table is malformed")]
    Malformed,
}

/// Every bucket whose properties were set, with the stamp of the change (see module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropsTable {
    entries: BTreeMap<String, StampedProps>,
}

impl PropsTable {
    pub fn get(&self, bucket: &str) -> Option<&StampedProps> {
        self.entries.get(bucket)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &StampedProps)> {
        self.entries.iter()
    }

    /// Takes an entry if its stamp is newer than the one held; true when the table changed.
    /// A new bucket beyond [`MAX_BUCKETS_WITH_PROPS`] is refused.
    pub fn offer(&mut self, bucket: &str, entry: StampedProps) -> Result<bool, PropsError> {
        let full = self.entries.len() >= MAX_BUCKETS_WITH_PROPS;
        match self.entries.get_mut(bucket) {
            // Equal stamps name one change; comparing the properties too keeps the merge a
            // join even for a peer that sent two different entries under one stamp.
            Some(held) if (held.stamp, held.props) >= (entry.stamp, entry.props) => Ok(false),
            Some(held) => {
                *held = entry;
                Ok(true)
            }
            None if full => Err(PropsError::TooManyBuckets),
            None => {
                self.entries.insert(bucket.to_string(), entry);
                Ok(true)
            }
        }
    }

    /// Merges another table in; true when this one changed. Entries beyond the bucket bound
    /// are left out (a peer cannot make this table grow without limit).
    pub fn merge(&mut self, other: &PropsTable) -> bool {
        let mut changed = false;
        for (bucket, entry) in &other.entries {
            changed |= self.offer(bucket, *entry).unwrap_or(false);
        }
        changed
    }

    pub fn encode(&self) -> Vec<u8> {
        let entries: Vec<(&String, &StampedProps)> = self.entries.iter().collect();
        let mut bytes = vec![TABLE_FORMAT_VERSION];
        // Serialising plain data into a Vec cannot fail.
        bytes.extend(postcard::to_stdvec(&entries).unwrap_or_default());
        bytes
    }

    /// Reads a table (from storage or a peer's gossip); never panics. Invalid entries
    /// (bad bucket names, limits out of range) are dropped.
    pub fn decode(bytes: &[u8]) -> Result<Self, TableDecodeError> {
        let (&version, body) = bytes.split_first().ok_or(TableDecodeError::Malformed)?;
        if version != TABLE_FORMAT_VERSION {
            return Err(TableDecodeError::UnsupportedVersion(version));
        }
        let entries: Vec<(String, StampedProps)> =
            postcard::from_bytes(body).map_err(|_| TableDecodeError::Malformed)?;
        let mut table = PropsTable::default();
        for (bucket, entry) in entries {
            let valid = crate::request::validate_bucket(&bucket).is_ok()
                && (1..=MAX_SIBLINGS_LIMIT).contains(&entry.props.max_siblings)
                && (1..=MAX_SIBLINGS_LIMIT).contains(&entry.props.warn_siblings);
            if valid {
                let _ = table.offer(&bucket, entry);
            }
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(ts: u64, node: u64, max: u32) -> StampedProps {
        StampedProps {
            props: BucketProps {
                max_siblings: max,
                ..BucketProps::default()
            },
            stamp: PropsStamp {
                timestamp: hlc::HlcTimestamp::new(ts, 0),
                node_hash: node,
            },
        }
    }

    fn table() -> impl Strategy<Value = PropsTable> {
        proptest::collection::vec((0..4u8, 0..5u64, 0..3u64, 1..5u32), 0..6).prop_map(|items| {
            let mut t = PropsTable::default();
            for (b, ts, node, max) in items {
                let _ = t.offer(&format!("b{b}"), entry(ts, node, max));
            }
            t
        })
    }

    proptest! {
        /// Tables merge as a semilattice, so every node ends with the same table whatever
        /// order it hears of changes in.
        #[test]
        fn table_merge_is_a_semilattice(a in table(), b in table(), c in table()) {
            let join = |x: &PropsTable, y: &PropsTable| { let mut z = x.clone(); z.merge(y); z };
            prop_assert_eq!(join(&a, &b), join(&b, &a));
            prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)));
            prop_assert_eq!(join(&a, &a), a.clone());
            prop_assert_eq!(PropsTable::decode(&a.encode()), Ok(a));
        }
    }

    /// A partial update keeps the fields it does not name, and bad values change nothing.
    #[test]
    fn updates_apply_and_validate() {
        let base = BucketProps::default();
        let update = PropsUpdate {
            resolution: Some(Resolution::Lww),
            ..PropsUpdate::default()
        };
        let props = update.apply_to(base).unwrap();
        assert_eq!(props.resolution, Resolution::Lww);
        assert_eq!(props.max_siblings, 100);
        let bad = PropsUpdate {
            max_siblings: Some(0),
            ..PropsUpdate::default()
        };
        assert!(bad.apply_to(base).is_err());
        assert!("LWW".parse::<Resolution>().is_err());
    }

    /// Garbage from a peer or a damaged record is refused, never a panic.
    #[test]
    fn decoding_garbage_fails_cleanly() {
        assert!(PropsTable::decode(&[]).is_err());
        assert!(PropsTable::decode(&[9, 1, 2]).is_err());
        assert!(PropsTable::decode(&[1, 0xff, 0xff, 0xff]).is_err());
    }
}
