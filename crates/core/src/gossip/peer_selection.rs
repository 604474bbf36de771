//! Whom a round gossips to.

use super::{Gossiper, Liveness};
use crate::NodeId;
use rand::seq::index::sample;
use rand::Rng;

impl Gossiper {
    /// The targets of one round: a peer known to be stale (targeted gossip), random live
    /// peers up to the fanout, sometimes a peer convicted down (so partitions heal), and
    /// sometimes a seed (so seeds stay informed, and a node that knows nobody finds them).
    pub(super) fn choose_targets(&mut self, rng: &mut impl Rng) -> Vec<NodeId> {
        let mut live: Vec<&NodeId> = Vec::new();
        let mut down: Vec<&NodeId> = Vec::new();
        for (id, peer) in &self.nodes {
            if *id == self.me || peer.has_left() {
                continue;
            }
            if peer.liveness == Liveness::Down {
                down.push(id);
            } else {
                live.push(id);
            }
        }
        let mut targets: Vec<NodeId> = Vec::with_capacity(self.config.fanout + 2);
        // Targeted gossip: the live peer we have owed data to longest.
        let stale = self
            .owed
            .iter()
            .filter(|(id, _)| live.binary_search(id).is_ok())
            .min_by_key(|(id, since)| (**since, (*id).clone()))
            .map(|(id, _)| id.clone());
        if let Some(stale) = stale {
            targets.push(stale);
        }
        let wanted = self.config.fanout.saturating_sub(targets.len());
        let picks = sample(rng, live.len(), (wanted + 1).min(live.len()));
        for index in picks.iter() {
            if targets.len() >= self.config.fanout {
                break;
            }
            if !targets.contains(live[index]) {
                targets.push(live[index].clone());
            }
        }
        // An unreachable peer, as often as there are many of them (Cassandra's rule).
        if !down.is_empty() && rng.gen_bool((down.len() as f64 / (live.len() + 1) as f64).min(1.0))
        {
            let pick = down[rng.gen_range(0..down.len())];
            targets.push(pick.clone());
        }
        let seed = self.pick_seed(&targets, live.len(), down.len(), rng);
        targets.extend(seed);
        for target in &targets {
            self.owed.remove(target);
        }
        targets
    }

    /// A seed to add to the round: always when no live peer is known, otherwise with
    /// probability `seeds / known peers` when no target is a seed already.
    fn pick_seed(
        &self,
        targets: &[NodeId],
        live: usize,
        down: usize,
        rng: &mut impl Rng,
    ) -> Option<NodeId> {
        if self.seeds.is_empty() || targets.iter().any(|t| self.seeds.contains(t)) {
            return None;
        }
        let chance = if live == 0 {
            1.0
        } else {
            (self.seeds.len() as f64 / (live + down) as f64).min(1.0)
        };
        if !rng.gen_bool(chance) {
            return None;
        }
        self.seeds
            .iter()
            .nth(rng.gen_range(0..self.seeds.len()))
            .cloned()
    }
}
