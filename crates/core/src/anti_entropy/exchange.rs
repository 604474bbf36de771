//! The anti-entropy exchange between two replicas of one token range: the *driver* (the node
//! that starts it) and the *receiver* (its peer). Both are sans-IO: messages in, messages and
//! repair writes out.
//!
//! # Protocol
//! 1. `Compare`: the driver sends its root. Equal roots end the exchange (`InSync`): one
//!    round trip and a few dozen bytes for a range in sync, and no data is read.
//! 2. Otherwise the receiver answers with the hashes of the root's children, and the driver
//!    descends one whole level per round trip (`Descend`): it names every mismatched node of
//!    the level in one message and gets the hashes of all their children back.
//! 3. For the mismatched leaves (segments), in batches, the receiver sends one short hash per
//!    item (`Items`); the driver compares them with its own items of the same segments. Items
//!    only the driver has are pushed, items only the receiver has are pulled (`Transfer`),
//!    so exactly the keys that differ move, each object in the direction(s) it is missing.
//!    Both sides merge what they get (the caller applies [`RepairObject`]s with
//!    [`crate::version::Object::merge`]), so both end with the causal join; tombstones travel
//!    like values.
//!
//!    **Coded reconciliation** replaces the rest of the descent and the item lists when a
//!    level's count of mismatches is informative (not every node compared mismatched) and the
//!    mismatched nodes cover at most `coded_max_segments` segments: the driver estimates the
//!    keys that differ below them (balls in bins, `n ln(n / (n - m))`), asks for that many
//!    coded symbols times `coded_symbols_per_hundred_keys` (`Symbols`) of the rateless IBLT
//!    ([`super::coded`]) of the short hashes of every item below those nodes, subtracts its
//!    own and peels. A prefix too short is extended (`Symbols` from where it ended, up to
//!    `coded_extensions` times); past that, or on a decode that names an item of the driver
//!    it does not hold, the driver descends from the same nodes as if coding had not been
//!    tried (the rest of that pass descends). Decoded items of the driver are pushed,
//!    the receiver's wanted by short hash below the nodes (`CodedWant`); a short hash two
//!    of the driver's items share sends their segments through the item lists. Bytes then
//!    follow the number of differences (5 bytes a symbol by default, ~1.4-2 symbols a
//!    difference), not the tree's width, at the price of scanning every item below the
//!    coded nodes (once
//!    on the driver, which keeps their short hashes for extensions and rescans only the
//!    segments of decoded items; once per request on the receiver).
//!
//!    With `coded_in_compare` (the default) coding starts in the first request: the driver
//!    sends `CompareCoded`, its root and its level-1 short hashes, and the receiver, which
//!    then knows which children differ, answers `CodedSymbols` (the differing children and
//!    the first symbols below them) in the same round trip, or declines with the
//!    children alone (every child differs, or the driver's `CodedAsk` bounds on segments
//!    and items are exceeded: it stops scanning at `max_items`), and the driver descends.
//!    `coded_max_items` bounds deeper levels too: the driver scans its own items first and
//!    descends past the bound, before asking anything.
//! 4. `Verify`: the driver asks for the receiver's root and compares it with its own. If they
//!    still differ (a write landed meanwhile, or a short hash collided), another pass runs
//!    with a fresh salt, up to `max_passes`.
//!
//! # Short hashes
//! Below the root, hashes travel truncated to a few bytes, after mixing with a salt that
//! changes every pass. Truncation can only hide a difference, never invent one: a node (or an
//! item) whose short hash differs really differs, so no key moves that is not different. A
//! hidden difference leaves the roots different at `Verify`, and the next pass, with another
//! salt, finds it.
//!
//! The receiver keeps no state between requests: every request names the range, the shape and
//! the salt, so a driver that vanishes costs the receiver nothing.

use super::coded::{self, Symbol};
use super::merkle::{ItemHasher, MerkleTree, Segment, TreeShape, MAX_LEAF_BITS};
use super::range_trees::RangeTrees;
use crate::request::{validate_bucket, validate_key};
use crate::ring::{key_token, TokenRange};
use crate::storage::StorageError;
use crate::version::Object;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// What the node provides over its storage: the objects of one segment (a token-range scan)
/// and single objects.
pub trait SegmentSource {
    /// Every object stored whose key token is in `tokens` (one segment of a tree), with its
    /// [`Object::digest`]. Order does not matter.
    fn segment_items(&self, tokens: TokenRange) -> Result<Vec<SegmentItem>, StorageError>;
    /// The stored object of a key.
    fn object(&self, bucket: &str, key: &[u8]) -> Result<Option<Object>, StorageError>;
    /// Hands every object stored in `tokens` to `each` until it returns false. The default
    /// looks each item up by key; a source that scans whole objects overrides it with one
    /// pass (a receiver answering `SegmentObjects` reads each object once).
    fn segment_objects(
        &self,
        tokens: TokenRange,
        each: &mut dyn FnMut(RepairObject) -> bool,
    ) -> Result<(), StorageError> {
        for item in self.segment_items(tokens)? {
            if let Some(object) = self.object(&item.bucket, &item.key)? {
                let more = each(RepairObject {
                    bucket: item.bucket,
                    key: item.key,
                    object,
                });
                if !more {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentItem {
    pub bucket: String,
    pub key: Vec<u8>,
    pub digest: u64,
}

/// An object travelling in an exchange; for the caller, one object to merge into storage
/// (`local.merge(&object)`, then record the change in its trees).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairObject {
    pub bucket: String,
    pub key: Vec<u8>,
    pub object: Object,
}

/// Chosen by the driver, unique among its exchanges in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExchangeId(pub u64);

/// How hashes below the root are shortened in this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub salt: u32,
    /// Bytes per tree-node hash (1..=8).
    pub node_hash_bytes: u8,
    /// Bytes per item hash (1..=8).
    pub item_hash_bytes: u8,
}

/// Driver -> receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeRequest {
    pub exchange: ExchangeId,
    /// Numbers the driver's requests; the answer echoes it, so a duplicated or late answer
    /// is recognised and ignored.
    pub seq: u32,
    pub range: TokenRange,
    pub shape: TreeShape,
    pub probe: Probe,
    pub body: RequestBody,
    /// When set, only this bucket's keys are compared (`mendkv repair --bucket`): both
    /// sides run the exchange over trees built from a scan of the range filtered to the
    /// bucket, instead of the maintained per-range trees.
    pub bucket: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// The driver's root (full 64 bits). Answered by `InSync` or the root's children.
    Compare { root: [u8; 8] },
    /// The hashes of every child of `parents` (nodes at `depth`).
    Descend { depth: u8, parents: SortedIndices },
    /// One short hash per item of each segment.
    Items { segments: SortedIndices },
    /// Coded symbols `from..from + count` of the rateless IBLT ([`super::coded`]) of the
    /// short hashes of every item below `nodes` (at `depth`): the set reconciliation that
    /// replaces the descent below `depth` and the item lists.
    Symbols {
        depth: u8,
        nodes: SortedIndices,
        from: u32,
        count: u32,
    },
    /// Objects to merge, and the items (by short hash) the driver wants back.
    Transfer {
        objects: Vec<RepairObject>,
        want: Vec<SegmentWant>,
        /// Items found by decoding coded symbols: the driver knows their short hashes, not
        /// their segments.
        coded_want: Option<CodedWant>,
    },
    /// The receiver's root (after the merges of this pass).
    Verify,
    /// `Compare` that starts coding at once: the driver's root and the short hashes of the
    /// root's children. The receiver answers `InSync`, or `CodedSymbols`: the children that
    /// differ and, when `ask` allows coding them, the first symbols of the items below them.
    /// Saves the `Symbols` request that would follow and its round trip, and the children's
    /// hashes travel one way instead of back, for `node_hash_bytes` per child more when the
    /// range is in sync. (Added after the other variants: their encoding is unchanged.)
    CompareCoded {
        root: [u8; 8],
        children: Vec<u8>,
        ask: CodedAsk,
    },
    /// Every object of each segment, for segments where the driver holds nothing (a
    /// joiner streaming a range it gains, a wiped replica): the receiver reads each object
    /// once and sends it, instead of listing short hashes for the driver to want back, which
    /// costs it a round trip, a second scan and a lookup per key. (Added after the other
    /// variants: their encoding is unchanged.)
    SegmentObjects { segments: SortedIndices },
}

/// The driver's coding bounds, for a receiver that decides itself whether to code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodedAsk {
    /// Symbols sent per hundred keys estimated to differ.
    pub symbols_per_hundred_keys: u32,
    /// At most this many symbols.
    pub max_symbols: u32,
    /// Code only if the differing children cover at most this many segments.
    pub max_segments: u32,
    /// Code only if at most this many items lie below them (0: no bound); the receiver
    /// stops scanning past it and answers the children's hashes instead.
    pub max_items: u32,
}

/// Items of one segment the driver wants, by short hash (packed, `item_hash_bytes` each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentWant {
    pub segment: Segment,
    pub hashes: Vec<u8>,
}

/// Items the driver wants somewhere below `nodes` (at `depth`), by short hash (packed,
/// `item_hash_bytes` each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodedWant {
    pub depth: u8,
    pub nodes: SortedIndices,
    pub hashes: Vec<u8>,
}

