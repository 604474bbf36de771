//! mendkv's node-to-node codec: a versioned envelope around postcard-encoded frames, the
//! frame size limits, and the authenticated handshake. Pure functions, no I/O: the server's
//! transport puts the bytes on TCP (length-prefixed), and the decoder never panics on input
//! (a property test and a bolero target feed it garbage).
//!
//! # Frame
//! `[u32 big-endian length][envelope]`, envelope = `[WIRE_VERSION: u8][postcard(Frame)]`.
//! Until the handshake is done a frame is at most [`MAX_HANDSHAKE_FRAME_BYTES`], so a peer
//! that has proved nothing can make a node buffer only a few KiB; after it,
//! [`MAX_FRAME_BYTES`].
//!
//! # Handshake (mutual HMAC-SHA256 challenge-response over the cluster secret)
//! 1. dialer -> `Hello { cluster, node: dialer, nonce: nonce_d, dialed_address }`
//! 2. acceptor checks the cluster name and that `dialed_address` is one of its own peer
//!    addresses, then -> `Challenge { node: acceptor, nonce: nonce_a, proof: acceptor proof }`
//!    (or `Refused`)
//! 3. dialer checks that the node it expected at that address answered and that the
//!    acceptor's proof is valid, and only then -> `Proof { proof: dialer proof }`
//! 4. acceptor checks it -> `Welcome`, or `Refused` and closes.
//!
//! Both proofs are HMACs under the secret over the same [`HandshakeTranscript`] (cluster,
//! both members' ids and addresses, both nonces, the address the dialer dialed), each with
//! its own side label. The secret never travels; fresh nonces make replayed proofs useless;
//! and the dialed address makes a relayed handshake useless: a relay that accepts a node's
//! dial at address X and passes it on to member B needs a proof for "dialed X", which B
//! never gives (X is not B's address) and the dialer never accepts for another address.

use hmac::{Hmac, Mac};
use mendkv_core::membership::MemberInfo;
use mendkv_core::message::Message;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The envelope version; a peer speaking another one is refused in the handshake. Version 2
/// added the dialed address to `Hello` and binds proofs to the whole handshake.
pub const WIRE_VERSION: u8 = 2;
/// Frames larger than this are refused and the connection dropped (values are at most
/// `storage.max_value_bytes`, 1 MiB by default, plus metadata).
pub const MAX_FRAME_BYTES: usize = 8 << 20;
/// The limit for every frame before the handshake completes: a `Hello` or `Challenge`
/// carries a cluster name, one member's id and addresses, a nonce and an address.
pub const MAX_HANDSHAKE_FRAME_BYTES: usize = 4 << 10;
pub const NONCE_BYTES: usize = 32;

pub type Nonce = [u8; NONCE_BYTES];
pub type HandshakeProof = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Hello {
        cluster: String,
        node: MemberInfo,
        nonce: Nonce,
        /// The address the dialer connected to, exactly as it dialed it.
        dialed_address: String,
    },
    Challenge {
        node: MemberInfo,
        nonce: Nonce,
        proof: HandshakeProof,
    },
    Proof {
        proof: HandshakeProof,
    },
    Welcome,
    Refused {
        reason: String,
    },
    Message(Message),
}

