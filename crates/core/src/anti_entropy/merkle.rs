//! Fixed-shape Merkle trees over the key-hash segments of one token range, in the style of
//! Riak's "Tictac" trees.
//!
//! A tree covers one [`TokenRange`]. The range is cut into `2^leaf_bits` *segments* of equal
//! token width (the last one may be shorter), so a segment's keys are exactly the keys whose
//! token falls in [`MerkleTree::segment_tokens`]: a token-range scan lists them.
//!
//! A leaf is the XOR of the *item hashes* of the keys in its segment. XOR is its own inverse,
//! so a write changes its leaf with one small delta (old item hash out, new one in) and the
//! tree never needs a rebuild to stay exact. Inner nodes hash their children; they are marked
//! dirty by an update and recomputed lazily, when someone reads them, from their children only
//! (never from the data). A subtree that holds nothing hashes to 0 at every level.
//!
//! Memory is fixed by the shape: `8 * (leaves + inner nodes)` bytes plus one dirty bit per
//! inner node, whatever the number of keys.

use crate::ring::{Token, TokenRange};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

/// The index of a segment (a leaf) within its tree.
pub type Segment = u32;

/// Smallest and largest trees accepted: 16 leaves to 256 Ki leaves (2 MiB; a level's
/// hashes then still fit in one message).
pub const MIN_LEAF_BITS: u8 = 4;
pub const MAX_LEAF_BITS: u8 = 18;
/// Fanout from 2 to 64.
pub const MAX_FANOUT_BITS: u8 = 6;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("leaf_bits must be {MIN_LEAF_BITS}..={MAX_LEAF_BITS} (got {0})")]
    LeafBits(u8),
    #[error("fanout_bits must be 1..={MAX_FANOUT_BITS} and divide leaf_bits (got {fanout_bits} for {leaf_bits})")]
    FanoutBits { leaf_bits: u8, fanout_bits: u8 },
}

/// The shape of a tree: `2^leaf_bits` leaves, `2^fanout_bits` children per inner node.
/// Two trees can only be compared when their shapes (and ranges) are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawShape", into = "RawShape")]
pub struct TreeShape {
    leaf_bits: u8,
    fanout_bits: u8,
}

#[derive(Serialize, Deserialize)]
struct RawShape(u8, u8);

impl TryFrom<RawShape> for TreeShape {
    type Error = ShapeError;
    fn try_from(raw: RawShape) -> Result<Self, ShapeError> {
        TreeShape::new(raw.0, raw.1)
    }
}

impl From<TreeShape> for RawShape {
    fn from(shape: TreeShape) -> Self {
        RawShape(shape.leaf_bits, shape.fanout_bits)
    }
}

impl Default for TreeShape {
    fn default() -> Self {
        TreeShape::DEFAULT
    }
}

impl TreeShape {
    /// 4096 leaves, fanout 16: three levels of inner nodes (1 + 16 + 256), 34 KiB a tree.
    pub const DEFAULT: TreeShape = TreeShape {
        leaf_bits: 12,
        fanout_bits: 4,
    };

    pub fn new(leaf_bits: u8, fanout_bits: u8) -> Result<Self, ShapeError> {
        if !(MIN_LEAF_BITS..=MAX_LEAF_BITS).contains(&leaf_bits) {
            return Err(ShapeError::LeafBits(leaf_bits));
        }
        if fanout_bits == 0
            || fanout_bits > MAX_FANOUT_BITS
            || !leaf_bits.is_multiple_of(fanout_bits)
        {
            return Err(ShapeError::FanoutBits {
                leaf_bits,
                fanout_bits,
            });
        }
        Ok(TreeShape {
            leaf_bits,
            fanout_bits,
        })
    }

    pub fn leaf_bits(&self) -> u8 {
        self.leaf_bits
    }

    pub fn fanout_bits(&self) -> u8 {
        self.fanout_bits
    }

