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

/// A quorum read answers after two of three replies and merges them; duplicates are ignored.
#[test]
fn read_meets_quorum_with_two_replies() {
    let replicas = ids(&["a", "b", "c"]);
    let mut op = GetOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        ConsistencyLevel::Quorum,
        &replicas,
        100,
        AfterRead::Answer,
    );
    assert_eq!(
        op.on_reply(&replicas[0], Ok(Some(object_with("x")))),
        ReadProgress::Pending
    );
    assert_eq!(
        op.on_reply(&replicas[0], Ok(None)),
        ReadProgress::Pending,
        "duplicate ignored"
    );
    match op.on_reply(&replicas[1], Ok(None)) {
        ReadProgress::Met(o) => assert_eq!(o, object_with("x")),
        other => panic!("{other:?}"),
    }
}

/// A read at `all` fails as soon as one replica fails, saying how many answered.
#[test]
fn read_at_all_fails_on_one_failure() {
    let replicas = ids(&["a", "b", "c"]);
    let mut op = GetOperation::new(
        1,
        "b".into(),
        b"k".to_vec(),
        ConsistencyLevel::All,
        &replicas,
        100,
        AfterRead::Answer,
    );
    op.on_reply(&replicas[0], Ok(None));
    op.on_reply(&replicas[1], Ok(None));
    assert_eq!(
        op.on_reply(&replicas[2], Err(())),
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
        op.on_replica_failed(&replicas[0]),
        WriteStep::AskActor(replicas[1].clone())
    );
    let object = object_with("x");
    assert_eq!(
        op.on_coordinated(&replicas[1], Ok(object.clone())),
        WriteStep::Replicate(
            vec![replicas[0].clone(), replicas[2].clone()],
            object.clone()
        )
    );
    assert_eq!(
        op.on_replicated(&replicas[2], true),
        WriteStep::Met(object.causal_context())
    );
}
