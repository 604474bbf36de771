//! The Redis protocol front end (SPEC section 9): RESP2 and RESP3 over TCP, so redis-cli,
//! redis-benchmark and Redis client libraries work against any node.
//!
//! Each connection is served by one task: it reads what the client sent, decodes every
//! whole frame in the buffer ([`codec`]), runs the commands one after another in order
//! (pipelining: many frames read, answered in order, written together) and waits for more.
//! Commands go to the node task as the HTTP handlers' do ([`Inbox::Client`]), so levels,
//! read repair, hints and metrics apply alike.
//!
//! Keys are keys of `resp.bucket` (database 0) or of bucket `db{n}` after `SELECT n`
//! (1..16); these buckets are `lww` while their properties were never set (the core's
//! `lww_default_buckets`, filled from the config), so a blind SET supersedes.
//!
//! Bounds: connections are capped at `http.max_connections` (one more is answered
//! `-ERR max number of clients reached` and closed), a connection idle for
//! `http.idle_timeout_ms` is closed, a bulk string is at most `storage.max_value_bytes`, an
//! array at most 1 Mi elements, an inline command at most 64 KiB, and bytes buffered for one
//! unfinished frame at most [`max_buffered`]. A protocol error is answered `-ERR Protocol
//! error: ...` and the connection closed (as Redis does).
//!
//! Not atomic, unlike Redis: SET NX|XX|GET, DEL, GETDEL and EXISTS read at `resp.read` and
//! then write at `resp.write`; MSET writes its keys one after another.

pub mod codec;

use crate::inbox::{FailedRequest, Inbox};
use crate::metrics::Metrics;
use codec::{decode, encode, Frame, Limits, Version};
use mendkv_core::message::{ClientRequest, ClientResponse};
use mendkv_core::quorum::ConsistencyLevel;
use mendkv_core::request::validate_key;
use mendkv_core::version::{CausalContext, Object, Value};
use prometheus_client::encoding::EncodeLabelSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

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

/// Accepts connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: RespState, mut shutdown: watch::Receiver<bool>) {
    let state = Arc::new(state);
    let permits = Arc::new(Semaphore::new(state.max_connections));
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                stream
            }
            Err(error) => {
                tracing::warn!(%error, "resp accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    stream.write_all(b"-ERR max number of clients reached\r\n"),
                )
                .await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            state.metrics.resp_connections.inc();
            serve_connection(stream, &state, shutdown).await;
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
    bucket: String,
    name: Vec<u8>,
    id: u64,
}

/// What a command asks of the connection beyond its reply.
#[derive(Debug, PartialEq, Eq)]
enum After {
    Continue,
    Close,
}

