//! `mendkv bench`: YCSB-style load over HTTP keep-alive connections spread across nodes.
//! Workloads: a = 50% reads / 50% updates, b = 95 / 5, c = reads only, w = updates only
//! (an extension for write-throughput figures), rmw = read-modify-write (each operation reads
//! the key, then writes it back with the context it read: the client a causal bucket asks
//! for, whose only siblings come from truly concurrent writers). Keys uniform or zipfian
//! (YCSB's 0.99).
//! Latency goes into an HDR histogram (µs); errors are counted, never hidden.

use anyhow::{bail, Result};
use clap::Args;
use hdrhistogram::Histogram;
use mendkv_client::Client;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Nodes to spread requests over (repeat the flag).
    #[arg(long = "node", default_value = "http://127.0.0.1:8001")]
    nodes: Vec<String>,
    /// a (50/50 read/update), b (95/5), c (read only), w (update only), rmw (read, then
    /// write with the context read).
    #[arg(long, default_value = "a")]
    workload: String,
    #[arg(long, default_value_t = 100_000)]
    ops: u64,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// uniform or zipfian.
    #[arg(long, default_value = "uniform")]
    distribution: String,
    #[arg(long, default_value = "quorum")]
    r: String,
    #[arg(long, default_value = "quorum")]
    w: String,
    #[arg(long, default_value = "bench")]
    bucket: String,
    /// Write every key once before measuring (needed for read workloads on a fresh cluster).
    #[arg(long)]
    preload: bool,
    /// The write level of the preload (all: every replica holds every key).
    #[arg(long, default_value = "all")]
    preload_w: String,
    /// Open loop: start operations at this many per second in total (0 = closed loop, each
    /// worker starts its next operation when the last ends). Latency is measured from when
    /// an operation was due, so a slow server cannot hide its queueing (no coordinated
    /// omission).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Stop after this many seconds (0 = when `--ops` are done).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
    /// Stop when this file exists (checked between operations), e.g. when a repair the
    /// caller is timing has finished.
    #[arg(long)]
    until_file: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// PEM file of the CA that signed the nodes' certificates (for `https://` nodes).
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
}

struct Totals {
    reads: Histogram<u64>,
    updates: Histogram<u64>,
    errors: u64,
    not_found: u64,
    /// Reads answered with siblings (300).
    siblings: u64,
}

/// The share of operations that are plain reads; `rmw` is read-modify-write (`None`).
fn read_share(workload: &str) -> Result<Option<f64>> {
    Ok(Some(match workload {
        "a" => 0.5,
        "b" => 0.95,
        "c" => 1.0,
        "w" => 0.0,
        "rmw" => return Ok(None),
        other => bail!("unknown workload {other:?}: use a, b, c, w or rmw"),
    }))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            reads: histogram(),
            updates: histogram(),
            errors: 0,
            not_found: 0,
            siblings: 0,
        }
    }
}

/// One read at `--r`; its answer's context (for a read-modify-write), counted in `totals`.
async fn timed_read(
    client: &Client,
    args: &BenchArgs,
    key: &str,
    totals: &mut Totals,
) -> Result<Option<String>, mendkv_client::ClientError> {
    let answer = client
        .get(&args.bucket, key.as_bytes(), Some(&args.r))
        .await?;
    match &answer {
        mendkv_client::ReadResult::NotFound { .. } => totals.not_found += 1,
        mendkv_client::ReadResult::Siblings { .. } => totals.siblings += 1,
        mendkv_client::ReadResult::Value { .. } => {}
    }
    Ok(answer.context().map(str::to_owned))
}

/// One write at `--w`, blind or with a context.
async fn put(
    client: &Client,
    args: &BenchArgs,
    key: &str,
    value: &[u8],
    context: Option<&str>,
) -> Result<(), mendkv_client::ClientError> {
    client
        .put(
            &args.bucket,
            key.as_bytes(),
            value.to_vec(),
            None,
            Some(&args.w),
            context,
        )
        .await
        .map(|_| ())
}

