//! `mendkv`: the one binary (SPEC section 2).
//!
//! # Layout
//! - `main.rs`: the command line and the client commands (get, put, delete, status).
//! - [`cluster`]: `mendkv cluster`, a local N-node cluster of child processes.
//! - [`repair`]: `mendkv repair`, a progress bar over a node's anti-entropy run.
//! - [`bench`]: `mendkv bench`, a YCSB-style load generator with HDR latency histograms.

mod bench;
mod cluster;
mod membership;
mod repair;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mendkv_client::{Client, ReadResult};
use mendkv_server::config::{set_value, ServerConfig};
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "mendkv",
    version,
    about = "A leaderless, eventually consistent, self-repairing key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node.
    Server(ServerArgs),
    /// Run a local N-node cluster (child processes, data under --data-dir); Ctrl-C stops it.
    Cluster(cluster::ClusterArgs),
    /// Read a key (prints the value; siblings as JSON; exit 1 when absent).
    Get {
        bucket: String,
        key: String,
        #[command(flatten)]
        node: NodeArg,
        #[arg(long)]
        r: Option<String>,
    },
    /// Store a value (VALUE '-' reads stdin); prints the new context.
    Put {
        bucket: String,
        key: String,
        value: String,
        #[command(flatten)]
        node: NodeArg,
        #[arg(long)]
        w: Option<String>,
        #[arg(long)]
        context: Option<String>,
        #[arg(long)]
        content_type: Option<String>,
    },
    /// Delete a key (tombstone).
    Delete {
        bucket: String,
        key: String,
        #[command(flatten)]
        node: NodeArg,
        #[arg(long)]
        w: Option<String>,
        #[arg(long)]
        context: Option<String>,
    },
    /// Membership, state, ownership and pending hints of every node, as seen by one node.
    Status {
        #[command(flatten)]
        node: NodeArg,
        /// Print the raw JSON of /cluster/status.
        #[arg(long)]
        json: bool,
    },
    /// Anti-entropy now, on one node: every range it replicates with every replica peer;
    /// progress bar, then a summary.
    Repair {
        #[command(flatten)]
        node: NodeArg,
        /// Compare and repair only this bucket's keys.
        #[arg(long)]
        bucket: Option<String>,
        /// Print the run id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Take a node out of the cluster: it streams its ranges to their new owners, hands over
    /// its hints and becomes `left` (progress bar; then stop its process).
    Decommission {
        #[command(flatten)]
        node: NodeArg,
        /// Print the change's state and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove a node that is down for good: the surviving replicas re-replicate its ranges,
    /// hints for it are dropped (progress bar). A node that is up answers 409.
    RemoveNode {
        /// The dead node's id.
        id: String,
        #[command(flatten)]
        node: NodeArg,
        /// Print the change's state and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Load generator (YCSB workloads a, b, c; w = write-only).
    Bench(bench::BenchArgs),
    /// A bucket's properties: resolution (causal | lww) and sibling limits.
    #[command(subcommand)]
    Bucket(BucketCommand),
}

#[derive(Subcommand)]
enum BucketCommand {
    /// Print a bucket's properties as JSON.
    Get {
        bucket: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Change a bucket's properties; every node applies them within seconds.
    Set {
        bucket: String,
        /// causal (siblings) or lww (last write wins).
        #[arg(long)]
        resolution: Option<String>,
        /// A causal write that would leave more siblings gets 409.
        #[arg(long)]
        max_siblings: Option<u64>,
        /// A causal write that leaves this many siblings is logged and counted.
        #[arg(long)]
        warn_siblings: Option<u64>,
        #[command(flatten)]
        node: NodeArg,
    },
}

#[derive(Args)]
struct NodeArg {
    /// Node to talk to (`https://...` for a node with `[tls] client = true`).
    #[arg(long = "node", default_value = "http://127.0.0.1:8001")]
    url: String,
    /// PEM file of the CA that signed the node's certificate (for `https://` nodes).
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
}

impl NodeArg {
    fn client(&self) -> Result<Client> {
        client_for(&self.url, self.cacert.as_deref())
    }
}

/// A client for `url`; with `cacert`, TLS is checked against that CA only.
pub(crate) fn client_for(url: &str, cacert: Option<&std::path::Path>) -> Result<Client> {
    match cacert {
        None => Ok(Client::new(url)),
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read --cacert {}", path.display()))?;
            Client::with_ca(url, &pem).with_context(|| format!("--cacert {}", path.display()))
        }
    }
}

#[derive(Args)]
struct ServerArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<String>,
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    http: Option<String>,
    /// Serve the Redis protocol (RESP2/RESP3) on this address (`resp.listen`).
    #[arg(long)]
    resp: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long = "seed")]
    seeds: Vec<String>,
    #[arg(long)]
    cluster_secret: Option<String>,
}

