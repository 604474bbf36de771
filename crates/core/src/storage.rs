//! The small storage interface the node needs, and an in-memory implementation that models
//! what survives a crash (for unit tests and the simulator).
//!
//! Writes are buffered until [`Storage::sync`]; only synced writes survive a crash. The node
//! never acknowledges a write (under the default fsync policy) before a sync that covers it
//! has finished: see `node.rs`, "group commit".

use crate::ring::{key_token, Token, TokenRange};
use crate::version::Object;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The engine failed (an I/O error other than a full disk).
    #[error("storage engine failed: {0}")]
    Engine(String),
    /// No space for the write, and nothing was written: free space is below the reserve, or
    /// the engine stopped after a full disk and waits for space to reopen. Another replica
    /// may take the write; this one recovers by itself once space returns.
    #[error("storage is full: {0}")]
    Full(String),
    /// The disk filled up during the write, so it may or may not reach the disk (the engine
    /// stops until space returns). The write's outcome is unknown: it must not be retried
    /// under another dot.
    #[error("storage filled up during the write: {0}")]
    FullDuringWrite(String),
    /// A stored record could not be decoded; it is skipped and reported.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

impl StorageError {
    /// Whether the failure is a full disk (either way): SPEC's 507 `insufficient_storage`.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            StorageError::Full(_) | StorageError::FullDuringWrite(_)
        )
    }
}

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub bucket: String,
    pub key: Vec<u8>,
}

/// Raw hint records: (key, record).
pub type HintRecords = Vec<(Vec<u8>, Vec<u8>)>;
/// Objects with their bucket and key.
pub type ObjectRows = Vec<(String, Vec<u8>, Object)>;

/// Objects a batched range scan lists per call unless the caller asks otherwise: bounded
/// memory per call, few enough calls for a big range.
pub const DEFAULT_SCAN_BATCH: usize = 1024;

/// Where a batched range scan stopped: the last object it listed. The next call lists the
/// objects after it in scan order (see [`scan_position`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanCursor {
    pub token: Token,
    pub bucket: String,
    pub key: Vec<u8>,
}

impl ScanCursor {
    pub fn new(bucket: &str, key: &[u8]) -> Self {
        ScanCursor {
            token: key_token(bucket, key),
            bucket: bucket.to_string(),
            key: key.to_vec(),
        }
    }

    /// This cursor's place in the scan order of `range`.
    pub fn position(&self, range: TokenRange) -> ScanPosition<'_> {
        scan_position(range, self.token, &self.bucket, &self.key)
    }
}

/// A place in the scan order of a range (compare two of the same range).
pub type ScanPosition<'a> = (u64, usize, &'a [u8], &'a [u8]);

/// The order in which a range scan lists objects: by token from the range's first token
/// on (wrapping past the ring's end), then by bucket length, bucket and key. The stored key
/// order of the fjall engine (`[token][bucket length][bucket][key]`), starting at the range.
pub fn scan_position<'a>(
    range: TokenRange,
    token: Token,
    bucket: &'a str,
    key: &'a [u8],
) -> ScanPosition<'a> {
    (
        token.wrapping_sub(range.start.wrapping_add(1)),
        bucket.len(),
        bucket.as_bytes(),
        key,
    )
}

/// One call's worth of a batched range scan.
#[derive(Debug, Clone, Default)]
pub struct ScanBatch {
    /// At most the limit asked for, in scan order.
    pub rows: ObjectRows,
    /// `Some` while the range may hold more: pass it as `after` to the next call.
    pub resume: Option<ScanCursor>,
}

/// Lists every object of `range` in batches of `batch` (bounded memory whatever the range
/// holds), handing each to `each`.
pub fn scan_in_batches<S: Storage + ?Sized>(
    storage: &S,
    range: TokenRange,
    batch: usize,
    mut each: impl FnMut(String, Vec<u8>, Object),
) -> Result<(), StorageError> {
    scan_in_batches_until(storage, range, batch, |bucket, key, object| {
        each(bucket, key, object);
        true
    })
}

/// [`scan_in_batches`] that stops as soon as `each` returns false (nothing further is read).
pub fn scan_in_batches_until<S: Storage + ?Sized>(
    storage: &S,
    range: TokenRange,
    batch: usize,
    mut each: impl FnMut(String, Vec<u8>, Object) -> bool,
) -> Result<(), StorageError> {
    let mut after: Option<ScanCursor> = None;
    loop {
        let ScanBatch { rows, resume } = storage.scan_range_batch(range, after.as_ref(), batch)?;
        for (bucket, key, object) in rows {
            if !each(bucket, key, object) {
                return Ok(());
            }
        }
        match resume {
            Some(cursor) => after = Some(cursor),
            None => return Ok(()),
        }
    }
}

