use super::*;
use crate::version::Actor;

fn ids(names: &[&str]) -> Vec<NodeId> {
    names.iter().map(NodeId::new).collect()
}

fn object_with(value: &str) -> Object {
    let mut o = Object::empty();
    o.apply_write(
        Actor::new("a", 1),
        &CausalContext::empty(),
        Value::Data {
            bytes: bytes::Bytes::copy_from_slice(value.as_bytes()),
            content_type: String::new(),
        },
    );
    o
}

/// A quorum read asks one replica for data and one for a digest; equal digests answer at once.
#[test]
fn read_with_matching_digest_is_met() {
    let replicas = ids(&["a", "b", "c"]);
    let mut op = GetOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        ConsistencyLevel::Quorum,
        replicas.clone(),
        100,
        AfterRead::Answer,
        true,
    );
    let sent = op.start(&replicas[1], 0);
    assert_eq!(
        sent,
        vec![
            (replicas[1].clone(), ReadKind::Full),
            (replicas[0].clone(), ReadKind::Digest)
        ]
    );
    let x = object_with("x");
    assert!(op.on_digest(&replicas[0], x.digest(), 1).is_empty());
    assert!(
        op.on_digest(&replicas[0], x.digest(), 1).is_empty(),
        "duplicate ignored"
    );
    assert!(op.on_full(&replicas[1], Some(x.clone()), 2).is_empty());
    match op.progress() {
        ReadProgress::Met(resolution) => {
            assert_eq!(resolution.merged, x);
            assert!(!resolution.found_inconsistency());
        }
        other => panic!("{other:?}"),
    }
}

/// A digest that differs is fetched in full before the answer; the replica behind is stale.
#[test]
fn mismatching_digest_is_fetched_and_repaired() {
    let replicas = ids(&["a", "b", "c"]);
    let mut op = GetOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        ConsistencyLevel::Quorum,
        replicas.clone(),
        100,
        AfterRead::Answer,
        true,
    );
    op.start(&replicas[0], 0);
    let x = object_with("x");
    op.on_full(&replicas[0], Some(x.clone()), 1);
    assert_eq!(
        op.on_digest(&replicas[1], crate::read_repair::absent_digest(), 1),
        vec![(replicas[1].clone(), ReadKind::Full)]
    );
    assert_eq!(op.progress(), ReadProgress::Pending);
    op.on_full(&replicas[1], None, 2);
    match op.progress() {
        ReadProgress::Met(resolution) => {
            assert_eq!(resolution.merged, x);
            assert_eq!(resolution.stale, vec![replicas[1].clone()]);
        }
        other => panic!("{other:?}"),
    }
}

/// A failed replica is replaced by the next one; `all` fails once too few remain.
#[test]
fn failed_replicas_are_replaced_then_fail_the_level() {
    let replicas = ids(&["a", "b", "c"]);
    let mut op = GetOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        ConsistencyLevel::Quorum,
        replicas.clone(),
        100,
        AfterRead::Answer,
        true,
    );
    op.start(&replicas[0], 0);
    assert_eq!(
        op.on_failed(&replicas[0], 1),
        vec![(replicas[2].clone(), ReadKind::Full)]
    );
    let mut all = GetOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        ConsistencyLevel::All,
        replicas.clone(),
        100,
        AfterRead::Answer,
        true,
    );
    all.start(&replicas[0], 0);
    all.on_full(&replicas[0], None, 1);
    all.on_digest(&replicas[1], crate::read_repair::absent_digest(), 1);
    all.on_failed(&replicas[2], 1);
    assert_eq!(
        all.progress(),
        ReadProgress::Failed {
            needed: 3,
            answered: 2
        }
    );
}

/// A local write fans out to the others and meets quorum with one more ack.
#[test]
fn local_write_replicates_and_meets_quorum() {
    let replicas = ids(&["a", "b", "c"]);
    let mut op = PutOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        CausalContext::empty(),
        Value::Tombstone,
        ConsistencyLevel::Quorum,
        replicas.clone(),
        100,
    );
    let object = object_with("x");
    assert_eq!(
        op.coordinated_locally(&replicas[0], object.clone()),
        WriteStep::Replicate(replicas[1..].to_vec(), object.clone())
    );
    assert_eq!(op.step(), WriteStep::Pending);
    assert_eq!(
        op.on_replicated(&replicas[1], true),
        WriteStep::Met(object.causal_context())
    );
}

/// A write at `one` through the local replica is met at once, and still replicates.
#[test]
fn write_at_one_is_met_after_local() {
    let replicas = ids(&["a", "b", "c"]);
    let mut op = PutOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        CausalContext::empty(),
        Value::Tombstone,
        ConsistencyLevel::One,
        replicas.clone(),
        100,
    );
    let object = object_with("x");
    assert!(matches!(
        op.coordinated_locally(&replicas[0], object.clone()),
        WriteStep::Replicate(..)
    ));
    assert_eq!(op.step(), WriteStep::Met(object.causal_context()));
}

/// A non-replica coordinator falls over to the next actor when the first fails.
#[test]
fn remote_actor_failure_tries_the_next() {
    let replicas = ids(&["a", "b", "c"]);
    let mut op = PutOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        CausalContext::empty(),
        Value::Tombstone,
        ConsistencyLevel::Quorum,
        replicas.clone(),
        100,
    );
    assert_eq!(
        op.start_remote(replicas.clone()),
        WriteStep::AskActor(replicas[0].clone())
    );
    assert_eq!(
        op.on_replica_failed(&replicas[0], false),
        WriteStep::AskActor(replicas[1].clone())
    );
    let object = object_with("x");
    // The failed actor is not asked again (nor counted twice); it will get a hint.
    assert_eq!(
        op.on_coordinated(&replicas[1], Ok(object.clone())),
        WriteStep::Replicate(vec![replicas[2].clone()], object.clone())
    );
    assert_eq!(
        op.on_replicated(&replicas[2], true),
        WriteStep::Met(object.causal_context())
    );
    assert_eq!(op.unacknowledged(), vec![replicas[0].clone()]);
}

/// An actor that may have applied the write (error answer, or lost after sending) ends the
/// write as failed: no second actor, so no second dot for one client write.
#[test]
fn actor_that_may_have_applied_is_not_replaced() {
    let replicas = ids(&["a", "b", "c"]);
    let mut op = PutOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        CausalContext::empty(),
        Value::Tombstone,
        ConsistencyLevel::Quorum,
        replicas.clone(),
        100,
    );
    op.start_remote(replicas.clone());
    assert!(matches!(
        op.on_replica_failed(&replicas[0], true),
        WriteStep::Failed { .. }
    ));
}