/// Receiver -> driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeResponse {
    pub exchange: ExchangeId,
    /// The `seq` of the request answered.
    pub seq: u32,
    pub body: ResponseBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    InSync,
    /// Short hashes of the children (at `depth`) of the requested parents, in order, packed.
    Hashes {
        depth: u8,
        hashes: Vec<u8>,
    },
    /// Answer to `Verify`: the full root.
    Root {
        root: [u8; 8],
    },
    /// Items of the first `counts.len()` requested segments (the rest did not fit: ask
    /// again), `counts[i]` short hashes each, packed.
    Items {
        counts: Vec<u32>,
        hashes: Vec<u8>,
    },
    /// The requested coded symbols, packed (`item_hash_bytes` + 2 bytes each).
    Symbols {
        from: u32,
        symbols: Vec<u8>,
    },
    /// The wanted objects; `complete` is false when the answer hit its size limit before
    /// every wanted item was in (the driver asks again for the rest).
    Objects {
        objects: Vec<RepairObject>,
        complete: bool,
    },
    Refused(Refusal),
    /// Answer to `CompareCoded`: the root's children that differ (a bitmap, one bit per
    /// child, low bit first) and the first coded symbols of the items below them, packed;
    /// none when the receiver declined to code them (every child differs, or too many
    /// segments or items below them): the driver descends from those children.
    /// (Added after the other variants: their encoding is unchanged.)
    CodedSymbols {
        nodes: Vec<u8>,
        symbols: Vec<u8>,
    },
    /// Answer to `SegmentObjects`: every object of the first `done` requested segments, whole
    /// segments only, as many as fit in the answer's size limit. `done` is 0 when the first
    /// segment alone does not fit: the driver lists that one's items instead, whose objects
    /// then come in bounded answers.
    SegmentObjects {
        done: u32,
        objects: Vec<RepairObject>,
    },
}

/// Why a receiver refused a request; the driver gives up on the exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the peer does not replicate this range (ring views differ); retry later")]
    UnknownRange,
    #[error("the peer's trees have another shape ({ours:?}); configure the same shape")]
    ShapeMismatch { ours: TreeShape },
    #[error("the peer's tree for this range is being rebuilt; retry later")]
    TreeNotReady,
    #[error("the peer is too busy for repair now (circuit breaker open); retry later")]
    Busy,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the peer's storage failed: {0}")]
    Storage(String),
}

/// Strictly increasing indices, sent as gaps (small varints).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SortedIndices(Vec<u32>);

impl SortedIndices {
    /// # Panics
    /// When `indices` is not strictly increasing (a bug in the caller).
    pub fn from_sorted(indices: &[u32]) -> Self {
        let mut gaps = Vec::with_capacity(indices.len());
        let mut previous = None;
        for &i in indices {
            gaps.push(match previous {
                None => i,
                Some(p) => {
                    assert!(i > p, "indices must be strictly increasing");
                    i - p
                }
            });
            previous = Some(i);
        }
        SortedIndices(gaps)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The indices, checked: strictly increasing and below `bound`.
    pub fn decode(&self, bound: u32) -> Result<Vec<u32>, String> {
        if self.0.len() > bound as usize {
            return Err(format!("{} indices, at most {bound}", self.0.len()));
        }
        let mut out = Vec::with_capacity(self.0.len());
        let mut previous: Option<u32> = None;
        for &gap in &self.0 {
            let index = match previous {
                None => gap,
                Some(_) if gap == 0 => return Err("indices not strictly increasing".into()),
                Some(p) => p.checked_add(gap).ok_or("index overflows")?,
            };
            if index >= bound {
                return Err(format!("index {index} out of bounds ({bound})"));
            }
            out.push(index);
            previous = Some(index);
        }
        Ok(out)
    }
}

impl ExchangeRequest {
    /// Bytes on the wire (postcard), for stats and the rate limiter.
    pub fn encoded_len(&self) -> usize {
        postcard::experimental::serialized_size(self).unwrap_or(0)
    }
}

impl ExchangeResponse {
    pub fn encoded_len(&self) -> usize {
        postcard::experimental::serialized_size(self).unwrap_or(0)
    }
}

/// A hash mixed with the pass's salt and cut to its top `bytes` bytes.
fn short_hash(hash: u64, salt: u32, bytes: u8) -> u64 {
    let mixed = xxh3_64_with_seed(&hash.to_le_bytes(), u64::from(salt));
    mixed >> (64 - 8 * u32::from(bytes))
}

fn pack(out: &mut Vec<u8>, short: u64, bytes: u8) {
    out.extend_from_slice(&short.to_le_bytes()[..usize::from(bytes)]);
}

fn unpack(packed: &[u8], bytes: u8) -> impl Iterator<Item = u64> + '_ {
    packed.chunks_exact(usize::from(bytes)).map(|chunk| {
        let mut full = [0u8; 8];
        full[..chunk.len()].copy_from_slice(chunk);
        u64::from_le_bytes(full)
    })
}

fn valid_width(bytes: u8) -> bool {
    (1..=8).contains(&bytes)
}

/// Why an object that came from the network was not merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidObject {
    #[error(transparent)]
    Request(#[from] crate::request::InvalidRequest),
    #[error("object outside the range")]
    OutsideRange,
    #[error("object breaks the version invariants")]
    BrokenVersions,
}

/// Checks an object that came from the network before anyone merges it.
fn check_object(range: TokenRange, item: &RepairObject) -> Result<(), InvalidObject> {
    validate_bucket(&item.bucket)?;
    validate_key(&item.key)?;
    if !range.contains(key_token(&item.bucket, &item.key)) {
        return Err(InvalidObject::OutsideRange);
    }
    let rebuilt = Object::from_parts(
        item.object.context().clone(),
        item.object.siblings().to_vec(),
    );
    if rebuilt.as_ref() != Some(&item.object) {
        return Err(InvalidObject::BrokenVersions);
    }
    Ok(())
}

// ----- statistics ---------------------------------------------------------------------

/// What one exchange did (add them up per repair run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeStats {
    pub ranges_compared: u64,
    pub passes: u64,
    pub round_trips: u64,
    /// Tree-node hashes compared below the root.
    pub nodes_compared: u64,
    pub leaves_mismatched: u64,
    /// Items (key, version digest) compared in mismatched segments, both sides.
    pub keys_compared: u64,
    /// Distinct keys found to differ (over all passes).
    pub keys_different: u64,
    /// Distinct keys for which an object moved (either way, over all passes).
    pub keys_moved: u64,
    /// Coded symbols received (set reconciliation below a mismatched node).
    pub coded_symbols: u64,
    /// Coded reconciliations that did not decode within their symbol budget and fell back
    /// to the descent.
    pub coded_fallbacks: u64,
    pub objects_pushed: u64,
    pub objects_pulled: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The share of the bytes that is value payload (the rest is metadata).
    pub value_bytes_sent: u64,
    pub value_bytes_received: u64,
}

impl ExchangeStats {
    pub fn add(&mut self, other: &ExchangeStats) {
        self.ranges_compared += other.ranges_compared;
        self.passes += other.passes;
        self.round_trips += other.round_trips;
        self.nodes_compared += other.nodes_compared;
        self.leaves_mismatched += other.leaves_mismatched;
        self.keys_compared += other.keys_compared;
        self.keys_different += other.keys_different;
        self.keys_moved += other.keys_moved;
        self.coded_symbols += other.coded_symbols;
        self.coded_fallbacks += other.coded_fallbacks;
        self.objects_pushed += other.objects_pushed;
        self.objects_pulled += other.objects_pulled;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.value_bytes_sent += other.value_bytes_sent;
        self.value_bytes_received += other.value_bytes_received;
    }

    /// Bytes that were not value payload, both ways.
    pub fn metadata_bytes(&self) -> u64 {
        (self.bytes_sent + self.bytes_received)
            .saturating_sub(self.value_bytes_sent + self.value_bytes_received)
    }
}

// ----- driver side --------------------------------------------------------------------

/// Knobs of the driver side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeConfig {
    /// Bytes per tree-node hash below the root (1..=8). Fewer bytes, fewer bytes on the wire;
    /// a collision (odds 2^-8n per differing node compared) only costs another pass. The
    /// default, 2, halves the bytes of the descent against 4 and costs an extra pass in
    /// about one repair of the whole node in twenty.
    pub node_hash_bytes: u8,
    /// Bytes per item hash (1..=8), in item lists, wants and coded symbols. A collision can
    /// hide a difference (found by the next pass, with another salt) or make the receiver
    /// send an object too many (another key with the same short hash), which the driver
    /// drops as it holds it already: neither moves a key that does not differ. The
    /// default, 3, keeps collisions rare below a coded level-1 node of ~15,000 items
    /// (about one item in 1,100 shares its short hash) for 1 byte less per symbol and item.
    pub item_hash_bytes: u8,
    /// Segments whose items are asked for in one request.
    pub max_segments_per_request: usize,
    /// Value bytes pushed in one `Transfer` (at least one object goes).
    pub max_push_bytes: usize,
    /// Items asked back in one `Transfer`.
    pub max_wanted_per_request: usize,
    /// Passes (compare, descend, transfer, verify) before giving up on convergence.
    pub max_passes: u32,
    /// Set reconciliation: when the mismatched nodes of a level below the root cover at most
    /// this many segments, and the level's count of mismatches says how many keys differ
    /// (not every node compared mismatched), the driver asks for coded symbols of their items
    /// instead of descending further. Bytes then follow the number of differences, not the
    /// tree's width, but both sides scan every item below those nodes. 0 never codes.
    pub coded_max_segments: u32,
    /// Coded symbols asked for first, per hundred keys estimated to differ (a key differs
    /// by one or two items, and a difference takes about 1.35-2 symbols to decode).
    pub coded_symbols_per_hundred_keys: u32,
    /// Requests for more symbols when the first prefix does not decode, before falling back
    /// to the descent.
    pub coded_extensions: u32,
    /// Symbols of one reconciliation, at most (the prefix stops growing there).
    pub coded_max_symbols: u32,
    /// Items below the coded nodes, at most, on either side (0: no bound): past it the
    /// driver descends instead. The receiver stops its scan there for `CompareCoded`; the
    /// driver scans its own items first for deeper levels. Bounds the scan of a coded
    /// attempt to about (3 + `coded_extensions`) times this many items.
    pub coded_max_items: u32,
    /// Starts coding in the first request (`CompareCoded`, the driver's level-1 hashes with
    /// its root) instead of after the receiver's level-1 hashes: one request and round trip
    /// fewer per divergent range, 2 bytes per child more per range in sync.
    pub coded_in_compare: bool,
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        ExchangeConfig {
            node_hash_bytes: 2,
            item_hash_bytes: 3,
            max_segments_per_request: 512,
            max_push_bytes: 1 << 20,
            max_wanted_per_request: 256,
            max_passes: 3,
            coded_max_segments: 1 << MAX_LEAF_BITS,
            coded_symbols_per_hundred_keys: 300,
            coded_extensions: 2,
            coded_max_symbols: 1 << 16,
            coded_max_items: 0,
            coded_in_compare: true,
        }
    }
}

