//! The simulated clients: operations invoked (by the random workload or a scripted test),
//! requests arriving at their coordinator, answers and timeouts turned into outcomes in the
//! history.

use crate::event_loop::{Event, Simulation};
use crate::workload::{self, ContextSource, Op, OpId, OpKind, Outcome};
use crate::workload::{Client, WorkloadParams};
use mendkv_core::hinted_handoff::{parse_hint_key, HintRecord};
use mendkv_core::message::{ClientRequest, ClientResponse};
use mendkv_core::quorum::ConsistencyLevel;
use mendkv_core::storage::Storage;
use mendkv_core::version::{lww_order, CausalContext, Object, Sibling};
use mendkv_core::Millis;
use rand::Rng;
use std::cmp::Ordering;
use std::fmt::Write as _;

impl Simulation {
    pub(crate) fn reply(&mut self, node: usize, op: OpId, response: ClientResponse) {
        let Some(record) = self.history.get(op) else {
            return;
        };
        if record.outcome != Outcome::Pending {
            self.trace_line(&format!("n{node}"), |_| {
                format!(
                    "reply op{op}: {} (client already gone)",
                    workload::short_response(&response)
                )
            });
            return;
        }
        let outcome = workload::classify(record.kind, &response);
        self.in_flight.remove(&op);
        self.complete(op, outcome, Some(response));
    }

    pub(crate) fn complete(
        &mut self,
        op: OpId,
        outcome: Outcome,
        response: Option<ClientResponse>,
    ) {
        let now = self.now;
        let Some(record) = self.history.get_mut(op) else {
            return;
        };
        record.completed = Some(now);
        record.outcome = outcome;
        if record.outcome.is_ok() && crate::bucket_of(&record.key) == crate::LWW_BUCKET {
            record.lww = response
                .as_ref()
                .and_then(|r| workload::lww_version(record, r));
        }
        let outcome_is_ok_put = record.kind == OpKind::Put && record.outcome.is_ok();
        let (client, key, value) = (record.client, record.key.clone(), record.value.clone());
        let stamp = record.lww.clone();
        let line = format!("{record}");
        self.trace_line(
            &client.map(|c| format!("c{c}")).unwrap_or("cli".into()),
            |_| format!("done {line}"),
        );
        if self.config.options.sloppy_quorum && outcome_is_ok_put {
            self.note_local_fallback(&key, value.as_deref(), stamp.as_ref());
        }
        if let Some(response) = response {
            if let Some(c) = client {
                self.clients[c].learn(&key, op, &response);
            }
            self.responses.insert(op, response);
        }
        if let Some(c) = client {
            self.clients[c].busy = None;
            let think = self.workload.as_ref().map(|w| w.think_max_ms).unwrap_or(0);
            let think = self.rng_work.gen_range(0..=think);
            self.schedule(now + think, Event::ClientNext { client: c });
        }
    }

    pub(crate) fn client_arrive(&mut self, op: OpId) {
        let Some(record) = self.history.get(op) else {
            return;
        };
        if record.outcome != Outcome::Pending {
            return;
        }
        let node = record.node;
        let slot = &mut self.slots[node];
        if !slot.alive() {
            self.requests.remove(&op);
            self.complete(op, Outcome::Failed("connection refused".into()), None);
            return;
        }
        self.in_flight.insert(op, node);
        if slot.paused {
            slot.stalled.push(Event::ClientArrive { op });
            return;
        }
        let Some(request) = self.requests.remove(&op) else {
            return;
        };
        let local = slot.clock.local(self.now);
        if let Some(n) = slot.node.as_mut() {
            n.handle_client_request(local, op, request);
        }
        self.flush(node);
    }

