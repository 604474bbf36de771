//! Clients and the history of what they did (Jepsen's history model).
//!
//! Every client operation is recorded when it is *invoked* and again when it *completes*,
//! with one of four outcomes:
//! - `ok`: the cluster answered with success (a read's object, a write's `Written`);
//! - `failed`: the operation certainly had no effect (connection refused, overloaded, or a
//!   read that did not meet its level: reads never have effects);
//! - `unknown`: a write whose effect is unknown (timeout, unavailable after the actor may
//!   have applied it, the coordinator crashed, the client gave up): it may appear later;
//! - `pending`: still in flight when the run ended (treated as unknown).
//!
//! Every value a client writes is unique (`s{seed}-op{id}`), so the checkers can tell which
//! write a value read back came from, and can tell a value no client wrote.
//!
//! Writes also record *where their causal context came from* ([`ContextSource`]), which is
//! what the checkers use to decide whether a write could legitimately have superseded
//! another: a blind write supersedes nothing; a write whose context came from an earlier
//! response can only supersede what that response could have seen.

use mendkv_core::message::ClientResponse;
use mendkv_core::quorum::ConsistencyLevel;
use mendkv_core::version::{CausalContext, Dot, Object, Sibling, Value, LWW_EPOCH};
use mendkv_core::Millis;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::fmt;

/// Index of an operation in the [`History`].
pub type OpId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Get,
    Put,
    Delete,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Get => "get",
            OpKind::Put => "put",
            OpKind::Delete => "delete",
        }
    }

    pub fn is_write(self) -> bool {
        !matches!(self, OpKind::Get)
    }
}

/// Where a write's causal context came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextSource {
    /// Empty context: supersedes nothing, becomes a sibling of whatever exists.
    Blind,
    /// The context returned by this earlier (completed) operation of the same client.
    FromOp(OpId),
    /// A delete without context: the coordinator reads at the write's level first and
    /// deletes what that read saw.
    ReadsFirst,
}

/// What a successful operation returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OkResult {
    /// A read: the live values (tombstones left out), sorted.
    Read {
        values: Vec<String>,
    },
    Written,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Ok(OkResult),
    /// Certainly no effect.
    Failed(String),
    /// Maybe an effect.
    Unknown(String),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }

    /// True when the operation may have changed the store.
    pub fn may_have_effect(&self) -> bool {
        !matches!(self, Outcome::Failed(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Pending => f.write_str("pending"),
            Outcome::Ok(OkResult::Written) => f.write_str("ok"),
            Outcome::Ok(OkResult::Read { values }) => write!(f, "ok [{}]", values.join(",")),
            Outcome::Failed(why) => write!(f, "failed ({why})"),
            Outcome::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// One client operation, from invocation to completion.
#[derive(Debug, Clone)]
pub struct Op {
    pub id: OpId,
    /// The workload client, or `None` for scripted and final operations.
    pub client: Option<usize>,
    pub kind: OpKind,
    pub key: String,
    pub level: ConsistencyLevel,
    /// The unique value of a put.
    pub value: Option<String>,
    pub context: ContextSource,
    /// The coordinator the client sent it to.
    pub node: usize,
    pub invoked: Millis,
    pub completed: Option<Millis>,
    pub outcome: Outcome,
    /// A read of the final check (after faults stopped and the cluster healed).
    pub is_final: bool,
    /// On an LWW key, the version a successful answer showed ([`lww_version`]).
    pub lww: Option<Sibling>,
}

impl Op {
    /// Completion time, or "never" for operations whose outcome is unknown.
    pub fn end_or_never(&self) -> Millis {
        match self.outcome {
            Outcome::Ok(_) | Outcome::Failed(_) => self.completed.unwrap_or(Millis::MAX),
            _ => Millis::MAX,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "op{} {} {} @{}",
            self.id,
            self.kind.as_str(),
            self.key,
            self.level
        )?;
        if let Some(value) = &self.value {
            write!(f, " ={value}")?;
        }
        match self.context {
            ContextSource::Blind if self.kind.is_write() => f.write_str(" ctx=blind")?,
            ContextSource::FromOp(op) => write!(f, " ctx=op{op}")?,
            ContextSource::ReadsFirst => f.write_str(" ctx=read-first")?,
            ContextSource::Blind => {}
        }
        write!(f, " via n{} invoked {}ms", self.node, self.invoked)?;
        if let Some(done) = self.completed {
            write!(f, " done {done}ms")?;
        }
        write!(f, ": {}", self.outcome)?;
        if self.is_final {
            f.write_str(" (final read)")?;
        }
        Ok(())
    }
}

/// Every operation of a run, indexed by [`OpId`].
#[derive(Debug, Clone, Default)]
pub struct History {
    pub ops: Vec<Op>,
}

impl History {
    pub fn get(&self, id: OpId) -> Option<&Op> {
        self.ops.get(id as usize)
    }

    pub fn get_mut(&mut self, id: OpId) -> Option<&mut Op> {
        self.ops.get_mut(id as usize)
    }

    pub fn next_id(&self) -> OpId {
        self.ops.len() as OpId
    }

    pub fn push(&mut self, op: Op) -> OpId {
        let id = self.next_id();
        debug_assert_eq!(op.id, id);
        self.ops.push(op);
        id
    }

    /// Counts of (ok, failed, unknown, pending) over the non-final operations.
    pub fn tally(&self) -> (usize, usize, usize, usize) {
        let mut t = (0, 0, 0, 0);
        for op in self.ops.iter().filter(|o| !o.is_final) {
            match op.outcome {
                Outcome::Ok(_) => t.0 += 1,
                Outcome::Failed(_) => t.1 += 1,
                Outcome::Unknown(_) => t.2 += 1,
                Outcome::Pending => t.3 += 1,
            }
        }
        t
    }

    /// Operations on one key, for failure reports.
    pub fn for_key<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Op> + 'a {
        self.ops.iter().filter(move |o| o.key == key)
    }
}

/// The printable form of a value a client wrote (or `?` for bytes that are not UTF-8).
pub fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::Data { bytes, .. } => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::Tombstone => None,
    }
}