impl ExchangeConfig {
    /// Coding only where its scan stays small: below mismatched nodes covering at most 512
    /// segments (an eighth of a default tree) and at most 4,096 items on either side;
    /// elsewhere the descent and item lists, whose scans follow the differences. For links
    /// where bytes are dear; nodes run coding off (`coded_max_segments: 0`): on a LAN the
    /// bytes it saves cost less than the items it reads (docs/benchmarks.md, 2026-12-02
    /// evening).
    pub fn bounded_coding() -> Self {
        ExchangeConfig {
            coded_max_segments: 512,
            coded_max_items: 4096,
            ..ExchangeConfig::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("this node has no tree for the range (ring changed); drop the exchange")]
    NoLocalTree,
    #[error("the peer refused: {0}")]
    Refused(Refusal),
    #[error("the peer answered out of turn")]
    UnexpectedResponse,
    #[error("the peer's answer is malformed: {0}")]
    InvalidResponse(String),
    #[error("local storage failed: {0}")]
    Storage(#[from] StorageError),
    #[error("the exchange timed out or the peer went away")]
    Aborted,
}

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeOutcome {
    /// Both roots are equal at the end.
    Converged,
    /// Roots still differ after `max_passes` (writes kept landing); the next run retries.
    Diverged,
    Failed(ExchangeError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeReport {
    pub exchange: ExchangeId,
    pub range: TokenRange,
    pub outcome: ExchangeOutcome,
    pub stats: ExchangeStats,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverStep {
    Send(ExchangeRequest),
    Finished(ExchangeReport),
    /// The answer was not the one awaited (duplicated, late, or for another exchange) and
    /// was ignored; keep waiting for the right one (or abort on timeout).
    Ignored,
}

/// What a response produced: objects to merge into local storage (apply them before handling
/// the next response), then the next request or the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverOutput {
    pub writes: Vec<RepairObject>,
    pub step: DriverStep,
}

#[derive(Debug)]
enum DriverState {
    Ready,
    AwaitRoot,
    /// Hashes of the children (at `depth`) of `parents` were asked for.
    AwaitHashes {
        depth: u8,
        parents: Vec<u32>,
    },
    AwaitItems {
        requested: Vec<Segment>,
        remaining: VecDeque<Segment>,
    },
    /// Coded symbols of the items below `nodes` (at `depth`) were asked for; `received`
    /// holds the prefix so far, `asked` the count in flight.
    AwaitSymbols(Coding),
    AwaitObjects {
        transfer: Transfer,
        remaining: VecDeque<Segment>,
    },
    /// Whole segments' objects were asked for (segments the driver holds nothing in).
    AwaitSegmentObjects {
        requested: Vec<Segment>,
        remaining: VecDeque<Segment>,
    },
    AwaitVerify,
    Done,
}

/// A key: bucket and key bytes.
type KeyId = (String, Vec<u8>);

/// Where a wanted item is: in a known segment, or (`None`) somewhere below the nodes of a
/// coded reconciliation.
type Place = Option<Segment>;

/// One batch of segments being repaired.
#[derive(Debug, Default)]
struct Transfer {
    pushes: VecDeque<(String, Vec<u8>)>,
    wants: VecDeque<(Place, u64)>,
    /// Wants named in the `Transfer` in flight (what may come back).
    asked: Vec<(Place, u64)>,
    /// The nodes (depth, indices) of the coded reconciliation the `None` places are in.
    coded: Option<(u8, Vec<u32>)>,
    /// Objects pulled in this batch, so a push the receiver does not need is skipped.
    pulled: BTreeMap<(String, Vec<u8>), Object>,
}

/// A coded reconciliation in progress: the symbols of the items below `nodes` (at
/// `depth`) received so far, the count in flight, and the driver's own short hashes there
/// with their segments (scanned once, then reused for every extension).
#[derive(Debug)]
struct Coding {
    depth: u8,
    nodes: Vec<u32>,
    received: Vec<Symbol>,
    asked: u32,
    extensions: u32,
    own: Option<Vec<(u64, Segment)>>,
}

/// Calls `f` with every item stored below `nodes` (at `depth`) until it returns false,
/// scanning a few segments at a time so memory stays bounded by a small token range, not
/// by what the nodes hold.
fn for_each_item(
    tree: &MerkleTree,
    source: &impl SegmentSource,
    depth: u8,
    nodes: &[u32],
    mut f: impl FnMut(SegmentItem) -> bool,
) -> Result<(), StorageError> {
    const SEGMENTS_PER_SCAN: u32 = 16;
    let shape = tree.shape();
    for &node in nodes {
        let Some(segments) = shape.node_segments(depth, node) else {
            continue;
        };
        let mut first = segments.start;
        while first < segments.end {
            let last = (first + SEGMENTS_PER_SCAN).min(segments.end) - 1;
            let Some(tokens) = run_tokens(tree, first, last) else {
                break;
            };
            for item in source.segment_items(tokens)? {
                if !f(item) {
                    return Ok(());
                }
            }
            first = last + 1;
        }
    }
    Ok(())
}

/// The tokens of segments `first..=last`; `None` when `first` holds none. Segments past
/// the range's end hold no token (a range narrower than the leaves); they are all at the
/// end.
fn run_tokens(tree: &MerkleTree, first: Segment, last: Segment) -> Option<TokenRange> {
    let low = tree.segment_tokens(first)?;
    let high = (first..=last).rev().find_map(|s| tree.segment_tokens(s))?;
    Some(TokenRange {
        start: low.start,
        end: high.end,
    })
}

/// What one object adds to a message, as the answer and push limits count it: its value
/// and context, its key, and a margin for the bucket and framing.
fn answer_bytes(key: &[u8], object: &Object) -> usize {
    object.size_bytes() + key.len() + 64
}

/// The bits a short hash of `bytes` bytes may have set.
fn item_mask(bytes: u8) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * u32::from(bytes))) - 1
    }
}

/// The driver side of one exchange.
#[derive(Debug)]
pub struct ExchangeDriver {
    exchange: ExchangeId,
    range: TokenRange,
    config: ExchangeConfig,
    salt_seed: u64,
    shape: TreeShape,
    pass: u32,
    /// `seq` of the request in flight.
    seq: u32,
    state: DriverState,
    stats: ExchangeStats,
    bucket: Option<String>,
    /// The pass in which a coded reconciliation fell back: the rest of that pass descends
    /// (the failed attempt already cost a round trip; the descent's cost is known).
    coding_failed_in_pass: u32,
    /// Keys moved in this exchange (a key may go both ways, or in two passes, when a
    /// collision of short hashes hid one of its items in the first: count it once).
    moved_keys: BTreeSet<KeyId>,
    /// Keys counted in `keys_different`: each push when it is listed (the driver's item is
    /// not on the receiver), each want only when an object that differs from the driver's
    /// comes back. A wanted short hash proves nothing by itself: a coded decode can name an
    /// item nobody holds (a checksum that matched by chance), and a want answered with
    /// nothing found no difference.
    found_keys: BTreeSet<KeyId>,
    /// A level (in a pass) the receiver declined to code: it is descended.
    no_coding_at: Option<(u32, u8)>,
    /// Segments of this pass the driver's tree says it holds nothing in (a zero leaf):
    /// their objects are asked for whole (`SegmentObjects`), not listed and wanted back.
    empty_here: BTreeSet<Segment>,
    /// This pass went from a level's mismatched nodes, every one empty here, straight to
    /// their segments: those are counted as mismatched leaves once answered with objects.
    descent_skipped: bool,
}

impl ExchangeDriver {
    /// `salt_seed` comes from the node's seeded RNG, so each exchange shortens hashes
    /// differently (a collision never repeats).
    pub fn new(
        exchange: ExchangeId,
        range: TokenRange,
        config: ExchangeConfig,
        salt_seed: u64,
    ) -> Self {
        let mut config = config;
        config.node_hash_bytes = config.node_hash_bytes.clamp(1, 8);
        config.item_hash_bytes = config.item_hash_bytes.clamp(1, 8);
        config.max_segments_per_request = config.max_segments_per_request.max(1);
        config.max_wanted_per_request = config.max_wanted_per_request.max(1);
        config.max_passes = config.max_passes.max(1);
        config.coded_max_symbols = config.coded_max_symbols.max(1);
        ExchangeDriver {
            exchange,
            range,
            config,
            salt_seed,
            shape: TreeShape::DEFAULT,
            pass: 0,
            seq: 0,
            state: DriverState::Ready,
            stats: ExchangeStats::default(),
            bucket: None,
            coding_failed_in_pass: 0,
            moved_keys: BTreeSet::new(),
            found_keys: BTreeSet::new(),
            no_coding_at: None,
            empty_here: BTreeSet::new(),
            descent_skipped: false,
        }
    }

    /// Compares only `bucket`'s keys: the caller hands this driver trees of that bucket
    /// alone, and every request asks the receiver to do the same.
    pub fn for_bucket(mut self, bucket: String) -> Self {
        self.bucket = Some(bucket);
        self
    }

    pub fn exchange(&self) -> ExchangeId {
        self.exchange
    }

    pub fn range(&self) -> TokenRange {
        self.range
    }

