//! Prints the gossip measurements the defaults were chosen from:
//!
//! ```text
//! cargo run --release -p mendkv-core --example gossip_tables            # everything
//! cargo run --release -p mendkv-core --example gossip_tables -- quick   # fewer seeds
//! cargo run --release -p mendkv-core --example gossip_tables -- dissemination | detection
//! ```
//!
//! Dissemination: a cluster of N nodes forms from 3 seeds, then for each seed (trial) a
//! random node changes a value at a random moment; we count rounds (of `interval_ms`)
//! until every node has it, fanout 3, 1% loss, latency 1-10 ms.
//!
//! Detection: 20 nodes run for a minute, one crashes; we time until every live node has
//! convicted it (10% loss). False convictions: 20 nodes, 10% loss, one simulated hour, no
//! crash. Both over `interval_ms` x `phi_convict_threshold`, the other knobs scaled with
//! the interval as `GossipConfig::with_interval` does.

use mendkv_core::gossip::simulation::{
    measure_detection, measure_dissemination, measure_stability, percentile,
};
use mendkv_core::gossip::GossipConfig;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    let only = |what: &str| {
        !args
            .iter()
            .any(|a| a == "dissemination" || a == "detection")
            || args.iter().any(|a| a == what)
    };
    if only("dissemination") {
        dissemination(if quick { 20 } else { 100 });
    }
    if only("detection") {
        detection(
            if quick { 5 } else { 20 },
            if quick { 600_000 } else { 3_600_000 },
        );
    }
}

fn dissemination(trials: u64) {
    let config = GossipConfig::default();
    println!(
        "## Dissemination (fanout {}, interval {} ms, 1% loss, {trials} seeds)\n",
        config.fanout, config.interval_ms
    );
    println!("| nodes | rounds median | rounds p99 | rounds max | bytes/node/round at rest | bytes/node/round spreading | rounds to form | false convictions | wall s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for nodes in [10, 100, 1000] {
        let started = Instant::now();
        let report = measure_dissemination::<ChaCha8Rng>(nodes, trials, 0.01, config.clone());
        println!(
            "| {nodes} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {} | {:.0} |",
            report.median(),
            report.p99(),
            report.max(),
            report.steady_bytes_per_node_per_round,
            report.spreading_bytes_per_node_per_round,
            report.formation_rounds,
            report.false_convictions,
            started.elapsed().as_secs_f64(),
        );
        assert_eq!(report.incomplete, 0, "some trial never reached every node");
    }
    let untuned = GossipConfig {
        fast_interval_ms: config.interval_ms,
        ..config.clone()
    };
    let report = measure_dissemination::<ChaCha8Rng>(100, trials, 0.01, untuned);
    println!(
        "| 100, no frequency tuning | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {} | |",
        report.median(),
        report.p99(),
        report.max(),
        report.steady_bytes_per_node_per_round,
        report.spreading_bytes_per_node_per_round,
        report.formation_rounds,
        report.false_convictions,
    );
    println!();
}

fn detection(trials: u64, hour_ms: u64) {
    println!(
        "## Failure detection (20 nodes, 10% loss; detection over {trials} crashes; no-crash run of {} simulated s)\n",
        hour_ms / 1000
    );
    println!("| interval ms | phi | detection median ms | detection max ms | false convictions (no-crash run) | false convictions (crash runs) | suspicions | peak phi (no crash) | bytes/node/s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for interval in [200, 500, 1000] {
        for phi in [5.0, 8.0, 12.0] {
            let config = GossipConfig {
                phi_convict_threshold: phi,
                phi_suspect_threshold: phi / 2.0,
                ..GossipConfig::with_interval(interval)
            };
            let detected = measure_detection::<ChaCha8Rng>(20, trials, 0.10, config.clone());
            let stable = measure_stability::<ChaCha8Rng>(20, hour_ms, 0.10, config, 7, Some(100));
            let missed = if detected.undetected > 0 {
                format!(" ({} undetected)", detected.undetected)
            } else {
                String::new()
            };
            println!(
                "| {interval} | {phi} | {:.0} | {:.0}{missed} | {} | {} | {} | {:.2} | {:.0} |",
                percentile(&detected.detection_ms, 0.5),
                percentile(&detected.detection_ms, 1.0),
                stable.false_convictions,
                detected.false_convictions,
                stable.suspicions,
                stable.peak_phi,
                stable.bytes_per_node_per_s,
            );
        }
    }
    println!();
    println!("## Acceptable pause, interval 500 ms, phi 8 (10% loss)\n");
    println!("| acceptable pause ms | false convictions, 20 nodes, no-crash run | peak phi | detection max ms, 20 nodes | detection max ms, 100 nodes | false convictions, crash runs (20 + 100 nodes) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for pause in [500, 750, 1000] {
        let config = GossipConfig {
            acceptable_pause_ms: pause,
            ..GossipConfig::default()
        };
        let stable =
            measure_stability::<ChaCha8Rng>(20, hour_ms, 0.10, config.clone(), 7, Some(100));
        let small = measure_detection::<ChaCha8Rng>(20, trials.min(10), 0.10, config.clone());
        let large = measure_detection::<ChaCha8Rng>(100, trials.min(5), 0.10, config);
        println!(
            "| {pause} | {} | {:.2} | {:.0} | {:.0} | {} |",
            stable.false_convictions,
            stable.peak_phi,
            percentile(&small.detection_ms, 1.0),
            percentile(&large.detection_ms, 1.0),
            small.false_convictions + large.false_convictions,
        );
    }
    println!();
    println!("## Failure detection at scale, defaults (10% loss)\n");
    println!("| nodes | detection median ms | detection max ms | false convictions |");
    println!("|---:|---:|---:|---:|");
    for nodes in [20, 100] {
        let detected =
            measure_detection::<ChaCha8Rng>(nodes, trials.min(10), 0.10, GossipConfig::default());
        println!(
            "| {nodes} | {:.0} | {:.0} | {} |",
            percentile(&detected.detection_ms, 0.5),
            percentile(&detected.detection_ms, 1.0),
            detected.false_convictions,
        );
    }
    println!();
}
