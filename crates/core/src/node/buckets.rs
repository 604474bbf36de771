//! The node's bucket properties: the table every node holds (see [`crate::bucket`]), the
//! hybrid logical clock that stamps LWW writes and property changes, and the sibling
//! warnings the driver logs.
//!
//! The table is stored as one meta record and published in gossip under
//! [`PROPS_GOSSIP_KEY`]; a newer entry heard in any peer's state is taken, stored and
//! published again, so every node ends with every change (and keeps it across restarts).

use super::{Counter, Node};
use crate::bucket::hlc::{HlcTimestamp, HybridClock};
use crate::bucket::{
    BucketProps, PropsError, PropsStamp, PropsTable, PropsUpdate, StampedProps, PROPS_GOSSIP_KEY,
    PROPS_META,
};
use crate::gossip::{AppValue, Generation, Version};
use crate::storage::{Storage, StorageError};
use crate::{Millis, NodeId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Sibling warnings kept for the driver to log; more in one drain interval are counted only.
const MAX_PENDING_WARNINGS: usize = 64;

/// A causal write left a key with at least `warn_siblings` siblings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiblingWarning {
    pub bucket: String,
    pub key: Vec<u8>,
    pub siblings: usize,
    pub warn_siblings: u32,
}

/// Why a properties change failed.
#[derive(Debug, thiserror::Error)]
pub enum SetPropsError {
    /// Bad values, or too many buckets (a 400; nothing changed).
    #[error(transparent)]
    Invalid(#[from] PropsError),
    /// The record could not be stored durably (a 500 or 507).
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

#[derive(Debug)]
pub(super) struct Buckets {
    pub table: PropsTable,
    /// Properties of buckets never set (`[buckets]`).
    pub defaults: BucketProps,
    /// Buckets never set that are `lww` whatever `defaults` says (the Redis protocol's).
    pub lww_defaults: BTreeSet<String>,
    pub clock: HybridClock,
    pub warnings: VecDeque<SiblingWarning>,
    /// The gossip version of each peer's table this node merged last (so an unchanged
    /// table is not decoded again).
    merged: BTreeMap<NodeId, (Generation, Version)>,
}

impl Buckets {
    /// Loads the stored table; a damaged record is counted and replaced as peers gossip.
    pub fn load<S: Storage>(
        storage: &S,
        defaults: BucketProps,
        lww_defaults: BTreeSet<String>,
    ) -> (Self, bool) {
        let (table, corrupt) = match storage.get_meta(PROPS_META) {
            Ok(Some(bytes)) => match PropsTable::decode(&bytes) {
                Ok(table) => (table, false),
                Err(_) => (PropsTable::default(), true),
            },
            Ok(None) => (PropsTable::default(), false),
            Err(_) => (PropsTable::default(), true),
        };
        let mut clock = HybridClock::new();
        // The next change is stamped after every stored one, even if the wall clock was set
        // back while the node was down.
        for (_, entry) in table.iter() {
            clock.observe(entry.stamp.timestamp);
        }
        let buckets = Buckets {
            table,
            defaults,
            lww_defaults,
            clock,
            warnings: VecDeque::new(),
            merged: BTreeMap::new(),
        };
        (buckets, corrupt)
    }

    pub fn props(&self, bucket: &str) -> BucketProps {
        self.table
            .get(bucket)
            .map(|entry| entry.props)
            .unwrap_or_else(|| self.default_props(bucket))
    }

    /// The properties of `bucket` while they were never set.
    fn default_props(&self, bucket: &str) -> BucketProps {
        let mut props = self.defaults;
        if self.lww_defaults.contains(bucket) {
            props.resolution = crate::bucket::Resolution::Lww;
        }
        props
    }
}

impl<S: Storage> Node<S> {
    /// A bucket's properties as this node knows them (defaults for a bucket never set).
    pub fn bucket_props(&self, bucket: &str) -> BucketProps {
        self.buckets.props(bucket)
    }

    /// Every bucket whose properties were set, as this node knows them.
    pub fn bucket_props_table(&self) -> &PropsTable {
        &self.buckets.table
    }

    /// Sets a bucket's properties: stamped, stored durably here, then gossiped.
    pub fn set_bucket_props(
        &mut self,
        now: Millis,
        bucket: &str,
        update: PropsUpdate,
    ) -> Result<BucketProps, SetPropsError> {
        self.clock = self.clock.max(now);
        let props = update.apply_to(self.buckets.props(bucket))?;
        let entry = StampedProps {
            props,
            stamp: PropsStamp {
                timestamp: self.buckets.clock.tick(now),
                node_hash: self.identity.actor.node_hash,
            },
        };
        let mut table = self.buckets.table.clone();
        table.offer(bucket, entry)?;
        // Durable before it is acknowledged or spread: a 204 survives a crash of this node.
        self.storage
            .put_meta(PROPS_META, &table.encode())
            .and_then(|()| self.storage.sync())
            .inspect_err(|_| self.stats.increment(Counter::StorageErrors))?;
        self.buckets.table = table;
        self.publish_props(now);
        self.stats.increment(Counter::BucketPropsChanges);
        Ok(props)
    }

    /// Publishes the table in this node's gossip state.
    pub(super) fn publish_props(&mut self, now: Millis) {
        if self.buckets.table.is_empty() {
            return;
        }
        let value = AppValue::Bytes(self.buckets.table.encode());
        if self
            .cluster
            .gossiper
            .set_local(PROPS_GOSSIP_KEY, value, now)
            .is_err()
        {
            // The table is bounded to fit a gossip entry; this is a bug if it ever happens.
            self.stats.increment(Counter::BucketPropsInvalid);
        }
    }

    /// Takes what a peer's gossip state says of bucket properties, when it changed.
    pub(super) fn learn_props_from(&mut self, now: Millis, node: &NodeId) {
        if node == self.id() {
            return;
        }
        let Some(state) = self.cluster.gossiper.member(node) else {
            return;
        };
        let Some(version) = state.version_of(PROPS_GOSSIP_KEY) else {
            return;
        };
        let seen = (state.generation(), version);
        if self.buckets.merged.get(node) == Some(&seen) {
            return;
        }
        let Some(AppValue::Bytes(bytes)) = state.get(PROPS_GOSSIP_KEY) else {
            self.stats.increment(Counter::BucketPropsInvalid);
            return;
        };
        let Ok(table) = PropsTable::decode(bytes) else {
            self.stats.increment(Counter::BucketPropsInvalid);
            return;
        };
        let mut merged = self.buckets.table.clone();
        if !merged.merge(&table) {
            self.buckets.merged.insert(node.clone(), seen);
            return;
        }
        // Stored with the next group sync: losing it in a crash only means hearing it again.
        // Not marked as merged when the store fails, so the next gossip event retries.
        if self.storage.put_meta(PROPS_META, &merged.encode()).is_err() {
            self.stats.increment(Counter::StorageErrors);
            return;
        }
        self.wrote();
        self.buckets.merged.insert(node.clone(), seen);
        for (_, entry) in merged.iter() {
            self.buckets.clock.observe(entry.stamp.timestamp);
        }
        self.buckets.table = merged;
        self.publish_props(now);
    }

    /// An HLC timestamp for an LWW write on top of `old` (observed first, so it wins).
    pub(super) fn lww_timestamp(&mut self, old: Option<HlcTimestamp>) -> HlcTimestamp {
        if let Some(old) = old {
            self.buckets.clock.observe(old);
        }
        self.buckets.clock.tick(self.clock)
    }

    /// Counts a causal write at `warn_siblings` and keeps it for the driver to log.
    pub(super) fn warn_siblings(&mut self, bucket: &str, key: &[u8], siblings: usize, at: u32) {
        self.stats.increment(Counter::SiblingsWarned);
        if self.buckets.warnings.len() < MAX_PENDING_WARNINGS {
            self.buckets.warnings.push_back(SiblingWarning {
                bucket: bucket.to_string(),
                key: key.to_vec(),
                siblings,
                warn_siblings: at,
            });
        }
    }

    /// Sibling warnings since the last call, for the driver's log.
    pub fn take_sibling_warnings(&mut self) -> Vec<SiblingWarning> {
        self.buckets.warnings.drain(..).collect()
    }
}