    pub fn stats(&self) -> &ExchangeStats {
        &self.stats
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state, DriverState::Done)
    }

    /// The first request (the root comparison), or the end when this node has no tree for
    /// the range.
    pub fn start(&mut self, trees: &mut RangeTrees) -> DriverStep {
        let Some(tree) = trees.tree_mut(self.range) else {
            return DriverStep::Finished(
                self.finish(ExchangeOutcome::Failed(ExchangeError::NoLocalTree)),
            );
        };
        self.shape = tree.shape();
        let root = tree.root();
        self.pass = 1;
        self.stats.passes = 1;
        self.stats.ranges_compared = 1;
        self.state = DriverState::AwaitRoot;
        if self.coded_in_compare() {
            let probe = self.probe(self.pass);
            let children = children_hashes(tree, probe, 0, &[0]);
            let ask = CodedAsk {
                symbols_per_hundred_keys: self.config.coded_symbols_per_hundred_keys,
                max_symbols: self.config.coded_max_symbols,
                max_segments: self.config.coded_max_segments,
                max_items: self.config.coded_max_items,
            };
            return DriverStep::Send(self.request(RequestBody::CompareCoded {
                root: root.to_le_bytes(),
                children,
                ask,
            }));
        }
        DriverStep::Send(self.request(RequestBody::Compare {
            root: root.to_le_bytes(),
        }))
    }

    /// Whether the first request asks the receiver to code level 1 itself.
    fn coded_in_compare(&self) -> bool {
        self.config.coded_in_compare
            && self.config.coded_max_segments > 0
            && self.shape.depth() >= 2
    }

    /// Ends the exchange from outside (timeout, peer down).
    pub fn abort(&mut self) -> ExchangeReport {
        self.finish(ExchangeOutcome::Failed(ExchangeError::Aborted))
    }

    /// Handles the peer's answer. Apply `writes` (merge) before handling the next response.
    pub fn handle_response(
        &mut self,
        response: ExchangeResponse,
        trees: &mut RangeTrees,
        source: &impl SegmentSource,
    ) -> DriverOutput {
        self.stats.bytes_received += response.encoded_len() as u64;
        let mut writes = Vec::new();
        let awaited = response.exchange == self.exchange
            && response.seq == self.seq
            && !matches!(self.state, DriverState::Ready | DriverState::Done);
        if !awaited {
            return DriverOutput {
                writes,
                step: DriverStep::Ignored,
            };
        }
        let step = self.step(response.body, trees, source, &mut writes);
        match step {
            Ok(step) => DriverOutput { writes, step },
            Err(error) => DriverOutput {
                writes,
                step: DriverStep::Finished(self.finish(ExchangeOutcome::Failed(error))),
            },
        }
    }

    fn step(
        &mut self,
        body: ResponseBody,
        trees: &mut RangeTrees,
        source: &impl SegmentSource,
        writes: &mut Vec<RepairObject>,
    ) -> Result<DriverStep, ExchangeError> {
        let state = std::mem::replace(&mut self.state, DriverState::Done);
        let hasher = *trees.hasher();
        let tree = trees
            .tree_mut(self.range)
            .ok_or(ExchangeError::NoLocalTree)?;
        match (state, body) {
            (_, ResponseBody::Refused(refusal)) => Err(ExchangeError::Refused(refusal)),
            (DriverState::AwaitRoot, ResponseBody::InSync) => Ok(DriverStep::Finished(
                self.finish(ExchangeOutcome::Converged),
            )),
            (DriverState::AwaitRoot, ResponseBody::Hashes { depth: 1, hashes }) => {
                let mismatched = self.compare_level(tree, 1, &[0], &hashes)?;
                self.after_level_in(
                    tree,
                    source,
                    hasher,
                    1,
                    self.shape.fanout() as usize,
                    mismatched,
                )
            }
            (
                DriverState::AwaitHashes { depth, parents },
                ResponseBody::Hashes { depth: d, hashes },
            ) if d == depth => {
                let mismatched = self.compare_level(tree, depth, &parents, &hashes)?;
                let compared = parents.len() * self.shape.fanout() as usize;
                self.after_level_in(tree, source, hasher, depth, compared, mismatched)
            }
            (DriverState::AwaitSymbols(coding), ResponseBody::Symbols { from, symbols }) => {
                self.receive_symbols(hasher, tree, source, coding, from, &symbols)
            }
            (DriverState::AwaitRoot, ResponseBody::CodedSymbols { nodes, symbols }) => {
                let fanout = self.shape.fanout();
                let nodes = unpack_bitmap(&nodes, fanout)
                    .ok_or_else(|| ExchangeError::InvalidResponse("bad node bitmap".into()))?;
                let size = coded::symbol_bytes(self.config.item_hash_bytes);
                let count = symbols.len() / size;
                if !self.coded_in_compare() || count > self.config.coded_max_symbols as usize {
                    return Err(ExchangeError::InvalidResponse(
                        "coded symbols not asked for".into(),
                    ));
                }
                self.stats.nodes_compared += u64::from(fanout);
                if symbols.is_empty() {
                    // Declined: descend from the children that differ (or, if none does, a
                    // collision of short hashes: the next pass, with another salt).
                    self.no_coding_at = Some((self.pass, 1));
                    return self.after_level_in(tree, source, hasher, 1, fanout as usize, nodes);
                }
                if nodes.is_empty() || nodes.len() >= fanout as usize {
                    return Err(ExchangeError::InvalidResponse(
                        "coded symbols for no node or every node".into(),
                    ));
                }
                let coding = Coding {
                    depth: 1,
                    nodes,
                    received: Vec::new(),
                    asked: count as u32,
                    extensions: 0,
                    own: None,
                };
                self.receive_symbols(hasher, tree, source, coding, 0, &symbols)
            }
            (
                DriverState::AwaitItems {
                    requested,
                    remaining,
                },
                ResponseBody::Items { counts, hashes },
            ) => self.compare_items(hasher, tree, source, requested, remaining, &counts, &hashes),
            (
                DriverState::AwaitObjects {
                    transfer,
                    remaining,
                },
                ResponseBody::Objects { objects, complete },
            ) => self.receive_objects(
                hasher, tree, source, transfer, remaining, objects, complete, writes,
            ),
            (
                DriverState::AwaitSegmentObjects {
                    requested,
                    remaining,
                },
                ResponseBody::SegmentObjects { done, objects },
            ) => self
                .receive_segment_objects(tree, source, requested, remaining, done, objects, writes),
            (DriverState::AwaitVerify, ResponseBody::Root { root }) => {
                if tree.root().to_le_bytes() == root {
                    return Ok(DriverStep::Finished(
                        self.finish(ExchangeOutcome::Converged),
                    ));
                }
                if self.pass >= self.config.max_passes {
                    return Ok(DriverStep::Finished(self.finish(ExchangeOutcome::Diverged)));
                }
                // Another pass, with a fresh salt, from the root's children.
                self.pass += 1;
                self.stats.passes += 1;
                self.empty_here.clear();
                self.descent_skipped = false;
                self.descend(0, vec![0])
            }
            _ => Err(ExchangeError::UnexpectedResponse),
        }
    }

    fn probe(&self, pass: u32) -> Probe {
        Probe {
            salt: xxh3_64_with_seed(&pass.to_le_bytes(), self.salt_seed) as u32,
            node_hash_bytes: self.config.node_hash_bytes,
            item_hash_bytes: self.config.item_hash_bytes,
        }
    }

    fn request(&mut self, body: RequestBody) -> ExchangeRequest {
        self.seq = self.seq.wrapping_add(1);
        let request = ExchangeRequest {
            exchange: self.exchange,
            seq: self.seq,
            range: self.range,
            shape: self.shape,
            probe: self.probe(self.pass),
            body,
            bucket: self.bucket.clone(),
        };
        self.stats.round_trips += 1;
        self.stats.bytes_sent += request.encoded_len() as u64;
        request
    }

    fn finish(&mut self, outcome: ExchangeOutcome) -> ExchangeReport {
        self.state = DriverState::Done;
        ExchangeReport {
            exchange: self.exchange,
            range: self.range,
            outcome,
            stats: self.stats.clone(),
        }
    }

    /// The children (at `depth`) of `parents` whose short hashes differ from the peer's.
    fn compare_level(
        &mut self,
        tree: &mut MerkleTree,
        depth: u8,
        parents: &[u32],
        packed: &[u8],
    ) -> Result<Vec<u32>, ExchangeError> {
        let probe = self.probe(self.pass);
        let bytes = usize::from(probe.node_hash_bytes);
        let fanout = self.shape.fanout();
        if depth == 0
            || depth > self.shape.depth()
            || packed.len() != parents.len() * fanout as usize * bytes
        {
            return Err(ExchangeError::InvalidResponse(
                "hash list has the wrong size".into(),
            ));
        }
        let mut theirs = unpack(packed, probe.node_hash_bytes);
        let mut mismatched = Vec::new();
        for &parent in parents {
            let children = tree
                .children(depth - 1, parent)
                .ok_or(ExchangeError::UnexpectedResponse)?;
            for (i, &child) in children.iter().enumerate() {
                let own = short_hash(child, probe.salt, probe.node_hash_bytes);
                if Some(own) != theirs.next() {
                    mismatched.push(parent * fanout + i as u32);
                }
            }
        }
        self.stats.nodes_compared += (parents.len() * fanout as usize) as u64;
        Ok(mismatched)
    }

    /// What to do with the `mismatched` nodes at `depth`, found among `compared`: descend,
    /// reconcile their items with coded symbols, or list the items of mismatched leaves.
    #[allow(clippy::too_many_arguments)]
    fn after_level_in(
        &mut self,
        tree: &MerkleTree,
        source: &impl SegmentSource,
        hasher: ItemHasher,
        depth: u8,
        compared: usize,
        mismatched: Vec<u32>,
    ) -> Result<DriverStep, ExchangeError> {
        if mismatched.is_empty() {
            return Ok(self.verify());
        }
        if depth == self.shape.depth() {
            self.stats.leaves_mismatched += mismatched.len() as u64;
            let leaves = tree.leaves();
            self.empty_here
                .extend(mismatched.iter().filter(|&&s| leaves[s as usize] == 0));
            return self.next_batch(mismatched.into());
        }
        // The driver holds nothing below any mismatched node (a joiner pulling a range it
        // gains): every node below them would mismatch too, so their segments' objects are
        // asked for at once instead of descending level by level to list them.
        let leaves = tree.leaves();
        let below = |node: u32| self.shape.node_segments(depth, node).unwrap_or(0..0);
        if mismatched.iter().all(|&node| {
            let segments = below(node);
            leaves[segments.start as usize..segments.end as usize]
                .iter()
                .all(|&h| h == 0)
        }) {
            let segments: Vec<Segment> = mismatched
                .iter()
                .flat_map(|&node| below(node))
                .filter(|&segment| tree.segment_tokens(segment).is_some())
                .collect();
            self.empty_here.extend(segments.iter().copied());
            self.descent_skipped = true;
            return self.next_batch(segments.into());
        }
        if let Some(count) = self.coded_prefix(depth, compared, mismatched.len()) {
            // The driver's own items first, bounded: past the bound, descend (nothing was
            // asked of the receiver yet).
            let bound = match self.config.coded_max_items {
                0 => usize::MAX,
                n => n as usize,
            };
            if let Some(own) = self.own_items(hasher, tree, source, depth, &mismatched, bound)? {
                return Ok(self.ask_symbols(Coding {
                    depth,
                    nodes: mismatched,
                    received: Vec::new(),
                    asked: count,
                    extensions: 0,
                    own: Some(own),
                }));
            }
        }
        self.descend(depth, mismatched)
    }

    /// The short hashes (and segments) of the driver's items below `nodes` (at `depth`), or
    /// `None` when there are more than `bound`.
    fn own_items(
        &mut self,
        hasher: ItemHasher,
        tree: &MerkleTree,
        source: &impl SegmentSource,
        depth: u8,
        nodes: &[u32],
        bound: usize,
    ) -> Result<Option<Vec<(u64, Segment)>>, ExchangeError> {
        let probe = self.probe(self.pass);
        let mut own = Vec::new();
        let mut over = false;
        for_each_item(tree, source, depth, nodes, |item| {
            if own.len() >= bound {
                over = true;
                return false;
            }
            let short = short_hash(
                hasher.item_hash(&item.bucket, &item.key, item.digest),
                probe.salt,
                probe.item_hash_bytes,
            );
            if let Some(segment) = tree.segment_of(key_token(&item.bucket, &item.key)) {
                own.push((short, segment));
            }
            true
        })?;
        self.stats.keys_compared += own.len() as u64;
        Ok((!over).then_some(own))
    }

    /// The number of coded symbols to ask for first when the `mismatched` nodes of `depth`
    /// should be reconciled by coding, or `None` to descend.
    ///
    /// `m` mismatched among `n` compared says how many keys differ below them, as balls in
    /// bins: about `n ln(n / (n - m))`. When every node compared mismatched the count says
    /// nothing (any number of keys could differ), so the descent goes on: a level further
    /// down the same count is informative again, for 16 times the bytes of this level.
    fn coded_prefix(&self, depth: u8, compared: usize, mismatched: usize) -> Option<u32> {
        let covered = mismatched as u64 * u64::from(self.shape.segments_per_node(depth));
        if depth == 0
            || mismatched >= compared
            || covered > u64::from(self.config.coded_max_segments)
            || self.coding_failed_in_pass == self.pass
            || self.no_coding_at == Some((self.pass, depth))
        {
            return None;
        }
        Some(first_symbols(
            compared,
            mismatched,
            self.config.coded_symbols_per_hundred_keys,
            self.config.coded_max_symbols,
        ))
    }

    fn ask_symbols(&mut self, coding: Coding) -> DriverStep {
        let request = self.request(RequestBody::Symbols {
            depth: coding.depth,
            nodes: SortedIndices::from_sorted(&coding.nodes),
            from: coding.received.len() as u32,
            count: coding.asked,
        });
        self.state = DriverState::AwaitSymbols(coding);
        DriverStep::Send(request)
    }

    /// Takes in the symbols asked for and peels the difference with the driver's own; on
    /// success, transfers exactly the decoded items; else asks for more symbols, or, past
    /// the budget, descends from the same nodes as if coding had not been tried.
    #[allow(clippy::too_many_arguments)]
    fn receive_symbols(
        &mut self,
        hasher: ItemHasher,
        tree: &MerkleTree,
        source: &impl SegmentSource,
        mut coding: Coding,
        from: u32,
        packed: &[u8],
    ) -> Result<DriverStep, ExchangeError> {
        let probe = self.probe(self.pass);
        let symbols = coded::unpack(packed, probe.item_hash_bytes)
            .filter(|symbols| {
                from as usize == coding.received.len() && symbols.len() == coding.asked as usize
            })
            .ok_or_else(|| {
                ExchangeError::InvalidResponse("coded symbols of the wrong size".into())
            })?;
        self.stats.coded_symbols += symbols.len() as u64;
        coding.received.extend(symbols);
        if coding.own.is_none() {
            // Symbols that came with the first answer: the receiver bounded the items.
            coding.own = self.own_items(
                hasher,
                tree,
                source,
                coding.depth,
                &coding.nodes,
                usize::MAX,
            )?;
        }
        let own_items = coding.own.take().unwrap_or_default();
        let mut difference = vec![Symbol::default(); coding.received.len()];
        for &(short, _) in &own_items {
            coded::encode_into(&mut difference, 0, short);
        }
        for (symbol, theirs) in difference.iter_mut().zip(&coding.received) {
            symbol.subtract(theirs);
        }
        let Some(decoded) = coded::peel(&mut difference, item_mask(probe.item_hash_bytes)) else {
            let prefix = coding.received.len() as u32;
            let room = self.config.coded_max_symbols.saturating_sub(prefix);
            if coding.extensions < self.config.coded_extensions && room > 0 {
                // Half the prefix again: decoding needs a prefix within a small factor of
                // the difference, so a few extensions reach it, and at most a third of
                // the symbols received is beyond what was needed.
                coding.asked = (prefix / 2).max(4).min(room);
                coding.extensions += 1;
                coding.own = Some(own_items);
                return Ok(self.ask_symbols(coding));
            }
            self.stats.coded_fallbacks += 1;
            self.coding_failed_in_pass = self.pass;
            return self.descend(coding.depth, coding.nodes);
        };
        // Decoded items with count +1 are the driver's: pushed. The others are wanted.
        let (ours, theirs): (Vec<_>, Vec<_>) = decoded.into_iter().partition(|d| d.ours);
        let ours: BTreeSet<u64> = ours.into_iter().map(|d| d.item).collect();
        let mut own: BTreeMap<u64, Vec<(String, Vec<u8>)>> = BTreeMap::new();
        // Only the segments of the decoded items are scanned again, for their keys.
        let segments: BTreeSet<Segment> = own_items
            .iter()
            .filter(|(short, _)| ours.contains(short))
            .map(|&(_, segment)| segment)
            .collect();
        for segment in segments {
            let Some(tokens) = tree.segment_tokens(segment) else {
                continue;
            };
            for item in source.segment_items(tokens)? {
                let short = short_hash(
                    hasher.item_hash(&item.bucket, &item.key, item.digest),
                    probe.salt,
                    probe.item_hash_bytes,
                );
                if ours.contains(&short) {
                    own.entry(short).or_default().push((item.bucket, item.key));
                }
            }
        }
        if own.len() != ours.len() {
            // An item of ours that we do not hold: a checksum collision decoded garbage.
            self.stats.coded_fallbacks += 1;
            self.coding_failed_in_pass = self.pass;
            return self.descend(coding.depth, coding.nodes);
        }
        let mut transfer = Transfer::default();
        // A decoded short hash two of the driver's items share (likelier than within one
        // segment, as coding covers many) does not say which one differs: their segments
        // go through the item lists after this transfer, which compare them exactly.
        let mut listed = BTreeSet::new();
        for (_, mut keys) in own {
            if keys.len() == 1 {
                transfer.pushes.extend(keys.pop());
            } else {
                listed.extend(
                    keys.iter()
                        .filter_map(|(bucket, key)| tree.segment_of(key_token(bucket, key))),
                );
            }
        }
        transfer.wants = theirs.into_iter().map(|d| (None, d.item)).collect();
        transfer.coded = Some((coding.depth, coding.nodes));
        self.count_pushes(&transfer);
        self.send_transfer(source, transfer, listed.into_iter().collect())
    }

    fn descend(&mut self, depth: u8, mismatched: Vec<u32>) -> Result<DriverStep, ExchangeError> {
        let request = self.request(RequestBody::Descend {
            depth,
            parents: SortedIndices::from_sorted(&mismatched),
        });
        self.state = DriverState::AwaitHashes {
            depth: depth + 1,
            parents: mismatched,
        };
        Ok(DriverStep::Send(request))
    }

    fn verify(&mut self) -> DriverStep {
        self.state = DriverState::AwaitVerify;
        DriverStep::Send(self.request(RequestBody::Verify))
    }

    fn next_batch(&mut self, remaining: VecDeque<Segment>) -> Result<DriverStep, ExchangeError> {
        if remaining.is_empty() {
            return Ok(self.verify());
        }
        // One request asks either for whole segments (those empty here, first) or for item
        // lists. Empty and listed segments interleave when writes land on a joiner while it
        // pulls: each kind is taken from the whole queue, or requests would shrink to runs.
        let whole = remaining.iter().any(|s| self.empty_here.contains(s));
        let mut requested: Vec<Segment> = Vec::new();
        let mut rest = VecDeque::with_capacity(remaining.len());
        for segment in remaining {
            if requested.len() < self.config.max_segments_per_request
                && self.empty_here.contains(&segment) == whole
            {
                requested.push(segment);
            } else {
                rest.push_back(segment);
            }
        }
        let remaining = rest;
        // Segments put back after a cut answer come first: requests name them in order.
        requested.sort_unstable();
        let segments = SortedIndices::from_sorted(&requested);
        if whole {
            let request = self.request(RequestBody::SegmentObjects { segments });
            self.state = DriverState::AwaitSegmentObjects {
                requested,
                remaining,
            };
            return Ok(DriverStep::Send(request));
        }
        let request = self.request(RequestBody::Items { segments });
        self.state = DriverState::AwaitItems {
            requested,
            remaining,
        };
        Ok(DriverStep::Send(request))
    }

    #[allow(clippy::too_many_arguments)]
    fn compare_items(
        &mut self,
        hasher: ItemHasher,
        tree: &mut MerkleTree,
        source: &impl SegmentSource,
        requested: Vec<Segment>,
        mut remaining: VecDeque<Segment>,
        counts: &[u32],
        packed: &[u8],
    ) -> Result<DriverStep, ExchangeError> {
        let probe = self.probe(self.pass);
        let bytes = usize::from(probe.item_hash_bytes);
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if counts.is_empty()
            || counts.len() > requested.len()
            || packed.len() as u64 != total * bytes as u64
        {
            return Err(ExchangeError::InvalidResponse(
                "item list has the wrong size".into(),
            ));
        }
        // Segments that did not fit in the answer go first in the next batch.
        for &segment in requested[counts.len()..].iter().rev() {
            remaining.push_front(segment);
        }
        let mut transfer = Transfer::default();
        let mut offset = 0usize;
        for (&segment, &count) in requested.iter().zip(counts) {
            let end = offset + count as usize * bytes;
            let theirs: BTreeSet<u64> =
                unpack(&packed[offset..end], probe.item_hash_bytes).collect();
            offset = end;
            let items = match tree.segment_tokens(segment) {
                Some(tokens) => source.segment_items(tokens)?,
                None => Vec::new(),
            };
            let mut ours = BTreeSet::new();
            for item in items.iter() {
                let short = short_hash(
                    hasher.item_hash(&item.bucket, &item.key, item.digest),
                    probe.salt,
                    probe.item_hash_bytes,
                );
                ours.insert(short);
                if !theirs.contains(&short) {
                    transfer
                        .pushes
                        .push_back((item.bucket.clone(), item.key.clone()));
                }
            }
            for short in theirs.difference(&ours) {
                transfer.wants.push_back((Some(segment), *short));
            }
            self.stats.keys_compared += items.len() as u64 + u64::from(count);
        }
        self.count_pushes(&transfer);
        self.send_transfer(source, transfer, remaining)
    }

    /// Whole segments' objects came back (segments the driver held nothing in). Objects the
    /// driver holds as they are already are dropped; keys the driver has there after all
    /// (written since the segments were found empty, or a leaf whose hashes cancelled out)
    /// are compared as an item list's would be: pushed unless the object that came back is
    /// the same.
    #[allow(clippy::too_many_arguments)]
    fn receive_segment_objects(
        &mut self,
        tree: &MerkleTree,
        source: &impl SegmentSource,
        requested: Vec<Segment>,
        mut remaining: VecDeque<Segment>,
        done: u32,
        objects: Vec<RepairObject>,
        writes: &mut Vec<RepairObject>,
    ) -> Result<DriverStep, ExchangeError> {
        let done = done as usize;
        if done > requested.len() || (done == 0 && !objects.is_empty()) {
            return Err(ExchangeError::InvalidResponse(
                "segment objects do not match the request".into(),
            ));
        }
        for &segment in requested[done.max(1)..].iter().rev() {
            remaining.push_front(segment);
        }
        if done == 0 {
            // The first segment alone does not fit in one answer: its items are listed and
            // its objects come back in bounded answers.
            self.empty_here.remove(&requested[0]);
            remaining.push_front(requested[0]);
            return self.next_batch(remaining);
        }
        let answered = &requested[..done];
        let mut with_objects = BTreeSet::new();
        for item in &objects {
            check_object(self.range, item)
                .map_err(|e| ExchangeError::InvalidResponse(e.to_string()))?;
            match tree.segment_of(key_token(&item.bucket, &item.key)) {
                Some(segment) if answered.binary_search(&segment).is_ok() => {
                    with_objects.insert(segment);
                }
                _ => {
                    return Err(ExchangeError::InvalidResponse(
                        "object not asked for".into(),
                    ))
                }
            }
        }
        if self.descent_skipped {
            self.stats.leaves_mismatched += with_objects.len() as u64;
        }
        // The driver's own items there, one scan per run of adjacent segments.
        let mut own: BTreeMap<KeyId, u64> = BTreeMap::new();
        let mut first = 0;
        while first < answered.len() {
            let mut last = first;
            while last + 1 < answered.len() && answered[last + 1] == answered[last] + 1 {
                last += 1;
            }
            if let Some(tokens) = run_tokens(tree, answered[first], answered[last]) {
                for item in source.segment_items(tokens)? {
                    own.insert((item.bucket, item.key), item.digest);
                }
            }
            first = last + 1;
        }
        self.stats.keys_compared += (own.len() + objects.len()) as u64;
        let mut transfer = Transfer::default();
        let mut same = BTreeSet::new();
        for item in objects {
            let id = (item.bucket.clone(), item.key.clone());
            let ours = own.get(&id).copied();
            if ours == Some(item.object.digest()) {
                same.insert(id);
                continue;
            }
            if ours.is_some() {
                // Differs on both sides: pushed below unless what came back covers ours.
                transfer.pulled.insert(id.clone(), item.object.clone());
            }
            self.count_pulled(id, &item);
            writes.push(item);
        }
        transfer.pushes = own.into_keys().filter(|id| !same.contains(id)).collect();
        if transfer.pushes.is_empty() {
            return self.next_batch(remaining);
        }
        self.count_pushes(&transfer);
        self.send_transfer(source, transfer, remaining)
    }

    /// Counts an object pulled from the receiver: its bytes, and its key as different and
    /// moved (once per key and exchange).
    fn count_pulled(&mut self, id: KeyId, item: &RepairObject) {
        self.stats.objects_pulled += 1;
        self.stats.value_bytes_received += item.object.size_bytes() as u64;
        if self.found_keys.insert(id.clone()) {
            self.stats.keys_different += 1;
        }
        if self.moved_keys.insert(id) {
            self.stats.keys_moved += 1;
        }
    }

    /// Counts the keys of the batch's pushes as different (once per key and exchange).
    fn count_pushes(&mut self, transfer: &Transfer) {
        for id in &transfer.pushes {
            if self.found_keys.insert(id.clone()) {
                self.stats.keys_different += 1;
            }
        }
    }

    /// Sends the batch's next `Transfer`. Wants go first, alone, until every wanted item has
    /// come back; pushes follow. Had a push been merged before a want was served, the want
    /// would name an item the receiver no longer holds (the merge changed it).
    fn send_transfer(
        &mut self,
        source: &impl SegmentSource,
        mut transfer: Transfer,
        remaining: VecDeque<Segment>,
    ) -> Result<DriverStep, ExchangeError> {
        let item_bytes = self.config.item_hash_bytes;
        let take = transfer.wants.len().min(self.config.max_wanted_per_request);
        transfer.asked = transfer.wants.drain(..take).collect();
        let mut want: Vec<SegmentWant> = Vec::new();
        let mut coded_hashes = Vec::new();
        for &(place, short) in &transfer.asked {
            let Some(segment) = place else {
                pack(&mut coded_hashes, short, item_bytes);
                continue;
            };
            match want.last_mut() {
                Some(last) if last.segment == segment => pack(&mut last.hashes, short, item_bytes),
                _ => {
                    let mut hashes = Vec::new();
                    pack(&mut hashes, short, item_bytes);
                    want.push(SegmentWant { segment, hashes });
                }
            }
        }
        let coded_want = match &transfer.coded {
            Some((depth, nodes)) if !coded_hashes.is_empty() => Some(CodedWant {
                depth: *depth,
                nodes: SortedIndices::from_sorted(nodes),
                hashes: coded_hashes,
            }),
            _ => None,
        };
        let mut objects = Vec::new();
        let mut push_bytes = 0usize;
        while want.is_empty() && coded_want.is_none() && push_bytes < self.config.max_push_bytes {
            let Some((bucket, key)) = transfer.pushes.pop_front() else {
                break;
            };
            if let Some(object) = source.object(&bucket, &key)? {
                let id = (bucket, key);
                if let Some(theirs) = transfer.pulled.get(&id) {
                    // The receiver's version already covers ours (it was behind on nothing).
                    if object.merge(theirs) == *theirs {
                        continue;
                    }
                }
                let (bucket, key) = id;
                push_bytes += answer_bytes(&key, &object);
                self.stats.objects_pushed += 1;
                self.stats.value_bytes_sent += object.size_bytes() as u64;
                // Pulled earlier in this batch: one key, different on both sides, moved once.
                if self.moved_keys.insert((bucket.clone(), key.clone())) {
                    self.stats.keys_moved += 1;
                }
                objects.push(RepairObject {
                    bucket,
                    key,
                    object,
                });
            }
        }
        if objects.is_empty() && want.is_empty() && coded_want.is_none() {
            // Nothing left (pushed objects may have vanished meanwhile).
            return self.next_batch(remaining);
        }
        let request = self.request(RequestBody::Transfer {
            objects,
            want,
            coded_want,
        });
        self.state = DriverState::AwaitObjects {
            transfer,
            remaining,
        };
        Ok(DriverStep::Send(request))
    }

    #[allow(clippy::too_many_arguments)]
    fn receive_objects(
        &mut self,
        hasher: ItemHasher,
        tree: &mut MerkleTree,
        source: &impl SegmentSource,
        mut transfer: Transfer,
        remaining: VecDeque<Segment>,
        objects: Vec<RepairObject>,
        complete: bool,
        writes: &mut Vec<RepairObject>,
    ) -> Result<DriverStep, ExchangeError> {
        let probe = self.probe(self.pass);
        let mut received = BTreeSet::new();
        for item in &objects {
            check_object(self.range, item)
                .map_err(|e| ExchangeError::InvalidResponse(e.to_string()))?;
            let segment = tree.segment_of(key_token(&item.bucket, &item.key));
            let hash = hasher.item_hash(&item.bucket, &item.key, item.object.digest());
            let short = short_hash(hash, probe.salt, probe.item_hash_bytes);
            // An object that changed since its item was listed still merges harmlessly; one
            // from a segment not asked for is a broken or hostile peer.
            let coded = |segment: Segment| match &transfer.coded {
                Some((depth, nodes)) => {
                    let node = segment / tree.shape().segments_per_node(*depth);
                    nodes.binary_search(&node).is_ok()
                        && transfer.asked.iter().any(|&(p, _)| p.is_none())
                }
                None => false,
            };
            match segment {
                Some(segment) if transfer.asked.iter().any(|&(s, _)| s == Some(segment)) => {
                    received.insert((Some(segment), short));
                }
                Some(segment) if coded(segment) => {
                    received.insert((None, short));
                }
                _ => {
                    return Err(ExchangeError::InvalidResponse(
                        "object not asked for".into(),
                    ))
                }
            }
        }
        if !complete {
            // The answer was cut at its size limit: ask again for what did not come.
            for &want in transfer.asked.iter().rev() {
                if !received.contains(&want) {
                    transfer.wants.push_front(want);
                }
            }
        }
        for item in objects {
            // A wanted short hash two of the receiver's items share brings both (likelier
            // below coded nodes, which cover many segments); the one the driver already
            // holds as is did not differ.
            if source.object(&item.bucket, &item.key)?.as_ref() == Some(&item.object) {
                continue;
            }
            let id = (item.bucket.clone(), item.key.clone());
            transfer.pulled.insert(id.clone(), item.object.clone());
            self.count_pulled(id, &item);
            writes.push(item);
        }
        if transfer.pushes.is_empty() && transfer.wants.is_empty() {
            self.next_batch(remaining)
        } else {
            self.send_transfer(source, transfer, remaining)
        }
    }
}
// ----- receiver side ------------------------------------------------------------------

