//! TCP between nodes: length-prefixed frames (see the `wire` crate), an authenticated
//! handshake, one outbound link per peer with a bounded queue, reconnect with backoff, and
//! fail-fast sends while a peer is down (so a request waiting on a dead replica fails over
//! at once instead of timing out).
//!
//! Each node dials every peer it sends to (outbound link, write-only after the handshake)
//! and accepts their dials (inbound, read-only), so a pair of nodes shares two connections.
//!
//! # Bounds
//! A connection that has not finished the handshake may send frames of at most
//! [`MAX_HANDSHAKE_FRAME_BYTES`], holds one of `[peer] max_pending_handshakes` slots (a
//! connection beyond them is closed at once) and has [`HANDSHAKE_TIMEOUT`] to finish.
//! Authenticated inbound connections are bounded by `[peer] max_connections`. Every refusal
//! is counted in `mendkv_peer_handshakes_refused_total{reason}`.
//!
//! # Shutdown
//! Every task of the transport (accept loop, inbound connections, links, seed contacts) runs
//! in [`PeerTasks`]; [`PeerTasks::shutdown`] stops them and waits, with a deadline, until
//! they are gone, so a stopped node holds no peer sockets.

use crate::inbox::Inbox;
use crate::metrics::{Metrics, ReasonLabels};
use futures::{SinkExt, StreamExt};
use mendkv_core::membership::MemberInfo;
use mendkv_core::message::Message;
use mendkv_core::NodeId;
use mendkv_wire::{
    decode_frame, encode_frame, handshake_proof, verify_proof, Frame, HandshakeTranscript, Nonce,
    Side, WireError, MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES,
};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec, LengthDelimitedCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a dial plus handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long an inbound peer may take to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(3000);
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(2000);
/// Messages queued per peer before sends fail fast (back-pressure).
pub const LINK_QUEUE: usize = 8192;
/// At shutdown a link gets this long to send what the node queued before it stopped (the
/// replies of its last batch) before it is cut off.
const LINK_DRAIN_GRACE: Duration = Duration::from_millis(500);
/// How long a refused peer may take to receive the reason.
const REFUSAL_SEND_TIMEOUT: Duration = Duration::from_millis(500);
/// Refusals of excess connections are logged at most this often (an attacker can make
/// thousands a second).
const OVERFLOW_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The `[peer]` config section: bounds on inbound peer connections. It lives here, beside
/// the code it bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerSection {
    /// Connections that have not finished the handshake; more are closed at once. Each
    /// holds at most a few KiB, so the default bounds them to well under a MiB.
    pub max_pending_handshakes: usize,
    /// Authenticated inbound connections (one per peer, briefly two while a peer
    /// reconnects); a peer beyond them is refused in the handshake.
    pub max_connections: usize,
}

impl Default for PeerSection {
    fn default() -> Self {
        PeerSection {
            max_pending_handshakes: 64,
            max_connections: 1024,
        }
    }
}

/// Who this node is, for handshakes.
pub struct Identity {
    pub cluster: String,
    pub secret: Vec<u8>,
    pub me: MemberInfo,
    /// The addresses peers may dial to reach this node (advertised, listen). A `Hello` that
    /// says it dialed anything else was meant for another node and is refused.
    pub peer_addresses: Vec<String>,
    /// `[tls] peer`: mutual TLS under the handshake.
    pub tls: Option<crate::tls::PeerTls>,
}

impl Identity {
    /// Whether `dialed` names this node: equal to one of its peer addresses as text, or as a
    /// socket address (`127.0.0.1:7001` and `127.000.000.001:7001` are not told apart).
    fn answers_at(&self, dialed: &str) -> bool {
        let parsed = dialed.parse::<SocketAddr>().ok();
        self.peer_addresses.iter().any(|own| {
            own == dialed || (parsed.is_some() && own.parse::<SocketAddr>().ok() == parsed)
        })
    }
}

/// The byte stream of a peer connection: TCP, or TLS over TCP.
pub trait PeerIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> PeerIo for T {}

/// A framed peer connection.
pub type PeerConnection = Framed<Box<dyn PeerIo>, LengthDelimitedCodec>;

