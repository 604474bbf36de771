//! The Redis protocol through the real tools against a 3-node cluster: Debian's
//! `redis-tools` (redis-cli, redis-benchmark) and `python3-redis` (redis-py).
//!
//! Without a tool the test says why and passes, unless `MENDKV_REQUIRE_REDIS_TOOLS` is set
//! (as in CI, where .ci/run installs them), when it fails. Every tool run has a deadline
//! after which it is killed and the test fails (a hang is a failure, not a wait).

mod common;

use common::{free_port, TestCluster};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// One tool run may take this long before it is killed and the test fails.
const TOOL_DEADLINE: Duration = Duration::from_secs(120);

/// The path of a Debian tool, or why there is none.
fn tool(name: &str, package: &str) -> Result<PathBuf, String> {
    let path = Path::new("/usr/bin").join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("no {} (apt-get install {package})", path.display()))
    }
}

/// Debian's python3 when it can import redis-py.
async fn python_with_redis() -> Result<PathBuf, String> {
    let python = tool("python3", "python3")?;
    let imported = Command::new(&python)
        .args(["-c", "import redis"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if imported.success() {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot import redis (apt-get install python3-redis)",
            python.display()
        ))
    }
}

/// The tool, or `None` after saying loudly why the test is skipped (a panic when
/// `MENDKV_REQUIRE_REDIS_TOOLS` is set).
fn required(found: Result<PathBuf, String>, test: &str) -> Option<PathBuf> {
    match found {
        Ok(path) => Some(path),
        Err(reason) => {
            if std::env::var_os("MENDKV_REQUIRE_REDIS_TOOLS").is_some() {
                panic!("MENDKV_REQUIRE_REDIS_TOOLS is set but there is {reason}");
            }
            eprintln!("SKIPPED {test}: {reason}");
            None
        }
    }
}