/// Bounds on what one request may make the receiver do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverLimits {
    /// Segments named in one `Items` request.
    pub max_segments_per_request: usize,
    /// Item hashes in one `Items` answer (whole segments; at least one segment).
    pub max_items_per_response: usize,
    /// Objects pushed in one `Transfer`.
    pub max_objects_per_request: usize,
    /// Items asked back in one `Transfer`.
    pub max_wanted_per_request: usize,
    /// Value bytes in one `Objects` answer (at least one object goes); the driver asks
    /// again for the rest. Keeps answers well under the wire's frame limit.
    pub max_response_bytes: usize,
    /// Segments below the nodes of one `Symbols` request or coded want (every item below
    /// them is scanned for the answer).
    pub max_coded_segments: u32,
    /// Coded symbols in one answer.
    pub max_symbols_per_request: u32,
    /// Highest symbol index (+1) a request may reach; bounds the work per item.
    pub max_symbol_index: u32,
}

impl Default for ReceiverLimits {
    fn default() -> Self {
        ReceiverLimits {
            max_segments_per_request: 4096,
            max_items_per_response: 1 << 16,
            max_objects_per_request: 1 << 14,
            max_wanted_per_request: 4096,
            max_response_bytes: 4 << 20,
            max_coded_segments: 1 << MAX_LEAF_BITS,
            max_symbols_per_request: 1 << 16,
            max_symbol_index: 1 << 20,
        }
    }
}

