//! Contexts are authenticated (SPEC section 3): over real processes, a context read from
//! one key, a forged one or an altered one gets 400 and changes nothing.

mod common;

use common::TestCluster;
use mendkv_client::{ClientError, ReadResult};

fn is_bad_request(result: &Result<Option<String>, ClientError>) -> bool {
    matches!(result, Err(ClientError::Api { status: 400, ref code, .. }) if code == "bad_request")
}

/// A context from key X cannot resolve key Y's siblings, nor can a forged or altered one;
/// the context just read still works (and a context is good on every node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_forged_and_altered_contexts_are_refused() {
    let cluster = TestCluster::start(3, &[]).await;
    let client = cluster.client(0);
    client
        .put("t", b"x", b"x".to_vec(), None, Some("all"), None)
        .await
        .unwrap();
    for value in ["y1", "y2"] {
        client
            .put(
                "t",
                b"y",
                value.as_bytes().to_vec(),
                None,
                Some("all"),
                None,
            )
            .await
            .unwrap();
    }
    let ReadResult::Value {
        context: Some(x_context),
        ..
    } = client.get("t", b"x", Some("all")).await.unwrap()
    else {
        panic!("x has one value and a context")
    };
    let ReadResult::Siblings {
        context: y_context, ..
    } = client.get("t", b"y", Some("all")).await.unwrap()
    else {
        panic!("y has two siblings")
    };
    let before = client.local("t", b"y").await.unwrap();

    // X's context on Y: it would supersede siblings the client never saw.
    let foreign = client
        .put(
            "t",
            b"y",
            b"z".to_vec(),
            None,
            Some("all"),
            Some(&x_context),
        )
        .await;
    assert!(is_bad_request(&foreign), "{foreign:?}");
    // The same in another bucket, and on DELETE.
    let other_bucket = client
        .put(
            "u",
            b"x",
            b"z".to_vec(),
            None,
            Some("all"),
            Some(&x_context),
        )
        .await;
    assert!(is_bad_request(&other_bucket), "{other_bucket:?}");
    let deleted = client
        .delete("t", b"y", Some("all"), Some(&x_context))
        .await;
    assert!(
        matches!(deleted, Err(ClientError::Api { status: 400, .. })),
        "{deleted:?}"
    );
    // One character changed.
    let mut altered: Vec<char> = y_context.chars().collect();
    let middle = altered.len() / 2;
    altered[middle] = if altered[middle] == 'A' { 'B' } else { 'A' };
    let altered: String = altered.into_iter().collect();
    let result = client
        .put("t", b"y", b"z".to_vec(), None, Some("all"), Some(&altered))
        .await;
    assert!(is_bad_request(&result), "{result:?}");
    // Version-1 contexts (no tag), as an old or hostile client would send them.
    let result = client
        .put("t", b"y", b"z".to_vec(), None, Some("all"), Some("AQA"))
        .await;
    assert!(is_bad_request(&result), "{result:?}");
    assert_eq!(
        client.local("t", b"y").await.unwrap(),
        before,
        "nothing changed"
    );

    // The honest context, sent to another node, resolves the siblings.
    cluster
        .client(2)
        .put(
            "t",
            b"y",
            b"z".to_vec(),
            None,
            Some("all"),
            Some(&y_context),
        )
        .await
        .unwrap();
    let read = cluster.client(1).get("t", b"y", Some("all")).await.unwrap();
    assert!(
        matches!(&read, ReadResult::Value { value, .. } if value == b"z"),
        "{read:?}"
    );
}
