//! `mendkv-chaos`: seeded chaos runs against real `mendkv server` processes in network
//! namespaces; prints each run's schedule, history summary and verdict, then the table.
//! Exits 1 on any violation, 2 when the harness itself could not run, 130 when interrupted.

use clap::Parser;
use mendkv_chaos::{campaign, schedule, topology, RunOptions};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mendkv-chaos",
    about = "Jepsen-style fault runs of real mendkv servers"
)]
struct Args {
    /// Nodes per run (3 or more; replication factor 3); a list such as `3,5` cycles.
    #[arg(long, value_delimiter = ',', default_value = "3")]
    nodes: Vec<usize>,
    /// Seed of the first run; run i uses seed + i.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Workload (and fault schedule) length of each run.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Stop starting runs once this many seconds would be exceeded.
    #[arg(long)]
    budget_s: Option<u64>,
    /// How long replicas may take to converge after the heal.
    #[arg(long, default_value_t = 90)]
    settle_s: u64,
    /// Level of the workload's reads: `quorum` is what the checker's rules promise; `one`
    /// breaks the promise on purpose (the checker must then report violations).
    #[arg(long, default_value = "quorum", value_parser = ["one", "quorum"])]
    read_level: String,
    /// Level of the workload's writes and deletes (see --read-level).
    #[arg(long, default_value = "quorum", value_parser = ["one", "quorum"])]
    write_level: String,
    /// No joins or decommissions (the changes lane): faults only, as before that lane.
    #[arg(long)]
    no_cluster_changes: bool,
    /// Print each run's fault schedule and cluster changes, run nothing (no root needed).
    #[arg(long)]
    schedule_only: bool,
    /// The mendkv binary (default: `mendkv` next to this binary).
    #[arg(long)]
    mendkv: Option<PathBuf>,
}

fn level(name: &str) -> &'static str {
    if name == "one" {
        "one"
    } else {
        "quorum"
    }
}

fn main() {
    let args = Args::parse();
    if args.schedule_only {
        for run in 0..args.runs {
            let seed = args.seed.wrapping_add(run as u64);
            let nodes = args.nodes[run % args.nodes.len().max(1)];
            let duration_ms = args.duration_s * 1_000;
            println!("seed {seed} nodes {nodes}:");
            for step in schedule::draw(seed, nodes, duration_ms) {
                println!("  {step}");
            }
            if !args.no_cluster_changes {
                for step in schedule::draw_changes(
                    seed,
                    nodes,
                    mendkv_chaos::run::REPLICATION_FACTOR,
                    duration_ms,
                ) {
                    println!("  {step}");
                }
            }
        }
        return;
    }
    if let Some(reason) = topology::missing_requirements() {
        eprintln!("mendkv-chaos: {reason}");
        std::process::exit(2);
    }
    let binary = match args.mendkv.clone().or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("mendkv")))
    }) {
        Some(path) if path.is_file() => path,
        other => {
            eprintln!(
                "mendkv-chaos: no mendkv binary at {other:?}: build it (cargo build -p mendkv) or pass --mendkv PATH"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = mendkv_chaos::install_interrupt_handler() {
        eprintln!("mendkv-chaos: cannot handle signals: {e}");
        std::process::exit(2);
    }
    let mut options = RunOptions::new(
        binary,
        args.nodes.first().copied().unwrap_or(3),
        args.seed,
        Duration::from_secs(args.duration_s),
    );
    options.settle_timeout = Duration::from_secs(args.settle_s);
    options.read_level = level(&args.read_level);
    options.write_level = level(&args.write_level);
    options.cluster_changes = !args.no_cluster_changes;
    let reports = campaign::run_many(
        &options,
        &args.nodes,
        args.runs,
        args.budget_s.map(Duration::from_secs),
    );
    print!("{}", campaign::table(&reports));
    if mendkv_chaos::interrupted() {
        eprintln!("mendkv-chaos: interrupted; everything it started was removed");
        std::process::exit(130);
    }
    if !campaign::clean(&reports) {
        eprintln!("mendkv-chaos: VIOLATIONS (rerun lines above)");
        std::process::exit(1);
    }
}
