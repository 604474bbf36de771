use super::exchange::{RequestBody, ResponseBody, SortedIndices};
use super::*;
use crate::ring::{key_token, Token, TokenRange};
use crate::storage::StorageError;
use crate::version::{Actor, CausalContext, Object, Value};
use bytes::Bytes;
use proptest::prelude::*;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

const FULL_RING: TokenRange = TokenRange { start: 7, end: 7 };

fn data(text: &str) -> Value {
    Value::Data {
        bytes: Bytes::copy_from_slice(text.as_bytes()),
        content_type: "text/plain".into(),
    }
}

fn key_of(i: usize) -> (String, Vec<u8>) {
    (format!("b{}", i % 2), format!("key-{i}").into_bytes())
}

type Contents = BTreeMap<(String, Vec<u8>), Object>;

/// One step of a random history between two replicas.
#[derive(Debug, Clone)]
enum Step {
    /// Replica `at` coordinates a write of `key` whose client read replica `seen_from`.
    Write {
        at: usize,
        key: usize,
        seen_from: Option<usize>,
        tombstone: bool,
    },
    /// Replica `to` merges in replica `from`'s object for `key`.
    Sync { from: usize, to: usize, key: usize },
}

fn step(keys: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            0..2usize,
            0..keys,
            proptest::option::of(0..2usize),
            proptest::bool::weighted(0.2)
        )
            .prop_map(|(at, key, seen_from, tombstone)| Step::Write {
                at,
                key,
                seen_from,
                tombstone
            }),
        (0..2usize, 0..keys).prop_map(|(from, key)| Step::Sync {
            from,
            to: 1 - from,
            key
        }),
    ]
}

/// Plays a history; both replicas' contents are what real replicas could hold.
fn play(steps: &[Step]) -> [Contents; 2] {
    let mut replicas: [Contents; 2] = [BTreeMap::new(), BTreeMap::new()];
    for (i, s) in steps.iter().enumerate() {
        match *s {
            Step::Write {
                at,
                key,
                seen_from,
                tombstone,
            } => {
                let k = key_of(key);
                let context = seen_from
                    .and_then(|r| replicas[r].get(&k))
                    .map(|o| o.causal_context())
                    .unwrap_or_else(CausalContext::empty);
                let value = if tombstone {
                    Value::Tombstone
                } else {
                    data(&format!("v{i}"))
                };
                let object = replicas[at].entry(k).or_default();
                object.apply_write(Actor::new(&format!("n{at}"), 1), &context, value);
            }
            Step::Sync { from, to, key } => {
                let k = key_of(key);
                if let Some(source) = replicas[from].get(&k).cloned() {
                    replicas[to].entry(k).or_default().merge_in(&source);
                }
            }
        }
    }
    replicas
}

fn replica(contents: &Contents, shape: TreeShape, ranges: &[TokenRange]) -> MemoryReplica {
    let mut trees = RangeTrees::new(ItemHasher::new(42), shape);
    trees.set_ranges(ranges.iter().copied());
    let mut replica = MemoryReplica::new(trees);
    for ((bucket, key), object) in contents {
        replica.put(bucket, key, object.clone());
    }
    replica
}

