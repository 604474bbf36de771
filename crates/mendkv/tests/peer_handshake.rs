//! The peer handshake against hostile connections, over real processes: a relayed handshake,
//! oversize handshake frames, and more pending handshakes than the node allows.

mod common;

use common::{eventually, free_port, TestCluster, TestNode};
use mendkv_client::metric_sum;
use mendkv_core::version::{Actor, CausalContext, Object, Value};
use mendkv_wire::{decode_frame, encode_frame, Frame};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn read_raw_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let length = stream.read_u32().await.ok()?;
    // The relay only carries handshake frames; nothing honest is larger.
    if length > 1 << 20 {
        return None;
    }
    let mut bytes = vec![0; length as usize];
    stream.read_exact(&mut bytes).await.ok()?;
    Some(bytes)
}

async fn write_raw_frame(stream: &mut TcpStream, bytes: &[u8]) -> bool {
    let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.is_ok()
}

/// What the relay saw of one handshake it passed through.
#[derive(Debug, Default)]
struct RelayOutcome {
    /// The dialer sent its proof of the secret to the relay.
    dialer_proved: bool,
    /// The target welcomed the relayed handshake: the relay holds an authenticated session.
    welcomed: bool,
}

/// Accepts one dial on `listener` and passes its handshake, frame by frame and unchanged,
/// to a fresh connection to `target`. Returns the target side (authenticated if welcomed).
async fn relay_handshake(listener: &TcpListener, target: &str) -> (RelayOutcome, TcpStream) {
    let (mut dialer, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the dialer dials the relay")
        .expect("accept");
    let mut upstream = TcpStream::connect(target).await.expect("dial the target");
    let mut outcome = RelayOutcome::default();
    // Hello, Challenge, Proof, Welcome: dialer and target take turns.
    for turn in 0..4 {
        let (from, to) = if turn % 2 == 0 {
            (&mut dialer, &mut upstream)
        } else {
            (&mut upstream, &mut dialer)
        };
        let Some(bytes) = read_raw_frame(from).await else {
            break;
        };
        match decode_frame(&bytes) {
            Ok(Frame::Proof { .. }) => outcome.dialer_proved = true,
            Ok(Frame::Welcome) => outcome.welcomed = true,
            _ => {}
        }
        if !write_raw_frame(to, &bytes).await {
            break;
        }
    }
    (outcome, upstream)
}

/// A process that accepts node A's dial (here: A's seed address) and relays it to node B
/// gets no session with B: B refuses the handshake (the proof was bound to the address A
/// dialed), and a `RepairWrite` sent over the relayed connection never reaches B's storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_handshake_is_refused() {
    let cluster = TestCluster::start(1, &[]).await;
    let b = &cluster.nodes[0];
    let relay = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let relay_address = relay.local_addr().expect("relay address").to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut a = TestNode {
        id: "node-a".into(),
        http: format!("127.0.0.1:{}", free_port()),
        peer: format!("127.0.0.1:{}", free_port()),
        data_dir: dir.path().to_path_buf(),
        seeds: vec![relay_address],
        env: vec![],
        child: None,
    };
    a.start();

    let (outcome, mut session) = relay_handshake(&relay, &b.peer).await;
    if outcome.welcomed {
        // Show what the session is worth: inject a write as node A.
        let mut object = Object::empty();
        object.apply_write(
            Actor::new("node-a", 1),
            &CausalContext::empty(),
            Value::Data {
                bytes: b"injected".to_vec().into(),
                content_type: "text/plain".into(),
            },
        );
        let frame = Frame::Message(mendkv_core::message::Message::RepairWrite {
            request: 1,
            bucket: "t".into(),
            key: b"relayed".to_vec(),
            object,
        });
        write_raw_frame(&mut session, &encode_frame(&frame).expect("encode")).await;
        let client = b.client();
        eventually(
            Duration::from_secs(10),
            "B stores the injected write",
            || {
                let client = client.clone();
                async move { matches!(client.local("t", b"relayed").await, Ok(Some(_))) }
            },
        )
        .await;
        panic!("B welcomed a relayed handshake and stored a write injected over it: {outcome:?}");
    }
    let client = b.client();
    eventually(
        Duration::from_secs(10),
        "B counts the relayed handshake as refused for its dialed address",
        || {
            let client = client.clone();
            async move {
                let text = client.metrics().await.unwrap_or_default();
                metric_sum(
                    &text,
                    "mendkv_peer_handshakes_refused_total",
                    &[("reason", "wrong_address")],
                ) >= 1.0
            }
        },
    )
    .await;
    assert!(
        !outcome.dialer_proved,
        "A proved the secret to a relay: {outcome:?}"
    );
    assert_eq!(
        client.local("t", b"relayed").await.expect("local read"),
        None
    );
}

