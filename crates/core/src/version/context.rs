//! The opaque causal context a client gets with a read and sends back with a write.
//!
//! Encoding (version 2): one version byte, the postcard encoding of the vector's
//! `(actor, counter)` pairs, then a 16-byte tag, all base64url without padding. The tag is
//! an HMAC-SHA256 under a key derived from the cluster secret ([`ContextKey`]) over the
//! bucket, the key and the bytes before it: a client cannot forge or alter a context, nor
//! use one read from another key (which would silently supersede siblings it never saw).
//! The size is bounded both in actors and in encoded bytes, and anything malformed is
//! rejected with a [`ContextError`] that the HTTP layer turns into 400 `bad_request`.

use super::{Actor, VersionVector};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The encoding version written in the first byte.
const CONTEXT_FORMAT_VERSION: u8 = 2;
/// Bytes of the HMAC tag kept (128 bits: forging one takes 2^128 tries).
const TAG_BYTES: usize = 16;
/// More actors than this cannot come from a healthy cluster (nodes x restarts).
pub const MAX_CONTEXT_ACTORS: usize = 256;
/// Upper bound of the base64 text accepted from a client.
pub const MAX_CONTEXT_ENCODED_BYTES: usize = 8192;
/// Counters at or above this are refused, in contexts and in what a write would store, so
/// `+ 1` can never overflow and every stored context can be read back.
pub const MAX_COUNTER: u64 = 1 << 62;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("context is longer than {MAX_CONTEXT_ENCODED_BYTES} bytes")]
    TooLong,
    #[error("context is not base64url")]
    NotBase64,
    #[error("context format version {0} is not supported (expected {CONTEXT_FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    #[error("context is empty")]
    Empty,
    #[error("context is malformed")]
    Malformed,
    #[error("context names more than {MAX_CONTEXT_ACTORS} actors")]
    TooManyActors,
    #[error("context was not issued by this cluster for this bucket and key")]
    NotAuthentic,
}

/// The key that authenticates contexts, derived from the cluster secret (so every node
/// accepts the contexts of every other).
#[derive(Clone)]
pub struct ContextKey {
    key: [u8; 32],
}

impl std::fmt::Debug for ContextKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContextKey(..)")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl ContextKey {
    /// Derives the context key from the cluster secret (a separate key from the
    /// handshake's, by domain separation).
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(b"mendkv context key v2");
        ContextKey {
            key: mac.finalize().into_bytes().into(),
        }
    }

    /// The MAC over a context body for `bucket`/`key`, ready to finalize or verify.
    fn mac(&self, bucket: &str, key: &[u8], body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        // Lengths first, so (bucket, key) pairs cannot be shifted into each other.
        mac.update(&(bucket.len() as u64).to_be_bytes());
        mac.update(bucket.as_bytes());
        mac.update(&(key.len() as u64).to_be_bytes());
        mac.update(key);
        mac.update(body);
        mac
    }

    /// The text sent in `X-Mendkv-Context` for `context` read from `bucket`/`key`.
    pub fn seal(&self, context: &CausalContext, bucket: &str, key: &[u8]) -> String {
        let mut bytes = context.encode_body();
        let tag = self.mac(bucket, key, &bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..TAG_BYTES]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Parses and authenticates client input for `bucket`/`key`; never panics.
    pub fn open(
        &self,
        text: &str,
        bucket: &str,
        key: &[u8],
    ) -> Result<CausalContext, ContextError> {
        if text.len() > MAX_CONTEXT_ENCODED_BYTES {
            return Err(ContextError::TooLong);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| ContextError::NotBase64)?;
        let (&version, _) = bytes.split_first().ok_or(ContextError::Empty)?;
        if version != CONTEXT_FORMAT_VERSION {
            return Err(ContextError::UnsupportedVersion(version));
        }
        let split = bytes
            .len()
            .checked_sub(TAG_BYTES)
            .ok_or(ContextError::Malformed)?;
        let (body, tag) = bytes.split_at(split);
        // Constant-time comparison of the truncated tag.
        self.mac(bucket, key, body)
            .verify_truncated_left(tag)
            .map_err(|_| ContextError::NotAuthentic)?;
        CausalContext::decode_body(body)
    }
}

/// What a client saw: a version vector, carried opaquely.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CausalContext {
    vector: VersionVector,
}

impl CausalContext {
    /// A context that has seen nothing (a blind write).
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn from_vector(vector: VersionVector) -> Self {
        CausalContext { vector }
    }

    pub fn vector(&self) -> &VersionVector {
        &self.vector
    }

    pub fn is_empty(&self) -> bool {
        self.vector.is_empty()
    }

    /// True when a write may store this vector: few enough actors and counters far enough
    /// from overflow that its context can always be handed out and read back.
    pub fn within_limits(vector: &VersionVector) -> bool {
        vector.len() <= MAX_CONTEXT_ACTORS && vector.iter().all(|(_, c)| *c < MAX_COUNTER)
    }

    /// The version byte and the postcard pairs (what the tag covers).
    fn encode_body(&self) -> Vec<u8> {
        let pairs: Vec<(Actor, u64)> = self.vector.iter().map(|(a, c)| (*a, *c)).collect();
        let mut bytes = vec![CONTEXT_FORMAT_VERSION];
        // Serialising plain integers into a Vec cannot fail.
        bytes.extend(postcard::to_stdvec(&pairs).unwrap_or_default());
        bytes
    }

    /// Parses an authenticated body (version byte and pairs); never panics.
    fn decode_body(bytes: &[u8]) -> Result<Self, ContextError> {
        let (_, body) = bytes.split_first().ok_or(ContextError::Empty)?;
        let (pairs, rest): (Vec<(Actor, u64)>, &[u8]) =
            postcard::take_from_bytes(body).map_err(|_| ContextError::Malformed)?;
        if !rest.is_empty() {
            return Err(ContextError::Malformed);
        }
        if pairs.len() > MAX_CONTEXT_ACTORS {
            return Err(ContextError::TooManyActors);
        }
        if pairs.iter().any(|(_, c)| *c >= MAX_COUNTER) {
            return Err(ContextError::Malformed);
        }
        Ok(CausalContext {
            vector: pairs.into_iter().collect(),
        })
    }
}
