//! A deterministic simulator for mendkv clusters, in the spirit of TigerBeetle's VOPR and
//! FoundationDB's simulation.
//!
//! Many [`Node`](mendkv_core::node::Node)s run in one process, driven through the same sans-IO interface the tokio
//! server drives (`handle_*`, `poll_action`, group commit), over a simulated network, clock
//! and disk. Every random choice (delays, losses, faults, the workload) is drawn from
//! ChaCha8 streams derived from one `u64` seed, all state lives in ordered collections, and
//! nothing reads the wall clock, so a seed replays byte for byte: a failure found on seed
//! `X` is reproduced by running seed `X` again, with a full trace.
//!
//! Why: distributed bugs live in the interleavings of messages, timeouts, crashes and
//! fsyncs. A simulator explores thousands of interleavings per minute (a simulated hour
//! runs in seconds) and makes every one of them replayable, which no test against real
//! sockets can do.
//!
//! # Layout
//! - [`event_loop`]: [`Simulation`], the queue of events ordered by virtual time and a
//!   sequence number, building the cluster, stepping, delivering messages, carrying out
//!   each node's actions; the accessors `tests/` use.
//! - [`clock`]: a node's skewed clock.
//! - `disk`: group commit in virtual time, injected fsync failures, the durability audit.
//! - [`fault`]: [`FaultConfig`] (`--faults`) and the fault schedule: crashes, pauses,
//!   partitions, restarts, the heal; the scripted fault API of `tests/scenarios.rs`.
//! - [`network`]: per-message delay, loss, duplication, reordering, partitions.
//! - `clients`: operations invoked (randomly or scripted), answers and timeouts recorded.
//! - [`workload`]: the clients' plans, and the history of outcomes.
//! - [`trace`]: the trace lines and the words it describes objects and messages with.
//! - [`run`]: a run from seed to verdict ([`run_seed`], the heal-and-check phase,
//!   [`RunReport`]).
//! - [`node_options`]: [`NodeOptions`] (`--options`), the swarm that draws them per seed,
//!   and the simulated nodes' [`node_config`].
//! - [`config`]: [`SimConfig`], what defines a run, the swarm's draw, the replay command.
//! - [`checker`]: lost / missed / unexpected / resurrected / stale / converged.
//! - `main.rs`: the seed runner (`cargo run --release -p mendkv-sim -- --seeds 100`).
//!
//! # The models
//! - **Time**: one virtual clock in milliseconds. Each node sees `now + offset + drift`
//!   (skew), which stays monotonic per node; a node's timers are scheduled at the virtual
//!   time its skewed clock reaches `next_deadline()`.
//! - **Configuration**: every node of a run shares one [`NodeOptions`]. The runner draws
//!   the cluster size (1-9) and the options per seed (swarm testing, [`node_options`]);
//!   [`SimConfig::new`] keeps 5 nodes and the core's defaults.
//! - **Disk**: core's `MemoryStorage` keeps synced and pending writes apart. After a node
//!   has handled an input, if it needs a sync and none is in flight, the simulator calls
//!   `begin_sync` and completes it (`storage.sync()` then `finish_sync`) 0-5 ms later in
//!   virtual time (sometimes up to 40 ms), one sync at a time, as the server does; under
//!   `fsync = periodic` a timer per node starts the syncs instead. With the
//!   `fsync` fault some syncs fail: `finish_sync` gets an error and the writes stay
//!   unsynced in the storage (a later crash may lose them).
//! - **Crash**: the node is dropped; its storage keeps what was synced plus a random prefix
//!   of the unsynced writes (a disk may persist some of them anyway). Its peers learn it
//!   is down after 0-20 ms (`handle_peer_status(Down)`: the TCP connection closed), and
//!   messages sent to it meanwhile fail at once (`handle_send_failed`: connection
//!   refused). Messages in flight to it are lost; messages it sent before dying still
//!   arrive. Clients waiting on it get "unknown".
//!   A restart opens a new `Node` on the same storage (a new epoch), tells it every member,
//!   and tells the peers it is up.
//! - **Pause**: the node stops handling anything (a GC pause, SIGSTOP); whatever arrives
//!   waits and is handled, in order, when it resumes. Peers are not told.
//! - **Partitions**: cut directed links drop messages silently (see [`network`]).
//! - **Clients**: each has one operation in flight, sent to a random node; a request to a
//!   crashed node fails at once (connection refused); a client gives up after 5 s.
//!
//! # A run
//! 1. Faults and the workload run until the workload has invoked and finished `ops`
//!    operations.
//! 2. Heal: faults stop, partitions heal, paused nodes resume, crashed nodes restart, the
//!    network stops losing and duplicating; the cluster gets a quiet period.
//! 3. Final reads at level `all` of every key, through random nodes (retried if needed).
//! 4. Another quiet period (without read repair, up to a minute more for anti-entropy to
//!    converge the replicas), then the checkers ([`checker`]).
//!
//! Every run is bounded: at most `max_steps` events and `max_sim_ms` of virtual time; a
//! run that reaches a bound fails and says so, it never hangs.

pub mod checker;
mod clients;
pub mod clock;
pub mod config;
mod disk;
pub mod event_loop;
pub mod fault;
pub mod network;
pub mod node_options;
pub mod run;
pub mod trace;
pub mod workload;

pub use checker::CheckReport;
pub use clock::Clock;
pub use config::{SimConfig, MAX_NODES};
pub use event_loop::Simulation;
pub use fault::{FaultConfig, FAULT_NAMES};
pub use node_options::{node_config, NodeOptions};
pub use run::{run_seed, RunReport};
pub use trace::{describe, describe_object, Names};
pub use workload::{ContextSource, History, Op, OpId, OpKind, Outcome};

use mendkv_core::Millis;

/// The causal bucket: the simulated clients' keys `k0`, `k1`, ...
pub const BUCKET: &str = "sim";
/// The last-write-wins bucket: the keys `l0`, `l1`, ... (every simulated node has it in
/// `lww_default_buckets`, so it is LWW from the first write on every node).
pub const LWW_BUCKET: &str = "simlww";

/// The bucket a simulated key lives in: `l…` keys are LWW, the others causal.
pub fn bucket_of(key: &str) -> &'static str {
    if key.starts_with('l') {
        LWW_BUCKET
    } else {
        BUCKET
    }
}
/// Quiet period after healing, before the final reads and again before the checks. Longer
/// than the request timeout, so every request still in flight has ended.
pub const QUIET_MS: Millis = 5_000;
/// The request timeout of simulated nodes.
pub const REQUEST_TIMEOUT_MS: Millis = 1_000;

/// Keeps `OkResult` reachable from the crate root for users matching on outcomes.
pub type ReadResult = workload::OkResult;
