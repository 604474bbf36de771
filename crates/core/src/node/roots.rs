//! Merkle roots on gossip (issue 18): each node publishes, in its gossip state, the roots of
//! the ranges it has left *quiet* (no change to the range's tree for a horizon), and
//! compares them with its replica peers' published roots.
//!
//! - A quiet root that differs from a peer's quiet root of the same range is a proven
//!   divergence: the (range, peer) is marked [`RepairReason::RootsDiffer`] and its exchange
//!   starts at once, whatever the periodic schedule says.
//! - A periodic exchange whose (range, peer) roots agree is skipped (counted), except that a
//!   full exchange still runs every `full_exchange_interval_ms` (and a pair's first one after
//!   a start or a ring change always runs), so a fault in this path can hide a divergence for
//!   that long at most.
//!
//! Like with like: under writes, replicas apply the same write a few milliseconds apart, so
//! their roots differ transiently. A root is published only once the range's tree has not
//! changed for [`Node::roots_quiet_ms`] (two gossip intervals), and withdrawn at the first
//! change after that; only two published (quiet) roots are compared. Two quiet roots that
//! differ mean the replicas hold different data with no write in flight between them (a
//! write still arriving would have kept the receiver busy). A root that travels a little
//! late can at worst start one needless exchange (it finds nothing) or skip one periodic
//! exchange (the next, or the fallback, runs).
//!
//! Encoding, in the existing [`AppValue::Roots`] shape (pairs with strictly increasing
//! first elements, checked by the gossip decoder): first `(0, ring digest)`, a hash of every
//! range end of the ring, then `(1 + index of the range in the ring, 32-bit value)` per quiet
//! range. Indices and 32-bit values are short varints: about 7 bytes a range instead of 20
//! for `(end token, 64-bit root)`, so 48 ranges take about 350 bytes. A peer whose ring digest
//! differs from this node's (a ring change still spreading) is not compared at all. The value
//! is the root XOR a hash of the range start, truncated: two different trees agree by chance
//! once in 2^32 comparisons, which can skip one periodic exchange (the fallback still runs).

use super::Counter;
use super::Node;
use crate::control::RepairReason;
use crate::gossip::{AppKey, AppValue, NodeStatus};
use crate::ring::{key_token, Token, TokenRange};
use crate::storage::Storage;
use crate::{Millis, NodeId};
use std::collections::BTreeMap;

/// What this node knows of one range's root: the range, its root when last read (`None`
/// after a change not read yet), and since when it has not changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RootWatch {
    range: TokenRange,
    root: Option<u64>,
    since: Millis,
}

/// The roots room of anti-entropy's state.
#[derive(Debug, Default)]
pub(super) struct RootsState {
    /// Per range end: the range's root and since when it holds.
    watch: BTreeMap<Token, RootWatch>,
    /// What this node published last: (range end, value), sorted by range end.
    pub(super) published: Vec<(Token, u64)>,
    /// Every range end of the ring, sorted (what the published indices refer to), and its
    /// digest, as of the last publication.
    ring_ends: Vec<Token>,
    ring_digest: u64,
    /// The (mine, theirs) values that last scheduled an exchange of a (range, peer): the
    /// same pair does not schedule another one (a difference schedules one exchange, not one
    /// per gossip message).
    flagged: BTreeMap<(TokenRange, NodeId), (u64, u64)>,
    /// The version of each peer's roots entry compared last.
    seen: BTreeMap<NodeId, u64>,
    /// When [`Node::publish_roots`] next has work (a range going quiet, or one published
    /// that changed and must be withdrawn).
    due_at: Millis,
    /// Compare every peer's roots again (this node's published set changed).
    compare_all: bool,
}

/// A range's published value: its root with its start mixed in, 32 bits.
fn published_value(range: TokenRange, root: u64) -> u64 {
    (root
        ^ range
            .start
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29))
        & 0xffff_ffff
}

