//! `[tls]`, black-box: a 3-node cluster with `peer` and `client` TLS on (certificates made by
//! rcgen here). A write over https through one node is read through another (so the nodes
//! talk over mutual TLS); a plain-text client on the TLS port gets no HTTP; a node whose
//! certificate comes from another CA is refused in the TLS handshake and never listed up.
//! The Redis protocol listener serves TLS too: a TLS RESP client works, plain text does not.

mod common;

use common::{eventually, free_port, TestNode};
use mendkv_client::{metric_sum, Client, ReadResult};
use mendkv_server::resp::codec::{decode, encode, Frame, Limits, Version};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn new_ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// Writes a node certificate (SAN 127.0.0.1 and localhost) signed by `ca`; returns the
/// certificate and key paths.
fn node_cert(ca: &Ca, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let cert_file = dir.join(format!("{name}.crt"));
    let key_file = dir.join(format!("{name}.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (cert_file, key_file)
}

fn tls_node(
    dir: &Path,
    id: &str,
    seeds: Vec<String>,
    (cert, key): (PathBuf, PathBuf),
    ca_file: &Path,
) -> TestNode {
    let data_dir = dir.join(id);
    std::fs::create_dir_all(&data_dir).unwrap();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    TestNode {
        id: id.to_string(),
        http: format!("127.0.0.1:{}", free_port()),
        peer: format!("127.0.0.1:{}", free_port()),
        data_dir,
        seeds,
        env: vec![
            ("MENDKV_TLS__CERT_FILE".into(), path(&cert)),
            ("MENDKV_TLS__KEY_FILE".into(), path(&key)),
            ("MENDKV_TLS__CA_FILE".into(), path(ca_file)),
            ("MENDKV_TLS__PEER".into(), "true".into()),
            ("MENDKV_TLS__CLIENT".into(), "true".into()),
        ],
        child: None,
    }
}

fn https(node: &TestNode, ca_pem: &[u8]) -> Client {
    Client::with_ca(&format!("https://{}", node.http), ca_pem).expect("TLS client")
}

/// The ids `client`'s node lists as up, or nothing if it does not answer.
async fn up_ids(client: &Client) -> Vec<String> {
    let Ok(status) = client.status().await else {
        return Vec::new();
    };
    status["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|n| n["status"] == "up")
        .filter_map(|n| n["id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_serves_https_and_refuses_plain_text_and_foreign_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mendkv test CA");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let ca_pem = ca.cert.pem().into_bytes();

    let mut nodes: Vec<TestNode> = Vec::new();
    let mut resp_addresses = Vec::new();
    for i in 1..=3 {
        let id = format!("node{i}");
        let seeds = nodes
            .first()
            .map(|n| vec![n.peer.clone()])
            .unwrap_or_default();
        let cert = node_cert(&ca, dir.path(), &id);
        let mut node = tls_node(dir.path(), &id, seeds, cert, &ca_file);
        let resp = format!("127.0.0.1:{}", free_port());
        node.env.push(("MENDKV_RESP__LISTEN".into(), resp.clone()));
        resp_addresses.push(resp);
        nodes.push(node);
    }
    for node in &mut nodes {
        node.start();
    }
    let clients: Vec<Client> = nodes.iter().map(|n| https(n, &ca_pem)).collect();
    eventually(
        Duration::from_secs(30),
        "every node lists every node up over https",
        || {
            let clients = clients.clone();
            async move {
                for client in &clients {
                    if up_ids(client).await.len() != 3 {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;

    // A write through node1 is read through node2: replicas are reached over mutual TLS.
    clients[0]
        .put("t", b"k", b"over-tls".to_vec(), None, Some("all"), None)
        .await
        .expect("https PUT at w=all");
    match clients[1]
        .get("t", b"k", Some("quorum"))
        .await
        .expect("https GET")
    {
        ReadResult::Value { value, .. } => assert_eq!(value, b"over-tls"),
        other => panic!("unexpected read: {other:?}"),
    }

    // The CLI over https with --cacert: put through node3, get through node1.
    let https_url = |node: &TestNode| format!("https://{}", node.http);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mendkv"))
            .args(args)
            .output()
            .expect("run mendkv")
    };
    let ca_arg = ca_file.to_string_lossy().into_owned();
    let put = cli(&[
        "put",
        "t",
        "cli",
        "from-cli",
        "--w",
        "all",
        "--node",
        &https_url(&nodes[2]),
        "--cacert",
        &ca_arg,
    ]);
    assert!(put.status.success(), "{put:?}");
    let get = cli(&[
        "get",
        "t",
        "cli",
        "--r",
        "quorum",
        "--node",
        &https_url(&nodes[0]),
        "--cacert",
        &ca_arg,
    ]);
    assert!(get.status.success(), "{get:?}");
    assert_eq!(get.stdout, b"from-cli");
    // Without the CA, the node's certificate is not trusted.
    let untrusted = cli(&["status", "--node", &https_url(&nodes[0])]);
    assert!(!untrusted.status.success(), "{untrusted:?}");

    // Plain text to the TLS port: no HTTP answer, the connection is closed.
    let plain = Client::new(&format!("http://{}", nodes[0].http));
    assert!(plain.status().await.is_err(), "plain HTTP got an answer");
    let mut stream = tokio::net::TcpStream::connect(&nodes[0].http)
        .await
        .unwrap();
    stream
        .write_all(b"GET /cluster/status HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the TLS port closes a plain-text connection");
    assert!(
        read.is_err() || !answer.starts_with(b"HTTP/"),
        "plain text got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // RESP over TLS: SET through node1, GET through node3; plain text gets no RESP answer.
    let mut resp_one = resp_over_tls(&resp_addresses[0], &ca_pem).await;
    assert_eq!(
        resp_command(&mut resp_one, &["SET", "r", "over-tls"]).await,
        Frame::Simple(b"OK".to_vec())
    );
    let mut resp_three = resp_over_tls(&resp_addresses[2], &ca_pem).await;
    assert_eq!(
        resp_command(&mut resp_three, &["GET", "r"]).await,
        Frame::Bulk(b"over-tls".to_vec())
    );
    let mut plain = tokio::net::TcpStream::connect(&resp_addresses[0])
        .await
        .unwrap();
    let _ = plain.write_all(b"*1\r\n$4\r\nPING\r\n").await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer))
        .await
        .expect("the RESP TLS port closes a plain-text connection");
    assert!(
        read.is_err() || !answer.starts_with(b"+PONG"),
        "plain text got a RESP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // A node with a certificate from another CA (it trusts ours, so it is our acceptor that
    // must refuse it) cannot join.
    let rogue_ca = new_ca("another CA");
    let rogue_cert = node_cert(&rogue_ca, dir.path(), "rogue");
    let mut rogue = tls_node(
        dir.path(),
        "rogue",
        vec![nodes[0].peer.clone()],
        rogue_cert,
        &ca_file,
    );
    rogue.start();
    let seed = clients[0].clone();
    eventually(
        Duration::from_secs(30),
        "the seed refuses the rogue node in the TLS handshake",
        || {
            let seed = seed.clone();
            async move {
                let text = seed.metrics().await.unwrap_or_default();
                metric_sum(
                    &text,
                    "mendkv_peer_handshakes_refused_total",
                    &[("reason", "tls")],
                ) >= 1.0
            }
        },
    )
    .await;
    for client in &clients {
        let up = up_ids(client).await;
        assert_eq!(up.len(), 3, "{up:?}");
        assert!(!up.contains(&"rogue".to_string()), "{up:?}");
    }
    let rogue_client = https(&rogue, &rogue_ca.cert.pem().into_bytes());
    eventually(Duration::from_secs(30), "the rogue node answers", || {
        let rogue_client = rogue_client.clone();
        async move { rogue_client.status().await.is_ok() }
    })
    .await;
    let rogue_sees = up_ids(&rogue_client).await;
    assert!(
        !rogue_sees.iter().any(|id| id.starts_with("node")),
        "the rogue node joined: {rogue_sees:?}"
    );
}

/// A RESP connection over TLS that trusts `ca_pem` and checks the node's IP address.
async fn resp_over_tls(
    address: &str,
    ca_pem: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(ca.expect("CA PEM")).expect("CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let socket: std::net::SocketAddr = address.parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(socket)
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::IpAddress(socket.ip().into());
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake with the RESP listener")
}

/// Sends one command and reads its reply.
async fn resp_command<S>(stream: &mut S, words: &[&str]) -> Frame
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = Frame::Array(
        words
            .iter()
            .map(|w| Frame::Bulk(w.as_bytes().to_vec()))
            .collect(),
    );
    let mut out = Vec::new();
    encode(&frame, Version::Resp2, &mut out);
    stream.write_all(&out).await.expect("send");
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((reply, _)) = decode(&buffer, &Limits::default()).expect("a valid reply") {
            return reply;
        }
        let n = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut chunk))
            .await
            .expect("a reply in time")
            .expect("read");
        assert!(n > 0, "closed before a reply");
        buffer.extend_from_slice(&chunk[..n]);
    }
}
