//! Fuzz targets for the frame codec and the handshake. They run under plain `cargo test`
//! for a fixed number of inputs (CI); for a longer run set `BOLERO_RANDOM_ITERATIONS` (or
//! `BOLERO_RANDOM_TEST_TIME_MS`), e.g.
//! `BOLERO_RANDOM_ITERATIONS=1000000 cargo test -p mendkv-wire --test fuzz -- --nocapture`;
//! each target prints how many inputs it ran.

use mendkv_core::membership::MemberInfo;
use mendkv_core::message::{Message, ReplicaError};
use mendkv_core::ring::TokenRange;
use mendkv_core::version::{Actor, CausalContext, Object, Value};
use mendkv_core::NodeId;
use mendkv_wire::{
    decode_frame, encode_frame, handshake_proof, verify_proof, Frame, HandshakeTranscript, Side,
    WireError, MAX_HANDSHAKE_FRAME_BYTES, WIRE_VERSION,
};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Inputs per target in CI: enough to catch a regression, small enough to take well under a
/// second each.
const CI_ITERATIONS: usize = 3_000;

/// Any frame that decodes encodes again (if within its limit) to bytes that decode to the
/// same frame.
fn assert_round_trips(frame: &Frame) {
    match encode_frame(frame) {
        Ok(bytes) => assert_eq!(&decode_frame(&bytes).expect("re-decodes"), frame),
        Err(WireError::TooLarge { bytes, limit }) => assert!(bytes > limit),
        Err(error) => panic!("a decoded frame does not encode: {error}"),
    }
}

/// Decoding never panics on any bytes, bare or behind the current version byte, and what
/// decodes round-trips. Random bytes rarely form a whole frame with nothing after it, so the
/// target also takes the longest prefix that postcard reads as a frame: that prefix must
/// decode to the same frame, and round-trip (this reaches `Message` frames too).
#[test]
fn frame_decoder_never_panics_and_round_trips() {
    static INPUTS: AtomicUsize = AtomicUsize::new(0);
    static DECODED: AtomicUsize = AtomicUsize::new(0);
    static MESSAGES: AtomicUsize = AtomicUsize::new(0);
    bolero::check!()
        .with_iterations(CI_ITERATIONS)
        .for_each(|bytes: &[u8]| {
            INPUTS.fetch_add(1, Ordering::Relaxed);
            let _ = decode_frame(bytes);
            let mut versioned = Vec::with_capacity(bytes.len() + 1);
            versioned.push(WIRE_VERSION);
            versioned.extend_from_slice(bytes);
            let _ = decode_frame(&versioned);
            if let Ok((frame, rest)) = postcard::take_from_bytes::<Frame>(bytes) {
                DECODED.fetch_add(1, Ordering::Relaxed);
                if matches!(frame, Frame::Message(_)) {
                    MESSAGES.fetch_add(1, Ordering::Relaxed);
                }
                let envelope = &versioned[..versioned.len() - rest.len()];
                assert_eq!(decode_frame(envelope).as_ref(), Ok(&frame));
                assert_round_trips(&frame);
            }
        });
    eprintln!(
        "frame_decoder_never_panics_and_round_trips: {} inputs, {} with a frame, {} of them messages",
        INPUTS.load(Ordering::Relaxed),
        DECODED.load(Ordering::Relaxed),
        MESSAGES.load(Ordering::Relaxed)
    );
}

/// The parts of a generated handshake frame.
#[derive(Debug, bolero::TypeGenerator)]
struct HandshakeInput {
    kind: u8,
    cluster: String,
    id: String,
    peer_address: String,
    http_address: String,
    nonce: [u8; 32],
    other_nonce: [u8; 32],
    proof: [u8; 32],
    dialed_address: String,
    reason: String,
    secret: Vec<u8>,
    flip: u8,
    /// Where to change the encoded frame, to what, and where to cut it.
    mutate_at: u16,
    mutate_to: u8,
    cut_at: u16,
}

impl HandshakeInput {
    fn member(&self) -> MemberInfo {
        MemberInfo {
            id: NodeId::new(&self.id),
            peer_address: self.peer_address.clone(),
            http_address: self.http_address.clone(),
        }
    }

    fn frame(&self) -> Frame {
        match self.kind % 5 {
            0 => Frame::Hello {
                cluster: self.cluster.clone(),
                node: self.member(),
                nonce: self.nonce,
                dialed_address: self.dialed_address.clone(),
            },
            1 => Frame::Challenge {
                node: self.member(),
                nonce: self.nonce,
                proof: self.proof,
            },
            2 => Frame::Proof { proof: self.proof },
            3 => Frame::Welcome,
            _ => Frame::Refused {
                reason: self.reason.clone(),
            },
        }
    }
}