/// Until the handshake is done, frames get the small limit: a peer that proved nothing can
/// make this node buffer a few KiB, not [`MAX_FRAME_BYTES`].
fn handshake_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_HANDSHAKE_FRAME_BYTES)
        .new_codec()
}

fn new_nonce() -> Nonce {
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

/// Why a handshake failed, on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("handshake frame over {MAX_HANDSHAKE_FRAME_BYTES} bytes")]
    Oversize,
    #[error("bad handshake frame: {0}")]
    Frame(#[from] WireError),
    #[error("expected {expected} in the handshake, got another frame")]
    Unexpected { expected: &'static str },
    #[error("peer is in cluster {theirs:?}, not {ours:?}")]
    WrongCluster { theirs: String, ours: String },
    #[error("peer dialed {dialed}, which is not one of this node's peer addresses {ours:?}")]
    WrongAddress { dialed: String, ours: Vec<String> },
    #[error("peer claims this node's own id {0}")]
    OwnId(NodeId),
    #[error("{answered} answered at {address}, where {expected} was expected")]
    WrongNode {
        address: String,
        expected: NodeId,
        answered: NodeId,
    },
    #[error("{0} could not prove the cluster secret for this handshake")]
    WrongSecret(NodeId),
    #[error("{peer} refused: this node already has its maximum of {max} peer connections")]
    TooManyConnections { peer: NodeId, max: usize },
    #[error("refused by the peer: {0}")]
    RefusedByPeer(String),
    #[error("handshake not finished within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    /// `[tls] peer`: the TLS handshake failed (a certificate from another CA, for one).
    #[error("TLS: {0}")]
    Tls(String),
}

impl From<std::io::Error> for HandshakeError {
    fn from(error: std::io::Error) -> Self {
        // The codec reports a length prefix over the limit as an I/O error.
        if error
            .get_ref()
            .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
        {
            HandshakeError::Oversize
        } else {
            HandshakeError::Io(error)
        }
    }
}

impl HandshakeError {
    /// The `reason` label of `mendkv_peer_handshakes_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Io(_) => "io",
            HandshakeError::Closed => "closed",
            HandshakeError::Oversize => "oversize",
            HandshakeError::Frame(WireError::UnsupportedVersion(_)) => "version",
            HandshakeError::Frame(_) => "malformed",
            HandshakeError::Unexpected { .. } => "unexpected",
            HandshakeError::WrongCluster { .. } => "wrong_cluster",
            HandshakeError::WrongAddress { .. } => "wrong_address",
            HandshakeError::OwnId(_) => "own_id",
            HandshakeError::WrongNode { .. } => "wrong_node",
            HandshakeError::WrongSecret(_) => "wrong_secret",
            HandshakeError::TooManyConnections { .. } => "too_many_connections",
            HandshakeError::RefusedByPeer(_) => "refused_by_peer",
            HandshakeError::Timeout => "timeout",
            HandshakeError::Tls(_) => "tls",
        }
    }

    /// Whether the acceptor tells the dialer why (a `Refused` frame): for an honest but
    /// misconfigured peer. Broken framing gets no answer.
    fn is_told_to_peer(&self) -> bool {
        matches!(
            self,
            HandshakeError::WrongCluster { .. }
                | HandshakeError::WrongAddress { .. }
                | HandshakeError::OwnId(_)
                | HandshakeError::WrongSecret(_)
                | HandshakeError::TooManyConnections { .. }
        )
    }

    /// A refusal says something is misconfigured or hostile (logged at warn); the rest is
    /// a peer that is down or went away (logged at debug while a link retries).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, HandshakeError::Io(_) | HandshakeError::Closed)
    }
}

async fn send_frame(
    connection: &mut PeerConnection,
    frame: &Frame,
) -> Result<usize, HandshakeError> {
    let bytes = encode_frame(frame)?;
    let len = bytes.len();
    connection.send(bytes::Bytes::from(bytes)).await?;
    Ok(len)
}

async fn next_frame(connection: &mut PeerConnection) -> Result<Frame, HandshakeError> {
    match connection.next().await {
        Some(Ok(bytes)) => Ok(decode_frame(&bytes)?),
        Some(Err(error)) => Err(error.into()),
        None => Err(HandshakeError::Closed),
    }
}

