//! Scripted scenarios on the simulator: exact fault timings the random sweep reaches only by
//! luck. Later issues (hinted handoff, anti-entropy, gossip) add their distributed tests here.
//!
//! Each scenario drives the cluster step by step (`run_until` a condition, then a fault),
//! then `finish()` heals, reads every key at `all` and runs the checkers.

use mendkv_core::quorum::ConsistencyLevel::{All, One, Quorum};
use mendkv_core::version::{Dot, Value};
use mendkv_sim::workload::OkResult;
use mendkv_sim::{FaultConfig, OpId, Outcome, SimConfig, Simulation};
use std::collections::BTreeSet;

fn cluster(nodes: usize) -> Simulation {
    let mut config = SimConfig::new(11).with_faults(FaultConfig::none());
    config.nodes = nodes;
    config.trace = true;
    Simulation::new(config)
}

fn read_values(sim: &Simulation, op: OpId) -> Vec<String> {
    match sim.outcome(op) {
        Outcome::Ok(OkResult::Read { values }) => values.clone(),
        other => panic!("op{op} did not read: {other}\n{}", sim.trace()),
    }
}

/// A key whose replicas do not include node `outside` (in a cluster larger than RF).
fn key_not_on(sim: &Simulation, outside: usize) -> String {
    (0..)
        .map(|i| format!("key{i}"))
        .find(|k| !sim.preference_list(k).contains(&outside))
        .unwrap()
}

// A partition cuts the coordinator off right after its local write: the client hears
// "unknown", the majority keeps taking writes, and after healing both writes are visible
// and nothing is lost.
#[test]
fn partition_during_a_write() {
    let mut sim = cluster(3);
    let w = sim.put(0, "k", "cut-off", Quorum, None);
    assert!(sim.run_until(|s| s.stored(0, "k").is_some(), 50));
    sim.partition(&[0], &[1, 2], true);
    assert!(
        matches!(sim.wait_for(w, 5_000), Outcome::Unknown(_)),
        "{}",
        sim.outcome(w)
    );
    let w2 = sim.put(1, "k", "majority", Quorum, None);
    assert!(sim.wait_for(w2, 5_000).is_ok());
    // The minority side cannot reach a quorum, but can still write at `one`.
    let minority = sim.put(0, "other", "alone", Quorum, None);
    assert!(!sim.wait_for(minority, 5_000).is_ok());
    let alone = sim.put(0, "other", "alone-one", One, None);
    assert!(sim.wait_for(alone, 5_000).is_ok());
    sim.heal_partition();
    let report = sim.finish();
    assert!(report.safe(), "{report}\n{}", sim.trace());
    assert!(
        report.converged(),
        "read repair at the final read: {report}"
    );
    let r = sim.get(2, "k", All);
    sim.wait_for(r, 5_000);
    // The unknown write happened after all: it is a sibling of the majority's write.
    assert_eq!(read_values(&sim, r), vec!["cut-off", "majority"]);
}

// The coordinator crashes between its local write and the replicas' replies, losing its
// unsynced copy. The client hears "unknown"; the replicas kept the write, so it appears.
#[test]
fn crash_between_local_write_and_replies() {
    let mut sim = cluster(3);
    let w = sim.put(0, "k", "v", Quorum, None);
    assert!(sim.run_until(|s| s.stored(0, "k").is_some(), 50));
    assert!(sim.storage(0).pending_writes() > 0, "not yet durable");
    sim.crash(0, Some(0));
    assert_eq!(
        sim.outcome(w),
        &Outcome::Unknown("coordinator crashed".into())
    );
    assert!(
        sim.stored(0, "k").is_none(),
        "the unsynced local write is gone"
    );
    sim.run_for(200);
    assert!(sim.stored(1, "k").is_some() && sim.stored(2, "k").is_some());
    sim.restart(0);
    let r = sim.get(0, "k", All);
    sim.wait_for(r, 5_000);
    assert_eq!(read_values(&sim, r), vec!["v"]);
    let report = sim.finish();
    assert!(
        report.safe() && report.converged(),
        "{report}\n{}",
        sim.trace()
    );
}

// A replica crashes after merging a write but before its fsync: its acknowledgement was
// held, so it never counted; the write still meets quorum through the other replica.
#[test]
fn replica_crash_before_fsync_is_not_counted() {
    let mut sim = cluster(3);
    let w = sim.put(0, "k", "v", Quorum, None);
    assert!(sim.run_until(|s| s.stored(1, "k").is_some(), 50));
    sim.crash(1, Some(0));
    assert!(sim.stored(1, "k").is_none());
    assert!(
        sim.wait_for(w, 5_000).is_ok(),
        "{}\n{}",
        sim.outcome(w),
        sim.trace()
    );
    sim.restart(1);
    let report = sim.finish();
    assert!(
        report.safe() && report.converged(),
        "{report}\n{}",
        sim.trace()
    );
}

