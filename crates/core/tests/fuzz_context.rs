//! Fuzz targets for the causal context a client sends back (`X-Mendkv-Context`). They run
//! under plain `cargo test` for a fixed number of inputs (CI); for a longer run set
//! `BOLERO_RANDOM_ITERATIONS`, e.g.
//! `BOLERO_RANDOM_ITERATIONS=1000000 cargo test -p mendkv-core --test fuzz_context -- --nocapture`;
//! each target prints how many inputs it ran.

use mendkv_core::version::{
    Actor, CausalContext, ContextError, ContextKey, VersionVector, MAX_CONTEXT_ACTORS, MAX_COUNTER,
};
use std::sync::atomic::{AtomicUsize, Ordering};

const CI_ITERATIONS: usize = 3_000;

fn keys() -> ContextKey {
    ContextKey::from_secret(b"fuzz secret")
}

/// Opening any text gives a context or an error, never a panic; random text is never
/// authentic (a 128-bit tag), and whatever opens is within the context limits.
#[test]
fn context_decoder_never_panics() {
    static INPUTS: AtomicUsize = AtomicUsize::new(0);
    let keys = keys();
    bolero::check!()
        .with_iterations(CI_ITERATIONS)
        .for_each(|bytes: &[u8]| {
            INPUTS.fetch_add(1, Ordering::Relaxed);
            let text = String::from_utf8_lossy(bytes);
            match keys.open(&text, "b", b"k") {
                Ok(context) => panic!("random text opened as {context:?}"),
                Err(ContextError::NotAuthentic)
                | Err(ContextError::TooLong)
                | Err(ContextError::NotBase64)
                | Err(ContextError::UnsupportedVersion(_))
                | Err(ContextError::Empty)
                | Err(ContextError::Malformed)
                | Err(ContextError::TooManyActors) => {}
            }
        });
    eprintln!(
        "context_decoder_never_panics: {} inputs",
        INPUTS.load(Ordering::Relaxed)
    );
}

/// Any vector within the limits seals and opens to itself for its own bucket and key, and
/// for no other key; one beyond the limits is refused when opened, never accepted.
#[test]
fn contexts_round_trip_for_their_key_only() {
    static INPUTS: AtomicUsize = AtomicUsize::new(0);
    let keys = keys();
    bolero::check!()
        .with_type::<(Vec<(u64, u32, u64)>, Vec<u8>, Vec<u8>)>()
        .with_iterations(CI_ITERATIONS)
        .for_each(|(pairs, key, other_key)| {
            INPUTS.fetch_add(1, Ordering::Relaxed);
            let vector: VersionVector = pairs
                .iter()
                .take(MAX_CONTEXT_ACTORS + 8)
                .map(|(node, epoch, counter)| {
                    (
                        Actor::new(&node.to_string(), *epoch),
                        *counter % (MAX_COUNTER + 4),
                    )
                })
                .collect();
            let context = CausalContext::from_vector(vector.clone());
            let sealed = keys.seal(&context, "bucket", key);
            let opened = keys.open(&sealed, "bucket", key);
            if CausalContext::within_limits(&vector) {
                assert_eq!(opened, Ok(context.clone()));
            } else {
                assert!(opened.is_err(), "beyond the limits yet opened: {vector:?}");
            }
            if other_key != key {
                assert_eq!(
                    keys.open(&sealed, "bucket", other_key),
                    Err(ContextError::NotAuthentic)
                );
            }
        });
    eprintln!(
        "contexts_round_trip_for_their_key_only: {} inputs",
        INPUTS.load(Ordering::Relaxed)
    );
}
