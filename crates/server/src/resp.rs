//! The Redis protocol front end (SPEC section 9): RESP2 and RESP3 over TCP (or TLS when
//! `tls.client` is on), so redis-cli, redis-benchmark and Redis client libraries work
//! against any node.
//!
//! Each connection is served by one task: it reads what the client sent, decodes every
//! whole frame in the buffer ([`codec`]) and starts the commands in order. Commands go to
//! the node task as the HTTP handlers' do ([`Inbox::Client`]), so levels, read repair,
//! hints and metrics apply alike.
//!
//! # Pipelining
//! Up to [`MAX_IN_FLIGHT`] commands of one connection are in flight together; replies leave
//! in command order, every reply that is ready going out in one write. The rule that keeps
//! Redis's observable order:
//! - connection commands (SELECT, AUTH, HELLO, CLIENT, QUIT, PING, ...) take effect when
//!   they are reached, and a command sees the session as it was at its place in the
//!   pipeline (its bucket, whether it was authenticated, the protocol its reply is encoded
//!   in). QUIT stops reading; the commands before it are still answered.
//! - a command that names a key waits until every earlier command in flight that names
//!   the same key (in the same bucket) has finished, so a GET after a SET of its key sees
//!   the SET, and two SETs of one key are applied in order. Commands on other keys do not
//!   wait for each other: mendkv orders them no more than two clients' commands.
//! - DBSIZE and INFO wait for every earlier command that names a key, and those after
//!   them wait for them.
//!   While a command waits, nothing after it starts and nothing more is read (the socket
//!   applies backpressure).
//!
//! Keys are keys of `resp.bucket` (database 0) or of bucket `db{n}` after `SELECT n`
//! (1..16); these buckets are `lww` while their properties were never set (the core's
//! `lww_default_buckets`, filled from the config), so a blind SET supersedes.
//!
//! Bounds: connections are capped at `http.max_connections` (one more is answered
//! `-ERR max number of clients reached` and closed, counted in
//! `mendkv_resp_connections_refused`), a connection with nothing in flight and nothing
//! received for `http.idle_timeout_ms` is closed (`mendkv_resp_connections_idle_closed`),
//! a TLS handshake gets `http.header_timeout_ms`, a bulk string is at most
//! `storage.max_value_bytes`, an array at most 1 Mi elements, an inline command at most
//! 64 KiB, and bytes buffered for one unfinished frame at most [`max_buffered`]. A protocol
//! error is answered `-ERR Protocol error: ...` and the connection closed (as Redis does).
//!
//! Not atomic, unlike Redis: SET NX|XX|GET, DEL, GETDEL and EXISTS read at `resp.read` and
//! then write at `resp.write`; MSET writes its keys one after another.

pub mod codec;

use crate::inbox::{FailedRequest, Inbox};
use crate::metrics::Metrics;
use codec::{decode, encode, Frame, Limits, Version};
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use mendkv_core::message::{ClientRequest, ClientResponse};
use mendkv_core::quorum::ConsistencyLevel;
use mendkv_core::request::validate_key;
use mendkv_core::version::{CausalContext, Object, Value};
use mendkv_storage::FjallStorage;
use prometheus_client::encoding::EncodeLabelSet;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_rustls::TlsAcceptor;

/// Labels of `mendkv_resp_commands_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub command: &'static str,
    pub outcome: &'static str,
}

/// What every connection shares.
#[derive(Clone)]
pub struct RespState {
    pub inbox: mpsc::Sender<Inbox>,
    pub metrics: Arc<Metrics>,
    pub bucket: String,
    pub read: ConsistencyLevel,
    pub write: ConsistencyLevel,
    pub password: Option<String>,
    pub max_value_bytes: usize,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// How long a TLS handshake may take (`http.header_timeout_ms`).
    pub handshake_timeout: Duration,
    /// TLS on this listener (`tls.client`); plain text when `None`.
    pub tls: Option<TlsAcceptor>,
    /// The node's storage, for DBSIZE and INFO keyspace (this node's own keys).
    pub storage: FjallStorage,
    /// One key count (a scan of every object) at a time, whatever the number of clients.
    pub key_counting: Arc<tokio::sync::Mutex<()>>,
    pub node_id: String,
    pub listen: String,
    pub started: Instant,
    pub next_client_id: Arc<AtomicU64>,
}

/// Bytes buffered for one unfinished frame at most: room for MSET of a few big values.
pub fn max_buffered(max_value_bytes: usize) -> usize {
    max_value_bytes.saturating_mul(4).max(16 << 20)
}

/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Commands of one connection in flight together at most; the next waits for the oldest.
/// Enough for redis-benchmark's `-P 16` and clients' pipelines, small enough that 4096
/// connections cannot flood the node's inbox.
pub const MAX_IN_FLIGHT: usize = 64;

/// A connection's buffers are given back to the allocator when they grew past this and
/// emptied again (one big MSET does not pin its size for the connection's life).
const KEPT_BUFFER_BYTES: usize = 1 << 20;

