//! mendkv's durable storage: core's [`Storage`] trait over fjall, a pure-Rust LSM tree.
//!
//! # Layout on disk
//! One fjall database per node (`<data_dir>/db`) with keyspaces:
//! - `objects`: key = `[token: u64 big-endian][bucket length: u8][bucket][key]`, value =
//!   `[format: u8][postcard(Object)]`. The token prefix orders objects on the ring, so the
//!   objects of a token range (an anti-entropy segment) are one range scan.
//! - `meta`: the node's own small records (its epoch).
//! - `hints`: hinted-handoff records, key and value encoded by `core::hinted_handoff`.
//!
//! # Durability
//! Every write is handed to the OS at once (fjall's default journal mode), so a killed
//! process loses nothing it wrote; [`Storage::sync`] adds `fdatasync` of the journal, which is
//! what the node waits for before acknowledging under the default fsync policy. The node
//! batches many writes per sync (group commit).

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use mendkv_core::ring::{key_token, TokenRange};
use mendkv_core::storage::{HintRecords, ObjectRows, Storage, StorageError};
use mendkv_core::version::Object;
use std::path::Path;

/// The format byte of stored objects; bump it when the encoding changes.
const OBJECT_FORMAT: u8 = 1;

#[derive(Clone)]
pub struct FjallStorage {
    database: Database,
    objects: Keyspace,
    meta: Keyspace,
    hints: Keyspace,
}

fn engine_error(error: impl std::fmt::Display) -> StorageError {
    StorageError::Engine(error.to_string())
}

impl FjallStorage {
    /// Opens (or creates) the database under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(data_dir).map_err(engine_error)?;
        let database = Database::builder(data_dir.join("db"))
            .open()
            .map_err(engine_error)?;
        let objects = database
            .keyspace("objects", KeyspaceCreateOptions::default)
            .map_err(engine_error)?;
        let meta = database
            .keyspace("meta", KeyspaceCreateOptions::default)
            .map_err(engine_error)?;
        let hints = database
            .keyspace("hints", KeyspaceCreateOptions::default)
            .map_err(engine_error)?;
        Ok(FjallStorage {
            database,
            objects,
            meta,
            hints,
        })
    }

    /// Number of objects stored (an estimate from the LSM tree, no scan).
    pub fn approximate_object_count(&self) -> u64 {
        self.objects.approximate_len() as u64
    }
}

/// `[token][bucket length][bucket][key]`: buckets are at most 64 bytes, so one length byte
/// suffices and no key of one bucket can look like a key of another.
pub fn object_key(bucket: &str, key: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(9 + bucket.len() + key.len());
    encoded.extend_from_slice(&key_token(bucket, key).to_be_bytes());
    encoded.push(bucket.len().min(255) as u8);
    encoded.extend_from_slice(bucket.as_bytes());
    encoded.extend_from_slice(key);
    encoded
}

/// Bucket and key back from a stored object key.
fn parse_object_key(encoded: &[u8]) -> Option<(String, Vec<u8>)> {
    let rest = encoded.get(8..)?;
    let (&bucket_len, rest) = rest.split_first()?;
    let (bucket, key) = rest.split_at_checked(bucket_len as usize)?;
    Some((std::str::from_utf8(bucket).ok()?.to_string(), key.to_vec()))
}

pub fn encode_object(object: &Object) -> Result<Vec<u8>, StorageError> {
    let mut bytes = vec![OBJECT_FORMAT];
    bytes.extend(postcard::to_stdvec(object).map_err(engine_error)?);
    Ok(bytes)
}

pub fn decode_object(bytes: &[u8]) -> Result<Object, StorageError> {
    match bytes.split_first() {
        Some((&OBJECT_FORMAT, body)) => {
            postcard::from_bytes(body).map_err(|e| StorageError::Corrupt(e.to_string()))
        }
        Some((format, _)) => Err(StorageError::Corrupt(format!(
            "unknown object format {format}"
        ))),
        None => Err(StorageError::Corrupt("empty record".into())),
    }
}

impl Storage for FjallStorage {
    fn get(&self, bucket: &str, key: &[u8]) -> Result<Option<Object>, StorageError> {
        match self
            .objects
            .get(object_key(bucket, key))
            .map_err(engine_error)?
        {
            Some(bytes) => decode_object(&bytes).map(Some).inspect_err(|e| {
                tracing::error!(bucket, error = %e, "corrupt object record");
            }),
            None => Ok(None),
        }
    }

    fn put(&self, bucket: &str, key: &[u8], object: &Object) -> Result<(), StorageError> {
        self.objects
            .insert(object_key(bucket, key), encode_object(object)?)
            .map_err(engine_error)
    }