/// A digest of the ring's range ends (FNV-1a over their bytes).
fn ring_digest(ends: &[Token]) -> u64 {
    ends.iter()
        .flat_map(|end| end.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The gossip form of a published list (module docs).
fn encode(published: &[(Token, u64)], ring_ends: &[Token], digest: u64) -> Vec<(u64, u64)> {
    std::iter::once((0, digest))
        .chain(published.iter().filter_map(|(end, value)| {
            let index = ring_ends.binary_search(end).ok()?;
            Some((index as u64 + 1, *value))
        }))
        .collect()
}

/// A peer's published list as (range end, value), if its ring is this node's.
fn decode(roots: &[(u64, u64)], ring_ends: &[Token], digest: u64) -> Vec<(Token, u64)> {
    match roots.split_first() {
        Some((&(0, theirs), rest)) if theirs == digest => rest
            .iter()
            .filter_map(|(index, value)| {
                let end = *ring_ends.get(usize::try_from(index.checked_sub(1)?).ok()?)?;
                Some((end, *value))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The value a sorted published list holds for a range end.
fn lookup(roots: &[(Token, u64)], end: Token) -> Option<u64> {
    roots
        .binary_search_by_key(&end, |(e, _)| *e)
        .ok()
        .map(|i| roots[i].1)
}

impl<S: Storage> Node<S> {
    /// A range whose tree has not changed for this long is quiet: its root is published and
    /// compared. Two gossip intervals: longer than replication takes (milliseconds), short
    /// enough that a divergence is found within a few intervals of the writes stopping.
    pub(super) fn roots_quiet_ms(&self) -> Millis {
        2 * self.config.gossip.interval_ms.max(1)
    }

    fn roots_enabled(&self) -> bool {
        self.config.anti_entropy.gossip_roots && self.config.anti_entropy.enabled
    }

    /// Roots are compared only between normal members outside cluster changes: while
    /// replica sets move, a peer's range may not be this node's.
    fn roots_comparable(&self) -> bool {
        self.roots_enabled()
            && self.membership.layout.active().is_none()
            && self.own_state() == NodeStatus::Normal
    }

    /// Records a write in the trees, and that its range just changed (at this call's time).
    pub(super) fn record_tree_write(
        &mut self,
        bucket: &str,
        key: &[u8],
        old_digest: Option<u64>,
        new_digest: Option<u64>,
    ) {
        let token = key_token(bucket, key);
        let range = self
            .anti_entropy
            .trees
            .record_write_at(token, bucket, key, old_digest, new_digest);
        if let Some(range) = range.filter(|_| old_digest != new_digest) {
            self.note_range_changed(range);
        }
    }

    fn note_range_changed(&mut self, range: TokenRange) {
        if !self.roots_enabled() {
            return;
        }
        let now = self.clock;
        let quiet_ms = self.roots_quiet_ms();
        let roots = &mut self.anti_entropy.roots;
        roots.watch.insert(
            range.end,
            RootWatch {
                range,
                root: None,
                since: now,
            },
        );
        // A published root is now stale: withdraw it at once. Otherwise it is due when the
        // range has been quiet long enough.
        let due = if lookup(&roots.published, range.end).is_some() {
            now
        } else {
            now.saturating_add(quiet_ms)
        };
        roots.due_at = roots.due_at.min(due);
    }

    /// When [`Node::publish_roots`] next has work.
    pub(super) fn roots_deadline(&self) -> Millis {
        if self.roots_enabled() {
            self.anti_entropy.roots.due_at
        } else {
            Millis::MAX
        }
    }

    /// Reads every ready tree's root (changes the write path did not report, such as a
    /// tree rebuilt from a scan, count from now), and publishes the quiet ones when the set
    /// changed. Runs when due and on every gossip round.
    pub(super) fn publish_roots(&mut self, now: Millis) {
        if !self.roots_enabled() {
            return;
        }
        if now < self.anti_entropy.roots.due_at && now < self.cluster.gossiper.next_deadline() {
            return;
        }
        let quiet_ms = self.roots_quiet_ms();
        let ranges: Vec<TokenRange> = self.anti_entropy.trees.ranges().collect();
        let mut watch = std::mem::take(&mut self.anti_entropy.roots.watch);
        watch.retain(|end, w| {
            ranges.iter().any(|r| r.end == *end && *r == w.range)
                && self.anti_entropy.trees.is_ready(w.range)
        });
        let mut quiet = Vec::new();
        let mut due_at = Millis::MAX;
        for range in ranges {
            if !self.anti_entropy.trees.is_ready(range) {
                continue;
            }
            let Some(tree) = self.anti_entropy.trees.tree_mut(range) else {
                continue;
            };
            let root = tree.root();
            let entry = watch.entry(range.end).or_insert(RootWatch {
                range,
                root: Some(root),
                since: now,
            });
            match entry.root {
                // A change the write path noted: it happened at `since`.
                None => entry.root = Some(root),
                Some(known) if known != root => {
                    entry.root = Some(root);
                    entry.since = now;
                }
                Some(_) => {}
            }
            let quiet_at = entry.since.saturating_add(quiet_ms);
            if now >= quiet_at {
                quiet.push((range.end, published_value(range, root)));
            } else {
                due_at = due_at.min(quiet_at);
            }
        }
        self.anti_entropy.roots.watch = watch;
        self.anti_entropy.roots.due_at = due_at;
        // Ranges are keyed by their end: the list is sorted and its ends distinct.
        quiet.sort_unstable_by_key(|(end, _)| *end);
        quiet.dedup_by_key(|(end, _)| *end);
        let mut ring_ends: Vec<Token> = self
            .membership
            .layout
            .ranges()
            .iter()
            .map(|(range, _, _)| range.end)
            .collect();
        ring_ends.sort_unstable();
        ring_ends.dedup();
        let digest = ring_digest(&ring_ends);
        if quiet == self.anti_entropy.roots.published
            && digest == self.anti_entropy.roots.ring_digest
        {
            return;
        }
        let encoded = encode(&quiet, &ring_ends, digest);
        self.anti_entropy.roots.ring_ends = ring_ends;
        self.anti_entropy.roots.ring_digest = digest;
        // Unhurried: a change of the roots waits for the next round (faster rounds after
        // every change would double gossip under writes).
        let published = match self.cluster.gossiper.set_local_unhurried(
            AppKey::TreeRoots,
            AppValue::Roots(encoded),
            now,
        ) {
            Ok(_) => quiet,
            Err(_) => {
                // Too many ranges for one gossip entry: publish nothing rather than a stale
                // set (the periodic exchanges run as without roots).
                self.stats.increment(Counter::AntiEntropyRootsUnpublishable);
                let _ = self.cluster.gossiper.set_local_unhurried(
                    AppKey::TreeRoots,
                    AppValue::Roots(Vec::new()),
                    now,
                );
                Vec::new()
            }
        };
        self.anti_entropy.roots.published = published;
        self.anti_entropy.roots.compare_all = true;
        self.stats.increment(Counter::AntiEntropyRootsPublished);
    }

    /// Compares this node's published roots with each replica peer's whose roots changed
    /// since the last look (every peer's when this node's changed): a difference on a range
    /// both left quiet schedules that (range, peer) exchange at once.
    pub(super) fn compare_roots(&mut self, now: Millis) {
        if !self.roots_enabled() {
            return;
        }
        // While the replica sets move, peers' ranges may not be this node's (and a joining
        // node's data comes by streaming).
        if !self.roots_comparable() {
            return;
        }
        let compare_all = std::mem::take(&mut self.anti_entropy.roots.compare_all);
        let mut changed: Vec<NodeId> = Vec::new();
        for (peer, state) in self.cluster.gossiper.members() {
            // A member gossip has not described yet counts as normal (`peer_state`).
            if peer == self.id() || state.status().is_some_and(|s| s != NodeStatus::Normal) {
                continue;
            }
            let version = state.version_of(AppKey::TreeRoots).unwrap_or(0);
            if compare_all || self.anti_entropy.roots.seen.get(peer) != Some(&version) {
                changed.push(peer.clone());
            }
        }
        if changed.is_empty() {
            return;
        }
        let targets = self.membership.layout.repair_targets(self.id());
        if compare_all {
            // Bounded by the targets and the members tracked now.
            self.anti_entropy
                .roots
                .flagged
                .retain(|target, _| targets.contains(target));
            let gossiper = &self.cluster.gossiper;
            self.anti_entropy
                .roots
                .seen
                .retain(|peer, _| gossiper.member(peer).is_some());
        }
        for peer in &changed {
            let Some(state) = self.cluster.gossiper.member(peer) else {
                continue;
            };
            let version = state.version_of(AppKey::TreeRoots).unwrap_or(0);
            let theirs = decode(
                state.tree_roots().unwrap_or(&[]),
                &self.anti_entropy.roots.ring_ends,
                self.anti_entropy.roots.ring_digest,
            );
            self.anti_entropy.roots.seen.insert(peer.clone(), version);
            for (range, target_peer) in targets.iter().filter(|(_, p)| p == peer) {
                let (Some(mine), Some(their)) = (
                    lookup(&self.anti_entropy.roots.published, range.end),
                    lookup(&theirs, range.end),
                ) else {
                    continue;
                };
                let target = (*range, target_peer.clone());
                if mine == their {
                    self.anti_entropy.roots.flagged.remove(&target);
                    continue;
                }
                if self.anti_entropy.roots.flagged.get(&target) == Some(&(mine, their)) {
                    continue;
                }
                self.anti_entropy
                    .roots
                    .flagged
                    .insert(target.clone(), (mine, their));
                self.anti_entropy
                    .repair_queue
                    .mark_matching(RepairReason::RootsDiffer, now, |t| *t == target);
                self.stats.increment(Counter::AntiEntropyRootsDiffer);
            }
        }
    }

    /// Whether a periodic exchange of `target` may be skipped now: this node's root of the
    /// range is quiet and published, the peer's published root equals it, and the pair's
    /// last full exchange is younger than `full_exchange_interval_ms`.
    pub(super) fn roots_agree(&self, now: Millis, target: &(TokenRange, NodeId)) -> bool {
        if !self.roots_comparable() {
            return false;
        }
        let (range, peer) = target;
        if self.peer_state(peer) != NodeStatus::Normal {
            return false;
        }
        // A pair never fully exchanged since this node started (or since a ring change made
        // the range) has its full exchange first: roots only vouch between full exchanges.
        let Some(&last_full) = self.anti_entropy.converged_at.get(target) else {
            return false;
        };
        if now.saturating_sub(last_full) >= self.config.anti_entropy.full_exchange_interval_ms {
            return false;
        }
        let roots = &self.anti_entropy.roots;
        // Quiet now (not only when last published: a change since then withdraws it soon).
        let quiet_now = roots.watch.get(&range.end).is_some_and(|w| {
            w.range == *range
                && w.root.is_some()
                && now.saturating_sub(w.since) >= self.roots_quiet_ms()
        });
        if !quiet_now {
            return false;
        }
        let Some(mine) = lookup(&roots.published, range.end) else {
            return false;
        };
        let theirs = self
            .cluster
            .gossiper
            .member(peer)
            .and_then(|state| state.tree_roots())
            .map(|list| decode(list, &roots.ring_ends, roots.ring_digest))
            .and_then(|list| lookup(&list, range.end));
        theirs == Some(mine)
    }
}
