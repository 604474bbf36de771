//! Fuzz targets for gossip messages. They run under plain `cargo test` for a fixed number of
//! inputs (CI); for a longer run set `BOLERO_RANDOM_ITERATIONS` (or
//! `BOLERO_RANDOM_TEST_TIME_MS`), e.g.
//! `BOLERO_RANDOM_ITERATIONS=1000000 cargo test -p mendkv-core --test fuzz_gossip -- --nocapture`;
//! each target prints how many inputs it ran.

use mendkv_core::gossip::{
    AppKey, AppValue, Delta, Digest, GossipMessage, NodeStatus, VersionedValue,
};
use mendkv_core::NodeId;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Inputs per target in CI: enough to catch a regression, small enough to stay well under a
/// second each.
const CI_ITERATIONS: usize = 3_000;

/// The nodes `validate` is asked to allow; any value works, the checks must not panic.
const MAX_NODES: usize = 64;

/// What a decoded message must satisfy: validation answers (never panics), the size
/// computed without encoding is the encoding's size, and encoding round-trips.
fn assert_well_behaved(message: &GossipMessage) {
    let _ = message.validate(MAX_NODES);
    let bytes = message.encode();
    assert_eq!(message.encoded_len(), bytes.len(), "{message:?}");
    assert_eq!(&GossipMessage::decode(&bytes).expect("re-decodes"), message);
}

/// Decoding any bytes gives a message or an error, never a panic; what decodes is
/// well-behaved. Random bytes seldom end exactly at a message's end, so the target also
/// takes the prefix postcard reads as a message.
#[test]
fn gossip_decoder_never_panics_and_round_trips() {
    static INPUTS: AtomicUsize = AtomicUsize::new(0);
    static DECODED: AtomicUsize = AtomicUsize::new(0);
    bolero::check!()
        .with_iterations(CI_ITERATIONS)
        .for_each(|bytes: &[u8]| {
            INPUTS.fetch_add(1, Ordering::Relaxed);
            if let Ok(message) = GossipMessage::decode(bytes) {
                assert_well_behaved(&message);
            }
            if let Ok((message, _)) = postcard::take_from_bytes::<GossipMessage>(bytes) {
                DECODED.fetch_add(1, Ordering::Relaxed);
                assert_well_behaved(&message);
            }
        });
    eprintln!(
        "gossip_decoder_never_panics_and_round_trips: {} inputs, {} with a message",
        INPUTS.load(Ordering::Relaxed),
        DECODED.load(Ordering::Relaxed)
    );
}

// Lists are kept short: long ones add time, not new shapes.
#[derive(Debug, bolero::TypeGenerator)]
struct GeneratedDigest {
    node: String,
    generation: u64,
    max_version: u64,
}

impl GeneratedDigest {
    fn digest(&self) -> Digest {
        Digest {
            node: NodeId::new(&self.node),
            generation: self.generation,
            max_version: self.max_version,
        }
    }
}

#[derive(Debug, bolero::TypeGenerator)]
struct GeneratedEntry {
    key: u8,
    extension: u16,
    value: u8,
    text: String,
    count: u64,
    #[generator(bolero::produce::<Vec<(u64, u64)>>().with().len(0usize..8))]
    roots: Vec<(u64, u64)>,
    #[generator(bolero::produce::<Vec<u8>>().with().len(0usize..32))]
    bytes: Vec<u8>,
    version: u64,
}

impl GeneratedEntry {
    fn entry(&self) -> (AppKey, VersionedValue) {
        let key = match self.key % 8 {
            0 => AppKey::Status,
            1 => AppKey::PeerAddress,
            2 => AppKey::HttpAddress,
            3 => AppKey::Vnodes,
            4 => AppKey::HintsPending,
            5 => AppKey::DataBytes,
            6 => AppKey::TreeRoots,
            _ => AppKey::Extension(self.extension),
        };
        let value = match self.value % 5 {
            0 => AppValue::Status(
                [
                    NodeStatus::Joining,
                    NodeStatus::Normal,
                    NodeStatus::Leaving,
                    NodeStatus::Left,
                ][usize::from(self.value / 5) % 4],
            ),
            1 => AppValue::Text(self.text.clone()),
            2 => AppValue::Count(self.count),
            3 => AppValue::Roots(self.roots.clone()),
            _ => AppValue::Bytes(self.bytes.clone()),
        };
        (
            key,
            VersionedValue {
                value,
                version: self.version,
            },
        )
    }
}

#[derive(Debug, bolero::TypeGenerator)]
struct GeneratedDelta {
    node: String,
    generation: u64,
    after: u64,
    heartbeat: Option<u64>,
    #[generator(bolero::produce::<Vec<GeneratedEntry>>().with().len(0usize..8))]
    entries: Vec<GeneratedEntry>,
}

impl GeneratedDelta {
    fn delta(&self) -> Delta {
        Delta {
            node: NodeId::new(&self.node),
            generation: self.generation,
            after: self.after,
            heartbeat: self.heartbeat,
            entries: self.entries.iter().map(GeneratedEntry::entry).collect(),
        }
    }
}

#[derive(Debug, bolero::TypeGenerator)]
struct GeneratedMessage {
    kind: u8,
    complete: bool,
    #[generator(bolero::produce::<Vec<GeneratedDigest>>().with().len(0usize..8))]
    digests: Vec<GeneratedDigest>,
    #[generator(bolero::produce::<Vec<GeneratedDelta>>().with().len(0usize..8))]
    deltas: Vec<GeneratedDelta>,
    /// Where to change the encoding, to what, and where to cut it.
    mutate_at: u16,
    mutate_to: u8,
    cut_at: u16,
}

impl GeneratedMessage {
    fn message(&self) -> GossipMessage {
        let digests = self.digests.iter().map(GeneratedDigest::digest).collect();
        let deltas = self.deltas.iter().map(GeneratedDelta::delta).collect();
        match self.kind % 3 {
            0 => GossipMessage::Syn {
                digests,
                complete: self.complete,
            },
            1 => GossipMessage::Ack {
                deltas,
                requests: digests,
            },
            _ => GossipMessage::Ack2 { deltas },
        }
    }
}

/// Generated messages of every kind round-trip, their computed size is their encoded
/// size, and validating them never panics; the encoding with one byte changed, or cut
/// short, decodes to an error or to another well-behaved message.
#[test]
fn generated_gossip_messages_round_trip() {
    static INPUTS: AtomicUsize = AtomicUsize::new(0);
    bolero::check!()
        .with_type::<GeneratedMessage>()
        .with_iterations(CI_ITERATIONS)
        .for_each(|generated| {
            INPUTS.fetch_add(1, Ordering::Relaxed);
            let message = generated.message();
            assert_well_behaved(&message);
            let mut bytes = message.encode();
            let _ = GossipMessage::decode(&bytes[..usize::from(generated.cut_at) % bytes.len()]);
            let at = usize::from(generated.mutate_at) % bytes.len();
            bytes[at] = generated.mutate_to;
            if let Ok(damaged) = GossipMessage::decode(&bytes) {
                assert_well_behaved(&damaged);
            }
        });
    eprintln!(
        "generated_gossip_messages_round_trip: {} inputs",
        INPUTS.load(Ordering::Relaxed)
    );
}
