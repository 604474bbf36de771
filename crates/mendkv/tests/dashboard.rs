//! The dashboard in a real browser: headless Chromium renders `GET /dashboard` of a 3-node
//! cluster with a finished repair run and hints pending for a killed node.
//!
//! Chromium is Debian's `chromium` at `/usr/bin/chromium` (or `MENDKV_CHROMIUM`). Without it
//! the test says why and passes, unless `MENDKV_REQUIRE_CHROMIUM` is set (as in CI), when it
//! fails. `MENDKV_DASHBOARD_SCREENSHOT=PATH` also copies the screenshot there (that is how
//! docs/dashboard.png is made).

mod common;

use common::{eventually, write_keys, TestCluster};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Keys written while node3 is down: each one leaves one hint for it on the coordinator.
const HINTED_KEYS: u64 = 40;

/// How long one Chromium run may take before it is killed.
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(90);

/// Chromium's path, or why there is none.
fn chromium() -> Result<PathBuf, String> {
    let path = std::env::var_os("MENDKV_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "no Chromium at {} (apt-get install chromium, or set MENDKV_CHROMIUM)",
            path.display()
        ))
    }
}

/// Runs headless Chromium on `url` with `extra` flags; its stdout. Every run gets a fresh
/// profile, and no flag lets it reach the internet (the machine's network is closed).
async fn run_chromium(chromium: &Path, profile: &Path, extra: &[String], url: &str) -> String {
    let mut command = Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command.spawn().expect("start chromium");
    let mut stdout = child.stdout.take().expect("piped stdout");
    // Read on a thread so a large DOM never blocks Chromium on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + CHROMIUM_DEADLINE;
    loop {
        match child.try_wait().expect("wait for chromium") {
            Some(status) => {
                assert!(status.success(), "chromium failed: {status}");
                break;
            }
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish within {CHROMIUM_DEADLINE:?}");
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    reader.join().expect("stdout reader")
}

/// A plain HTTP/1.1 GET: status line plus headers, and the body.
fn http_get(address: &str, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.to_ascii_lowercase(), body.to_string())
}

/// Node ids, the pending-hint count for a killed node and a finished repair run appear in
/// the DOM the browser renders from `GET /dashboard`; a screenshot of it is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_ring_hints_and_repair_in_a_browser() {
    let chromium = match chromium() {
        Ok(path) => path,
        Err(reason) => {
            if std::env::var_os("MENDKV_REQUIRE_CHROMIUM").is_some() {
                panic!("MENDKV_REQUIRE_CHROMIUM is set but there is {reason}");
            }
            eprintln!("SKIPPED dashboard browser test: {reason}");
            return;
        }
    };
    let mut cluster = TestCluster::start(3, &[]).await;
    let coordinator = cluster.client(0);

    // A repair run over data every replica holds, to its end.
    let keys: Vec<String> = (0..100).map(|i| format!("d{i}")).collect();
    write_keys(&coordinator, &keys, b"v").await;
    let run = coordinator.start_repair().await.expect("start repair");
    eventually(Duration::from_secs(60), "the repair run is done", || {
        let coordinator = coordinator.clone();
        async move {
            let status = coordinator.repair_status(run).await.unwrap_or_default();
            assert_ne!(status["state"], "failed", "the run failed: {status}");
            status["state"] == "done"
        }
    })
    .await;

    // node3 dies; every key (RF 3 of 3 nodes) leaves a hint for it on the coordinator.
    cluster.nodes[2].kill();
    let hinted: Vec<String> = (0..HINTED_KEYS).map(|i| format!("h{i}")).collect();
    write_keys(&coordinator, &hinted, b"v").await;
    eventually(
        Duration::from_secs(30),
        "node1 holds the hints for node3",
        || {
            let coordinator = coordinator.clone();
            async move {
                let Ok(status) = coordinator.status().await else {
                    return false;
                };
                status["nodes"].as_array().is_some_and(|nodes| {
                    nodes.iter().any(|n| {
                        n["id"] == "node3" && n["hints_pending"].as_u64() == Some(HINTED_KEYS)
                    })
                })
            }
        },
    )
    .await;

    let address = cluster.nodes[0].http.clone();
    let (head, _) = http_get(&address, "/dashboard");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    let (head, body) = http_get(&address, "/admin/dashboard.json");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let state: serde_json::Value = serde_json::from_str(&body).expect("dashboard JSON");
    assert_eq!(state["hints"]["pending_total"].as_u64(), Some(HINTED_KEYS));

    let url = format!("http://{address}/dashboard");
    let scratch = tempfile::tempdir().expect("temp dir");
    // Virtual time runs the page's timers (its first refreshes) without waiting for them;
    // fetches still complete for real. A render that missed data is retried, within a deadline.
    let expected_hints = format!(r#"id="hints-pending-node3">{HINTED_KEYS}<"#);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut attempt = 0;
    let dom = loop {
        attempt += 1;
        let dom = run_chromium(
            &chromium,
            &scratch.path().join(format!("profile-dom-{attempt}")),
            &["--virtual-time-budget=5000".into(), "--dump-dom".into()],
            &url,
        )
        .await;
        let complete = ["node1", "node2", "node3"]
            .iter()
            .all(|id| dom.contains(&format!(r#"data-node-id="{id}""#)))
            && dom.contains(&expected_hints)
            && dom.contains(&format!(r#"data-run-id="{run}" data-run-state="done""#));
        if complete {
            break dom;
        }
        assert!(
            Instant::now() < deadline,
            "the rendered dashboard lacks node ids, node3's {HINTED_KEYS} hints or run {run} \
             done after {attempt} renders:\n{dom}"
        );
    };
    assert!(dom.contains("Repair debt per replica pair"), "{dom}");
    assert!(
        dom.contains(r#"<div id="error" style="display: none;"></div>"#),
        "the page reports an error:\n{dom}"
    );

    let screenshot = scratch.path().join("dashboard.png");
    run_chromium(
        &chromium,
        &scratch.path().join("profile-screenshot"),
        &[
            "--virtual-time-budget=12000".into(),
            "--window-size=1280,1600".into(),
            format!("--screenshot={}", screenshot.display()),
        ],
        &url,
    )
    .await;
    let png = std::fs::read(&screenshot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    if let Some(keep) = std::env::var_os("MENDKV_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&screenshot, &keep).expect("copy the screenshot");
    }
}
