//! The trees of one node: one [`MerkleTree`] per token range it replicates.
//!
//! # Memory
//! One tree per replicated range, every tree the same shape. With the default shape (4096
//! leaves, fanout 16: 34 KiB) and the default ring (16 vnodes, RF 3) a node replicates about
//! 48 ranges, so about 1.6 MiB, whatever the number of keys. The trade-off: a leaf covers
//! `keys_in_range / 4096` keys, and a mismatched leaf costs one item hash per key in its
//! segment during an exchange; bigger trees (more `leaf_bits`) cost memory and make an in-sync
//! comparison no dearer (roots first), but make the per-key cost of a small divergence
//! smaller. Trees keyed per range (not per peer pair) mean a node keeps one tree per range
//! and compares it with every other replica of that range.

use super::merkle::{ItemHasher, MerkleTree, Segment, TreeDecodeError, TreeShape};
use crate::ring::{key_token, Ring, Token, TokenRange};
use crate::storage::{scan_position, ScanCursor};
use crate::NodeId;
use std::collections::BTreeMap;

/// The ranges whose preference list holds `node`: the ranges it keeps trees for.
pub fn replicated_ranges(ring: &Ring, node: &NodeId) -> Vec<TokenRange> {
    ring.ranges()
        .into_iter()
        .filter(|(_, replicas)| replicas.contains(node))
        .map(|(range, _)| range)
        .collect()
}