/// The live values of an object, sorted.
pub fn live_values(object: &Object) -> Vec<String> {
    let mut values: Vec<String> = object
        .live_values()
        .filter_map(|s| value_text(&s.value))
        .collect();
    values.sort();
    values
}

/// The content type of every value a simulated client writes.
pub const CONTENT_TYPE: &str = "text/plain";

/// The value a simulated put writes.
pub fn client_value(text: &str) -> Value {
    Value::Data {
        bytes: bytes::Bytes::from(text.to_string()),
        content_type: CONTENT_TYPE.into(),
    }
}

/// The LWW version a successful answer on an LWW key shows: for a read, its object's
/// winning sibling (a tombstone too; none when the object is empty); for a write, the
/// version it wrote, whose dot is the one LWW entry of the returned context (a delete
/// that found the key already deleted wrote nothing and returns the tombstone's). The
/// checkers compare these by [`mendkv_core::version::lww_order`], as replicas merge.
pub fn lww_version(op: &Op, response: &ClientResponse) -> Option<Sibling> {
    match response {
        ClientResponse::Object(object) => object.lww_winner().cloned(),
        ClientResponse::Written { context } => {
            let (actor, counter) = context
                .vector()
                .iter()
                .filter(|(actor, _)| actor.epoch == LWW_EPOCH)
                .max_by_key(|(_, counter)| **counter)?;
            let value = match (&op.kind, &op.value) {
                (OpKind::Put, Some(text)) => client_value(text),
                _ => Value::Tombstone,
            };
            Some(Sibling {
                dot: Dot {
                    actor: *actor,
                    counter: *counter,
                },
                value,
            })
        }
        _ => None,
    }
}

/// Turns a coordinator's answer into the history's outcome.
pub fn classify(kind: OpKind, response: &ClientResponse) -> Outcome {
    match (kind, response) {
        (OpKind::Get, ClientResponse::Object(object)) => Outcome::Ok(OkResult::Read {
            values: live_values(object),
        }),
        (OpKind::Put | OpKind::Delete, ClientResponse::Written { .. }) => {
            Outcome::Ok(OkResult::Written)
        }
        (_, ClientResponse::Overloaded) => Outcome::Failed("overloaded".into()),
        (OpKind::Get, other) => Outcome::Failed(short_response(other)),
        (_, other) => Outcome::Unknown(short_response(other)),
    }
}

/// A response in a few words, for the history and the trace.
pub fn short_response(response: &ClientResponse) -> String {
    match response {
        ClientResponse::Object(o) => format!("object [{}]", live_values(o).join(",")),
        ClientResponse::Written { .. } => "written".into(),
        ClientResponse::Unavailable { needed, answered } => {
            format!("unavailable {answered}/{needed}")
        }
        ClientResponse::Timeout { needed, answered } => format!("timeout {answered}/{needed}"),
        ClientResponse::Local(_) => "local".into(),
        ClientResponse::StorageFailed(e) => format!("storage failed: {e}"),
        ClientResponse::Overloaded => "overloaded".into(),
        // Responses the simulated clients never ask for (and any kind newer than this
        // simulator, e.g. repair control): their Debug form, cut short.
        #[allow(unreachable_patterns)]
        other => {
            let text = format!("{other:?}");
            match text.char_indices().nth(60) {
                Some((cut, _)) => format!("{}...", &text[..cut]),
                None => text,
            }
        }
    }
}

