use super::*;
use proptest::prelude::*;

fn data(text: &str) -> Value {
    Value::Data {
        bytes: Bytes::copy_from_slice(text.as_bytes()),
        content_type: "text/plain".into(),
    }
}

fn actor(n: u64) -> Actor {
    Actor {
        node_hash: n,
        epoch: 0,
    }
}

/// One step of a random history among three replicas.
#[derive(Debug, Clone)]
enum Step {
    /// Replica `at` coordinates a write whose client read replica `seen_from` (or nothing).
    Write {
        at: usize,
        seen_from: Option<usize>,
        tombstone: bool,
    },
    /// Replica `to` merges in what replica `from` holds.
    Sync { from: usize, to: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..3usize, proptest::option::of(0..3usize), any::<bool>()).prop_map(
            |(at, seen_from, tombstone)| Step::Write {
                at,
                seen_from,
                tombstone
            }
        ),
        (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Sync { from, to }),
    ]
}

/// Plays a history; every object it yields respects the invariants real replicas keep.
fn play(steps: &[Step]) -> Vec<Object> {
    let mut replicas = vec![Object::empty(); 3];
    for (i, s) in steps.iter().enumerate() {
        match s {
            Step::Write {
                at,
                seen_from,
                tombstone,
            } => {
                let context = seen_from
                    .map(|r| replicas[r].causal_context())
                    .unwrap_or_default();
                let value = if *tombstone {
                    Value::Tombstone
                } else {
                    data(&format!("v{i}"))
                };
                replicas[*at].apply_write(actor(*at as u64), &context, value);
            }
            Step::Sync { from, to } => {
                let source = replicas[*from].clone();
                replicas[*to].merge_in(&source);
            }
        }
    }
    replicas
}

proptest! {
    /// Merge is commutative for any objects real histories produce.
    #[test]
    fn merge_is_commutative(steps in proptest::collection::vec(step(), 0..40)) {
        let r = play(&steps);
        prop_assert_eq!(r[0].merge(&r[1]), r[1].merge(&r[0]));
    }

    /// Merge is associative.
    #[test]
    fn merge_is_associative(steps in proptest::collection::vec(step(), 0..40)) {
        let r = play(&steps);
        prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]), r[0].merge(&r[1].merge(&r[2])));
    }

    /// Merge is idempotent, and merging something already seen changes nothing.
    #[test]
    fn merge_is_idempotent(steps in proptest::collection::vec(step(), 0..40)) {
        let r = play(&steps);
        prop_assert_eq!(r[0].merge(&r[0]), r[0].clone());
        let joined = r[0].merge(&r[1]);
        prop_assert_eq!(joined.merge(&r[1]), joined.clone());
    }

    /// Once every replica has merged every other, all hold the same object, and every
    /// write is either live in it or superseded by a write that saw it.
    #[test]
    fn full_sync_converges(steps in proptest::collection::vec(step(), 0..40)) {
        let r = play(&steps);
        let all = r[0].merge(&r[1]).merge(&r[2]);
        for replica in &r {
            prop_assert_eq!(replica.merge(&all), all.clone());
        }
        // Siblings are bounded by the number of writes, and mutually concurrent.
        prop_assert!(all.siblings().len() <= steps.len().max(1));
    }

    /// A context survives its sealing for the same key, is refused for any other key,
    /// and any junk text is rejected without a panic.
    #[test]
    fn context_round_trips(steps in proptest::collection::vec(step(), 0..30), junk in ".{0,64}") {
        let r = play(&steps);
        let context = r[0].causal_context();
        let keys = ContextKey::from_secret(b"secret");
        let sealed = keys.seal(&context, "b", b"k");
        prop_assert_eq!(keys.open(&sealed, "b", b"k").unwrap(), context);
        prop_assert_eq!(keys.open(&sealed, "b", b"k2"), Err(ContextError::NotAuthentic));
        let _ = keys.open(&junk, "b", b"k");
    }
}