impl ServerArgs {
    /// Flags as a TOML overlay (flag > env > file > default).
    fn overrides(&self) -> toml::Table {
        let mut table = toml::Table::new();
        let mut set = |section: &str, key: &str, value: Option<String>| {
            if let Some(value) = value {
                set_value(&mut table, section, key, toml::Value::String(value));
            }
        };
        set("node", "id", self.node_id.clone());
        set("node", "listen", self.listen.clone());
        set("node", "http", self.http.clone());
        set("resp", "listen", self.resp.clone());
        set(
            "node",
            "data_dir",
            self.data_dir.as_ref().map(|d| d.display().to_string()),
        );
        set("cluster", "secret", self.cluster_secret.clone());
        if !self.seeds.is_empty() {
            let seeds = self
                .seeds
                .iter()
                .cloned()
                .map(toml::Value::String)
                .collect();
            set_value(&mut table, "cluster", "seeds", toml::Value::Array(seeds));
        }
        table
    }
}

/// Logs to stderr in the configured format and level; colour codes only on a terminal (a
/// log file, or `mendkv cluster`'s per-node logs, get plain text).
fn init_logging(log: &mendkv_server::config::LogSection) -> Result<()> {
    use std::io::IsTerminal;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&directives)
                .with_context(|| format!("RUST_LOG={directives:?} is not a log filter"))?
        }
        _ => {
            const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
            // A bare word is a target to tracing ("loud" would mean "everything from the
            // module loud"): only the level names are taken as levels.
            let is_filter = log.level.contains(['=', ',']);
            if !is_filter && !LEVELS.contains(&log.level.as_str()) {
                bail!(
                    "log.level = {:?} is not a level ({}) or a filter like info,mendkv_server=debug",
                    log.level,
                    LEVELS.join(", ")
                );
            }
            tracing_subscriber::EnvFilter::try_new(&log.level)
                .with_context(|| format!("log.level = {:?} is not a level or filter", log.level))?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // On a failed log write tracing would report it with eprintln!, which panics when
        // stderr is a file on a full disk: the node task died with it. A lost log line is
        // the lesser harm.
        .log_internal_errors(false);
    // Already set only when something initialised logging before (tests): keep that one.
    let _ = match log.format {
        mendkv_server::config::LogFormat::Text => builder.try_init(),
        mendkv_server::config::LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let outcome = match cli.command {
        // A server's configuration says how many threads its runtime has: read it first.
        Command::Server(args) => {
            match ServerConfig::load(args.config.as_deref(), std::env::vars(), args.overrides()) {
                Ok(config) => runtime_or_exit(config.node.runtime_threads).block_on(serve(config)),
                Err(error) => Err(error.into()),
            }
        }
        command => runtime_or_exit(0).block_on(run(command)),
    };
    if let Err(error) = outcome {
        eprintln!("mendkv: {error:#}");
        std::process::exit(1);
    }
}

fn runtime_or_exit(threads: usize) -> tokio::runtime::Runtime {
    build_runtime(threads).unwrap_or_else(|e| {
        eprintln!("mendkv: cannot start the runtime: {e}");
        std::process::exit(1);
    })
}

/// `threads`: 0, tokio's multi-thread runtime with a worker per core; 1, the current-thread
/// runtime; more, that many workers (`node.runtime_threads`).
fn build_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

async fn serve(config: ServerConfig) -> Result<()> {
    init_logging(&config.log)?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    mendkv_server::run(config, shutdown).await?;
    Ok(())
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Server(_) => unreachable!("main serves a server on its own runtime"),
        Command::Cluster(args) => cluster::run(args).await,
        Command::Get {
            bucket,
            key,
            node,
            r,
        } => {
            let client = node.client()?;
            match client.get(&bucket, key.as_bytes(), r.as_deref()).await? {
                ReadResult::Value { value, context, .. } => {
                    std::io::stdout().write_all(&value)?;
                    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                        println!();
                    }
                    if let Some(context) = context {
                        eprintln!("context: {context}");
                    }
                    Ok(())
                }
                ReadResult::Siblings { siblings, context } => {
                    let values: Vec<_> = siblings
                        .iter()
                        .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({ "siblings": values, "context": context })
                    );
                    Ok(())
                }
                ReadResult::NotFound { .. } => bail!("not found"),
            }
        }
        Command::Put {
            bucket,
            key,
            value,
            node,
            w,
            context,
            content_type,
        } => {
            let value = if value == "-" {
                let mut buffer = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buffer)
                    .context("reading stdin")?;
                buffer
            } else {
                value.into_bytes()
            };
            let client = node.client()?;
            let context = client
                .put(
                    &bucket,
                    key.as_bytes(),
                    value,
                    content_type.as_deref(),
                    w.as_deref(),
                    context.as_deref(),
                )
                .await?;
            if let Some(context) = context {
                println!("{context}");
            }
            Ok(())
        }
        Command::Delete {
            bucket,
            key,
            node,
            w,
            context,
        } => {
            node.client()?
                .delete(&bucket, key.as_bytes(), w.as_deref(), context.as_deref())
                .await?;
            Ok(())
        }
        Command::Decommission { node, no_wait } => {
            membership::decommission(node.client()?, no_wait).await
        }
        Command::RemoveNode { id, node, no_wait } => {
            membership::remove_node(node.client()?, &id, no_wait).await
        }
        Command::Status { node, json } => {
            let status = node.client()?.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status)?;
            }
            Ok(())
        }
        Command::Repair {
            node,
            bucket,
            no_wait,
        } => repair::run(node.client()?, bucket.as_deref(), no_wait).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Bucket(BucketCommand::Get { bucket, node }) => {
            let props = node.client()?.bucket_props(&bucket).await?;
            println!("{props}");
            Ok(())
        }
        Command::Bucket(BucketCommand::Set {
            bucket,
            resolution,
            max_siblings,
            warn_siblings,
            node,
        }) => {
            let mut props = serde_json::Map::new();
            if let Some(resolution) = resolution {
                props.insert("resolution".into(), resolution.into());
            }
            if let Some(max) = max_siblings {
                props.insert("max_siblings".into(), max.into());
            }
            if let Some(warn) = warn_siblings {
                props.insert("warn_siblings".into(), warn.into());
            }
            if props.is_empty() {
                bail!("nothing to set: give --resolution, --max-siblings or --warn-siblings");
            }
            let client = node.client()?;
            client
                .set_bucket_props(&bucket, &serde_json::Value::Object(props))
                .await?;
            println!("{}", client.bucket_props(&bucket).await?);
            Ok(())
        }
    }
}