/// The shape of a randomized workload, chosen per seed.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadParams {
    /// Operations to invoke in total.
    pub ops: usize,
    /// Concurrent clients; each has at most one operation in flight.
    pub clients: usize,
    /// Size of the causal key space (`k0`..); few keys means much contention.
    pub keys: usize,
    /// Size of the LWW key space (`l0`.., bucket [`crate::LWW_BUCKET`]), drawn beside the
    /// causal keys.
    pub lww_keys: usize,
    /// Pause between a client's operations, uniform in `0..=think_max_ms`.
    pub think_max_ms: Millis,
    /// Percent of operations that are gets, puts; the rest are deletes.
    pub get_percent: u32,
    pub put_percent: u32,
    /// Percent of writes that carry the client's last context for the key (the rest are
    /// blind puts, or deletes that read first).
    pub with_context_percent: u32,
    /// How long a client waits for an answer before it gives up (outcome unknown).
    pub client_timeout_ms: Millis,
}

impl WorkloadParams {
    pub fn random(rng: &mut ChaCha8Rng, ops: usize, nodes: usize) -> Self {
        let keys = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..=3),
            1 => rng.gen_range(4..=16),
            _ => rng.gen_range(17..=100),
        };
        let get_percent = rng.gen_range(20..=60);
        let put_percent = rng.gen_range(20..=(100 - get_percent).max(20));
        WorkloadParams {
            ops,
            clients: rng.gen_range(1..=(2 * nodes).clamp(2, 12)),
            keys,
            think_max_ms: rng.gen_range(0..=30),
            get_percent,
            put_percent: put_percent.min(100 - get_percent),
            with_context_percent: rng.gen_range(20..=90),
            client_timeout_ms: 5_000,
            // Drawn last, so the draws above stay what they were before LWW keys existed.
            lww_keys: match rng.gen_range(0..3) {
                0 => 0,
                _ => rng.gen_range(1..=keys),
            },
        }
    }
}

/// What a client wants to do next.
#[derive(Debug, Clone)]
pub struct PlannedOp {
    pub kind: OpKind,
    pub key: String,
    pub level: ConsistencyLevel,
    pub context: ContextSource,
    pub causal: Option<CausalContext>,
}

/// A workload client: one operation at a time, remembering the last context it got for
/// each key (as an application doing read-modify-write would).
#[derive(Debug, Clone, Default)]
pub struct Client {
    pub busy: Option<OpId>,
    contexts: BTreeMap<String, (CausalContext, OpId)>,
}

impl Client {
    /// Draws the next operation.
    pub fn plan(&self, rng: &mut ChaCha8Rng, params: &WorkloadParams) -> PlannedOp {
        let index = rng.gen_range(0..params.keys + params.lww_keys);
        let key = if index < params.keys {
            format!("k{index}")
        } else {
            format!("l{}", index - params.keys)
        };
        let roll = rng.gen_range(0..100);
        let kind = if roll < params.get_percent {
            OpKind::Get
        } else if roll < params.get_percent + params.put_percent {
            OpKind::Put
        } else {
            OpKind::Delete
        };
        let level = match rng.gen_range(0..10) {
            0 | 1 => ConsistencyLevel::One,
            2 | 3 => ConsistencyLevel::All,
            _ => ConsistencyLevel::Quorum,
        };
        let known = self.contexts.get(&key);
        let use_context = kind.is_write()
            && known.is_some()
            && rng.gen_range(0..100) < params.with_context_percent;
        let (context, causal) = match (kind, use_context, known) {
            (OpKind::Get, _, _) => (ContextSource::Blind, None),
            (_, true, Some((ctx, from))) => (ContextSource::FromOp(*from), Some(ctx.clone())),
            (OpKind::Delete, _, _) => (ContextSource::ReadsFirst, None),
            _ => (ContextSource::Blind, None),
        };
        PlannedOp {
            kind,
            key,
            level,
            context,
            causal,
        }
    }

    /// Remembers the context a successful operation returned.
    pub fn learn(&mut self, key: &str, op: OpId, response: &ClientResponse) {
        let context = match response {
            ClientResponse::Object(object) => object.causal_context(),
            ClientResponse::Written { context } => context.clone(),
            _ => return,
        };
        self.contexts.insert(key.to_string(), (context, op));
    }
}
