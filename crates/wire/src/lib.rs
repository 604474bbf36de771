//! mendkv's node-to-node codec: a versioned envelope around postcard-encoded frames, the
//! frame size limit, and the authenticated handshake. Pure functions, no I/O: the server's
//! transport puts the bytes on TCP (length-prefixed), and the decoder never panics on input
//! (a property test feeds it garbage).
//!
//! # Frame
//! `[u32 big-endian length][envelope]`, envelope = `[WIRE_VERSION: u8][postcard(Frame)]`.
//!
//! # Handshake (mutual HMAC-SHA256 challenge-response over the cluster secret)
//! 1. dialer -> `Hello { cluster, node, nonce_d }`
//! 2. acceptor -> `Challenge { node, nonce_a, proof: hmac(secret, "acceptor" | nonce_d | acceptor id) }`
//!    or `Refused` (wrong cluster name, unsupported version)
//! 3. dialer checks the proof, then -> `Proof { proof: hmac(secret, "dialer" | nonce_a | dialer id) }`
//! 4. acceptor checks it -> `Welcome`, or `Refused` and closes.
//!
//! The secret never travels; each side's nonce makes replayed proofs useless.

use hmac::{Hmac, Mac};
use mendkv_core::membership::MemberInfo;
use mendkv_core::message::Message;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The envelope version; a peer speaking another one is refused in the handshake.
pub const WIRE_VERSION: u8 = 1;
/// Frames larger than this are refused and the connection dropped (values are at most
/// `storage.max_value_bytes`, 1 MiB by default, plus metadata).
pub const MAX_FRAME_BYTES: usize = 8 << 20;
pub const NONCE_BYTES: usize = 32;

pub type Nonce = [u8; NONCE_BYTES];
pub type HandshakeProof = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Hello {
        cluster: String,
        node: MemberInfo,
        nonce: Nonce,
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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("wire version {0} is not supported (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut bytes = Vec::with_capacity(64);
    bytes.push(WIRE_VERSION);
    let bytes =
        postcard::to_extend(frame, bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes one envelope; any input gives a frame or an error, never a panic.
pub fn decode_frame(bytes: &[u8]) -> Result<Frame, WireError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
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

/// HMAC-SHA256(secret, side | nonce | node id).
pub fn handshake_proof(secret: &[u8], side: Side, nonce: &Nonce, node_id: &str) -> HandshakeProof {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(match side {
        Side::Dialer => b"dialer",
        Side::Acceptor => b"acceptor",
    });
    mac.update(nonce);
    mac.update(node_id.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Checks a proof in constant time.
pub fn verify_proof(
    secret: &[u8],
    side: Side,
    nonce: &Nonce,
    node_id: &str,
    proof: &HandshakeProof,
) -> bool {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(match side {
        Side::Dialer => b"dialer",
        Side::Acceptor => b"acceptor",
    });
    mac.update(nonce);
    mac.update(node_id.as_bytes());
    mac.verify_slice(proof).is_ok()
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
                node: MemberInfo {
                    id: NodeId::new("n1"),
                    peer_address: "127.0.0.1:1".into(),
                    http_address: "127.0.0.1:2".into(),
                },
                nonce: [7; 32],
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

    /// A proof made with the right secret verifies; the wrong secret, nonce, node or side
    /// does not.
    #[test]
    fn proofs_bind_secret_nonce_node_and_side() {
        let proof = handshake_proof(b"s3cret", Side::Dialer, &[1; 32], "n1");
        assert!(verify_proof(
            b"s3cret",
            Side::Dialer,
            &[1; 32],
            "n1",
            &proof
        ));
        assert!(!verify_proof(
            b"other",
            Side::Dialer,
            &[1; 32],
            "n1",
            &proof
        ));
        assert!(!verify_proof(
            b"s3cret",
            Side::Dialer,
            &[2; 32],
            "n1",
            &proof
        ));
        assert!(!verify_proof(
            b"s3cret",
            Side::Dialer,
            &[1; 32],
            "n2",
            &proof
        ));
        assert!(!verify_proof(
            b"s3cret",
            Side::Acceptor,
            &[1; 32],
            "n1",
            &proof
        ));
    }

    /// Unsupported versions and oversize frames are refused.
    #[test]
    fn bad_envelopes_are_refused() {
        assert_eq!(decode_frame(&[]), Err(WireError::Empty));
        assert_eq!(decode_frame(&[9, 0]), Err(WireError::UnsupportedVersion(9)));
        assert_eq!(
            decode_frame(&vec![1; MAX_FRAME_BYTES + 1]),
            Err(WireError::TooLarge(MAX_FRAME_BYTES + 1))
        );
    }
}
