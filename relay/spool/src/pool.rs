//! Reuse of spent files instead of creating new ones.
//!
//! Creating a file allocates an inode. On ext4 under steady create/delete churn that allocation
//! searches the inode bitmap past every recently deleted inode (`recently_deleted()` reads the
//! inode table for each candidate): profiled at about 1,000 messages per second through the
//! relay, that search and the lock contention around it took about 40 % of all CPU time, more
//! than SMTP, TLS and the queue together. A rename allocates nothing. So a spent file (a removed
//! message, a finished in-flight marker) is renamed to a free name (`<n>.free`) in its
//! directory, and the next file written there takes it over by renaming it to the new name.
//!
//! A taken-over file still holds its old bytes; [`FilePool::write`] overwrites from the start
//! and sets the final length. Overwriting allocated blocks of an unchanged length also lets
//! `fdatasync` skip the journal commit that a grown file needs. Free files are never valid
//! under their free name, hold at most the content of a file that was already deleted (large
//! ones are emptied), and are bounded in number; recovery takes them back ([`FilePool::adopt`]) or deletes the surplus.
//!
//! Durability stays with the caller: taking and releasing are renames, made durable by the
//! caller's directory sync like any other name change.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Extension of a free file.
pub const FREE_EXT: &str = "free";

/// The free files of one directory.
pub struct FilePool {
    dir: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    max: usize,
    /// Released files longer than this are emptied first, so the pool's disk use stays bounded
    /// (`max` × `keep_bytes`); a large message's blocks are not worth keeping.
    keep_bytes: u64,
    next: AtomicU64,
}

impl FilePool {
    /// A pool of at most `max` free files in `dir`, each keeping at most `keep_bytes`.
    pub fn new(dir: &Path, max: usize, keep_bytes: u64) -> FilePool {
        FilePool {
            dir: dir.to_path_buf(),
            free: Mutex::new(Vec::new()),
            max,
            keep_bytes,
            // Free names only have to be unique among the free files of this directory; a
            // random start keeps them apart from names left by an earlier run.
            next: AtomicU64::new(rand::random::<u32>() as u64 * 1_000_000),
        }
    }

    /// Whether `name` is a free file's name.
    pub fn is_free_name(name: &str) -> bool {
        name.rsplit_once('.')
            .is_some_and(|(_, ext)| ext == FREE_EXT)
    }

    /// Takes back a free file found in the directory (at start), or deletes it when the pool is
    /// full.
    pub fn adopt(&self, path: PathBuf) {
        let mut free = self.lock();
        if free.len() < self.max {
            free.push(path);
        } else {
            drop(free);
            let _ = fs::remove_file(&path);
        }
    }

    /// Creates empty free files until the pool holds `count` (at start: the first burst then
    /// finds files to take over instead of allocating inodes while clients wait). Best effort.
    pub fn fill(&self, count: usize) {
        while self.len() < count.min(self.max) {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let free = self.dir.join(format!("{n:016x}.{FREE_EXT}"));
            match OpenOptions::new().write(true).create_new(true).open(&free) {
                Ok(_) => self.lock().push(free),
                Err(_) => return,
            }
        }
    }

    /// Number of free files held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no free file is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `parts` to a file at `target`, which must not exist: a free file renamed there
    /// (never replacing an existing `target`), or a new one. With `sync`, the data and the
    /// length are flushed (`fdatasync`) before this returns. On error nothing is left at
    /// `target` by this call.
    pub fn write(&self, target: &Path, parts: &[&[u8]], sync: bool) -> io::Result<File> {
        let mut f = self.create(target)?;
        let result = (|| {
            let mut len = 0u64;
            for part in parts {
                f.write_all(part)?;
                len += part.len() as u64;
            }
            // A reused file may have been longer.
            f.set_len(len)?;
            if sync {
                // fdatasync also flushes the size and block map, which reading the data back
                // needs; only timestamps are left out.
                f.sync_data()?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(f),
            Err(e) => {
                drop(f);
                let _ = fs::remove_file(target);
                Err(e)
            }
        }
    }

    /// Opens a file at `target` for writing from offset 0: a free file renamed there, or a new
    /// one. Fails if `target` exists. The caller overwrites it and sets its final length.
    pub fn create(&self, target: &Path) -> io::Result<File> {
        loop {
            let Some(free) = self.lock().pop() else {
                // create_new: a name collision must fail, never overwrite another file.
                return OpenOptions::new().write(true).create_new(true).open(target);
            };
            match rename_noreplace(&free, target) {
                Ok(()) => return OpenOptions::new().write(true).open(target),
                // Gone from under us (deleted by hand): try the next one.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    self.adopt(free);
                    return Err(e);
                }
                Err(e) => {
                    let _ = fs::remove_file(&free);
                    return Err(e);
                }
            }
        }
    }

    /// `path` is spent: it is renamed to a free name, or deleted when the pool is full. Either
    /// way its name is gone when this returns (durable after the caller's directory sync).
    pub fn release(&self, path: &Path) -> io::Result<()> {
        if self.lock().len() >= self.max {
            return fs::remove_file(path);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let free = self.dir.join(format!("{n:016x}.{FREE_EXT}"));
        match rename_noreplace(path, &free) {
            Ok(()) => {
                if fs::metadata(&free).is_ok_and(|m| m.len() > self.keep_bytes) {
                    let _ = OpenOptions::new()
                        .write(true)
                        .open(&free)
                        .and_then(|f| f.set_len(0));
                }
                self.adopt(free);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => fs::remove_file(path),
            Err(e) => Err(e),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        // A Vec of paths cannot be left half-updated by a panic.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: both arguments are valid NUL-terminated paths that live across the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_files_are_reused_and_overwritten_to_their_new_length() {
        let dir = tempfile::tempdir().unwrap();
        let pool = FilePool::new(dir.path(), 2, 1 << 20);
        let a = dir.path().join("a.msg");
        pool.write(&a, &[b"a long first content"], false).unwrap();
        pool.release(&a).unwrap();
        assert!(!a.exists());
        assert_eq!(pool.len(), 1);
        let b = dir.path().join("b.msg");
        pool.write(&b, &[b"short"], false).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"short");
        assert_eq!(pool.len(), 0);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "the free file became b.msg");
    }

    #[test]
    fn never_replaces_an_existing_file_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pool = FilePool::new(dir.path(), 1, 1 << 20);
        let (x, y, z) = (
            dir.path().join("x"),
            dir.path().join("y"),
            dir.path().join("z"),
        );
        for p in [&x, &y, &z] {
            pool.write(p, &[b"data"], false).unwrap();
        }
        pool.release(&x).unwrap();
        pool.release(&y).unwrap(); // pool full: deleted
        assert!(!y.exists());
        assert_eq!(pool.len(), 1);
        let err = pool.write(&z, &[b"other"], false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&z).unwrap(), b"data", "z untouched");
        assert_eq!(pool.len(), 1, "the free file is kept");
        assert!(FilePool::is_free_name("0000000000000001.free"));

        // Large files are emptied when released.
        let small = FilePool::new(dir.path(), 4, 3);
        let big = dir.path().join("big");
        small.write(&big, &[b"more than three"], false).unwrap();
        small.release(&big).unwrap();
        let free = small.lock()[0].clone();
        assert_eq!(fs::metadata(free).unwrap().len(), 0);
        assert!(!FilePool::is_free_name("0000000000000001.msg"));
    }
}