/// Accepts connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: RespState, mut shutdown: watch::Receiver<bool>) {
    let state = Arc::new(state);
    let permits = Arc::new(Semaphore::new(
        state.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(10);
                accepted
            }
            Err(error) => {
                tracing::warn!(%error, listen = %state.listen, "resp accept failed; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            state.metrics.resp_connections_refused.inc();
            // The socket is fresh, so its send buffer takes the short answer at once; a
            // TLS client could not read plain text, so it is just closed.
            if state.tls.is_none() {
                let _ = stream.try_write(b"-ERR max number of clients reached\r\n");
            }
            tracing::debug!(%client, "resp connection refused: at max_connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            state.metrics.resp_connections.inc();
            match &state.tls {
                None => serve_connection(stream, &state, shutdown).await,
                Some(acceptor) => {
                    // A plain-text client fails the handshake here and is closed.
                    let handshake = tokio::time::timeout(
                        state.handshake_timeout,
                        acceptor.clone().accept(stream),
                    );
                    let accepted = tokio::select! {
                        accepted = handshake => Some(accepted),
                        _ = shutdown.wait_for(|stop| *stop) => None,
                    };
                    match accepted {
                        Some(Ok(Ok(stream))) => serve_connection(stream, &state, shutdown).await,
                        Some(Ok(Err(error))) => {
                            tracing::debug!(%client, %error, "resp TLS handshake failed")
                        }
                        Some(Err(_)) => tracing::debug!(
                            %client,
                            "resp TLS handshake not finished within http.header_timeout_ms"
                        ),
                        None => {}
                    }
                }
            }
            state.metrics.resp_connections.dec();
            drop(permit);
        });
    }
}

/// One client's state.
struct Session {
    version: Version,
    authenticated: bool,
    db: u32,
    /// The bucket of `db`, shared by the commands in flight that were started under it.
    bucket: Arc<str>,
    name: Vec<u8>,
    id: u64,
}

/// What a command asks of the connection beyond its reply.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum After {
    Continue,
    Close,
}

/// A command decoded and checked against the session at its place in the pipeline.
struct Started {
    label: &'static str,
    /// The protocol its reply is encoded in: the session's after the command ran.
    version: Version,
    after: After,
    work: Work,
}

enum Work {
    /// Answered without the node: connection commands and refusals.
    Ready(Result<Frame, Fail>),
    /// A command of the node or storage, with the bucket of its place in the pipeline.
    Data {
        command: DataCommand,
        bucket: Arc<str>,
        args: Vec<Vec<u8>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataCommand {
    Get,
    Set,
    GetDel,
    Del,
    Exists,
    MGet,
    MSet,
    DbSize,
    Info,
}

/// What a command in flight reads or writes, for the ordering rule (module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Touch {
    Nothing,
    /// Hashes of (bucket, key): a collision only makes a command wait when it need not.
    Keys(Vec<u64>),
    Everything,
}

impl Touch {
    fn of(work: &Work) -> Touch {
        let Work::Data {
            command,
            bucket,
            args,
        } = work
        else {
            return Touch::Nothing;
        };
        let keys: Vec<&Vec<u8>> = match command {
            DataCommand::DbSize | DataCommand::Info => return Touch::Everything,
            DataCommand::Get | DataCommand::Set | DataCommand::GetDel => vec![&args[1]],
            DataCommand::Del | DataCommand::Exists | DataCommand::MGet => {
                args[1..].iter().collect()
            }
            DataCommand::MSet => args[1..].iter().step_by(2).collect(),
        };
        Touch::Keys(keys.into_iter().map(|key| key_hash(bucket, key)).collect())
    }

    /// True when `self` must wait for `earlier`, still in flight.
    fn waits_for(&self, earlier: &Touch) -> bool {
        match (self, earlier) {
            (Touch::Nothing, _) | (_, Touch::Nothing) => false,
            (Touch::Everything, _) | (_, Touch::Everything) => true,
            (Touch::Keys(mine), Touch::Keys(theirs)) => mine.iter().any(|k| theirs.contains(k)),
        }
    }
}

fn key_hash(bucket: &str, key: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bucket.hash(&mut hasher);
    key.hash(&mut hasher);
    hasher.finish()
}

/// A finished command: its reply and what it counts as.
struct Done {
    label: &'static str,
    outcome: &'static str,
    version: Version,
    reply: Frame,
}

/// The commands of one connection in flight, oldest first, with what each touches.
struct InFlight<F: std::future::Future> {
    replies: FuturesOrdered<F>,
    touches: VecDeque<Touch>,
}

impl<F: std::future::Future<Output = Done>> InFlight<F> {
    fn len(&self) -> usize {
        self.touches.len()
    }

    fn is_empty(&self) -> bool {
        self.touches.is_empty()
    }

