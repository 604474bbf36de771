//! The node's counters: one table indexed by [`Counter`], each entry carrying its
//! Prometheus name, help text and labels, so a driver exports every counter in one loop and
//! a new counter is one new variant (and its line in [`Counter::spec`]).

use crate::hinted_handoff::DropReason;

/// How a counter appears in `/metrics`: a Prometheus counter (the exporter adds `_total`)
/// named `name`, with these labels; counters sharing a name form one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterSpec {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
}

macro_rules! counters {
    ($($variant:ident => $name:literal, $help:literal, [$(($key:literal, $value:literal)),*];)*) => {
        /// Something the node counts (SPEC section 5 names most of them).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Counter {
            $($variant,)*
        }

        impl Counter {
            /// Every counter, in table order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// Its metric name, help text and labels.
            pub fn spec(self) -> CounterSpec {
                match self {
                    $(Counter::$variant => CounterSpec {
                        name: $name,
                        help: $help,
                        labels: &[$(($key, $value)),*],
                    },)*
                }
            }
        }
    };
}

counters! {
    LocalWrites => "mendkv_local_writes", "Objects written to this node's storage", [];
    Syncs => "mendkv_storage_fsyncs", "Group-commit fsyncs", [];
    InvalidPeerRequests => "mendkv_peer_requests_invalid",
        "Peer requests refused as invalid (bad bucket, key, value or version vector)", [];
    StorageErrors => "mendkv_storage_errors",
        "Storage operations that failed (and acknowledgements failed with them)", [];
    RequestsTimedOut => "mendkv_coordinator_timeouts",
        "Requests that timed out at this coordinator", [];
    RequestsOverloaded => "mendkv_coordinator_overloaded",
        "Requests refused because too many were in flight at this coordinator", [];
    ReadRepairRepaired => "mendkv_read_repair",
        "Inconsistent reads found, by what became of their repair", [("outcome", "repaired")];
    ReadRepairFailed => "mendkv_read_repair",
        "Inconsistent reads found, by what became of their repair", [("outcome", "failed")];
    ReadRepairSkipped => "mendkv_read_repair",
        "Inconsistent reads found, by what became of their repair", [("outcome", "skipped")];
    ReadRepairWritesOk => "mendkv_repairs",
        "Repair writes by mechanism and outcome (success rate = ok / all)",
        [("mechanism", "read_repair"), ("outcome", "ok")];
    ReadRepairWritesFailed => "mendkv_repairs",
        "Repair writes by mechanism and outcome (success rate = ok / all)",
        [("mechanism", "read_repair"), ("outcome", "failed")];
    HintWritesOk => "mendkv_repairs",
        "Repair writes by mechanism and outcome (success rate = ok / all)",
        [("mechanism", "hinted_handoff"), ("outcome", "ok")];
    HintWritesFailed => "mendkv_repairs",
        "Repair writes by mechanism and outcome (success rate = ok / all)",
        [("mechanism", "hinted_handoff"), ("outcome", "failed")];
    AntiEntropyExchangesOk => "mendkv_repairs",
        "Repair writes by mechanism and outcome (success rate = ok / all)",
        [("mechanism", "anti_entropy"), ("outcome", "ok")];
    AntiEntropyExchangesFailed => "mendkv_repairs",
        "Repair writes by mechanism and outcome (success rate = ok / all)",
        [("mechanism", "anti_entropy"), ("outcome", "failed")];
    HintsStored => "mendkv_hints_stored", "Hints stored (coalesced ones included)", [];
    HintsDelivered => "mendkv_hints_delivered", "Hints delivered and acknowledged durably", [];
    HintsExpired => "mendkv_hints_expired", "Hints dropped at their TTL", [];
    HintsDroppedNodeBudget => "mendkv_hints_dropped", "Hints not kept, by reason",
        [("reason", "node_budget")];
    HintsDroppedTotalBudget => "mendkv_hints_dropped", "Hints not kept, by reason",
        [("reason", "total_budget")];
    HintsDroppedUnknownTarget => "mendkv_hints_dropped", "Hints not kept, by reason",
        [("reason", "unknown_target")];
    HintsDroppedCorrupt => "mendkv_hints_dropped", "Hints not kept, by reason",
        [("reason", "corrupt")];
    HintsDroppedDisabled => "mendkv_hints_dropped", "Hints not kept, by reason",
        [("reason", "disabled")];
    HintsDroppedRemoved => "mendkv_hints_dropped", "Hints not kept, by reason",
        [("reason", "removed")];
    HintsHandedOver => "mendkv_hints_handed_over",
        "Hints a decommissioned node gave to another node before it left", [];
    StreamingKeysIn => "mendkv_streaming_keys",
        "Keys moved by streaming during cluster changes, by direction (in: pulled here)",
        [("direction", "in")];
    StreamingKeysOut => "mendkv_streaming_keys",
        "Keys moved by streaming during cluster changes, by direction (in: pulled here)",
        [("direction", "out")];
    StreamingBytesIn => "mendkv_streaming_bytes",
        "Bytes of streaming exchanges during cluster changes, by direction",
        [("direction", "in")];
    StreamingBytesOut => "mendkv_streaming_bytes",
        "Bytes of streaming exchanges during cluster changes, by direction",
        [("direction", "out")];
    StreamingRangesDone => "mendkv_streaming_ranges",
        "Ranges this node finished pulling during cluster changes", [];
    CleanupKeys => "mendkv_cleanup_keys",
        "Keys deleted because this node no longer owns their range (after a cluster change)", [];
    PeerMessagesFromRemoved => "mendkv_peer_messages_from_removed",
        "Messages from a node removed from the cluster (remove-node) that came back with its old data: its requests and replies are dropped, its gossip is heard only about itself", [];
    ClusterChanges => "mendkv_cluster_changes",
        "Cluster changes (join, decommission, removal) this node completed as their owner", [];
    AntiEntropyKeysRepaired => "mendkv_anti_entropy_keys_repaired",
        "Keys whose local version changed through anti-entropy", [];
    AntiEntropyBytes => "mendkv_anti_entropy_bytes",
        "Bytes of anti-entropy exchanges this node drove (both directions)", [];
    AntiEntropyExchangesSkippedRootsAgree => "mendkv_anti_entropy_exchanges_skipped",
        "Periodic anti-entropy exchanges skipped, by reason (roots_agree: this node's and the peer's quiet Merkle roots of the range, published on gossip, were equal)",
        [("reason", "roots_agree")];
    AntiEntropyRootsDiffer => "mendkv_anti_entropy_roots_differ",
        "(range, replica peer) pairs whose quiet Merkle roots on gossip differed from this node's; each scheduled an exchange at once", [];
    AntiEntropyRootsPublished => "mendkv_anti_entropy_roots_published",
        "Times this node published a changed set of quiet Merkle roots on gossip", [];
    AntiEntropyRootsUnpublishable => "mendkv_anti_entropy_roots_unpublishable",
        "Times the quiet roots did not fit in one gossip entry (none were published)", [];
    TreeRebuilds => "mendkv_anti_entropy_tree_rebuilds",
        "Merkle trees built by a scan (every start, and new ranges after ring changes)", [];
    TreeChecksOk => "mendkv_anti_entropy_tree_verifications",
        "Merkle trees checked against a scan of their data, by outcome (ok, mismatch)",
        [("outcome", "ok")];
    TreeChecksMismatch => "mendkv_anti_entropy_tree_verifications",
        "Merkle trees checked against a scan of their data, by outcome (ok, mismatch)",
        [("outcome", "mismatch")];
    TombstonesReaped => "mendkv_tombstones_reaped",
        "Tombstones purged once every replica was known to hold them", [];
    EpochsLearnedFromPeers => "mendkv_epochs_learned_from_peers",
        "Times gossip showed this node had run under a higher epoch (a lost data directory)", [];
    SiblingsRefused => "mendkv_siblings_refused",
        "Client writes refused because they would exceed the bucket's max_siblings (409)", [];
    SiblingsWarned => "mendkv_siblings_warned",
        "Client writes that left a key with at least the bucket's warn_siblings siblings", [];
    BucketPropsChanges => "mendkv_bucket_props_changes",
        "Bucket property changes made through this node", [];
    BucketPropsInvalid => "mendkv_bucket_props_invalid",
        "Bucket property tables that could not be read (a peer's gossip or the stored record)", [];
}

