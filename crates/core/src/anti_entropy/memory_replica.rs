//! An in-memory replica (objects ordered by token, plus its trees): the reference
//! [`SegmentSource`] for tests, benchmarks and the simulator.

use super::exchange::{RepairObject, SegmentItem, SegmentSource};
use super::range_trees::RangeTrees;
use crate::ring::{key_token, Token, TokenRange};
use crate::storage::StorageError;
use crate::version::Object;
use std::collections::BTreeMap;
use std::ops::Bound;

type StoreKey = (Token, String, Vec<u8>);

/// Objects ordered by key token, so a segment is one range scan.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    objects: BTreeMap<StoreKey, Object>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, bucket: &str, key: &[u8]) -> Option<&Object> {
        self.objects
            .get(&(key_token(bucket, key), bucket.to_string(), key.to_vec()))
    }

    /// Stores `object`, returning the previous one.
    pub fn put(&mut self, bucket: &str, key: &[u8], object: Object) -> Option<Object> {
        self.objects.insert(
            (key_token(bucket, key), bucket.to_string(), key.to_vec()),
            object,
        )
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// `(token, bucket, key, object)` in token order.
    pub fn iter(&self) -> impl Iterator<Item = (Token, &str, &[u8], &Object)> {
        self.objects
            .iter()
            .map(|((t, b, k), o)| (*t, b.as_str(), k.as_slice(), o))
    }

    /// Objects whose token is in `tokens`.
    pub fn scan(&self, tokens: TokenRange) -> impl Iterator<Item = (&str, &[u8], &Object)> {
        token_intervals(tokens)
            .into_iter()
            .flat_map(move |(low, high)| {
                let from = Bound::Included((low, String::new(), Vec::new()));
                let to = match high.checked_add(1) {
                    Some(next) => Bound::Excluded((next, String::new(), Vec::new())),
                    None => Bound::Unbounded,
                };
                self.objects.range((from, to))
            })
            .map(|((_, b, k), o)| (b.as_str(), k.as_slice(), o))
    }
}

/// The inclusive token intervals of a `(start, end]` range.
fn token_intervals(range: TokenRange) -> Vec<(Token, Token)> {
    if range.start == range.end {
        return vec![(0, Token::MAX)];
    }
    if range.start < range.end {
        return vec![(range.start + 1, range.end)];
    }
    let mut intervals = vec![(0, range.end)];
    if range.start < Token::MAX {
        intervals.push((range.start + 1, Token::MAX));
    }
    intervals
}

impl SegmentSource for MemoryStore {
    fn segment_items(&self, tokens: TokenRange) -> Result<Vec<SegmentItem>, StorageError> {
        Ok(self
            .scan(tokens)
            .map(|(bucket, key, object)| SegmentItem {
                bucket: bucket.to_string(),
                key: key.to_vec(),
                digest: object.digest(),
            })
            .collect())
    }

    fn object(&self, bucket: &str, key: &[u8]) -> Result<Option<Object>, StorageError> {
        Ok(self.get(bucket, key).cloned())
    }
}

/// A store and its trees, kept in step on every write.
#[derive(Debug, Clone)]
pub struct MemoryReplica {
    pub store: MemoryStore,
    pub trees: RangeTrees,
}

impl MemoryReplica {
    pub fn new(trees: RangeTrees) -> Self {
        MemoryReplica {
            store: MemoryStore::new(),
            trees,
        }
    }

    /// Replaces a key's object, keeping the trees exact.
    pub fn put(&mut self, bucket: &str, key: &[u8], object: Object) {
        let new_digest = object.digest();
        let old = self.store.put(bucket, key, object);
        self.trees
            .record_write(bucket, key, old.map(|o| o.digest()), Some(new_digest));
    }

    /// Merges an object into the stored one; true when the stored object changed.
    pub fn merge(&mut self, bucket: &str, key: &[u8], object: &Object) -> bool {
        let merged = match self.store.get(bucket, key) {
            Some(local) => {
                let merged = local.merge(object);
                if merged == *local {
                    return false;
                }
                merged
            }
            None => object.clone(),
        };
        self.put(bucket, key, merged);
        true
    }

    /// Applies an exchange's writes; returns how many changed the store.
    pub fn apply(&mut self, writes: Vec<RepairObject>) -> usize {
        writes
            .into_iter()
            .filter(|w| self.merge(&w.bucket, &w.key, &w.object))
            .count()
    }

    /// Rebuilds every tree from the store (what a node does when it has no trusted tree).
    pub fn rebuild_trees(&mut self) {
        let ranges: Vec<TokenRange> = self.trees.ranges().collect();
        for range in ranges {
            let items: Vec<(&str, &[u8], u64)> = self
                .store
                .scan(range)
                .map(|(b, k, o)| (b, k, o.digest()))
                .collect();
            self.trees.rebuild(range, items);
        }
    }
}
