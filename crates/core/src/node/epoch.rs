//! The node's epoch: the second half of its actor `(node, epoch)`, so the dots it issues
//! never repeat (SPEC section 6).
//!
//! The epoch grows durably on every start, which covers crashes. A wiped data directory
//! loses the record, and the node would start again at epoch 1 and reissue dots that
//! replicas already hold: a new write named by an old dot looks already seen to them and
//! is silently dropped. So a node that starts without an epoch record and has peers to ask
//! does not act as a write's actor until gossip has told it what its peers know of it; and
//! whenever gossip claims a generation at least its own for it (from any peer, at any
//! time), it continues under a higher epoch, made durable first. "Told" means a majority of
//! the other members not known to be down answered without naming an earlier life: a peer
//! that restarted too may not have heard of it yet.

use super::Counter;
use super::Node;
use crate::gossip::GossipMessage;
use crate::membership::PeerStatus;
use crate::storage::{Storage, StorageError};
use crate::version::Actor;
use crate::{Millis, NodeId};

/// The meta record holding the node's epoch.
pub(super) const EPOCH_META: &str = "epoch";
/// The meta record saying whether the epoch record was made by a start that had not yet
/// heard from its peers (`[1]`) or has been confirmed since (`[0]`). Without it, a wiped
/// node that crashed before confirming would find the record its unconfirmed start wrote,
/// trust it at the next start, and run under the epoch of its previous life (simulator
/// seed 1393: the epoch, its dots and its request ids reused, so a peer answered a new
/// `Coordinate` with its cached answer to the old request of the same id, for another key).
pub(super) const EPOCH_UNCONFIRMED_META: &str = "epoch_unconfirmed";

/// Reads the previous epoch and makes the next one durable; also says whether the epoch
/// still needs confirming by peers (`learn_from_peers`): when the data directory had no
/// record (new or wiped), or its record was made by such a start that never confirmed.
pub(super) fn next_epoch<S: Storage>(
    storage: &S,
    learn_from_peers: bool,
) -> Result<(u32, bool), StorageError> {
    let previous = storage
        .get_meta(EPOCH_META)?
        .and_then(|bytes| <[u8; 4]>::try_from(bytes.as_slice()).ok())
        .map(u32::from_le_bytes);
    let never_confirmed = storage
        .get_meta(EPOCH_UNCONFIRMED_META)?
        .is_some_and(|flag| flag.as_slice() == [1]);
    let unconfirmed = learn_from_peers && (previous.is_none() || never_confirmed);
    let epoch = previous.unwrap_or(0).wrapping_add(1);
    storage.put_meta(EPOCH_META, &epoch.to_le_bytes())?;
    if unconfirmed || never_confirmed {
        // Written before the sync that makes the epoch durable: no start ever finds the
        // epoch without the flag.
        storage.put_meta(EPOCH_UNCONFIRMED_META, &[u8::from(unconfirmed)])?;
    }
    storage.sync()?;
    Ok((epoch, unconfirmed))
}

/// Why this node may not be a write's actor yet.
pub(super) const EPOCH_UNCONFIRMED: &str = "this node started with an empty data directory and \
     has not yet heard from a peer what epoch it ran under before (it will not reuse old \
     versions); retry in a moment, or check that its seeds are reachable";

/// Who issues this node's dots: its actor `(node, epoch)`, and whether the epoch is
/// confirmed (see the module doc).
#[derive(Debug)]
pub(super) struct Identity {
    pub actor: Actor,
    pub epoch: u32,
    /// False while a node that started without an epoch record waits to hear from peers
    /// whether it ran before; it issues no dots meanwhile.
    pub confirmed: bool,
    /// The highest counter of this node's actor in any tombstone it reaped this epoch. The
    /// actor's new dots lie above it: a reaped dot reused (the key's object, and with it the
    /// actor's counter, is gone) would be covered by contexts read from the tombstone,
    /// which never saw the new write. A restart starts a new epoch (a new actor), so memory
    /// is enough.
    pub reaped_counter_floor: u64,
    /// Peers whose complete answers claimed no earlier life of this node, while it is
    /// unconfirmed. One peer that knows nothing of it (it restarted too, and has not heard
    /// of it yet) must not confirm an epoch the others hold as a previous life: the node
    /// would reissue old dots, and peers would ignore its gossip under that generation.
    pub answered_by: std::collections::BTreeSet<crate::NodeId>,
}