/// Two blind writes are siblings; a write with the context of a read resolves them.
#[test]
fn blind_writes_become_siblings_and_a_context_resolves_them() {
    let mut replica = Object::empty();
    replica.apply_write(actor(1), &CausalContext::empty(), data("a"));
    replica.apply_write(actor(1), &CausalContext::empty(), data("b"));
    assert_eq!(replica.live_values().count(), 2);
    let context = replica.causal_context();
    replica.apply_write(actor(1), &context, data("c"));
    assert_eq!(replica.siblings().len(), 1);
    assert_eq!(replica.siblings()[0].value, data("c"));
}

/// A tombstone written with a read's context supersedes the value, and survives merge with
/// the stale replica (a deleted key does not come back).
#[test]
fn tombstone_beats_the_older_value() {
    let mut a = Object::empty();
    a.apply_write(actor(1), &CausalContext::empty(), data("x"));
    let stale = a.clone();
    let context = a.causal_context();
    a.apply_write(actor(1), &context, Value::Tombstone);
    let merged = stale.merge(&a);
    assert!(merged.is_deleted());
    assert_eq!(merged, a);
}

/// A write through another actor that did not see a value keeps both.
#[test]
fn concurrent_writes_through_different_actors_are_kept() {
    let mut a = Object::empty();
    let mut b = Object::empty();
    a.apply_write(actor(1), &CausalContext::empty(), data("from a"));
    b.apply_write(actor(2), &CausalContext::empty(), data("from b"));
    let merged = a.merge(&b);
    assert_eq!(merged.siblings().len(), 2);
    assert_eq!(
        a.context().partial_cmp_causal(b.context()),
        None,
        "independent writes are concurrent"
    );
}

/// Malformed, oversize and wrong-version contexts are rejected with a reason.
#[test]
fn bad_contexts_are_rejected() {
    let keys = ContextKey::from_secret(b"secret");
    let open = |text: &str| keys.open(text, "b", b"k");
    assert_eq!(open("!!!"), Err(ContextError::NotBase64));
    assert_eq!(open(""), Err(ContextError::Empty));
    assert_eq!(open("AQ"), Err(ContextError::UnsupportedVersion(1)));
    assert_eq!(
        open("Ag"),
        Err(ContextError::Malformed),
        "too short for a tag"
    );
    let long = "A".repeat(MAX_CONTEXT_ENCODED_BYTES + 1);
    assert_eq!(open(&long), Err(ContextError::TooLong));
}

/// A context is bound to the cluster secret, its bucket and key, and every byte of it: a
/// forged, altered, other key's or other cluster's context is refused.
#[test]
fn contexts_are_authenticated() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let mut object = Object::empty();
    object.apply_write(actor(1), &CausalContext::empty(), data("a"));
    let keys = ContextKey::from_secret(b"secret");
    let sealed = keys.seal(&object.causal_context(), "b", b"k");
    assert_eq!(
        keys.open(&sealed, "b", b"k").unwrap(),
        object.causal_context()
    );
    assert_eq!(
        keys.open(&sealed, "c", b"k"),
        Err(ContextError::NotAuthentic)
    );
    assert_eq!(
        keys.open(&sealed, "b", b"kk"),
        Err(ContextError::NotAuthentic)
    );
    let other_cluster = ContextKey::from_secret(b"other");
    assert_eq!(
        other_cluster.open(&sealed, "b", b"k"),
        Err(ContextError::NotAuthentic)
    );
    // Flip each byte in turn: every alteration is caught.
    let bytes = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
    for i in 1..bytes.len() {
        let mut altered = bytes.clone();
        altered[i] ^= 0x01;
        let text = URL_SAFE_NO_PAD.encode(&altered);
        assert_eq!(
            keys.open(&text, "b", b"k"),
            Err(ContextError::NotAuthentic),
            "byte {i}"
        );
    }
    // A bucket/key split cannot be shifted: ("ab", "c") differs from ("a", "bc").
    let shifted = keys.seal(&object.causal_context(), "ab", b"c");
    assert_eq!(
        keys.open(&shifted, "a", b"bc"),
        Err(ContextError::NotAuthentic)
    );
}

