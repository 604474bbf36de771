//! What defines a run: [`SimConfig`] (seed, size, node options, operations, faults,
//! bounds), the swarm's draw of size and options, its validation and its replay command.

use crate::fault::FaultConfig;
use crate::node_options::{NodeOptions, SWARM_MAX_NODES};
use mendkv_core::Millis;
use rand::Rng;
use std::fmt::Write as _;

/// Everything that defines a run. Together with the commit, `seed` and these fields
/// determine the run exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    /// The configuration every node runs with (drawn per seed by [`SimConfig::swarm`]).
    pub options: NodeOptions,
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
    /// Five nodes with the core's default configuration, 1,000 operations, every fault,
    /// convergence required.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 5,
            options: NodeOptions::default(),
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

    /// Swarm testing: draws the cluster size (1-9, unless `keep_nodes`) and the node
    /// options (unless `keep_options`) from the seed's swarm stream. A one-node cluster has
    /// no link to cut, so its draw turns the partition fault off (the replay line then
    /// lists the faults without it).
    pub fn swarm(mut self, keep_nodes: bool, keep_options: bool) -> Self {
        let mut rng = NodeOptions::swarm_rng(self.seed);
        let nodes = rng.gen_range(1..=SWARM_MAX_NODES);
        if !keep_nodes {
            self.nodes = nodes;
            if nodes < 2 {
                self.faults.partition = false;
            }
        }
        let options = NodeOptions::swarm(&mut rng, self.nodes);
        if !keep_options {
            self.options = options;
        }
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
        if self.options.replication_factor == 0 {
            return Err("--options rf must be at least 1".into());
        }
        if self.max_steps == 0 {
            return Err("--max-steps must be at least 1".into());
        }
        Ok(())
    }

    /// The command line that replays this run. It spells out the cluster size and every
    /// node option, so it reproduces a swarm run without the swarm (and one knob can be
    /// changed to see whether a failure depends on it).
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run --release -p mendkv-sim -- --seed {} --nodes {} --options {} --ops {} --faults {}",
            self.seed, self.nodes, self.options, self.ops, self.faults
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
