//! TCP between nodes: length-prefixed frames (see the `wire` crate), an authenticated
//! handshake, one outbound link per peer with a bounded queue, reconnect with backoff, and
//! fail-fast sends while a peer is down (so a request waiting on a dead replica fails over
//! at once instead of timing out).
//!
//! Each node dials every peer it sends to (outbound link, write-only after the handshake)
//! and accepts their dials (inbound, read-only), so a pair of nodes shares two connections.

use crate::metrics::Metrics;
use crate::node_loop::Inbox;
use futures::{SinkExt, StreamExt};
use mendkv_core::membership::MemberInfo;
use mendkv_core::message::Message;
use mendkv_core::NodeId;
use mendkv_wire::{
    decode_frame, encode_frame, handshake_proof, verify_proof, Frame, Nonce, Side, MAX_FRAME_BYTES,
};
use rand::RngCore;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// How long a dial plus handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long an inbound peer may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(3000);
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(2000);
/// Messages queued per peer before sends fail fast (back-pressure).
pub const LINK_QUEUE: usize = 8192;

/// Who this node is, for handshakes.
pub struct Identity {
    pub cluster: String,
    pub secret: Vec<u8>,
    pub me: MemberInfo,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec()
}

fn new_nonce() -> Nonce {
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("bad frame: {0}")]
    Frame(#[from] mendkv_wire::WireError),
    #[error("handshake refused: {0}")]
    Refused(String),
    #[error("handshake timed out")]
    Timeout,
}

async fn send_frame(
    framed: &mut Framed<TcpStream, LengthDelimitedCodec>,
    frame: &Frame,
) -> Result<usize, TransportError> {
    let bytes = encode_frame(frame)?;
    let len = bytes.len();
    framed.send(bytes::Bytes::from(bytes)).await?;
    Ok(len)
}

async fn next_frame(
    framed: &mut Framed<TcpStream, LengthDelimitedCodec>,
) -> Result<Frame, TransportError> {
    match framed.next().await {
        Some(Ok(bytes)) => Ok(decode_frame(&bytes)?),
        Some(Err(e)) => Err(e.into()),
        None => Err(TransportError::Closed),
    }
}

/// Dials a peer and proves both sides know the secret; returns the peer's identity.
pub async fn dial(
    address: &str,
    identity: &Identity,
) -> Result<(Framed<TcpStream, LengthDelimitedCodec>, MemberInfo), TransportError> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let mut framed = Framed::new(stream, codec());
    let my_nonce = new_nonce();
    send_frame(
        &mut framed,
        &Frame::Hello {
            cluster: identity.cluster.clone(),
            node: identity.me.clone(),
            nonce: my_nonce,
        },
    )
    .await?;
    let (peer, their_nonce) = match next_frame(&mut framed).await? {
        Frame::Challenge { node, nonce, proof } => {
            if !verify_proof(
                &identity.secret,
                Side::Acceptor,
                &my_nonce,
                node.id.as_str(),
                &proof,
            ) {
                return Err(TransportError::Refused(format!(
                    "{} could not prove the cluster secret",
                    node.id
                )));
            }
            (node, nonce)
        }
        Frame::Refused { reason } => return Err(TransportError::Refused(reason)),
        _ => {
            return Err(TransportError::Refused(
                "unexpected frame in handshake".into(),
            ))
        }
    };
    let proof = handshake_proof(
        &identity.secret,
        Side::Dialer,
        &their_nonce,
        identity.me.id.as_str(),
    );
    send_frame(&mut framed, &Frame::Proof { proof }).await?;
    match next_frame(&mut framed).await? {
        Frame::Welcome => Ok((framed, peer)),
        Frame::Refused { reason } => Err(TransportError::Refused(reason)),
        _ => Err(TransportError::Refused(
            "unexpected frame in handshake".into(),
        )),
    }
}

