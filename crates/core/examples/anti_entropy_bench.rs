//! Anti-entropy benchmark: two in-memory replicas of 1,000,000 keys (100-byte values) laid
//! out as one node of a 3-node ring (16 vnodes, RF 3: 48 ranges, one tree each).
//!
//! (a) replicas in sync: time and bytes of a full comparison (every range);
//! (b) 0.1%, 1%, 10% of keys divergent: time, bytes, keys moved / keys divergent, metadata
//!     bytes per divergent key;
//! (c) tree upkeep per write, against a plain BTreeMap insert;
//! and the memory of a node's trees.
//!
//! Run: `cargo run --release -p mendkv-core --example anti_entropy_bench [-- KEYS]`

use bytes::Bytes;
use mendkv_core::anti_entropy::exchange::{RequestBody, ResponseBody};
use mendkv_core::anti_entropy::{
    handle_request, DriverStep, ExchangeConfig, ExchangeDriver, ExchangeId, ExchangeOutcome,
    ExchangeStats, ItemHasher, MemoryReplica, MemoryStore, RangeTrees, ReceiverLimits, SegmentItem,
    SegmentSource, TreeShape,
};
use mendkv_core::ring::{key_token, Ring, TokenRange};
use mendkv_core::storage::StorageError;
use mendkv_core::version::{Actor, CausalContext, Object, Value};
use mendkv_core::NodeId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

const BUCKET: &str = "bench";

fn value(rng: &mut ChaCha8Rng) -> Value {
    let mut bytes = vec![0u8; 100];
    rng.fill(&mut bytes[..]);
    Value::Data {
        bytes: Bytes::from(bytes),
        content_type: String::new(),
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("key-{i:08}").into_bytes()
}

/// A source that counts scans and the items they list (an in-sync comparison must read no
/// data).
struct Counting<'a> {
    inner: &'a MemoryStore,
    scans: Cell<u64>,
    items: Cell<u64>,
}

impl<'a> Counting<'a> {
    fn new(inner: &'a MemoryStore) -> Self {
        Counting {
            inner,
            scans: Cell::new(0),
            items: Cell::new(0),
        }
    }
}

impl SegmentSource for Counting<'_> {
    fn segment_items(&self, tokens: TokenRange) -> Result<Vec<SegmentItem>, StorageError> {
        self.scans.set(self.scans.get() + 1);
        let items = self.inner.segment_items(tokens)?;
        self.items.set(self.items.get() + items.len() as u64);
        Ok(items)
    }
    fn object(&self, bucket: &str, key: &[u8]) -> Result<Option<Object>, StorageError> {
        self.inner.object(bucket, key)
    }
}

#[derive(Default)]
struct Run {
    stats: ExchangeStats,
    /// Bytes of `Transfer` requests and `Objects` answers (the rest is discovery).
    transfer_bytes: u64,
    scans: u64,
    /// Items listed by those scans, both sides.
    items_scanned: u64,
    elapsed: Duration,
    not_converged: usize,
}

/// Exchanges every range between two replicas, messages encoded and decoded as on a wire.
fn repair_all(
    a: &mut MemoryReplica,
    b: &mut MemoryReplica,
    ranges: &[TokenRange],
    config: &ExchangeConfig,
) -> Run {
    let mut run = Run::default();
    let limits = ReceiverLimits::default();
    let started = Instant::now();
    for (i, &range) in ranges.iter().enumerate() {
        let mut driver = ExchangeDriver::new(
            ExchangeId(i as u64),
            range,
            config.clone(),
            0x5eed ^ i as u64,
        );
        let mut step = driver.start(&mut a.trees);
        loop {
            let request = match step {
                DriverStep::Send(request) => request,
                DriverStep::Ignored => unreachable!("no duplicates here"),
                DriverStep::Finished(report) => {
                    run.not_converged += usize::from(report.outcome != ExchangeOutcome::Converged);
                    run.stats.add(&report.stats);
                    break;
                }
            };
            let wire = postcard::to_allocvec(&request).unwrap();
            if matches!(request.body, RequestBody::Transfer { .. }) {
                run.transfer_bytes += wire.len() as u64;
            }
            let source_b = Counting::new(&b.store);
            let out = handle_request(
                postcard::from_bytes(&wire).unwrap(),
                &mut b.trees,
                &source_b,
                &limits,
            );
            run.scans += source_b.scans.get();
            run.items_scanned += source_b.items.get();
            b.apply(out.writes);
            let wire = postcard::to_allocvec(&out.response).unwrap();
            if matches!(out.response.body, ResponseBody::Objects { .. }) {
                run.transfer_bytes += wire.len() as u64;
            }
            let source_a = Counting::new(&a.store);
            let out = driver.handle_response(
                postcard::from_bytes(&wire).unwrap(),
                &mut a.trees,
                &source_a,
            );
            run.scans += source_a.scans.get();
            run.items_scanned += source_a.items.get();
            a.apply(out.writes);
            step = out.step;
        }
    }
    run.elapsed = started.elapsed();
    run
}

