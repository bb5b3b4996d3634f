//! Makes what a sled 0.34 database has flushed survive a power cut, not only
//! a crash of the process.
//!
//! `sled::Db::flush` makes its log writes durable with `sync_file_range`,
//! which writes the file's pages but neither its size (the log grows by
//! appending) nor the disk's volatile write cache, and it writes a page too
//! large for a quarter of a log segment to a file of its own under `blobs/`
//! with no sync at all. None of that is lost when the process dies, because
//! the kernel's page cache outlives it; all of it can be lost when the power
//! goes, which on an edge gateway is the usual way to stop. Whoever promises
//! durability after a flush (the agent's buffer before an MQTT PUBACK, the
//! ingest's store before a gRPC ack) calls [`DiskSync::sync`] after it.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The files of one sled database directory that a flush leaves unsynced.
///
/// A blob file is synced once, so [`DiskSync::sync`] must not run while
/// another thread may be writing to the database (it could sync a blob
/// half-written and never again): the buffer has a single writer thread,
/// the ingest's store flushes under its write lock.
#[derive(Debug)]
pub struct DiskSync {
    log: File,
    blobs: PathBuf,
    synced: Mutex<Synced>,
}

/// Blob files already synced, by the log sequence number sled names them
/// after. Rebuilt from each listing (into the spare set, so a sync does not
/// allocate), so blobs sled has since deleted do not accumulate.
#[derive(Debug, Default)]
struct Synced {
    names: HashSet<u64>,
    spare: HashSet<u64>,
}

impl DiskSync {
    /// For the database sled opened in `dir`. Syncs what is there already
    /// (what was written while opening, e.g. a new database's first keys)
    /// and `dir` itself, so the entries of a database created just now are
    /// durable too.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let disk = Self {
            log: File::open(dir.join("db"))?,
            blobs: dir.join("blobs"),
            synced: Mutex::new(Synced::default()),
        };
        disk.sync()?;
        File::open(dir)?.sync_all()?;
        Ok(disk)
    }

    /// Call after `sled::Db::flush`: syncs the blob files written since the
    /// last call, the blob directory when it gained any, and the log file
    /// with its size.
    pub fn sync(&self) -> io::Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        let Synced { names, spare } = &mut *synced;
        spare.clear();
        let mut new_blobs = false;
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => Some(entries),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        for entry in entries.into_iter().flatten() {
            let entry = entry?;
            // Not a name sled gives (never expected): synced every time.
            let name = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok());
            if name.is_none_or(|n| !names.contains(&n)) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_all()?,
                    // sled deleted it between the listing and the open.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new_blobs = true;
            }
            spare.extend(name);
        }
        if new_blobs {
            File::open(&self.blobs)?.sync_all()?;
        }
        std::mem::swap(names, spare);
        self.log.sync_data()
    }
}

/// Deletes the snapshot files sled began writing in `dir` and never
/// finished; call it before opening the database. sled 0.34 writes a
/// snapshot to `snap.<lsn>.generating` and renames it when complete, but a
/// write that fails (a full disk) leaves that file behind, and sled's own
/// listing of snapshots skips only an older suffix: the next open reads the
/// fragment as the newest snapshot and refuses the whole database as
/// corrupt, although its log is intact. A snapshot only saves replaying the
/// log, so an unfinished one is nothing to keep. Each deletion is logged as
/// a warning; returns what it deleted.
pub fn remove_unfinished_snapshots(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let unfinished = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("snap.") && name.ends_with(".generating"));
        if unfinished {
            std::fs::remove_file(&path)?;
            tracing::warn!(file = %path.display(), "deleted a snapshot sled did not finish writing (a full disk?)");
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Pages of `path` the kernel still holds dirty, from `cachestat(2)`
/// (Linux 6.5 and later): the one thing a process can observe of whether
/// a file's data reached the disk. Tests use it to check that what was
/// promised durable is not still waiting in memory.
pub fn dirty_pages(path: &Path) -> io::Result<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    // The kernel's layout; only `nr_dirty` and `nr_writeback` are read.
    #[allow(dead_code)]
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    use std::os::fd::AsRawFd;
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = File::open(path)?;
    let range = Range { off: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live, correctly laid out structs.
    let ret = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.nr_dirty + stat.nr_writeback)
}

