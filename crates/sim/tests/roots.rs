//! Merkle roots on gossip in the simulator: a replica that missed writes is found by the
//! gossiped roots alone (the periodic exchange interval is a day), within two gossip
//! intervals of the range going quiet; and the figures of docs/benchmarks.md (run with
//! `cargo test -p mendkv-sim --test roots -- --ignored --nocapture`).

use mendkv_core::node::Counter;
use mendkv_core::quorum::ConsistencyLevel::Quorum;
use mendkv_core::Millis;
use mendkv_sim::{FaultConfig, SimConfig, Simulation};

const DAY_MS: Millis = 24 * 3600 * 1000;
/// The simulator's gossip interval (`node_options::node_config`).
const GOSSIP_MS: Millis = 1000;
/// The quiet horizon: two gossip intervals (`Node::roots_quiet_ms`).
const QUIET_MS: Millis = 2 * GOSSIP_MS;

fn cluster(seed: u64, gossip_roots: bool, interval_ms: Millis) -> Simulation {
    // Gossip runs only with the membership fault on (the simulator's other runs give every
    // node the member list); the workload never starts here, so no cluster change happens.
    let faults = FaultConfig {
        membership: true,
        ..FaultConfig::none()
    };
    let mut config = SimConfig::new(seed).with_faults(faults);
    config.nodes = 3;
    config.options.read_repair = None;
    config.options.anti_entropy_interval_ms = interval_ms;
    config.options.gossip_roots = gossip_roots;
    Simulation::new(config)
}

fn total(sim: &Simulation, counter: Counter) -> u64 {
    (0..sim.nodes())
        .filter_map(|i| sim.node(i))
        .map(|n| n.stats().get(counter))
        .sum()
}