    fn remove(&self, bucket: &str, key: &[u8]) -> Result<(), StorageError> {
        self.objects
            .remove(object_key(bucket, key))
            .map_err(engine_error)
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.database
            .persist(PersistMode::SyncData)
            .map_err(engine_error)
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .meta
            .get(name.as_bytes())
            .map_err(engine_error)?
            .map(|v| v.to_vec()))
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        self.meta
            .insert(name.as_bytes(), value)
            .map_err(engine_error)
    }

    fn scan_range(&self, range: TokenRange) -> Result<ObjectRows, StorageError> {
        // (start, end] as inclusive token bounds; a wrapping range is two scans.
        let first = range.start.wrapping_add(1);
        let spans: Vec<(u64, u64)> = if range.start == range.end {
            vec![(0, u64::MAX)]
        } else if range.start < range.end {
            vec![(first, range.end)]
        } else if range.start == u64::MAX {
            vec![(0, range.end)]
        } else {
            vec![(first, u64::MAX), (0, range.end)]
        };
        let mut found = Vec::new();
        for (low, high) in spans {
            let from = low.to_be_bytes().to_vec();
            let iter = match high.checked_add(1) {
                Some(next) => self.objects.range(from..next.to_be_bytes().to_vec()),
                None => self.objects.range(from..),
            };
            for guard in iter {
                let (key, value) = guard.into_inner().map_err(engine_error)?;
                let Some((bucket, object_key)) = parse_object_key(&key) else {
                    tracing::error!("corrupt object key skipped in a range scan");
                    continue;
                };
                match decode_object(&value) {
                    Ok(object) => found.push((bucket, object_key, object)),
                    Err(error) => tracing::error!(%error, "corrupt object skipped in a range scan"),
                }
            }
        }
        Ok(found)
    }

    fn put_hint(&self, key: &[u8], record: &[u8]) -> Result<(), StorageError> {
        self.hints.insert(key, record).map_err(engine_error)
    }

    fn get_hint(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .hints
            .get(key)
            .map_err(engine_error)?
            .map(|v| v.to_vec()))
    }

    fn delete_hint(&self, key: &[u8]) -> Result<(), StorageError> {
        self.hints.remove(key).map_err(engine_error)
    }

    fn scan_hints(&self) -> Result<HintRecords, StorageError> {
        let mut all = Vec::new();
        for guard in self.hints.iter() {
            let (key, value) = guard.into_inner().map_err(engine_error)?;
            all.push((key.to_vec(), value.to_vec()));
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mendkv_core::version::{Actor, CausalContext, Value};

    fn sample() -> Object {
        let mut object = Object::empty();
        object.apply_write(
            Actor::new("n1", 1),
            &CausalContext::empty(),
            Value::Data {
                bytes: b"hello".to_vec().into(),
                content_type: "text/plain".into(),
            },
        );
        object
    }

    /// A synced object is read back after the database is closed and reopened.
    #[test]
    fn synced_objects_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = FjallStorage::open(dir.path()).unwrap();
            storage.put("b", b"k", &sample()).unwrap();
            storage.put_meta("epoch", &[7, 0, 0, 0]).unwrap();
            storage.sync().unwrap();
        }
        let storage = FjallStorage::open(dir.path()).unwrap();
        assert_eq!(storage.get("b", b"k").unwrap(), Some(sample()));
        assert_eq!(storage.get_meta("epoch").unwrap(), Some(vec![7, 0, 0, 0]));
        assert_eq!(storage.get("b", b"other").unwrap(), None);
    }

    /// A range scan returns exactly the objects whose tokens fall in the range, also when
    /// the range wraps around the ring.
    #[test]
    fn range_scans_follow_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FjallStorage::open(dir.path()).unwrap();
        let keys: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_le_bytes().to_vec()).collect();
        for key in &keys {
            storage.put("b", key, &sample()).unwrap();
        }
        let tokens: Vec<u64> = keys.iter().map(|k| key_token("b", k)).collect();
        let mut sorted = tokens.clone();
        sorted.sort();
        let ranges = [
            TokenRange {
                start: sorted[10],
                end: sorted[50],
            },
            TokenRange {
                start: sorted[150],
                end: sorted[20],
            },
            TokenRange { start: 7, end: 7 },
        ];
        for range in ranges {
            let mut scanned: Vec<Vec<u8>> = storage
                .scan_range(range)
                .unwrap()
                .into_iter()
                .map(|(_, k, _)| k)
                .collect();
            scanned.sort();
            let mut expected: Vec<Vec<u8>> = keys
                .iter()
                .zip(&tokens)
                .filter(|(_, t)| range.contains(**t))
                .map(|(k, _)| k.clone())
                .collect();
            expected.sort();
            assert_eq!(scanned, expected, "{range:?}");
        }
    }

    /// Keys of different buckets never collide, and garbage records decode to an error.
    #[test]
    fn keys_are_bucket_scoped_and_corruption_is_an_error() {
        assert_ne!(object_key("ab", b"c"), object_key("a", b"bc"));
        assert!(matches!(
            decode_object(&[1, 0xff, 0xff]),
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(decode_object(&[]), Err(StorageError::Corrupt(_))));
        assert!(matches!(decode_object(&[9]), Err(StorageError::Corrupt(_))));
    }
}
