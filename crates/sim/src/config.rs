//! What defines a run: [`SimConfig`] (seed, size, operations, faults, bounds) and its
//! validation and replay command.

use crate::fault::FaultConfig;
use mendkv_core::Millis;
use std::fmt::Write as _;

/// Everything that defines a run. Together with the commit, `seed` and these fields
/// determine the run exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    /// Operations the workload invokes.
    pub ops: usize,
    pub faults: FaultConfig,
    /// Bound on events handled in one run.
    pub max_steps: u64,
    /// Bound on virtual time of one run.
    pub max_sim_ms: Millis,
    /// Keep a line-per-event trace.
    pub trace: bool,
    /// Fail the seed when replicas have not converged at the end.
    pub require_convergence: bool,
}

/// Largest cluster the runner accepts.
pub const MAX_NODES: usize = 32;

impl SimConfig {
    /// Five nodes, 1,000 operations, every fault, convergence required.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 5,
            ops: 1000,
            faults: FaultConfig::all(),
            max_steps: 2_000_000,
            max_sim_ms: 3_600_000,
            trace: false,
            require_convergence: true,
        }
    }

    pub fn with_faults(mut self, faults: FaultConfig) -> Self {
        self.faults = faults;
        self
    }

    /// Rejects what the simulator cannot honour, with a reason.
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return Err(format!(
                "--nodes must be 1..={MAX_NODES} (got {})",
                self.nodes
            ));
        }
        if self.ops == 0 {
            return Err("--ops must be at least 1".into());
        }
        if self.faults.partition && self.nodes < 2 {
            return Err("the partition fault needs at least 2 nodes".into());
        }
        if self.max_steps == 0 {
            return Err("--max-steps must be at least 1".into());
        }
        Ok(())
    }

    /// The command line that replays this run.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run --release -p mendkv-sim -- --seed {} --nodes {} --ops {} --faults {}",
            self.seed, self.nodes, self.ops, self.faults
        );
        if !self.require_convergence {
            cmd.push_str(" --no-require-convergence");
        }
        if self.max_steps != SimConfig::new(0).max_steps {
            write!(cmd, " --max-steps {}", self.max_steps).ok();
        }
        cmd
    }
}