fn gossip_bytes_and_rounds(sim: &Simulation) -> (u64, u64) {
    (0..sim.nodes())
        .filter_map(|i| sim.node(i))
        .map(|n| (n.gossip_stats().bytes_out, n.gossip_stats().rounds))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// What one divergence run measured (virtual ms).
struct Detection {
    /// From the last missed write to the first (range, peer) the roots flagged.
    after_last_write: Millis,
    /// From the range going quiet (the last write plus the quiet horizon).
    after_quiet: Millis,
    /// From the last missed write until node 2 held every key (the exchange mended it).
    repaired_after: Millis,
}

/// Node 2 misses five writes behind a one-way cut (node 0 cannot reach it; everything else
/// flows, so no one thinks it down and no replica-recovered exchange starts; node 0's hints
/// for it are stuck behind the cut). Only the gossiped roots can find the divergence: the
/// periodic interval is a day. Returns what was measured, or why the run failed.
fn missed_writes_run(seed: u64) -> Result<Detection, String> {
    let mut sim = cluster(seed, true, DAY_MS);
    // Trees built, first exchanges done, roots published and heard everywhere.
    sim.run_for(10_000);
    if total(&sim, Counter::AntiEntropyRootsDiffer) != 0 {
        return Err("roots differed before any write".into());
    }
    sim.partition(&[0], &[2], false);
    let keys: Vec<String> = (0..5).map(|i| format!("missed{i}")).collect();
    // All at once, so the ranges they touch go quiet together.
    let writes: Vec<_> = keys
        .iter()
        .map(|k| sim.put(0, k, "v", Quorum, None))
        .collect();
    for (key, write) in keys.iter().zip(writes) {
        if !sim.wait_for(write, 5_000).is_ok() {
            return Err(format!("write of {key}: {}", sim.outcome(write)));
        }
    }
    let last_write = sim.now();
    if keys.iter().any(|k| sim.stored(2, k).is_some()) {
        return Err("node 2 got a write through the cut".into());
    }
    if !sim.run_until(|s| total(s, Counter::AntiEntropyRootsDiffer) > 0, 60_000) {
        return Err("the roots never found the divergence".into());
    }
    let detected = sim.now();
    if !sim.run_until(|s| keys.iter().all(|k| s.stored(2, k).is_some()), 60_000) {
        return Err("node 2 was never repaired".into());
    }
    let repaired = sim.now();
    sim.heal_partition();
    let report = sim.finish();
    if !(report.safe() && report.converged()) {
        return Err(format!("{report}"));
    }
    Ok(Detection {
        after_last_write: detected - last_write,
        after_quiet: detected.saturating_sub(last_write + QUIET_MS),
        repaired_after: repaired - last_write,
    })
}

/// The divergence is found by the roots within two gossip intervals of the range going
/// quiet, and the exchange it starts mends the replica.
#[test]
fn roots_find_a_replica_that_missed_writes() {
    for seed in [1, 2, 3] {
        let run = missed_writes_run(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(
            run.after_quiet <= 2 * GOSSIP_MS,
            "seed {seed}: found {} ms after the range went quiet",
            run.after_quiet
        );
        assert!(run.repaired_after >= run.after_last_write);
    }
}

fn percentile(sorted: &[Millis], p: usize) -> Millis {
    sorted[(sorted.len() - 1) * p / 100]
}

/// The figures of docs/benchmarks.md ("Merkle roots on gossip").
#[test]
#[ignore = "figures for docs/benchmarks.md; run with --ignored --nocapture"]
fn roots_figures() {
    // 1. Detection without any scheduled exchange, over 50 seeds.
    let mut after_quiet = Vec::new();
    let mut after_write = Vec::new();
    let mut repaired = Vec::new();
    for seed in 0..50 {
        let run = missed_writes_run(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        after_quiet.push(run.after_quiet);
        after_write.push(run.after_last_write);
        repaired.push(run.repaired_after);
    }
    for list in [&mut after_quiet, &mut after_write, &mut repaired] {
        list.sort_unstable();
    }
    println!(
        "detection after the range went quiet (ms): median {} p90 {} max {} (gossip interval {GOSSIP_MS} ms, quiet horizon {QUIET_MS} ms)",
        percentile(&after_quiet, 50),
        percentile(&after_quiet, 90),
        after_quiet[after_quiet.len() - 1]
    );
    println!(
        "detection after the last missed write (ms): median {} max {}; repaired after the last write (ms): median {} max {}",
        percentile(&after_write, 50),
        after_write[after_write.len() - 1],
        percentile(&repaired, 50),
        repaired[repaired.len() - 1]
    );
    // 2. An hour of every replica in sync (200 keys written first), default interval
    //    (300 s), roots on and off: anti-entropy bytes, and gossip bytes per node per round.
    for gossip_roots in [false, true] {
        let mut sim = cluster(7, gossip_roots, 300_000);
        for i in 0..200 {
            let write = sim.put(i % 3, &format!("key{i}"), "value", Quorum, None);
            assert!(sim.wait_for(write, 5_000).is_ok());
        }
        // Past the first exchange of every pair (never synced: at once) and its jitter.
        sim.run_for(400_000);
        let ae_before = total(&sim, Counter::AntiEntropyBytes);
        let exchanges_before = total(&sim, Counter::AntiEntropyExchangesOk);
        let (gossip_before, rounds_before) = gossip_bytes_and_rounds(&sim);
        sim.run_for(3_600_000);
        let (gossip_after, rounds_after) = gossip_bytes_and_rounds(&sim);
        println!(
            "idle hour, roots {}: anti-entropy {} bytes in {} exchanges ({} skipped); gossip {:.1} bytes per node per round",
            if gossip_roots { "on" } else { "off" },
            total(&sim, Counter::AntiEntropyBytes) - ae_before,
            total(&sim, Counter::AntiEntropyExchangesOk) - exchanges_before,
            total(&sim, Counter::AntiEntropyExchangesSkippedRootsAgree),
            (gossip_after - gossip_before) as f64 / (rounds_after - rounds_before) as f64,
        );
    }
    // 3. Gossip bytes per node per round under writes: one write every 250 ms for ten
    //    minutes (ranges go busy and quiet again, so roots are withdrawn and republished).
    for gossip_roots in [false, true] {
        let mut sim = cluster(8, gossip_roots, 300_000);
        sim.run_for(10_000);
        let (gossip_before, rounds_before) = gossip_bytes_and_rounds(&sim);
        let published_before = total(&sim, Counter::AntiEntropyRootsPublished);
        for i in 0..2400u64 {
            let write = sim.put(
                (i % 3) as usize,
                &format!("key{}", i % 500),
                "value",
                Quorum,
                None,
            );
            sim.wait_for(write, 5_000);
            let next = 10_000 + (i + 1) * 250;
            if sim.now() < next {
                sim.run_for(next - sim.now());
            }
        }
        let (gossip_after, rounds_after) = gossip_bytes_and_rounds(&sim);
        println!(
            "ten minutes of a write every 250 ms, roots {}: gossip {:.1} bytes per node per round over {} rounds; roots published {} times",
            if gossip_roots { "on" } else { "off" },
            (gossip_after - gossip_before) as f64 / (rounds_after - rounds_before) as f64,
            rounds_after - rounds_before,
            total(&sim, Counter::AntiEntropyRootsPublished) - published_before,
        );
    }
}
