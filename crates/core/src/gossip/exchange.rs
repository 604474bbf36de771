//! The exchange: building `Syn`s, answering them, and applying what comes back.

use super::message::{
    delta_len, digest_len, varint_len_u64, Delta, Digest, GossipMessage, MESSAGE_OVERHEAD_BYTES,
};
use super::state::{EndpointState, NodeStatus, Update, Version, VersionedValue};
use super::{AppKey, DetectorParams, GossipEvent, Gossiper, Liveness, Peer};
use crate::{Millis, NodeId};

/// A delta to send: the node, our state of it, and the version it starts after (the
/// receiver's max version, or 0 for all of it).
type Want<'a> = (&'a NodeId, &'a EndpointState, Version);

impl Gossiper {
    /// A gossip message from `from` (already decoded by the transport). Returns the replies.
    pub fn handle_message(
        &mut self,
        now: Millis,
        from: &NodeId,
        message: GossipMessage,
    ) -> Vec<(NodeId, GossipMessage)> {
        let bytes = message.encoded_len();
        self.receive(now, from, message, bytes)
    }

    /// A gossip message as bytes off the network: decoded here, dropped and counted when it
    /// is oversize or does not decode.
    pub fn handle_bytes(
        &mut self,
        now: Millis,
        from: &NodeId,
        bytes: &[u8],
    ) -> Vec<(NodeId, GossipMessage)> {
        if bytes.len() > self.config.max_message_bytes {
            self.stats.messages_in += 1;
            self.stats.bytes_in += bytes.len() as u64;
            self.stats.dropped_oversize += 1;
            return Vec::new();
        }
        match GossipMessage::decode(bytes) {
            Ok(message) => self.receive(now, from, message, bytes.len()),
            Err(_) => {
                self.stats.messages_in += 1;
                self.stats.bytes_in += bytes.len() as u64;
                self.stats.dropped_malformed += 1;
                Vec::new()
            }
        }
    }

    fn receive(
        &mut self,
        now: Millis,
        from: &NodeId,
        message: GossipMessage,
        bytes: usize,
    ) -> Vec<(NodeId, GossipMessage)> {
        self.stats.messages_in += 1;
        self.stats.bytes_in += bytes as u64;
        if bytes > self.config.max_message_bytes {
            self.stats.dropped_oversize += 1;
            return Vec::new();
        }
        if *from == self.me || message.validate(self.config.max_nodes).is_err() {
            self.stats.dropped_malformed += 1;
            return Vec::new();
        }
        let reply = match message {
            GossipMessage::Syn { digests, complete } => self.on_syn(now, from, digests, complete),
            GossipMessage::Ack { deltas, requests } => self.on_ack(now, from, deltas, requests),
            GossipMessage::Ack2 { deltas } => {
                self.apply_deltas(now, deltas);
                None
            }
        };
        match reply {
            Some(reply) => {
                self.count_out(reply.encoded_len());
                vec![(from.clone(), reply)]
            }
            None => Vec::new(),
        }
    }

    // ----- Syn ------------------------------------------------------------------------

    /// The digests of every node known, in id order; when they do not all fit the budget, a
    /// window of them that moves on every time (and the `Syn` is not `complete`).
    pub(super) fn build_syn(&mut self) -> GossipMessage {
        let mut syn = self.build_syn_of_all();
        if !self.announce_self {
            // The receiver then sends what it holds of this node (see `set_announce_self`).
            if let GossipMessage::Syn { digests, .. } = &mut syn {
                digests.retain(|d| d.node != self.me);
            }
        }
        syn
    }

    fn build_syn_of_all(&mut self) -> GossipMessage {
        let budget = self.config.max_message_bytes - MESSAGE_OVERHEAD_BYTES;
        let total: usize = self
            .nodes
            .iter()
            .map(|(id, peer)| digest_len(id, peer.state.generation(), peer.state.max_version()))
            .sum();
        if total <= budget {
            return GossipMessage::Syn {
                digests: self.digests(),
                complete: true,
            };
        }
        self.stats.truncated_messages += 1;
        let all = self.digests();
        let start = self.syn_cursor % all.len();
        let mut used = 0;
        let mut digests = Vec::new();
        for digest in all.iter().cycle().skip(start).take(all.len()) {
            let len = digest_len(&digest.node, digest.generation, digest.max_version);
            if used + len > budget {
                break;
            }
            used += len;
            digests.push(digest.clone());
        }
        self.syn_cursor = start + digests.len();
        digests.sort_by(|a, b| a.node.cmp(&b.node));
        GossipMessage::Syn {
            digests,
            complete: false,
        }
    }

