//! The HTTP layer against hostile and unusual clients, over real processes and raw sockets:
//! HEAD never writes, unlisted methods and the HTTP layer's own errors answer SPEC's JSON,
//! slow clients are closed and the connection cap holds while `/health` keeps answering.

mod common;

use common::{eventually, TestCluster};
use mendkv_client::{metric_sum, ReadResult};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on any single raw exchange, so a node that never answers fails the test instead of
/// hanging it. It is a safety net, not a way to wait for something.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts SPEC's error shape: JSON `{"error": code, "message": text}`.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let json = self.json();
        assert_eq!(json["error"], code, "{json}");
        assert!(
            json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{json}"
        );
    }
}

/// Reads one response from `stream`; `expect_body` is false for answers to HEAD.
async fn read_response(stream: &mut TcpStream, expect_body: bool) -> Option<RawResponse> {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut response = RawResponse {
        status,
        headers,
        body: buffer[head_end..].to_vec(),
    };
    let length: usize = response
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if expect_body {
        while response.body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            response.body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(response)
}

/// Sends `request` as it is on a new connection and reads one response.
async fn exchange(address: &str, request: &[u8], expect_body: bool) -> RawResponse {
    tokio::time::timeout(EXCHANGE_DEADLINE, async {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(request).await.expect("send");
        read_response(&mut stream, expect_body)
            .await
            .expect("a response")
    })
    .await
    .unwrap_or_else(|_| panic!("no answer to {:?}", String::from_utf8_lossy(request)))
}

/// True once the peer has closed `stream` (EOF or reset), reading and dropping anything first.
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

async fn single_node(env: &[(&str, &str)]) -> TestCluster {
    let mut env = env.to_vec();
    env.push(("MENDKV_CLUSTER__REPLICATION_FACTOR", "1"));
    TestCluster::start(1, &env).await
}

/// HEAD answers GET's status and headers without a body, for present and absent keys, and
/// never writes: the value stays readable and the replica holds no tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_like_get_and_never_writes() {
    let cluster = single_node(&[]).await;
    let node = &cluster.nodes[0];
    let client = cluster.client(0);
    client
        .put("t", b"k", b"value".to_vec(), Some("text/plain"), None, None)
        .await
        .expect("put");
    let get = exchange(
        &node.http,
        b"GET /kv/t/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        true,
    )
    .await;
    assert_eq!(get.status, 200, "{get:?}");
    for _ in 0..3 {
        let head = exchange(
            &node.http,
            b"HEAD /kv/t/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(head.status, 200, "{head:?}");
        assert!(head.body.is_empty(), "{head:?}");
        for name in ["content-type", "content-length", "x-mendkv-context"] {
            assert_eq!(head.header(name), get.header(name), "{name}: {head:?}");
        }
    }
    let absent = exchange(
        &node.http,
        b"HEAD /kv/t/absent HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(absent.status, 404, "{absent:?}");
    assert!(absent.body.is_empty(), "{absent:?}");
    match client.get("t", b"k", None).await.expect("get") {
        ReadResult::Value { value, .. } => assert_eq!(value, b"value"),
        other => panic!("HEAD changed the key: {other:?}"),
    }
    let local = client.local("t", b"k").await.expect("local").expect("held");
    let siblings = local["siblings"].as_array().expect("siblings");
    assert_eq!(siblings.len(), 1, "{local}");
    assert_eq!(siblings[0]["tombstone"], false, "{local}");
    assert!(client.local("t", b"absent").await.expect("local").is_none());
}

/// Methods no route lists get 405 JSON with an Allow header, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_methods_get_json_405() {
    let cluster = single_node(&[]).await;
    let node = &cluster.nodes[0];
    let client = cluster.client(0);
    client
        .put("t", b"k", b"value".to_vec(), None, None, None)
        .await
        .expect("put");
    for request in [
        "PATCH /kv/t/k HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "POST /kv/t/k HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "OPTIONS /kv/t/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "DELETE /cluster/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /admin/repair HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let response = exchange(&node.http, request.as_bytes(), true).await;
        response.assert_error(405, "method_not_allowed");
        assert!(
            response.header("allow").is_some(),
            "{request}: {response:?}"
        );
    }
    match client.get("t", b"k", None).await.expect("get") {
        ReadResult::Value { value, .. } => assert_eq!(value, b"value"),
        other => panic!("an unlisted method changed the key: {other:?}"),
    }
}

/// Errors the HTTP layer produces itself (bad request line, oversize head or target, broken
/// bodies, bad percent-escapes) are SPEC's JSON; only a real oversize body gets 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_layer_errors_are_json() {
    let cluster = single_node(&[]).await;
    let address = cluster.nodes[0].http.clone();
    let client = cluster.client(0);

    exchange(&address, b"GARBAGE\r\n\r\n", true)
        .await
        .assert_error(400, "bad_request");
    exchange(&address, b"GET /health HTTP/9.9\r\n\r\n", true)
        .await
        .assert_error(400, "bad_request");
    exchange(
        &address,
        b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
        true,
    )
    .await
    .assert_error(400, "bad_request");
    let huge_header = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(512 * 1024)
    );
    exchange(&address, huge_header.as_bytes(), true)
        .await
        .assert_error(431, "too_large");
    let many_headers = format!(
        "GET /health HTTP/1.1\r\n{}\r\n",
        (0..200)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect::<String>()
    );
    exchange(&address, many_headers.as_bytes(), true)
        .await
        .assert_error(431, "too_large");
    for length in [10_000, 70_000] {
        let long_target = format!(
            "GET /kv/t/{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "k".repeat(length)
        );
        exchange(&address, long_target.as_bytes(), true)
            .await
            .assert_error(414, "too_large");
    }

    for key in ["%zz", "%", "%4", "a%2", "ok%g1"] {
        let request = format!("GET /kv/t/{key} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        exchange(&address, request.as_bytes(), true)
            .await
            .assert_error(400, "bad_request");
        let request = format!(
            "PUT /kv/t/{key} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nv"
        );
        exchange(&address, request.as_bytes(), true)
            .await
            .assert_error(400, "bad_request");
    }
    assert!(client.local("t", b"%zz").await.expect("local").is_none());

    // A body that ends before its Content-Length: the client half-closes and reads the answer.
    let truncated = tokio::time::timeout(EXCHANGE_DEADLINE, async {
        let mut stream = TcpStream::connect(&address).await.expect("connect");
        stream
            .write_all(b"PUT /kv/t/truncated HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .expect("send");
        stream.shutdown().await.expect("half-close");
        read_response(&mut stream, true).await.expect("a response")
    })
    .await
    .expect("an answer to a truncated body");
    truncated.assert_error(400, "bad_request");
    let bad_chunk = exchange(
        &address,
        b"PUT /kv/t/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        true,
    )
    .await;
    bad_chunk.assert_error(400, "bad_request");
    let oversize = format!(
        "PUT /kv/t/big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        (1 << 20) + 1
    );
    exchange(&address, oversize.as_bytes(), true)
        .await
        .assert_error(413, "too_large");
    for key in ["truncated", "chunked", "big"] {
        assert!(
            client
                .local("t", key.as_bytes())
                .await
                .expect("local")
                .is_none(),
            "{key} was stored"
        );
    }

    // A well-formed chunked PUT still works, and so does the next request on its connection.
    let mut stream = TcpStream::connect(&address).await.expect("connect");
    stream
        .write_all(
            b"PUT /kv/t/chunked-ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n\
              BROKEN REQUEST LINE\r\n\r\n",
        )
        .await
        .expect("send");
    // The node answers the PUT, then refuses the broken head and closes: read both.
    let mut answers = Vec::new();
    tokio::time::timeout(EXCHANGE_DEADLINE, stream.read_to_end(&mut answers))
        .await
        .expect("the node closes after the refusal")
        .expect("read");
    let answers = String::from_utf8_lossy(&answers).into_owned();
    let second = answers.find("HTTP/1.1 400").expect("a 400 after the 204");
    assert!(answers.starts_with("HTTP/1.1 204"), "{answers}");
    let (_, body) = answers[second..].split_once("\r\n\r\n").expect("a head");
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(json["error"], "bad_request", "{answers}");
    match client.get("t", b"chunked-ok", None).await.expect("get") {
        ReadResult::Value { value, .. } => assert_eq!(value, b"abcde"),
        other => panic!("chunked PUT: {other:?}"),
    }
}

/// A client that sends its request head slowly is answered 408 JSON and closed once
/// `header_timeout_ms` has passed; a fast client on the same node is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_client_is_closed() {
    let cluster = single_node(&[("MENDKV_HTTP__HEADER_TIMEOUT_MS", "300")]).await;
    let address = cluster.nodes[0].http.clone();
    let mut slow = TcpStream::connect(&address).await.expect("connect");
    slow.write_all(b"GET /hea").await.expect("send");
    let answer = tokio::time::timeout(EXCHANGE_DEADLINE, async {
        let response = read_response(&mut slow, true).await;
        let closed = closed_by_peer(&mut slow).await;
        (response, closed)
    })
    .await
    .expect("the node closes a slow-header client");
    answer.0.expect("a 408 answer").assert_error(408, "timeout");
    assert!(answer.1);
    // A client that connects and sends nothing at all is closed by the same deadline.
    let mut silent = TcpStream::connect(&address).await.expect("connect");
    tokio::time::timeout(EXCHANGE_DEADLINE, closed_by_peer(&mut silent))
        .await
        .expect("the node closes a silent client");
    assert!(cluster.client(0).health().await);
}