impl Counter {
    /// The counter of hints dropped for `reason`.
    pub fn hints_dropped(reason: DropReason) -> Counter {
        match reason {
            DropReason::NodeBudget => Counter::HintsDroppedNodeBudget,
            DropReason::TotalBudget => Counter::HintsDroppedTotalBudget,
            DropReason::UnknownTarget => Counter::HintsDroppedUnknownTarget,
            DropReason::Corrupt => Counter::HintsDroppedCorrupt,
            DropReason::Disabled => Counter::HintsDroppedDisabled,
            DropReason::Removed => Counter::HintsDroppedRemoved,
        }
    }
}

/// The values of every [`Counter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    values: Vec<u64>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            values: vec![0; Counter::ALL.len()],
        }
    }
}

impl Counters {
    pub fn add(&mut self, counter: Counter, n: u64) {
        let value = &mut self.values[counter as usize];
        *value = value.saturating_add(n);
    }

    pub fn increment(&mut self, counter: Counter) {
        self.add(counter, 1);
    }

    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }

    /// Every counter with its value, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        Counter::ALL.iter().map(|c| (*c, self.get(*c)))
    }
}

impl std::ops::Index<Counter> for Counters {
    type Output = u64;

    fn index(&self, counter: Counter) -> &u64 {
        &self.values[counter as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is in variant order (so `as usize` indexes it), and counters that share a
    /// metric name share its help text and differ in their labels.
    #[test]
    fn the_table_is_consistent() {
        for (index, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index);
            let spec = counter.spec();
            assert!(spec.name.starts_with("mendkv_") && !spec.name.ends_with("_total"));
        }
        for a in Counter::ALL {
            for b in Counter::ALL.iter().filter(|b| *b != a) {
                let (sa, sb) = (a.spec(), b.spec());
                if sa.name == sb.name {
                    assert_eq!(sa.help, sb.help, "{a:?} {b:?}");
                    assert_ne!(sa.labels, sb.labels, "{a:?} {b:?}");
                }
            }
        }
    }
}
