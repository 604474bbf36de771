//! mendkv's durable storage: core's [`Storage`] trait over fjall, a pure-Rust LSM tree.
//!
//! # Layout on disk
//! One fjall database per node (`<data_dir>/db`) with keyspaces:
//! - `objects`: key = `[bucket length: u8][bucket][key]`, value = `[format: u8][postcard(Object)]`.
//! - `meta`: the node's own small records (its epoch).
//! - `hints`: hinted-handoff records, key and value encoded by `core::hinted_handoff`.
//!
//! # Durability
//! Every write is handed to the OS at once (fjall's default journal mode), so a killed
//! process loses nothing it wrote; [`Storage::sync`] adds `fdatasync` of the journal, which is
//! what the node waits for before acknowledging under the default fsync policy. The node
//! batches many writes per sync (group commit).

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use mendkv_core::storage::{Storage, StorageError};
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

/// `[bucket length][bucket][key]`: buckets are at most 64 bytes, so one length byte suffices
/// and no key of one bucket can look like a key of another.
pub fn object_key(bucket: &str, key: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(1 + bucket.len() + key.len());
    encoded.push(bucket.len().min(255) as u8);
    encoded.extend_from_slice(bucket.as_bytes());
    encoded.extend_from_slice(key);
    encoded
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

    fn scan_hints(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
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