    /// Compares the sender's digests with ours: what it lacks becomes deltas, what we lack
    /// becomes requests.
    fn on_syn(
        &mut self,
        now: Millis,
        from: &NodeId,
        mut digests: Vec<Digest>,
        complete: bool,
    ) -> Option<GossipMessage> {
        if !digests.is_sorted_by(|a, b| a.node <= b.node) {
            digests.sort_by(|a, b| a.node.cmp(&b.node));
        }
        digests.dedup_by(|a, b| a.node == b.node);
        let mut wants: Vec<Want<'_>> = Vec::new();
        let mut requests: Vec<Digest> = Vec::new();
        let mut impostor = false;
        let mut over_limit = 0;
        let mut room = self.config.max_nodes.saturating_sub(self.nodes.len());
        let mut ours = self.nodes.iter().peekable();
        for digest in &digests {
            // Nodes we know that sort before this digest are unknown to the sender.
            while let Some((id, peer)) = ours.next_if(|(id, _)| **id < digest.node) {
                if complete {
                    wants.push((id, &peer.state, 0));
                }
            }
            match ours.next_if(|(id, _)| **id == digest.node) {
                Some((id, peer)) if *id == self.me => {
                    impostor |= compare_self(id, &peer.state, digest, &mut wants);
                }
                Some((id, peer)) => compare(id, &peer.state, digest, &mut wants, &mut requests),
                None if self.is_forgotten(&digest.node, digest.generation) => {}
                None if room == 0 => over_limit += 1,
                None => {
                    room -= 1;
                    requests.push(Digest {
                        node: digest.node.clone(),
                        generation: digest.generation,
                        max_version: 0,
                    });
                }
            }
        }
        if complete {
            wants.extend(ours.map(|(id, peer)| (id, &peer.state, 0)));
        }
        let budget = self.config.max_message_bytes - MESSAGE_OVERHEAD_BYTES;
        let (requests, requests_len, requests_cut) = fit_requests(requests, budget / 2);
        let packed = self.pack_deltas(&wants, budget - requests_len);
        self.stats.self_state_rejected += u64::from(impostor);
        self.stats.nodes_over_limit += over_limit;
        self.note_truncation(now, from, packed.truncated || requests_cut);
        if packed.deltas.is_empty() && requests.is_empty() {
            return None;
        }
        Some(GossipMessage::Ack {
            deltas: packed.deltas,
            requests,
        })
    }

    fn note_truncation(&mut self, now: Millis, peer: &NodeId, truncated: bool) {
        if truncated {
            self.stats.truncated_messages += 1;
            self.owed.entry(peer.clone()).or_insert(now);
        }
    }

    // ----- Ack ------------------------------------------------------------------------

    fn on_ack(
        &mut self,
        now: Millis,
        from: &NodeId,
        deltas: Vec<Delta>,
        requests: Vec<Digest>,
    ) -> Option<GossipMessage> {
        self.apply_deltas(now, deltas);
        let wants: Vec<Want<'_>> = requests
            .iter()
            .filter_map(|request| {
                let (id, peer) = self.nodes.get_key_value(&request.node)?;
                let generation = peer.state.generation();
                if generation == request.generation {
                    Some((id, &peer.state, request.max_version))
                } else if generation > request.generation {
                    Some((id, &peer.state, 0))
                } else {
                    None
                }
            })
            .collect();
        let budget = self.config.max_message_bytes - MESSAGE_OVERHEAD_BYTES;
        let packed = self.pack_deltas(&wants, budget);
        self.note_truncation(now, from, packed.truncated);
        if packed.deltas.is_empty() {
            return None;
        }
        Some(GossipMessage::Ack2 {
            deltas: packed.deltas,
        })
    }

    // ----- deltas ---------------------------------------------------------------------