    /// True when `touch` may start now: there is room, and nothing in flight it waits for.
    fn admits(&self, touch: &Touch) -> bool {
        self.len() < MAX_IN_FLIGHT && !self.touches.iter().any(|t| touch.waits_for(t))
    }

    fn push(&mut self, reply: F, touch: Touch) {
        self.replies.push_back(reply);
        self.touches.push_back(touch);
    }

    /// The oldest command's reply once it is there.
    async fn next(&mut self) -> Option<Done> {
        let done = self.replies.next().await?;
        self.touches.pop_front();
        Some(done)
    }

    /// The oldest command's reply if it is there already.
    fn next_ready(&mut self) -> Option<Done> {
        self.next().now_or_never().flatten()
    }
}

async fn serve_connection<S>(mut stream: S, state: &RespState, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = Limits {
        max_bulk: state.max_value_bytes,
        ..Limits::default()
    };
    let max_buffered = max_buffered(state.max_value_bytes);
    let mut session = Session {
        version: Version::Resp2,
        authenticated: state.password.is_none(),
        db: 0,
        bucket: state.bucket.as_str().into(),
        name: Vec::new(),
        id: state.next_client_id.fetch_add(1, Ordering::Relaxed) + 1,
    };
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut in_flight = InFlight {
        replies: FuturesOrdered::new(),
        touches: VecDeque::new(),
    };
    // A decoded command that may not start yet (no room, or an earlier one on its key).
    let mut held: Option<(Started, Touch)> = None;
    // QUIT or a protocol error was reached: nothing more is read or started.
    let mut closing = false;
    // The client closed its side: what it sent before is still run and answered.
    let mut input_ended = false;
    let idle = tokio::time::sleep(state.idle_timeout);
    tokio::pin!(idle);
    loop {
        // Start every whole command buffered, in order, until one must wait.
        let mut used = 0;
        while !closing {
            let (started, touch) = match held.take() {
                Some(next) => next,
                None => match decode(&buffer[used..], &limits) {
                    Ok(Some((frame, length))) => {
                        used += length;
                        let Some(started) = start(state, &mut session, frame) else {
                            continue;
                        };
                        let touch = Touch::of(&started.work);
                        (started, touch)
                    }
                    Ok(None) => break,
                    Err(error) => (
                        Started {
                            label: "protocol",
                            version: session.version,
                            after: After::Close,
                            work: Work::Ready(Err(Fail(
                                Frame::error(format!("ERR Protocol error: {error}")),
                                "protocol_error",
                            ))),
                        },
                        Touch::Nothing,
                    ),
                },
            };
            if !in_flight.admits(&touch) {
                held = Some((started, touch));
                break;
            }
            closing = started.after == After::Close;
            in_flight.push(complete(state, started), touch);
        }
        buffer.drain(..used);
        if buffer.is_empty() && buffer.capacity() > KEPT_BUFFER_BYTES {
            buffer = Vec::with_capacity(READ_CHUNK_BYTES);
        }

        // Every reply that is ready goes out in one write.
        while let Some(done) = in_flight.next_ready() {
            finish(state, done, &mut out);
        }
        if !out.is_empty() {
            match tokio::time::timeout(state.idle_timeout, stream.write_all(&out)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            out.clear();
            if out.capacity() > KEPT_BUFFER_BYTES {
                out = Vec::new();
            }
            idle.as_mut()
                .reset(tokio::time::Instant::now() + state.idle_timeout);
        }
        // Once input ended and nothing waits to start, what is left in the buffer is an
        // unfinished frame that can never complete.
        if (closing || (input_ended && held.is_none())) && in_flight.is_empty() {
            let _ = stream.shutdown().await;
            return;
        }
        if held
            .as_ref()
            .is_some_and(|(_, touch)| in_flight.admits(touch))
        {
            continue;
        }
        if buffer.len() > max_buffered {
            count(state, "protocol", "protocol_error");
            let _ = tokio::time::timeout(
                state.idle_timeout,
                stream.write_all(b"-ERR Protocol error: request too large\r\n"),
            )
            .await;
            return;
        }

        // Wait for the oldest reply, more input (unless a command waits), or the end.
        let reading = held.is_none() && !closing && !input_ended;
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                finish(state, done, &mut out);
            }
            read = stream.read(&mut chunk), if reading => match read {
                // The client is gone or half-closed: what it sent is still answered.
                Ok(0) | Err(_) => input_ended = true,
                Ok(n) => {
                    buffer.extend_from_slice(&chunk[..n]);
                    idle.as_mut().reset(tokio::time::Instant::now() + state.idle_timeout);
                }
            },
            _ = &mut idle, if in_flight.is_empty() && reading => {
                state.metrics.resp_connections_idle_closed.inc();
                tracing::debug!(client_id = session.id, "resp connection closed: idle");
                return;
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Runs a started command to its reply.
async fn complete(state: &RespState, started: Started) -> Done {
    let result = match started.work {
        Work::Ready(result) => result,
        Work::Data {
            command,
            bucket,
            args,
        } => run_data(state, command, &bucket, args).await,
    };
    let (reply, outcome) = match result {
        Ok(reply) => (reply, "ok"),
        Err(Fail(reply, outcome)) => (reply, outcome),
    };
    Done {
        label: started.label,
        outcome,
        version: started.version,
        reply,
    }
}

/// Counts a finished command and encodes its reply.
fn finish(state: &RespState, done: Done, out: &mut Vec<u8>) {
    count(state, done.label, done.outcome);
    encode(&done.reply, done.version, out);
}

/// Command names as metric labels (a bounded set).
const COMMANDS: &[&str] = &[
    "ping", "echo", "hello", "auth", "select", "quit", "get", "set", "del", "exists", "mget",
    "mset", "getdel", "info", "dbsize", "command", "client", "config",
];

fn count(state: &RespState, command: &'static str, outcome: &'static str) {
    state
        .metrics
        .resp_commands
        .get_or_create(&CommandLabels { command, outcome })
        .inc();
}

/// A command's failure: the RESP error and its outcome label.
struct Fail(Frame, &'static str);

fn err(message: impl Into<String>) -> Fail {
    Fail(Frame::error(message), "error")
}

fn arity(name: &str) -> Fail {
    err(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

/// Decodes a command and runs what the session alone answers; `None` for an empty inline
/// line (Redis ignores it).
fn start(state: &RespState, session: &mut Session, frame: Frame) -> Option<Started> {
    let args: Option<Vec<Vec<u8>>> = match frame {
        Frame::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Frame::Bulk(bytes) | Frame::Simple(bytes) => Some(bytes),
                Frame::Integer(n) => Some(n.to_string().into_bytes()),
                _ => None,
            })
            .collect(),
        _ => None,
    };
    let Some(args) = args else {
        return Some(Started {
            label: "protocol",
            version: session.version,
            after: After::Close,
            work: Work::Ready(Err(Fail(
                Frame::error("ERR Protocol error: expected an array of bulk strings"),
                "protocol_error",
            ))),
        });
    };
    if args.is_empty() {
        return None;
    }
    let name = COMMANDS
        .iter()
        .find(|c| c.as_bytes().eq_ignore_ascii_case(&args[0]))
        .copied();
    let (work, after) = match name {
        Some(name) => prepare(state, session, name, args),
        None if !session.authenticated => (Work::Ready(Err(noauth())), After::Continue),
        None => (Work::Ready(Err(unknown_command(&args))), After::Continue),
    };
    Some(Started {
        label: name.unwrap_or("unknown"),
        version: session.version,
        after,
        work,
    })
}

fn noauth() -> Fail {
    Fail(Frame::error("NOAUTH Authentication required."), "noauth")
}

fn unknown_command(args: &[Vec<u8>]) -> Fail {
    let shown: String = text(&args[0]).chars().take(128).collect();
    let mut message = format!("ERR unknown command '{shown}', with args beginning with:");
    for arg in args[1..].iter().take(8) {
        let arg: String = text(arg).chars().take(64).collect();
        message.push_str(&format!(" '{arg}'"));
    }
    err(message)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn parse_u64(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// A known command: connection commands run now; data commands become [`Work::Data`].
fn prepare(
    state: &RespState,
    session: &mut Session,
    name: &'static str,
    args: Vec<Vec<u8>>,
) -> (Work, After) {
    let ready = |result: Result<Frame, Fail>| (Work::Ready(result), After::Continue);
    if !session.authenticated && !matches!(name, "auth" | "hello" | "quit") {
        return ready(Err(noauth()));
    }
    let data = |command: DataCommand, args: Vec<Vec<u8>>| {
        (
            Work::Data {
                command,
                bucket: session.bucket.clone(),
                args,
            },
            After::Continue,
        )
    };
    let n = args.len();
    match name {
        "ping" => ready(match n {
            1 => Ok(Frame::simple("PONG")),
            2 => Ok(Frame::Bulk(args.into_iter().nth(1).unwrap_or_default())),
            _ => Err(arity(name)),
        }),
        "echo" if n == 2 => ready(Ok(Frame::Bulk(args.into_iter().nth(1).unwrap_or_default()))),
        "quit" => (Work::Ready(Ok(Frame::ok())), After::Close),
        "auth" => ready(match n {
            2 | 3 => authenticate(state, session, &args[n - 1]).map(|()| Frame::ok()),
            _ => Err(arity(name)),
        }),
        "hello" => ready(hello(state, session, &args)),
        "select" if n == 2 => ready(select(state, session, &args[1])),
        "command" => ready(command(&args)),
        "client" if n >= 2 => ready(client(session, &args)),
        "config" if n >= 2 => ready(config(state, &args)),
        "get" | "getdel" if n == 2 => data(
            if name == "get" {
                DataCommand::Get
            } else {
                DataCommand::GetDel
            },
            args,
        ),
        "set" if n >= 3 => data(DataCommand::Set, args),
        "del" if n >= 2 => data(DataCommand::Del, args),
        "exists" if n >= 2 => data(DataCommand::Exists, args),
        "mget" if n >= 2 => data(DataCommand::MGet, args),
        "mset" if n >= 3 && n % 2 == 1 => data(DataCommand::MSet, args),
        "dbsize" if n == 1 => data(DataCommand::DbSize, args),
        "info" => data(DataCommand::Info, args),
        _ => ready(Err(arity(name))),
    }
}

fn select(state: &RespState, session: &mut Session, db: &[u8]) -> Result<Frame, Fail> {
    let db = parse_u64(db).ok_or_else(|| err("ERR value is not an integer or out of range"))?;
    if db >= u64::from(crate::config::RESP_DATABASES) {
        return Err(err("ERR DB index is out of range"));
    }
    session.db = db as u32;
    session.bucket = database_bucket(state, db as u32).into();
    Ok(Frame::ok())
}

/// The bucket of database `db`: `resp.bucket` for 0, `db{n}` otherwise.
fn database_bucket(state: &RespState, db: u32) -> String {
    if db == 0 {
        state.bucket.clone()
    } else {
        format!("db{db}")
    }
}

/// Runs a command of the node or storage.
async fn run_data(
    state: &RespState,
    command: DataCommand,
    bucket: &str,
    mut args: Vec<Vec<u8>>,
) -> Result<Frame, Fail> {
    match command {
        DataCommand::Get => value_frame(&read(state, bucket, &args[1]).await?),
        DataCommand::Set => set(state, bucket, args).await,
        DataCommand::GetDel => {
            let object = read(state, bucket, &args[1]).await?;
            let value = value_frame(&object)?;
            if value != Frame::Null {
                delete(state, bucket, &args[1], &object).await?;
            }
            Ok(value)
        }
        DataCommand::Del => {
            let mut deleted = 0;
            for key in &args[1..] {
                let object = read(state, bucket, key).await?;
                if object.live_values().next().is_some() {
                    delete(state, bucket, key, &object).await?;
                    deleted += 1;
                }
            }
            Ok(Frame::Integer(deleted))
        }
        DataCommand::Exists => {
            let mut found = 0;
            for key in &args[1..] {
                if read(state, bucket, key)
                    .await?
                    .live_values()
                    .next()
                    .is_some()
                {
                    found += 1;
                }
            }
            Ok(Frame::Integer(found))
        }
        DataCommand::MGet => {
            let mut values = Vec::with_capacity(args.len() - 1);
            for key in &args[1..] {
                let object = read(state, bucket, key).await?;
                // Redis answers nil for a key it cannot give as a string.
                values.push(value_frame(&object).unwrap_or(Frame::Null));
            }
            Ok(Frame::Array(values))
        }
        DataCommand::MSet => {
            for pair in args[1..].chunks_mut(2) {
                let value = std::mem::take(&mut pair[1]);
                write(state, bucket, &pair[0], value, CausalContext::default()).await?;
            }
            Ok(Frame::ok())
        }
        DataCommand::DbSize => {
            let counts = live_key_counts(state, vec![bucket.to_string()]).await?;
            Ok(Frame::Integer(counts[0] as i64))
        }
        DataCommand::Info => Ok(Frame::bulk(info(state, &args).await)),
    }
}

fn authenticate(state: &RespState, session: &mut Session, password: &[u8]) -> Result<(), Fail> {
    match &state.password {
        None => Err(err(
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        )),
        Some(expected) if constant_time_eq(expected.as_bytes(), password) => {
            session.authenticated = true;
            Ok(())
        }
        Some(_) => Err(Fail(
            Frame::error("WRONGPASS invalid username-password pair or user is disabled."),
            "wrongpass",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hello(state: &RespState, session: &mut Session, args: &[Vec<u8>]) -> Result<Frame, Fail> {
    let mut version = session.version;
    let mut rest = &args[1..];
    if let Some(first) = rest.first() {
        version = match parse_u64(first) {
            Some(2) => Version::Resp2,
            Some(3) => Version::Resp3,
            _ => {
                return Err(Fail(
                    Frame::error("NOPROTO unsupported protocol version"),
                    "error",
                ))
            }
        };
        rest = &rest[1..];
    }
    let mut name = None;
    while let Some(option) = rest.first() {
        match (text(option).to_ascii_lowercase().as_str(), rest.len()) {
            ("auth", 3..) => {
                authenticate(state, session, &rest[2])?;
                rest = &rest[3..];
            }
            ("setname", 2..) => {
                name = Some(rest[1].clone());
                rest = &rest[2..];
            }
            _ => {
                return Err(err(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    text(option)
                )))
            }
        }
    }
    if !session.authenticated {
        return Err(Fail(
            Frame::error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time"),
            "noauth",
        ));
    }
    if let Some(name) = name {
        session.name = name;
    }
    session.version = version;
    let proto = if version == Version::Resp3 { 3 } else { 2 };
    Ok(Frame::Map(vec![
        (Frame::bulk("server"), Frame::bulk("redis")),
        (Frame::bulk("version"), Frame::bulk(REDIS_VERSION)),
        (Frame::bulk("proto"), Frame::Integer(proto)),
        (Frame::bulk("id"), Frame::Integer(session.id as i64)),
        (Frame::bulk("mode"), Frame::bulk("cluster-of-replicas")),
        (Frame::bulk("role"), Frame::bulk("master")),
        (Frame::bulk("modules"), Frame::Array(vec![])),
    ]))
}

/// What HELLO and INFO report as the Redis version the commands follow.
const REDIS_VERSION: &str = "7.2.0";

async fn set(state: &RespState, bucket: &str, mut args: Vec<Vec<u8>>) -> Result<Frame, Fail> {
    let (mut nx, mut xx, mut get) = (false, false, false);
    for option in &args[3..] {
        match text(option).to_ascii_uppercase().as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GET" => get = true,
            "EX" | "PX" | "EXAT" | "PXAT" | "KEEPTTL" => {
                return Err(err(
                    "ERR expiry (EX, PX, EXAT, PXAT, KEEPTTL) is not supported by mendkv",
                ))
            }
            _ => return Err(err("ERR syntax error")),
        }
    }
    if nx && xx {
        return Err(err("ERR syntax error"));
    }
    let value = std::mem::take(&mut args[2]);
    let key = &args[1];
    if !(nx || xx || get) {
        write(state, bucket, key, value, CausalContext::default()).await?;
        return Ok(Frame::ok());
    }
    let object = read(state, bucket, key).await?;
    let old = if get {
        value_frame(&object)?
    } else {
        Frame::Null
    };
    let exists = object.live_values().next().is_some();
    if (nx && exists) || (xx && !exists) {
        return Ok(if get { old } else { Frame::Null });
    }
    write(state, bucket, key, value, object.causal_context()).await?;
    Ok(if get { old } else { Frame::ok() })
}

/// The value a GET answers: nil when absent or deleted; siblings (a causal bucket) are
/// refused, as a Redis client cannot take several values.
fn value_frame(object: &Object) -> Result<Frame, Fail> {
    let live: Vec<_> = object.live_values().collect();
    match live.as_slice() {
        [] => Ok(Frame::Null),
        [single] => match &single.value {
            Value::Data { bytes, .. } => Ok(Frame::Bulk(bytes.to_vec())),
            Value::Tombstone => Ok(Frame::Null),
        },
        many => Err(Fail(
            Frame::error(format!(
                "SIBLINGS the key has {} siblings (a causal bucket): read and resolve them over HTTP",
                many.len()
            )),
            "siblings",
        )),
    }
}

fn checked_key(key: &[u8]) -> Result<Vec<u8>, Fail> {
    validate_key(key)
        .map(|()| key.to_vec())
        .map_err(|e| Fail(Frame::error(format!("BAD_REQUEST {e}")), "bad_request"))
}

async fn read(state: &RespState, bucket: &str, key: &[u8]) -> Result<Object, Fail> {
    let request = ClientRequest::Get {
        bucket: bucket.to_string(),
        key: checked_key(key)?,
        level: state.read,
    };
    match ask(state, request).await? {
        ClientResponse::Object(object) => {
            let bytes: usize = object.live_values().map(|s| s.value.size_bytes()).sum();
            state.metrics.count_bytes("out", "client", bytes);
            Ok(object)
        }
        other => Err(coordination_failure(other)),
    }
}

async fn write(
    state: &RespState,
    bucket: &str,
    key: &[u8],
    value: Vec<u8>,
    context: CausalContext,
) -> Result<(), Fail> {
    if value.len() > state.max_value_bytes {
        return Err(Fail(
            Frame::error(format!(
                "TOO_LARGE a value is at most {} bytes",
                state.max_value_bytes
            )),
            "too_large",
        ));
    }
    state.metrics.count_bytes("in", "client", value.len());
    let request = ClientRequest::Put {
        bucket: bucket.to_string(),
        key: checked_key(key)?,
        context,
        value: Value::Data {
            bytes: value.into(),
            content_type: "application/octet-stream".into(),
        },
        level: state.write,
    };
    match ask(state, request).await? {
        ClientResponse::Written { .. } => Ok(()),
        other => Err(coordination_failure(other)),
    }
}

/// Deletes what `object` (just read) holds.
async fn delete(state: &RespState, bucket: &str, key: &[u8], object: &Object) -> Result<(), Fail> {
    let request = ClientRequest::Delete {
        bucket: bucket.to_string(),
        key: checked_key(key)?,
        context: Some(object.causal_context()),
        level: state.write,
    };
    match ask(state, request).await? {
        ClientResponse::Written { .. } => Ok(()),
        other => Err(coordination_failure(other)),
    }
}

async fn ask(state: &RespState, request: ClientRequest) -> Result<ClientResponse, Fail> {
    crate::inbox::ask(&state.inbox, request, state.request_timeout)
        .await
        .map_err(|no_answer| failure(FailedRequest::from_no_answer(no_answer)))
}

/// The RESP error of a failed coordinated request: HTTP's codes, upper-cased.
fn coordination_failure(response: ClientResponse) -> Fail {
    failure(FailedRequest::from_response(response))
}

fn failure(failed: FailedRequest) -> Fail {
    Fail(
        Frame::error(format!(
            "{} {}",
            failed.code.to_ascii_uppercase(),
            failed.message
        )),
        failed.outcome,
    )
}

/// Live keys of each bucket in this node's own storage (DBSIZE, INFO keyspace). A node
/// stores the keys it replicates, so in a cluster of N nodes at replication factor r this
/// is about r/N of the bucket's keys (all of them when N = r); it is not scaled, as no
/// node knows the others' counts without asking them. A scan of every object, on a
/// blocking thread, one at a time.
async fn live_key_counts(state: &RespState, buckets: Vec<String>) -> Result<Vec<u64>, Fail> {
    let _one_at_a_time = state.key_counting.lock().await;
    let storage = state.storage.clone();
    let counted = tokio::task::spawn_blocking(move || {
        let names: Vec<&str> = buckets.iter().map(String::as_str).collect();
        storage.live_key_counts(&names)
    })
    .await;
    match counted {
        Ok(Ok(counts)) => Ok(counts),
        Ok(Err(error)) => Err(Fail(
            Frame::error(format!("STORAGE_ERROR counting keys: {error}")),
            "storage_error",
        )),
        Err(error) => Err(Fail(
            Frame::error(format!("ERR counting keys failed: {error}")),
            "error",
        )),
    }
}

async fn cluster_status(state: &RespState) -> Option<crate::inbox::ClusterStatus> {
    let (reply, answer) = oneshot::channel();
    state.inbox.send(Inbox::Status { reply }).await.ok()?;
    answer.await.ok()
}

async fn dashboard(state: &RespState) -> Option<crate::dashboard::DashboardState> {
    let (reply, answer) = oneshot::channel();
    state.inbox.send(Inbox::Dashboard { reply }).await.ok()?;
    answer.await.ok()
}

async fn info(state: &RespState, args: &[Vec<u8>]) -> Vec<u8> {
    let wanted: Vec<String> = args[1..]
        .iter()
        .map(|a| text(a).to_ascii_lowercase())
        .collect();
    let show = |section: &str| {
        wanted.is_empty()
            || wanted
                .iter()
                .any(|w| w == section || w == "all" || w == "everything" || w == "default")
    };
    let mut out = String::new();
    if show("server") {
        let port = state.listen.rsplit(':').next().unwrap_or("0");
        out.push_str(&format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\n\
             mendkv_version:{}\r\nmendkv_node:{}\r\nos:{}\r\narch_bits:64\r\n\
             process_id:{}\r\ntcp_port:{port}\r\nuptime_in_seconds:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            state.node_id,
            std::env::consts::OS,
            std::process::id(),
            state.started.elapsed().as_secs(),
        ));
    }
    if show("clients") {
        let connected = state.metrics.resp_connections.get();
        out.push_str(&format!(
            "# Clients\r\nconnected_clients:{connected}\r\nmaxclients:{}\r\n\r\n",
            state.max_connections
        ));
    }
    if show("replication") || show("cluster") {
        out.push_str("# Replication\r\nrole:master\r\n");
        if let Some(status) = cluster_status(state).await {
            out.push_str(&format!(
                "mendkv_cluster:{}\r\nconnected_slaves:{}\r\n",
                status.cluster,
                status.nodes.len().saturating_sub(1)
            ));
            for (i, node) in status.nodes.iter().enumerate() {
                out.push_str(&format!(
                    "node{i}:id={},http={},status={},state={},ownership={:.3},hints_pending={}\r\n",
                    node.id,
                    node.http_address,
                    node.status,
                    node.state,
                    node.ownership,
                    node.hints_pending
                ));
            }
        }
        out.push_str("\r\n");
    }
    if show("repair") {
        out.push_str("# Repair\r\n");
        if let Some(snapshot) = dashboard(state).await {
            out.push_str(&format!(
                "hints_pending:{}\r\nhints_bytes:{}\r\nrepair_runs:{}\r\n",
                snapshot.hints.pending_total,
                snapshot.hints.bytes,
                snapshot.repair.runs.len()
            ));
        }
        out.push_str("\r\n");
    }
    if show("keyspace") {
        // Redis lists the databases that hold keys; these are this node's own keys (see
        // `live_key_counts`), mendkv keeps no expiries.
        out.push_str("# Keyspace\r\n");
        let buckets: Vec<String> = (0..crate::config::RESP_DATABASES)
            .map(|db| database_bucket(state, db))
            .collect();
        match live_key_counts(state, buckets.clone()).await {
            Ok(counts) => {
                for (db, (keys, bucket)) in counts.iter().zip(&buckets).enumerate() {
                    if *keys > 0 {
                        out.push_str(&format!(
                            "db{db}:keys={keys},expires=0,avg_ttl=0,bucket={bucket}\r\n"
                        ));
                    }
                }
            }
            Err(Fail(error, _)) => {
                if let Frame::Error(message) = error {
                    out.push_str(&format!("# {}\r\n", text(&message)));
                }
            }
        }
        out.push_str("\r\n");
    }
    out.into_bytes()
}

fn command(args: &[Vec<u8>]) -> Result<Frame, Fail> {
    match args.get(1).map(|a| text(a).to_ascii_lowercase()).as_deref() {
        // redis-cli asks COMMAND DOCS for its hints; an empty answer makes it go without.
        None | Some("docs") | Some("info") | Some("list") => Ok(Frame::Array(vec![])),
        Some("count") => Ok(Frame::Integer(COMMANDS.len() as i64)),
        Some(other) => Err(err(format!(
            "ERR unknown subcommand '{other}'. Try COMMAND HELP."
        ))),
    }
}

fn client(session: &mut Session, args: &[Vec<u8>]) -> Result<Frame, Fail> {
    let sub = text(&args[1]).to_ascii_lowercase();
    match (sub.as_str(), args.len()) {
        ("setname", 3) => {
            if args[2].iter().any(|b| *b <= b' ' || *b > b'~') {
                return Err(err(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                ));
            }
            session.name = args[2].clone();
            Ok(Frame::ok())
        }
        ("getname", 2) => Ok(if session.name.is_empty() {
            Frame::Null
        } else {
            Frame::bulk(session.name.clone())
        }),
        ("id", 2) => Ok(Frame::Integer(session.id as i64)),
        ("info", 2) => Ok(Frame::bulk(format!(
            "id={} name={} db={} resp={}\n",
            session.id,
            text(&session.name),
            session.db,
            if session.version == Version::Resp3 {
                3
            } else {
                2
            }
        ))),
        // Client libraries announce themselves (redis-py: CLIENT SETINFO LIB-NAME ...).
        ("setinfo", 4) => Ok(Frame::ok()),
        ("setname" | "getname" | "id" | "info" | "setinfo", _) => Err(err(format!(
            "ERR wrong number of arguments for 'client|{sub}' command"
        ))),
        _ => Err(err(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            text(&args[1])
        ))),
    }
}

/// What CONFIG GET answers: enough for redis-benchmark and clients that probe, from the
/// node's configuration where Redis has a counterpart.
fn config_values(state: &RespState) -> Vec<(&'static str, String)> {
    vec![
        ("save", String::new()),
        ("appendonly", "no".into()),
        ("databases", crate::config::RESP_DATABASES.to_string()),
        ("maxmemory", "0".into()),
        ("maxclients", state.max_connections.to_string()),
        ("timeout", state.idle_timeout.as_secs().to_string()),
    ]
}

fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && glob(rest, &name[1..]),
        Some((c, rest)) => name
            .first()
            .is_some_and(|n| n.eq_ignore_ascii_case(c) && glob(rest, &name[1..])),
    }
}

fn config(state: &RespState, args: &[Vec<u8>]) -> Result<Frame, Fail> {
    let sub = text(&args[1]).to_ascii_lowercase();
    match sub.as_str() {
        "get" if args.len() >= 3 => {
            let mut pairs = Vec::new();
            for (name, value) in config_values(state) {
                // Patterns longer than a name cannot match it; bounded work per pattern.
                if args[2..]
                    .iter()
                    .any(|p| p.len() <= 64 && glob(p, name.as_bytes()))
                {
                    pairs.push((Frame::bulk(name), Frame::bulk(value)));
                }
            }
            Ok(Frame::Map(pairs))
        }
        "get" => Err(err(
            "ERR wrong number of arguments for 'config|get' command",
        )),
        "set" | "resetstat" | "rewrite" => Err(err(format!(
            "ERR CONFIG {} is not supported by mendkv (configure the node instead)",
            sub.to_ascii_uppercase()
        ))),
        _ => Err(err(format!(
            "ERR unknown subcommand '{}'. Try CONFIG HELP.",
            text(&args[1])
        ))),
    }
}

/// One command run to its reply, outside a connection (for the unit tests).
#[cfg(test)]
async fn run_frame(
    state: &RespState,
    session: &mut Session,
    frame: Frame,
) -> (Option<Frame>, After) {
    let Some(started) = start(state, session, frame) else {
        return (None, After::Continue);
    };
    let after = started.after;
    let done = complete(state, started).await;
    count(state, done.label, done.outcome);
    (Some(done.reply), after)
}

#[cfg(test)]
mod tests;