impl Frame {
    /// The largest encoding this frame may have: handshake frames get the small limit.
    pub fn limit_bytes(&self) -> usize {
        match self {
            Frame::Message(_) => MAX_FRAME_BYTES,
            _ => MAX_HANDSHAKE_FRAME_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {bytes} bytes is over the limit of {limit}")]
    TooLarge { bytes: usize, limit: usize },
    #[error("empty frame")]
    Empty,
    #[error("wire version {0} is not supported (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes one envelope; a frame over its limit (see [`Frame::limit_bytes`]) is an error, so
/// the sender finds out rather than the receiver dropping the connection.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut bytes = Vec::with_capacity(64);
    bytes.push(WIRE_VERSION);
    let bytes =
        postcard::to_extend(frame, bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    let limit = frame.limit_bytes();
    if bytes.len() > limit {
        return Err(WireError::TooLarge {
            bytes: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// Decodes one envelope; any input gives a frame or an error, never a panic.
pub fn decode_frame(bytes: &[u8]) -> Result<Frame, WireError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            bytes: bytes.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let (frame, rest) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(frame)
}

/// Which side of the handshake a proof comes from (so one side's proof is never valid as
/// the other's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Dialer,
    Acceptor,
}

/// Everything a handshake proof is bound to: both ends as they introduced themselves, both
/// nonces, the cluster, and the address the dialer dialed. Both sides build the same
/// transcript from the frames they exchanged; any frame changed on the way gives a different
/// transcript, and the proofs fail.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeTranscript<'a> {
    pub cluster: &'a str,
    pub dialer: &'a MemberInfo,
    pub acceptor: &'a MemberInfo,
    pub dialer_nonce: &'a Nonce,
    pub acceptor_nonce: &'a Nonce,
    pub dialed_address: &'a str,
}

impl HandshakeTranscript<'_> {
    fn mac(&self, secret: &[u8], side: Side) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"mendkv handshake v2\0");
        mac.update(match side {
            Side::Dialer => b"dialer",
            Side::Acceptor => b"accept",
        });
        // Every variable-length field is length-prefixed, so no two transcripts share an
        // encoding (`"ab" + "c"` is not `"a" + "bc"`).
        let mut field = |bytes: &[u8]| {
            mac.update(&(bytes.len() as u64).to_be_bytes());
            mac.update(bytes);
        };
        field(self.cluster.as_bytes());
        for member in [self.dialer, self.acceptor] {
            field(member.id.as_str().as_bytes());
            field(member.peer_address.as_bytes());
            field(member.http_address.as_bytes());
        }
        field(self.dialer_nonce);
        field(self.acceptor_nonce);
        field(self.dialed_address.as_bytes());
        mac
    }
}

/// HMAC-SHA256(secret, side | transcript).
pub fn handshake_proof(
    secret: &[u8],
    side: Side,
    transcript: &HandshakeTranscript<'_>,
) -> HandshakeProof {
    transcript.mac(secret, side).finalize().into_bytes().into()
}

/// Checks a proof in constant time.
pub fn verify_proof(
    secret: &[u8],
    side: Side,
    transcript: &HandshakeTranscript<'_>,
    proof: &HandshakeProof,
) -> bool {
    transcript.mac(secret, side).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mendkv_core::version::{Actor, CausalContext, Object, Value};
    use mendkv_core::NodeId;
    use proptest::prelude::*;

    proptest! {
        /// The decoder survives any bytes: garbage is an error, never a panic.
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes);
            let mut versioned = vec![WIRE_VERSION];
            versioned.extend(&bytes);
            let _ = decode_frame(&versioned);
        }
    }

    fn member(id: &str, port: u16) -> MemberInfo {
        MemberInfo {
            id: NodeId::new(id),
            peer_address: format!("127.0.0.1:{port}"),
            http_address: format!("127.0.0.1:{}", port + 1000),
        }
    }

    /// Frames survive a round trip through the codec.
    #[test]
    fn frames_round_trip() {
        let mut object = Object::empty();
        object.apply_write(
            Actor::new("a", 1),
            &CausalContext::empty(),
            Value::Tombstone,
        );
        let frames = vec![
            Frame::Hello {
                cluster: "c".into(),
                node: member("n1", 1),
                nonce: [7; 32],
                dialed_address: "127.0.0.1:2".into(),
            },
            Frame::Message(Message::Replicate {
                request: 9,
                bucket: "b".into(),
                key: b"k".to_vec(),
                object,
            }),
        ];
        for frame in frames {
            assert_eq!(decode_frame(&encode_frame(&frame).unwrap()).unwrap(), frame);
        }
    }

    /// A proof made with the right secret over the same transcript verifies; changing the
    /// secret, the side or any one field of the transcript makes it fail.
    #[test]
    fn proofs_bind_secret_side_and_every_transcript_field() {
        let (dialer, acceptor) = (member("n1", 1), member("n2", 2));
        let (other_dialer, other_acceptor) = (member("n3", 1), member("n2", 3));
        let transcript = HandshakeTranscript {
            cluster: "c",
            dialer: &dialer,
            acceptor: &acceptor,
            dialer_nonce: &[1; 32],
            acceptor_nonce: &[2; 32],
            dialed_address: "127.0.0.1:2",
        };
        let proof = handshake_proof(b"s3cret", Side::Dialer, &transcript);
        assert!(verify_proof(b"s3cret", Side::Dialer, &transcript, &proof));
        assert!(!verify_proof(b"other", Side::Dialer, &transcript, &proof));
        assert!(!verify_proof(
            b"s3cret",
            Side::Acceptor,
            &transcript,
            &proof
        ));
        let altered = [
            HandshakeTranscript {
                cluster: "d",
                ..transcript
            },
            HandshakeTranscript {
                dialer: &other_dialer,
                ..transcript
            },
            HandshakeTranscript {
                acceptor: &other_acceptor,
                ..transcript
            },
            HandshakeTranscript {
                dialer_nonce: &[3; 32],
                ..transcript
            },
            HandshakeTranscript {
                acceptor_nonce: &[3; 32],
                ..transcript
            },
            HandshakeTranscript {
                dialed_address: "127.0.0.1:9",
                ..transcript
            },
        ];
        for transcript in altered {
            assert!(
                !verify_proof(b"s3cret", Side::Dialer, &transcript, &proof),
                "{transcript:?}"
            );
        }
    }

    /// Moving bytes between adjacent fields changes the transcript (fields are
    /// length-prefixed).
    #[test]
    fn transcript_fields_do_not_run_into_each_other() {
        let (dialer, acceptor) = (member("n1", 1), member("n2", 2));
        let transcript = HandshakeTranscript {
            cluster: "ab",
            dialer: &dialer,
            acceptor: &acceptor,
            dialer_nonce: &[1; 32],
            acceptor_nonce: &[2; 32],
            dialed_address: "127.0.0.1:2",
        };
        let mut shifted_dialer = dialer.clone();
        shifted_dialer.id = NodeId::new("bn1");
        let shifted = HandshakeTranscript {
            cluster: "a",
            dialer: &shifted_dialer,
            ..transcript
        };
        let proof = handshake_proof(b"s", Side::Acceptor, &transcript);
        assert!(!verify_proof(b"s", Side::Acceptor, &shifted, &proof));
    }

    /// Unsupported versions and oversize frames are refused, and handshake frames have
    /// their own small limit.
    #[test]
    fn bad_envelopes_are_refused() {
        assert_eq!(decode_frame(&[]), Err(WireError::Empty));
        assert_eq!(decode_frame(&[9, 0]), Err(WireError::UnsupportedVersion(9)));
        assert_eq!(
            decode_frame(&vec![1; MAX_FRAME_BYTES + 1]),
            Err(WireError::TooLarge {
                bytes: MAX_FRAME_BYTES + 1,
                limit: MAX_FRAME_BYTES
            })
        );
        let huge_refusal = Frame::Refused {
            reason: "x".repeat(MAX_HANDSHAKE_FRAME_BYTES),
        };
        assert!(matches!(
            encode_frame(&huge_refusal),
            Err(WireError::TooLarge {
                limit: MAX_HANDSHAKE_FRAME_BYTES,
                ..
            })
        ));
    }
}
