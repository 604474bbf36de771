//! The Redis protocol (SPEC section 9) against a real 3-node cluster, through a raw RESP
//! client written here (no external tools needed).

mod common;

use common::{free_port, TestCluster};
use mendkv_client::ReadResult;
use mendkv_server::resp::codec::{decode, encode, Frame, Limits, Version};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every reply arrives within this long, or the test fails.
const REPLY_DEADLINE: Duration = Duration::from_secs(15);

struct Redis {
    stream: TcpStream,
    buffer: Vec<u8>,
}

fn command(words: &[&[u8]]) -> Vec<u8> {
    let frame = Frame::Array(words.iter().map(|w| Frame::Bulk(w.to_vec())).collect());
    let mut out = Vec::new();
    encode(&frame, Version::Resp2, &mut out);
    out
}

impl Redis {
    async fn connect(address: &str) -> Redis {
        let stream = TcpStream::connect(address).await.expect("connect to resp");
        Redis {
            stream,
            buffer: Vec::new(),
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next reply, or None when the server closed the connection.
    async fn reply(&mut self) -> Option<Frame> {
        let limits = Limits {
            max_bulk: 64 << 20,
            ..Limits::default()
        };
        let read = async {
            loop {
                if let Some((frame, used)) = decode(&self.buffer, &limits).expect("valid reply") {
                    self.buffer.drain(..used);
                    return Some(frame);
                }
                let mut chunk = [0u8; 16384];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(REPLY_DEADLINE, read)
            .await
            .expect("a reply in time")
    }

    async fn cmd(&mut self, words: &[&str]) -> Frame {
        let words: Vec<&[u8]> = words.iter().map(|w| w.as_bytes()).collect();
        self.send_raw(&command(&words)).await;
        self.reply()
            .await
            .expect("a reply, not a closed connection")
    }
}

fn bulk(text: &str) -> Frame {
    Frame::Bulk(text.as_bytes().to_vec())
}

fn ok() -> Frame {
    Frame::Simple(b"OK".to_vec())
}

/// A 3-node cluster with RESP on every node; returns it and the RESP addresses.
async fn cluster(env: &[(&str, &str)]) -> (TestCluster, Vec<String>) {
    let mut addresses = Vec::new();
    let cluster = TestCluster::start_with(3, env, |node| {
        let address = format!("127.0.0.1:{}", free_port());
        node.env
            .push(("MENDKV_RESP__LISTEN".into(), address.clone()));
        addresses.push(address);
    })
    .await;
    (cluster, addresses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_commands_work_across_nodes() {
    let (cluster, resp) = cluster(&[]).await;
    let mut one = Redis::connect(&resp[0]).await;
    let mut three = Redis::connect(&resp[2]).await;

    // Written through node 1 at quorum, read through node 3 at quorum.
    assert_eq!(one.cmd(&["SET", "user:1", "alice"]).await, ok());
    assert_eq!(three.cmd(&["GET", "user:1"]).await, bulk("alice"));
    assert_eq!(three.cmd(&["GET", "missing"]).await, Frame::Null);

    // The RESP bucket is lww unless its properties say otherwise: blind SETs supersede.
    let props = cluster
        .client(0)
        .bucket_props("default")
        .await
        .expect("props");
    assert_eq!(props["resolution"], "lww", "{props}");
    assert_eq!(three.cmd(&["SET", "user:1", "bob"]).await, ok());
    assert_eq!(one.cmd(&["GET", "user:1"]).await, bulk("bob"));

    // Pipelining: many commands in one write, answered in order.
    let mut batch = Vec::new();
    for i in 0..50 {
        let (key, value) = (format!("p{i}"), format!("v{i}"));
        batch.extend(command(&[b"SET", key.as_bytes(), value.as_bytes()]));
        batch.extend(command(&[b"GET", key.as_bytes()]));
    }
    one.send_raw(&batch).await;
    for i in 0..50 {
        assert_eq!(one.reply().await, Some(ok()), "SET p{i}");
        assert_eq!(one.reply().await, Some(bulk(&format!("v{i}"))), "GET p{i}");
    }

    // NX, XX, GET.
    assert_eq!(one.cmd(&["SET", "n", "1", "NX"]).await, ok());
    assert_eq!(one.cmd(&["SET", "n", "2", "NX"]).await, Frame::Null);
    assert_eq!(one.cmd(&["GET", "n"]).await, bulk("1"));
    assert_eq!(one.cmd(&["SET", "x", "1", "XX"]).await, Frame::Null);
    assert_eq!(one.cmd(&["GET", "x"]).await, Frame::Null);
    assert_eq!(one.cmd(&["SET", "n", "3", "XX"]).await, ok());
    assert_eq!(one.cmd(&["SET", "n", "4", "GET"]).await, bulk("3"));
    assert_eq!(one.cmd(&["SET", "fresh", "4", "GET"]).await, Frame::Null);

    // MSET, MGET, EXISTS, DEL, GETDEL.
    assert_eq!(one.cmd(&["MSET", "a", "1", "b", "2"]).await, ok());
    assert_eq!(
        three.cmd(&["MGET", "a", "b", "c"]).await,
        Frame::Array(vec![bulk("1"), bulk("2"), Frame::Null])
    );
    assert_eq!(
        three.cmd(&["EXISTS", "a", "b", "c", "a"]).await,
        Frame::Integer(3)
    );
    assert_eq!(three.cmd(&["DEL", "a", "c"]).await, Frame::Integer(1));
    assert_eq!(one.cmd(&["EXISTS", "a"]).await, Frame::Integer(0));
    assert_eq!(one.cmd(&["GETDEL", "b"]).await, bulk("2"));
    assert_eq!(one.cmd(&["GETDEL", "b"]).await, Frame::Null);
    assert_eq!(three.cmd(&["GET", "b"]).await, Frame::Null);

    // SELECT 2 is bucket db2, visible over HTTP.
    assert_eq!(one.cmd(&["SELECT", "2"]).await, ok());
    assert_eq!(one.cmd(&["SET", "key", "in-db2"]).await, ok());
    match cluster.client(1).get("db2", b"key", Some("quorum")).await {
        Ok(ReadResult::Value { value, .. }) => assert_eq!(value, b"in-db2"),
        other => panic!("db2/key over HTTP: {other:?}"),
    }
    assert_eq!(
        three.cmd(&["GET", "key"]).await,
        Frame::Null,
        "db0 has no such key"
    );

    // Protocol niceties.
    assert_eq!(one.cmd(&["PING"]).await, Frame::Simple(b"PONG".to_vec()));
    assert!(matches!(one.cmd(&["HELLO", "3"]).await, Frame::Map(_)));
    assert_eq!(one.cmd(&["GET", "nothing"]).await, Frame::Null);
    assert!(matches!(one.cmd(&["INFO"]).await, Frame::Bulk(_)));
    match one.cmd(&["NOPE"]).await {
        Frame::Error(e) => assert!(e.starts_with(b"ERR unknown command 'NOPE'")),
        other => panic!("{other:?}"),
    }
    assert_eq!(one.cmd(&["QUIT"]).await, ok());
    assert_eq!(one.reply().await, None, "QUIT closes the connection");

    // The counter of commands is exported.
    let metrics = cluster.client(0).metrics().await.expect("metrics");
    assert!(
        metrics.contains("mendkv_resp_commands_total{command=\"set\",outcome=\"ok\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_is_required_when_set() {
    let (_cluster, resp) = cluster(&[("MENDKV_RESP__PASSWORD", "s3cret")]).await;
    let mut client = Redis::connect(&resp[0]).await;
    match client.cmd(&["SET", "k", "v"]).await {
        Frame::Error(e) => assert!(e.starts_with(b"NOAUTH"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    match client.cmd(&["AUTH", "wrong"]).await {
        Frame::Error(e) => assert!(e.starts_with(b"WRONGPASS"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.cmd(&["AUTH", "s3cret"]).await, ok());
    assert_eq!(client.cmd(&["SET", "k", "v"]).await, ok());
    assert_eq!(client.cmd(&["GET", "k"]).await, bulk("v"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_closes_only_its_own_connection() {
    let (_cluster, resp) = cluster(&[]).await;
    let mut healthy = Redis::connect(&resp[0]).await;
    assert_eq!(healthy.cmd(&["SET", "k", "v"]).await, ok());

    let hostile: [&[u8]; 4] = [
        b"*2\r\n$3\r\nGET\r\n:x\r\n", // not a bulk string, bad integer
        b"*1\r\n$99999999999\r\n",    // bulk longer than max_value_bytes
        b"*9999999999\r\n",           // array longer than the bound
        b"$3\r\nabcXY",               // bulk not ended by CRLF
    ];
    for bytes in hostile {
        let mut bad = Redis::connect(&resp[0]).await;
        bad.send_raw(bytes).await;
        match bad.reply().await {
            Some(Frame::Error(e)) => assert!(e.starts_with(b"ERR Protocol error"), "{e:?}"),
            other => panic!("{bytes:?}: {other:?}"),
        }
        assert_eq!(bad.reply().await, None, "closed after a protocol error");
    }
    // Garbage without a line end, and an unterminated array left open: the node keeps
    // serving others meanwhile.
    let mut garbage = Redis::connect(&resp[0]).await;
    garbage.send_raw(&[0xff; 70 * 1024]).await;
    assert!(matches!(
        garbage.reply().await,
        Some(Frame::Error(_)) | None
    ));
    let mut open = Redis::connect(&resp[0]).await;
    open.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n").await;
    assert_eq!(healthy.cmd(&["GET", "k"]).await, bulk("v"));
    let mut fresh = Redis::connect(&resp[0]).await;
    assert_eq!(fresh.cmd(&["PING"]).await, Frame::Simple(b"PONG".to_vec()));
    drop(open);
}
