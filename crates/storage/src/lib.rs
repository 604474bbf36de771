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
//!
//! The sync is an `fdatasync` of fjall's active journal file through a descriptor of our
//! own, not fjall's `persist`: `persist` holds the journal lock (which every write needs)
//! for the whole fsync, and an fsync that waits behind the writeback of a memtable flush can
//! take seconds on a busy disk, stalling every write of the node for that long (issue 14).
//! Without the lock, writes go on while the fsync runs; the fsync still covers every write
//! made before it started, as those are in the OS already (see [`JournalSync`]).
//!
//! # Restart time
//! Opening replays the journal into memtables, so what a start costs grows with the journal
//! on disk. fjall keeps at most [`MAX_JOURNALING_BYTES`] of sealed journals (its default is
//! 512 MiB, seconds of replay), and a clean stop ([`FjallStorage::flush_for_close`]) writes
//! the memtables out to tables first, so the next open replays nothing but skips.
//!
//! # A full disk
//! fjall stops for good after a failed journal write (every later write answers `Poisoned`),
//! and a full disk is the common cause. So:
//! - writes are refused up front, with [`StorageError::Full`] and nothing written, while the
//!   file system has less than `min_free_bytes` free (a `fstatvfs` per write): the node can
//!   then let another replica take the write. Writes resume by themselves once space returns.
//! - a write that hits `ENOSPC` anyway (the reserve is off, or something else filled the
//!   disk) is [`StorageError::FullDuringWrite`]: the journal may hold it in part, and its
//!   rest may still reach the file when the engine closes, so its outcome is unknown. The
//!   engine is then stopped ([`FjallStorage::failure`] says why) and every write is refused
//!   with `Full` until [`FjallStorage::recover`] reopens it once space returns. Reopening
//!   replays the journal, which holds every write handed to the OS, so nothing acknowledged
//!   (fsynced) is lost.
//!
//! Clones share one engine behind a lock, so a reopen swaps it for every clone (the node
//! task and the fsync thread).

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use mendkv_core::ring::{key_token, TokenRange};
use mendkv_core::storage::{
    scan_position, HintRecords, ScanBatch, ScanCursor, Storage, StorageError,
};
use mendkv_core::version::Object;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// The format byte of stored objects; bump it when the encoding changes.
const OBJECT_FORMAT: u8 = 1;

/// Free space kept by default: writes are refused below it (`storage.min_free_bytes`).
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 << 20;

/// What a journal record costs beyond its key and value (markers, checksum), roughly.
const RECORD_OVERHEAD_BYTES: u64 = 64;

/// Free space a stopped engine waits for before it reopens, even with the reserve off: a
/// reopen writes (journal recovery, a new journal file).
const REOPEN_MIN_FREE_BYTES: u64 = 1 << 20;

/// Sealed journal bytes fjall keeps before it flushes the keyspaces that still need the
/// oldest journal (fjall's minimum; its default is 512 MiB). fjall seals its journal at a
/// memtable flush once it passes 64 MB, and the small `meta` and `hints` keyspaces would
/// otherwise pin every sealed journal until the bound: after a kill -9 the next start
/// replays all of them (seconds per 100 MB).
pub const MAX_JOURNALING_BYTES: u64 = 64 << 20;

/// Memtable size of the `objects` and `hints` keyspaces (fjall's default is 64 MiB). fjall
/// frees a flushed memtable while it holds the keyspace's version lock, which every read
/// and write of the keyspace needs; freeing a 64 MiB skiplist (some 500,000 entries of
/// 100-byte values) took 1-2.5 s on the loaded 2-core machine, a stall of every request of
/// the node past the 2 s request deadline (issue 14). The stall scales with the memtable.
/// fjall stores the size with a keyspace when it creates it: data directories made before
/// keep their 64 MiB.
pub const MAX_MEMTABLE_BYTES: u64 = 16 << 20;

/// How long a clean stop waits for the memtable flushes of [`FjallStorage::flush_for_close`].
pub const CLOSE_FLUSH_DEADLINE: Duration = Duration::from_secs(30);

/// How the storage is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageOptions {
    /// Writes are refused (nothing written) while the file system has less free space
    /// than this plus the write; 0 turns the check off.
    pub min_free_bytes: u64,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
        }
    }
}