    /// Builds the deltas for `wants` within `budget` bytes: each a version-ordered prefix,
    /// the nodes whose oldest missing update was learned earliest first (flow control: what
    /// waited longest goes first, what does not fit waits for the next exchange).
    fn pack_deltas(&self, wants: &[Want<'_>], budget: usize) -> Packed {
        let mut candidates: Vec<(Millis, Want<'_>)> = wants
            .iter()
            .filter_map(|want| Some((want.1.oldest_update_after(want.2)?, *want)))
            .collect();
        // Stable: equally old candidates stay in id order.
        candidates.sort_by_key(|(oldest, _)| *oldest);
        let mut packed = Packed::default();
        let mut used = 0;
        for (_, (id, state, after)) in candidates {
            let (delta, len, complete) = delta_within(id, state, after, budget - used);
            if let Some(delta) = delta {
                used += len;
                packed.deltas.push(delta);
            }
            if !complete {
                packed.truncated = true;
                break;
            }
        }
        packed
    }

    fn apply_deltas(&mut self, now: Millis, deltas: Vec<Delta>) {
        for delta in deltas {
            self.apply_delta(now, delta);
        }
    }

    /// Merges one node's delta: refused when it is about this node, about a node forgotten,
    /// of an older generation than the one held, or when it starts after what is held; a
    /// newer generation replaces the state (a restart).
    fn apply_delta(&mut self, now: Millis, delta: Delta) {
        if delta.node == self.me {
            self.check_self_delta(&delta);
            return;
        }
        if !self.forgotten.is_empty() && self.is_forgotten(&delta.node, delta.generation) {
            return;
        }
        let params = self.detector;
        let Some(peer) = self.nodes.get_mut(&delta.node) else {
            self.learn_node(now, delta);
            return;
        };
        let generation = peer.state.generation();
        if delta.generation < generation {
            self.stats.stale_generation_rejected += 1;
            return;
        }
        let restart = delta.generation > generation;
        let held = if restart { 0 } else { peer.state.max_version() };
        if delta.after > held {
            // Based on a request we no longer match (we restarted, or the node did): taking
            // it would leave a hole. A later exchange sends the whole of it.
            self.stats.deltas_out_of_order += 1;
            return;
        }
        if !restart && !peer.state.has_room_for(&delta.entries) {
            self.stats.dropped_malformed += 1;
            return;
        }
        let was = peer.liveness;
        if restart {
            *peer = Peer::new(EndpointState::new(delta.generation), now, &params);
        }
        let merged = merge_into(peer, now, delta.entries, delta.heartbeat, restart, &params);
        let node = delta.node;
        if restart {
            let generation = delta.generation;
            self.push_event(GossipEvent::NodeRestarted {
                node: node.clone(),
                generation,
            });
        }
        self.after_merge(now, node, was, merged);
    }

    /// A delta about this node: only this node changes its state, so it is ignored, and
    /// counted when it claims more than we have (an impostor, or a bug).
    fn check_self_delta(&mut self, delta: &Delta) {
        let mine = self.local_state();
        let newest = delta.newest_version().unwrap_or(0);
        if delta.generation > mine.generation()
            || (delta.generation == mine.generation() && newest > mine.max_version())
        {
            self.stats.self_state_rejected += 1;
        }
    }

    /// A node heard of for the first time (its delta must hold all of its state).
    fn learn_node(&mut self, now: Millis, delta: Delta) {
        if delta.after > 0 {
            self.stats.deltas_out_of_order += 1;
            return;
        }
        if self.nodes.len() >= self.config.max_nodes {
            self.stats.nodes_over_limit += 1;
            return;
        }
        let params = self.detector;
        let mut peer = Peer::new(EndpointState::new(delta.generation), now, &params);
        let merged = merge_into(
            &mut peer,
            now,
            delta.entries,
            delta.heartbeat,
            true,
            &params,
        );
        self.nodes.insert(delta.node.clone(), peer);
        self.push_event(GossipEvent::NodeJoined {
            node: delta.node.clone(),
        });
        self.after_merge(now, delta.node, Liveness::Up, merged);
    }

    /// Events and frequency tuning after a merge.
    fn after_merge(&mut self, now: Millis, node: NodeId, was: Liveness, merged: Merged) {
        if let Some(suspect_at) = merged.suspect_at {
            self.next_check_at = self.next_check_at.min(suspect_at);
        }
        if merged.back_up && was != Liveness::Up {
            self.push_event(GossipEvent::NodeUp { node: node.clone() });
        }
        if merged.changed.is_empty() {
            return;
        }
        // New Merkle roots spread at the regular pace (they change with every write burst;
        // fast rounds for them would double gossip under writes).
        if merged.changed.iter().any(|key| *key != AppKey::TreeRoots) {
            self.speed_up(now);
        }
        for key in merged.changed {
            self.push_event(GossipEvent::StateChanged {
                node: node.clone(),
                key,
            });
        }
    }
}

/// What a merge changed.
#[derive(Debug, Default)]
struct Merged {
    changed: Vec<AppKey>,
    /// The peer's new suspect deadline, when a heartbeat arrived.
    suspect_at: Option<Millis>,
    /// A heartbeat arrived and the peer (not one that left) is up again.
    back_up: bool,
}

/// Merges entries and a heartbeat into a peer's state; `fresh` when the state was new.
fn merge_into(
    peer: &mut Peer,
    now: Millis,
    entries: Vec<(AppKey, VersionedValue)>,
    heartbeat: Option<Version>,
    fresh: bool,
    params: &DetectorParams,
) -> Merged {
    let mut merged = Merged::default();
    for (key, entry) in entries {
        if peer.state.apply_entry(key, entry, now) {
            merged.changed.push(key);
        }
    }
    if merged.changed.contains(&AppKey::Status) {
        let left = peer.state.status() == Some(NodeStatus::Left);
        peer.left_at = if left {
            peer.left_at.or(Some(now))
        } else {
            None
        };
        if left {
            peer.liveness = Liveness::Down;
        }
    }
    let beat = heartbeat.is_some_and(|version| peer.state.apply_heartbeat(version, now));
    if beat || fresh {
        peer.heartbeat_arrived(now, fresh, params);
        if !peer.has_left() {
            merged.suspect_at = Some(peer.suspect_at);
            merged.back_up = true;
            peer.liveness = Liveness::Up;
        }
    }
    merged
}

/// The deltas of a message, and whether the budget cut them short.
#[derive(Debug, Default)]
struct Packed {
    deltas: Vec<Delta>,
    truncated: bool,
}

/// Compares a sender's digest of a node with our state of it.
fn compare<'a>(
    id: &'a NodeId,
    ours: &'a EndpointState,
    theirs: &Digest,
    wants: &mut Vec<Want<'a>>,
    requests: &mut Vec<Digest>,
) {
    let request = |max_version| Digest {
        node: id.clone(),
        generation: theirs.generation,
        max_version,
    };
    match theirs.generation.cmp(&ours.generation()) {
        std::cmp::Ordering::Greater => requests.push(request(0)),
        std::cmp::Ordering::Less => wants.push((id, ours, 0)),
        std::cmp::Ordering::Equal => match theirs.max_version.cmp(&ours.max_version()) {
            std::cmp::Ordering::Greater => requests.push(request(ours.max_version())),
            std::cmp::Ordering::Less => wants.push((id, ours, theirs.max_version)),
            std::cmp::Ordering::Equal => {}
        },
    }
}

/// Compares a sender's digest of this node with our own state; true when it claims more
/// than we have (an impostor, or a bug).
fn compare_self<'a>(
    id: &'a NodeId,
    ours: &'a EndpointState,
    theirs: &Digest,
    wants: &mut Vec<Want<'a>>,
) -> bool {
    if theirs.generation < ours.generation() {
        wants.push((id, ours, 0));
        false
    } else if theirs.generation > ours.generation() {
        true
    } else if theirs.max_version < ours.max_version() {
        wants.push((id, ours, theirs.max_version));
        false
    } else {
        theirs.max_version > ours.max_version()
    }
}

