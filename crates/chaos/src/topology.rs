//! The network: one Linux network namespace per node, each with its own address on a
//! bridge that lives in a "hub" namespace of its own, where the harness's clients run too.
//! Nothing touches the root namespace's interfaces or routes, so runs in parallel (and
//! other tests on 127.0.0.1) never collide: every namespace has the same private subnet.
//!
//! Partitions are nftables rules in the receiving node's namespace (`input` drops packets
//! from the cut-off addresses), so established TCP connections stall exactly as they would
//! between hosts, and the client (the hub's address) is never cut off.
//!
//! Names carry the harness's pid (`mkchaos-<pid>-<run>-...`): at start, namespaces of a
//! harness that is no longer alive (a crashed or killed run) are swept.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

const NAME_PREFIX: &str = "mkchaos-";
/// Data directories of runs are `<temp dir>/mendkv-chaos-<pid>-...`, swept the same way.
pub const DATA_PREFIX: &str = "mendkv-chaos-";
/// The nftables table the harness owns in each node's namespace.
const NFT_TABLE: &str = "mendkv_chaos";

/// The hub's address: where clients come from.
pub const HUB_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// The address of node `index` (0-based): 10.77.0.11, .12, ...
pub fn node_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 11 + index as u8)
}

/// Runs a command to its end; its stderr becomes the error.
pub fn run_command(program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing to {program}"))?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn command_output(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Why this machine cannot run the harness (not root, no `ip`, no `nft`), if it cannot.
pub fn missing_requirements() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    for (program, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = Command::new(program)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("`{program}` is missing (Debian package {package})"));
        }
    }
    None
}

fn namespaces() -> Vec<String> {
    command_output("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// SIGKILLs every process living in `namespace` (never the harness itself).
fn kill_processes_in(namespace: &str) {
    let own = std::process::id();
    for pid in command_output("ip", &["netns", "pids", namespace])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        if pid as u32 != own {
            // SAFETY: kill has no memory preconditions; a stale pid only fails.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn delete_namespace(namespace: &str) {
    kill_processes_in(namespace);
    let _ = run_command("ip", &["netns", "delete", namespace], None);
}

/// Whether a name `<prefix><pid>-...` belongs to a harness that is no longer running.
fn abandoned(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
    owner.is_some_and(|pid| pid != std::process::id() && !pid_alive(pid))
}

/// Deletes the namespaces (and kills the processes in them) and the data directories left
/// by harnesses that are no longer running; returns their names.
pub fn sweep_leftovers() -> Vec<String> {
    let mut swept = Vec::new();
    for namespace in namespaces() {
        if abandoned(&namespace, NAME_PREFIX) {
            delete_namespace(&namespace);
            swept.push(namespace);
        }
    }
    let temp = std::env::temp_dir();
    for entry in std::fs::read_dir(&temp).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if abandoned(&name, DATA_PREFIX) && std::fs::remove_dir_all(entry.path()).is_ok() {
            swept.push(entry.path().display().to_string());
        }
    }
    swept
}

/// The namespaces of one run. Dropping it deletes them all (which takes their veths, the
/// bridge and the nftables tables with them) after killing what runs inside.
pub struct Topology {
    pub hub: String,
    pub node_namespaces: Vec<String>,
}

impl Topology {
    /// Creates the hub with its bridge and `nodes` node namespaces. `run_tag` must be unique
    /// within this process.
    pub fn create(run_tag: &str, nodes: usize) -> Result<Topology> {
        let base = format!("{NAME_PREFIX}{}-{run_tag}", std::process::id());
        let mut topology = Topology {
            hub: format!("{base}-hub"),
            node_namespaces: Vec::new(),
        };
        // On an error part-way the Drop of `topology` removes what was made.
        let hub = topology.hub.clone();
        run_command("ip", &["netns", "add", &hub], None)?;
        let ip_hub = |args: &[&str]| {
            let mut all = vec!["-n", hub.as_str()];
            all.extend_from_slice(args);
            run_command("ip", &all, None)
        };
        ip_hub(&["link", "set", "lo", "up"])?;
        ip_hub(&["link", "add", "br0", "type", "bridge"])?;
        ip_hub(&["addr", "add", &format!("{HUB_ADDRESS}/24"), "dev", "br0"])?;
        ip_hub(&["link", "set", "br0", "up"])?;
        for index in 0..nodes {
            let namespace = format!("{base}-n{}", index + 1);
            run_command("ip", &["netns", "add", &namespace], None)?;
            topology.node_namespaces.push(namespace.clone());
            let port = format!("port{}", index + 1);
            ip_hub(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
            ])?;
            ip_hub(&["link", "set", &port, "master", "br0", "up"])?;
            let ip_node = |args: &[&str]| {
                let mut all = vec!["-n", namespace.as_str()];
                all.extend_from_slice(args);
                run_command("ip", &all, None)
            };
            ip_node(&["link", "set", "lo", "up"])?;
            ip_node(&[
                "addr",
                "add",
                &format!("{}/24", node_address(index)),
                "dev",
                "eth0",
            ])?;
            ip_node(&["link", "set", "eth0", "up"])?;
            nft(
                &namespace,
                &format!(
                    "table inet {NFT_TABLE} {{\n  chain input {{ type filter hook input priority 0; policy accept; }}\n}}\n"
                ),
            )?;
        }
        Ok(topology)
    }

    /// Drops, in `to`'s namespace, every packet from `from`, for each (from, to).
    pub fn cut(&self, links: &[(usize, usize)]) -> Result<()> {
        for (to, namespace) in self.node_namespaces.iter().enumerate() {
            let sources: Vec<String> = links
                .iter()
                .filter(|(_, t)| *t == to)
                .map(|(from, _)| node_address(*from).to_string())
                .collect();
            if sources.is_empty() {
                continue;
            }
            nft(
                namespace,
                &format!(
                    "add rule inet {NFT_TABLE} input ip saddr {{ {} }} drop\n",
                    sources.join(", ")
                ),
            )?;
        }
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> Result<()> {
        for namespace in &self.node_namespaces {
            nft(namespace, &format!("flush chain inet {NFT_TABLE} input\n"))?;
        }
        Ok(())
    }

    /// Moves the calling thread into the hub namespace (threads it starts afterwards, such as
    /// a tokio runtime's, are born there); the guard moves it back.
    pub fn enter_hub(&self) -> Result<NamespaceGuard> {
        let original = std::fs::File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?;
        let hub = std::fs::File::open(format!("/var/run/netns/{}", self.hub))
            .with_context(|| format!("opening namespace {}", self.hub))?;
        set_namespace(&hub)?;
        Ok(NamespaceGuard { original })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for namespace in &self.node_namespaces {
            delete_namespace(namespace);
        }
        let _ = run_command("ip", &["netns", "delete", &self.hub], None);
    }
}

fn nft(namespace: &str, script: &str) -> Result<()> {
    run_command(
        "ip",
        &["netns", "exec", namespace, "nft", "-f", "-"],
        Some(script),
    )
}

fn set_namespace(file: &std::fs::File) -> Result<()> {
    // SAFETY: setns on a namespace file descriptor we own; it changes only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Returns the thread to the namespace it was in before [`Topology::enter_hub`].
pub struct NamespaceGuard {
    original: std::fs::File,
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let _ = set_namespace(&self.original);
    }
}