/// One open fjall database with its keyspaces.
struct Engine {
    database: Database,
    objects: Keyspace,
    meta: Keyspace,
    hints: Keyspace,
}

impl Engine {
    fn open(path: &Path) -> Result<Engine, fjall::Error> {
        let database = Database::builder(path)
            .max_journaling_size(MAX_JOURNALING_BYTES)
            .open()?;
        let memtable = || KeyspaceCreateOptions::default().max_memtable_size(MAX_MEMTABLE_BYTES);
        let objects = database.keyspace("objects", memtable)?;
        let meta = database.keyspace("meta", KeyspaceCreateOptions::default)?;
        let hints = database.keyspace("hints", memtable)?;
        Ok(Engine {
            database,
            objects,
            meta,
            hints,
        })
    }
}

struct Shared {
    /// `<data_dir>/db`.
    path: PathBuf,
    /// The directory, open, for `fstatvfs` (no path lookup per write).
    directory: File,
    options: StorageOptions,
    /// `None` while a reopen is under way (or failed; the next `recover` tries again).
    engine: RwLock<Option<Engine>>,
    /// Why the engine stopped taking writes; `None` while it works.
    failure: Mutex<Option<String>>,
    journal_sync: JournalSync,
    recoveries: AtomicU64,
}

/// `fdatasync` of fjall's active journal through a descriptor of our own, so that the
/// fsync does not hold fjall's journal lock (see "Durability" above).
///
/// Why it covers every write made before it starts: fjall (with `manual_journal_persist`
/// off, its default, which this crate keeps) hands each write to the OS inside `insert` /
/// `remove`, into its active journal, the highest-numbered `<n>.jnl` in the database
/// directory (what fjall's recovery takes as the active one). A journal is sealed under
/// fjall's journal lock, which first fsyncs it whole (`sync_all`), then creates and fsyncs
/// the next one and the directory, before any write can go there. So a write made before
/// this sync is either in the file found highest now (fsynced here) or in an older,
/// already fsynced journal. A later fjall that lays out its journals otherwise makes
/// [`JournalSync::sync`] find none, and the caller falls back to fjall's own `persist`.
#[derive(Default)]
struct JournalSync {
    /// The journal synced last: its number and an open descriptor (reused while it stays
    /// the active journal, so a sync costs one directory listing and one `fdatasync`).
    active: Mutex<Option<(u64, File)>>,
}

impl JournalSync {
    /// Fsyncs the active journal under `directory`; `Ok(false)` when there is no journal
    /// file to sync.
    fn sync(&self, directory: &Path) -> std::io::Result<bool> {
        // A sealed journal can be deleted (its data is in tables) between the listing and
        // the open; the active one never is, so the next listing finds it.
        for _ in 0..3 {
            let Some(number) = newest_journal(directory)? else {
                return Ok(false);
            };
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if active.as_ref().map(|(n, _)| *n) != Some(number) {
                match File::open(directory.join(format!("{number}.jnl"))) {
                    Ok(file) => *active = Some((number, file)),
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error),
                }
            }
            let (_, file) = active.as_ref().expect("just set");
            // The lock is ours, not fjall's: only concurrent syncs wait for it.
            file.sync_data()?;
            return Ok(true);
        }
        Err(std::io::Error::other(
            "the active journal disappeared three times while being opened",
        ))
    }
}

/// The number of the highest-numbered `<n>.jnl` in `directory`.
fn newest_journal(directory: &Path) -> std::io::Result<Option<u64>> {
    let mut newest = None;
    for entry in std::fs::read_dir(directory)? {
        let name = entry?.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|name| name.strip_suffix(".jnl"))
            .and_then(|number| number.parse::<u64>().ok())
        else {
            continue;
        };
        newest = newest.max(Some(number));
    }
    Ok(newest)
}

/// core's [`Storage`] over fjall; clones share one engine.
#[derive(Clone)]
pub struct FjallStorage {
    shared: Arc<Shared>,
}

fn engine_error(error: impl std::fmt::Display) -> StorageError {
    StorageError::Engine(error.to_string())
}

/// True for an I/O error that means "no space" (a full disk or an exhausted quota), also
/// when the LSM tree below fjall reports it.
fn is_out_of_space(error: &fjall::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            );
        }
        source = current.source();
    }
    false
}

impl FjallStorage {
    /// Opens (or creates) the database under `data_dir` with the default options.
    pub fn open(data_dir: &Path) -> Result<Self, StorageError> {
        Self::open_with(data_dir, StorageOptions::default())
    }

