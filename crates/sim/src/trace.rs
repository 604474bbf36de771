//! The trace: a line per event when tracing is on, the names that make dots readable
//! (`n3.1:2`), short descriptions of objects and messages, and the watch that records under
//! which dots a suspect value travelled.

use crate::event_loop::Simulation;
use crate::workload;
use mendkv_core::membership::MemberInfo;
use mendkv_core::message::{Message, RequestId};
use mendkv_core::version::{Actor, Object};
use std::collections::BTreeMap;
use std::fmt::Write as _;

fn request_name(id: RequestId) -> String {
    format!("{}.{}", id >> 40, id & ((1 << 40) - 1))
}

/// Names actors in traces: the node whose id hashes to the actor's `node_hash`.
#[derive(Debug, Clone, Default)]
pub struct Names {
    nodes: BTreeMap<u64, String>,
}

impl Names {
    pub fn new(members: &[MemberInfo]) -> Self {
        Names {
            nodes: members
                .iter()
                .map(|m| (Actor::new(m.id.as_str(), 0).node_hash, m.id.to_string()))
                .collect(),
        }
    }

    /// `n3.1` for node n3 in epoch 1 (or the hash, for an actor no member has).
    pub fn actor(&self, actor: &Actor) -> String {
        match self.nodes.get(&actor.node_hash) {
            Some(name) => format!("{name}.{}", actor.epoch),
            None => format!("{:x}.{}", actor.node_hash, actor.epoch),
        }
    }
}

/// An object in a few words: its siblings `value@dot` (`-` a tombstone; a dot is
/// `node.epoch.counter`) and its causal context `[node.epoch:counter ...]`.
pub fn describe_object(object: &Object, names: &Names) -> String {
    let siblings: Vec<String> = object
        .siblings()
        .iter()
        .map(|s| {
            let value = workload::value_text(&s.value).unwrap_or_else(|| "-".into());
            format!("{value}@{}.{}", names.actor(&s.dot.actor), s.dot.counter)
        })
        .collect();
    let context: Vec<String> = object
        .context()
        .iter()
        .map(|(a, c)| format!("{}:{c}", names.actor(a)))
        .collect();
    format!("{{{}}}[{}]", siblings.join(","), context.join(" "))
}

/// A message in a few words, for the trace.
pub fn describe(message: &Message, names: &Names) -> String {
    let key = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    match message {
        Message::Read {
            request, key: k, ..
        } => format!("Read#{} {}", request_name(*request), key(k)),
        Message::ReadReply { request, result } => match result {
            Ok(Some(o)) => format!(
                "ReadReply#{} {}",
                request_name(*request),
                describe_object(o, names)
            ),
            Ok(None) => format!("ReadReply#{} none", request_name(*request)),
            Err(e) => format!("ReadReply#{} error {e:?}", request_name(*request)),
        },
        Message::Coordinate {
            request,
            key: k,
            value,
            context,
            ..
        } => format!(
            "Coordinate#{} {} ={} ctx={}",
            request_name(*request),
            key(k),
            workload::value_text(value).unwrap_or("-".into()),
            context.vector().len()
        ),
        Message::CoordinateReply { request, result } => match result {
            Ok(o) => format!(
                "CoordinateReply#{} {}",
                request_name(*request),
                describe_object(o, names)
            ),
            Err(e) => format!("CoordinateReply#{} error {e:?}", request_name(*request)),
        },
        Message::Replicate {
            request,
            key: k,
            object,
            ..
        } => format!(
            "Replicate#{} {} {}",
            request_name(*request),
            key(k),
            describe_object(object, names)
        ),
        Message::ReplicateReply { request, result } => match result {
            Ok(()) => format!("ReplicateReply#{} ok", request_name(*request)),
            Err(e) => format!("ReplicateReply#{} error {e:?}", request_name(*request)),
        },
        Message::ReadDigest {
            request, key: k, ..
        } => {
            format!("ReadDigest#{} {}", request_name(*request), key(k))
        }
        Message::ReadDigestReply { request, result } => match result {
            Ok(digest) => format!("ReadDigestReply#{} {digest:016x}", request_name(*request)),
            Err(e) => format!("ReadDigestReply#{} error {e:?}", request_name(*request)),
        },
        Message::RepairWrite {
            request,
            key: k,
            object,
            ..
        } => format!(
            "RepairWrite#{} {} {}",
            request_name(*request),
            key(k),
            describe_object(object, names)
        ),
        Message::RepairWriteReply { request, result } => match result {
            Ok(()) => format!("RepairWriteReply#{} ok", request_name(*request)),
            Err(e) => format!("RepairWriteReply#{} error {e:?}", request_name(*request)),
        },
        Message::Gossip(message) => format!("Gossip({})", message.kind()),
        // Any message kind newer than this simulator prints as Debug.
        #[allow(unreachable_patterns)]
        other => {
            let text = format!("{other:?}");
            match text.char_indices().nth(80) {
                Some((cut, _)) => format!("{}...", &text[..cut]),
                None => text,
            }
        }
    }
}

impl Simulation {
    pub(crate) fn trace_line(&mut self, who: &str, text: impl FnOnce(&Names) -> String) {
        if let Some(trace) = &mut self.trace {
            let _ = writeln!(trace, "{:>8} {who:<4} {}", self.now, text(&self.names));
        }
    }

    /// Records the dots of watched values found in a message's objects.
    pub(crate) fn watch_message(&mut self, message: &Message) {
        let objects: Vec<&Object> = match message {
            Message::Replicate { object, .. } | Message::RepairWrite { object, .. } => {
                vec![object]
            }
            Message::CoordinateReply { result: Ok(o), .. } => vec![o],
            Message::ReadReply {
                result: Ok(Some(o)),
                ..
            } => vec![o],
            _ => vec![],
        };
        for sibling in objects.iter().flat_map(|o| o.siblings()) {
            if let Some(value) = workload::value_text(&sibling.value) {
                if self.watch.contains(&value) {
                    let dot = format!(
                        "{}.{}",
                        self.names.actor(&sibling.dot.actor),
                        sibling.dot.counter
                    );
                    self.watched_dots.entry(value).or_default().insert(dot);
                }
            }
        }
    }
}
