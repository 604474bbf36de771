//! The simulated network: when (and whether, and how many times) a message arrives.
//!
//! A real mendkv link is one TCP connection per ordered pair of nodes, so by default a link
//! keeps messages in order (FIFO) and never duplicates them. The fault models break that on
//! purpose, because the core must not rely on more than its protocol promises:
//! - `loss`: a message vanishes (a connection reset with bytes in flight);
//! - `duplicate`: a message arrives twice (a retrying transport, a replayed frame);
//! - `reorder`: a message may take a long detour and overtake or be overtaken by others;
//! - partitions: a directed link is cut; whatever would arrive over it while it is cut is
//!   dropped **silently**. The sender is not told (no `handle_send_failed`): a partition
//!   looks like a black hole, as a firewall or a dead switch does, so the sender finds out
//!   only through its request timeout. A crashed peer, by contrast, is reported (connection
//!   refused / reset): see the crash handling in `lib.rs`.
//!
//! Every decision is drawn from the caller's seeded RNG, in a fixed order, so the same seed
//! always gives the same deliveries.

use crate::fault::FaultConfig;
use mendkv_core::Millis;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// How the network behaves; chosen per seed from the enabled faults.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkParams {
    /// One-way delay of a message, uniform in `min_delay_ms..=max_delay_ms`.
    pub min_delay_ms: Millis,
    pub max_delay_ms: Millis,
    /// Probability that a message is dropped.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Probability that a message takes a detour of up to `detour_max_ms` and ignores the
    /// link's FIFO order.
    pub reorder: f64,
    pub detour_max_ms: Millis,
}

impl NetworkParams {
    /// The network of one seed: delays (now and then a slow one, up to 60 ms), and the loss,
    /// duplication and reordering of the faults that are on.
    pub fn random(rng: &mut ChaCha8Rng, faults: &FaultConfig) -> Self {
        let max_delay = if rng.gen_bool(0.2) {
            rng.gen_range(10..=60)
        } else {
            rng.gen_range(1..=10)
        };
        NetworkParams {
            min_delay_ms: 1,
            max_delay_ms: max_delay,
            loss: if faults.loss {
                rng.gen_range(0.001..0.05)
            } else {
                0.0
            },
            duplicate: if faults.duplicate {
                rng.gen_range(0.001..0.05)
            } else {
                0.0
            },
            reorder: if faults.reorder {
                rng.gen_range(0.01..0.2)
            } else {
                0.0
            },
            detour_max_ms: if faults.reorder {
                rng.gen_range(20..=500)
            } else {
                0
            },
        }
    }

    /// A healthy LAN: 1-5 ms, in order, nothing lost.
    pub fn reliable() -> Self {
        NetworkParams {
            min_delay_ms: 1,
            max_delay_ms: 5,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            detour_max_ms: 0,
        }
    }
}

/// Why a message will not be delivered (for the trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Lost,
}

/// The network's state: parameters, cut links, and per-link FIFO bookkeeping.
#[derive(Debug, Clone)]
pub struct Network {
    pub params: NetworkParams,
    /// Directed links `(from, to)` that are cut.
    blocked: BTreeSet<(usize, usize)>,
    /// Latest in-order delivery time per link, so FIFO links stay FIFO.
    last_delivery: BTreeMap<(usize, usize), Millis>,
}

impl Network {
    pub fn new(params: NetworkParams) -> Self {
        Network {
            params,
            blocked: BTreeSet::new(),
            last_delivery: BTreeMap::new(),
        }
    }

    /// The times at which a message sent now from `from` to `to` arrives: none (lost), one,
    /// or two (duplicated).
    pub fn plan(
        &mut self,
        rng: &mut ChaCha8Rng,
        from: usize,
        to: usize,
        now: Millis,
    ) -> Result<Vec<Millis>, Drop> {
        let p = &self.params;
        if p.loss > 0.0 && rng.gen_bool(p.loss) {
            return Err(Drop::Lost);
        }
        let copies = if p.duplicate > 0.0 && rng.gen_bool(p.duplicate) {
            2
        } else {
            1
        };
        let mut times = Vec::with_capacity(copies);
        for _ in 0..copies {
            let delay = rng.gen_range(p.min_delay_ms..=p.max_delay_ms.max(p.min_delay_ms));
            let detour = p.reorder > 0.0 && rng.gen_bool(p.reorder);
            if detour {
                // Out of band: may overtake or be overtaken; does not move the FIFO mark.
                times.push(now + delay + rng.gen_range(0..=p.detour_max_ms));
            } else {
                let last = self.last_delivery.entry((from, to)).or_insert(0);
                let at = (now + delay).max(*last);
                *last = at;
                times.push(at);
            }
        }
        Ok(times)
    }

    /// Cuts the directed link `from -> to`.
    pub fn block(&mut self, from: usize, to: usize) {
        self.blocked.insert((from, to));
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    pub fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.blocked.contains(&(from, to))
    }

    pub fn is_partitioned(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// The cut links, for the trace.
    pub fn blocked(&self) -> impl Iterator<Item = &(usize, usize)> {
        self.blocked.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    // A reliable link delivers every message once, in the order sent.
    #[test]
    fn reliable_links_are_fifo() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut net = Network::new(NetworkParams {
            min_delay_ms: 1,
            max_delay_ms: 50,
            ..NetworkParams::reliable()
        });
        let mut last = 0;
        for now in 0..1000 {
            let times = net.plan(&mut rng, 0, 1, now).unwrap();
            assert_eq!(times.len(), 1);
            assert!(times[0] >= last && times[0] > now);
            last = times[0];
        }
    }

    // Loss and duplication happen at roughly the configured rates.
    #[test]
    fn loss_and_duplication_rates() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut net = Network::new(NetworkParams {
            loss: 0.1,
            duplicate: 0.1,
            ..NetworkParams::reliable()
        });
        let (mut lost, mut dup) = (0, 0);
        for now in 0..10_000 {
            match net.plan(&mut rng, 0, 1, now) {
                Err(_) => lost += 1,
                Ok(t) if t.len() == 2 => dup += 1,
                Ok(_) => {}
            }
        }
        assert!((800..1200).contains(&lost), "lost {lost}");
        assert!((700..1200).contains(&dup), "dup {dup}");
    }
}