    pub fn leaves(&self) -> u32 {
        1 << self.leaf_bits
    }

    pub fn fanout(&self) -> u32 {
        1 << self.fanout_bits
    }

    /// Levels below the root; the leaves sit at this depth.
    pub fn depth(&self) -> u8 {
        self.leaf_bits / self.fanout_bits
    }

    /// Number of nodes at `depth` (0 = the root).
    pub fn width(&self, depth: u8) -> u32 {
        1 << (u32::from(self.fanout_bits) * u32::from(depth.min(self.depth())))
    }

    /// Segments (leaves) below one node at `depth`.
    pub fn segments_per_node(&self, depth: u8) -> u32 {
        self.leaves() / self.width(depth)
    }

    /// The segments below node `index` at `depth` (contiguous), or `None` when there is no
    /// such node.
    pub fn node_segments(&self, depth: u8, index: u32) -> Option<std::ops::Range<Segment>> {
        if depth > self.depth() || index >= self.width(depth) {
            return None;
        }
        let per_node = self.segments_per_node(depth);
        Some(index * per_node..(index + 1) * per_node)
    }

    /// Inner nodes (every level above the leaves).
    pub fn inner_nodes(&self) -> usize {
        (0..self.depth()).map(|d| self.width(d) as usize).sum()
    }

    /// Bytes a tree of this shape occupies in memory, whatever it holds.
    pub fn memory_bytes(&self) -> usize {
        let hashes = (self.leaves() as usize + self.inner_nodes()) * 8;
        let dirty: usize = (0..self.depth())
            .map(|d| (self.width(d) as usize).div_ceil(64) * 8)
            .sum();
        hashes + dirty + std::mem::size_of::<MerkleTree>()
    }
}

/// The keyed hash of one stored object, the unit a leaf is made of.
///
/// It covers the bucket, the key and [`crate::version::Object::digest`] (causal metadata and
/// value hashes), keyed with a per-cluster key so that trees of different clusters never
/// agree by accident. An item hash is never 0, so every item changes its leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemHasher {
    key: u64,
}

impl ItemHasher {
    pub fn new(cluster_key: u64) -> Self {
        ItemHasher { key: cluster_key }
    }

    /// Derives the key from the cluster's shared secret (or its name).
    pub fn from_cluster_secret(secret: &[u8]) -> Self {
        ItemHasher {
            key: xxh3_64_with_seed(secret, 0x6d65_6e64_6b76_6165),
        }
    }

    /// A fingerprint of the key, stored with persisted trees so that a tree built under
    /// another key is never loaded.
    pub fn fingerprint(&self) -> u64 {
        xxh3_64_with_seed(b"mendkv item hasher fingerprint", self.key)
    }

    pub fn item_hash(&self, bucket: &str, key: &[u8], digest: u64) -> u64 {
        // Bucket names cannot contain NUL, so `bucket \0 key digest` is unambiguous.
        let len = bucket.len() + 1 + key.len() + 8;
        let hash = if len <= 256 {
            let mut buffer = [0u8; 256];
            buffer[..bucket.len()].copy_from_slice(bucket.as_bytes());
            let key_at = bucket.len() + 1;
            buffer[key_at..key_at + key.len()].copy_from_slice(key);
            buffer[key_at + key.len()..len].copy_from_slice(&digest.to_le_bytes());
            xxh3_64_with_seed(&buffer[..len], self.key)
        } else {
            let mut hasher = Xxh3::with_seed(self.key);
            hasher.update(bucket.as_bytes());
            hasher.update(&[0]);
            hasher.update(key);
            hasher.update(&digest.to_le_bytes());
            hasher.digest()
        };
        hash.max(1)
    }

    pub fn object_hash(&self, bucket: &str, key: &[u8], object: &crate::version::Object) -> u64 {
        self.item_hash(bucket, key, object.digest())
    }
}

