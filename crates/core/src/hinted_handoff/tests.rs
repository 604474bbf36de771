use super::*;

fn config() -> HintedHandoffConfig {
    HintedHandoffConfig {
        max_hints_per_node: 2,
        max_bytes_total: 1000,
        ..Default::default()
    }
}

/// Hint keys round-trip and junk keys are refused.
#[test]
fn hint_keys_round_trip() {
    let target = NodeId::new("node2");
    let key = hint_key(&target, "b", b"k/\xff");
    assert_eq!(
        parse_hint_key(&key),
        Some((target, "b".to_string(), b"k/\xff".to_vec()))
    );
    assert_eq!(parse_hint_key(&[9, 1]), None);
    assert_eq!(parse_hint_key(&[]), None);
    assert_eq!(HintRecord::decode(&[1, 0xff, 0xff, 0xff]), None);
}

/// A record round-trips with its stand-in flag; a record from before the flag existed is
/// read as standing in (it might be a write's only copy, so it must not expire).
#[test]
fn hint_records_round_trip_and_old_records_stand_in() {
    let record = HintRecord {
        object: Object::empty(),
        created_ms: 42,
        stands_in: false,
    };
    assert_eq!(HintRecord::decode(&record.encode()), Some(record.clone()));
    #[derive(Serialize)]
    struct FormatOne {
        object: Object,
        created_ms: Millis,
    }
    let mut old = vec![HINT_FORMAT_WITHOUT_STAND_IN];
    old.extend(
        postcard::to_stdvec(&FormatOne {
            object: Object::empty(),
            created_ms: 42,
        })
        .unwrap(),
    );
    assert_eq!(
        HintRecord::decode(&old),
        Some(HintRecord {
            stands_in: true,
            ..record
        })
    );
}

/// Deletes come first, then the oldest; coalescing keeps one entry per key.
#[test]
fn delivery_order_and_coalescing() {
    let mut queue = HintQueue::new();
    let t = NodeId::new("t");
    queue.upsert(&t, "b", b"old", 1, 10, false);
    queue.upsert(&t, "b", b"new", 5, 10, false);
    queue.upsert(&t, "b", b"gone", 9, 10, true);
    queue.upsert(&t, "b", b"old", 1, 20, false);
    let order: Vec<Vec<u8>> = queue
        .next_batch(&t, 10)
        .into_iter()
        .map(|h| h.key)
        .collect();
    assert_eq!(
        order,
        vec![b"gone".to_vec(), b"old".to_vec(), b"new".to_vec()]
    );
    assert_eq!(queue.pending_for(&t), 3);
    assert_eq!(queue.total_bytes(), 40);
}

/// A delivery removes a hint only if nothing was coalesced into it meanwhile.
#[test]
fn removal_respects_versions() {
    let mut queue = HintQueue::new();
    let t = NodeId::new("t");
    queue.upsert(&t, "b", b"k", 1, 10, false);
    let sent = queue.next_batch(&t, 1)[0].version;
    queue.upsert(&t, "b", b"k", 1, 12, false);
    assert!(!queue.remove(&t, "b", b"k", Some(sent)));
    assert_eq!(queue.pending_for(&t), 1);
    let latest = queue.next_batch(&t, 1)[0].version;
    assert!(queue.remove(&t, "b", b"k", Some(latest)));
    assert_eq!(queue.total_hints(), 0);
    assert_eq!(queue.total_bytes(), 0);
}

/// Budgets: per-target count (coalescing into an existing hint is always allowed) and total bytes.
#[test]
fn budgets_are_enforced() {
    let mut queue = HintQueue::new();
    let (a, b) = (NodeId::new("a"), NodeId::new("b"));
    let config = config();
    queue.upsert(&a, "b", b"1", 0, 100, false);
    queue.upsert(&a, "b", b"2", 0, 100, false);
    assert_eq!(
        queue.check_budget(&config, &a, "b", b"3", 100),
        Err(DropReason::NodeBudget)
    );
    assert_eq!(queue.check_budget(&config, &a, "b", b"2", 150), Ok(()));
    assert_eq!(
        queue.check_budget(&config, &b, "b", b"1", 900),
        Err(DropReason::TotalBudget)
    );
    assert_eq!(queue.check_budget(&config, &b, "b", b"1", 800), Ok(()));
}

/// The oldest hint of a target is found whether it is a delete (delivered first) or a write.
#[test]
fn oldest_hint_of_a_target() {
    let mut queue = HintQueue::new();
    let t = NodeId::new("node2");
    assert_eq!(queue.oldest_created_ms(&t), None);
    queue.upsert(&t, "b", b"write", 7, 10, false);
    queue.upsert(&t, "b", b"delete", 9, 10, true);
    assert_eq!(queue.oldest_created_ms(&t), Some(7));
    queue.upsert(&t, "b", b"old-delete", 3, 10, true);
    assert_eq!(queue.oldest_created_ms(&t), Some(3));
    assert_eq!(queue.oldest_created_ms(&NodeId::new("node3")), None);
}
