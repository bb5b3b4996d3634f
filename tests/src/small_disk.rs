//! A tmpfs of a fixed size: a real file system that runs out of space, for
//! tests of full disks. Also compiled into the buffer's own tests
//! (`crates/buffer/tests/buffer.rs`, by `#[path]`), which cannot depend on
//! this crate's processes and fleets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// A tmpfs of a fixed size mounted at a directory for the life of the
/// value: a real file system that runs out of space, for tests of full
/// disks. Mounting needs root, as CI runs; elsewhere [`SmallDisk::mount`]
/// fails and says so.
pub struct SmallDisk {
    pub dir: PathBuf,
    filler: PathBuf,
}

impl SmallDisk {
    pub fn mount(dir: &Path, bytes: u64) -> anyhow::Result<SmallDisk> {
        std::fs::create_dir_all(dir)?;
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "edgefleet-test",
            ])
            .arg(dir)
            .output()
            .context("running mount")?;
        if !output.status.success() {
            bail!(
                "cannot mount a {bytes}-byte tmpfs at {} (tests of full disks need root): {}",
                dir.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(SmallDisk {
            dir: dir.to_path_buf(),
            filler: dir.join("filler"),
        })
    }

    /// Fills the file system with a file of its own but for about `leave`
    /// bytes.
    pub fn fill(&self, leave: u64) -> anyhow::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)?;
        let chunk = vec![0xa5u8; 64 * 1024];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => return Err(e.into()),
            }
        }
        let len = file.metadata()?.len();
        file.set_len(len.saturating_sub(leave))?;
        Ok(())
    }

    /// Gives back what [`SmallDisk::fill`] took.
    pub fn free(&self) -> anyhow::Result<()> {
        std::fs::remove_file(&self.filler)?;
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a process of the test may still have files open there.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