/// One token range's tree. See the module documentation.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    range: TokenRange,
    shape: TreeShape,
    /// Tokens per segment; the last used segment may be shorter.
    segment_span: u64,
    /// Tokens in the range (2^64 for the whole ring).
    range_span: u128,
    /// `levels[0]` is the root, `levels[depth]` the leaves.
    levels: Vec<Vec<u64>>,
    /// One bit per inner node (levels `0..depth`); a dirty node's ancestors are dirty too.
    dirty: Vec<Vec<u64>>,
    any_dirty: bool,
}

impl MerkleTree {
    /// An empty tree (every hash 0).
    pub fn new(range: TokenRange, shape: TreeShape) -> Self {
        let range_span: u128 = if range.start == range.end {
            1 << 64
        } else {
            u128::from(range.end.wrapping_sub(range.start))
        };
        let leaves = u128::from(shape.leaves());
        let segment_span = range_span.div_ceil(leaves) as u64;
        let levels = (0..=shape.depth())
            .map(|d| vec![0u64; shape.width(d) as usize])
            .collect();
        let dirty = (0..shape.depth())
            .map(|d| vec![0u64; (shape.width(d) as usize).div_ceil(64)])
            .collect();
        MerkleTree {
            range,
            shape,
            segment_span,
            range_span,
            levels,
            dirty,
            any_dirty: false,
        }
    }

    /// A tree from its leaves (as persisted); inner nodes are recomputed on first read.
    pub fn from_leaves(range: TokenRange, shape: TreeShape, leaves: Vec<u64>) -> Option<Self> {
        if leaves.len() != shape.leaves() as usize {
            return None;
        }
        let mut tree = MerkleTree::new(range, shape);
        let depth = usize::from(shape.depth());
        tree.levels[depth] = leaves;
        for (level, bits) in tree.dirty.iter_mut().enumerate() {
            let width = shape.width(level as u8) as usize;
            for (w, word) in bits.iter_mut().enumerate() {
                let valid = width - w * 64;
                *word = if valid >= 64 {
                    u64::MAX
                } else {
                    (1u64 << valid) - 1
                };
            }
        }
        tree.any_dirty = true;
        Some(tree)
    }

    pub fn range(&self) -> TokenRange {
        self.range
    }

    pub fn shape(&self) -> TreeShape {
        self.shape
    }

    pub fn memory_bytes(&self) -> usize {
        self.shape.memory_bytes()
    }

    /// The segment of a token, or `None` when the token is outside the range.
    pub fn segment_of(&self, token: Token) -> Option<Segment> {
        if !self.range.contains(token) {
            return None;
        }
        let offset = token.wrapping_sub(self.range.start).wrapping_sub(1);
        Some((offset / self.segment_span) as Segment)
    }

    /// The tokens of a segment, `(start, end]`; `None` when the segment holds no token (a
    /// range narrower than the number of leaves) or does not exist.
    pub fn segment_tokens(&self, segment: Segment) -> Option<TokenRange> {
        if segment >= self.shape.leaves() {
            return None;
        }
        let low = u128::from(segment) * u128::from(self.segment_span);
        if low >= self.range_span {
            return None;
        }
        let high = (low + u128::from(self.segment_span)).min(self.range_span);
        // Offsets [low, high) are the tokens (start + low, start + high]; truncating 2^64 to
        // 0 is the wrapping arithmetic we want.
        Some(TokenRange {
            start: self.range.start.wrapping_add(low as u64),
            end: self.range.start.wrapping_add(high as u64),
        })
    }