// An acknowledged quorum write survives every replica crashing with all unsynced writes lost.
#[test]
fn acknowledged_write_survives_crash_of_every_replica() {
    let mut sim = cluster(3);
    let w = sim.put(0, "k", "durable", Quorum, None);
    assert!(sim.wait_for(w, 5_000).is_ok());
    for i in 0..3 {
        sim.crash(i, Some(0));
    }
    for i in 0..3 {
        sim.restart(i);
    }
    let r = sim.get(2, "k", All);
    sim.wait_for(r, 5_000);
    assert_eq!(read_values(&sim, r), vec!["durable"]);
    let report = sim.finish();
    assert!(report.safe(), "{report}");
}

// A paused replica holds what arrives and handles it, in order, when it resumes.
#[test]
fn paused_replica_catches_up_on_resume() {
    let mut sim = cluster(3);
    sim.pause(2);
    let w = sim.put(0, "k", "v", Quorum, None);
    assert!(sim.wait_for(w, 5_000).is_ok());
    sim.run_for(100);
    assert!(sim.stored(2, "k").is_none(), "paused: nothing handled");
    sim.resume(2);
    sim.run_for(100);
    assert!(sim.stored(2, "k").is_some());
    let report = sim.finish();
    assert!(report.safe() && report.converged(), "{report}");
}

// A delete with the context of a quorum read removes what that read saw, for good.
#[test]
fn delete_after_quorum_read_stays_deleted() {
    let mut sim = cluster(3);
    let w = sim.put(0, "k", "v", Quorum, None);
    assert!(sim.wait_for(w, 5_000).is_ok());
    let r = sim.get(1, "k", Quorum);
    sim.wait_for(r, 5_000);
    let d = sim.delete(2, "k", Quorum, Some(r));
    assert!(sim.wait_for(d, 5_000).is_ok());
    sim.crash(0, Some(0));
    sim.restart(0);
    let report = sim.finish();
    assert!(report.safe() && report.resurrected.is_empty(), "{report}");
    let r = sim.get(0, "k", All);
    sim.wait_for(r, 5_000);
    assert!(read_values(&sim, r).is_empty());
}

/// Crashes node `i`, its disk keeping every write (synced or not), so nothing is lost.
fn crash_keeping_everything(sim: &mut Simulation, i: usize) {
    let pending = sim.storage(i).pending_writes();
    sim.crash(i, Some(pending));
}

/// The distinct dots under which any node stores `value` for `key`.
fn dots_of(sim: &Simulation, key: &str, value: &str) -> BTreeSet<Dot> {
    (0..sim.nodes())
        .filter_map(|i| sim.stored(i, key))
        .flat_map(|o| o.siblings().to_vec())
        .filter(
            |s| matches!(&s.value, Value::Data { bytes, .. } if bytes.as_ref() == value.as_bytes()),
        )
        .map(|s| s.dot)
        .collect()
}

// The scenarios below pin down core bugs the simulator found (fixed in 4eb3d17); they stay
// as regression tests.

// Seeds 146, 160 and 91 of `--faults all`: a duplicated `Coordinate` made the actor apply
// one client write twice, under two dots; a delete whose quorum read saw only the first dot
// left the second alive, and the deleted value came back. Now the actor answers a repeated
// `Coordinate` from its record of the first.
#[test]
fn duplicate_coordinate_applies_once() {
    let mut sim = cluster(5);
    let key = key_not_on(&sim, 0);
    let replicas = sim.preference_list(&key);
    let actor = replicas[0];
    sim.network_mut().params.duplicate = 1.0;
    let w = sim.put(0, &key, "twice", Quorum, None);
    assert!(sim.wait_for(w, 5_000).is_ok());
    sim.run_for(100);
    sim.network_mut().params.duplicate = 0.0;
    assert_eq!(dots_of(&sim, &key, "twice").len(), 1, "{}", sim.trace());
    // A delete whose read does not reach the actor (down, its disk intact) still deletes.
    crash_keeping_everything(&mut sim, actor);
    sim.run_for(100);
    let d = sim.delete(replicas[1], &key, Quorum, None);
    assert!(sim.wait_for(d, 5_000).is_ok(), "{}", sim.outcome(d));
    sim.restart(actor);
    let report = sim.finish();
    assert!(report.safe(), "{report}\n{:?}", report.resurrected);
}