/// The answer, and the objects the driver pushed (merge them into local storage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverOutput {
    pub response: ExchangeResponse,
    pub writes: Vec<RepairObject>,
}

/// The receiver side: answers one request. Stateless: everything it needs is in the request.
pub fn handle_request(
    request: ExchangeRequest,
    trees: &mut RangeTrees,
    source: &impl SegmentSource,
    limits: &ReceiverLimits,
) -> ReceiverOutput {
    let (exchange, request_seq) = (request.exchange, request.seq);
    let mut writes = Vec::new();
    let body = match answer(request, trees, source, limits, &mut writes) {
        Ok(body) => body,
        Err(refusal) => {
            writes.clear();
            ResponseBody::Refused(refusal)
        }
    };
    ReceiverOutput {
        response: ExchangeResponse {
            exchange,
            seq: request_seq,
            body,
        },
        writes,
    }
}

fn answer(
    request: ExchangeRequest,
    trees: &mut RangeTrees,
    source: &impl SegmentSource,
    limits: &ReceiverLimits,
    writes: &mut Vec<RepairObject>,
) -> Result<ResponseBody, Refusal> {
    let hasher = *trees.hasher();
    if trees.tree(request.range).is_some() && !trees.is_ready(request.range) {
        return Err(Refusal::TreeNotReady);
    }
    let tree = trees.tree_mut(request.range).ok_or(Refusal::UnknownRange)?;
    if tree.shape() != request.shape {
        return Err(Refusal::ShapeMismatch { ours: tree.shape() });
    }
    let probe = request.probe;
    if !valid_width(probe.node_hash_bytes) || !valid_width(probe.item_hash_bytes) {
        return Err(Refusal::Invalid("hash width must be 1..=8 bytes".into()));
    }
    let shape = tree.shape();
    match request.body {
        RequestBody::Compare { root } => {
            if tree.root().to_le_bytes() == root {
                Ok(ResponseBody::InSync)
            } else {
                Ok(ResponseBody::Hashes {
                    depth: 1,
                    hashes: children_hashes(tree, probe, 0, &[0]),
                })
            }
        }
        RequestBody::CompareCoded {
            root,
            children,
            ask,
        } => {
            if tree.root().to_le_bytes() == root {
                return Ok(ResponseBody::InSync);
            }
            let hashes = children_hashes(tree, probe, 0, &[0]);
            if children.len() != hashes.len() {
                return Err(Refusal::Invalid("wrong number of child hashes".into()));
            }
            code_level_one(tree, source, limits, probe, hasher, &children, &hashes, ask)
        }
        RequestBody::Verify => Ok(ResponseBody::Root {
            root: tree.root().to_le_bytes(),
        }),
        RequestBody::Descend { depth, parents } => {
            if depth >= shape.depth() {
                return Err(Refusal::Invalid(format!("no children below depth {depth}")));
            }
            let parents = parents
                .decode(shape.width(depth))
                .map_err(Refusal::Invalid)?;
            Ok(ResponseBody::Hashes {
                depth: depth + 1,
                hashes: children_hashes(tree, probe, depth, &parents),
            })
        }
        RequestBody::Items { segments } => {
            if segments.len() > limits.max_segments_per_request {
                return Err(Refusal::Invalid("too many segments".into()));
            }
            let segments = segments.decode(shape.leaves()).map_err(Refusal::Invalid)?;
            let (mut counts, mut hashes) = (Vec::new(), Vec::new());
            let mut total = 0usize;
            for segment in segments {
                if !counts.is_empty() && total >= limits.max_items_per_response {
                    break;
                }
                let items = segment_items(tree, source, segment)?;
                for item in &items {
                    let hash = hasher.item_hash(&item.bucket, &item.key, item.digest);
                    pack(
                        &mut hashes,
                        short_hash(hash, probe.salt, probe.item_hash_bytes),
                        probe.item_hash_bytes,
                    );
                }
                total += items.len();
                counts.push(items.len() as u32);
            }
            Ok(ResponseBody::Items { counts, hashes })
        }
        RequestBody::SegmentObjects { segments } => {
            if segments.len() > limits.max_segments_per_request {
                return Err(Refusal::Invalid("too many segments".into()));
            }
            let segments = segments.decode(shape.leaves()).map_err(Refusal::Invalid)?;
            let (mut objects, mut bytes, mut done) = (Vec::new(), 0usize, 0u32);
            for segment in segments {
                let Some(tokens) = tree.segment_tokens(segment) else {
                    done += 1;
                    continue;
                };
                // Whole segments only: one that does not fit in what is left ends the answer.
                let (before, mut segment_bytes, mut fits) = (objects.len(), 0usize, true);
                source
                    .segment_objects(tokens, &mut |object| {
                        segment_bytes += answer_bytes(&object.key, &object.object);
                        fits = bytes + segment_bytes <= limits.max_response_bytes;
                        if fits {
                            objects.push(object);
                        }
                        fits
                    })
                    .map_err(|e| Refusal::Storage(e.to_string()))?;
                if !fits {
                    objects.truncate(before);
                    break;
                }
                bytes += segment_bytes;
                done += 1;
            }
            Ok(ResponseBody::SegmentObjects { done, objects })
        }
        RequestBody::Symbols {
            depth,
            nodes,
            from,
            count,
        } => {
            let nodes = coded_nodes(shape, depth, &nodes, limits)?;
            if count == 0
                || count > limits.max_symbols_per_request
                || from
                    .checked_add(count)
                    .is_none_or(|end| end > limits.max_symbol_index)
            {
                return Err(Refusal::Invalid("symbol window out of bounds".into()));
            }
            let mut window = vec![Symbol::default(); count as usize];
            for_each_item(tree, source, depth, &nodes, |item| {
                let hash = hasher.item_hash(&item.bucket, &item.key, item.digest);
                let short = short_hash(hash, probe.salt, probe.item_hash_bytes);
                coded::encode_into(&mut window, u64::from(from), short);
                true
            })
            .map_err(|e| Refusal::Storage(e.to_string()))?;
            let mut symbols = Vec::new();
            coded::pack(&mut symbols, &window, probe.item_hash_bytes);
            Ok(ResponseBody::Symbols { from, symbols })
        }
        RequestBody::Transfer {
            objects,
            want,
            coded_want,
        } => {
            if objects.len() > limits.max_objects_per_request {
                return Err(Refusal::Invalid("too many objects".into()));
            }
            for item in &objects {
                check_object(request.range, item).map_err(|e| Refusal::Invalid(e.to_string()))?;
            }
            let coded_want = match coded_want {
                Some(w) => {
                    if w.hashes.len() % usize::from(probe.item_hash_bytes) != 0 {
                        return Err(Refusal::Invalid("bad coded want".into()));
                    }
                    let nodes = coded_nodes(shape, w.depth, &w.nodes, limits)?;
                    Some((w.depth, nodes, w.hashes))
                }
                None => None,
            };
            let wanted: usize = want
                .iter()
                .map(|w| w.hashes.len())
                .chain(coded_want.iter().map(|(_, _, hashes)| hashes.len()))
                .sum::<usize>()
                / usize::from(probe.item_hash_bytes);
            if wanted > limits.max_wanted_per_request {
                return Err(Refusal::Invalid("too many items wanted".into()));
            }
            if want.iter().any(|w| {
                w.segment >= shape.leaves()
                    || w.hashes.len() % usize::from(probe.item_hash_bytes) != 0
            }) {
                return Err(Refusal::Invalid("bad segment want".into()));
            }
            let mut found = Found {
                objects: Vec::new(),
                bytes: 0,
                complete: true,
                limit: limits.max_response_bytes,
            };
            for segment_want in &want {
                let shorts: BTreeSet<u64> =
                    unpack(&segment_want.hashes, probe.item_hash_bytes).collect();
                for item in segment_items(tree, source, segment_want.segment)? {
                    let hash = hasher.item_hash(&item.bucket, &item.key, item.digest);
                    if shorts.contains(&short_hash(hash, probe.salt, probe.item_hash_bytes))
                        && !found.take(source, item)?
                    {
                        break;
                    }
                }
                if !found.complete {
                    break;
                }
            }
            if let Some((depth, nodes, hashes)) = coded_want.filter(|_| found.complete) {
                let shorts: BTreeSet<u64> = unpack(&hashes, probe.item_hash_bytes).collect();
                let mut failed = None;
                for_each_item(tree, source, depth, &nodes, |item| {
                    let hash = hasher.item_hash(&item.bucket, &item.key, item.digest);
                    if !shorts.contains(&short_hash(hash, probe.salt, probe.item_hash_bytes)) {
                        return true;
                    }
                    match found.take(source, item) {
                        Ok(more) => more,
                        Err(refusal) => {
                            failed = Some(refusal);
                            false
                        }
                    }
                })
                .map_err(|e| Refusal::Storage(e.to_string()))?;
                if let Some(refusal) = failed {
                    return Err(refusal);
                }
            }
            let Found {
                objects: found,
                complete,
                ..
            } = found;
            writes.extend(objects);
            Ok(ResponseBody::Objects {
                objects: found,
                complete,
            })
        }
    }
}