/// Records one operation's latency, or its failure.
fn record(totals: &mut Totals, is_read: bool, started: Instant, ok: bool) {
    let micros = (started.elapsed().as_micros() as u64).max(1);
    if !ok {
        totals.errors += 1;
    } else if is_read {
        let _ = totals.reads.record(micros);
    } else {
        let _ = totals.updates.record(micros);
    }
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let read_share = read_share(&args.workload)?;
    if args.keys == 0 || args.concurrency == 0 {
        bail!("--keys and --concurrency must be positive");
    }
    let zipf = match args.distribution.as_str() {
        "uniform" => None,
        "zipfian" => Some(Zipf::new(args.keys, 0.99)?),
        other => bail!("unknown distribution {other:?}: use uniform or zipfian"),
    };
    for level in [&args.r, &args.w, &args.preload_w] {
        if !["one", "quorum", "all"].contains(&level.as_str()) {
            bail!("unknown consistency level {level:?}: use one, quorum or all");
        }
    }
    let clients = args
        .nodes
        .iter()
        .map(|n| crate::client_for(n, args.cacert.as_deref()))
        .collect::<Result<Vec<Client>>>()?;
    let value = vec![b'x'; args.value_size];
    if args.preload {
        let started = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for worker in 0..args.concurrency {
            let client = clients[worker % clients.len()].clone();
            let (next, value, args) = (next.clone(), value.clone(), args.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= args.keys {
                        return Ok::<(), anyhow::Error>(());
                    }
                    client
                        .put(
                            &args.bucket,
                            format!("key{i}").as_bytes(),
                            value.clone(),
                            None,
                            Some(&args.preload_w),
                            None,
                        )
                        .await?;
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        println!(
            "preloaded {} keys in {:.1} s",
            args.keys,
            started.elapsed().as_secs_f64()
        );
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = (args.duration_s > 0).then(|| started + Duration::from_secs(args.duration_s));
    let ops = if args.duration_s > 0 && args.rate == 0 {
        u64::MAX
    } else if args.duration_s > 0 {
        args.rate.saturating_mul(args.duration_s)
    } else {
        args.ops
    };
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let client = clients[worker % clients.len()].clone();
        let (next, value, args) = (next.clone(), value.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                args.seed.wrapping_mul(1000).wrapping_add(worker as u64),
            );
            let mut totals = Totals::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= ops
                    || deadline.is_some_and(|d| Instant::now() >= d)
                    || args.until_file.as_ref().is_some_and(|f| f.exists())
                {
                    break;
                }
                // Open loop: operation `index` is due at index / rate seconds.
                let due = (args.rate > 0)
                    .then(|| started + Duration::from_secs_f64(index as f64 / args.rate as f64));
                if let Some(due) = due {
                    tokio::time::sleep_until(due.into()).await;
                }
                let key_index = match &zipf {
                    Some(z) => (z.sample(&mut rng) as u64).saturating_sub(1),
                    None => rng.gen_range(0..args.keys),
                };
                let key = format!("key{key_index}");
                match read_share {
                    Some(share) => {
                        let is_read = rng.gen_bool(share);
                        let op_started = due.unwrap_or_else(Instant::now);
                        let outcome = if is_read {
                            timed_read(&client, &args, &key, &mut totals)
                                .await
                                .map(|_| ())
                        } else {
                            put(&client, &args, &key, &value, None).await
                        };
                        record(&mut totals, is_read, op_started, outcome.is_ok());
                    }
                    None => {
                        let op_started = due.unwrap_or_else(Instant::now);
                        let read = timed_read(&client, &args, &key, &mut totals).await;
                        record(&mut totals, true, op_started, read.is_ok());
                        let Ok(context) = read else { continue };
                        let op_started = Instant::now();
                        let written = put(&client, &args, &key, &value, context.as_deref()).await;
                        record(&mut totals, false, op_started, written.is_ok());
                    }
                }
            }
            totals
        }));
    }
    let mut totals = Totals::default();
    for task in tasks {
        let t = task.await?;
        totals.reads.add(&t.reads)?;
        totals.updates.add(&t.updates)?;
        totals.errors += t.errors;
        totals.not_found += t.not_found;
        totals.siblings += t.siblings;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let done = totals.reads.len() + totals.updates.len();
    println!(
        "workload {} ({} keys {}, {} B values, r={} w={}), {} nodes, concurrency {}{}",
        args.workload,
        args.keys,
        args.distribution,
        args.value_size,
        args.r,
        args.w,
        clients.len(),
        args.concurrency,
        if args.rate > 0 {
            format!(", open loop at {} ops/s", args.rate)
        } else {
            String::new()
        }
    );
    println!(
        "{:.0} ops/s ({} ok, {} errors, {} not found, {} with siblings) in {:.2} s",
        done as f64 / elapsed,
        done,
        totals.errors,
        totals.not_found,
        totals.siblings,
        elapsed
    );
    for (name, h) in [("read", &totals.reads), ("update", &totals.updates)] {
        if h.is_empty() {
            continue;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{name:>6}: {} ops  p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            h.len(), ms(0.5), ms(0.95), ms(0.99), ms(0.999), h.max() as f64 / 1000.0
        );
    }
    if totals.errors > 0 {
        bail!("{} operations failed", totals.errors);
    }
    Ok(())
}