    /// Applies one write to its segment's leaf: `old` (the item hash before the write, if the
    /// key existed) out, `new` (after, if it still exists) in.
    ///
    /// # Panics
    /// When `segment` is not a leaf of this shape (a bug in the caller).
    pub fn update(&mut self, segment: Segment, old: Option<u64>, new: Option<u64>) {
        let depth = usize::from(self.shape.depth());
        let leaves = &mut self.levels[depth];
        assert!(
            (segment as usize) < leaves.len(),
            "segment {segment} out of range"
        );
        let delta = old.unwrap_or(0) ^ new.unwrap_or(0);
        if delta == 0 {
            return;
        }
        leaves[segment as usize] ^= delta;
        let fanout_bits = u32::from(self.shape.fanout_bits);
        for level in (0..depth).rev() {
            let index = (segment >> (fanout_bits * (depth - level) as u32)) as usize;
            let word = &mut self.dirty[level][index / 64];
            let bit = 1u64 << (index % 64);
            if *word & bit != 0 {
                break;
            }
            *word |= bit;
        }
        self.any_dirty = true;
    }

    /// Recomputes every dirty inner node, bottom-up, from its children.
    pub fn refresh(&mut self) {
        if !self.any_dirty {
            return;
        }
        let fanout = self.shape.fanout() as usize;
        for level in (0..usize::from(self.shape.depth())).rev() {
            let (upper, lower) = self.levels.split_at_mut(level + 1);
            let parents = &mut upper[level];
            let children = &lower[0];
            for (w, word) in self.dirty[level].iter_mut().enumerate() {
                let mut bits = std::mem::take(word);
                while bits != 0 {
                    let index = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    parents[index] = combine(&children[index * fanout..(index + 1) * fanout]);
                }
            }
        }
        self.any_dirty = false;
    }

    pub fn is_dirty(&self) -> bool {
        self.any_dirty
    }

    pub fn root(&mut self) -> u64 {
        self.refresh();
        self.levels[0][0]
    }

    /// The hash of node `index` at `depth` (0 = root, `shape.depth()` = leaves).
    pub fn node(&mut self, depth: u8, index: u32) -> Option<u64> {
        self.refresh();
        self.levels
            .get(usize::from(depth))
            .and_then(|level| level.get(index as usize))
            .copied()
    }

    /// The hashes of the children of node `parent` at `depth`.
    pub fn children(&mut self, depth: u8, parent: u32) -> Option<&[u64]> {
        if depth >= self.shape.depth() || parent >= self.shape.width(depth) {
            return None;
        }
        self.refresh();
        let fanout = self.shape.fanout() as usize;
        let start = parent as usize * fanout;
        Some(&self.levels[usize::from(depth) + 1][start..start + fanout])
    }

    /// The leaves; always current (only inner nodes are computed lazily).
    pub fn leaves(&self) -> &[u64] {
        &self.levels[usize::from(self.shape.depth())]
    }

    /// Empties the tree (before a rebuild).
    pub fn clear(&mut self) {
        *self = MerkleTree::new(self.range, self.shape);
    }

    /// The leaves where two trees of the same range and shape differ, found by descending
    /// from the root (a local comparison, for tests and tools).
    pub fn diff_leaves(&mut self, other: &mut MerkleTree) -> Vec<Segment> {
        assert_eq!((self.range, self.shape), (other.range, other.shape));
        self.refresh();
        other.refresh();
        let fanout = self.shape.fanout();
        let mut frontier: Vec<u32> = if self.levels[0][0] != other.levels[0][0] {
            vec![0]
        } else {
            Vec::new()
        };
        for depth in 1..=usize::from(self.shape.depth()) {
            frontier = frontier
                .iter()
                .flat_map(|p| p * fanout..(p + 1) * fanout)
                .filter(|&i| self.levels[depth][i as usize] != other.levels[depth][i as usize])
                .collect();
        }
        frontier
    }