/// The answer to `CompareCoded`: the differing children and, when level 1 is worth coding,
/// the first symbols of the items below them (none when every child differs, or no child
/// does, or too many segments or items are below them).
#[allow(clippy::too_many_arguments)]
fn code_level_one(
    tree: &MerkleTree,
    source: &impl SegmentSource,
    limits: &ReceiverLimits,
    probe: Probe,
    hasher: ItemHasher,
    theirs: &[u8],
    ours: &[u8],
    ask: CodedAsk,
) -> Result<ResponseBody, Refusal> {
    let shape = tree.shape();
    let width = usize::from(probe.node_hash_bytes);
    let nodes: Vec<u32> = theirs
        .chunks_exact(width)
        .zip(ours.chunks_exact(width))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u32)
        .collect();
    let fanout = shape.fanout() as usize;
    let covered = nodes.len() as u64 * u64::from(shape.segments_per_node(1));
    let declined = ResponseBody::CodedSymbols {
        nodes: pack_bitmap(&nodes, shape.fanout()),
        symbols: Vec::new(),
    };
    if shape.depth() < 2
        || nodes.is_empty()
        || nodes.len() >= fanout
        || covered > u64::from(ask.max_segments.min(limits.max_coded_segments))
    {
        return Ok(declined);
    }
    let most = ask
        .max_symbols
        .min(limits.max_symbols_per_request)
        .min(limits.max_symbol_index)
        .max(1);
    let count = first_symbols(fanout, nodes.len(), ask.symbols_per_hundred_keys, most);
    let bound = match ask.max_items {
        0 => u64::MAX,
        n => u64::from(n),
    };
    let mut window = vec![Symbol::default(); count as usize];
    let (mut items, mut over) = (0u64, false);
    for_each_item(tree, source, 1, &nodes, |item| {
        items += 1;
        if items > bound {
            over = true;
            return false;
        }
        let hash = hasher.item_hash(&item.bucket, &item.key, item.digest);
        let short = short_hash(hash, probe.salt, probe.item_hash_bytes);
        coded::encode_into(&mut window, 0, short);
        true
    })
    .map_err(|e| Refusal::Storage(e.to_string()))?;
    if over {
        return Ok(declined);
    }
    let mut symbols = Vec::new();
    coded::pack(&mut symbols, &window, probe.item_hash_bytes);
    Ok(ResponseBody::CodedSymbols {
        nodes: pack_bitmap(&nodes, shape.fanout()),
        symbols,
    })
}