/// What the node needs from a storage engine. Implementations are cheap handles that can be
/// cloned, so a driver can run `sync` on another thread while the node keeps working.
pub trait Storage: Send + 'static {
    fn get(&self, bucket: &str, key: &[u8]) -> Result<Option<Object>, StorageError>;
    /// Buffers a write; durable after the next `sync`.
    fn put(&self, bucket: &str, key: &[u8], object: &Object) -> Result<(), StorageError>;
    /// Removes an object (tombstone reaping); durable after the next `sync`.
    fn remove(&self, bucket: &str, key: &[u8]) -> Result<(), StorageError>;
    /// Makes every write buffered so far durable (fsync).
    fn sync(&self) -> Result<(), StorageError>;
    /// Small named records of the node itself (its epoch).
    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError>;
    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StorageError>;
    /// Up to `limit` (at least 1) objects whose key token lies in `range` (`(start, end]`,
    /// wrapping; the whole ring when `start == end`), in scan order ([`scan_position`]),
    /// after `after` (from the start when `None`): what anti-entropy lists for a tree
    /// segment or a rebuild, one bounded batch at a time.
    fn scan_range_batch(
        &self,
        range: TokenRange,
        after: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanBatch, StorageError>;
    /// Every object of `range` in one Vec: for tests and small ranges only (anti-entropy
    /// uses [`scan_in_batches`]).
    fn scan_range(&self, range: TokenRange) -> Result<ObjectRows, StorageError> {
        let mut rows = Vec::new();
        scan_in_batches(self, range, DEFAULT_SCAN_BATCH, |b, k, o| {
            rows.push((b, k, o))
        })?;
        Ok(rows)
    }
    /// Hints live in their own partition, as opaque records (see `hinted_handoff`).
    fn put_hint(&self, key: &[u8], record: &[u8]) -> Result<(), StorageError>;
    fn get_hint(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    fn delete_hint(&self, key: &[u8]) -> Result<(), StorageError>;
    /// Every hint record, to rebuild the hint queue at start (bounded by the hint budgets).
    fn scan_hints(&self) -> Result<HintRecords, StorageError>;
}

#[derive(Debug, Clone)]
enum Record {
    Object(ObjectKey, Object),
    /// An object removed (a reaped tombstone).
    Removed(ObjectKey),
    Meta(String, Vec<u8>),
    /// A hint record, or its deletion (`None`).
    Hint(Vec<u8>, Option<Vec<u8>>),
}

#[derive(Debug, Default)]
struct MemoryState {
    durable_objects: BTreeMap<ObjectKey, Object>,
    durable_meta: BTreeMap<String, Vec<u8>>,
    durable_hints: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Written but not yet synced, oldest first.
    pending: Vec<Record>,
    /// Writes ever made, and how many of them are durable (a count, for checkers).
    writes_made: u64,
    writes_synced: u64,
    /// A full disk, for tests: writes are refused with [`StorageError::Full`].
    full: bool,
}

/// An in-memory storage that keeps synced and pending writes apart, so a crash can be
/// modelled exactly: [`MemoryStorage::crash`] keeps what was synced plus any prefix of the
/// pending writes that the caller chooses (a disk may persist some of them anyway).
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    state: Arc<Mutex<MemoryState>>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        // A poisoned lock only means another thread panicked while holding it; the data is
        // plain maps and still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of writes buffered since the last sync.
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// Simulates power loss: the first `keep_pending` unsynced writes reach the disk, the
    /// rest vanish.
    pub fn crash(&self, keep_pending: usize) {
        let mut state = self.lock();
        let pending = std::mem::take(&mut state.pending);
        for record in pending.into_iter().take(keep_pending) {
            apply(&mut state, record);
        }
        state.writes_synced = state.writes_made;
    }

    /// Writes made so far (synced or not; hint deletions aside). With [`MemoryStorage::writes_synced`] a checker
    /// can tell whether every write made before some moment is durable now.
    pub fn writes_made(&self) -> u64 {
        self.lock().writes_made
    }

    /// How many of the writes made so far are durable (always a prefix: syncs are ordered).
    pub fn writes_synced(&self) -> u64 {
        self.lock().writes_synced
    }

    /// Models a full disk (`true`) or space returning (`false`): while full, every write is
    /// refused with [`StorageError::Full`] and nothing is written; reads still work.
    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    fn push(&self, record: Record) -> Result<(), StorageError> {
        let mut state = self.lock();
        if state.full {
            return Err(StorageError::Full("no space left (simulated)".into()));
        }
        // Deleting a delivered hint need not be durable (a crash that undoes it only
        // replays the hint, which is idempotent), so it is not a write anything waits for.
        if !matches!(record, Record::Hint(_, None)) {
            state.writes_made += 1;
        }
        state.pending.push(record);
        Ok(())
    }

    /// The objects and hint records written by the unsynced writes from the `from`-th on
    /// (oldest first): what [`MemoryStorage::crash`]`(from)` drops, for checkers that must
    /// know which values a crash took, including versions a later unsynced write had
    /// already replaced.
    pub fn unsynced_writes_from(&self, from: usize) -> (Vec<Object>, Vec<Vec<u8>>) {
        let state = self.lock();
        let mut objects = Vec::new();
        let mut hints = Vec::new();
        for record in state.pending.iter().skip(from) {
            match record {
                Record::Object(_, object) => objects.push(object.clone()),
                Record::Hint(_, Some(hint)) => hints.push(hint.clone()),
                _ => {}
            }
        }
        (objects, hints)
    }

    /// Every object this storage holds (durable view plus pending), for checkers.
    pub fn objects(&self) -> Vec<(ObjectKey, Object)> {
        let state = self.lock();
        let mut all = state.durable_objects.clone();
        for record in &state.pending {
            match record {
                Record::Object(k, o) => {
                    all.insert(k.clone(), o.clone());
                }
                Record::Removed(k) => {
                    all.remove(k);
                }
                _ => {}
            }
        }
        all.into_iter().collect()
    }
}