/// Dials a peer at `address` and authenticates both ends; returns the peer's identity.
/// With `expected`, any other node answering there is refused before this node proves
/// anything; either way the acceptor must prove the secret over this handshake (bound to
/// `address`) first, so a relay that passes the dial on to another member learns nothing.
pub async fn dial(
    address: &str,
    expected: Option<&NodeId>,
    identity: &Identity,
) -> Result<(PeerConnection, MemberInfo), HandshakeError> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let stream: Box<dyn PeerIo> = match &identity.tls {
        None => Box::new(stream),
        Some(tls) => {
            let name = crate::tls::PeerTls::server_name(address).map_err(HandshakeError::Tls)?;
            let stream = tls
                .connector
                .connect(name, stream)
                .await
                .map_err(|e| HandshakeError::Tls(e.to_string()))?;
            Box::new(stream)
        }
    };
    let mut connection = Framed::new(stream, handshake_codec());
    let dialer_nonce = new_nonce();
    send_frame(
        &mut connection,
        &Frame::Hello {
            cluster: identity.cluster.clone(),
            node: identity.me.clone(),
            nonce: dialer_nonce,
            dialed_address: address.to_string(),
        },
    )
    .await?;
    let (acceptor, acceptor_nonce, acceptor_proof) = match next_frame(&mut connection).await? {
        Frame::Challenge { node, nonce, proof } => (node, nonce, proof),
        Frame::Refused { reason } => return Err(HandshakeError::RefusedByPeer(reason)),
        _ => {
            return Err(HandshakeError::Unexpected {
                expected: "Challenge",
            })
        }
    };
    if acceptor.id == identity.me.id {
        return Err(HandshakeError::OwnId(acceptor.id));
    }
    if let Some(expected) = expected.filter(|expected| **expected != acceptor.id) {
        return Err(HandshakeError::WrongNode {
            address: address.to_string(),
            expected: expected.clone(),
            answered: acceptor.id,
        });
    }
    let transcript = HandshakeTranscript {
        cluster: &identity.cluster,
        dialer: &identity.me,
        acceptor: &acceptor,
        dialer_nonce: &dialer_nonce,
        acceptor_nonce: &acceptor_nonce,
        dialed_address: address,
    };
    if !verify_proof(
        &identity.secret,
        Side::Acceptor,
        &transcript,
        &acceptor_proof,
    ) {
        return Err(HandshakeError::WrongSecret(acceptor.id));
    }
    let proof = handshake_proof(&identity.secret, Side::Dialer, &transcript);
    send_frame(&mut connection, &Frame::Proof { proof }).await?;
    match next_frame(&mut connection).await? {
        Frame::Welcome => {
            connection.codec_mut().set_max_frame_length(MAX_FRAME_BYTES);
            Ok((connection, acceptor))
        }
        Frame::Refused { reason } => Err(HandshakeError::RefusedByPeer(reason)),
        _ => Err(HandshakeError::Unexpected {
            expected: "Welcome",
        }),
    }
}

/// What inbound connections share: who this node is, where messages go, and the bounds.
pub struct Inbound {
    pub identity: Arc<Identity>,
    pub inbox: mpsc::Sender<Inbox>,
    pub metrics: Arc<Metrics>,
    pending_handshakes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    max_connections: usize,
}

impl Inbound {
    pub fn new(
        identity: Arc<Identity>,
        inbox: mpsc::Sender<Inbox>,
        metrics: Arc<Metrics>,
        limits: &PeerSection,
    ) -> Self {
        Inbound {
            identity,
            inbox,
            metrics,
            pending_handshakes: Arc::new(Semaphore::new(limits.max_pending_handshakes)),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            max_connections: limits.max_connections,
        }
    }