/// What [`unsynced_files`] found in a sled database directory.
#[derive(Debug)]
pub struct Unsynced {
    /// Blob files in `blobs/`: a test of blob syncing needs at least one.
    pub blob_files: usize,
    /// Files of the database (the log, the blobs) with dirty pages, and how
    /// many each.
    pub dirty: Vec<(PathBuf, u64)>,
}

/// The log and blob files of the sled database in `dir` that still have
/// pages only in memory ([`dirty_pages`]); what tests of a durability
/// promise assert is empty.
pub fn unsynced_files(dir: &Path) -> io::Result<Unsynced> {
    let mut files = vec![dir.join("db")];
    match std::fs::read_dir(dir.join("blobs")) {
        Ok(entries) => {
            for entry in entries {
                files.push(entry?.path());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut dirty = Vec::new();
    for file in &files {
        let pages = dirty_pages(file).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cachestat(2) on {} (it needs Linux 6.5+): {e}",
                    file.display()
                ),
            )
        })?;
        if pages > 0 {
            dirty.push((file.clone(), pages));
        }
    }
    Ok(Unsynced {
        blob_files: files.len() - 1,
        dirty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_unfinished_snapshot_no_longer_makes_sled_refuse_its_database() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            db.insert(b"kept", &b"value"[..]).unwrap();
            db.flush().unwrap();
        }
        // What a snapshot write cut off by a full disk leaves: an empty file
        // under the name sled writes to first, newer than any snapshot.
        std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFF0.generating"), b"").unwrap();
        let refused = sled::Config::new().path(dir.path()).open();
        assert!(
            refused.is_err(),
            "sled 0.34 refuses the database while the fragment is there; if a \
             newer sled does not, this workaround can go"
        );
        drop(refused);
        let removed = remove_unfinished_snapshots(dir.path()).unwrap();
        assert_eq!(removed.len(), 1);
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        assert_eq!(db.get(b"kept").unwrap().as_deref(), Some(&b"value"[..]));
        assert!(remove_unfinished_snapshots(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_blob_file_sled_left_dirty_is_on_disk_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        let db = std::fs::File::create(dir.path().join("db")).unwrap();
        drop(db);
        let disk = DiskSync::open(dir.path()).unwrap();
        // What sled does for a large page: a new file, written, not synced.
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        let blob = dir.path().join("blobs").join("4096");
        let mut file = File::create(&blob).unwrap();
        file.write_all(&vec![7u8; 256 << 10]).unwrap();
        drop(file);
        let before = match dirty_pages(&blob) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                panic!("this kernel has no cachestat(2) (Linux 6.5+), which this test needs to see dirty pages")
            }
            Err(e) => panic!("cachestat: {e}"),
        };
        assert!(
            before > 0,
            "the new blob should still be dirty in the page cache"
        );
        disk.sync().unwrap();
        assert_eq!(dirty_pages(&blob).unwrap(), 0, "sync left blob pages dirty");
    }

    #[test]
    fn blobs_deleted_since_the_last_sync_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        File::create(dir.path().join("db")).unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        let disk = DiskSync::open(dir.path()).unwrap();
        let blob = dir.path().join("blobs").join("1");
        std::fs::write(&blob, b"x").unwrap();
        disk.sync().unwrap();
        assert_eq!(disk.synced.lock().unwrap().names.len(), 1);
        std::fs::remove_file(&blob).unwrap();
        disk.sync().unwrap();
        assert!(disk.synced.lock().unwrap().names.is_empty());
    }

    #[test]
    fn a_database_without_a_blob_directory_syncs() {
        let dir = tempfile::tempdir().unwrap();
        File::create(dir.path().join("db")).unwrap();
        DiskSync::open(dir.path()).unwrap().sync().unwrap();
    }
}