async fn serve_connection(
    mut stream: TcpStream,
    state: &RespState,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = Limits {
        max_bulk: state.max_value_bytes,
        ..Limits::default()
    };
    let max_buffered = max_buffered(state.max_value_bytes);
    let mut session = Session {
        version: Version::Resp2,
        authenticated: state.password.is_none(),
        db: 0,
        bucket: state.bucket.clone(),
        name: Vec::new(),
        id: state.next_client_id.fetch_add(1, Ordering::Relaxed) + 1,
    };
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let mut used = 0;
        let mut after = After::Continue;
        loop {
            match decode(&buffer[used..], &limits) {
                Ok(Some((frame, length))) => {
                    used += length;
                    let (reply, then) = run_frame(state, &mut session, frame).await;
                    if let Some(reply) = reply {
                        encode(&reply, session.version, &mut out);
                    }
                    if then == After::Close {
                        after = After::Close;
                        break;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    count(state, "protocol", "protocol_error");
                    encode(
                        &Frame::error(format!("ERR Protocol error: {error}")),
                        session.version,
                        &mut out,
                    );
                    after = After::Close;
                    break;
                }
            }
        }
        buffer.drain(..used);
        if !out.is_empty() {
            match tokio::time::timeout(state.idle_timeout, stream.write_all(&out)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            out.clear();
        }
        if after == After::Close {
            let _ = stream.shutdown().await;
            return;
        }
        if buffer.len() > max_buffered {
            let _ = stream
                .write_all(b"-ERR Protocol error: request too large\r\n")
                .await;
            return;
        }
        let read = tokio::select! {
            read = tokio::time::timeout(state.idle_timeout, stream.read(&mut chunk)) => read,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
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
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

async fn run_frame(
    state: &RespState,
    session: &mut Session,
    frame: Frame,
) -> (Option<Frame>, After) {
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
        count(state, "protocol", "protocol_error");
        return (
            Some(Frame::error(
                "ERR Protocol error: expected an array of bulk strings",
            )),
            After::Close,
        );
    };
    if args.is_empty() {
        // An empty inline line: Redis ignores it.
        return (None, After::Continue);
    }
    let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
    let label = COMMANDS
        .iter()
        .find(|c| **c == name)
        .copied()
        .unwrap_or("unknown");
    let (reply, after) = match execute(state, session, &name, &args).await {
        Ok((reply, after)) => {
            count(state, label, "ok");
            (reply, after)
        }
        Err(Fail(reply, outcome)) => {
            count(state, label, outcome);
            (reply, After::Continue)
        }
    };
    (Some(reply), after)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn parse_u64(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

async fn execute(
    state: &RespState,
    session: &mut Session,
    name: &str,
    args: &[Vec<u8>],
) -> Result<(Frame, After), Fail> {
    let ok = |frame: Frame| Ok((frame, After::Continue));
    if !session.authenticated && !matches!(name, "auth" | "hello" | "quit") {
        return Err(Fail(
            Frame::error("NOAUTH Authentication required."),
            "noauth",
        ));
    }
    let n = args.len();
    match name {
        "ping" => match n {
            1 => ok(Frame::simple("PONG")),
            2 => ok(Frame::bulk(args[1].clone())),
            _ => Err(arity(name)),
        },
        "echo" if n == 2 => ok(Frame::bulk(args[1].clone())),
        "quit" => Ok((Frame::ok(), After::Close)),
        "auth" => {
            let password = match n {
                2 => &args[1],
                3 => &args[2],
                _ => return Err(arity(name)),
            };
            authenticate(state, session, password)?;
            ok(Frame::ok())
        }
        "hello" => hello(state, session, args).map(|f| (f, After::Continue)),
        "select" if n == 2 => {
            let db = parse_u64(&args[1])
                .ok_or_else(|| err("ERR value is not an integer or out of range"))?;
            if db >= u64::from(crate::config::RESP_DATABASES) {
                return Err(err("ERR DB index is out of range"));
            }
            session.db = db as u32;
            session.bucket = if db == 0 {
                state.bucket.clone()
            } else {
                format!("db{db}")
            };
            ok(Frame::ok())
        }
        "get" if n == 2 => {
            let object = read(state, session, &args[1]).await?;
            ok(value_frame(&object)?)
        }
        "set" if n >= 3 => set(state, session, args)
            .await
            .map(|f| (f, After::Continue)),
        "getdel" if n == 2 => {
            let object = read(state, session, &args[1]).await?;
            let value = value_frame(&object)?;
            if value != Frame::Null {
                delete(state, session, &args[1], &object).await?;
            }
            ok(value)
        }
        "del" if n >= 2 => {
            let mut deleted = 0;
            for key in &args[1..] {
                let object = read(state, session, key).await?;
                if object.live_values().next().is_some() {
                    delete(state, session, key, &object).await?;
                    deleted += 1;
                }
            }
            ok(Frame::Integer(deleted))
        }
        "exists" if n >= 2 => {
            let mut found = 0;
            for key in &args[1..] {
                if read(state, session, key)
                    .await?
                    .live_values()
                    .next()
                    .is_some()
                {
                    found += 1;
                }
            }
            ok(Frame::Integer(found))
        }
        "mget" if n >= 2 => {
            let mut values = Vec::with_capacity(n - 1);
            for key in &args[1..] {
                let object = read(state, session, key).await?;
                // Redis answers nil for a key it cannot give as a string.
                values.push(value_frame(&object).unwrap_or(Frame::Null));
            }
            ok(Frame::Array(values))
        }
        "mset" if n >= 3 && n % 2 == 1 => {
            for pair in args[1..].chunks(2) {
                write(state, session, &pair[0], &pair[1], CausalContext::default()).await?;
            }
            ok(Frame::ok())
        }
        "dbsize" if n == 1 => ok(Frame::Integer(dbsize(state).await)),
        "info" => ok(Frame::bulk(info(state, session, args).await)),
        "command" => command(args).map(|f| (f, After::Continue)),
        "client" if n >= 2 => client(session, args).map(|f| (f, After::Continue)),
        "config" if n >= 2 => config(session, args).map(|f| (f, After::Continue)),
        _ if COMMANDS.contains(&name) => Err(arity(name)),
        _ => {
            let shown: String = text(&args[0]).chars().take(128).collect();
            let mut message = format!("ERR unknown command '{shown}', with args beginning with:");
            for arg in args[1..].iter().take(8) {
                let arg: String = text(arg).chars().take(64).collect();
                message.push_str(&format!(" '{arg}'"));
            }
            Err(err(message))
        }
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

async fn set(state: &RespState, session: &Session, args: &[Vec<u8>]) -> Result<Frame, Fail> {
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
    let (key, value) = (&args[1], &args[2]);
    if !(nx || xx || get) {
        write(state, session, key, value, CausalContext::default()).await?;
        return Ok(Frame::ok());
    }
    let object = read(state, session, key).await?;
    let old = if get {
        value_frame(&object)?
    } else {
        Frame::Null
    };
    let exists = object.live_values().next().is_some();
    if (nx && exists) || (xx && !exists) {
        return Ok(if get { old } else { Frame::Null });
    }
    write(state, session, key, value, object.causal_context()).await?;
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

async fn read(state: &RespState, session: &Session, key: &[u8]) -> Result<Object, Fail> {
    let request = ClientRequest::Get {
        bucket: session.bucket.clone(),
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
    session: &Session,
    key: &[u8],
    value: &[u8],
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
        bucket: session.bucket.clone(),
        key: checked_key(key)?,
        context,
        value: Value::Data {
            bytes: value.to_vec().into(),
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
async fn delete(
    state: &RespState,
    session: &Session,
    key: &[u8],
    object: &Object,
) -> Result<(), Fail> {
    let request = ClientRequest::Delete {
        bucket: session.bucket.clone(),
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

/// DBSIZE: mendkv keeps no count of live keys per bucket (it would cost a scan, or a
/// counter kept exact across repair and hints), so it answers 0: not tracked (README).
async fn dbsize(_state: &RespState) -> i64 {
    0
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

async fn info(state: &RespState, session: &Session, args: &[Vec<u8>]) -> Vec<u8> {
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
        out.push_str(&format!(
            "# Keyspace\r\n# keys are not counted by mendkv (DBSIZE answers 0)\r\n\
             db{}:bucket={}\r\n\r\n",
            session.db, session.bucket
        ));
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

/// What CONFIG GET answers: enough for redis-benchmark and clients that probe.
const CONFIG: &[(&str, &str)] = &[
    ("save", ""),
    ("appendonly", "no"),
    ("databases", "16"),
    ("maxmemory", "0"),
    ("maxclients", "4096"),
    ("timeout", "0"),
];

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

fn config(session: &Session, args: &[Vec<u8>]) -> Result<Frame, Fail> {
    let _ = session;
    let sub = text(&args[1]).to_ascii_lowercase();
    match sub.as_str() {
        "get" if args.len() >= 3 => {
            let mut pairs = Vec::new();
            for (name, value) in CONFIG {
                // Patterns longer than a name cannot match it; bounded work per pattern.
                if args[2..]
                    .iter()
                    .any(|p| p.len() <= 64 && glob(p, name.as_bytes()))
                {
                    pairs.push((Frame::bulk(*name), Frame::bulk(*value)));
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

#[cfg(test)]
mod tests;