    /// The persisted form: a header, the leaves (dense, or sparse when mostly empty) and a
    /// checksum. Inner nodes are not stored; they are recomputed on load.
    pub fn encode(&self, key_fingerprint: u64) -> Vec<u8> {
        let leaves = self.leaves();
        let nonzero = leaves.iter().filter(|&&h| h != 0).count();
        let sparse = nonzero * 12 < leaves.len() * 8;
        let mut out = Vec::with_capacity(
            40 + if sparse {
                nonzero * 12
            } else {
                leaves.len() * 8
            },
        );
        out.extend_from_slice(ENCODING_MAGIC);
        out.push(self.shape.leaf_bits);
        out.push(self.shape.fanout_bits);
        out.extend_from_slice(&self.range.start.to_le_bytes());
        out.extend_from_slice(&self.range.end.to_le_bytes());
        out.extend_from_slice(&key_fingerprint.to_le_bytes());
        if sparse {
            out.push(1);
            out.extend_from_slice(&(nonzero as u32).to_le_bytes());
            for (i, h) in leaves.iter().enumerate().filter(|(_, &h)| h != 0) {
                out.extend_from_slice(&(i as u32).to_le_bytes());
                out.extend_from_slice(&h.to_le_bytes());
            }
        } else {
            out.push(0);
            for h in leaves {
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        let checksum = xxh3_64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Loads a persisted tree; refuses a corrupt one or one built under another item key.
    pub fn decode(bytes: &[u8], key_fingerprint: u64) -> Result<MerkleTree, TreeDecodeError> {
        let body_len = bytes
            .len()
            .checked_sub(8)
            .ok_or(TreeDecodeError::Truncated)?;
        let (body, checksum) = bytes.split_at(body_len);
        if xxh3_64(body).to_le_bytes() != checksum {
            return Err(TreeDecodeError::Checksum);
        }
        let mut reader = Reader(body);
        if reader.take(4)? != ENCODING_MAGIC {
            return Err(TreeDecodeError::Magic);
        }
        let shape = TreeShape::new(reader.u8()?, reader.u8()?)?;
        let range = TokenRange {
            start: reader.u64()?,
            end: reader.u64()?,
        };
        if reader.u64()? != key_fingerprint {
            return Err(TreeDecodeError::OtherKey);
        }
        let count = shape.leaves() as usize;
        let mut leaves = vec![0u64; count];
        match reader.u8()? {
            0 => {
                for leaf in &mut leaves {
                    *leaf = reader.u64()?;
                }
            }
            1 => {
                let nonzero = reader.u32()? as usize;
                for _ in 0..nonzero {
                    let index = reader.u32()? as usize;
                    let leaf = leaves.get_mut(index).ok_or(TreeDecodeError::Corrupt)?;
                    *leaf = reader.u64()?;
                }
            }
            _ => return Err(TreeDecodeError::Corrupt),
        }
        if !reader.0.is_empty() {
            return Err(TreeDecodeError::Corrupt);
        }
        MerkleTree::from_leaves(range, shape, leaves).ok_or(TreeDecodeError::Corrupt)
    }
}

const ENCODING_MAGIC: &[u8; 4] = b"MKT1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeDecodeError {
    #[error("persisted tree is truncated; rebuild it from the data")]
    Truncated,
    #[error("persisted tree fails its checksum; rebuild it from the data")]
    Checksum,
    #[error("not a persisted tree (bad magic)")]
    Magic,
    #[error("persisted tree is malformed; rebuild it from the data")]
    Corrupt,
    #[error("persisted tree was built under another cluster key; rebuild it from the data")]
    OtherKey,
    #[error("persisted tree has an invalid shape: {0}")]
    Shape(#[from] ShapeError),
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TreeDecodeError> {
        if self.0.len() < n {
            return Err(TreeDecodeError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, TreeDecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, TreeDecodeError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, TreeDecodeError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
}

/// An inner node's hash: 0 when every child is 0 (an empty subtree), else the hash of the
/// children in order.
fn combine(children: &[u64]) -> u64 {
    if children.iter().all(|&h| h == 0) {
        return 0;
    }
    let mut buffer = [0u8; 8 << MAX_FANOUT_BITS];
    for (chunk, h) in buffer.chunks_exact_mut(8).zip(children) {
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    xxh3_64(&buffer[..children.len() * 8]).max(1)
}
