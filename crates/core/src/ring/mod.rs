//! Consistent hashing: 64-bit tokens, virtual nodes, preference lists and token ranges.
//!
//! A key's token is the xxh3-64 hash of `bucket \0 key`. Each node owns `vnodes` tokens,
//! `xxh3_64("{node_id}#{i}")`, so every node derives the same ring from the member list
//! alone. A key's preference list is the first `replication_factor` distinct nodes met
//! walking clockwise from its token.

use crate::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use xxhash_rust::xxh3::xxh3_64;

pub type Token = u64;

/// The token of a key.
pub fn key_token(bucket: &str, key: &[u8]) -> Token {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(bucket.as_bytes());
    hasher.update(&[0]);
    hasher.update(key);
    hasher.digest()
}

/// The tokens a node owns.
pub fn node_tokens(node: &NodeId, vnodes: u16) -> Vec<Token> {
    (0..vnodes)
        .map(|i| xxh3_64(format!("{}#{i}", node.as_str()).as_bytes()))
        .collect()
}

/// The half-open-on-the-left range `(start, end]` of tokens that a ring position owns;
/// `start == end` means the whole ring (a ring with one token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TokenRange {
    pub start: Token,
    pub end: Token,
}

impl TokenRange {
    pub fn contains(&self, token: Token) -> bool {
        if self.start == self.end {
            return true;
        }
        if self.start < self.end {
            token > self.start && token <= self.end
        } else {
            token > self.start || token <= self.end
        }
    }
}

/// An immutable ring; membership changes build a new one and swap it in whole.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// Sorted by token; ties (astronomically unlikely) broken by node id.
    positions: Vec<(Token, NodeId)>,
    nodes: BTreeSet<NodeId>,
    replication_factor: usize,
}

impl Ring {
    pub fn new<'a>(
        members: impl IntoIterator<Item = &'a NodeId>,
        vnodes: u16,
        replication_factor: usize,
    ) -> Self {
        let nodes: BTreeSet<NodeId> = members.into_iter().cloned().collect();
        let mut positions: Vec<(Token, NodeId)> = nodes
            .iter()
            .flat_map(|n| {
                node_tokens(n, vnodes)
                    .into_iter()
                    .map(move |t| (t, n.clone()))
            })
            .collect();
        positions.sort();
        Ring {
            positions,
            nodes,
            replication_factor,
        }
    }

    pub fn nodes(&self) -> &BTreeSet<NodeId> {
        &self.nodes
    }

    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    /// The number of replicas a key really has: RF, or fewer while the cluster is smaller.
    pub fn effective_replication(&self) -> usize {
        self.replication_factor.min(self.nodes.len())
    }

    /// The first `replication_factor` distinct nodes clockwise from `token`.
    pub fn preference_list(&self, token: Token) -> Vec<NodeId> {
        let wanted = self.effective_replication();
        let mut list: Vec<NodeId> = Vec::with_capacity(wanted);
        if wanted == 0 {
            return list;
        }
        let start = self.positions.partition_point(|(t, _)| *t < token);
        let len = self.positions.len();
        for offset in 0..len {
            let (_, node) = &self.positions[(start + offset) % len];
            if !list.contains(node) {
                list.push(node.clone());
                if list.len() == wanted {
                    break;
                }
            }
        }
        list
    }

    /// Every distinct node in ring order from `token`: the preference list, then the nodes
    /// a sloppy quorum may fall back to (Dynamo's "next healthy node").
    pub fn nodes_from(&self, token: Token) -> Vec<NodeId> {
        let mut list: Vec<NodeId> = Vec::with_capacity(self.nodes.len());
        let start = self.positions.partition_point(|(t, _)| *t < token);
        let len = self.positions.len();
        for offset in 0..len {
            let (_, node) = &self.positions[(start + offset) % len];
            if !list.contains(node) {
                list.push(node.clone());
            }
        }
        list
    }

    pub fn preference_list_for_key(&self, bucket: &str, key: &[u8]) -> Vec<NodeId> {
        self.preference_list(key_token(bucket, key))
    }

    /// The primary range that contains `token`.
    pub fn range_for_token(&self, token: Token) -> Option<TokenRange> {
        let len = self.positions.len();
        if len == 0 {
            return None;
        }
        let index = self.positions.partition_point(|(t, _)| *t < token) % len;
        let end = self.positions[index].0;
        let start = self.positions[(index + len - 1) % len].0;
        Some(TokenRange { start, end })
    }

    /// Every primary range of the ring, with the preference list that replicates it.
    pub fn ranges(&self) -> Vec<(TokenRange, Vec<NodeId>)> {
        let len = self.positions.len();
        (0..len)
            .map(|i| {
                let end = self.positions[i].0;
                let start = self.positions[(i + len - 1) % len].0;
                (TokenRange { start, end }, self.preference_list(end))
            })
            .collect()
    }

    /// The share of the token space whose preference list includes `node` (0..=1 per
    /// replica; the shares of all nodes add up to the effective replication factor).
    pub fn ownership(&self, node: &NodeId) -> f64 {
        let full = u64::MAX as f64 + 1.0;
        self.ranges()
            .iter()
            .filter(|(_, list)| list.contains(node))
            .map(|(range, _)| {
                if range.start == range.end {
                    full
                } else {
                    range.end.wrapping_sub(range.start) as f64
                }
            })
            .sum::<f64>()
            / full
    }
}

#[cfg(test)]
mod tests;