fn kib(bytes: u64) -> String {
    if bytes < 10 * 1024 {
        format!("{bytes} B")
    } else if bytes < 10 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    }
}

/// Makes `count` keys differ between the replicas, in five ways, and returns how many keys
/// now differ.
fn diverge(
    a: &mut MemoryReplica,
    b: &mut MemoryReplica,
    keys: usize,
    count: usize,
    rng: &mut ChaCha8Rng,
) -> usize {
    let chosen = rand::seq::index::sample(rng, keys, count);
    let actor_a = Actor::new("n1", 2);
    let actor_b = Actor::new("n2", 2);
    for (n, i) in chosen.into_iter().enumerate() {
        let k = key(i);
        match n % 5 {
            // A newer.
            0 => {
                let mut o = a.store.get(BUCKET, &k).unwrap().clone();
                o.apply_write(actor_a, &o.causal_context(), value(rng));
                a.put(BUCKET, &k, o);
            }
            // B newer.
            1 => {
                let mut o = b.store.get(BUCKET, &k).unwrap().clone();
                o.apply_write(actor_b, &o.causal_context(), value(rng));
                b.put(BUCKET, &k, o);
            }
            // Concurrent writes on both: siblings after the merge.
            2 => {
                let mut o = a.store.get(BUCKET, &k).unwrap().clone();
                o.apply_write(actor_a, &o.causal_context(), value(rng));
                a.put(BUCKET, &k, o);
                let mut o = b.store.get(BUCKET, &k).unwrap().clone();
                o.apply_write(actor_b, &o.causal_context(), value(rng));
                b.put(BUCKET, &k, o);
            }
            // Deleted on A only (the tombstone travels).
            3 => {
                let mut o = a.store.get(BUCKET, &k).unwrap().clone();
                o.apply_write(actor_a, &o.causal_context(), Value::Tombstone);
                a.put(BUCKET, &k, o);
            }
            // A key B never saw.
            _ => {
                let mut o = Object::empty();
                o.apply_write(actor_a, &CausalContext::empty(), value(rng));
                a.put(BUCKET, format!("new-{i:08}").as_bytes(), o);
            }
        }
    }
    count
}

fn same(a: &mut MemoryReplica, b: &mut MemoryReplica, ranges: &[TokenRange]) -> bool {
    ranges
        .iter()
        .all(|r| a.trees.tree_mut(*r).unwrap().root() == b.trees.tree_mut(*r).unwrap().root())
        && a.store.len() == b.store.len()
        && a.store.iter().zip(b.store.iter()).all(|(x, y)| x == y)
}

