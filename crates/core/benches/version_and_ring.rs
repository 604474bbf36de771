//! Criterion benchmarks for the hot algebra: version merge and preference-list lookup.
//! Run: `cargo bench -p mendkv-core --bench version_and_ring`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use mendkv_core::ring::{key_token, Ring};
use mendkv_core::version::{Actor, CausalContext, Object, Value};
use mendkv_core::NodeId;

fn value(n: usize) -> Value {
    Value::Data {
        bytes: vec![b'x'; 100].into(),
        content_type: format!("text/{n}"),
    }
}

/// Two replicas that diverged: each has `siblings` concurrent writes the other lacks.
fn diverged(siblings: usize) -> (Object, Object) {
    let mut a = Object::empty();
    let mut b = Object::empty();
    for i in 0..siblings {
        a.apply_write(Actor::new("a", 1), &CausalContext::empty(), value(i));
        b.apply_write(Actor::new("b", 1), &CausalContext::empty(), value(i));
    }
    (a, b)
}

fn merge(c: &mut Criterion) {
    for siblings in [1, 3] {
        let (a, b) = diverged(siblings);
        c.bench_function(&format!("merge {siblings}+{siblings} siblings"), |bench| {
            bench.iter(|| black_box(&a).merge(black_box(&b)))
        });
    }
    let (a, _) = diverged(1);
    let same = a.clone();
    c.bench_function("merge identical", |bench| {
        bench.iter(|| black_box(&a).merge(black_box(&same)))
    });
    c.bench_function("apply_write with context", |bench| {
        let context = a.causal_context();
        bench.iter(|| {
            let mut object = a.clone();
            object.apply_write(Actor::new("a", 1), &context, value(0));
            object
        })
    });
}

fn preference_list(c: &mut Criterion) {
    for nodes in [3, 30, 300] {
        let members: Vec<NodeId> = (0..nodes)
            .map(|i| NodeId::new(format!("node{i}")))
            .collect();
        let ring = Ring::new(&members, 16, 3);
        let mut i = 0u64;
        c.bench_function(
            &format!("preference list, {nodes} nodes x 16 vnodes"),
            |bench| {
                bench.iter(|| {
                    i += 1;
                    ring.preference_list(key_token("bucket", &i.to_le_bytes()))
                })
            },
        );
    }
}

criterion_group!(benches, merge, preference_list);
criterion_main!(benches);