fn contents(replica: &MemoryReplica) -> Contents {
    replica
        .store
        .iter()
        .map(|(_, b, k, o)| ((b.to_string(), k.to_vec()), o.clone()))
        .collect()
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(message: &T) -> T {
    postcard::from_bytes(&postcard::to_allocvec(message).unwrap()).unwrap()
}

/// Runs one exchange over `range` to completion; returns the report and the keys that moved.
fn run_exchange(
    driver_side: &mut MemoryReplica,
    receiver_side: &mut MemoryReplica,
    range: TokenRange,
    config: ExchangeConfig,
    limits: &ReceiverLimits,
    seed: u64,
    duplicate: bool,
) -> (ExchangeReport, BTreeSet<(String, Vec<u8>)>) {
    let mut moved = BTreeSet::new();
    let mut driver = ExchangeDriver::new(ExchangeId(seed), range, config, seed);
    let mut request = match driver.start(&mut driver_side.trees) {
        DriverStep::Send(request) => request,
        DriverStep::Finished(report) => return (report, moved),
        DriverStep::Ignored => unreachable!("start never ignores"),
    };
    for _ in 0..100_000 {
        let out = handle_request(
            roundtrip(&request),
            &mut receiver_side.trees,
            &receiver_side.store,
            limits,
        );
        moved.extend(out.writes.iter().map(|w| (w.bucket.clone(), w.key.clone())));
        receiver_side.apply(out.writes);
        // A duplicated request: merged again (idempotent), answered again (ignored below).
        let duplicated = duplicate.then(|| {
            let again = handle_request(
                roundtrip(&request),
                &mut receiver_side.trees,
                &receiver_side.store,
                limits,
            );
            receiver_side.apply(again.writes);
            again.response
        });
        let out = driver.handle_response(
            roundtrip(&out.response),
            &mut driver_side.trees,
            &driver_side.store,
        );
        moved.extend(out.writes.iter().map(|w| (w.bucket.clone(), w.key.clone())));
        driver_side.apply(out.writes);
        if let Some(response) = duplicated {
            let late = driver.handle_response(response, &mut driver_side.trees, &driver_side.store);
            assert_eq!(late.step, DriverStep::Ignored);
        }
        match out.step {
            DriverStep::Send(next) => request = next,
            DriverStep::Finished(report) => return (report, moved),
            DriverStep::Ignored => panic!("the awaited answer was ignored"),
        }
    }
    panic!("exchange did not finish");
}

fn sent(step: DriverStep) -> ExchangeRequest {
    match step {
        DriverStep::Send(request) => request,
        DriverStep::Finished(report) => panic!("finished: {report:?}"),
        DriverStep::Ignored => panic!("ignored"),
    }
}

fn differing_keys(a: &Contents, b: &Contents) -> BTreeSet<(String, Vec<u8>)> {
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

fn shapes() -> impl Strategy<Value = TreeShape> {
    prop_oneof![
        Just((4, 1)),
        Just((4, 2)),
        Just((4, 4)),
        Just((6, 2)),
        Just((6, 3)),
        Just((8, 4))
    ]
    .prop_map(|(l, f)| TreeShape::new(l, f).unwrap())
}

/// Either the whole ring, or the ring cut at a few random tokens (both replicas agree).
fn ranges() -> impl Strategy<Value = Vec<TokenRange>> {
    prop_oneof![
        Just(vec![FULL_RING]),
        proptest::collection::btree_set(any::<u64>(), 2..5).prop_map(|cuts| {
            let cuts: Vec<Token> = cuts.into_iter().collect();
            (0..cuts.len())
                .map(|i| TokenRange {
                    start: cuts[(i + cuts.len() - 1) % cuts.len()],
                    end: cuts[i],
                })
                .collect()
        }),
    ]
}

/// Coded reconciliation: off, limited to a few segments, or unlimited; first prefixes from
/// far too small (decoding fails, extensions or the fallback run) to generous; symbol
/// budgets from one symbol (every decode of more than one difference fails) up.
fn coded_configs() -> impl Strategy<Value = (u32, u32, u32, u32, u32, bool)> {
    (
        prop_oneof![Just(0u32), 1..64u32, Just(1 << 18)],
        prop_oneof![1..20u32, 20..400u32],
        0..4u32,
        prop_oneof![1..8u32, Just(1 << 16)],
        // Items coded at most: none, a few (coding is declined or skipped), any.
        prop_oneof![Just(0u32), 1..30u32],
        any::<bool>(),
    )
}

fn configs() -> impl Strategy<Value = (ExchangeConfig, ReceiverLimits)> {
    (
        1..=8u8,
        3..=8u8,
        1..4usize,
        1..300usize,
        1..4usize,
        1..6usize,
        coded_configs(),
    )
        .prop_map(
            |(node_hash_bytes, item_hash_bytes, segments, push_bytes, wanted, items, coded)| {
                let (
                    coded_max_segments,
                    coded_symbols_per_hundred_keys,
                    coded_extensions,
                    coded_max_symbols,
                    coded_max_items,
                    coded_in_compare,
                ) = coded;
                (
                    ExchangeConfig {
                        node_hash_bytes,
                        item_hash_bytes,
                        max_segments_per_request: segments,
                        max_push_bytes: push_bytes,
                        max_wanted_per_request: wanted,
                        max_passes: 64,
                        coded_max_segments,
                        coded_symbols_per_hundred_keys,
                        coded_extensions,
                        coded_max_symbols,
                        coded_max_items,
                        coded_in_compare,
                    },
                    ReceiverLimits {
                        max_items_per_response: items,
                        max_response_bytes: push_bytes / 2,
                        ..ReceiverLimits::default()
                    },
                )
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// For any two replicas' contents, exchanging every range leaves both with the same
    /// objects and equal roots, and the keys that moved are exactly the keys that differed.
    #[test]
    fn exchange_converges_and_moves_exactly_the_differing_keys(
        steps in proptest::collection::vec(step(40), 0..120),
        shape in shapes(),
        ranges in ranges(),
        (config, limits) in configs(),
        seed in any::<u64>(),
        duplicate in any::<bool>(),
    ) {
        let [a, b] = play(&steps);
        let different = differing_keys(&a, &b);
        let (mut left, mut right) = (replica(&a, shape, &ranges), replica(&b, shape, &ranges));
        let mut moved = BTreeSet::new();
        let mut stats = ExchangeStats::default();
        for (i, &range) in ranges.iter().enumerate() {
            let (report, keys) = run_exchange(&mut left, &mut right, range, config.clone(), &limits, seed ^ i as u64, duplicate);
            prop_assert_eq!(&report.outcome, &ExchangeOutcome::Converged);
            moved.extend(keys);
            stats.add(&report.stats);
            let (l, r) = (left.trees.tree_mut(range).unwrap().root(), right.trees.tree_mut(range).unwrap().root());
            prop_assert_eq!(l, r);
        }
        prop_assert_eq!(contents(&left), contents(&right));
        prop_assert_eq!(&moved, &different);
        prop_assert_eq!(stats.keys_moved, different.len() as u64);
        prop_assert_eq!(stats.keys_different, different.len() as u64);
        // Both end with the causal join of what they held.
        for key in &different {
            let joined = match (a.get(key), b.get(key)) {
                (Some(x), Some(y)) => x.merge(y),
                (Some(x), None) | (None, Some(x)) => x.clone(),
                (None, None) => unreachable!(),
            };
            prop_assert_eq!(left.store.get(&key.0, &key.1), Some(&joined));
        }
    }

    /// With very short item hashes (collisions common) exchanges still converge: a hidden
    /// difference is found by a later pass, and every differing key moves.
    #[test]
    fn short_item_hashes_still_converge(
        steps in proptest::collection::vec(step(40), 0..120),
        shape in shapes(),
        item_hash_bytes in 1..=2u8,
        seed in any::<u64>(),
    ) {
        let [a, b] = play(&steps);
        let different = differing_keys(&a, &b);
        let (mut left, mut right) = (replica(&a, shape, &[FULL_RING]), replica(&b, shape, &[FULL_RING]));
        let config = ExchangeConfig { node_hash_bytes: 1, item_hash_bytes, max_passes: 1000, ..ExchangeConfig::default() };
        let (report, moved) = run_exchange(&mut left, &mut right, FULL_RING, config, &ReceiverLimits::default(), seed, false);
        prop_assert_eq!(report.outcome, ExchangeOutcome::Converged);
        prop_assert_eq!(contents(&left), contents(&right));
        prop_assert!(moved.is_superset(&different));
        // A key whose items a collision hid in one pass moves again in the next: counted
        // once (distinct keys per exchange).
        prop_assert_eq!(report.stats.keys_moved, moved.len() as u64);
    }

    /// Keeping a tree up to date by deltas gives exactly the tree rebuilt from scratch, whether
    /// or not inner nodes were read (refreshed) in between.
    #[test]
    fn delta_updates_equal_a_rebuild(
        steps in proptest::collection::vec(step(60), 0..200),
        shape in shapes(),
        ranges in ranges(),
        reads in proptest::collection::vec(any::<bool>(), 200),
    ) {
        let mut trees = RangeTrees::new(ItemHasher::new(7), shape);
        trees.set_ranges(ranges.iter().copied());
        let mut live = MemoryReplica::new(trees);
        let mut history: Vec<Contents> = Vec::new();
        for i in 0..steps.len() {
            let before = history.last().cloned().unwrap_or_default();
            // Replay the history one step at a time through the replica's write path.
            let now = play(&steps[..=i])[0].clone();
            for (key, object) in &now {
                if before.get(key) != Some(object) {
                    live.put(&key.0, &key.1, object.clone());
                }
            }
            if reads[i % reads.len()] {
                for range in &ranges {
                    live.trees.tree_mut(*range).unwrap().root();
                }
            }
            history.push(now);
        }
        let mut rebuilt = live.clone();
        rebuilt.rebuild_trees();
        for range in &ranges {
            let (x, y) = (live.trees.tree_mut(*range).unwrap(), rebuilt.trees.tree_mut(*range).unwrap());
            prop_assert_eq!(x.leaves(), y.leaves());
            prop_assert_eq!(x.root(), y.root());
            for depth in 0..shape.depth() {
                for index in 0..shape.width(depth) {
                    prop_assert_eq!(x.node(depth, index), y.node(depth, index));
                }
            }
        }
    }

    /// Every token of a range falls in exactly one segment, whose token range holds it;
    /// segments are contiguous and in token order.
    #[test]
    fn segments_partition_the_range(
        start in any::<u64>(),
        width in prop_oneof![Just(0u64), 1..100u64, any::<u64>()],
        shape in shapes(),
        probes in proptest::collection::vec(any::<u64>(), 1..50),
    ) {
        let range = TokenRange { start, end: start.wrapping_add(width) };
        let tree = MerkleTree::new(range, shape);
        for p in probes {
            let token = if width == 0 { p } else { start.wrapping_add(1 + p % width) };
            let segment = tree.segment_of(token).unwrap();
            let tokens = tree.segment_tokens(segment).unwrap();
            prop_assert!(tokens.contains(token));
            prop_assert!(range.contains(tokens.end));
        }
        // Consecutive segments touch: the end of one is the start of the next.
        let mut previous: Option<TokenRange> = None;
        for segment in 0..shape.leaves() {
            match (previous, tree.segment_tokens(segment)) {
                (Some(p), Some(s)) => prop_assert_eq!(p.end, s.start),
                (None, Some(s)) => prop_assert_eq!(s.start, start),
                (_, None) => {}
            }
            if let Some(s) = tree.segment_tokens(segment) {
                previous = Some(s);
            }
        }
        prop_assert_eq!(previous.unwrap().end, range.end);
    }
}

/// A source that counts the segments it was asked to scan.
struct CountingSource<'a> {
    inner: &'a MemoryStore,
    scans: Cell<usize>,
}

impl SegmentSource for CountingSource<'_> {
    fn segment_items(&self, tokens: TokenRange) -> Result<Vec<SegmentItem>, StorageError> {
        self.scans.set(self.scans.get() + 1);
        self.inner.segment_items(tokens)
    }

    fn object(&self, bucket: &str, key: &[u8]) -> Result<Option<Object>, StorageError> {
        self.inner.object(bucket, key)
    }
}

/// A new write to key `i` on `replica` (descending from its current version), so the
/// replicas differ by exactly that key.
fn overwrite(replica: &mut MemoryReplica, i: usize) {
    let (bucket, key) = key_of(i);
    let mut object = replica.store.get(&bucket, &key).unwrap().clone();
    object.apply_write(Actor::new("m", 1), &object.causal_context(), data("new"));
    replica.put(&bucket, &key, object);
}

fn filled(keys: usize, shape: TreeShape) -> MemoryReplica {
    let mut contents = Contents::new();
    for i in 0..keys {
        let mut object = Object::empty();
        object.apply_write(
            Actor::new("n", 1),
            &CausalContext::empty(),
            data(&format!("v{i}")),
        );
        contents.insert(key_of(i), object);
    }
    replica(&contents, shape, &[FULL_RING])
}

/// Replicas in sync: one round trip, roots only, and no data is read on either side.
#[test]
fn in_sync_exchange_is_one_round_trip_without_scans() {
    let (mut a, mut b) = (
        filled(500, TreeShape::DEFAULT),
        filled(500, TreeShape::DEFAULT),
    );
    let mut driver = ExchangeDriver::new(ExchangeId(1), FULL_RING, ExchangeConfig::default(), 9);
    let request = sent(driver.start(&mut a.trees));
    let source_b = CountingSource {
        inner: &b.store,
        scans: Cell::new(0),
    };
    let out = handle_request(request, &mut b.trees, &source_b, &ReceiverLimits::default());
    assert_eq!(out.response.body, ResponseBody::InSync);
    let source_a = CountingSource {
        inner: &a.store,
        scans: Cell::new(0),
    };
    let out = driver.handle_response(out.response, &mut a.trees, &source_a);
    let DriverStep::Finished(report) = out.step else {
        panic!("not finished")
    };
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    assert_eq!(report.stats.round_trips, 1);
    // The root, and (coding in the first request, the default) the 16 two-byte level-1
    // hashes and the coding bounds.
    assert!(
        report.stats.bytes_sent + report.stats.bytes_received < 72,
        "{:?}",
        report.stats
    );
    assert_eq!((source_a.scans.get(), source_b.scans.get()), (0, 0));
}

/// One differing key, coding off: the exchange scans only that key's segment on each side.
#[test]
fn one_difference_scans_one_segment() {
    let (mut a, mut b) = (
        filled(2000, TreeShape::DEFAULT),
        filled(2000, TreeShape::DEFAULT),
    );
    overwrite(&mut b, 5);
    let mut driver = ExchangeDriver::new(
        ExchangeId(1),
        FULL_RING,
        ExchangeConfig {
            coded_max_segments: 0,
            ..ExchangeConfig::default()
        },
        9,
    );
    let mut request = sent(driver.start(&mut a.trees));
    let source_a = CountingSource {
        inner: &a.store.clone(),
        scans: Cell::new(0),
    };
    let source_b = CountingSource {
        inner: &b.store.clone(),
        scans: Cell::new(0),
    };
    let report = loop {
        let out = handle_request(request, &mut b.trees, &source_b, &ReceiverLimits::default());
        let out = driver.handle_response(out.response, &mut a.trees, &source_a);
        for w in &out.writes {
            a.merge(&w.bucket, &w.key, &w.object);
        }
        match out.step {
            DriverStep::Send(next) => request = next,
            DriverStep::Finished(report) => break report,
            DriverStep::Ignored => unreachable!("nothing is duplicated here"),
        }
    };
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    assert_eq!(report.stats.leaves_mismatched, 1);
    assert_eq!(report.stats.keys_moved, 1);
    assert_eq!(report.stats.objects_pulled, 1);
    // Driver: items of the segment once. Receiver: items, then the wanted object's segment.
    assert_eq!((source_a.scans.get(), source_b.scans.get()), (1, 2));
    let (bucket, key) = key_of(5);
    assert_eq!(a.store.get(&bucket, &key), b.store.get(&bucket, &key));
}

/// Runs one exchange between two replicas, counting the scans on each side.
fn scanned_exchange(
    a: &mut MemoryReplica,
    b: &mut MemoryReplica,
    config: ExchangeConfig,
) -> (ExchangeReport, usize, usize, Vec<RequestBody>) {
    let mut driver = ExchangeDriver::new(ExchangeId(1), FULL_RING, config, 9);
    let mut request = sent(driver.start(&mut a.trees));
    let (mut scans_a, mut scans_b, mut bodies) = (0, 0, Vec::new());
    loop {
        bodies.push(request.body.clone());
        let source_b = CountingSource {
            inner: &b.store.clone(),
            scans: Cell::new(0),
        };
        let out = handle_request(request, &mut b.trees, &source_b, &ReceiverLimits::default());
        b.apply(out.writes);
        let source_a = CountingSource {
            inner: &a.store.clone(),
            scans: Cell::new(0),
        };
        let out = driver.handle_response(out.response, &mut a.trees, &source_a);
        a.apply(out.writes);
        scans_a += source_a.scans.get();
        scans_b += source_b.scans.get();
        match out.step {
            DriverStep::Send(next) => request = next,
            DriverStep::Finished(report) => return (report, scans_a, scans_b, bodies),
            DriverStep::Ignored => unreachable!("nothing is duplicated here"),
        }
    }
}

/// One differing key, coding on (the default): the first request carries the driver's
/// level-1 hashes, the receiver answers with the symbols below the one child that differs,
/// which decode the difference (no descent, no item lists); the key is pulled, and the
/// exchange takes 3 round trips instead of 6; the scans cover the mismatched level-1 node.
#[test]
fn one_difference_decodes_from_coded_symbols() {
    let (mut a, mut b) = (
        filled(2000, TreeShape::DEFAULT),
        filled(2000, TreeShape::DEFAULT),
    );
    overwrite(&mut b, 5);
    let (report, scans_a, scans_b, bodies) =
        scanned_exchange(&mut a, &mut b, ExchangeConfig::default());
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    assert_eq!(report.stats.keys_moved, 1);
    assert_eq!(report.stats.keys_different, 1);
    assert_eq!(report.stats.objects_pulled, 1);
    assert_eq!(report.stats.coded_fallbacks, 0);
    assert!(report.stats.coded_symbols >= 2, "{:?}", report.stats);
    assert_eq!(report.stats.round_trips, 3);
    assert!(matches!(bodies[0], RequestBody::CompareCoded { .. }));
    assert!(matches!(
        &bodies[1],
        RequestBody::Transfer { want, coded_want: Some(_), .. } if want.is_empty()
    ));
    // A level-1 node is 256 segments, scanned 16 at a time: the driver once for its short
    // hashes, then the one segment of its decoded (old) item, the receiver for the symbols
    // and for the want.
    assert_eq!((scans_a, scans_b), (17, 32));
    let (bucket, key) = key_of(5);
    assert_eq!(a.store.get(&bucket, &key), b.store.get(&bucket, &key));
}

/// A prefix too short to decode, with no extension allowed, falls back to the descent and
/// the item lists: the exchange still moves exactly the differing keys.
#[test]
fn coded_decoding_failure_falls_back_to_the_descent() {
    let (mut a, mut b) = (
        filled(2000, TreeShape::DEFAULT),
        filled(2000, TreeShape::DEFAULT),
    );
    for i in [3, 5, 8] {
        overwrite(&mut b, i);
    }
    let config = ExchangeConfig {
        coded_symbols_per_hundred_keys: 1,
        coded_extensions: 0,
        ..ExchangeConfig::default()
    };
    let (report, _, _, bodies) = scanned_exchange(&mut a, &mut b, config);
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    assert_eq!(report.stats.keys_moved, 3);
    assert_eq!(report.stats.coded_fallbacks, 1);
    assert!(bodies
        .iter()
        .any(|body| matches!(body, RequestBody::Items { .. })));
    assert_eq!(contents(&a), contents(&b));
}

/// Writes landing during an exchange keep roots apart; with one pass allowed it ends
/// `Diverged` instead of looping.
#[test]
fn concurrent_writes_end_diverged_after_max_passes() {
    let (mut a, mut b) = (
        filled(100, TreeShape::DEFAULT),
        filled(90, TreeShape::DEFAULT),
    );
    let config = ExchangeConfig {
        max_passes: 1,
        ..ExchangeConfig::default()
    };
    let mut driver = ExchangeDriver::new(ExchangeId(3), FULL_RING, config, 1);
    let mut request = sent(driver.start(&mut a.trees));
    let mut round = 0;
    let report = loop {
        let out = handle_request(request, &mut b.trees, &b.store, &ReceiverLimits::default());
        b.apply(out.writes);
        if round == 1 {
            let mut object = Object::empty();
            object.apply_write(Actor::new("x", 1), &CausalContext::empty(), data("late"));
            a.put("late", b"write", object);
        }
        round += 1;
        let out = driver.handle_response(out.response, &mut a.trees, &a.store);
        a.apply(out.writes);
        match out.step {
            DriverStep::Send(next) => request = next,
            DriverStep::Finished(report) => break report,
            DriverStep::Ignored => unreachable!("nothing is duplicated here"),
        }
    };
    assert_eq!(report.outcome, ExchangeOutcome::Diverged);
    assert_eq!(report.stats.keys_moved, 10);
}

/// A receiver limited to a few coded segments refuses a request for more (the driver's
/// scan budget is its own; the receiver bounds its work whatever the driver asks).
#[test]
fn receiver_bounds_coded_requests() {
    let mut b = filled(50, TreeShape::DEFAULT);
    let request = ExchangeRequest {
        exchange: ExchangeId(1),
        seq: 1,
        range: FULL_RING,
        shape: TreeShape::DEFAULT,
        probe: exchange::Probe {
            salt: 1,
            node_hash_bytes: 2,
            item_hash_bytes: 4,
        },
        body: RequestBody::Symbols {
            depth: 1,
            nodes: SortedIndices::from_sorted(&[0, 1]),
            from: 0,
            count: 8,
        },
        bucket: None,
    };
    let limits = ReceiverLimits {
        max_coded_segments: 256,
        ..ReceiverLimits::default()
    };
    let out = handle_request(request.clone(), &mut b.trees, &b.store, &limits);
    assert!(matches!(
        out.response.body,
        ResponseBody::Refused(Refusal::Invalid(_))
    ));
    // Within the limits: 8 symbols of 4 + 2 bytes.
    let out = handle_request(request, &mut b.trees, &b.store, &ReceiverLimits::default());
    assert!(matches!(
        out.response.body,
        ResponseBody::Symbols { from: 0, ref symbols } if symbols.len() == 48
    ));
}

/// A symbols answer of the wrong size or window ends the exchange as invalid.
/// A replica that holds nothing (a joiner) asks for whole segments' objects: every key moves
/// once, no item list is asked for, the receiver reads each segment once, and the exchange
/// takes a handful of round trips instead of the descent's, the lists' and the transfers'.
#[test]
fn an_empty_replica_pulls_whole_segments() {
    let mut a = filled(0, TreeShape::DEFAULT);
    let mut b = filled(3000, TreeShape::DEFAULT);
    let (report, scans_a, scans_b, bodies) =
        scanned_exchange(&mut a, &mut b, ExchangeConfig::default());
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    assert_eq!(report.stats.objects_pulled, 3000);
    assert_eq!(report.stats.keys_moved, 3000);
    assert_eq!(report.stats.objects_pushed, 0);
    assert!(bodies
        .iter()
        .all(|b| !matches!(b, RequestBody::Items { .. } | RequestBody::Transfer { .. })));
    let asked = bodies
        .iter()
        .filter(|b| matches!(b, RequestBody::SegmentObjects { .. }))
        .count();
    assert!(asked >= 1, "{bodies:?}");
    // The roots, one request per 512 segments (no descent: the driver's tree is empty
    // below every mismatched node), the verify.
    let leaves = TreeShape::DEFAULT.leaves() as u64;
    assert!(
        report.stats.round_trips <= 2 + leaves.div_ceil(512),
        "{:?}",
        report.stats
    );
    // At most one scan per segment on the receiver; the driver's, one per run of adjacent
    // segments.
    assert!(scans_b as u64 <= leaves, "{scans_b}");
    assert!(scans_a <= 2 * asked, "{scans_a}");
    assert_eq!(contents(&a), contents(&b));
}

/// A segment bigger than an answer may be: the receiver answers `done: 0` and the driver
/// lists that segment's items instead, whose objects then come in bounded answers.
#[test]
fn a_segment_too_big_for_one_answer_is_listed_instead() {
    let mut a = filled(0, TreeShape::DEFAULT);
    let mut b = filled(3000, TreeShape::DEFAULT);
    let limits = ReceiverLimits {
        max_response_bytes: 10,
        ..ReceiverLimits::default()
    };
    let range = FULL_RING;
    let (report, moved) = run_exchange(
        &mut a,
        &mut b,
        range,
        ExchangeConfig::default(),
        &limits,
        3,
        false,
    );
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    assert_eq!(report.stats.keys_moved, 3000);
    assert_eq!(moved.len(), 3000);
    assert_eq!(contents(&a), contents(&b));
    // And the receiver's answer to such a request is `done: 0` with no object.
    let mut driver = ExchangeDriver::new(ExchangeId(1), range, ExchangeConfig::default(), 1);
    let mut c = filled(0, TreeShape::DEFAULT);
    let mut request = sent(driver.start(&mut c.trees));
    request = loop {
        let out = handle_request(request, &mut b.trees, &b.store, &limits);
        let next = sent(
            driver
                .handle_response(out.response, &mut c.trees, &c.store)
                .step,
        );
        if matches!(next.body, RequestBody::SegmentObjects { .. }) {
            break next;
        }
        request = next;
    };
    let out = handle_request(request, &mut b.trees, &b.store, &limits);
    assert_eq!(
        out.response.body,
        ResponseBody::SegmentObjects {
            done: 0,
            objects: vec![]
        }
    );
}

/// Drives an exchange from an empty replica until its first `SegmentObjects` request.
fn until_segment_objects(
    driver: &mut ExchangeDriver,
    a: &mut MemoryReplica,
    b: &mut MemoryReplica,
) -> ExchangeRequest {
    let mut request = sent(driver.start(&mut a.trees));
    loop {
        if matches!(request.body, RequestBody::SegmentObjects { .. }) {
            return request;
        }
        let out = handle_request(request, &mut b.trees, &b.store, &ReceiverLimits::default());
        request = sent(
            driver
                .handle_response(out.response, &mut a.trees, &a.store)
                .step,
        );
    }
}

/// A fake source's answer to a `SegmentObjects` request, given how many segments it asked for.
type FakeSegmentAnswer<'a> = Box<dyn Fn(u32, &ExchangeRequest) -> ResponseBody + 'a>;

/// A `SegmentObjects` answer that does not match its request ends the exchange as failed.
#[test]
fn driver_rejects_bad_segment_objects() {
    let mut b = filled(300, TreeShape::DEFAULT);
    let foreign = {
        let mut object = Object::empty();
        object.apply_write(Actor::new("n", 1), &CausalContext::empty(), data("x"));
        object
    };
    let cases: Vec<(&str, FakeSegmentAnswer<'_>)> = vec![
        (
            "more segments done than asked",
            Box::new(|asked, _| ResponseBody::SegmentObjects {
                done: asked + 1,
                objects: vec![],
            }),
        ),
        (
            "objects with none done",
            Box::new(|_, _| ResponseBody::SegmentObjects {
                done: 0,
                objects: vec![RepairObject {
                    bucket: key_of(1).0,
                    key: key_of(1).1,
                    object: foreign.clone(),
                }],
            }),
        ),
        (
            "an object outside the segments answered",
            Box::new(|_, request| {
                // Only the first segment is answered; a key from another one comes along.
                let RequestBody::SegmentObjects { segments } = &request.body else {
                    unreachable!()
                };
                let first = segments.decode(TreeShape::DEFAULT.leaves()).unwrap()[0];
                let tree = MerkleTree::new(FULL_RING, TreeShape::DEFAULT);
                let outside = (0..10_000)
                    .map(key_of)
                    .find(|(b, k)| tree.segment_of(key_token(b, k)) != Some(first))
                    .unwrap();
                ResponseBody::SegmentObjects {
                    done: 1,
                    objects: vec![RepairObject {
                        bucket: outside.0,
                        key: outside.1,
                        object: foreign.clone(),
                    }],
                }
            }),
        ),
    ];
    for (name, body) in cases {
        let mut a = filled(0, TreeShape::DEFAULT);
        let mut driver =
            ExchangeDriver::new(ExchangeId(1), FULL_RING, ExchangeConfig::default(), 1);
        let request = until_segment_objects(&mut driver, &mut a, &mut b);
        let RequestBody::SegmentObjects { segments } = &request.body else {
            unreachable!()
        };
        let response = ExchangeResponse {
            exchange: request.exchange,
            seq: request.seq,
            body: body(segments.len() as u32, &request),
        };
        let out = driver.handle_response(response, &mut a.trees, &a.store);
        let DriverStep::Finished(report) = out.step else {
            panic!("{name}: {:?}", out.step)
        };
        assert!(
            matches!(
                report.outcome,
                ExchangeOutcome::Failed(ExchangeError::InvalidResponse(_))
            ),
            "{name}: {:?}",
            report.outcome
        );
        assert!(out.writes.is_empty(), "{name}");
    }
}

/// A key written on the (empty) driver after its tree was compared and before the
/// `SegmentObjects` answer came back is pushed to the receiver, and kept.
#[test]
fn a_key_written_during_segment_objects_is_pushed() {
    let mut a = filled(0, TreeShape::DEFAULT);
    let mut b = filled(300, TreeShape::DEFAULT);
    let mut driver = ExchangeDriver::new(ExchangeId(1), FULL_RING, ExchangeConfig::default(), 1);
    let mut request = until_segment_objects(&mut driver, &mut a, &mut b);
    let RequestBody::SegmentObjects { segments } = &request.body else {
        unreachable!()
    };
    let asked = segments.decode(TreeShape::DEFAULT.leaves()).unwrap();
    let tree = MerkleTree::new(FULL_RING, TreeShape::DEFAULT);
    // A key the receiver lacks, in one of the asked segments.
    let (bucket, key) = (300..100_000)
        .map(key_of)
        .find(|(b, k)| {
            tree.segment_of(key_token(b, k))
                .is_some_and(|s| asked.contains(&s))
        })
        .unwrap();
    let mut object = Object::empty();
    object.apply_write(Actor::new("w", 1), &CausalContext::empty(), data("late"));
    a.put(&bucket, &key, object.clone());
    let report = loop {
        let out = handle_request(request, &mut b.trees, &b.store, &ReceiverLimits::default());
        b.apply(out.writes);
        let out = driver.handle_response(out.response, &mut a.trees, &a.store);
        a.apply(out.writes);
        match out.step {
            DriverStep::Send(next) => request = next,
            DriverStep::Finished(report) => break report,
            DriverStep::Ignored => unreachable!(),
        }
    };
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    assert_eq!(report.stats.objects_pushed, 1);
    assert_eq!(report.stats.objects_pulled, 300);
    assert_eq!(b.store.get(&bucket, &key), Some(&object));
    assert_eq!(contents(&a), contents(&b));
}

#[test]
fn driver_rejects_malformed_symbols() {
    let (mut a, mut b) = (
        filled(200, TreeShape::DEFAULT),
        filled(200, TreeShape::DEFAULT),
    );
    overwrite(&mut b, 5);
    type Spoil = fn(u32, Vec<u8>) -> (u32, Vec<u8>);
    let spoils: [(&str, Spoil); 3] = [
        ("ragged", |from, mut symbols: Vec<u8>| {
            symbols.pop();
            (from, symbols)
        }),
        ("another window", |from: u32, symbols| (from + 1, symbols)),
        ("too few", |from, mut symbols: Vec<u8>| {
            symbols.truncate(6);
            (from, symbols)
        }),
    ];
    for (name, bad) in spoils {
        let config = ExchangeConfig {
            item_hash_bytes: 4,
            coded_in_compare: false,
            ..ExchangeConfig::default()
        };
        let mut driver = ExchangeDriver::new(ExchangeId(1), FULL_RING, config, 1);
        let compare = sent(driver.start(&mut a.trees));
        let out = handle_request(compare, &mut b.trees, &b.store, &ReceiverLimits::default());
        let out = driver.handle_response(out.response, &mut a.trees, &a.store);
        let request = sent(out.step);
        assert!(
            matches!(request.body, RequestBody::Symbols { .. }),
            "{name}"
        );
        let mut out = handle_request(request, &mut b.trees, &b.store, &ReceiverLimits::default());
        let ResponseBody::Symbols { from, symbols } = out.response.body else {
            panic!("{name}: {:?}", out.response.body);
        };
        let (from, symbols) = bad(from, symbols);
        out.response.body = ResponseBody::Symbols { from, symbols };
        let out = driver.handle_response(out.response, &mut a.trees, &a.store);
        match out.step {
            DriverStep::Finished(report) => assert!(
                matches!(
                    report.outcome,
                    ExchangeOutcome::Failed(ExchangeError::InvalidResponse(_))
                ),
                "{name}: {:?}",
                report.outcome
            ),
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// Hostile or broken requests are refused, and nothing is written.
#[test]
fn receiver_refuses_bad_requests() {
    let mut b = filled(50, TreeShape::DEFAULT);
    let probe = exchange::Probe {
        salt: 1,
        node_hash_bytes: 4,
        item_hash_bytes: 4,
    };
    let base = ExchangeRequest {
        exchange: ExchangeId(1),
        seq: 1,
        range: FULL_RING,
        shape: TreeShape::DEFAULT,
        probe,
        body: RequestBody::Verify,
        bucket: None,
    };
    let mut bad_object = Object::empty();
    bad_object.apply_write(Actor::new("n", 1), &CausalContext::empty(), data("x"));
    let valid = RepairObject {
        bucket: "b0".into(),
        key: b"fine".to_vec(),
        object: bad_object.clone(),
    };
    let cases: Vec<(&str, ExchangeRequest)> = vec![
        (
            "unknown range",
            ExchangeRequest {
                range: TokenRange { start: 1, end: 2 },
                ..base.clone()
            },
        ),
        (
            "other shape",
            ExchangeRequest {
                shape: TreeShape::new(8, 4).unwrap(),
                ..base.clone()
            },
        ),
        (
            "hash width 0",
            ExchangeRequest {
                probe: exchange::Probe {
                    node_hash_bytes: 0,
                    ..probe
                },
                ..base.clone()
            },
        ),
        (
            "hash width 9",
            ExchangeRequest {
                probe: exchange::Probe {
                    item_hash_bytes: 9,
                    ..probe
                },
                ..base.clone()
            },
        ),
        (
            "descend below leaves",
            ExchangeRequest {
                body: RequestBody::Descend {
                    depth: 3,
                    parents: SortedIndices::from_sorted(&[0]),
                },
                ..base.clone()
            },
        ),
        (
            "parent out of bounds",
            ExchangeRequest {
                body: RequestBody::Descend {
                    depth: 1,
                    parents: SortedIndices::from_sorted(&[16]),
                },
                ..base.clone()
            },
        ),
        (
            "repeated parents",
            ExchangeRequest {
                body: RequestBody::Descend {
                    depth: 2,
                    parents: roundtrip_gaps(&[3, 0]),
                },
                ..base.clone()
            },
        ),
        (
            "segment out of bounds",
            ExchangeRequest {
                body: RequestBody::Items {
                    segments: SortedIndices::from_sorted(&[4096]),
                },
                ..base.clone()
            },
        ),
        (
            "segment objects out of bounds",
            ExchangeRequest {
                body: RequestBody::SegmentObjects {
                    segments: SortedIndices::from_sorted(&[4096]),
                },
                ..base.clone()
            },
        ),
        (
            "bad bucket",
            ExchangeRequest {
                body: RequestBody::Transfer {
                    objects: vec![
                        valid.clone(),
                        RepairObject {
                            bucket: "no/slash".into(),
                            ..valid.clone()
                        },
                    ],
                    want: vec![],
                    coded_want: None,
                },
                ..base.clone()
            },
        ),
        (
            "empty key",
            ExchangeRequest {
                body: RequestBody::Transfer {
                    objects: vec![RepairObject {
                        key: vec![],
                        ..valid.clone()
                    }],
                    want: vec![],
                    coded_want: None,
                },
                ..base.clone()
            },
        ),
        (
            "object outside the range",
            ExchangeRequest {
                range: TokenRange { start: 0, end: 1 },
                body: RequestBody::Transfer {
                    objects: vec![valid.clone()],
                    want: vec![],
                    coded_want: None,
                },
                ..base.clone()
            },
        ),
        (
            "want of a bad segment",
            ExchangeRequest {
                body: RequestBody::Transfer {
                    objects: vec![],
                    want: vec![exchange::SegmentWant {
                        segment: 1 << 20,
                        hashes: vec![0; 4],
                    }],
                    coded_want: None,
                },
                ..base.clone()
            },
        ),
        (
            "symbols of a level below the leaves",
            ExchangeRequest {
                body: RequestBody::Symbols {
                    depth: 4,
                    nodes: SortedIndices::from_sorted(&[0]),
                    from: 0,
                    count: 4,
                },
                ..base.clone()
            },
        ),
        (
            "symbols of a node that does not exist",
            ExchangeRequest {
                body: RequestBody::Symbols {
                    depth: 1,
                    nodes: SortedIndices::from_sorted(&[16]),
                    from: 0,
                    count: 4,
                },
                ..base.clone()
            },
        ),
        (
            "no symbols",
            ExchangeRequest {
                body: RequestBody::Symbols {
                    depth: 1,
                    nodes: SortedIndices::from_sorted(&[0]),
                    from: 0,
                    count: 0,
                },
                ..base.clone()
            },
        ),
        (
            "too many symbols",
            ExchangeRequest {
                body: RequestBody::Symbols {
                    depth: 1,
                    nodes: SortedIndices::from_sorted(&[0]),
                    from: 0,
                    count: u32::MAX,
                },
                ..base.clone()
            },
        ),
        (
            "symbol window past the last index",
            ExchangeRequest {
                body: RequestBody::Symbols {
                    depth: 1,
                    nodes: SortedIndices::from_sorted(&[0]),
                    from: u32::MAX - 1,
                    count: 4,
                },
                ..base.clone()
            },
        ),
        (
            "ragged coded want",
            ExchangeRequest {
                body: RequestBody::Transfer {
                    objects: vec![],
                    want: vec![],
                    coded_want: Some(exchange::CodedWant {
                        depth: 1,
                        nodes: SortedIndices::from_sorted(&[0]),
                        hashes: vec![0; 5],
                    }),
                },
                ..base.clone()
            },
        ),
        (
            "coded want below a node that does not exist",
            ExchangeRequest {
                body: RequestBody::Transfer {
                    objects: vec![],
                    want: vec![],
                    coded_want: Some(exchange::CodedWant {
                        depth: 2,
                        nodes: SortedIndices::from_sorted(&[300]),
                        hashes: vec![0; 4],
                    }),
                },
                ..base.clone()
            },
        ),
        (
            "ragged want",
            ExchangeRequest {
                body: RequestBody::Transfer {
                    objects: vec![],
                    want: vec![exchange::SegmentWant {
                        segment: 1,
                        hashes: vec![0; 5],
                    }],
                    coded_want: None,
                },
                ..base.clone()
            },
        ),
    ];
    for (name, request) in cases {
        let out = handle_request(request, &mut b.trees, &b.store, &ReceiverLimits::default());
        assert!(
            matches!(out.response.body, ResponseBody::Refused(_)),
            "{name}: {:?}",
            out.response.body
        );
        assert!(out.writes.is_empty(), "{name}");
    }
    // An object breaking the version invariants (a sibling its context does not cover).
    let broken: Object = {
        let context_vv = crate::version::VersionVector::new();
        let good = Object::from_parts(bad_object.context().clone(), bad_object.siblings().to_vec())
            .unwrap();
        assert!(Object::from_parts(context_vv, good.siblings().to_vec()).is_none());
        // Serde bypasses from_parts: build the broken object through its encoding.
        let mut encoded = postcard::to_allocvec(&good).unwrap();
        let context_len = postcard::to_allocvec(good.context()).unwrap().len();
        encoded.splice(0..context_len, [0u8]);
        postcard::from_bytes(&encoded).unwrap()
    };
    let request = ExchangeRequest {
        body: RequestBody::Transfer {
            objects: vec![RepairObject {
                object: broken,
                ..valid
            }],
            want: vec![],
            coded_want: None,
        },
        ..base
    };
    let out = handle_request(request, &mut b.trees, &b.store, &ReceiverLimits::default());
    assert!(matches!(
        out.response.body,
        ResponseBody::Refused(Refusal::Invalid(_))
    ));
}

fn roundtrip_gaps(gaps: &[u32]) -> SortedIndices {
    postcard::from_bytes(&postcard::to_allocvec(&gaps.to_vec()).unwrap()).unwrap()
}

/// The driver ignores answers it is not waiting for (another exchange, a duplicate, a late
/// one) and ends the exchange on answers that break the protocol.
#[test]
fn driver_rejects_unexpected_answers() {
    let answer = |exchange: u64, seq: u32, body: ResponseBody| ExchangeResponse {
        exchange: ExchangeId(exchange),
        seq,
        body,
    };
    let cases: Vec<(&str, ExchangeResponse, Option<ExchangeError>)> = vec![
        ("another exchange", answer(2, 1, ResponseBody::InSync), None),
        ("stale seq", answer(1, 0, ResponseBody::InSync), None),
        ("future seq", answer(1, 2, ResponseBody::InSync), None),
        (
            "out of turn",
            answer(
                1,
                1,
                ResponseBody::Objects {
                    objects: vec![],
                    complete: true,
                },
            ),
            Some(ExchangeError::UnexpectedResponse),
        ),
        (
            "short hash list",
            answer(
                1,
                1,
                ResponseBody::Hashes {
                    depth: 1,
                    hashes: vec![1, 2, 3],
                },
            ),
            Some(ExchangeError::InvalidResponse(
                "hash list has the wrong size".into(),
            )),
        ),
        (
            "refused",
            answer(1, 1, ResponseBody::Refused(Refusal::UnknownRange)),
            Some(ExchangeError::Refused(Refusal::UnknownRange)),
        ),
    ];
    for (name, response, want) in cases {
        let mut a = filled(10, TreeShape::DEFAULT);
        let mut driver =
            ExchangeDriver::new(ExchangeId(1), FULL_RING, ExchangeConfig::default(), 1);
        sent(driver.start(&mut a.trees));
        let out = driver.handle_response(response, &mut a.trees, &a.store);
        match (out.step, want) {
            (DriverStep::Finished(report), Some(want)) => {
                assert_eq!(report.outcome, ExchangeOutcome::Failed(want), "{name}");
                assert!(driver.is_finished());
            }
            (DriverStep::Ignored, None) => assert!(!driver.is_finished(), "{name}"),
            (other, want) => panic!("{name}: {other:?}, wanted {want:?}"),
        }
    }
    // Once finished, every answer is ignored.
    let mut a = filled(10, TreeShape::DEFAULT);
    let mut driver = ExchangeDriver::new(ExchangeId(1), FULL_RING, ExchangeConfig::default(), 1);
    sent(driver.start(&mut a.trees));
    driver.abort();
    let out = driver.handle_response(answer(1, 1, ResponseBody::InSync), &mut a.trees, &a.store);
    assert_eq!(out.step, DriverStep::Ignored);
    let mut a = filled(10, TreeShape::DEFAULT);
    let mut driver = ExchangeDriver::new(
        ExchangeId(1),
        TokenRange { start: 1, end: 2 },
        ExchangeConfig::default(),
        1,
    );
    let DriverStep::Finished(report) = driver.start(&mut a.trees) else {
        panic!("started without a tree")
    };
    assert_eq!(
        report.outcome,
        ExchangeOutcome::Failed(ExchangeError::NoLocalTree)
    );
}

/// Persisted trees load back exactly (dense and sparse), and a damaged or foreign one is
/// refused.
#[test]
fn trees_persist_and_load() {
    let hasher = ItemHasher::new(42);
    for keys in [0usize, 10, 5000] {
        let mut a = filled(keys, TreeShape::DEFAULT);
        let tree = a.trees.tree_mut(FULL_RING).unwrap();
        let encoded = tree.encode(hasher.fingerprint());
        let mut loaded = MerkleTree::decode(&encoded, hasher.fingerprint()).unwrap();
        assert_eq!(loaded.leaves(), tree.leaves());
        assert_eq!(loaded.root(), tree.root());
        assert!(
            encoded.len() <= 4096 * 8 + 64,
            "{keys} keys: {} bytes",
            encoded.len()
        );
        if keys == 10 {
            assert!(
                encoded.len() < 200,
                "sparse encoding: {} bytes",
                encoded.len()
            );
        }
        assert_eq!(
            MerkleTree::decode(&encoded, ItemHasher::new(43).fingerprint()).unwrap_err(),
            TreeDecodeError::OtherKey
        );
        let mut damaged = encoded.clone();
        damaged[30] ^= 1;
        assert_eq!(
            MerkleTree::decode(&damaged, hasher.fingerprint()).unwrap_err(),
            TreeDecodeError::Checksum
        );
        assert_eq!(
            MerkleTree::decode(&encoded[..20], hasher.fingerprint()).unwrap_err(),
            TreeDecodeError::Checksum
        );
        assert_eq!(
            MerkleTree::decode(&[], hasher.fingerprint()).unwrap_err(),
            TreeDecodeError::Truncated
        );
    }
}

/// A node keeps trees for the ranges it replicates, and persists and reloads them.
#[test]
fn node_ranges_and_tree_persistence() {
    let nodes: Vec<crate::NodeId> = ["a", "b", "c", "d"]
        .iter()
        .map(crate::NodeId::new)
        .collect();
    let ring = crate::ring::Ring::new(&nodes, 16, 3);
    let ranges = replicated_ranges(&ring, &nodes[0]);
    let targets = repair_targets(&ring, &nodes[0]);
    assert!(!ranges.is_empty() && ranges.len() < 64);
    assert_eq!(targets.len(), ranges.len() * 2);
    assert!(targets
        .iter()
        .all(|(r, peer)| ranges.contains(r) && *peer != nodes[0]));
    let mut trees = RangeTrees::new(ItemHasher::new(3), TreeShape::DEFAULT);
    trees.set_ranges(ranges.iter().copied());
    let mut written = 0;
    for i in 0..2000u32 {
        written += usize::from(trees.record_write("b", &i.to_le_bytes(), None, Some(u64::from(i))));
    }
    assert!(written > 0 && written < 2000);
    let saved: Vec<Vec<u8>> = ranges
        .iter()
        .map(|r| trees.encode_tree(*r).unwrap())
        .collect();
    let mut reloaded = RangeTrees::new(ItemHasher::new(3), TreeShape::DEFAULT);
    reloaded.set_ranges(ranges.iter().copied());
    for bytes in &saved {
        reloaded.load_tree(bytes).unwrap();
    }
    for r in &ranges {
        assert_eq!(
            reloaded.tree_mut(*r).unwrap().root(),
            trees.tree_mut(*r).unwrap().root()
        );
    }
    let mut other_key = RangeTrees::new(ItemHasher::new(4), TreeShape::DEFAULT);
    other_key.set_ranges(ranges.iter().copied());
    assert_eq!(
        other_key.load_tree(&saved[0]),
        Err(TreeDecodeError::OtherKey)
    );
    let mut elsewhere = RangeTrees::new(ItemHasher::new(3), TreeShape::DEFAULT);
    assert_eq!(
        elsewhere.load_tree(&saved[0]),
        Err(TreeDecodeError::Corrupt)
    );
}

/// Shapes: table of accepted and refused (leaf_bits, fanout_bits), and their sizes.
#[test]
fn tree_shapes() {
    let cases = [
        (12, 4, Some((4096, 16, 3, 1 + 16 + 256))),
        (16, 4, Some((65536, 16, 4, 4369))),
        (15, 5, Some((32768, 32, 3, 1 + 32 + 1024))),
        (4, 1, Some((16, 2, 4, 15))),
        (12, 5, None),
        (3, 1, None),
        (19, 1, None),
        (12, 0, None),
        (14, 7, None),
    ];
    for (leaf_bits, fanout_bits, want) in cases {
        let got = TreeShape::new(leaf_bits, fanout_bits)
            .ok()
            .map(|s| (s.leaves(), s.fanout(), s.depth(), s.inner_nodes()));
        assert_eq!(got, want, "({leaf_bits}, {fanout_bits})");
    }
    assert!(TreeShape::DEFAULT.memory_bytes() < 36 * 1024);
    let bad: Result<TreeShape, _> = postcard::from_bytes(&[12, 5]);
    assert!(bad.is_err());
}

/// `locate` finds the range of a token among a node's ranges, including the one that wraps
/// past zero, and nothing in a gap.
#[test]
fn range_trees_locate() {
    let mut trees = RangeTrees::new(ItemHasher::new(1), TreeShape::DEFAULT);
    let wrap = TokenRange {
        start: u64::MAX - 100,
        end: 100,
    };
    let middle = TokenRange {
        start: 1000,
        end: 2000,
    };
    let created = trees.set_ranges([wrap, middle]);
    assert_eq!(created.len(), 2);
    let cases = [
        (0, Some(wrap)),
        (100, Some(wrap)),
        (u64::MAX, Some(wrap)),
        (101, None),
        (1000, None),
        (1001, Some(middle)),
        (2000, Some(middle)),
        (5000, None),
    ];
    for (token, want) in cases {
        assert_eq!(trees.locate(token).map(|(r, _)| r), want, "token {token}");
    }
    // Keeping a range keeps its tree; a new range starts empty.
    assert!(
        trees.record_write("b", b"k", None, Some(1)) || !trees.record_write("b", b"k", None, None)
    );
    assert_eq!(trees.set_ranges([middle, FULL_RING]), vec![FULL_RING]);
    assert_eq!(trees.memory_bytes(), 2 * TreeShape::DEFAULT.memory_bytes());
    let token = key_token("b", b"k");
    assert_eq!(
        trees.locate(token).map(|(r, _)| r),
        Some(if middle.contains(token) {
            middle
        } else {
            FULL_RING
        })
    );
}

/// The item hash is the same on the short (stack) and long (streaming) paths' boundary,
/// depends on every input, and never is 0.
#[test]
fn item_hashes() {
    let hasher = ItemHasher::new(5);
    let long_key = vec![7u8; 1000];
    assert_ne!(
        hasher.item_hash("b", &long_key, 1),
        hasher.item_hash("b", &long_key, 2)
    );
    assert_ne!(
        hasher.item_hash("b", b"k", 1),
        hasher.item_hash("c", b"k", 1)
    );
    assert_ne!(
        hasher.item_hash("b", b"k", 1),
        ItemHasher::new(6).item_hash("b", b"k", 1)
    );
    assert_ne!(
        hasher.item_hash("ab", b"c", 1),
        hasher.item_hash("a", b"bc", 1)
    );
    // The same input hashed through both code paths agrees.
    let key = vec![3u8; 247];
    let mut streaming = xxhash_rust::xxh3::Xxh3::with_seed(5);
    streaming.update(b"b");
    streaming.update(&[0]);
    streaming.update(&key);
    streaming.update(&9u64.to_le_bytes());
    assert_eq!(hasher.item_hash("b", &key, 9), streaming.digest().max(1));
    let key = vec![3u8; 248];
    let mut one_shot = b"b\0".to_vec();
    one_shot.extend_from_slice(&key);
    one_shot.extend_from_slice(&9u64.to_le_bytes());
    assert_eq!(
        hasher.item_hash("b", &key, 9),
        xxhash_rust::xxh3::xxh3_64_with_seed(&one_shot, 5).max(1)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A tree built in bounded batches from a scan, while writes (new keys, overwrites,
    /// removals) land between the batches and are recorded as usual, ends equal to a tree
    /// rebuilt at once from the final data; and it is not ready (not comparable) until the
    /// scan is done.
    #[test]
    fn trees_built_in_batches_under_writes_equal_a_rebuild(
        initial in 0usize..300,
        batch in 1usize..40,
        writes in proptest::collection::vec((0usize..400, 0u8..3), 0..120),
        range_start in any::<u64>(),
        whole_ring in any::<bool>(),
    ) {
        use crate::storage::{MemoryStorage, ScanCursor, Storage};
        let range = TokenRange {
            start: range_start,
            end: if whole_ring { range_start } else { range_start.wrapping_add(u64::MAX / 2) },
        };
        let storage = MemoryStorage::new();
        let hasher = ItemHasher::new(9);
        let object_for = |text: &str| {
            let mut object = Object::empty();
            object.apply_write(Actor::new("n", 1), &CausalContext::empty(), data(text));
            object
        };
        for i in 0..initial {
            let (bucket, key) = key_of(i);
            storage.put(&bucket, &key, &object_for("v0")).unwrap();
        }
        let mut trees = RangeTrees::new(hasher, TreeShape::new(6, 2).unwrap());
        prop_assert_eq!(trees.set_ranges_building([range]), vec![range]);
        prop_assert!(!trees.is_ready(range));
        let mut pending_writes = writes.into_iter();
        let mut after: Option<ScanCursor> = None;
        loop {
            // A few writes between two batches, recorded as the node records them.
            for (i, kind) in pending_writes.by_ref().take(3) {
                let (bucket, key) = key_of(i);
                let old = storage.get(&bucket, &key).unwrap().map(|o| o.digest());
                let new = if kind == 0 {
                    storage.remove(&bucket, &key).unwrap();
                    None
                } else {
                    let object = object_for(&format!("v{kind}-{i}"));
                    storage.put(&bucket, &key, &object).unwrap();
                    Some(object.digest())
                };
                trees.record_write(&bucket, &key, old, new);
            }
            let (building, progress) = trees.next_build().expect("still building");
            prop_assert_eq!(building, range);
            prop_assert_eq!(&progress, &after);
            let scanned = storage.scan_range_batch(range, after.as_ref(), batch).unwrap();
            prop_assert!(scanned.rows.len() <= batch);
            let done = scanned.resume.is_none();
            after = scanned.resume.clone();
            trees.add_built(
                range,
                scanned.rows.iter().map(|(b, k, o)| (b.as_str(), k.as_slice(), o.digest())),
                scanned.resume,
            );
            if done {
                break;
            }
            prop_assert!(!trees.is_ready(range));
        }
        prop_assert!(trees.is_ready(range));
        prop_assert!(!trees.is_building());
        // Writes after the build update the tree as usual.
        for (i, kind) in pending_writes {
            let (bucket, key) = key_of(i);
            let old = storage.get(&bucket, &key).unwrap().map(|o| o.digest());
            let object = object_for(&format!("late{kind}-{i}"));
            storage.put(&bucket, &key, &object).unwrap();
            trees.record_write(&bucket, &key, old, Some(object.digest()));
        }
        let rows = storage.scan_range(range).unwrap();
        let mut rebuilt = RangeTrees::new(hasher, TreeShape::new(6, 2).unwrap());
        rebuilt.set_ranges([range]);
        rebuilt.rebuild(range, rows.iter().map(|(b, k, o)| (b.as_str(), k.as_slice(), o.digest())));
        prop_assert!(rebuilt.is_ready(range));
        let built = trees.tree_mut(range).unwrap().root();
        prop_assert_eq!(built, rebuilt.tree_mut(range).unwrap().root());
    }
}

/// A receiver whose tree for the range is still building refuses an exchange with
/// `TreeNotReady` (the driver retries later) instead of answering from a partial tree.
#[test]
fn a_building_tree_refuses_exchanges() {
    let range = TokenRange {
        start: 1,
        end: 1_000_000,
    };
    let mut trees = RangeTrees::new(ItemHasher::new(1), TreeShape::DEFAULT);
    trees.set_ranges_building([range]);
    let mut ready = RangeTrees::new(ItemHasher::new(1), TreeShape::DEFAULT);
    ready.set_ranges([range]);
    ready.rebuild(range, std::iter::empty());
    let mut driver = ExchangeDriver::new(ExchangeId(1), range, ExchangeConfig::default(), 5);
    let DriverStep::Send(request) = driver.start(&mut ready) else {
        panic!("a ready tree starts an exchange");
    };
    struct Empty;
    impl SegmentSource for Empty {
        fn segment_items(&self, _: TokenRange) -> Result<Vec<SegmentItem>, StorageError> {
            Ok(Vec::new())
        }
        fn object(&self, _: &str, _: &[u8]) -> Result<Option<Object>, StorageError> {
            Ok(None)
        }
    }
    let output = handle_request(request, &mut trees, &Empty, &ReceiverLimits::default());
    assert!(matches!(
        output.response.body,
        ResponseBody::Refused(exchange::Refusal::TreeNotReady)
    ));
}

/// The config of the phantom-decode regression: coding from the first informative level,
/// one symbol first and no extension, so a prefix of one symbol (the XOR of every
/// difference) is peeled as is.
fn one_symbol_config() -> ExchangeConfig {
    ExchangeConfig {
        item_hash_bytes: 4,
        coded_max_segments: 1 << 12,
        coded_symbols_per_hundred_keys: 1,
        coded_extensions: 0,
        coded_max_symbols: 1,
        max_passes: 8,
        ..ExchangeConfig::default()
    }
}

/// Three keys only the driver holds.
fn three_new_keys() -> (MemoryReplica, MemoryReplica) {
    let mut contents = Contents::new();
    for i in [0, 6, 11] {
        let mut object = Object::empty();
        object.apply_write(
            Actor::new("n0", 1),
            &CausalContext::empty(),
            data(&format!("v{i}")),
        );
        contents.insert(key_of(i), object);
    }
    (
        replica(&contents, TreeShape::DEFAULT, &[FULL_RING]),
        replica(&Contents::new(), TreeShape::DEFAULT, &[FULL_RING]),
    )
}

/// Regression (the property test above failed once with `keys_different` 19 for 18
/// differing keys, every key moved exactly): a one-symbol prefix is the XOR of every
/// difference, and with three items of the driver its count is 3, i.e. -1 modulo 4, so it
/// passes for one item of the receiver's whenever the XOR of their 14-bit checksums equals
/// the checksum of their XOR (about one salt in 16,000; seed 17276 is the first). The pass
/// wanted that phantom, nothing came back, `Verify` found the roots apart, and the second
/// pass found the three keys. The want was counted as a difference when it was asked for;
/// it is now counted only when an object that differs comes back.
#[test]
fn a_phantom_decoded_want_is_not_a_difference() {
    let (mut a, mut b) = three_new_keys();
    let (report, moved) = run_exchange(
        &mut a,
        &mut b,
        FULL_RING,
        one_symbol_config(),
        &ReceiverLimits::default(),
        17276,
        false,
    );
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    // The phantom happened: pass 1 decoded (no fallback) yet moved nothing; pass 2 fell
    // back to the descent and moved the three keys.
    assert_eq!(report.stats.passes, 2, "{:?}", report.stats);
    assert_eq!(report.stats.coded_fallbacks, 1, "{:?}", report.stats);
    assert_eq!(moved.len(), 3);
    assert_eq!(report.stats.keys_moved, 3);
    assert_eq!(report.stats.keys_different, 3, "{:?}", report.stats);
    assert_eq!(contents(&a), contents(&b));
}

/// With `coded_max_items` below what a level-1 node holds (2,000 keys: ~125 a level-1
/// node, ~8 a level-2 node), the receiver stops its scan at the bound and declines (the
/// differing children come back without symbols), the driver descends one level and codes
/// the level-2 node instead, having scanned its own items first within the bound. Still
/// exact. Without a bound the same difference is coded at level 1.
#[test]
fn coded_item_bound_declines_level_one_and_codes_deeper() {
    let (mut a, mut b) = (
        filled(2000, TreeShape::DEFAULT),
        filled(2000, TreeShape::DEFAULT),
    );
    overwrite(&mut b, 5);
    let config = ExchangeConfig {
        coded_max_items: 40,
        ..ExchangeConfig::default()
    };
    let (report, _, _, bodies) = scanned_exchange(&mut a, &mut b, config);
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    assert_eq!(report.stats.keys_moved, 1);
    assert_eq!(report.stats.keys_different, 1);
    assert_eq!(report.stats.coded_fallbacks, 0);
    assert!(matches!(bodies[0], RequestBody::CompareCoded { .. }));
    assert!(matches!(bodies[1], RequestBody::Descend { depth: 1, .. }));
    assert!(
        matches!(bodies[2], RequestBody::Symbols { depth: 2, .. }),
        "{bodies:?}"
    );
    assert!(!bodies
        .iter()
        .any(|body| matches!(body, RequestBody::Items { .. })));
    assert!(report.stats.keys_compared <= 40, "{:?}", report.stats);
    assert_eq!(contents(&a), contents(&b));

    // A bound below even a level-2 node's items: the descent and the item lists.
    let (mut a, mut b) = (
        filled(2000, TreeShape::DEFAULT),
        filled(2000, TreeShape::DEFAULT),
    );
    overwrite(&mut b, 5);
    let config = ExchangeConfig {
        coded_max_items: 1,
        ..ExchangeConfig::default()
    };
    let (report, _, _, bodies) = scanned_exchange(&mut a, &mut b, config);
    assert_eq!(report.outcome, ExchangeOutcome::Converged);
    assert_eq!(report.stats.keys_moved, 1);
    assert_eq!(report.stats.coded_symbols, 0);
    assert!(bodies
        .iter()
        .any(|body| matches!(body, RequestBody::Items { .. })));
    assert_eq!(contents(&a), contents(&b));
}

/// `CompareCoded` with the wrong number of child hashes is refused; a `CodedSymbols`
/// answer with a bitmap of the wrong size or a bit past the fanout, or ragged symbols,
/// ends the exchange as invalid.
#[test]
fn malformed_coded_compare_and_answers_are_rejected() {
    let (mut a, mut b) = (
        filled(200, TreeShape::DEFAULT),
        filled(200, TreeShape::DEFAULT),
    );
    overwrite(&mut b, 5);

    let mut driver = ExchangeDriver::new(ExchangeId(1), FULL_RING, ExchangeConfig::default(), 1);
    let mut request = sent(driver.start(&mut a.trees));
    let RequestBody::CompareCoded { children, .. } = &mut request.body else {
        panic!("{:?}", request.body);
    };
    children.pop();
    let out = handle_request(request, &mut b.trees, &b.store, &ReceiverLimits::default());
    assert!(matches!(
        out.response.body,
        ResponseBody::Refused(Refusal::Invalid(_))
    ));

    type Spoil = fn(Vec<u8>, Vec<u8>) -> (Vec<u8>, Vec<u8>);
    let spoils: [(&str, Spoil); 4] = [
        ("short bitmap", |mut nodes, symbols| {
            nodes.pop();
            (nodes, symbols)
        }),
        ("long bitmap", |mut nodes, symbols| {
            nodes.push(0);
            (nodes, symbols)
        }),
        ("every node", |nodes: Vec<u8>, symbols| {
            (vec![0xff; nodes.len()], symbols)
        }),
        ("ragged symbols", |nodes, mut symbols: Vec<u8>| {
            symbols.pop();
            (nodes, symbols)
        }),
    ];
    for (name, bad) in spoils {
        let mut driver =
            ExchangeDriver::new(ExchangeId(1), FULL_RING, ExchangeConfig::default(), 1);
        let request = sent(driver.start(&mut a.trees));
        let mut out = handle_request(request, &mut b.trees, &b.store, &ReceiverLimits::default());
        let ResponseBody::CodedSymbols { nodes, symbols } = out.response.body else {
            panic!("{name}: {:?}", out.response.body);
        };
        assert!(!symbols.is_empty(), "{name}");
        let (nodes, symbols) = bad(nodes, symbols);
        out.response.body = ResponseBody::CodedSymbols { nodes, symbols };
        let out = driver.handle_response(out.response, &mut a.trees, &a.store);
        match out.step {
            DriverStep::Finished(report) => assert!(
                matches!(
                    report.outcome,
                    ExchangeOutcome::Failed(ExchangeError::InvalidResponse(_))
                ),
                "{name}: {:?}",
                report.outcome
            ),
            other => panic!("{name}: {other:?}"),
        }
    }
}