    /// Opens (or creates) the database under `data_dir`.
    pub fn open_with(data_dir: &Path, options: StorageOptions) -> Result<Self, StorageError> {
        let path = data_dir.join("db");
        std::fs::create_dir_all(&path).map_err(engine_error)?;
        let directory = File::open(&path).map_err(engine_error)?;
        let engine = Engine::open(&path).map_err(engine_error)?;
        Ok(FjallStorage {
            shared: Arc::new(Shared {
                path,
                directory,
                options,
                engine: RwLock::new(Some(engine)),
                failure: Mutex::new(None),
                journal_sync: JournalSync::default(),
                recoveries: AtomicU64::new(0),
            }),
        })
    }

    /// Number of objects stored (an estimate from the LSM tree, no scan).
    pub fn approximate_object_count(&self) -> u64 {
        self.engine()
            .as_ref()
            .map_or(0, |engine| engine.objects.approximate_len() as u64)
    }

    /// Live (not deleted) keys of each of `buckets` stored on this node, by one scan of
    /// every object: keys are ordered by token, not by bucket, so nothing cheaper counts
    /// one bucket. Only the objects of `buckets` are decoded. The engine lock is taken per
    /// [`COUNT_BATCH`] objects, so a long count never holds off a reopen for long.
    pub fn live_key_counts(&self, buckets: &[&str]) -> Result<Vec<u64>, StorageError> {
        let mut counts = vec![0u64; buckets.len()];
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (last, seen) = self.with_engine(|engine| {
                let iter = match &after {
                    Some(key) => engine.objects.range::<Vec<u8>, _>((
                        std::ops::Bound::Excluded(key.clone()),
                        std::ops::Bound::Unbounded,
                    )),
                    None => engine.objects.range::<Vec<u8>, _>(..),
                };
                let mut last = None;
                let mut seen = 0;
                for guard in iter.take(COUNT_BATCH) {
                    let (key, value) = guard.into_inner().map_err(engine_error)?;
                    seen += 1;
                    if let Some(index) = bucket_of(&key)
                        .and_then(|bucket| buckets.iter().position(|b| b.as_bytes() == bucket))
                    {
                        match decode_object(&value) {
                            Ok(object) if !object.is_deleted() => counts[index] += 1,
                            Ok(_) => {}
                            Err(error) => tracing::error!(
                                bucket = buckets[index],
                                stored_key = %String::from_utf8_lossy(&key),
                                %error,
                                "corrupt object skipped while counting keys"
                            ),
                        }
                    }
                    last = Some(key.to_vec());
                }
                Ok((last, seen))
            })?;
            if seen < COUNT_BATCH {
                return Ok(counts);
            }
            after = last;
        }
    }

    /// Before a clean stop: writes every keyspace's memtable out to tables and waits (up to
    /// `deadline`) for fjall to flush them and drop the journals they made redundant, so
    /// that the next open has nothing to replay into memtables (it still reads the active
    /// journal, skipping what the tables hold). `Ok(false)` when the deadline passed first;
    /// the data is safe either way (the journal holds it), only the next start is slower.
    /// Blocking: run it off the async runtime.
    pub fn flush_for_close(&self, deadline: Duration) -> Result<bool, StorageError> {
        self.refuse_if_stopped()?;
        let until = Instant::now() + deadline;
        self.with_engine(|engine| {
            let keyspaces = [&engine.objects, &engine.meta, &engine.hints];
            for keyspace in keyspaces {
                // `rotate_memtable` is public but hidden in fjall's docs; it is what its own
                // flush-and-wait helper calls (the version is pinned in Cargo.lock).
                keyspace.rotate_memtable().map_err(engine_error)?;
            }
            // fjall signals neither the end of a flush nor of the journal clean-up after
            // it, so poll both: no sealed memtable left, and only the active journal.
            loop {
                let flushed = keyspaces
                    .iter()
                    .all(|keyspace| keyspace.sealed_memtable_count() == 0);
                if flushed && engine.database.journal_count() <= 1 {
                    return Ok(true);
                }
                if Instant::now() >= until {
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    }

    /// Why the engine stopped taking writes (a full disk, a failed write), or `None`.
    pub fn failure(&self) -> Option<String> {
        self.failure_slot().clone()
    }

    /// `Err(reason)` while this storage cannot take writes: the engine stopped, or free
    /// space is below the reserve (what `/health` reports).
    pub fn health(&self) -> Result<(), String> {
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        self.check_space(0).map_err(|e| e.to_string())
    }

    /// Times the engine was reopened after it had stopped.
    pub fn recoveries(&self) -> u64 {
        self.shared.recoveries.load(Ordering::Relaxed)
    }

    /// Reopens a stopped engine once there is space again; `Ok(false)` when nothing was
    /// stopped. The old engine is closed first (fjall allows one open per directory); the
    /// new one replays the journal, so every write the old one handed to the OS is back,
    /// and fsyncs it. Meanwhile operations answer [`StorageError::Full`]. Blocking: run it
    /// off the async runtime.
    pub fn recover(&self) -> Result<bool, StorageError> {
        let Some(failure) = self.failure() else {
            return Ok(false);
        };
        // Without space the new engine would stop again at its first write (or not open).
        self.check_free(
            self.shared
                .options
                .min_free_bytes
                .max(REOPEN_MIN_FREE_BYTES),
        )?;
        let old = self.engine_slot().take();
        // Closing waits for fjall's workers; no lock is held meanwhile.
        drop(old);
        let engine = Engine::open(&self.shared.path).map_err(|error| {
            let reason = format!("reopen after \"{failure}\" failed: {error}");
            *self.failure_slot() = Some(reason.clone());
            if is_out_of_space(&error) {
                StorageError::Full(reason)
            } else {
                StorageError::Engine(reason)
            }
        })?;
        *self.engine_slot() = Some(engine);
        *self.failure_slot() = None;
        self.shared.recoveries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(cause = %failure, "storage engine reopened");
        Ok(true)
    }

    fn engine(&self) -> RwLockReadGuard<'_, Option<Engine>> {
        // A poisoned lock only means a thread panicked holding it; the handle is intact.
        self.shared.engine.read().unwrap_or_else(|p| p.into_inner())
    }

    fn engine_slot(&self) -> std::sync::RwLockWriteGuard<'_, Option<Engine>> {
        self.shared
            .engine
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn failure_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// `Full` when the file system has less than the reserve plus `bytes` free.
    fn check_space(&self, bytes: u64) -> Result<(), StorageError> {
        match self.shared.options.min_free_bytes {
            0 => Ok(()),
            reserve => self.check_free(reserve.saturating_add(bytes)),
        }
    }

    /// `Full` when the file system has less than `wanted` bytes free.
    fn check_free(&self, wanted: u64) -> Result<(), StorageError> {
        let reserve = self.shared.options.min_free_bytes;
        let Ok(stat) = rustix::fs::fstatvfs(&self.shared.directory) else {
            // A file system that cannot say stays writable; ENOSPC still stops it safely.
            return Ok(());
        };
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < wanted {
            return Err(StorageError::Full(format!(
                "disk full: {free} bytes free in {}, {wanted} needed (storage.min_free_bytes \
                 is {reserve})",
                self.shared.path.display()
            )));
        }
        Ok(())
    }

    /// Runs `operation` on the engine; [`FjallStorage::stopped`] while there is none (a
    /// reopen is under way or failed).
    fn with_engine<T>(
        &self,
        operation: impl FnOnce(&Engine) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        match self.engine().as_ref() {
            Some(engine) => operation(engine),
            None => Err(self.stopped()),
        }
    }

    /// Refuses an operation that changes the disk while the engine is stopped.
    fn refuse_if_stopped(&self) -> Result<(), StorageError> {
        // An `if`, not a `match`: the failure lock must be released before `stopped()`
        // takes it again.
        if self.failure_slot().is_some() {
            return Err(self.stopped());
        }
        Ok(())
    }

    /// Runs a read on the engine.
    fn read<T>(
        &self,
        operation: impl FnOnce(&Engine) -> Result<T, fjall::Error>,
    ) -> Result<T, StorageError> {
        self.with_engine(|engine| operation(engine).map_err(engine_error))
    }

    /// Runs a write of about `bytes` bytes: refused (nothing written) while the engine is
    /// stopped or space is short; a failure stops the engine, as fjall does.
    fn write<T>(
        &self,
        bytes: usize,
        operation: impl FnOnce(&Engine) -> Result<T, fjall::Error>,
    ) -> Result<T, StorageError> {
        self.refuse_if_stopped()?;
        self.check_space(bytes as u64 + RECORD_OVERHEAD_BYTES)?;
        self.with_engine(|engine| operation(engine).map_err(|error| self.stop(error)))
    }

    /// The error of an operation refused because the engine is stopped.
    fn stopped(&self) -> StorageError {
        let reason = self
            .failure()
            .unwrap_or_else(|| "the storage engine is reopening".into());
        StorageError::Full(format!("writes stopped until space returns: {reason}"))
    }

    /// A write or sync failed: fjall stops after any of those, so this storage does too
    /// until `recover`, remembering the first cause.
    fn stop(&self, error: fjall::Error) -> StorageError {
        let out_of_space = is_out_of_space(&error);
        let poisoned = matches!(error, fjall::Error::Poisoned);
        let reason = if out_of_space {
            format!("disk full: {error}")
        } else {
            error.to_string()
        };
        {
            let mut failure = self.failure_slot();
            if failure.is_none() {
                tracing::error!(%error, "storage engine stopped after a failed write");
                *failure = Some(reason.clone());
            }
        }
        if out_of_space {
            StorageError::FullDuringWrite(reason)
        } else if poisoned {
            // fjall refused before writing anything (a background flush had failed).
            self.stopped()
        } else {
            StorageError::Engine(reason)
        }
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

/// Objects counted per hold of the engine lock in [`FjallStorage::live_key_counts`].
const COUNT_BATCH: usize = 4096;

/// The bucket bytes of a stored object key, without copying.
fn bucket_of(encoded: &[u8]) -> Option<&[u8]> {
    let (&bucket_len, rest) = encoded.get(8..)?.split_first()?;
    rest.get(..bucket_len as usize)
}

/// A range's tokens as inclusive spans of stored keys, in scan order (from the range's
/// first token on, wrapping past the ring's end).
fn scan_spans(range: TokenRange) -> Vec<(u64, u64)> {
    let first = range.start.wrapping_add(1);
    if range.start < range.end {
        vec![(first, range.end)]
    } else if first == 0 {
        // Starts at token 0: the whole ring or (0, end] in one span.
        vec![(0, range.end)]
    } else {
        vec![(first, u64::MAX), (0, range.end)]
    }
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
        match self.read(|engine| engine.objects.get(object_key(bucket, key)))? {
            Some(bytes) => decode_object(&bytes).map(Some).inspect_err(|e| {
                tracing::error!(
                    bucket,
                    key = %String::from_utf8_lossy(key),
                    error = %e,
                    "corrupt object record"
                );
            }),
            None => Ok(None),
        }
    }

    fn put(&self, bucket: &str, key: &[u8], object: &Object) -> Result<(), StorageError> {
        let encoded = encode_object(object)?;
        let stored_key = object_key(bucket, key);
        self.write(stored_key.len() + encoded.len(), |engine| {
            engine.objects.insert(stored_key, encoded)
        })
    }

    fn remove(&self, bucket: &str, key: &[u8]) -> Result<(), StorageError> {
        let stored_key = object_key(bucket, key);
        self.write(stored_key.len(), |engine| engine.objects.remove(stored_key))
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.refuse_if_stopped()?;
        self.with_engine(|engine| {
            match self.shared.journal_sync.sync(&self.shared.path) {
                Ok(true) => Ok(()),
                // No journal file where fjall keeps it: fjall's own fsync (it holds the
                // journal lock meanwhile, which is slower, never wrong).
                Ok(false) => engine
                    .database
                    .persist(PersistMode::SyncData)
                    .map_err(|error| self.stop(error)),
                Err(error) => Err(self.stop(fjall::Error::Io(error))),
            }
        })
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .read(|engine| engine.meta.get(name.as_bytes()))?
            .map(|v| v.to_vec()))
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        self.write(name.len() + value.len(), |engine| {
            engine.meta.insert(name.as_bytes(), value)
        })
    }

    fn scan_range_batch(
        &self,
        range: TokenRange,
        after: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanBatch, StorageError> {
        let limit = limit.max(1);
        self.with_engine(|engine| {
            let mut batch = ScanBatch::default();
            // The spans of stored keys in scan order; a cursor skips the spans before its
            // token and starts its own span just after its key.
            for (low, high) in scan_spans(range) {
                let from = match after {
                    Some(cursor) if (low..=high).contains(&cursor.token) => {
                        Bound::Excluded(object_key(&cursor.bucket, &cursor.key))
                    }
                    Some(cursor) if scan_position(range, low, "", &[]) < cursor.position(range) => {
                        continue;
                    }
                    _ => Bound::Included(low.to_be_bytes().to_vec()),
                };
                let to = match high.checked_add(1) {
                    Some(next) => Bound::Excluded(next.to_be_bytes().to_vec()),
                    None => Bound::Unbounded,
                };
                for guard in engine.objects.range::<Vec<u8>, _>((from, to)) {
                    let (key, value) = guard.into_inner().map_err(engine_error)?;
                    let Some((bucket, object_key)) = parse_object_key(&key) else {
                        tracing::error!(
                            range = ?range,
                            stored_key = ?key,
                            "corrupt object key skipped in a range scan"
                        );
                        continue;
                    };
                    match decode_object(&value) {
                        Ok(object) => batch.rows.push((bucket, object_key, object)),
                        Err(error) => {
                            tracing::error!(
                                bucket = %bucket,
                                key = %String::from_utf8_lossy(&object_key),
                                range = ?range,
                                %error,
                                "corrupt object skipped in a range scan"
                            );
                            continue;
                        }
                    }
                    if batch.rows.len() >= limit {
                        let (bucket, key, _) = batch.rows.last().expect("just pushed");
                        batch.resume = Some(ScanCursor::new(bucket, key));
                        return Ok(batch);
                    }
                }
            }
            Ok(batch)
        })
    }

    fn put_hint(&self, key: &[u8], record: &[u8]) -> Result<(), StorageError> {
        self.write(key.len() + record.len(), |engine| {
            engine.hints.insert(key, record)
        })
    }

    fn get_hint(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .read(|engine| engine.hints.get(key))?
            .map(|v| v.to_vec()))
    }

    fn delete_hint(&self, key: &[u8]) -> Result<(), StorageError> {
        self.write(key.len(), |engine| engine.hints.remove(key))
    }

    fn scan_hints(&self) -> Result<HintRecords, StorageError> {
        self.with_engine(|engine| {
            let mut all = Vec::new();
            for guard in engine.hints.iter() {
                let (key, value) = guard.into_inner().map_err(engine_error)?;
                all.push((key.to_vec(), value.to_vec()));
            }
            Ok(all)
        })
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

    /// Counting walks every object in batches (more than one here) and counts only live
    /// keys of the asked buckets.
    #[test]
    fn live_keys_are_counted_per_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FjallStorage::open(dir.path()).unwrap();
        for i in 0..(COUNT_BATCH as u32 + 10) {
            storage.put("many", &i.to_be_bytes(), &sample()).unwrap();
        }
        storage.put("few", b"one", &sample()).unwrap();
        storage.put("few", b"two", &sample()).unwrap();
        let mut deleted = sample();
        let context = deleted.causal_context();
        deleted.apply_write(Actor::new("n1", 1), &context, Value::Tombstone);
        storage.put("few", b"gone", &deleted).unwrap();
        storage.put("other", b"x", &sample()).unwrap();
        assert_eq!(
            storage.live_key_counts(&["many", "few", "none"]).unwrap(),
            vec![COUNT_BATCH as u64 + 10, 2, 0]
        );
    }

    /// Every object of the range, by filtering all of them (what a scan must list).
    fn expected_in(range: TokenRange, stored: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
        let mut expected: Vec<(String, Vec<u8>)> = stored
            .iter()
            .filter(|(b, k)| range.contains(key_token(b, k)))
            .cloned()
            .collect();
        expected.sort();
        expected
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// A batched scan lists a range in several bounded batches, each in scan order, and
        /// together they are exactly the range's objects (also for ranges that wrap and for
        /// the whole ring), the same as the whole-range scan.
        #[test]
        fn batched_scans_list_the_whole_range_in_bounded_batches(
            count in 1usize..400,
            start in proptest::prelude::any::<u64>(),
            end in proptest::prelude::any::<u64>(),
            whole_ring in proptest::prelude::any::<bool>(),
            limit in 1usize..50,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let storage = FjallStorage::open(dir.path()).unwrap();
            let stored: Vec<(String, Vec<u8>)> = (0..count as u32)
                .map(|i| (["a", "bb"][i as usize % 2].to_string(), i.to_le_bytes().to_vec()))
                .collect();
            for (bucket, key) in &stored {
                storage.put(bucket, key, &sample()).unwrap();
            }
            let range = TokenRange { start, end: if whole_ring { start } else { end } };
            let mut listed = Vec::new();
            let mut after: Option<ScanCursor> = None;
            let mut calls = 0;
            loop {
                let batch = storage.scan_range_batch(range, after.as_ref(), limit).unwrap();
                calls += 1;
                proptest::prop_assert!(batch.rows.len() <= limit);
                let positions: Vec<_> = batch
                    .rows
                    .iter()
                    .map(|(b, k, _)| scan_position(range, key_token(b, k), b, k))
                    .collect();
                proptest::prop_assert!(positions.windows(2).all(|w| w[0] < w[1]));
                listed.extend(batch.rows.into_iter().map(|(b, k, _)| (b, k)));
                match batch.resume {
                    Some(cursor) => after = Some(cursor),
                    None => break,
                }
            }
            let expected = expected_in(range, &stored);
            proptest::prop_assert!(calls >= expected.len() / limit);
            let mut sorted = listed.clone();
            sorted.sort();
            proptest::prop_assert_eq!(listed.len(), sorted.len(), "an object listed twice");
            proptest::prop_assert_eq!(&sorted, &expected);
            let mut whole: Vec<(String, Vec<u8>)> = storage
                .scan_range(range)
                .unwrap()
                .into_iter()
                .map(|(b, k, _)| (b, k))
                .collect();
            whole.sort();
            proptest::prop_assert_eq!(whole, expected);
        }
    }

    /// The sync finds the journal fjall writes to: the highest-numbered `.jnl`, which holds
    /// a write just made (fjall hands it to the OS at once); other names are ignored.
    #[test]
    fn sync_targets_the_journal_fjall_writes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FjallStorage::open(dir.path()).unwrap();
        let marker = b"journal-sync-marker-key";
        storage.put("b", marker, &sample()).unwrap();
        storage.sync().unwrap();
        let db = dir.path().join("db");
        let newest = newest_journal(&db).unwrap().expect("fjall keeps a journal");
        let journal = std::fs::read(db.join(format!("{newest}.jnl"))).unwrap();
        assert!(
            journal.windows(marker.len()).any(|w| w == marker),
            "the write is in journal {newest}"
        );
        let synced = storage.shared.journal_sync.active.lock().unwrap();
        assert_eq!(synced.as_ref().map(|(n, _)| *n), Some(newest));

        let other = tempfile::tempdir().unwrap();
        for name in ["0.jnl", "3.jnl", "12.jnl", "x.jnl", "40.tmp", "7.jnl.bak"] {
            std::fs::write(other.path().join(name), b"").unwrap();
        }
        assert_eq!(newest_journal(other.path()).unwrap(), Some(12));
        let empty = tempfile::tempdir().unwrap();
        assert!(!JournalSync::default().sync(empty.path()).unwrap());
    }

    /// A clean close writes the memtables out to tables (nothing left for the next open to
    /// replay into memory), and everything is there after reopening.
    #[test]
    fn flush_for_close_leaves_only_tables_to_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = FjallStorage::open(dir.path()).unwrap();
            for i in 0..500u32 {
                storage.put("b", &i.to_be_bytes(), &sample()).unwrap();
            }
            storage.put_meta("epoch", &[3, 0, 0, 0]).unwrap();
            storage.sync().unwrap();
            assert!(storage.flush_for_close(CLOSE_FLUSH_DEADLINE).unwrap());
            storage
                .with_engine(|engine| {
                    assert_eq!(engine.objects.sealed_memtable_count(), 0);
                    assert!(
                        engine.objects.table_count() > 0,
                        "objects flushed to a table"
                    );
                    assert!(engine.meta.table_count() > 0, "meta flushed to a table");
                    assert_eq!(engine.database.journal_count(), 1);
                    Ok(())
                })
                .unwrap();
        }
        let storage = FjallStorage::open(dir.path()).unwrap();
        for i in 0..500u32 {
            assert_eq!(storage.get("b", &i.to_be_bytes()).unwrap(), Some(sample()));
        }
        assert_eq!(storage.get_meta("epoch").unwrap(), Some(vec![3, 0, 0, 0]));
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
