//! Commands against a stand-in node task that answers every coordinated request
//! `Unavailable` (so error mapping is checked without a cluster; the black-box tests in
//! crates/mendkv/tests/resp.rs run them against real nodes).

use super::*;
use std::path::Path;
use tokio::io::DuplexStream;

/// A RespState whose node is `inbox` and whose storage lives in `dir`.
fn state_with(inbox: mpsc::Sender<Inbox>, password: Option<&str>, dir: &Path) -> RespState {
    RespState {
        inbox,
        metrics: Metrics::new(),
        bucket: "default".into(),
        read: ConsistencyLevel::Quorum,
        write: ConsistencyLevel::Quorum,
        password: password.map(str::to_string),
        max_value_bytes: 1 << 20,
        request_timeout: Duration::from_secs(2),
        max_connections: 16,
        idle_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(5),
        tls: None,
        storage: FjallStorage::open(dir).expect("storage"),
        key_counting: Default::default(),
        node_id: "node1".into(),
        listen: "127.0.0.1:9001".into(),
        started: Instant::now(),
        next_client_id: Default::default(),
    }
}

/// A RespState whose node answers every coordinated request `Unavailable`.
fn state(password: Option<&str>) -> (RespState, tempfile::TempDir) {
    let (inbox, mut requests) = mpsc::channel::<Inbox>(16);
    tokio::spawn(async move {
        while let Some(message) = requests.recv().await {
            if let Inbox::Client { reply, .. } = message {
                let _ = reply.send(ClientResponse::Unavailable {
                    needed: 2,
                    answered: 1,
                });
            }
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    (state_with(inbox, password, dir.path()), dir)
}

fn session(state: &RespState) -> Session {
    Session {
        version: Version::Resp2,
        authenticated: state.password.is_none(),
        db: 0,
        bucket: state.bucket.as_str().into(),
        name: Vec::new(),
        id: 1,
    }
}

async fn run(state: &RespState, session: &mut Session, words: &[&str]) -> Frame {
    let frame = Frame::Array(words.iter().map(|w| Frame::bulk(w.as_bytes())).collect());
    run_frame(state, session, frame).await.0.expect("a reply")
}

fn error_text(frame: &Frame) -> String {
    match frame {
        Frame::Error(text) => String::from_utf8_lossy(text).into_owned(),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_commands_answer_as_redis_does() {
    let (state, _dir) = state(None);
    let mut s = session(&state);
    assert_eq!(run(&state, &mut s, &["PING"]).await, Frame::simple("PONG"));
    assert_eq!(
        run(&state, &mut s, &["ping", "hi"]).await,
        Frame::bulk("hi")
    );
    assert_eq!(run(&state, &mut s, &["ECHO", "x"]).await, Frame::bulk("x"));
    assert_eq!(
        error_text(&run(&state, &mut s, &["FLUSHALL"]).await),
        "ERR unknown command 'FLUSHALL', with args beginning with:"
    );
    assert_eq!(
        error_text(&run(&state, &mut s, &["GET"]).await),
        "ERR wrong number of arguments for 'get' command"
    );
    assert_eq!(run(&state, &mut s, &["SELECT", "2"]).await, Frame::ok());
    assert_eq!(&*s.bucket, "db2");
    assert_eq!(run(&state, &mut s, &["SELECT", "0"]).await, Frame::ok());
    assert_eq!(&*s.bucket, "default");
    assert!(error_text(&run(&state, &mut s, &["SELECT", "16"]).await).contains("out of range"));
    assert_eq!(
        run(&state, &mut s, &["CONFIG", "GET", "save"]).await,
        Frame::Map(vec![(Frame::bulk("save"), Frame::bulk(""))])
    );
    assert_eq!(
        run(&state, &mut s, &["config", "get", "append*"]).await,
        Frame::Map(vec![(Frame::bulk("appendonly"), Frame::bulk("no"))])
    );
    assert_eq!(
        run(&state, &mut s, &["CLIENT", "SETNAME", "me"]).await,
        Frame::ok()
    );
    assert_eq!(
        run(&state, &mut s, &["CLIENT", "GETNAME"]).await,
        Frame::bulk("me")
    );
    assert_eq!(
        run(&state, &mut s, &["COMMAND"]).await,
        Frame::Array(vec![])
    );
    let hello = run(&state, &mut s, &["HELLO", "3"]).await;
    assert!(matches!(hello, Frame::Map(_)));
    assert_eq!(s.version, Version::Resp3);
    assert!(error_text(&run(&state, &mut s, &["HELLO", "4"]).await).starts_with("NOPROTO"));
    assert!(
        error_text(&run(&state, &mut s, &["SET", "k", "v", "EX", "10"]).await)
            .contains("not supported")
    );
    assert!(
        error_text(&run(&state, &mut s, &["SET", "k", "v", "NX", "XX"]).await).contains("syntax")
    );
    assert_eq!(
        run_frame(&state, &mut s, Frame::Array(vec![Frame::bulk("QUIT")]))
            .await
            .1,
        After::Close
    );
}

#[tokio::test]
async fn coordination_failures_map_to_the_http_codes() {
    let (state, _dir) = state(None);
    let mut s = session(&state);
    for command in [
        &["GET", "k"][..],
        &["SET", "k", "v"],
        &["DEL", "k"],
        &["MGET", "a", "b"],
        &["GETDEL", "k"],
        &["SET", "k", "v", "NX"],
    ] {
        assert_eq!(
            error_text(&run(&state, &mut s, command).await),
            "UNAVAILABLE needed 2 replicas, 1 answered",
            "{command:?}"
        );
    }
    let text = String::from_utf8(state.metrics.encode().into_bytes()).unwrap_or_default();
    assert!(
        text.contains("mendkv_resp_commands_total{command=\"get\",outcome=\"unavailable\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_password_refuses_commands_until_auth() {
    let (state, _dir) = state(Some("s3cret"));
    let mut s = session(&state);
    assert!(error_text(&run(&state, &mut s, &["PING"]).await).starts_with("NOAUTH"));
    assert!(error_text(&run(&state, &mut s, &["AUTH", "wrong"]).await).starts_with("WRONGPASS"));
    assert_eq!(run(&state, &mut s, &["AUTH", "s3cret"]).await, Frame::ok());
    assert_eq!(run(&state, &mut s, &["PING"]).await, Frame::simple("PONG"));
    let mut other = session(&state);
    let hello = run(
        &state,
        &mut other,
        &["HELLO", "3", "AUTH", "default", "s3cret"],
    )
    .await;
    assert!(matches!(hello, Frame::Map(_)), "{hello:?}");
    assert!(other.authenticated);
}

#[test]
fn glob_matches_as_config_get_does() {
    assert!(glob(b"*", b"save"));
    assert!(glob(b"sa?e", b"save"));
    assert!(glob(b"SAVE", b"save"));
    assert!(!glob(b"save*x", b"save"));
}

#[tokio::test]
async fn config_get_and_dbsize_answer_from_the_node() {
    let (mut state, _dir) = state(None);
    state.max_connections = 77;
    let mut s = session(&state);
    assert_eq!(
        run(&state, &mut s, &["CONFIG", "GET", "maxclients"]).await,
        Frame::Map(vec![(Frame::bulk("maxclients"), Frame::bulk("77"))])
    );
    assert_eq!(
        run(&state, &mut s, &["CONFIG", "GET", "timeout"]).await,
        Frame::Map(vec![(Frame::bulk("timeout"), Frame::bulk("60"))])
    );
    assert_eq!(run(&state, &mut s, &["DBSIZE"]).await, Frame::Integer(0));
    let mut object = Object::empty();
    object.apply_write(
        mendkv_core::version::Actor::new("node1", 1),
        &CausalContext::empty(),
        Value::Data {
            bytes: b"v".to_vec().into(),
            content_type: "application/octet-stream".into(),
        },
    );
    use mendkv_core::storage::Storage;
    state.storage.put("default", b"a", &object).unwrap();
    state.storage.put("default", b"b", &object).unwrap();
    state.storage.put("db3", b"c", &object).unwrap();
    assert_eq!(run(&state, &mut s, &["DBSIZE"]).await, Frame::Integer(2));
    assert_eq!(run(&state, &mut s, &["SELECT", "3"]).await, Frame::ok());
    assert_eq!(run(&state, &mut s, &["DBSIZE"]).await, Frame::Integer(1));
    let Frame::Bulk(info) = run(&state, &mut s, &["INFO", "keyspace"]).await else {
        panic!("INFO answers a bulk string");
    };
    let info = String::from_utf8(info).unwrap();
    assert!(
        info.contains("db0:keys=2,expires=0,avg_ttl=0,bucket=default\r\n"),
        "{info}"
    );
    assert!(info.contains("db3:keys=1,"), "{info}");
    assert!(!info.contains("db1:"), "{info}");
}

#[test]
fn commands_wait_only_for_earlier_commands_on_their_keys() {
    let get = |bucket: &str, key: &str| {
        Touch::of(&Work::Data {
            command: DataCommand::Get,
            bucket: bucket.into(),
            args: vec![b"GET".to_vec(), key.as_bytes().to_vec()],
        })
    };
    let mset = Touch::of(&Work::Data {
        command: DataCommand::MSet,
        bucket: "default".into(),
        args: ["MSET", "a", "b", "c", "d"]
            .iter()
            .map(|w| w.as_bytes().to_vec())
            .collect(),
    });
    let dbsize = Touch::of(&Work::Data {
        command: DataCommand::DbSize,
        bucket: "default".into(),
        args: vec![b"DBSIZE".to_vec()],
    });
    let ping = Touch::of(&Work::Ready(Ok(Frame::simple("PONG"))));
    assert!(get("default", "a").waits_for(&mset));
    assert!(get("default", "c").waits_for(&mset));
    // "b" is a value of the MSET, not a key; the same key of another bucket is another key.
    assert!(!get("default", "b").waits_for(&mset));
    assert!(!get("db2", "a").waits_for(&mset));
    assert!(dbsize.waits_for(&get("db2", "x")) && get("db2", "x").waits_for(&dbsize));
    assert!(!ping.waits_for(&dbsize) && !dbsize.waits_for(&ping));
}

/// The client end of a connection served by `serve_connection` over an in-memory pipe.
fn connect(state: RespState) -> DuplexStream {
    let (client, server) = tokio::io::duplex(1 << 16);
    let (_stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        let _stop = _stop;
        serve_connection(server, &state, shutdown).await;
    });
    client
}

fn pipeline(commands: &[&[&str]]) -> Vec<u8> {
    let mut out = Vec::new();
    for words in commands {
        let frame = Frame::Array(words.iter().map(|w| Frame::bulk(w.as_bytes())).collect());
        encode(&frame, Version::Resp2, &mut out);
    }
    out
}

async fn replies(client: &mut DuplexStream, n: usize) -> Vec<Frame> {
    let mut buffer = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 4096];
    let limits = Limits::default();
    while frames.len() < n {
        if let Some((frame, used)) = decode(&buffer, &limits).expect("valid reply") {
            buffer.drain(..used);
            frames.push(frame);
            continue;
        }
        let read = client.read(&mut chunk).await.expect("read");
        assert!(
            read > 0,
            "closed after {} replies: {frames:?}",
            frames.len()
        );
        buffer.extend_from_slice(&chunk[..read]);
    }
    frames
}

fn stored(value: &[u8]) -> Object {
    let mut object = Object::empty();
    object.apply_write(
        mendkv_core::version::Actor::new("node1", 1),
        &CausalContext::empty(),
        Value::Data {
            bytes: value.to_vec().into(),
            content_type: "application/octet-stream".into(),
        },
    );
    object
}

/// The next request the stand-in node receives: its key and where to answer it.
async fn next_request(
    requests: &mut mpsc::Receiver<Inbox>,
) -> (String, Vec<u8>, oneshot::Sender<ClientResponse>) {
    match requests.recv().await.expect("a request") {
        Inbox::Client {
            request: ClientRequest::Get { key, .. },
            reply,
        } => ("get".into(), key, reply),
        Inbox::Client {
            request: ClientRequest::Put { key, .. },
            reply,
        } => ("put".into(), key, reply),
        _ => panic!("unexpected request"),
    }
}

/// Ten GETs of one pipeline reach the node before any is answered (they are in flight
/// together); answered in reverse, their replies still leave in command order.
#[tokio::test]
async fn pipelined_commands_are_in_flight_together_and_answered_in_order() {
    let (inbox, mut requests) = mpsc::channel::<Inbox>(64);
    let dir = tempfile::tempdir().unwrap();
    let mut client = connect(state_with(inbox, None, dir.path()));
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let commands: Vec<Vec<&str>> = keys.iter().map(|k| vec!["GET", k.as_str()]).collect();
    let commands: Vec<&[&str]> = commands.iter().map(Vec::as_slice).collect();
    client.write_all(&pipeline(&commands)).await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..10 {
        pending.push(next_request(&mut requests).await);
    }
    for (_, key, reply) in pending.into_iter().rev() {
        let _ = reply.send(ClientResponse::Object(stored(&key)));
    }
    let expected: Vec<Frame> = keys.iter().map(|k| Frame::bulk(k.as_bytes())).collect();
    assert_eq!(replies(&mut client, 10).await, expected);
}

/// A GET of a key whose SET is in flight does not start before the SET is answered (on
/// this single-threaded runtime the connection starts every command it may before the
/// stand-in node runs again, so a GET started too early would already be queued).
#[tokio::test]
async fn a_get_after_a_set_of_its_key_waits_for_the_set() {
    let (inbox, mut requests) = mpsc::channel::<Inbox>(64);
    let dir = tempfile::tempdir().unwrap();
    let mut client = connect(state_with(inbox, None, dir.path()));
    let commands: &[&[&str]] = &[
        &["SET", "a", "1"],
        &["GET", "b"],
        &["SET", "c", "3"],
        &["GET", "a"],
        &["PING"],
    ];
    client.write_all(&pipeline(commands)).await.unwrap();
    let (op, key, set_a) = next_request(&mut requests).await;
    assert_eq!((op.as_str(), key.as_slice()), ("put", &b"a"[..]));
    let (op, key, get_b) = next_request(&mut requests).await;
    assert_eq!((op.as_str(), key.as_slice()), ("get", &b"b"[..]));
    let (op, key, set_c) = next_request(&mut requests).await;
    assert_eq!((op.as_str(), key.as_slice()), ("put", &b"c"[..]));
    tokio::task::yield_now().await;
    assert!(
        requests.try_recv().is_err(),
        "GET a was started while SET a was in flight"
    );
    let _ = set_a.send(ClientResponse::Written {
        context: CausalContext::default(),
    });
    let (op, key, get_a) = next_request(&mut requests).await;
    assert_eq!((op.as_str(), key.as_slice()), ("get", &b"a"[..]));
    let _ = get_a.send(ClientResponse::Object(stored(b"1")));
    let _ = set_c.send(ClientResponse::Written {
        context: CausalContext::default(),
    });
    let _ = get_b.send(ClientResponse::Object(Object::empty()));
    assert_eq!(
        replies(&mut client, 5).await,
        vec![
            Frame::ok(),
            Frame::Null,
            Frame::ok(),
            Frame::bulk("1"),
            Frame::simple("PONG")
        ]
    );
}

/// A connection never runs more than MAX_IN_FLIGHT commands at once; the rest start as
/// the oldest finish.
#[tokio::test]
async fn in_flight_commands_are_bounded() {
    let (inbox, mut requests) = mpsc::channel::<Inbox>(4 * MAX_IN_FLIGHT);
    let dir = tempfile::tempdir().unwrap();
    let mut client = connect(state_with(inbox, None, dir.path()));
    let total = MAX_IN_FLIGHT + 5;
    let keys: Vec<String> = (0..total).map(|i| format!("k{i}")).collect();
    let commands: Vec<Vec<&str>> = keys.iter().map(|k| vec!["GET", k.as_str()]).collect();
    let commands: Vec<&[&str]> = commands.iter().map(Vec::as_slice).collect();
    client.write_all(&pipeline(&commands)).await.unwrap();
    let mut pending = VecDeque::new();
    for _ in 0..MAX_IN_FLIGHT {
        pending.push_back(next_request(&mut requests).await);
    }
    tokio::task::yield_now().await;
    assert!(
        requests.try_recv().is_err(),
        "more than MAX_IN_FLIGHT started"
    );
    let mut answered = 0;
    while answered < total {
        let (_, key, reply) = pending.pop_front().expect("a request in flight");
        let _ = reply.send(ClientResponse::Object(stored(&key)));
        answered += 1;
        if answered + pending.len() < total {
            pending.push_back(next_request(&mut requests).await);
        }
    }
    let expected: Vec<Frame> = keys.iter().map(|k| Frame::bulk(k.as_bytes())).collect();
    assert_eq!(replies(&mut client, total).await, expected);
}

/// A client that sends a pipeline and closes its side at once (`printf ... | nc -N`) still
/// gets every reply, also of commands that had to wait, and then the connection closes.
#[tokio::test]
async fn commands_sent_before_a_half_close_are_all_answered() {
    let (inbox, mut requests) = mpsc::channel::<Inbox>(64);
    let dir = tempfile::tempdir().unwrap();
    let mut client = connect(state_with(inbox, None, dir.path()));
    tokio::spawn(async move {
        while let Some(Inbox::Client { request, reply }) = requests.recv().await {
            let _ = reply.send(match request {
                ClientRequest::Get { key, .. } => ClientResponse::Object(stored(&key)),
                _ => ClientResponse::Written {
                    context: CausalContext::default(),
                },
            });
        }
    });
    let commands: &[&[&str]] = &[&["SET", "a", "1"], &["GET", "a"], &["GET", "a"]];
    client.write_all(&pipeline(commands)).await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(
        replies(&mut client, 3).await,
        vec![Frame::ok(), Frame::bulk("a"), Frame::bulk("a")]
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}
