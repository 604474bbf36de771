//! Commands against a stand-in node task that answers every coordinated request
//! `Unavailable` (so error mapping is checked without a cluster; the black-box tests in
//! crates/mendkv/tests/resp.rs run them against real nodes).

use super::*;

fn state(password: Option<&str>) -> RespState {
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
        node_id: "node1".into(),
        listen: "127.0.0.1:9001".into(),
        started: Instant::now(),
        next_client_id: Default::default(),
    }
}

fn session(state: &RespState) -> Session {
    Session {
        version: Version::Resp2,
        authenticated: state.password.is_none(),
        db: 0,
        bucket: state.bucket.clone(),
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
    let state = state(None);
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
    assert_eq!(s.bucket, "db2");
    assert_eq!(run(&state, &mut s, &["SELECT", "0"]).await, Frame::ok());
    assert_eq!(s.bucket, "default");
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
    let state = state(None);
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
    let state = state(Some("s3cret"));
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
