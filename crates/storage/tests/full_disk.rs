//! A full disk, for real: the data directory on a small tmpfs. These tests need to mount
//! (root, as in CI); elsewhere they print why they are skipped and pass.

use mendkv_core::storage::{Storage, StorageError};
use mendkv_core::version::{Actor, CausalContext, Object, Value};
use mendkv_storage::{FjallStorage, StorageOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a fixed size on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}")])
            .arg("tmpfs")
            .arg(dir.path())
            .output();
        match output {
            Ok(output) if output.status.success() => Some(Tmpfs { dir }),
            Ok(output) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs here ({})",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("skipped: cannot run mount ({error})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ballast(&self) -> PathBuf {
        self.path().join("ballast")
    }

    /// Fills the file system to the last byte.
    fn fill(&self) {
        let mut file = std::fs::File::create(self.ballast()).expect("ballast");
        let chunk = vec![0xa5u8; 64 << 10];
        loop {
            if let Err(error) = file.write_all(&chunk) {
                assert_eq!(error.kind(), std::io::ErrorKind::StorageFull, "{error}");
                break;
            }
        }
        // The last partial chunk may have left a few bytes: take them too.
        let _ = file.write_all(&[0; 4096]);
        let _ = file.write_all(&[0; 1]);
    }

    /// Truncates, then removes, the ballast: truncation frees its pages at once, even while
    /// a child process forked by a parallel test still holds an inherited descriptor.
    fn free_space(&self) {
        let ballast = std::fs::OpenOptions::new()
            .write(true)
            .open(self.ballast())
            .expect("open ballast");
        ballast.set_len(0).expect("truncate ballast");
        std::fs::remove_file(self.ballast()).expect("remove ballast");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn object(value: &[u8]) -> Object {
    let mut object = Object::empty();
    object.apply_write(
        Actor::new("n1", 1),
        &CausalContext::empty(),
        Value::Data {
            bytes: value.to_vec().into(),
            content_type: "application/octet-stream".into(),
        },
    );
    object
}

fn key(i: usize) -> Vec<u8> {
    format!("k{i}").into_bytes()
}

/// Below the reserve, writes are refused with `Full` and nothing is written; the engine
/// does not stop, and writes resume by themselves once space returns.
#[test]
fn writes_are_refused_below_the_reserve_and_resume_when_space_returns() {
    let Some(tmpfs) = Tmpfs::mount(16 << 20) else {
        return;
    };
    let options = StorageOptions {
        min_free_bytes: 4 << 20,
    };
    let storage = FjallStorage::open_with(tmpfs.path(), options).unwrap();
    storage.put("b", b"before", &object(b"x")).unwrap();
    storage.sync().unwrap();
    tmpfs.fill();
    let refused = storage.put("b", b"refused", &object(b"y"));
    assert!(matches!(refused, Err(StorageError::Full(_))), "{refused:?}");
    assert!(storage.health().is_err());
    assert_eq!(storage.failure(), None, "the engine did not stop");
    assert_eq!(storage.get("b", b"before").unwrap(), Some(object(b"x")));
    tmpfs.free_space();
    assert_eq!(storage.health(), Ok(()));
    storage.put("b", b"after", &object(b"z")).unwrap();
    storage.sync().unwrap();
    assert_eq!(storage.get("b", b"refused").unwrap(), None);
    assert_eq!(storage.recover(), Ok(false), "nothing to reopen");
}

/// With the reserve off, a write hits ENOSPC and fjall stops (poisoned); every write is
/// then refused as `Full`, `recover` waits for space, then reopens the engine for every
/// clone, and every synced write is still there.
#[test]
fn a_stopped_engine_reopens_once_space_returns_and_keeps_synced_writes() {
    let Some(tmpfs) = Tmpfs::mount(16 << 20) else {
        return;
    };
    let options = StorageOptions { min_free_bytes: 0 };
    let storage = FjallStorage::open_with(tmpfs.path(), options).unwrap();
    let clone = storage.clone();
    let value = vec![7u8; 3000];
    let mut synced = 0;
    for i in 0..100 {
        storage.put("b", &key(i), &object(&value)).unwrap();
        storage.sync().unwrap();
        synced += 1;
    }
    tmpfs.fill();
    let mut first_error = None;
    for _ in 0..100_000 {
        let next = key(synced);
        match storage
            .put("b", &next, &object(&value))
            .and_then(|()| storage.sync())
        {
            Ok(()) => synced += 1,
            Err(error) => {
                first_error = Some(error);
                break;
            }
        }
    }
    let first_error = first_error.expect("the disk filled up");
    assert!(first_error.is_full(), "{first_error:?}");
    let failure = storage.failure().expect("the engine stopped");
    assert!(failure.contains("disk full"), "{failure}");
    // Stopped: refused up front (nothing written), reads still served.
    let refused = clone.put("b", b"while-stopped", &object(b"n"));
    assert!(matches!(refused, Err(StorageError::Full(_))), "{refused:?}");
    assert!(clone.sync().is_err());
    assert!(clone.health().is_err());
    assert_eq!(clone.get("b", &key(0)).unwrap(), Some(object(&value)));
    let early = storage.recover();
    assert!(matches!(early, Err(StorageError::Full(_))), "{early:?}");
    assert_eq!(storage.recoveries(), 0);

    tmpfs.free_space();
    assert_eq!(storage.recover(), Ok(true));
    assert_eq!(clone.recoveries(), 1);
    assert_eq!(clone.health(), Ok(()));
    for i in 0..synced {
        assert_eq!(
            clone.get("b", &key(i)).unwrap(),
            Some(object(&value)),
            "synced write {i} lost"
        );
    }
    assert_eq!(clone.get("b", b"while-stopped").unwrap(), None);
    clone.put("b", b"after", &object(b"a")).unwrap();
    storage.sync().unwrap();
    assert_eq!(storage.get("b", b"after").unwrap(), Some(object(b"a")));
    drop((storage, clone));
    // And what was synced after the reopen survives a close.
    let reopened = FjallStorage::open_with(tmpfs.path(), options).unwrap();
    assert_eq!(reopened.get("b", b"after").unwrap(), Some(object(b"a")));
    assert_eq!(
        reopened.get("b", &key(synced - 1)).unwrap(),
        Some(object(&value))
    );
}