/// Accepts one peer: handshake, then every message goes to the node's inbox.
async fn serve_inbound(
    stream: TcpStream,
    identity: Arc<Identity>,
    inbox: mpsc::Sender<Inbox>,
    metrics: Arc<Metrics>,
) {
    let _ = stream.set_nodelay(true);
    let remote = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut framed = Framed::new(stream, codec());
    let peer =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_handshake(&mut framed, &identity))
            .await
        {
            Ok(Ok(peer)) => peer,
            Ok(Err(error)) => {
                metrics.peer_handshakes_refused.inc();
                tracing::warn!(%remote, %error, "refused peer in handshake");
                return;
            }
            Err(_) => {
                metrics.peer_handshakes_refused.inc();
                tracing::warn!(%remote, "peer handshake timed out");
                return;
            }
        };
    let from = peer.id.clone();
    if inbox.send(Inbox::Discovered { info: peer }).await.is_err() {
        return;
    }
    loop {
        match framed.next().await {
            Some(Ok(bytes)) => match decode_frame(&bytes) {
                Ok(Frame::Message(message)) => {
                    metrics.count_bytes("in", message.class(), bytes.len() + 4);
                    if inbox
                        .send(Inbox::Peer {
                            from: from.clone(),
                            message,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {
                    reject(&metrics, "unexpected", &from, &remote);
                    return;
                }
                Err(error) => {
                    tracing::warn!(peer = %from, %error, "malformed frame");
                    reject(&metrics, "malformed", &from, &remote);
                    return;
                }
            },
            Some(Err(error)) => {
                // The codec refuses frames over MAX_FRAME_BYTES before reading them.
                tracing::warn!(peer = %from, %error, "bad frame, dropping connection");
                reject(&metrics, "oversize", &from, &remote);
                return;
            }
            None => return,
        }
    }
}

fn reject(metrics: &Metrics, reason: &'static str, peer: &NodeId, remote: &str) {
    metrics
        .peer_frames_rejected
        .get_or_create(&crate::metrics::ReasonLabels { reason })
        .inc();
    tracing::warn!(%peer, %remote, reason, "dropped peer connection");
}

async fn accept_handshake(
    framed: &mut Framed<TcpStream, LengthDelimitedCodec>,
    identity: &Identity,
) -> Result<MemberInfo, TransportError> {
    let (peer, their_nonce) = match next_frame(framed).await? {
        Frame::Hello {
            cluster,
            node,
            nonce,
        } => {
            if cluster != identity.cluster {
                let reason = format!("cluster {cluster:?} is not {:?}", identity.cluster);
                let _ = send_frame(
                    framed,
                    &Frame::Refused {
                        reason: reason.clone(),
                    },
                )
                .await;
                return Err(TransportError::Refused(reason));
            }
            (node, nonce)
        }
        _ => return Err(TransportError::Refused("expected Hello".into())),
    };
    let my_nonce = new_nonce();
    let proof = handshake_proof(
        &identity.secret,
        Side::Acceptor,
        &their_nonce,
        identity.me.id.as_str(),
    );
    send_frame(
        framed,
        &Frame::Challenge {
            node: identity.me.clone(),
            nonce: my_nonce,
            proof,
        },
    )
    .await?;
    match next_frame(framed).await? {
        Frame::Proof { proof }
            if verify_proof(
                &identity.secret,
                Side::Dialer,
                &my_nonce,
                peer.id.as_str(),
                &proof,
            ) =>
        {
            send_frame(framed, &Frame::Welcome).await?;
            Ok(peer)
        }
        Frame::Proof { .. } => {
            let reason = "wrong cluster secret".to_string();
            let _ = send_frame(
                framed,
                &Frame::Refused {
                    reason: reason.clone(),
                },
            )
            .await;
            Err(TransportError::Refused(format!("{}: {reason}", peer.id)))
        }
        _ => Err(TransportError::Refused("expected Proof".into())),
    }
}

/// Accepts peers until the listener fails.
pub async fn accept_loop(
    listener: TcpListener,
    identity: Arc<Identity>,
    inbox: mpsc::Sender<Inbox>,
    metrics: Arc<Metrics>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_inbound(
                    stream,
                    identity.clone(),
                    inbox.clone(),
                    metrics.clone(),
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Link states.
pub const LINK_CONNECTING: u8 = 0;
pub const LINK_UP: u8 = 1;
pub const LINK_DOWN: u8 = 2;

/// The node loop's handle on one outbound link.
pub struct PeerLink {
    pub queue: mpsc::Sender<Message>,
    pub state: Arc<AtomicU8>,
    pub retry_now: Arc<Notify>,
}

impl PeerLink {
    pub fn is_down(&self) -> bool {
        self.state.load(Ordering::Acquire) == LINK_DOWN
    }
}

/// Starts the link task for a peer.
pub fn spawn_link(
    peer: NodeId,
    address: String,
    identity: Arc<Identity>,
    inbox: mpsc::Sender<Inbox>,
    metrics: Arc<Metrics>,
) -> PeerLink {
    let (queue, receiver) = mpsc::channel(LINK_QUEUE);
    let state = Arc::new(AtomicU8::new(LINK_CONNECTING));
    let retry_now = Arc::new(Notify::new());
    tokio::spawn(run_link(
        peer,
        address,
        identity,
        inbox,
        metrics,
        receiver,
        state.clone(),
        retry_now.clone(),
    ));
    PeerLink {
        queue,
        state,
        retry_now,
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_link(
    peer: NodeId,
    address: String,
    identity: Arc<Identity>,
    inbox: mpsc::Sender<Inbox>,
    metrics: Arc<Metrics>,
    mut queue: mpsc::Receiver<Message>,
    state: Arc<AtomicU8>,
    retry_now: Arc<Notify>,
) {
    let mut backoff = BACKOFF_INITIAL;
    loop {
        state.store(LINK_CONNECTING, Ordering::Release);
        match tokio::time::timeout(CONNECT_TIMEOUT, dial(&address, &identity)).await {
            Ok(Ok((framed, info))) if info.id == peer => {
                state.store(LINK_UP, Ordering::Release);
                backoff = BACKOFF_INITIAL;
                if inbox.send(Inbox::PeerUp { info }).await.is_err() {
                    return;
                }
                let closed = pump(framed, &mut queue, &metrics).await;
                if closed.is_none() {
                    return;
                }
                tracing::info!(%peer, "peer connection lost");
            }
            Ok(Ok((_, info))) => {
                tracing::warn!(%peer, found = %info.id, %address, "address answers as another node");
            }
            Ok(Err(error)) => tracing::debug!(%peer, %error, "dial failed"),
            Err(_) => tracing::debug!(%peer, "dial timed out"),
        }
        state.store(LINK_DOWN, Ordering::Release);
        if inbox
            .send(Inbox::PeerDown { id: peer.clone() })
            .await
            .is_err()
        {
            return;
        }
        // While down, everything queued fails at once so requests fail over.
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = retry_now.notified() => break,
                message = queue.recv() => match message {
                    Some(message) => {
                        if inbox.send(Inbox::SendFailed { to: peer.clone(), message }).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Writes queued messages until the connection fails (`Some(())`) or the node stops (`None`).
async fn pump(
    framed: Framed<TcpStream, LengthDelimitedCodec>,
    queue: &mut mpsc::Receiver<Message>,
    metrics: &Metrics,
) -> Option<()> {
    let (mut sink, mut stream) = StreamExt::split::<bytes::Bytes>(framed);
    loop {
        tokio::select! {
            // The peer never writes on our outbound connection: anything is a close.
            _ = stream.next() => return Some(()),
            message = queue.recv() => {
                let message = message?;
                let mut batch = vec![message];
                while batch.len() < 256 {
                    match queue.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                for message in batch {
                    let class = message.class();
                    let bytes = match encode_frame(&Frame::Message(message)) {
                        Ok(bytes) => bytes,
                        Err(error) => {
                            tracing::error!(%error, "message too large to send; dropped");
                            continue;
                        }
                    };
                    metrics.count_bytes("out", class, bytes.len() + 4);
                    if sink.feed(bytes::Bytes::from(bytes)).await.is_err() {
                        return Some(());
                    }
                }
                if SinkExt::<bytes::Bytes>::flush(&mut sink).await.is_err() {
                    return Some(());
                }
            }
        }
    }
}