    fn count_refused(&self, reason: &'static str) {
        self.metrics
            .peer_handshakes_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// Accepts one peer: handshake, then every message goes to the node's inbox.
async fn serve_inbound(stream: TcpStream, pending: OwnedSemaphorePermit, inbound: Arc<Inbound>) {
    let _ = stream.set_nodelay(true);
    let remote = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // One deadline for the TLS handshake and the HMAC handshake inside it.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let stream: Box<dyn PeerIo> = match &inbound.identity.tls {
        None => Box::new(stream),
        Some(tls) => {
            let accepted = tokio::time::timeout_at(deadline, tls.acceptor.accept(stream))
                .await
                .map_err(|_| HandshakeError::Timeout)
                .and_then(|r| r.map_err(|e| HandshakeError::Tls(e.to_string())));
            match accepted {
                Ok(stream) => Box::new(stream),
                Err(error) => {
                    inbound.count_refused(error.reason());
                    tracing::warn!(%remote, %error, reason = error.reason(), "refused peer in TLS handshake");
                    return;
                }
            }
        }
    };
    let mut connection = Framed::new(stream, handshake_codec());
    let handshake = tokio::time::timeout_at(deadline, accept_handshake(&mut connection, &inbound))
        .await
        .unwrap_or(Err(HandshakeError::Timeout));
    let (peer, _connection_slot) = match handshake {
        Ok(accepted) => accepted,
        Err(error) => {
            // Counted before the peer hears of it: whoever sees the refusal sees it counted.
            inbound.count_refused(error.reason());
            tracing::warn!(%remote, %error, reason = error.reason(), "refused peer in handshake");
            if error.is_told_to_peer() {
                let refusal = Frame::Refused {
                    reason: error.to_string(),
                };
                let _ = tokio::time::timeout(
                    REFUSAL_SEND_TIMEOUT,
                    send_frame(&mut connection, &refusal),
                )
                .await;
            }
            return;
        }
    };
    drop(pending);
    connection.codec_mut().set_max_frame_length(MAX_FRAME_BYTES);
    let from = peer.id.clone();
    let metrics = &inbound.metrics;
    if inbound
        .inbox
        .send(Inbox::Discovered { info: peer })
        .await
        .is_err()
    {
        return;
    }
    loop {
        match connection.next().await {
            Some(Ok(bytes)) => match decode_frame(&bytes) {
                Ok(Frame::Message(message)) => {
                    metrics.count_bytes("in", message.class(), bytes.len() + 4);
                    if inbound
                        .inbox
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
                    reject(metrics, "unexpected", &from, &remote);
                    return;
                }
                Err(error) => {
                    tracing::warn!(peer = %from, %error, "malformed frame");
                    reject(metrics, "malformed", &from, &remote);
                    return;
                }
            },
            Some(Err(error)) => {
                // The codec refuses frames over MAX_FRAME_BYTES before reading them.
                tracing::warn!(peer = %from, %error, "bad frame, dropping connection");
                reject(metrics, "oversize", &from, &remote);
                return;
            }
            None => return,
        }
    }
}

fn reject(metrics: &Metrics, reason: &'static str, peer: &NodeId, remote: &str) {
    metrics
        .peer_frames_rejected
        .get_or_create(&ReasonLabels { reason })
        .inc();
    tracing::warn!(%peer, %remote, reason, "dropped peer connection");
}

/// The acceptor's side of the handshake. It proves the secret only for a `Hello` that
/// dialed one of its own addresses, and takes a connection slot before welcoming the peer
/// (the slot is held for as long as the connection lives).
async fn accept_handshake(
    connection: &mut PeerConnection,
    inbound: &Inbound,
) -> Result<(MemberInfo, OwnedSemaphorePermit), HandshakeError> {
    let identity = &inbound.identity;
    let (dialer, dialer_nonce, dialed_address) = match next_frame(connection).await? {
        Frame::Hello {
            cluster,
            node,
            nonce,
            dialed_address,
        } => {
            if cluster != identity.cluster {
                return Err(HandshakeError::WrongCluster {
                    theirs: cluster,
                    ours: identity.cluster.clone(),
                });
            }
            if node.id == identity.me.id {
                return Err(HandshakeError::OwnId(node.id));
            }
            if !identity.answers_at(&dialed_address) {
                return Err(HandshakeError::WrongAddress {
                    dialed: dialed_address,
                    ours: identity.peer_addresses.clone(),
                });
            }
            (node, nonce, dialed_address)
        }
        _ => return Err(HandshakeError::Unexpected { expected: "Hello" }),
    };
    let acceptor_nonce = new_nonce();
    let transcript = HandshakeTranscript {
        cluster: &identity.cluster,
        dialer: &dialer,
        acceptor: &identity.me,
        dialer_nonce: &dialer_nonce,
        acceptor_nonce: &acceptor_nonce,
        dialed_address: &dialed_address,
    };
    let proof = handshake_proof(&identity.secret, Side::Acceptor, &transcript);
    send_frame(
        connection,
        &Frame::Challenge {
            node: identity.me.clone(),
            nonce: acceptor_nonce,
            proof,
        },
    )
    .await?;
    let proof = match next_frame(connection).await? {
        Frame::Proof { proof } => proof,
        _ => return Err(HandshakeError::Unexpected { expected: "Proof" }),
    };
    if !verify_proof(&identity.secret, Side::Dialer, &transcript, &proof) {
        return Err(HandshakeError::WrongSecret(dialer.id));
    }
    let Ok(slot) = inbound.connections.clone().try_acquire_owned() else {
        return Err(HandshakeError::TooManyConnections {
            peer: dialer.id,
            max: inbound.max_connections,
        });
    };
    send_frame(connection, &Frame::Welcome).await?;
    Ok((dialer, slot))
}

/// Accepts peers until shutdown. A connection beyond `max_pending_handshakes` is closed at
/// once: it has proved nothing, and queueing it would let anyone hold sockets open.
pub async fn accept_loop(listener: TcpListener, inbound: Arc<Inbound>, tasks: PeerTasks) {
    let mut overflow_logged: Option<Instant> = None;
    let mut overflow_unlogged = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => match inbound.pending_handshakes.clone().try_acquire_owned() {
                Ok(pending) => tasks.spawn(serve_inbound(stream, pending, inbound.clone())),
                Err(_) => {
                    inbound.count_refused("too_many_pending");
                    drop(stream);
                    overflow_unlogged += 1;
                    if overflow_logged.is_none_or(|at| at.elapsed() >= OVERFLOW_LOG_INTERVAL) {
                        tracing::warn!(
                            %remote,
                            refused = overflow_unlogged,
                            "peer connections closed at once: too many pending handshakes"
                        );
                        overflow_logged = Some(Instant::now());
                        overflow_unlogged = 0;
                    }
                }
            },
            Err(error) => {
                let listen = listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::warn!(%listen, %error, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The transport's tasks, tracked so that shutdown can stop them and wait until they are
/// gone (a task still running after `run` returns would keep its socket open).
#[derive(Clone, Default)]
pub struct PeerTasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl PeerTasks {
    /// Spawns a task that is dropped at shutdown.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = stop.cancelled() => {}
            }
        });
    }