/// A handshake frame longer than the handshake limit is refused when its length prefix
/// arrives (counted as `oversize`), not buffered until the handshake times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_handshake_frame_is_refused_at_its_length_prefix() {
    let cluster = TestCluster::start(1, &[]).await;
    let node = &cluster.nodes[0];
    let mut stream = TcpStream::connect(&node.peer).await.expect("connect");
    stream
        .write_all(&((8u32 << 20) - 1).to_be_bytes())
        .await
        .expect("send the length prefix");
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the node keeps an oversize handshake frame open: {closed:?}"
    );
    let text = node.client().metrics().await.expect("metrics");
    assert_eq!(
        metric_sum(
            &text,
            "mendkv_peer_handshakes_refused_total",
            &[("reason", "oversize")]
        ),
        1.0,
        "{text}"
    );
}

async fn refused(client: &mendkv_client::Client, reason: &str) -> f64 {
    let text = client.metrics().await.unwrap_or_default();
    metric_sum(
        &text,
        "mendkv_peer_handshakes_refused_total",
        &[("reason", reason)],
    )
}

/// With `[peer] max_pending_handshakes = 2`, two connections that never finish the
/// handshake hold both slots; a third is closed at once (counted `too_many_pending`), long
/// before the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_pending_handshakes_are_closed_at_once() {
    let cluster = TestCluster::start(1, &[("MENDKV_PEER__MAX_PENDING_HANDSHAKES", "2")]).await;
    let node = &cluster.nodes[0];
    let client = node.client();
    let mut pending = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&node.peer).await.expect("connect");
        // Half a length prefix: the node waits for the rest.
        stream.write_all(&[0, 0]).await.expect("write");
        pending.push(stream);
    }
    let mut excess = TcpStream::connect(&node.peer).await.expect("connect");
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(
        mendkv_server::transport::HANDSHAKE_TIMEOUT,
        excess.read(&mut byte),
    )
    .await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the excess connection was not closed before the handshake timeout: {closed:?}"
    );
    assert_eq!(refused(&client, "too_many_pending").await, 1.0);
    drop(pending);
}

/// With `[peer] max_connections = 1`, a second authenticated inbound connection is refused
/// in the handshake (the dialer learns why) and counted `too_many_connections`; once the
/// first closes, a new one is welcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_connections_are_bounded() {
    use mendkv_core::membership::MemberInfo;
    use mendkv_server::transport::{dial, HandshakeError, Identity};
    let cluster = TestCluster::start(1, &[("MENDKV_PEER__MAX_CONNECTIONS", "1")]).await;
    let node = &cluster.nodes[0];
    let identity = |id: &str| Identity {
        cluster: "mendkv".into(),
        secret: b"mendkv-dev-secret".to_vec(),
        me: MemberInfo {
            id: mendkv_core::NodeId::new(id),
            peer_address: format!("127.0.0.1:{}", free_port()),
            http_address: format!("127.0.0.1:{}", free_port()),
        },
        peer_addresses: vec![],
        tls: None,
    };
    let (first, _) = dial(&node.peer, None, &identity("peer-1"))
        .await
        .expect("the first peer is welcome");
    let second = dial(&node.peer, None, &identity("peer-2")).await;
    assert!(
        matches!(&second, Err(HandshakeError::RefusedByPeer(reason)) if reason.contains("maximum of 1")),
        "{:?}",
        second.map(|(_, info)| info)
    );
    assert_eq!(refused(&node.client(), "too_many_connections").await, 1.0);
    drop(first);
    let peer_2 = identity("peer-2");
    eventually(
        Duration::from_secs(10),
        "a new peer is welcome once the first connection closed",
        || {
            let peer_2 = &peer_2;
            let node_peer = node.peer.clone();
            async move { dial(&node_peer, None, peer_2).await.is_ok() }
        },
    )
    .await;
}
