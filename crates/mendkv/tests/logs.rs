//! Logs that tools can read (issue 16): no terminal colour codes when stderr is a file,
//! `log.format = "json"` gives one JSON object per line, a bad level is refused, and
//! `mendkv status` colours only on a terminal.

mod common;

use common::{eventually, free_port};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Starts a node with its stderr in `dir/server.log` (RUST_LOG unset, so `[log]` rules) and
/// waits until it serves; returns the process and its HTTP address.
async fn serving_node(
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (std::process::Child, String) {
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(env!("CARGO_BIN_EXE_mendkv"));
    command
        .args(["server", "--node-id", "n1", "--http", &http])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        // A seed that is not there: a warning about the unconfirmed epoch, and dial errors.
        .args(["--seed", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command.spawn().unwrap();
    let client = mendkv_client::Client::new(&format!("http://{http}"));
    eventually(Duration::from_secs(20), "the node serves", || async {
        client.health().await
    })
    .await;
    (child, http)
}

/// Starts a node, waits until it serves, then stops it and returns its log.
async fn log_of_a_node(dir: &std::path::Path, env: &[(&str, &str)]) -> String {
    let (mut child, _) = serving_node(dir, env).await;
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(dir.join("server.log")).unwrap()
}

/// `mendkv status` colours only on a terminal: piped, its table is plain text; with colour
/// forced (CLICOLOR_FORCE, as a terminal would have it) the liveness is coloured and the
/// columns read the same once the codes are stripped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_colours_only_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, http) = serving_node(dir.path(), &[]).await;
    let status = |force_colour: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mendkv"));
        command
            .args(["status", "--node", &format!("http://{http}")])
            .env_remove("NO_COLOR")
            .env_remove("CLICOLOR")
            .env_remove("CLICOLOR_FORCE");
        if force_colour {
            command.env("CLICOLOR_FORCE", "1");
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let piped = status(false);
    let coloured = status(true);
    let _ = child.kill();
    let _ = child.wait();
    assert!(piped.contains("n1") && piped.contains(" up "), "{piped}");
    assert!(
        !piped.contains('\u{1b}'),
        "escape codes in piped output: {piped:?}"
    );
    assert!(
        coloured.contains("\u{1b}[32mup"),
        "liveness in green: {coloured:?}"
    );
    let stripped = console::strip_ansi_codes(&coloured);
    let rows = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("n1") || l.starts_with("NODE"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rows(&stripped),
        rows(&piped),
        "colour must not shift the columns"
    );
}

/// Text logs written to a file carry no escape codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_in_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_a_node(dir.path(), &[]).await;
    assert!(log.contains("node starting"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log: {log:?}");
}

/// `log.format = "json"`: every line is a JSON object with a level and a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_a_node(dir.path(), &[("MENDKV_LOG__FORMAT", "json")]).await;
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(event["level"].is_string(), "{line}");
        assert!(event["fields"].is_object(), "{line}");
        lines += 1;
    }
    assert!(lines >= 2, "{log}");
    assert!(log.contains("node starting"));
    assert!(!log.contains('\u{1b}'));
}

/// Runs `mendkv server` with one bad `[log]` value; it must exit with an error (within a
/// deadline: a node that starts anyway is killed and the test fails) naming the key.
fn refused_start(key: &str, value: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mendkv"))
        .args(["server", "--data-dir"])
        .arg(dir.path())
        .args(["--http", &format!("127.0.0.1:{}", free_port())])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .env_remove("RUST_LOG")
        .env(key, value)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{key}={value:?} was accepted: the node started");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}

/// A level that is not one, or an unknown format, is refused at start with a reason.
#[test]
fn a_bad_log_level_or_format_is_refused() {
    let stderr = refused_start("MENDKV_LOG__LEVEL", "loud");
    assert!(stderr.contains("log.level"), "{stderr}");
    let stderr = refused_start("MENDKV_LOG__FORMAT", "xml");
    assert!(stderr.contains("format"), "{stderr}");
}

/// `mendkv cluster` started from a terminal (a pseudo-terminal made by util-linux's
/// `script`): the node logs it writes to `<data-dir>/<node>/server.log` carry no escape
/// codes, as the nodes' stderr is that file, not the terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mendkv_cluster_writes_node_logs_without_colour_codes() {
    let script = std::path::Path::new("/usr/bin/script");
    if !script.exists() {
        eprintln!("SKIPPED mendkv cluster log test: no /usr/bin/script (util-linux) for a pty");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The HTTP port; peers listen 1000 below it and RESP 1000 above it.
    let base_port = free_port();
    let command_line = format!(
        "RUST_LOG= exec {} cluster --nodes 1 --data-dir {} --base-port {base_port}",
        env!("CARGO_BIN_EXE_mendkv"),
        data.display()
    );
    // `script` gives the cluster a terminal as stdin/stdout/stderr; when `script` is killed
    // the terminal hangs up, which ends the cluster and its node.
    let mut child = Command::new(script)
        .args(["-qfec", &command_line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = mendkv_client::Client::new(&format!("http://127.0.0.1:{base_port}"));
    eventually(
        Duration::from_secs(30),
        "the cluster's node serves",
        || async { client.health().await },
    )
    .await;
    let log_path = data.join("node1").join("server.log");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("node starting"), "{log_path:?}: {log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log: {log:?}");
}
