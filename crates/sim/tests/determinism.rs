//! The simulator's own guarantees: replayable runs, bounded runs, clear rejections.

use mendkv_sim::{run_seed, FaultConfig, NodeOptions, SimConfig};
use std::process::Command;

fn traced(seed: u64, faults: FaultConfig) -> SimConfig {
    let mut config = SimConfig::new(seed).with_faults(faults);
    config.ops = 300;
    config.trace = true;
    config
}

// The same seed gives the same trace and the same verdict, byte for byte.
#[test]
fn same_seed_same_trace() {
    for seed in [1, 42, 9_999] {
        let a = run_seed(&traced(seed, FaultConfig::all()));
        let b = run_seed(&traced(seed, FaultConfig::all()));
        let (ta, tb) = (a.trace.clone().unwrap(), b.trace.clone().unwrap());
        assert!(ta.lines().count() > 1000, "a real run");
        assert!(ta == tb, "seed {seed}: traces differ");
        assert_eq!(a.summary(), b.summary());
    }
}

// Different seeds explore different runs.
#[test]
fn different_seeds_differ() {
    let a = run_seed(&traced(1, FaultConfig::all())).trace.unwrap();
    let b = run_seed(&traced(2, FaultConfig::all())).trace.unwrap();
    assert_ne!(a, b);
}

// Tracing does not change the run: the verdict and figures are the same without it.
#[test]
fn tracing_does_not_perturb() {
    let with = run_seed(&traced(7, FaultConfig::all()));
    let mut config = traced(7, FaultConfig::all());
    config.trace = false;
    let without = run_seed(&config);
    assert_eq!(with.summary(), without.summary());
}

// A run that reaches its step bound stops, fails, and says why.
#[test]
fn step_bound_is_a_failure_not_a_hang() {
    let mut config = SimConfig::new(3);
    config.max_steps = 500;
    let report = run_seed(&config);
    assert!(!report.passed());
    assert!(
        report.bound.as_deref().unwrap().contains("step bound"),
        "{:?}",
        report.bound
    );
    assert!(report.steps <= 500);
}

// Fault lists parse; unknown names and contradictions are rejected with the valid names.
#[test]
fn fault_lists() {
    assert_eq!(FaultConfig::parse("none").unwrap(), FaultConfig::none());
    assert_eq!(FaultConfig::parse("all").unwrap(), FaultConfig::all());
    let some = FaultConfig::parse("crash, loss").unwrap();
    assert!(some.crash && some.loss && !some.partition);
    assert_eq!(some.to_string(), "loss,crash");
    let err = FaultConfig::parse("crash,meteor").unwrap_err();
    assert!(err.contains("meteor") && err.contains("partition"), "{err}");
    assert!(FaultConfig::parse("crash,crash").is_err());
    assert!(FaultConfig::parse("none,crash").is_err());
    assert!(FaultConfig::parse("").is_err());
}

// Configurations the simulator cannot honour are rejected with a reason.
#[test]
fn bad_configs_rejected() {
    let mut config = SimConfig::new(0);
    config.nodes = 0;
    assert!(config.validate().unwrap_err().contains("--nodes"));
    config.nodes = 1;
    assert!(config.validate().unwrap_err().contains("partition"));
    config.faults = FaultConfig::parse("crash").unwrap();
    assert!(config.validate().is_ok());
    config.ops = 0;
    assert!(config.validate().is_err());
}

// The runner ends with `N passed, M failed`, and refuses bad flags with exit code 2.
#[test]
fn runner_cli() {
    let bin = env!("CARGO_BIN_EXE_mendkv-sim");
    let out = Command::new(bin)
        .args(["--seeds", "2", "--ops", "50", "--faults", "none"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().last(),
        Some("2 passed, 0 failed"),
        "{stdout}"
    );
    assert!(out.status.success());

    let out = Command::new(bin)
        .args(["--faults", "meteor"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown fault"));

    let out = Command::new(bin)
        .args(["--nodes", "1", "--faults", "partition"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 2 nodes"));

    let out = Command::new(bin)
        .args(["--seed", "5", "--ops", "30"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("invoke op0"), "a replay prints the trace");
}

// A swarm run is reproduced by its replay line: the explicit cluster size and `--options`
// text it prints give the same trace, byte for byte.
#[test]
fn swarm_replay_line_reproduces_the_run() {
    for seed in [3, 17, 29] {
        let mut swarm = SimConfig::new(seed).swarm(false, false);
        swarm.ops = 200;
        swarm.trace = true;
        let replay = swarm.replay_command();
        assert!(
            replay.contains(&format!("--options {}", swarm.options)),
            "{replay}"
        );
        let mut explicit = SimConfig::new(seed).with_faults(swarm.faults);
        explicit.nodes = swarm.nodes;
        explicit.options = NodeOptions::parse(&swarm.options.to_string()).unwrap();
        explicit.ops = 200;
        explicit.trace = true;
        assert!(
            run_seed(&swarm).trace == run_seed(&explicit).trace,
            "seed {seed}: the replay differs"
        );
    }
}

// The swarm reaches the corners it is meant to: one node and nine, replication factor one
// and five, periodic fsync, sloppy quorum, no read repair, short hint TTLs.
#[test]
fn swarm_covers_its_ranges() {
    let configs: Vec<SimConfig> = (0..300)
        .map(|s| SimConfig::new(s).swarm(false, false))
        .collect();
    let any = |f: &dyn Fn(&SimConfig) -> bool| configs.iter().any(f);
    assert!(any(&|c| c.nodes == 1 && !c.faults.partition));
    assert!(any(&|c| c.nodes == 9));
    assert!(any(&|c| c.options.replication_factor == 1 && c.nodes > 1));
    assert!(any(&|c| c.options.replication_factor == 5));
    assert!(configs
        .iter()
        .all(|c| c.options.replication_factor <= c.nodes));
    assert!(any(&|c| c.options.fsync != NodeOptions::default().fsync));
    assert!(any(&|c| c.options.sloppy_quorum));
    assert!(any(&|c| c.options.read_repair.is_none()));
    assert!(any(&|c| c.options.hint_ttl_ms < 10_000));
    assert!(configs.iter().all(|c| c.validate().is_ok()));
}