    /// Spawns a task that, at shutdown, gets `grace` to finish by itself before it is
    /// dropped.
    fn spawn_with_grace(&self, grace: Duration, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {}
            }
        });
    }

    /// Stops every task and waits until all are gone or `deadline` passes; returns how many
    /// were still running then.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        self.tracker.close();
        self.stop.cancel();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            return self.tracker.len();
        }
        0
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
    tasks: &PeerTasks,
) -> PeerLink {
    let (queue, receiver) = mpsc::channel(LINK_QUEUE);
    let state = Arc::new(AtomicU8::new(LINK_CONNECTING));
    let retry_now = Arc::new(Notify::new());
    // The node stops before its links: its queue then closes, and the link sends what is
    // left in it (the replies of the node's last batch) and ends by itself.
    tasks.spawn_with_grace(
        LINK_DRAIN_GRACE,
        run_link(
            peer,
            address,
            identity,
            inbox,
            metrics,
            receiver,
            state.clone(),
            retry_now.clone(),
        ),
    );
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
        match tokio::time::timeout(CONNECT_TIMEOUT, dial(&address, Some(&peer), &identity)).await {
            Ok(Ok((connection, info))) => {
                state.store(LINK_UP, Ordering::Release);
                backoff = BACKOFF_INITIAL;
                if inbox.send(Inbox::PeerUp { info }).await.is_err() {
                    return;
                }
                let closed = pump(connection, &mut queue, &metrics, &peer).await;
                if closed.is_none() {
                    return;
                }
                tracing::info!(%peer, "peer connection lost");
            }
            Ok(Err(error)) if error.is_refusal() => {
                tracing::warn!(%peer, %address, %error, reason = error.reason(), "handshake refused");
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
    framed: PeerConnection,
    queue: &mut mpsc::Receiver<Message>,
    metrics: &Metrics,
    peer: &NodeId,
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
                            tracing::error!(%peer, %error, "message too large to send; dropped");
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"s3cret";

    fn identity(id: &str, peer_address: &str) -> Identity {
        Identity {
            cluster: "c".into(),
            secret: SECRET.to_vec(),
            me: MemberInfo {
                id: NodeId::new(id),
                peer_address: peer_address.into(),
                http_address: "127.0.0.1:1".into(),
            },
            peer_addresses: vec![peer_address.into()],
            tls: None,
        }
    }

    /// A node accepting peers on a loopback port; its inbox is returned to keep it open.
    async fn acceptor(id: &str) -> (String, Arc<Metrics>, mpsc::Receiver<Inbox>, PeerTasks) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (inbox, receiver) = mpsc::channel(16);
        let metrics = Metrics::new();
        let inbound = Arc::new(Inbound::new(
            Arc::new(identity(id, &address)),
            inbox,
            metrics.clone(),
            &PeerSection::default(),
        ));
        let tasks = PeerTasks::default();
        tasks.spawn(accept_loop(listener, inbound, tasks.clone()));
        (address, metrics, receiver, tasks)
    }

    /// How a relay changes the handshake it passes on.
    #[derive(Clone, Copy)]
    struct Rewrite {
        /// Say in the `Hello` that the dialer dialed the target's own address.
        dialed_address_to_target: bool,
        /// Say in the `Challenge` that this node answered.
        answering_node: Option<&'static str>,
    }

    /// Accepts one dial and passes Hello and Challenge on to `target`, rewritten; returns
    /// the frame the dialer sends next, if any (a `Proof` would be a relayed proof).
    async fn relay(listener: TcpListener, target: String, rewrite: Rewrite) -> Option<Frame> {
        let (dialer, _) = listener.accept().await.unwrap();
        let dialer: Box<dyn PeerIo> = Box::new(dialer);
        let mut dialer = Framed::new(dialer, handshake_codec());
        let upstream: Box<dyn PeerIo> = Box::new(TcpStream::connect(&target).await.unwrap());
        let mut upstream = Framed::new(upstream, handshake_codec());
        let mut hello = next_frame(&mut dialer).await.unwrap();
        if let Frame::Hello { dialed_address, .. } = &mut hello {
            if rewrite.dialed_address_to_target {
                *dialed_address = target.clone();
            }
        }
        send_frame(&mut upstream, &hello).await.unwrap();
        let mut challenge = next_frame(&mut upstream).await.ok()?;
        if let (Frame::Challenge { node, .. }, Some(id)) = (&mut challenge, rewrite.answering_node)
        {
            node.id = NodeId::new(id);
        }
        send_frame(&mut dialer, &challenge).await.ok()?;
        let next = next_frame(&mut dialer).await.ok();
        if let Some(frame) = &next {
            // Complete the relay if the dialer let it: the test then sees the session.
            let _ = send_frame(&mut upstream, frame).await;
        }
        next
    }

    /// Dials `target` through a relay that rewrites the handshake as told; returns the
    /// dialer's result and what it sent after the Challenge.
    async fn dial_through_relay(
        target: &str,
        expected: Option<&str>,
        rewrite: Rewrite,
    ) -> (Result<MemberInfo, HandshakeError>, Option<Frame>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_address = listener.local_addr().unwrap().to_string();
        let relay = tokio::spawn(relay(listener, target.to_string(), rewrite));
        let dialer = identity("node-a", "127.0.0.1:2");
        let expected = expected.map(NodeId::new);
        let result = dial(&relay_address, expected.as_ref(), &dialer)
            .await
            .map(|(_, info)| info);
        (result, relay.await.unwrap())
    }

    /// A relay that claims the dialer dialed the target's address gets the target's
    /// Challenge, but its proof is for the target's address, not the relay's: the dialer
    /// (which knows no id for a seed address) refuses it and proves nothing.
    #[tokio::test]
    async fn dialer_refuses_a_proof_made_for_another_address() {
        let (target, _metrics, _inbox, _tasks) = acceptor("node-b").await;
        let rewrite = Rewrite {
            dialed_address_to_target: true,
            answering_node: None,
        };
        let (result, after_challenge) = dial_through_relay(&target, None, rewrite).await;
        assert!(
            matches!(result, Err(HandshakeError::WrongSecret(ref id)) if id.as_str() == "node-b"),
            "{result:?}"
        );
        assert_eq!(
            after_challenge, None,
            "the dialer sent a frame to the relay"
        );
    }

    /// A dialer that knows which node lives at an address refuses any other before it
    /// proves anything, and a relay that renames the answering node breaks its proof.
    #[tokio::test]
    async fn dialer_checks_who_answered_before_proving() {
        let (target, _metrics, _inbox, _tasks) = acceptor("node-b").await;
        let rewrite = Rewrite {
            dialed_address_to_target: true,
            answering_node: None,
        };
        let (result, after_challenge) = dial_through_relay(&target, Some("node-p"), rewrite).await;
        assert!(
            matches!(result, Err(HandshakeError::WrongNode { .. })),
            "{result:?}"
        );
        assert_eq!(after_challenge, None);
        let rewrite = Rewrite {
            dialed_address_to_target: true,
            answering_node: Some("node-p"),
        };
        let (result, after_challenge) = dial_through_relay(&target, Some("node-p"), rewrite).await;
        assert!(
            matches!(result, Err(HandshakeError::WrongSecret(_))),
            "{result:?}"
        );
        assert_eq!(after_challenge, None);
    }

    /// A relay that passes the Hello on unchanged is refused by the target: the dialed
    /// address is not the target's, so it proves nothing either, and counts the refusal.
    #[tokio::test]
    async fn acceptor_refuses_a_hello_for_another_address() {
        let (target, metrics, _inbox, _tasks) = acceptor("node-b").await;
        let rewrite = Rewrite {
            dialed_address_to_target: false,
            answering_node: None,
        };
        let (result, _) = dial_through_relay(&target, None, rewrite).await;
        assert!(
            matches!(&result, Err(HandshakeError::RefusedByPeer(reason)) if reason.contains("not one of this node's peer addresses")),
            "{result:?}"
        );
        let refused = metrics
            .peer_handshakes_refused
            .get_or_create(&ReasonLabels {
                reason: "wrong_address",
            })
            .get();
        assert_eq!(refused, 1);
    }

    /// A dial reflected back to the dialer's own listener is refused: no node talks to
    /// itself.
    #[tokio::test]
    async fn a_reflected_handshake_is_refused() {
        let (own_address, _metrics, _inbox, _tasks) = acceptor("node-a").await;
        let mut me = identity("node-a", &own_address);
        me.peer_addresses = vec![own_address.clone()];
        let result = dial(&own_address, None, &me).await.map(|(_, info)| info);
        assert!(
            matches!(&result, Err(HandshakeError::RefusedByPeer(reason)) if reason.contains("own id")),
            "{result:?}"
        );
    }

    /// Two honest nodes complete the handshake, the acceptor learns the dialer, and after it
    /// frames up to `MAX_FRAME_BYTES` pass.
    #[tokio::test]
    async fn honest_handshake_then_large_frames() {
        let (target, _metrics, mut inbox, _tasks) = acceptor("node-b").await;
        let dialer = identity("node-a", "127.0.0.1:2");
        let (mut connection, info) = dial(&target, Some(&NodeId::new("node-b")), &dialer)
            .await
            .expect("handshake");
        assert_eq!(info.id.as_str(), "node-b");
        match inbox.recv().await {
            Some(Inbox::Discovered { info }) => assert_eq!(info.id.as_str(), "node-a"),
            _ => panic!("the acceptor did not report the dialer"),
        }
        let message = Message::RepairWrite {
            request: 1,
            bucket: "b".into(),
            key: vec![0; 64 << 10],
            object: mendkv_core::version::Object::empty(),
        };
        send_frame(&mut connection, &Frame::Message(message.clone()))
            .await
            .expect("a message over the handshake limit is sent");
        match inbox.recv().await {
            Some(Inbox::Peer { from, message: got }) => {
                assert_eq!(from.as_str(), "node-a");
                assert_eq!(got, message);
            }
            _ => panic!("the acceptor did not pass the message on"),
        }
    }
}
