//! A worker's own folder is held by one process at a time.
//!
//! `flame-worker` keeps its downloads in progress (`<digest>.part` and its
//! mark) and the updates an aggregator takes from disk in one folder: its
//! `--download-dir`, or `flame-worker-<ID>` in the system's temporary folder.
//! Two processes given the same folder (one `FLAME_DOWNLOAD_DIR` for every
//! worker of a machine, or two workers started with one `--id`) would write
//! and remove each other's parts, and the second one's start would remove
//! the updates the first is aggregating from. So a worker claims its folder
//! before it touches anything in it: an exclusive lock on [`LOCK`] in it,
//! held as long as the process runs (the system lets it go when the process
//! ends, killed or not). The second is refused, told which process holds the
//! folder and what to do.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name in the folder.
pub const LOCK: &str = ".flame-worker.lock";

/// Why a folder could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another live process holds it.
    #[error(
        "the folder {} is in use by another flame-worker{}: give each worker on this machine a folder of its own (--download-dir or FLAME_DOWNLOAD_DIR; without them, each --id has its own)",
        dir.display(),
        holder.map(|pid| format!(" (process {pid})")).unwrap_or_default()
    )]
    Taken {
        /// The folder.
        dir: PathBuf,
        /// The process that holds it, as it wrote in the lock file.
        holder: Option<u32>,
    },
    /// The folder or its lock file cannot be made, opened or locked.
    #[error(
        "cannot claim the folder {}: {what}: {source}; give the worker a folder it can write (--download-dir or FLAME_DOWNLOAD_DIR)",
        dir.display()
    )]
    Io {
        /// The folder.
        dir: PathBuf,
        /// What failed.
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

/// A claimed folder: this process's alone until dropped, when its lock file
/// is removed and the lock let go.
#[derive(Debug)]
pub struct Claim {
    /// Held open: the lock lasts as long as the file is open.
    _locked: File,
    path: PathBuf,
}

impl Claim {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Removed while still locked (the lock goes with the file, closed after this): a process
        // that opened it meanwhile finds, once it has the lock, that the path is no longer its
        // file, and takes the one made after.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Claims `dir` (made if missing) for this process, or says who holds it.
pub fn claim(dir: &Path) -> Result<Claim, Error> {
    let io = |what, source| Error::Io { dir: dir.to_path_buf(), what, source };
    std::fs::create_dir_all(dir).map_err(|e| io("making it", e))?;
    let path = dir.join(LOCK);
    loop {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("opening its lock file", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
                return Err(Error::Taken { dir: dir.to_path_buf(), holder });
            }
            Err(TryLockError::Error(e)) => return Err(io("locking its lock file", e)),
        }
        // Its last holder may have removed it between our open and our lock: then the lock is on
        // a file no one else will open, and the path's file is the one to lock.
        if !is_same_file(&file, &path) {
            continue;
        }
        file.set_len(0).map_err(|e| io("writing its lock file", e))?;
        file.rewind().map_err(|e| io("writing its lock file", e))?;
        writeln!(file, "{}", std::process::id()).map_err(|e| io("writing its lock file", e))?;
        return Ok(Claim { _locked: file, path });
    }
}

#[cfg(unix)]
fn is_same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn is_same_file(_: &File, path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_held_by_one_claim_at_a_time_and_free_once_it_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("worker");
        let first = claim(&folder).unwrap();
        assert!(folder.is_dir(), "made when missing");
        assert_eq!(std::fs::read_to_string(first.path()).unwrap().trim(), std::process::id().to_string());

        // Another open file description of the lock is refused while the first holds it, as
        // another process is (the lock belongs to the open file, not the process).
        let err = claim(&folder).unwrap_err();
        let said = err.to_string();
        assert!(matches!(err, Error::Taken { holder: Some(pid), .. } if pid == std::process::id()), "{said}");
        assert!(said.contains(&folder.display().to_string()) && said.contains("--download-dir"), "{said}");

        drop(first);
        assert!(!folder.join(LOCK).exists(), "its lock file goes with it");
        let again = claim(&folder).unwrap();
        // A lock file left by a process that was killed (no lock on it) is no obstacle.
        drop(again);
        std::fs::write(folder.join(LOCK), "4294967295\n").unwrap();
        let after_kill = claim(&folder).unwrap();
        assert_eq!(std::fs::read_to_string(after_kill.path()).unwrap().trim(), std::process::id().to_string());
    }

    #[test]
    fn claims_racing_with_releases_never_hold_a_folder_twice() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("worker");
        let (holders, won) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        match claim(&folder) {
                            Ok(held) => {
                                assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two claims at once");
                                won.fetch_add(1, Ordering::SeqCst);
                                std::thread::yield_now();
                                holders.fetch_sub(1, Ordering::SeqCst);
                                drop(held);
                            }
                            Err(Error::Taken { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
        });
        assert!(won.load(Ordering::SeqCst) > 0);
        assert!(!folder.join(LOCK).exists());
    }

    #[test]
    fn a_folder_that_cannot_be_made_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let err = claim(&file.join("worker")).unwrap_err().to_string();
        assert!(err.contains("a-file/worker") && err.contains("making it") && err.contains("--download-dir"), "{err}");
    }
}