fn main() {
    let keys: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let nodes: Vec<NodeId> = ["n1", "n2", "n3"].iter().map(NodeId::new).collect();
    let ring = Ring::new(&nodes, 16, 3);
    let ranges: Vec<TokenRange> = ring
        .ranges()
        .into_iter()
        .filter(|(_, list)| list.contains(&nodes[0]))
        .map(|(r, _)| r)
        .collect();
    let shape = TreeShape::DEFAULT;
    let hasher = ItemHasher::from_cluster_secret(b"bench cluster");
    let mut trees = RangeTrees::new(hasher, shape);
    trees.set_ranges(ranges.iter().copied());

    println!("mendkv anti-entropy benchmark: {keys} keys x 100-byte values, {} ranges (3 nodes, 16 vnodes, RF 3)", ranges.len());
    println!(
        "tree shape: {} leaves, fanout {} (depth {}); {} per tree, {} per node ({} trees)\n",
        shape.leaves(),
        shape.fanout(),
        shape.depth(),
        kib(shape.memory_bytes() as u64),
        kib(trees.memory_bytes() as u64),
        trees.len()
    );

    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let started = Instant::now();
    let mut base = MemoryReplica::new(trees);
    let actor = Actor::new("n1", 1);
    for i in 0..keys {
        let mut o = Object::empty();
        o.apply_write(actor, &CausalContext::empty(), value(&mut rng));
        base.put(BUCKET, &key(i), o);
    }
    println!(
        "loaded {keys} keys (store + trees) in {:.2?}",
        started.elapsed()
    );

    // (a) in sync.
    let config = ExchangeConfig::default();
    let (mut a, mut b) = (base.clone(), base.clone());
    let first = repair_all(&mut a, &mut b, &ranges, &config);
    let again = repair_all(&mut a, &mut b, &ranges, &config);
    println!(
        "\n(a) replicas in sync, full comparison of {} ranges",
        ranges.len()
    );
    println!("| run | time | bytes on the wire | round trips | segments scanned |");
    println!("|---|---|---|---|---|");
    for (name, run) in [
        (
            "first (inner nodes computed lazily after the bulk load)",
            &first,
        ),
        ("steady state", &again),
    ] {
        println!(
            "| {name} | {:.2?} | {} | {} | {} |",
            run.elapsed,
            run.stats.bytes_sent + run.stats.bytes_received,
            run.stats.round_trips,
            run.scans
        );
    }

    // (b) divergence.
    println!(
        "\n(b) divergent replicas (mix: A newer, B newer, concurrent, deleted on A, missing on B)"
    );
    println!("| config | divergent | time | bytes on the wire | discovery bytes | keys moved / divergent | metadata B / divergent key | discovery B / divergent key | leaves mismatched | round trips | passes | converged | coded symbols (fallbacks) | items scanned / divergent key |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let fanout_8 = TreeShape::new(12, 3).unwrap();
    // The rows before coding existed: descent to the leaves, then item lists (4-byte item
    // hashes, the default then).
    let lists = ExchangeConfig {
        item_hash_bytes: 4,
        coded_max_segments: 0,
        ..ExchangeConfig::default()
    };
    // The coded protocol of the first coded run: 4-byte items, symbols asked for after the
    // receiver's level-1 hashes.
    let coded_old = ExchangeConfig {
        item_hash_bytes: 4,
        coded_in_compare: false,
        ..ExchangeConfig::default()
    };
    let variants = [
        (
            "fanout 16, 2-byte node hashes, item lists (the old default)",
            shape,
            lists.clone(),
        ),
        (
            "fanout 16, 4-byte node hashes, item lists",
            shape,
            ExchangeConfig {
                node_hash_bytes: 4,
                ..lists.clone()
            },
        ),
        (
            "fanout 8, 2-byte node hashes, item lists",
            fanout_8,
            lists.clone(),
        ),
        (
            "fanout 16, coded symbols below mismatched nodes (first coded default: 4-byte items, Symbols after level 1)",
            shape,
            coded_old.clone(),
        ),
        (
            "fanout 16, coded symbols, at most 512 segments coded (first coded protocol)",
            shape,
            ExchangeConfig {
                coded_max_segments: 512,
                ..coded_old.clone()
            },
        ),
        (
            "NEW: item lists, 3-byte item hashes",
            shape,
            ExchangeConfig {
                coded_max_segments: 0,
                ..ExchangeConfig::default()
            },
        ),
        (
            "NEW: coded from the first request, 3-byte items (default)",
            shape,
            ExchangeConfig::default(),
        ),
        (
            "NEW: 3-byte items, coded after the receiver's level-1 hashes (no CompareCoded)",
            shape,
            ExchangeConfig {
                coded_in_compare: false,
                ..ExchangeConfig::default()
            },
        ),
        (
            "NEW: bounded coding (ExchangeConfig::bounded_coding: <= 512 segments, <= 4096 items coded)",
            shape,
            ExchangeConfig::bounded_coding(),
        ),
    ];
    let mut base_fanout_8 = MemoryReplica {
        store: base.store.clone(),
        trees: RangeTrees::new(hasher, fanout_8),
    };
    base_fanout_8.trees.set_ranges(ranges.iter().copied());
    base_fanout_8.rebuild_trees();
    for share in [0.001, 0.01, 0.1] {
        for (name, variant_shape, config) in &variants {
            let start = if *variant_shape == shape {
                &base
            } else {
                &base_fanout_8
            };
            let (mut a, mut b) = (start.clone(), start.clone());
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let divergent = diverge(
                &mut a,
                &mut b,
                keys,
                (keys as f64 * share) as usize,
                &mut rng,
            );
            let run = repair_all(&mut a, &mut b, &ranges, config);
            let s = &run.stats;
            let total = s.bytes_sent + s.bytes_received;
            let discovery = total - run.transfer_bytes;
            let converged = same(&mut a, &mut b, &ranges) && run.not_converged == 0;
            println!(
                "| {name} | {divergent} ({:.1}%) | {:.2?} | {} | {} | {}/{} = {:.4} | {:.1} | {:.1} | {} | {} | {} | {} | {} ({}) | {:.0} |",
                share * 100.0,
                run.elapsed,
                kib(total),
                kib(discovery),
                s.keys_moved,
                divergent,
                s.keys_moved as f64 / divergent as f64,
                s.metadata_bytes() as f64 / divergent as f64,
                discovery as f64 / divergent as f64,
                s.leaves_mismatched,
                s.round_trips,
                s.passes,
                converged,
                s.coded_symbols,
                s.coded_fallbacks,
                run.items_scanned as f64 / divergent as f64,
            );
        }
    }

    // (c) tree upkeep per write. Each figure is the best of three runs (the machine is shared).
    let updates = keys.min(200_000);
    println!(
        "\n(c) tree upkeep per write ({updates} updates of existing keys, random order, best of 3)"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let picks: Vec<usize> = (0..updates).map(|_| rng.gen_range(0..keys)).collect();
    let mut plain: BTreeMap<(String, Vec<u8>), Object> = base
        .store
        .iter()
        .map(|(_, b, k, o)| ((b.to_string(), k.to_vec()), o.clone()))
        .collect();
    let prepared: Vec<((String, Vec<u8>), Object, Object)> = picks
        .iter()
        .map(|&i| {
            let k = key(i);
            let old = plain[&(BUCKET.to_string(), k.clone())].clone();
            let mut new = old.clone();
            new.apply_write(actor, &old.causal_context(), value(&mut rng));
            ((BUCKET.to_string(), k), old, new)
        })
        .collect();
    let digests: Vec<(u64, u64, u64)> = prepared
        .iter()
        .map(|((b, k), old, new)| (key_token(b, k), old.digest(), new.digest()))
        .collect();
    let per_write = |elapsed: Duration| elapsed.as_nanos() as f64 / updates as f64;
    let best =
        |f: &mut dyn FnMut() -> Duration| (0..3).map(|_| per_write(f())).fold(f64::MAX, f64::min);

    // Baseline: what the in-memory store does on a write (insert into a 1M-key BTreeMap).
    let insert_ns = best(&mut || {
        let inserts: Vec<((String, Vec<u8>), Object)> = prepared
            .iter()
            .map(|(k, _, n)| (k.clone(), n.clone()))
            .collect();
        let t = Instant::now();
        for (k, o) in inserts {
            black_box(plain.insert(k, o));
        }
        t.elapsed()
    });
    // The write itself: apply_write on the stored object (read-modify-write in place).
    let apply_ns = best(&mut || {
        let t = Instant::now();
        for ((b, k), _, _) in &prepared {
            let entry = plain.get_mut(&(b.clone(), k.clone())).unwrap();
            let context = entry.causal_context();
            entry.apply_write(actor, &context, Value::Tombstone);
        }
        t.elapsed()
    });
    let mut trees = base.trees.clone();
    let leaf_ns = best(&mut || {
        let tree = trees.tree_mut(ranges[0]).unwrap();
        let t = Instant::now();
        for (i, &(_, old, new)) in digests.iter().enumerate() {
            tree.update((i % 4096) as u32, Some(old), Some(new));
        }
        t.elapsed()
    });
    let upkeep_ns = best(&mut || {
        let t = Instant::now();
        for (((b, k), _, _), &(token, old, new)) in prepared.iter().zip(&digests) {
            black_box(trees.record_write_at(token, b, k, Some(old), Some(new)));
        }
        t.elapsed()
    });
    let upkeep_full_ns = best(&mut || {
        let t = Instant::now();
        for ((b, k), old, new) in &prepared {
            black_box(trees.record_write(b, k, Some(old.digest()), Some(new.digest())));
        }
        t.elapsed()
    });
    // In situ: the same read-modify-write loop, with and without the upkeep a node does
    // there (digest of the object before and after, both hot in cache, and
    // record_write_at); alternated five times, best of each, as the machine is shared.
    let (mut without_ns, mut with_ns) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        for ((b, k), _, _) in &prepared {
            let entry = plain.get_mut(&(b.clone(), k.clone())).unwrap();
            let context = entry.causal_context();
            entry.apply_write(actor, &context, Value::Tombstone);
        }
        without_ns = without_ns.min(per_write(t.elapsed()));
        let t = Instant::now();
        for (((b, k), _, _), &(token, _, _)) in prepared.iter().zip(&digests) {
            let entry = plain.get_mut(&(b.clone(), k.clone())).unwrap();
            let old = entry.digest();
            let context = entry.causal_context();
            entry.apply_write(actor, &context, Value::Tombstone);
            let new = entry.digest();
            black_box(trees.record_write_at(token, b, k, Some(old), Some(new)));
        }
        with_ns = with_ns.min(per_write(t.elapsed()));
    }
    let in_situ_ns = (with_ns - without_ns).max(0.0);
    let warm = &prepared[0].2;
    let digest_warm_ns = best(&mut || {
        let t = Instant::now();
        for _ in 0..updates {
            black_box(black_box(warm).digest());
        }
        t.elapsed()
    });
    let t = Instant::now();
    for r in &ranges {
        black_box(trees.tree_mut(*r).unwrap().root());
    }
    let refresh = t.elapsed();

    let write_ns = apply_ns + insert_ns;
    println!("| operation | ns per write | share of a BTreeMap insert | share of a write (apply_write + insert) |");
    println!("|---|---|---|---|");
    println!("| BTreeMap insert into 1M keys (baseline) | {insert_ns:.0} | 100% | |");
    println!("| apply_write in place + insert (a write) | {write_ns:.0} | | 100% |");
    for (name, ns) in [
        ("tree.update alone (XOR into leaf + dirty bits)", leaf_ns),
        (
            "record_write_at: find range + segment, 2 item hashes, update",
            upkeep_ns,
        ),
        (
            "record_write incl. key_token and 2 Object::digest (cold objects)",
            upkeep_full_ns,
        ),
        ("one Object::digest, warm (for reference)", digest_warm_ns),
        (
            "in situ: 2 digests of the hot object + record_write_at (write loop with minus without)",
            in_situ_ns,
        ),
        ("(the write loop without upkeep, for reference)", without_ns),
    ] {
        println!(
            "| {name} | {ns:.1} | {:.1}% | {:.1}% |",
            100.0 * ns / insert_ns,
            100.0 * ns / write_ns
        );
    }
    println!(
        "\nlazy refresh of every inner node of the {} trees (all dirty after the writes above; \
         paid by the next comparison, not by writes): {:.2?}",
        ranges.len(),
        refresh
    );
}