// Found while writing scenarios: the same resurrection without a duplicated message. The
// actor applied a forwarded write and crashed before answering (its disk kept the write);
// the coordinator failed over to the next replica, which applied the write again under a
// second dot. Now no second actor is asked once the first may have applied the write: the
// client hears "unknown" instead, and the write lives under one dot.
#[test]
fn no_second_actor_after_the_first_may_have_applied() {
    let mut sim = cluster(5);
    let key = key_not_on(&sim, 0);
    let replicas = sim.preference_list(&key);
    let first = replicas[0];
    let w = sim.put(0, &key, "retried", Quorum, None);
    assert!(sim.run_until(|s| s.stored(first, &key).is_some(), 50));
    crash_keeping_everything(&mut sim, first);
    sim.wait_for(w, 5_000);
    sim.restart(first);
    sim.run_for(200);
    assert!(dots_of(&sim, &key, "retried").len() <= 1, "{}", sim.trace());
    crash_keeping_everything(&mut sim, first);
    sim.run_for(100);
    let d = sim.delete(replicas[1], &key, Quorum, None);
    sim.wait_for(d, 5_000);
    sim.restart(first);
    let report = sim.finish();
    assert!(report.safe(), "{report}\n{:?}", report.resurrected);
}

// `--faults fsync,...` (seeds 7, 138, 342, 867, 962): the actor's fsync failed, its answer
// became an error, and the coordinator asked the next replica to coordinate the same
// write, whose first copy stayed on the first actor: two dots again. Now the failed
// actor may have applied the write, so no second actor is asked.
#[test]
fn fsync_error_at_actor_does_not_apply_twice() {
    let mut sim = cluster(5);
    let key = key_not_on(&sim, 0);
    let first = sim.preference_list(&key)[0];
    sim.fail_next_fsync(first);
    let w = sim.put(0, &key, "once", Quorum, None);
    sim.wait_for(w, 5_000);
    sim.run_for(200);
    assert!(dots_of(&sim, &key, "once").len() <= 1, "{}", sim.trace());
    let report = sim.finish();
    assert!(report.safe(), "{report}");
}

// Found while writing scenarios (liveness): when the first actor of a forwarded write
// failed, its failure was counted twice (as actor, and again when replicating to it), so a
// quorum write failed as "unavailable 1/2" although two replicas were up. Here the first
// actor is down before the request reaches it (connection refused: certainly not applied),
// so the next replica coordinates and the write meets its quorum.
#[test]
fn failed_actor_counts_once() {
    let mut sim = cluster(5);
    let key = key_not_on(&sim, 0);
    let first = sim.preference_list(&key)[0];
    sim.crash(first, Some(0)); // n0 has not heard yet: it still picks `first`
    let w = sim.put(0, &key, "v", Quorum, None);
    assert!(
        sim.wait_for(w, 5_000).is_ok(),
        "{}\n{}",
        sim.outcome(w),
        sim.trace()
    );
    sim.restart(first);
    let report = sim.finish();
    assert!(report.safe(), "{report}");
}

// Found while writing scenarios (liveness, read path): a quorum read asked only as many
// replicas as the level needs; when one of them was paused (alive, but silent) the read
// timed out although another replica could have answered. Now reads retry speculatively.
#[test]
fn quorum_read_survives_a_paused_replica() {
    let mut sim = cluster(3);
    let w = sim.put(0, "k", "v", Quorum, None);
    assert!(sim.wait_for(w, 5_000).is_ok());
    for paused in 0..3 {
        sim.pause(paused);
        for via in (0..3).filter(|&v| v != paused) {
            let r = sim.get(via, "k", Quorum);
            sim.wait_for(r, 5_000);
            assert!(
                sim.outcome(r).is_ok(),
                "n{paused} paused, read via n{via}: {}",
                sim.outcome(r)
            );
        }
        sim.resume(paused);
    }
}

// Seed 221 of `--faults all` (a "missed" quorum read): a failed fsync left the node
// believing its writes synced (`begin_sync` had cleared the flag), so an acknowledgement
// emitted later (the coordinator's reply, once a replica's answer made the quorum) was
// released at once: acknowledged at quorum, durable on one replica. Now a failed fsync
// keeps the writes unsynced.
#[test]
fn failed_fsync_does_not_count_as_durable() {
    let mut sim = cluster(3);
    sim.partition(&[0], &[2], false); // n0's copy for n2 is lost: quorum needs n0 and n1
    sim.fail_next_fsync(0);
    let w = sim.put(0, "k", "v", Quorum, None);
    let acknowledged = sim.wait_for(w, 5_000).is_ok();
    sim.heal_partition();
    if acknowledged {
        sim.crash(0, Some(0)); // power loss: n0 keeps only what it synced
        sim.restart(0);
        let durable = (0..3)
            .filter(|&i| sim.stored(i, "k").is_some_and(|o| !o.is_empty()))
            .count();
        assert!(
            durable >= 2,
            "acknowledged at quorum, durable on {durable} replica(s)\n{}",
            sim.trace()
        );
    }
}