/// `nodetool status`-like table.
fn print_status(status: &serde_json::Value) -> Result<()> {
    let nodes = status["nodes"]
        .as_array()
        .ok_or_else(|| anyhow!("bad status answer"))?;
    println!(
        "cluster {}  (seen by {})",
        status["cluster"].as_str().unwrap_or("?"),
        status["node_id"].as_str().unwrap_or("?")
    );
    println!(
        "{:<14} {:<7} {:<7} {:>6} {:>10} {:>7}  {:<22} {:<22}",
        "NODE", "STATUS", "STATE", "PHI", "OWNERSHIP", "HINTS", "PEER", "HTTP"
    );
    for node in nodes {
        let status = node["status"].as_str().unwrap_or("?");
        let state = node["state"].as_str().unwrap_or("?");
        println!(
            "{:<14} {:<7} {:<7} {:>6.2} {:>9.1}% {:>7}  {:<22} {:<22}",
            node["id"].as_str().unwrap_or("?"),
            liveness_style(status).apply_to(status),
            state_style(state).apply_to(state),
            node["phi"].as_f64().unwrap_or(0.0),
            node["ownership"].as_f64().unwrap_or(0.0) * 100.0,
            node["hints_pending"].as_u64().unwrap_or(0),
            node["peer_address"].as_str().unwrap_or("?"),
            node["http_address"].as_str().unwrap_or("?"),
        );
        let change = &node["change"];
        if change.is_object() {
            let number = |name: &str| change[name].as_u64().unwrap_or(0);
            println!(
                "{:<14} {} {}: {}/{} ranges streamed here, {} keys, {} B{}",
                "",
                change["change"].as_str().unwrap_or("?"),
                change["phase"].as_str().unwrap_or("?"),
                number("ranges_done"),
                number("ranges_total"),
                number("keys_streamed"),
                number("bytes_streamed"),
                change["reason"]
                    .as_str()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
            );
        }
    }
    print_repair_debt(status);
    Ok(())
}

/// Colour for a node's liveness; `for_stdout` keeps escape codes off unless stdout is a
/// terminal (and honours NO_COLOR / CLICOLOR_FORCE), so piped output stays plain.
fn liveness_style(status: &str) -> console::Style {
    let style = console::Style::new().for_stdout();
    match status {
        "up" => style.green(),
        "down" => style.red().bold(),
        _ => style.yellow(),
    }
}

/// Colour for a node's ring state: changes in progress stand out, departed nodes fade.
fn state_style(state: &str) -> console::Style {
    let style = console::Style::new().for_stdout();
    match state {
        "normal" => style,
        "joining" | "leaving" => style.yellow(),
        _ => style.dim(),
    }
}

/// The repair rate in force and, per replica pair, the known debt and its ETA.
fn print_repair_debt(status: &serde_json::Value) {
    let seen_by = status["node_id"].as_str().unwrap_or("?");
    println!(
        "repair rate {}/s ({})",
        indicatif::HumanBytes(status["repair_rate_bytes_per_s"].as_u64().unwrap_or(0)),
        status["repair_rate_reason"].as_str().unwrap_or("?")
    );
    let debts = status["repair_debt"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if debts.is_empty() {
        println!("repair debt: none known ({seen_by}'s last exchanges converged)");
        return;
    }
    for debt in debts {
        let estimate = match debt["estimated_bytes"].as_u64() {
            Some(bytes) => format!("~{}", indicatif::HumanBytes(bytes)),
            None => "size unknown".into(),
        };
        let eta = match debt["eta_ms"].as_u64() {
            Some(ms) => format!("ETA {:.1} s", ms as f64 / 1000.0),
            None => "ETA unknown".into(),
        };
        println!(
            "repair debt {seen_by} <-> {}: {} mismatched leaves, {estimate}, {eta}",
            debt["peer"].as_str().unwrap_or("?"),
            debt["mismatched_leaves"].as_u64().unwrap_or(0)
        );
    }
}

/// Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