/// Every (range, other replica) pair `node` should sync: the targets of its repair queue.
pub fn repair_targets(ring: &Ring, node: &NodeId) -> Vec<(TokenRange, NodeId)> {
    ring.ranges()
        .into_iter()
        .filter(|(_, replicas)| replicas.contains(node))
        .flat_map(|(range, replicas)| {
            replicas
                .into_iter()
                .filter(|peer| peer != node)
                .map(move |peer| (range, peer))
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct RangeTrees {
    hasher: ItemHasher,
    shape: TreeShape,
    /// Keyed by the end token of the range (ranges never overlap).
    trees: BTreeMap<Token, MerkleTree>,
    /// Trees still being built from a scan of their range, by range end, with the last
    /// object the scan has added (`None`: nothing yet). Such a tree is not compared with
    /// peers; a write to a key the scan has not reached leaves it alone (the scan will list
    /// the key as stored then), one to a key it has passed updates it as usual.
    building: BTreeMap<Token, Option<ScanCursor>>,
}

impl RangeTrees {
    pub fn new(hasher: ItemHasher, shape: TreeShape) -> Self {
        RangeTrees {
            hasher,
            shape,
            trees: BTreeMap::new(),
            building: BTreeMap::new(),
        }
    }

    pub fn hasher(&self) -> &ItemHasher {
        &self.hasher
    }

    pub fn shape(&self) -> TreeShape {
        self.shape
    }

    /// Sets the ranges this node replicates (after a ring change). Trees of ranges that stay
    /// are kept; trees of ranges that went are dropped. Returns the new ranges: their trees
    /// start empty and must be rebuilt from the data (see [`RangeTrees::rebuild`]) before
    /// they are compared.
    pub fn set_ranges(&mut self, ranges: impl IntoIterator<Item = TokenRange>) -> Vec<TokenRange> {
        self.set_ranges_with(ranges, false)
    }

    /// [`RangeTrees::set_ranges`], the new trees marked building: they are built from a scan
    /// batch by batch ([`RangeTrees::next_build`], [`RangeTrees::add_built`]), keep up with
    /// writes meanwhile, and are not compared with peers until done.
    pub fn set_ranges_building(
        &mut self,
        ranges: impl IntoIterator<Item = TokenRange>,
    ) -> Vec<TokenRange> {
        self.set_ranges_with(ranges, true)
    }

    fn set_ranges_with(
        &mut self,
        ranges: impl IntoIterator<Item = TokenRange>,
        build: bool,
    ) -> Vec<TokenRange> {
        let mut old = std::mem::take(&mut self.trees);
        let mut old_building = std::mem::take(&mut self.building);
        let mut created = Vec::new();
        for range in ranges {
            let tree = match old.remove(&range.end) {
                Some(tree) if tree.range() == range => {
                    if let Some(progress) = old_building.remove(&range.end) {
                        self.building.insert(range.end, progress);
                    }
                    tree
                }
                _ => {
                    created.push(range);
                    if build {
                        self.building.insert(range.end, None);
                    }
                    MerkleTree::new(range, self.shape)
                }
            };
            self.trees.insert(range.end, tree);
        }
        created
    }

    /// Whether the range's tree exists and is built (comparable with a peer's).
    pub fn is_ready(&self, range: TokenRange) -> bool {
        self.tree(range).is_some() && !self.building.contains_key(&range.end)
    }

    /// Whether some tree is still being built.
    pub fn is_building(&self) -> bool {
        !self.building.is_empty()
    }

    /// A tree still being built and where its scan stands: the next one to work on.
    pub fn next_build(&self) -> Option<(TokenRange, Option<ScanCursor>)> {
        let (end, progress) = self.building.iter().next()?;
        let tree = self.trees.get(end)?;
        Some((tree.range(), progress.clone()))
    }

    /// Adds one batch of a building tree's scan, `(bucket, key, digest)` in scan order,
    /// and where the scan goes on (`None`: the scan is done and the tree is ready).
    pub fn add_built<'a>(
        &mut self,
        range: TokenRange,
        items: impl IntoIterator<Item = (&'a str, &'a [u8], u64)>,
        resume: Option<ScanCursor>,
    ) {
        let hasher = self.hasher;
        if !self.building.contains_key(&range.end) {
            return;
        }
        let Some(tree) = self
            .trees
            .get_mut(&range.end)
            .filter(|t| t.range() == range)
        else {
            return;
        };
        for (bucket, key, digest) in items {
            if let Some(segment) = tree.segment_of(key_token(bucket, key)) {
                tree.update(segment, None, Some(hasher.item_hash(bucket, key, digest)));
            }
        }
        match resume {
            Some(cursor) => {
                self.building.insert(range.end, Some(cursor));
            }
            None => {
                self.building.remove(&range.end);
            }
        }
    }

    /// Whether a write of this key must leave the tree alone: its tree is building and the
    /// scan has not reached the key yet (it will list the key as stored then).
    fn scan_still_ahead(&self, range: TokenRange, token: Token, bucket: &str, key: &[u8]) -> bool {
        match self.building.get(&range.end) {
            None => false,
            Some(None) => true,
            Some(Some(cursor)) => scan_position(range, token, bucket, key) > cursor.position(range),
        }
    }

    /// Replaces (or adds) a tree, e.g. one loaded from disk or rebuilt from a scan.
    /// Refused (returned) when its shape differs from this node's.
    pub fn insert_tree(&mut self, tree: MerkleTree) -> Result<(), MerkleTree> {
        if tree.shape() != self.shape {
            return Err(tree);
        }
        self.building.remove(&tree.range().end);
        self.trees.insert(tree.range().end, tree);
        Ok(())
    }

    /// Rebuilds a range's tree from a full scan of its objects `(bucket, key, digest)`.
    pub fn rebuild<'a>(
        &mut self,
        range: TokenRange,
        items: impl IntoIterator<Item = (&'a str, &'a [u8], u64)>,
    ) {
        let mut tree = MerkleTree::new(range, self.shape);
        for (bucket, key, digest) in items {
            if let Some(segment) = tree.segment_of(key_token(bucket, key)) {
                tree.update(
                    segment,
                    None,
                    Some(self.hasher.item_hash(bucket, key, digest)),
                );
            }
        }
        self.building.remove(&range.end);
        self.trees.insert(range.end, tree);
    }

    pub fn ranges(&self) -> impl Iterator<Item = TokenRange> + '_ {
        self.trees.values().map(|t| t.range())
    }

    pub fn len(&self) -> usize {
        self.trees.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trees.is_empty()
    }

    pub fn tree(&self, range: TokenRange) -> Option<&MerkleTree> {
        self.trees.get(&range.end).filter(|t| t.range() == range)
    }

    pub fn tree_mut(&mut self, range: TokenRange) -> Option<&mut MerkleTree> {
        self.trees
            .get_mut(&range.end)
            .filter(|t| t.range() == range)
    }

    /// The range (of this node's) and segment a token falls in.
    pub fn locate(&self, token: Token) -> Option<(TokenRange, Segment)> {
        let tree = self.tree_for(token)?;
        Some((tree.range(), tree.segment_of(token)?))
    }

    fn tree_for(&self, token: Token) -> Option<&MerkleTree> {
        // The range holding `token` is the one with the smallest end >= token, or (for the
        // range that wraps past 0) the one with the smallest end of all.
        let candidate = self
            .trees
            .range(token..)
            .next()
            .or_else(|| self.trees.iter().next())
            .map(|(_, t)| t)?;
        candidate.range().contains(token).then_some(candidate)
    }

    /// Keeps the trees exact on a write: the key's item hash before (from the old object's
    /// digest, `None` if it did not exist) out, after (`None` if removed) in. Call it for
    /// every change of a stored object: client writes, replication, read repair, hints and
    /// anti-entropy. Returns false when no tree covers the key (not a range of this node).
    pub fn record_write(
        &mut self,
        bucket: &str,
        key: &[u8],
        old_digest: Option<u64>,
        new_digest: Option<u64>,
    ) -> bool {
        self.record_write_at(key_token(bucket, key), bucket, key, old_digest, new_digest)
            .is_some()
    }

    /// [`RangeTrees::record_write`] for a caller that already has the key's token; the range
    /// whose tree covers the key (none: not a range of this node), so the caller need not
    /// look it up again.
    pub fn record_write_at(
        &mut self,
        token: Token,
        bucket: &str,
        key: &[u8],
        old_digest: Option<u64>,
        new_digest: Option<u64>,
    ) -> Option<TokenRange> {
        if old_digest == new_digest {
            return self.tree_for(token).map(MerkleTree::range);
        }
        let hasher = self.hasher;
        let candidate_end = self.tree_for(token)?.range().end;
        let tree = self.trees.get(&candidate_end)?;
        let segment = tree.segment_of(token)?;
        let range = tree.range();
        if self.scan_still_ahead(range, token, bucket, key) {
            return Some(range);
        }
        let tree = self.trees.get_mut(&candidate_end)?;
        let old = old_digest.map(|d| hasher.item_hash(bucket, key, d));
        let new = new_digest.map(|d| hasher.item_hash(bucket, key, d));
        tree.update(segment, old, new);
        Some(range)
    }

    /// The persisted form of a range's tree (see [`MerkleTree::encode`]), stamped with this
    /// node's item-hash key. Persist it only together with the data it describes (at a
    /// clean shutdown, or with the data's own checkpoint); a tree that may be stale must be
    /// rebuilt instead of loaded.
    pub fn encode_tree(&self, range: TokenRange) -> Option<Vec<u8>> {
        self.tree(range)
            .map(|t| t.encode(self.hasher.fingerprint()))
    }

    /// Loads a persisted tree in place of the range's current one; refused when corrupt,
    /// built under another key, of another shape, or for a range this node does not keep.
    pub fn load_tree(&mut self, bytes: &[u8]) -> Result<TokenRange, TreeDecodeError> {
        let tree = MerkleTree::decode(bytes, self.hasher.fingerprint())?;
        let range = tree.range();
        if tree.shape() != self.shape || self.tree(range).is_none() {
            return Err(TreeDecodeError::Corrupt);
        }
        self.building.remove(&range.end);
        self.trees.insert(range.end, tree);
        Ok(range)
    }

    /// Memory of every tree, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.trees.values().map(|t| t.memory_bytes()).sum()
    }
}
