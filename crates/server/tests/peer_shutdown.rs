//! A stopping node stops its peer tasks and waits for them: once `run` returns, no peer
//! connection of the node is left open.

use futures::StreamExt;
use mendkv_core::membership::MemberInfo;
use mendkv_core::NodeId;
use mendkv_server::config::ServerConfig;
use mendkv_server::transport::{dial, Identity};
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").to_string()
}

/// An authenticated inbound connection (a peer that sends nothing) is closed by the time
/// `run` returns, instead of living on in a task nobody waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_inbound_peer_connections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ServerConfig::default();
    config.node.id = Some("node1".into());
    config.node.data_dir = dir.path().to_path_buf();
    config.node.listen = free_address();
    config.node.http = free_address();
    let peer_address = config.node.listen.clone();
    let (stop, shutdown) = watch::channel(false);
    let server = tokio::spawn(mendkv_server::run(config, shutdown));

    let peer = Identity {
        cluster: "mendkv".into(),
        secret: b"mendkv-dev-secret".to_vec(),
        me: MemberInfo {
            id: NodeId::new("peer"),
            peer_address: free_address(),
            http_address: free_address(),
        },
        peer_addresses: vec![],
        tls: None,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut connection = loop {
        match dial(&peer_address, Some(&NodeId::new("node1")), &peer).await {
            Ok((connection, _)) => break connection,
            Err(error) if Instant::now() < deadline => {
                // The node is still starting: poll until it listens.
                let _ = error;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("the node never accepted the peer: {error}"),
        }
    };

    stop.send(true).expect("the node is running");
    server
        .await
        .expect("run does not panic")
        .expect("run ends cleanly");
    // `run` has returned, so the node's end must be closed already: the read ends at once.
    let read = tokio::time::timeout(Duration::from_secs(10), connection.next()).await;
    assert!(
        matches!(read, Ok(None) | Ok(Some(Err(_)))),
        "the inbound connection outlived the node: {read:?}"
    );
}