/// Runs a tool to its end; its stdout and stderr, or a failure naming what it printed.
async fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> (String, String) {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start the tool");
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    let output = tokio::time::timeout(TOOL_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not finish in time", program.display()))
        .expect("tool output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n{stdout}\n{stderr}",
        program.display(),
        output.status
    );
    (stdout, stderr)
}

/// How long a node gives a request here: debug builds of 9 nodes, redis-benchmark's 800
/// pipelined commands and the other tests share two cores, and these tests check answers,
/// not latency (the default 2 s made a -P 16 run end at a TIMEOUT reply on a loaded machine).
const REQUEST_TIMEOUT_MS: &str = "30000";

/// A 3-node cluster with RESP on every node; returns it and the RESP ports.
async fn cluster() -> (TestCluster, Vec<String>) {
    let mut ports = Vec::new();
    let env = [("MENDKV_CONSISTENCY__REQUEST_TIMEOUT_MS", REQUEST_TIMEOUT_MS)];
    let cluster = TestCluster::start_with(3, &env, |node| {
        let port = free_port().to_string();
        node.env
            .push(("MENDKV_RESP__LISTEN".into(), format!("127.0.0.1:{port}")));
        ports.push(port);
    })
    .await;
    (cluster, ports)
}

async fn cli(redis_cli: &Path, port: &str, words: &[&str]) -> String {
    let mut args = vec!["-h", "127.0.0.1", "-p", port];
    args.extend_from_slice(words);
    run(redis_cli, &args, None).await.0.trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_round_trips_through_different_nodes() {
    let Some(redis_cli) = required(tool("redis-cli", "redis-tools"), "redis-cli test") else {
        return;
    };
    let (_cluster, ports) = cluster().await;
    assert_eq!(cli(&redis_cli, &ports[0], &["PING"]).await, "PONG");
    assert_eq!(
        cli(&redis_cli, &ports[0], &["SET", "user:1", "alice"]).await,
        "OK"
    );
    assert_eq!(
        cli(&redis_cli, &ports[2], &["GET", "user:1"]).await,
        "alice"
    );
    assert_eq!(
        cli(&redis_cli, &ports[1], &["MSET", "a", "1", "b", "2"]).await,
        "OK"
    );
    assert_eq!(
        cli(&redis_cli, &ports[2], &["MGET", "a", "b", "missing"]).await,
        "1\n2"
    );
    assert_eq!(cli(&redis_cli, &ports[0], &["DEL", "a"]).await, "1");
    assert_eq!(cli(&redis_cli, &ports[1], &["EXISTS", "a", "b"]).await, "1");
    // RF 3 on 3 nodes: every node stores every key, so each one's DBSIZE is the total.
    assert_eq!(cli(&redis_cli, &ports[2], &["DBSIZE"]).await, "2");
    assert_eq!(
        cli(&redis_cli, &ports[0], &["CONFIG", "GET", "maxclients"]).await,
        "maxclients\n4096"
    );
    // redis-cli --pipe: many commands in one stream, every reply counted.
    let mut commands = String::new();
    for i in 0..500 {
        commands.push_str(&format!("SET pipe:{i} value-{i}\r\n"));
    }
    let (piped, _) = run(
        &redis_cli,
        &["-h", "127.0.0.1", "-p", &ports[1], "--pipe"],
        Some(&commands),
    )
    .await;
    assert!(
        piped.contains("errors: 0, replies: 500"),
        "redis-cli --pipe: {piped}"
    );
    assert_eq!(
        cli(&redis_cli, &ports[0], &["GET", "pipe:499"]).await,
        "value-499"
    );
}

/// The SET and GET lines of redis-benchmark's --csv output, each with its ops/s.
fn benchmark_rates(csv: &str) -> Vec<(String, f64)> {
    csv.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
            let rate = fields.get(1)?.parse().ok()?;
            Some((fields[0].to_string(), rate))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_completes_without_errors_with_and_without_pipelining() {
    let Some(benchmark) = required(
        tool("redis-benchmark", "redis-tools"),
        "redis-benchmark test",
    ) else {
        return;
    };
    let (_cluster, ports) = cluster().await;
    for pipeline in ["1", "16"] {
        // redis-benchmark 7 exits non-zero at the first error reply, which `run` fails on.
        let (stdout, stderr) = run(
            &benchmark,
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &ports[0],
                "-t",
                "set,get",
                "-n",
                "2000",
                "-d",
                "100",
                "-r",
                "100000",
                "-c",
                "50",
                "-P",
                pipeline,
                "--csv",
            ],
            None,
        )
        .await;
        let all = format!("{stdout}{stderr}");
        assert!(
            !all.to_ascii_lowercase().contains("error"),
            "-P {pipeline}: {all}"
        );
        let rates = benchmark_rates(&stdout);
        let tests: Vec<&str> = rates.iter().map(|(test, _)| test.as_str()).collect();
        assert_eq!(tests, ["SET", "GET"], "-P {pipeline}: {stdout}");
        assert!(
            rates.iter().all(|(_, rate)| *rate > 0.0),
            "-P {pipeline}: {stdout}"
        );
    }
}

/// redis-py against three nodes: SET/GET/MGET through different nodes, a pipeline (no
/// MULTI: mendkv has no transactions), DBSIZE, INFO keyspace and CONFIG GET as it parses
/// them, and an error reply as its exception.
const REDIS_PY_SCRIPT: &str = r#"
import sys
import redis

ports = [int(p) for p in sys.argv[1:]]
nodes = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=30) for p in ports]
assert nodes[0].set("py:1", "one")
assert nodes[2].get("py:1") == b"one", nodes[2].get("py:1")
assert nodes[1].mset({"py:a": "A", "py:b": "B"})
assert nodes[2].mget(["py:a", "py:b", "py:none"]) == [b"A", b"B", None]
pipe = nodes[1].pipeline(transaction=False)
for i in range(100):
    pipe.set(f"py:p{i}", f"v{i}")
    pipe.get(f"py:p{i}")
replies = pipe.execute()
assert replies == [r for i in range(100) for r in (True, f"v{i}".encode())], replies[:6]
assert nodes[0].get("py:p99") == b"v99"
assert nodes[0].dbsize() == 103, nodes[0].dbsize()
assert nodes[2].info("keyspace")["db0"]["keys"] == 103, nodes[2].info("keyspace")
assert nodes[0].config_get("maxclients") == {"maxclients": "4096"}
assert nodes[0].delete("py:a", "py:none") == 1
try:
    nodes[0].execute_command("NOSUCHCOMMAND")
    raise SystemExit("an unknown command was accepted")
except redis.exceptions.ResponseError as error:
    assert "unknown command" in str(error), error
print("redis-py ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_set_get_mget_and_pipeline_against_three_nodes() {
    let Some(python) = required(python_with_redis().await, "redis-py test") else {
        return;
    };
    let (_cluster, ports) = cluster().await;
    let mut args = vec!["-c", REDIS_PY_SCRIPT];
    args.extend(ports.iter().map(String::as_str));
    let (stdout, _) = run(&python, &args, None).await;
    assert!(stdout.contains("redis-py ok"), "{stdout}");
}