// ----- last-write-wins objects ---------------------------------------------------------

/// An LWW write by node `node` at HLC time `ts` (physical ms) with a small value.
fn lww(node: u64, ts: u64, value: u8) -> Object {
    let mut object = Object::empty();
    let v = if value == 0 {
        Value::Tombstone
    } else {
        data(&format!("v{value}"))
    };
    object.apply_lww_write(actor(node), crate::bucket::hlc::HlcTimestamp::new(ts, 0), v);
    object
}

fn lww_object() -> impl Strategy<Value = Object> {
    (0..3u64, 0..4u64, 0..3u8).prop_map(|(node, ts, value)| lww(node, ts, value))
}

/// LWW objects mixed with causal ones (a bucket switched to lww keeps older causal objects).
fn any_object() -> impl Strategy<Value = Object> {
    prop_oneof![
        lww_object(),
        (0..3u64).prop_map(|n| {
            let mut o = Object::empty();
            o.apply_write(actor(n), &CausalContext::empty(), data("causal"));
            o
        }),
    ]
}

proptest! {
    /// LWW merge is a semilattice join (also mixed with causal objects): replicas converge
    /// whatever order read repair, hints and anti-entropy merge in.
    #[test]
    fn lww_merge_is_commutative_associative_idempotent(
        a in any_object(), b in any_object(), c in any_object()
    ) {
        prop_assert_eq!(a.merge(&b), b.merge(&a));
        prop_assert_eq!(a.merge(&b).merge(&c), a.merge(&b.merge(&c)));
        prop_assert_eq!(a.merge(&a), a.clone());
        prop_assert!(a.merge(&b).is_well_formed());
    }

    /// The merge keeps the write with the larger HLC timestamp, ties by node: never siblings.
    #[test]
    fn lww_merge_agrees_with_hlc_order(
        (n1, t1, v1) in (0..3u64, 0..4u64, 1..3u8),
        (n2, t2, v2) in (0..3u64, 0..4u64, 1..3u8),
    ) {
        let (a, b) = (lww(n1, t1, v1), lww(n2, t2, v2));
        let merged = a.merge(&b);
        prop_assert_eq!(merged.siblings().len(), 1);
        let expected = if (t1, n1) > (t2, n2) { &a } else if (t2, n2) > (t1, n1) { &b } else {
            // Same timestamp and node: the value breaks the tie, the same way everywhere.
            if a.siblings()[0].value >= b.siblings()[0].value { &a } else { &b }
        };
        prop_assert_eq!(&merged, expected);
    }
}

/// A blind LWW write on top of siblings replaces them all, and a tombstone keeps its
/// timestamp (it wins over an older write arriving later, so a deleted key stays deleted).
#[test]
fn lww_write_supersedes_siblings_and_tombstones_keep_their_time() {
    let mut object = Object::empty();
    object.apply_write(actor(1), &CausalContext::empty(), data("a"));
    object.apply_write(actor(2), &CausalContext::empty(), data("b"));
    assert_eq!(object.siblings().len(), 2);
    object.apply_lww_write(
        actor(1),
        crate::bucket::hlc::HlcTimestamp::new(10, 0),
        data("c"),
    );
    assert_eq!(object.siblings().len(), 1);
    assert!(object.is_lww());
    let deleted = lww(2, 20, 0);
    let older = lww(3, 15, 1);
    assert!(deleted.merge(&older).is_deleted());
    assert!(older.merge(&deleted).is_deleted());
    assert_eq!(
        deleted.merge(&older).lww_timestamp(),
        Some(crate::bucket::hlc::HlcTimestamp::new(20, 0))
    );
}

/// A malformed LWW object from a peer (two LWW siblings) is recognised as such.
#[test]
fn malformed_lww_objects_are_not_well_formed() {
    let a = lww(1, 5, 1);
    let b = lww(2, 6, 1);
    let mut context = a.context().clone();
    context.join(b.context());
    let siblings = vec![a.siblings()[0].clone(), b.siblings()[0].clone()];
    assert!(Object::from_parts(context, siblings).is_none());
}