/// Keeps the requests that fit `budget`: the list, its encoded length, and whether some
/// were left out.
fn fit_requests(requests: Vec<Digest>, budget: usize) -> (Vec<Digest>, usize, bool) {
    let mut used = 0;
    let mut kept = Vec::with_capacity(requests.len());
    let total = requests.len();
    for request in requests {
        let len = digest_len(&request.node, request.generation, request.max_version);
        if used + len > budget {
            break;
        }
        used += len;
        kept.push(request);
    }
    let cut = kept.len() < total;
    (kept, used, cut)
}

/// The longest prefix of the updates of `state` after `after` that fits in `budget` bytes
/// as a delta: the delta (none when not even one update fits), its encoded length, and
/// whether all updates went in.
fn delta_within(
    id: &NodeId,
    state: &EndpointState,
    after: Version,
    budget: usize,
) -> (Option<Delta>, usize, bool) {
    let mut delta = Delta {
        node: id.clone(),
        generation: state.generation(),
        after,
        heartbeat: None,
        entries: Vec::new(),
    };
    // Id, generation, start, the heartbeat option's tag, the entries' length (<= 64: 1 byte).
    let mut len = delta_len(&delta);
    if state.only_heartbeat_after(after) {
        let add = varint_len_u64(state.heartbeat_version());
        if len + add > budget {
            return (None, 0, false);
        }
        delta.heartbeat = Some(state.heartbeat_version());
        return (Some(delta), len + add, true);
    }
    let updates = state.updates_after(after);
    let mut taken = 0;
    for update in &updates {
        let add = match update {
            Update::Heartbeat { version, .. } => varint_len_u64(*version),
            Update::Entry { key, held } => super::message::encoded_len(&(key, &held.versioned)),
        };
        if len + add > budget {
            break;
        }
        len += add;
        taken += 1;
        match update {
            Update::Heartbeat { version, .. } => delta.heartbeat = Some(*version),
            Update::Entry { key, held } => delta.entries.push((*key, held.versioned.clone())),
        }
    }
    let complete = taken == updates.len();
    if taken == 0 {
        return (None, 0, complete);
    }
    (Some(delta), len, complete)
}