    /// Invokes an operation: records it and sends it to `node`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn invoke(
        &mut self,
        client: Option<usize>,
        node: usize,
        kind: OpKind,
        key: &str,
        level: ConsistencyLevel,
        value: Option<String>,
        context: ContextSource,
        causal: Option<CausalContext>,
        is_final: bool,
        delay: Millis,
    ) -> OpId {
        let id = self.history.next_id();
        let bucket = crate::bucket_of(key).to_string();
        let key_bytes = key.as_bytes().to_vec();
        let request = match kind {
            OpKind::Get => ClientRequest::Get {
                bucket,
                key: key_bytes,
                level,
            },
            OpKind::Put => ClientRequest::Put {
                bucket,
                key: key_bytes,
                context: causal.unwrap_or_default(),
                value: workload::client_value(value.as_deref().unwrap_or_default()),
                level,
            },
            OpKind::Delete => ClientRequest::Delete {
                bucket,
                key: key_bytes,
                context: causal,
                level,
            },
        };
        let op = Op {
            id,
            client,
            kind,
            key: key.to_string(),
            level,
            value,
            context,
            node,
            invoked: self.now,
            completed: None,
            outcome: Outcome::Pending,
            is_final,
            lww: None,
        };
        let line = format!("{op}");
        self.trace_line(
            &client.map(|c| format!("c{c}")).unwrap_or("cli".into()),
            |_| format!("invoke {line}"),
        );
        self.history.push(op);
        self.requests.insert(id, request);
        self.schedule(self.now + delay, Event::ClientArrive { op: id });
        let timeout = self
            .workload
            .as_ref()
            .map(|w| w.client_timeout_ms)
            .unwrap_or(5_000);
        self.schedule(self.now + timeout, Event::ClientTimeout { op: id });
        id
    }

    pub(crate) fn client_next(&mut self, client: usize) {
        let Some(params) = self.workload.clone() else {
            return;
        };
        if self.ops_issued >= params.ops || self.clients[client].busy.is_some() {
            return;
        }
        self.ops_issued += 1;
        let plan = self.clients[client].plan(&mut self.rng_work, &params);
        let node = self.rng_work.gen_range(0..self.slots.len());
        let delay = self.rng_work.gen_range(0..=2);
        let id = self.history.next_id();
        let value = (plan.kind == OpKind::Put).then(|| format!("s{}-op{id}", self.config.seed));
        let id = self.invoke(
            Some(client),
            node,
            plan.kind,
            &plan.key,
            plan.level,
            value,
            plan.context,
            plan.causal,
            false,
            delay,
        );
        self.clients[client].busy = Some(id);
    }

    /// Starts the randomized workload and, if any faults are enabled, the fault schedule.
    pub fn start_workload(&mut self) {
        let params = WorkloadParams::random(&mut self.rng_work, self.config.ops, self.config.nodes);
        let line = format!("workload {params:?}");
        self.trace_line("sim", |_| line.clone());
        write!(
            self.params,
            "; workload: {} clients, {} causal + {} lww keys, think<={}ms, {}% get {}% put, \
             {}% with context",
            params.clients,
            params.keys,
            params.lww_keys,
            params.think_max_ms,
            params.get_percent,
            params.put_percent,
            params.with_context_percent
        )
        .ok();
        self.clients = vec![Client::default(); params.clients];
        for c in 0..params.clients {
            let at = self.now + self.rng_work.gen_range(0..=10);
            self.schedule(at, Event::ClientNext { client: c });
        }
        self.workload = Some(params);
        let f = self.config.faults;
        if f.fsync {
            self.fsync_failure = self.rng_fault.gen_range(0.005..0.05);
            write!(self.params, "; fsync failures {:.3}", self.fsync_failure).ok();
        }
        if f.crash || f.pause || f.partition || f.membership {
            self.faults_active = true;
            let at = self.now + self.rng_fault.gen_range(100..=1000);
            self.schedule(at, Event::FaultTick);
        }
    }

    /// True when the workload has invoked all its operations and they have all ended.
    pub fn workload_done(&self) -> bool {
        self.workload.as_ref().is_some_and(|w| {
            self.ops_issued >= w.ops && self.clients.iter().all(|c| c.busy.is_none())
        })
    }

    // ----- scripted operations -------------------------------------------------------

    /// Sends a put from a scripted client to `node` now. `after` names an earlier operation
    /// whose returned context the put carries (none: a blind put).
    pub fn put(
        &mut self,
        node: usize,
        key: &str,
        value: &str,
        level: ConsistencyLevel,
        after: Option<OpId>,
    ) -> OpId {
        let (context, causal) = self.context_of(after);
        self.invoke(
            None,
            node,
            OpKind::Put,
            key,
            level,
            Some(value.to_string()),
            context,
            causal,
            false,
            0,
        )
    }

    /// Sends a get from a scripted client to `node` now.
    pub fn get(&mut self, node: usize, key: &str, level: ConsistencyLevel) -> OpId {
        self.invoke(
            None,
            node,
            OpKind::Get,
            key,
            level,
            None,
            ContextSource::Blind,
            None,
            false,
            0,
        )
    }

    /// Sends a delete; without `after`, the coordinator reads first.
    pub fn delete(
        &mut self,
        node: usize,
        key: &str,
        level: ConsistencyLevel,
        after: Option<OpId>,
    ) -> OpId {
        let (context, causal) = match after {
            Some(_) => self.context_of(after),
            None => (ContextSource::ReadsFirst, None),
        };
        self.invoke(
            None,
            node,
            OpKind::Delete,
            key,
            level,
            None,
            context,
            causal,
            false,
            0,
        )
    }

    pub(crate) fn context_of(&self, after: Option<OpId>) -> (ContextSource, Option<CausalContext>) {
        let Some(op) = after else {
            return (ContextSource::Blind, None);
        };
        let context = match self.responses.get(&op) {
            Some(ClientResponse::Object(o)) => o.causal_context(),
            Some(ClientResponse::Written { context }) => context.clone(),
            _ => panic!("op{op} returned no context"),
        };
        (ContextSource::FromOp(op), Some(context))
    }

    /// Runs until `op` has an outcome or `max_ms` pass.
    pub fn wait_for(&mut self, op: OpId, max_ms: Millis) -> &Outcome {
        self.run_until(|s| *s.outcome(op) != Outcome::Pending, max_ms);
        self.outcome(op)
    }

    /// A sloppy quorum whose coordinator was its own fallback keeps the hint without a
    /// message the simulator sees: look for the acknowledged value among the hints. On an
    /// LWW key (`stamp`, the version the put wrote) the hint merges the write with what it
    /// already held and may show a larger stamp instead (seed 1476: the hint kept an earlier
    /// put with a later clock), so a hint for the key that shows the write's stamp or a
    /// larger one counts (it may also be an older hint that the write did not need: the
    /// excuse is then wider than needed, never narrower).
    fn note_local_fallback(&mut self, key: &str, value: Option<&str>, stamp: Option<&Sibling>) {
        let Some(value) = value else { return };
        if self.weaker_promises.hinted.contains_key(value) {
            return;
        }
        let holds_the_write = |object: &Object| match stamp {
            Some(stamp) => object
                .lww_winner()
                .is_some_and(|winner| lww_order(winner, stamp) != Ordering::Less),
            None => workload::live_values(object).iter().any(|v| v == value),
        };
        let hinted = self.slots.iter().any(|slot| {
            slot.storage
                .scan_hints()
                .unwrap_or_default()
                .iter()
                .filter(|(k, _)| {
                    parse_hint_key(k).is_some_and(|(_, _, hinted_key)| hinted_key == key.as_bytes())
                })
                .filter_map(|(_, record)| HintRecord::decode(record))
                .any(|hint| holds_the_write(&hint.object))
        });
        if hinted {
            self.weaker_promises
                .hinted
                .insert(value.to_string(), self.now);
        }
    }
}
