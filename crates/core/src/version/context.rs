//! The opaque causal context a client gets with a read and sends back with a write.
//!
//! Encoding (version 1): one version byte, then the postcard encoding of the vector's
//! `(actor, counter)` pairs, all base64url without padding. The size is bounded both in
//! actors and in encoded bytes, and anything malformed is rejected with a [`ContextError`]
//! that the HTTP layer turns into 400 `bad_request`.

use super::{Actor, VersionVector};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The encoding version written in the first byte.
const CONTEXT_FORMAT_VERSION: u8 = 1;
/// More actors than this cannot come from a healthy cluster (nodes x restarts).
pub const MAX_CONTEXT_ACTORS: usize = 256;
/// Upper bound of the base64 text accepted from a client.
pub const MAX_CONTEXT_ENCODED_BYTES: usize = 8192;
/// Counters above this are refused so `+ 1` can never overflow.
const MAX_COUNTER: u64 = 1 << 62;

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

    /// The base64url text sent in `X-Mendkv-Context`.
    pub fn encode(&self) -> String {
        let pairs: Vec<(Actor, u64)> = self.vector.iter().map(|(a, c)| (*a, *c)).collect();
        let mut bytes = vec![CONTEXT_FORMAT_VERSION];
        // Serialising plain integers into a Vec cannot fail.
        bytes.extend(postcard::to_stdvec(&pairs).unwrap_or_default());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Parses client input; never panics.
    pub fn decode(text: &str) -> Result<Self, ContextError> {
        if text.len() > MAX_CONTEXT_ENCODED_BYTES {
            return Err(ContextError::TooLong);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| ContextError::NotBase64)?;
        let (&version, body) = bytes.split_first().ok_or(ContextError::Empty)?;
        if version != CONTEXT_FORMAT_VERSION {
            return Err(ContextError::UnsupportedVersion(version));
        }
        let (pairs, rest): (Vec<(Actor, u64)>, &[u8]) =
            postcard::take_from_bytes(body).map_err(|_| ContextError::Malformed)?;
        if !rest.is_empty() {
            return Err(ContextError::Malformed);
        }
        if pairs.len() > MAX_CONTEXT_ACTORS {
            return Err(ContextError::TooManyActors);
        }
        if pairs.iter().any(|(_, c)| *c > MAX_COUNTER) {
            return Err(ContextError::Malformed);
        }
        Ok(CausalContext {
            vector: pairs.into_iter().collect(),
        })
    }
}