/// Generated handshake frames round-trip exactly when they fit the handshake limit, and a
/// proof over a generated transcript verifies while any flipped bit of it does not.
#[test]
fn handshake_frames_round_trip_and_proofs_verify() {
    static INPUTS: AtomicUsize = AtomicUsize::new(0);
    bolero::check!()
        .with_type::<HandshakeInput>()
        .with_iterations(CI_ITERATIONS)
        .for_each(|input| {
            INPUTS.fetch_add(1, Ordering::Relaxed);
            let frame = input.frame();
            match encode_frame(&frame) {
                Ok(mut bytes) => {
                    assert!(bytes.len() <= MAX_HANDSHAKE_FRAME_BYTES);
                    assert_eq!(decode_frame(&bytes).expect("decodes"), frame);
                    // A damaged or cut frame is an error or another frame, never a panic.
                    let at = usize::from(input.mutate_at) % bytes.len();
                    bytes[at] = input.mutate_to;
                    if let Ok(damaged) = decode_frame(&bytes) {
                        assert_round_trips(&damaged);
                    }
                    let _ = decode_frame(&bytes[..usize::from(input.cut_at) % bytes.len()]);
                }
                Err(WireError::TooLarge { bytes, limit }) => {
                    assert_eq!(limit, MAX_HANDSHAKE_FRAME_BYTES);
                    assert!(bytes > limit);
                }
                Err(error) => panic!("a handshake frame does not encode: {error}"),
            }
            let (dialer, acceptor) = (input.member(), input.member());
            let transcript = HandshakeTranscript {
                cluster: &input.cluster,
                dialer: &dialer,
                acceptor: &acceptor,
                dialer_nonce: &input.nonce,
                acceptor_nonce: &input.other_nonce,
                dialed_address: &input.dialed_address,
            };
            let side = if input.kind % 2 == 0 {
                Side::Dialer
            } else {
                Side::Acceptor
            };
            let mut proof = handshake_proof(&input.secret, side, &transcript);
            assert!(verify_proof(&input.secret, side, &transcript, &proof));
            proof[usize::from(input.flip) % proof.len()] ^= 1 << (input.flip % 8);
            assert!(!verify_proof(&input.secret, side, &transcript, &proof));
        });
    eprintln!(
        "handshake_frames_round_trip_and_proofs_verify: {} inputs",
        INPUTS.load(Ordering::Relaxed)
    );
}

/// The parts of a generated peer message: one object built from generated writes, and the
/// fields every message kind needs.
#[derive(Debug, bolero::TypeGenerator)]
struct MessageInput {
    kind: u8,
    request: u64,
    bucket: String,
    #[generator(bolero::produce::<Vec<u8>>().with().len(0usize..64))]
    key: Vec<u8>,
    #[generator(bolero::produce::<Vec<u8>>().with().len(0usize..64))]
    value: Vec<u8>,
    content_type: String,
    /// (actor id, epoch, tombstone) per write applied to the object.
    #[generator(bolero::produce::<Vec<(String, u32, bool)>>().with().len(0usize..6))]
    writes: Vec<(String, u32, bool)>,
    digest: u64,
    error: String,
    range: (u64, u64),
    mutate_at: u16,
    mutate_to: u8,
}

impl MessageInput {
    fn object(&self) -> Object {
        let mut object = Object::empty();
        for (actor, epoch, tombstone) in &self.writes {
            let value = if *tombstone {
                Value::Tombstone
            } else {
                Value::Data {
                    bytes: self.value.clone().into(),
                    content_type: self.content_type.clone(),
                }
            };
            object.apply_write(Actor::new(actor, *epoch), &CausalContext::empty(), value);
        }
        object
    }

    fn message(&self) -> Message {
        let (request, bucket, key) = (self.request, self.bucket.clone(), self.key.clone());
        let failure = ReplicaError::Storage(self.error.clone());
        match self.kind % 14 {
            0 => Message::Read {
                request,
                bucket,
                key,
            },
            1 => Message::ReadReply {
                request,
                result: Ok(Some(self.object())),
            },
            2 => Message::ReadDigest {
                request,
                bucket,
                key,
            },
            3 => Message::ReadDigestReply {
                request,
                result: Ok(self.digest),
            },
            4 => Message::RepairWrite {
                request,
                bucket,
                key,
                object: self.object(),
            },
            5 => Message::RepairWriteReply {
                request,
                result: Err(failure),
            },
            6 => Message::Coordinate {
                request,
                bucket,
                key,
                context: CausalContext::empty(),
                value: Value::Tombstone,
            },
            7 => Message::CoordinateReply {
                request,
                result: Ok(self.object()),
            },
            8 => Message::Replicate {
                request,
                bucket,
                key,
                object: self.object(),
            },
            9 => Message::ReplicateReply {
                request,
                result: Ok(()),
            },
            10 => Message::HintedWrite {
                request,
                intended: NodeId::new(&self.error),
                bucket,
                key,
                object: self.object(),
            },
            11 => Message::HintBatch {
                request,
                hints: vec![mendkv_core::anti_entropy::RepairObject {
                    bucket,
                    key,
                    object: self.object(),
                }],
            },
            12 => Message::Reap {
                range: TokenRange {
                    start: self.range.0,
                    end: self.range.1,
                },
                items: vec![(bucket, key, self.digest)],
            },
            _ => Message::HintBatchReply {
                request,
                result: Err(ReplicaError::Invalid(self.error.clone())),
            },
        }
    }
}

/// Generated message frames round-trip, and the encoding with one byte changed decodes to
/// an error or to another frame that round-trips.
#[test]
fn message_frames_round_trip() {
    static INPUTS: AtomicUsize = AtomicUsize::new(0);
    bolero::check!()
        .with_type::<MessageInput>()
        .with_iterations(CI_ITERATIONS)
        .for_each(|input| {
            INPUTS.fetch_add(1, Ordering::Relaxed);
            let frame = Frame::Message(input.message());
            let mut bytes = encode_frame(&frame).expect("small messages encode");
            assert_eq!(decode_frame(&bytes).expect("decodes"), frame);
            let at = usize::from(input.mutate_at) % bytes.len();
            bytes[at] = input.mutate_to;
            if let Ok(damaged) = decode_frame(&bytes) {
                assert_round_trips(&damaged);
            }
        });
    eprintln!(
        "message_frames_round_trip: {} inputs",
        INPUTS.load(Ordering::Relaxed)
    );
}