impl Identity {
    pub fn new(node: &crate::NodeId, epoch: u32, confirmed: bool) -> Self {
        Identity {
            actor: Actor::new(node.as_str(), epoch),
            epoch,
            confirmed,
            reaped_counter_floor: 0,
            answered_by: std::collections::BTreeSet::new(),
        }
    }
}

impl<S: Storage> Node<S> {
    /// True when this node may issue new dots (coordinate writes as actor).
    pub fn epoch_confirmed(&self) -> bool {
        self.identity.confirmed
    }

    /// Looks at a gossip message before gossip handles it: a claim of a generation at
    /// least this node's epoch means it ran before under it (and lost its record).
    pub(super) fn learn_epoch_from(&mut self, now: Millis, from: &NodeId, message: &GossipMessage) {
        if let Some((claimed, version)) = message.state_claimed_for(self.id()) {
            // Before confirming, peers cannot have learned this epoch from us yet (our
            // state goes out only after their answer), so an equal claim is the epoch of a
            // previous life. Once confirmed, peers rightly hold this epoch as our
            // generation, but only up to the versions we issued in it: more is a previous
            // life under the same epoch. That happens when a wiped node adopts the epoch
            // after one peer's claim while another still holds the life that had already
            // adopted it (simulator seed 1887: that peer kept the old life's join phase,
            // whose versions were above the new life's, and the join never completed).
            let ran_before = if self.identity.confirmed {
                let mine = self.cluster.gossiper.local_state();
                let epoch = u64::from(self.identity.epoch);
                claimed > epoch || (claimed == epoch && version > mine.max_version())
            } else {
                claimed >= u64::from(self.identity.epoch)
            };
            if ran_before {
                self.adopt_epoch(now, claimed);
                return;
            }
        }
        // An answer to our digest (which named this node), or a full list of what a peer
        // knows, that claims nothing newer: this epoch is new to the cluster.
        let tells_all = matches!(
            message,
            GossipMessage::Ack { .. } | GossipMessage::Syn { complete: true, .. }
        );
        if !self.identity.confirmed && tells_all {
            self.identity.answered_by.insert(from.clone());
            if self.identity.answered_by.len() * 2 > self.live_peers_to_ask() {
                self.confirm_epoch();
            }
        }
    }

    /// The peers whose answers confirm a new epoch: a majority of the other members not
    /// known to be down (at least the ones that answered). A single seed (the others not
    /// known yet) still confirms alone.
    fn live_peers_to_ask(&self) -> usize {
        let me = self.id();
        let live = self
            .cluster
            .membership
            .ids()
            .filter(|id| *id != me && self.cluster.membership.status(id) != PeerStatus::Down)
            .count();
        live.max(self.identity.answered_by.len())
    }

    /// Confirms the epoch, and says so durably: a later start then trusts its record. If
    /// that write fails the next start asks its peers again, which is only slower.
    fn confirm_epoch(&mut self) {
        self.identity.confirmed = true;
        self.identity.answered_by.clear();
        self.cluster.gossiper.set_announce_self(true);
        let stored = self
            .storage
            .put_meta(EPOCH_UNCONFIRMED_META, &[0])
            .and_then(|()| self.storage.sync());
        if stored.is_err() {
            self.stats.increment(Counter::StorageErrors);
        }
    }

    /// Continues under an epoch above `claimed`, durably, before any dot is issued in it.
    pub(super) fn adopt_epoch(&mut self, now: Millis, claimed: u64) {
        // `LWW_EPOCH` marks LWW dots and is never a node's epoch.
        let Some(epoch) = claimed
            .checked_add(1)
            .and_then(|e| u32::try_from(e).ok())
            .filter(|e| *e < crate::version::LWW_EPOCH)
        else {
            // A claim beyond u32 can only come from a bug or a hostile peer; ignore it.
            self.stats.increment(Counter::InvalidPeerRequests);
            return;
        };
        let stored = self
            .storage
            .put_meta(EPOCH_META, &epoch.to_le_bytes())
            .and_then(|()| self.storage.sync());
        if stored.is_err() {
            // Not durable: stay unable to coordinate rather than risk the old epoch.
            self.stats.increment(Counter::StorageErrors);
            self.identity.confirmed = false;
            return;
        }
        self.identity.epoch = epoch;
        self.identity.actor = Actor::new(self.config.node_id.as_str(), epoch);
        self.cluster
            .gossiper
            .adopt_generation(u64::from(epoch), now);
        self.confirm_epoch();
        self.carry_join_to_new_epoch(now);
        self.stats.increment(Counter::EpochsLearnedFromPeers);
    }
}