fn apply(state: &mut MemoryState, record: Record) {
    match record {
        Record::Object(k, o) => {
            state.durable_objects.insert(k, o);
        }
        Record::Removed(k) => {
            state.durable_objects.remove(&k);
        }
        Record::Meta(k, v) => {
            state.durable_meta.insert(k, v);
        }
        Record::Hint(k, Some(v)) => {
            state.durable_hints.insert(k, v);
        }
        Record::Hint(k, None) => {
            state.durable_hints.remove(&k);
        }
    }
}

impl Storage for MemoryStorage {
    fn get(&self, bucket: &str, key: &[u8]) -> Result<Option<Object>, StorageError> {
        let state = self.lock();
        let wanted = ObjectKey {
            bucket: bucket.to_string(),
            key: key.to_vec(),
        };
        let pending = state.pending.iter().rev().find_map(|r| match r {
            Record::Object(k, o) if *k == wanted => Some(Some(o.clone())),
            Record::Removed(k) if *k == wanted => Some(None),
            _ => None,
        });
        Ok(pending.unwrap_or_else(|| state.durable_objects.get(&wanted).cloned()))
    }

    fn put(&self, bucket: &str, key: &[u8], object: &Object) -> Result<(), StorageError> {
        let key = ObjectKey {
            bucket: bucket.to_string(),
            key: key.to_vec(),
        };
        self.push(Record::Object(key, object.clone()))
    }

    fn remove(&self, bucket: &str, key: &[u8]) -> Result<(), StorageError> {
        let key = ObjectKey {
            bucket: bucket.to_string(),
            key: key.to_vec(),
        };
        self.push(Record::Removed(key))
    }

    fn sync(&self) -> Result<(), StorageError> {
        let mut state = self.lock();
        let pending = std::mem::take(&mut state.pending);
        for record in pending {
            apply(&mut state, record);
        }
        state.writes_synced = state.writes_made;
        Ok(())
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let state = self.lock();
        let pending = state.pending.iter().rev().find_map(|r| match r {
            Record::Meta(k, v) if k == name => Some(v.clone()),
            _ => None,
        });
        Ok(pending.or_else(|| state.durable_meta.get(name).cloned()))
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        self.push(Record::Meta(name.to_string(), value.to_vec()))
    }

