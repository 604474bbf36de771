//! Validation of client input, shared by the HTTP layer and the node. Every rule gives a
//! reason the client can act on.

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest bucket name accepted.
pub const MAX_BUCKET_CHARS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("bucket name must be 1-{MAX_BUCKET_CHARS} characters of [A-Za-z0-9_.-]")]
    BadBucket,
    #[error("key must be 1-{MAX_KEY_BYTES} bytes (got {0})")]
    BadKey(usize),
    #[error("value is {size} bytes; the limit is {limit} (storage.max_value_bytes)")]
    ValueTooLarge { size: usize, limit: usize },
}

pub fn validate_bucket(bucket: &str) -> Result<(), InvalidRequest> {
    let ok = !bucket.is_empty()
        && bucket.len() <= MAX_BUCKET_CHARS
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidRequest::BadBucket)
    }
}

pub fn validate_key(key: &[u8]) -> Result<(), InvalidRequest> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        Err(InvalidRequest::BadKey(key.len()))
    } else {
        Ok(())
    }
}

pub fn validate_value_size(size: usize, limit: usize) -> Result<(), InvalidRequest> {
    if size > limit {
        Err(InvalidRequest::ValueTooLarge { size, limit })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bucket and key rules, as a table.
    #[test]
    fn input_rules() {
        assert!(validate_bucket("users.v2_x-1").is_ok());
        assert!(validate_bucket("").is_err());
        assert!(validate_bucket("a/b").is_err());
        assert!(validate_bucket(&"a".repeat(65)).is_err());
        assert!(validate_key(b"").is_err());
        assert!(validate_key(&[0u8; 1025]).is_err());
        assert!(validate_key(&[0xffu8; 1024]).is_ok());
        assert!(validate_value_size(11, 10).is_err());
    }
}
