//! The seed runner: runs many seeds, prints every failure with a replay command, and ends
//! with `N passed, M failed`.
//!
//! ```text
//! cargo run --release -p mendkv-sim -- --seeds 200                 # CI-sized sweep
//! cargo run --release -p mendkv-sim -- --seeds 100000 --jobs 8      # a long soak
//! cargo run --release -p mendkv-sim -- --seed 1234                  # replay one seed, with its trace
//! cargo run --release -p mendkv-sim -- --seeds 300 --faults none    # convergence must hold
//! ```
//!
//! The wall clock is read here only, for the performance figures; the simulation never
//! sees it.

use clap::Parser;
use mendkv_sim::{run_seed, FaultConfig, NodeOptions, RunReport, SimConfig};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "mendkv-sim",
    about = "Deterministic simulation of a mendkv cluster: runs seeds, checks the histories."
)]
struct Args {
    /// Number of seeds to run (default 100).
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed of the sweep.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Run exactly this seed and print its trace (the replay command of a failure).
    #[arg(long, conflicts_with_all = ["seeds", "start"])]
    seed: Option<u64>,
    /// Nodes in the cluster (1-32). Default: the swarm draws 1-9 per seed (5 with
    /// --no-swarm).
    #[arg(long)]
    nodes: Option<usize>,
    /// The nodes' configuration, as `name=value,...` (what a replay line prints; names left
    /// out keep the core's default). Default: the swarm draws it per seed.
    #[arg(long)]
    options: Option<String>,
    /// Run the fixed configuration (5 nodes unless --nodes, the core's default options
    /// unless --options) instead of drawing cluster size and options per seed.
    #[arg(long)]
    no_swarm: bool,
    /// Client operations per run.
    #[arg(long, default_value_t = 1000)]
    ops: usize,
    /// Faults to inject: none, all, or a comma list of
    /// loss,duplicate,reorder,partition,crash,pause,skew,fsync,membership.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Fail a seed whose replicas have not converged at the end (the default).
    #[arg(long, conflicts_with = "no_require_convergence")]
    require_convergence: bool,
    /// Do not fail a seed on divergent replicas (still reported).
    #[arg(long)]
    no_require_convergence: bool,
    /// Bound on events per run; a run that reaches it fails.
    #[arg(long, default_value_t = 2_000_000)]
    max_steps: u64,
    /// Print the full trace of every seed run (large).
    #[arg(long)]
    trace: bool,
    /// Print a summary line for passing seeds too.
    #[arg(long, short)]
    verbose: bool,
    /// Seeds run in parallel (threads). Results are printed in seed order.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
}

fn config_for(
    args: &Args,
    faults: FaultConfig,
    options: &Option<NodeOptions>,
    seed: u64,
) -> SimConfig {
    let mut config = SimConfig::new(seed).with_faults(faults);
    if !args.no_swarm {
        config = config.swarm(args.nodes.is_some(), options.is_some());
    }
    if let Some(nodes) = args.nodes {
        config.nodes = nodes;
    }
    if let Some(options) = options {
        config.options = options.clone();
    }
    config.ops = args.ops;
    config.max_steps = args.max_steps;
    config.trace = args.trace || args.seed.is_some();
    if args.require_convergence {
        config.require_convergence = true;
    }
    if args.no_require_convergence {
        config.require_convergence = false;
    }
    config
}

/// What a failing seed prints.
fn print_failure(report: &RunReport) {
    println!("{}", report.summary());
    println!("  params: {}", report.params);
    let check = &report.check;
    let safety: Vec<_> = check
        .violations()
        .filter(|(l, _)| *l != "divergent")
        .collect();
    for (label, violation) in safety.iter().take(10) {
        println!("  {label}: {violation}");
    }
    if safety.len() > 10 {
        println!("  ... and {} more", safety.len() - 10);
    }
    for violation in check.divergent.iter().take(3) {
        println!("  divergent: {violation}");
    }
    if check.divergent.len() > 3 {
        println!(
            "  ... and {} more divergent keys",
            check.divergent.len() - 3
        );
    }
    for line in report.key_histories(3).lines().take(60) {
        println!("  {line}");
    }
    println!("  replay: {}", report.config.replay_command());
}

fn main() -> ExitCode {
    let args = Args::parse();
    let faults = match FaultConfig::parse(&args.faults) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: --faults: {e}");
            return ExitCode::from(2);
        }
    };
    let options = match args.options.as_deref().map(NodeOptions::parse).transpose() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: --options: {e}");
            return ExitCode::from(2);
        }
    };
    if args.jobs == 0 || args.jobs > 256 {
        eprintln!("error: --jobs must be 1..=256 (got {})", args.jobs);
        return ExitCode::from(2);
    }
    let (start, count) = match (args.seed, args.seeds) {
        (Some(seed), _) => (seed, 1),
        (None, Some(0)) => {
            eprintln!("error: --seeds must be at least 1");
            return ExitCode::from(2);
        }
        (None, Some(n)) => (args.start, n),
        (None, None) => (args.start, 100),
    };
    if start.checked_add(count).is_none() {
        eprintln!("error: --start + --seeds overflows u64");
        return ExitCode::from(2);
    }
    if let Err(e) = config_for(&args, faults, &options, start).validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }

    let wall = Instant::now();
    let next = AtomicU64::new(0);
    let (tx, rx) = mpsc::channel::<(u64, RunReport)>();
    let (mut passed, mut failed) = (0u64, 0u64);
    let (mut sim_ms, mut events) = (0u128, 0u128);
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.min(count as usize) {
            let tx = tx.clone();
            let (next, args, options) = (&next, &args, &options);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let report = run_seed(&config_for(args, faults, options, start + i));
                if tx.send((i, report)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        // Print in seed order whatever order the threads finish in.
        let mut waiting: BTreeMap<u64, RunReport> = BTreeMap::new();
        let mut printed = 0u64;
        for (i, report) in rx {
            waiting.insert(i, report);
            while let Some(report) = waiting.remove(&printed) {
                printed += 1;
                sim_ms += u128::from(report.sim_ms);
                events += u128::from(report.steps);
                if let Some(trace) = &report.trace {
                    print!("{trace}");
                }
                if report.passed() {
                    passed += 1;
                    if args.verbose || args.seed.is_some() {
                        println!("{}", report.summary());
                    }
                } else {
                    failed += 1;
                    print_failure(&report);
                }
                if count >= 1000 && printed.is_multiple_of(1000) {
                    let minutes = wall.elapsed().as_secs_f64() / 60.0;
                    eprintln!(
                        "... {printed}/{count} seeds, {failed} failed, {:.0} seeds/min",
                        printed as f64 / minutes.max(1e-9)
                    );
                }
            }
        }
    });
    let secs = wall.elapsed().as_secs_f64().max(1e-9);
    println!(
        "performance: {:.1} seeds/min, {:.0} simulated s per wall s, {:.0} events/s ({} nodes, {} ops per run, {} jobs, {:.1}s wall)",
        count as f64 * 60.0 / secs,
        sim_ms as f64 / 1000.0 / secs,
        events as f64 / secs,
        match (args.nodes, args.no_swarm) {
            (Some(n), _) => n.to_string(),
            (None, true) => "5".into(),
            (None, false) => "swarm: 1-9".into(),
        },
        args.ops,
        args.jobs,
        secs
    );
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
