use super::*;
use crate::version::{Actor, CausalContext, Value};

fn node(name: &str) -> NodeId {
    NodeId::new(name)
}

fn data(text: &str) -> Value {
    Value::Data {
        bytes: bytes::Bytes::copy_from_slice(text.as_bytes()),
        content_type: String::new(),
    }
}

/// Objects of a small history: v1, then v2 written over v1, and a concurrent w.
struct History {
    v1: Object,
    v2: Object,
    concurrent: Object,
    deleted: Object,
}

fn history() -> History {
    let mut v1 = Object::empty();
    v1.apply_write(Actor::new("a", 1), &CausalContext::empty(), data("v1"));
    let mut v2 = v1.clone();
    v2.apply_write(Actor::new("a", 1), &v1.causal_context(), data("v2"));
    let mut concurrent = Object::empty();
    concurrent.apply_write(Actor::new("b", 1), &CausalContext::empty(), data("w"));
    let mut deleted = v1.clone();
    deleted.apply_write(Actor::new("a", 1), &v1.causal_context(), Value::Tombstone);
    History {
        v1,
        v2,
        concurrent,
        deleted,
    }
}

fn full(o: &Object) -> ReplicaCopy<'_> {
    ReplicaCopy::Full(o)
}

fn digest(o: &Object) -> ReplicaCopy<'static> {
    ReplicaCopy::Digest(o.digest())
}

/// The decision table: copies in -> merged answer, unresolved and stale replicas.
#[test]
fn resolution_table() {
    let h = history();
    let (a, b, c) = (node("a"), node("b"), node("c"));
    let merged_siblings = h.v2.merge(&h.concurrent);
    let absent = Object::empty();
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        &str,
        Vec<(&NodeId, ReplicaCopy<'_>)>,
        Object,
        Vec<&NodeId>,
        Vec<&NodeId>,
    )> = vec![
        (
            "all agree by digest",
            vec![(&a, full(&h.v2)), (&b, digest(&h.v2)), (&c, digest(&h.v2))],
            h.v2.clone(),
            vec![],
            vec![],
        ),
        (
            "a digest behind is unresolved",
            vec![(&a, full(&h.v2)), (&b, digest(&h.v1))],
            h.v2.clone(),
            vec![&b],
            vec![],
        ),
        (
            "full copy behind is stale",
            vec![(&a, full(&h.v2)), (&b, full(&h.v1))],
            h.v2.clone(),
            vec![],
            vec![&b],
        ),
        (
            "newer copy wins wherever it is",
            vec![(&a, full(&h.v1)), (&b, full(&h.v2))],
            h.v2.clone(),
            vec![],
            vec![&a],
        ),
        (
            "missing copy is stale",
            vec![(&a, full(&h.v1)), (&b, full(&absent))],
            h.v1.clone(),
            vec![],
            vec![&b],
        ),
        (
            "absent digest matches absent full",
            vec![
                (&a, full(&absent)),
                (&b, ReplicaCopy::Digest(absent_digest())),
            ],
            Object::empty(),
            vec![],
            vec![],
        ),
        (
            "concurrent copies become siblings, both stale",
            vec![(&a, full(&h.v2)), (&b, full(&h.concurrent))],
            merged_siblings.clone(),
            vec![],
            vec![&a, &b],
        ),
        (
            "tombstone beats the value it saw",
            vec![(&a, full(&h.v1)), (&b, full(&h.deleted))],
            h.deleted.clone(),
            vec![],
            vec![&a],
        ),
        (
            "digest equal to a stale full copy is stale too",
            vec![(&a, full(&h.v1)), (&b, full(&h.v2)), (&c, digest(&h.v1))],
            h.v2.clone(),
            vec![],
            vec![&a, &c],
        ),
    ];
    for (name, copies, merged, unresolved, stale) in cases {
        let resolution = resolve(copies.iter().map(|(n, c)| (*n, *c)));
        assert_eq!(resolution.merged, merged, "{name}: merged");
        assert_eq!(
            resolution.unresolved.iter().collect::<Vec<_>>(),
            unresolved,
            "{name}: unresolved"
        );
        assert_eq!(
            resolution.stale.iter().collect::<Vec<_>>(),
            stale,
            "{name}: stale"
        );
        assert_eq!(
            resolution.found_inconsistency(),
            !unresolved.is_empty() || !stale.is_empty(),
            "{name}"
        );
    }
    assert!(merged_siblings.live_values().count() == 2);
}
