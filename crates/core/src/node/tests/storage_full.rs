//! A replica whose disk is full: writes it coordinates go through the other replicas, and
//! only a write that cannot meet its level anywhere fails, as insufficient storage.

use super::*;

fn put_at(
    cluster: &mut TestCluster,
    at: usize,
    key: &[u8],
    level: ConsistencyLevel,
) -> ClientResponse {
    cluster.request(
        at,
        ClientRequest::Put {
            bucket: "b".into(),
            key: key.to_vec(),
            context: CausalContext::empty(),
            value: data("v"),
            level,
        },
    )
}

fn stored(cluster: &TestCluster, at: usize, key: &[u8]) -> bool {
    cluster.nodes[at].storage().get("b", key).unwrap().is_some()
}

/// A full replica-coordinator still acknowledges a quorum write, stored by the two others
/// (it wrote nothing itself), and the write is read back at quorum.
#[test]
fn a_full_replica_coordinates_a_quorum_write_through_the_others() {
    let mut cluster = TestCluster::new(3);
    cluster.nodes[0].storage().set_full(true);
    let response = put_at(&mut cluster, 0, b"k", ConsistencyLevel::Quorum);
    assert!(
        matches!(response, ClientResponse::Written { .. }),
        "{response:?}"
    );
    assert!(!stored(&cluster, 0, b"k"), "the full node stored nothing");
    assert!(stored(&cluster, 1, b"k") && stored(&cluster, 2, b"k"));
    assert_eq!(
        live(&cluster.get(1, ConsistencyLevel::Quorum)),
        vec![data("v")]
    );
    // `one` needs a single healthy replica.
    let response = put_at(&mut cluster, 0, b"one", ConsistencyLevel::One);
    assert!(
        matches!(response, ClientResponse::Written { .. }),
        "{response:?}"
    );
}

/// When the level cannot be met without the full node, the answer is insufficient storage
/// (the HTTP layer's 507), not a generic storage failure.
#[test]
fn a_full_replica_answers_insufficient_storage_when_the_level_is_out_of_reach() {
    let mut cluster = TestCluster::new(3);
    cluster.nodes[0].storage().set_full(true);
    let response = put_at(&mut cluster, 0, b"all", ConsistencyLevel::All);
    assert!(
        matches!(response, ClientResponse::InsufficientStorage(_)),
        "{response:?}"
    );
    assert!(!stored(&cluster, 1, b"all"), "failed fast, nothing sent");
    cluster.stopped[2] = true;
    let response = put_at(&mut cluster, 0, b"quorum", ConsistencyLevel::Quorum);
    assert!(
        matches!(response, ClientResponse::InsufficientStorage(ref m) if m.contains("needed 2")),
        "{response:?}"
    );
}

/// Once space returns, the node coordinates and stores writes itself again.
#[test]
fn a_replica_writes_locally_again_once_space_returns() {
    let mut cluster = TestCluster::new(3);
    cluster.nodes[0].storage().set_full(true);
    put_at(&mut cluster, 0, b"k", ConsistencyLevel::Quorum);
    cluster.nodes[0].storage().set_full(false);
    let response = put_at(&mut cluster, 0, b"k2", ConsistencyLevel::All);
    assert!(
        matches!(response, ClientResponse::Written { .. }),
        "{response:?}"
    );
    assert!(stored(&cluster, 0, b"k2"));
}

/// A sync that fails for a full disk answers the held write as insufficient storage.
#[test]
fn a_sync_failing_for_a_full_disk_answers_insufficient_storage() {
    let mut node = Node::new(NodeConfig::new("solo"), MemoryStorage::new(), 0).unwrap();
    node.handle_client_request(
        0,
        1,
        ClientRequest::Put {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: CausalContext::empty(),
            value: data("x"),
            level: ConsistencyLevel::One,
        },
    );
    let ticket = node.begin_sync().unwrap();
    node.finish_sync(ticket, Err(StorageError::FullDuringWrite("ENOSPC".into())));
    assert!(matches!(
        node.poll_action(),
        Some(Action::Reply {
            response: ClientResponse::InsufficientStorage(_),
            ..
        })
    ));
}