    fn scan_range_batch(
        &self,
        range: TokenRange,
        after: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanBatch, StorageError> {
        // The in-memory model is for tests and the simulator: a filter over every object,
        // sorted into scan order.
        let mut found: Vec<(Token, ObjectKey, Object)> = self
            .objects()
            .into_iter()
            .map(|(k, o)| (key_token(&k.bucket, &k.key), k, o))
            .filter(|(token, _, _)| range.contains(*token))
            .filter(|(token, k, _)| {
                after.is_none_or(|cursor| {
                    scan_position(range, *token, &k.bucket, &k.key) > cursor.position(range)
                })
            })
            .collect();
        found.sort_by(|(a, ka, _), (b, kb, _)| {
            scan_position(range, *a, &ka.bucket, &ka.key)
                .cmp(&scan_position(range, *b, &kb.bucket, &kb.key))
        });
        let limit = limit.max(1);
        let more = found.len() > limit;
        found.truncate(limit);
        let resume = more.then(|| {
            let (_, k, _) = found.last().expect("more than limit >= 1");
            ScanCursor::new(&k.bucket, &k.key)
        });
        Ok(ScanBatch {
            rows: found
                .into_iter()
                .map(|(_, k, o)| (k.bucket, k.key, o))
                .collect(),
            resume,
        })
    }

    fn put_hint(&self, key: &[u8], record: &[u8]) -> Result<(), StorageError> {
        self.push(Record::Hint(key.to_vec(), Some(record.to_vec())))
    }

    fn get_hint(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let state = self.lock();
        let pending = state.pending.iter().rev().find_map(|r| match r {
            Record::Hint(k, v) if k == key => Some(v.clone()),
            _ => None,
        });
        Ok(pending.unwrap_or_else(|| state.durable_hints.get(key).cloned()))
    }

    fn delete_hint(&self, key: &[u8]) -> Result<(), StorageError> {
        self.push(Record::Hint(key.to_vec(), None))
    }

    fn scan_hints(&self) -> Result<HintRecords, StorageError> {
        let state = self.lock();
        let mut all = state.durable_hints.clone();
        for record in &state.pending {
            if let Record::Hint(k, v) = record {
                match v {
                    Some(v) => all.insert(k.clone(), v.clone()),
                    None => all.remove(k),
                };
            }
        }
        Ok(all.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Actor, CausalContext, Value};

    proptest::proptest! {
        /// The in-memory model lists a range in bounded batches in scan order, exactly the
        /// objects of the range (the same contract as the fjall engine).
        #[test]
        fn memory_batched_scans_list_the_range(
            count in 0usize..200,
            start in proptest::prelude::any::<u64>(),
            end in proptest::prelude::any::<u64>(),
            limit in 1usize..30,
        ) {
            let storage = MemoryStorage::new();
            let mut object = Object::empty();
            object.apply_write(Actor::new("n", 1), &CausalContext::empty(), Value::Tombstone);
            let keys: Vec<Vec<u8>> = (0..count as u32).map(|i| i.to_le_bytes().to_vec()).collect();
            for key in &keys {
                storage.put("b", key, &object).unwrap();
            }
            let range = TokenRange { start, end };
            let mut listed = Vec::new();
            let mut after: Option<ScanCursor> = None;
            loop {
                let batch = storage.scan_range_batch(range, after.as_ref(), limit).unwrap();
                proptest::prop_assert!(batch.rows.len() <= limit);
                let mut previous: Option<ScanCursor> = after.clone();
                for (b, k, _) in &batch.rows {
                    let here = ScanCursor::new(b, k);
                    if let Some(p) = &previous {
                        proptest::prop_assert!(here.position(range) > p.position(range));
                    }
                    previous = Some(here);
                }
                listed.extend(batch.rows.into_iter().map(|(_, k, _)| k));
                match batch.resume {
                    Some(cursor) => after = Some(cursor),
                    None => break,
                }
            }
            listed.sort();
            let mut expected: Vec<Vec<u8>> = keys
                .into_iter()
                .filter(|k| range.contains(key_token("b", k)))
                .collect();
            expected.sort();
            proptest::prop_assert_eq!(listed, expected);
        }
    }

    /// Only synced writes survive a crash; a read sees pending writes before that.
    #[test]
    fn crash_keeps_only_synced_writes() {
        let storage = MemoryStorage::new();
        let mut object = Object::empty();
        object.apply_write(
            Actor::new("n", 1),
            &CausalContext::empty(),
            Value::Tombstone,
        );
        storage.put("b", b"synced", &object).unwrap();
        storage.sync().unwrap();
        storage.put("b", b"lost", &object).unwrap();
        assert!(storage.get("b", b"lost").unwrap().is_some());
        storage.crash(0);
        assert!(storage.get("b", b"synced").unwrap().is_some());
        assert!(storage.get("b", b"lost").unwrap().is_none());
    }
}
