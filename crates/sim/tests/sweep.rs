//! Seed sweeps: the properties every randomized run must have, over a few hundred seeds.

use mendkv_sim::{run_seed, FaultConfig, RunReport, SimConfig};

/// Runs `count` seeds from `start` on two threads and returns the failing reports.
fn sweep(start: u64, count: u64, ops: usize, faults: FaultConfig) -> Vec<RunReport> {
    let seeds: Vec<u64> = (start..start + count).collect();
    let mut failures = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = seeds
            .chunks(seeds.len().div_ceil(2))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&seed| {
                            let mut config = SimConfig::new(seed).with_faults(faults);
                            config.ops = ops;
                            run_seed(&config)
                        })
                        .filter(|r| !r.passed())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            failures.extend(handle.join().expect("no panic"));
        }
    });
    failures
}

fn explain(failures: &[RunReport]) -> String {
    failures
        .iter()
        .map(|r| {
            format!(
                "{}\n  replay: {}\n{}",
                r.summary(),
                r.config.replay_command(),
                r.key_histories(2)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// Without faults every seed passes every checker, convergence included.
#[test]
fn no_faults_converge() {
    let failures = sweep(0, 200, 500, FaultConfig::none());
    assert!(failures.is_empty(), "{}", explain(&failures));
}

// Reordering and clock skew keep every message, so replicas must still converge.
#[test]
fn reorder_and_skew_converge() {
    let faults = FaultConfig::parse("reorder,skew").unwrap();
    let failures = sweep(1000, 100, 500, faults);
    assert!(failures.is_empty(), "{}", explain(&failures));
}

// Under loss, partitions, crashes, pauses, reordering and skew: nothing acknowledged is lost,
// nothing unwritten appears, nothing deleted comes back.
#[test]
fn faults_keep_safety() {
    let faults = FaultConfig::parse("loss,reorder,partition,crash,pause,skew").unwrap();
    let failures = sweep(2000, 200, 500, faults);
    assert!(failures.is_empty(), "{}", explain(&failures));
}

// With duplicated messages too. Ignored: a duplicated `Coordinate` makes the actor apply a
// write twice under two dots, and a delete that saw one dot leaves the other alive (see
// `scenarios::duplicate_coordinate_resurrects`).
#[test]
#[ignore = "core bug: Coordinate is not idempotent (duplicate dots resurrect deleted values)"]
fn all_faults_keep_safety() {
    let failures = sweep(3000, 200, 500, FaultConfig::all());
    assert!(failures.is_empty(), "{}", explain(&failures));
}