/// A request body that stalls is answered 408 JSON once `idle_timeout_ms` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_is_answered_and_closed() {
    let cluster = single_node(&[("MENDKV_HTTP__IDLE_TIMEOUT_MS", "500")]).await;
    let address = cluster.nodes[0].http.clone();
    let mut slow = TcpStream::connect(&address).await.expect("connect");
    slow.write_all(b"PUT /kv/t/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        .await
        .expect("send");
    let answer = tokio::time::timeout(EXCHANGE_DEADLINE, async {
        let response = read_response(&mut slow, true).await;
        let closed = closed_by_peer(&mut slow).await;
        (response, closed)
    })
    .await
    .expect("the node answers a stalled body");
    answer.0.expect("a 408 answer").assert_error(408, "timeout");
    assert!(answer.1);
    assert!(cluster
        .client(0)
        .local("t", b"slow")
        .await
        .expect("local")
        .is_none());
}

/// Sends a keep-alive `GET /health` on a new connection; true when it got 200 (the connection
/// stays open and holds one of the node's slots).
async fn held_connection(address: &str) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let response = tokio::time::timeout(EXCHANGE_DEADLINE, read_response(&mut stream, true))
        .await
        .ok()??;
    (response.status == 200).then_some(stream)
}

/// With `max_connections = 4`, a fifth connection is refused with 503 JSON and closed at once,
/// the gauge counts the open connections, and `/health` answers again as soon as one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused() {
    let cluster = single_node(&[
        ("MENDKV_HTTP__MAX_CONNECTIONS", "4"),
        ("MENDKV_HTTP__IDLE_TIMEOUT_MS", "120000"),
    ])
    .await;
    let address = cluster.nodes[0].http.clone();
    // The harness's own pooled connections close asynchronously: take slots until we hold all
    // four ourselves.
    let mut held = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while held.len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "could not take 4 slots"
        );
        match held_connection(&address).await {
            Some(stream) => held.push(stream),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // Beyond the cap: refused before it sends anything, with SPEC's JSON, then closed.
    let mut refused = TcpStream::connect(&address).await.expect("connect");
    let answer = tokio::time::timeout(EXCHANGE_DEADLINE, async {
        let response = read_response(&mut refused, true).await;
        let closed = closed_by_peer(&mut refused).await;
        (response, closed)
    })
    .await
    .expect("the node refuses promptly");
    answer
        .0
        .expect("a 503 answer")
        .assert_error(503, "unavailable");
    assert!(answer.1);
    assert!(held_connection(&address).await.is_none());
    // The held connections still work.
    for stream in &mut held {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let response = tokio::time::timeout(EXCHANGE_DEADLINE, read_response(stream, true))
            .await
            .expect("answer")
            .expect("response");
        assert_eq!(response.status, 200);
    }
    held.pop();
    let client = cluster.client(0);
    eventually(Duration::from_secs(10), "/health answers again", || {
        let client = client.clone();
        async move { client.health().await }
    })
    .await;
    // The client's pooled connection would count too.
    drop(client);
    held.clear();
    eventually(
        Duration::from_secs(10),
        "mendkv_http_connections falls to the one scraping it",
        || {
            let address = address.clone();
            async move {
                let response = exchange(
                    &address,
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    true,
                )
                .await;
                let text = String::from_utf8_lossy(&response.body).into_owned();
                response.status == 200 && metric_sum(&text, "mendkv_http_connections", &[]) == 1.0
            }
        },
    )
    .await;
}