/// The first symbols to ask for (or send) when `mismatched` of `compared` nodes differ: the
/// keys that differ below them, estimated as balls in bins (`n ln(n / (n - m))`), times
/// `per_hundred_keys` / 100, within `1..=most`.
fn first_symbols(compared: usize, mismatched: usize, per_hundred_keys: u32, most: u32) -> u32 {
    let n = compared as f64;
    let keys = n * (n / (n - mismatched as f64)).ln();
    let symbols = keys * f64::from(per_hundred_keys) / 100.0;
    (symbols.ceil() as u32).clamp(1, most.max(1))
}

/// Node indices below `width` as a bitmap, low bit first.
fn pack_bitmap(indices: &[u32], width: u32) -> Vec<u8> {
    let mut bitmap = vec![0u8; width.div_ceil(8) as usize];
    for &i in indices {
        bitmap[(i / 8) as usize] |= 1 << (i % 8);
    }
    bitmap
}

/// The indices of a bitmap of `width` bits; `None` when its size is wrong or a bit past
/// `width` is set.
fn unpack_bitmap(bitmap: &[u8], width: u32) -> Option<Vec<u32>> {
    if bitmap.len() != width.div_ceil(8) as usize {
        return None;
    }
    let mut indices = Vec::new();
    for (byte, &bits) in bitmap.iter().enumerate() {
        for bit in 0..8 {
            if bits & (1 << bit) != 0 {
                let i = byte as u32 * 8 + bit;
                if i >= width {
                    return None;
                }
                indices.push(i);
            }
        }
    }
    Some(indices)
}

/// The objects gathered for an `Objects` answer, up to its size limit.
struct Found {
    objects: Vec<RepairObject>,
    bytes: usize,
    complete: bool,
    limit: usize,
}

impl Found {
    /// Adds the object of `item`; false (and `complete` cleared) when the answer is full.
    fn take(&mut self, source: &impl SegmentSource, item: SegmentItem) -> Result<bool, Refusal> {
        if !self.objects.is_empty() && self.bytes >= self.limit {
            self.complete = false;
            return Ok(false);
        }
        let stored = source
            .object(&item.bucket, &item.key)
            .map_err(|e| Refusal::Storage(e.to_string()))?;
        if let Some(object) = stored {
            self.bytes += answer_bytes(&item.key, &object);
            self.objects.push(RepairObject {
                bucket: item.bucket,
                key: item.key,
                object,
            });
        }
        Ok(true)
    }
}

/// The nodes of a coded request, checked: a level of the tree, valid indices, and not more
/// segments below them than the limit.
fn coded_nodes(
    shape: TreeShape,
    depth: u8,
    nodes: &SortedIndices,
    limits: &ReceiverLimits,
) -> Result<Vec<u32>, Refusal> {
    if depth > shape.depth() {
        return Err(Refusal::Invalid(format!("no level {depth}")));
    }
    let covered = nodes.len() as u64 * u64::from(shape.segments_per_node(depth));
    if covered > u64::from(limits.max_coded_segments) {
        return Err(Refusal::Invalid("too many segments to code".into()));
    }
    nodes.decode(shape.width(depth)).map_err(Refusal::Invalid)
}

fn segment_items(
    tree: &MerkleTree,
    source: &impl SegmentSource,
    segment: Segment,
) -> Result<Vec<SegmentItem>, Refusal> {
    match tree.segment_tokens(segment) {
        Some(tokens) => source
            .segment_items(tokens)
            .map_err(|e| Refusal::Storage(e.to_string())),
        None => Ok(Vec::new()),
    }
}

/// Short hashes of the children of `parents` (at `depth`), in order.
fn children_hashes(tree: &mut MerkleTree, probe: Probe, depth: u8, parents: &[u32]) -> Vec<u8> {
    let fanout = tree.shape().fanout() as usize;
    let mut out = Vec::with_capacity(parents.len() * fanout * usize::from(probe.node_hash_bytes));
    for &parent in parents {
        if let Some(children) = tree.children(depth, parent) {
            for &child in children {
                pack(
                    &mut out,
                    short_hash(child, probe.salt, probe.node_hash_bytes),
                    probe.node_hash_bytes,
                );
            }
        }
    }
    out
}
