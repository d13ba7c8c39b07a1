//! Downloads of large blobs that survive being cut short.
//!
//! A blob of more than [`crate::blob::DIRECT_CHUNKS`] chunks is written to
//! `<dir>/<digest>.part` as its chunks arrive, and every [`CHECKPOINT`]
//! chunks `<dir>/<digest>.next` records how far the part is good: the
//! object's id in the bucket, the bytes and chunks written, and the stream
//! sequence to go on from. A read that starts again (the worker killed and
//! restarted, the server away for a while, a read stalled) goes on from
//! there with an ordered consumer that starts at that sequence, instead of
//! reading the model from its first byte. The whole is checked against its
//! digest, hashed as it arrives (a part's first bytes from the disk when the
//! read goes on from them), so the file is not read again to check it; a
//! part that does not add up is thrown away and read again from the start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};

/// Chunks read between two records of how far a download got (1 MiB of
/// 128 KiB chunks): a download cut short reads at most this many again.
pub const CHECKPOINT: usize = 8;

/// How far a download got, as recorded next to its part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The object's id in the bucket (a blob stored again has a new one, and its chunks new sequences).
    pub nuid: String,
    /// Bytes of the part that are good.
    pub bytes: u64,
    /// Chunks those bytes are.
    pub chunks: usize,
    /// The stream sequence after the last chunk written.
    pub next_seq: u64,
}

/// Where a download starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// From the first chunk (nothing usable on disk).
    Fresh,
    /// From a recorded mark: the part is cut back to its bytes.
    Resume(Mark),
}

/// Where a download of the object `nuid` (`size` bytes in `chunks` chunks)
/// starts, given the mark found beside its part (if any) and the part's
/// length on disk. A mark for another object, one that claims more than the
/// object holds, or a part shorter than its mark (truncated since) starts
/// afresh; a mark at zero is no resume at all.
pub fn start(mark: Option<Mark>, part_len: Option<u64>, nuid: &str, size: u64, chunks: usize) -> Start {
    match (mark, part_len) {
        (Some(m), Some(len))
            if m.nuid == nuid && m.bytes > 0 && m.bytes <= size && m.chunks <= chunks && m.bytes <= len && m.next_seq > 0 =>
        {
            Start::Resume(m)
        }
        _ => Start::Fresh,
    }
}

/// A download's progress, for whoever watches (metrics, logs, tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The blob.
    pub digest: String,
    /// Bytes already on disk when this read started (0: from the start).
    pub resumed_from: u64,
    /// Bytes on disk now.
    pub done: u64,
    /// The blob's size.
    pub size: u64,
}

/// What is told of each chunk written.
pub type Observer = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A folder of downloads in progress.
pub struct Downloads {
    dir: PathBuf,
    /// One download of a digest at a time in this process.
    busy: std::sync::Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    observer: Option<Observer>,
}

impl Downloads {
    /// Uses (and creates) `dir`.
    pub fn new(dir: impl Into<PathBuf>, observer: Option<Observer>) -> Result<Self, crate::blob::Error> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| crate::blob::Error::Io(format!("cannot create the download folder {}: {e}", dir.display())))?;
        Ok(Self { dir, busy: Default::default(), observer })
    }

    /// Whoever is told of this folder's downloads.
    pub(crate) fn observer(&self) -> Option<Observer> {
        self.observer.clone()
    }

    /// The part file of `digest`.
    pub fn part(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.part"))
    }

    pub(crate) fn mark_path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.next"))
    }

    /// The mark recorded for `digest`, if any (unreadable counts as none).
    pub fn mark(&self, digest: &str) -> Option<Mark> {
        read_mark(&self.mark_path(digest))
    }

    /// Removes the part and its mark (done, or not worth keeping).
    pub(crate) async fn forget(&self, digest: &str) {
        for path in [self.part(digest), self.mark_path(digest)] {
            if let Err(e) = tokio::fs::remove_file(&path).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }

    pub(crate) fn tell(&self, progress: &Progress) {
        if let Some(f) = &self.observer {
            f(progress);
        }
    }

    /// The lock for downloading `digest` (held while it downloads).
    pub(crate) fn lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut busy = self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        busy.retain(|_, w| w.strong_count() > 0);
        if let Some(lock) = busy.get(digest).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        busy.insert(digest.to_string(), Arc::downgrade(&lock));
        lock
    }
}

/// Records `mark` at `path` (written beside it, then renamed over it: a
/// reader finds the old mark or the new one, never half of one). Blocking.
pub(crate) fn record(path: &Path, mark: &Mark) -> Result<(), crate::blob::Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_vec(mark).map_err(|e| crate::blob::Error::Io(e.to_string()))?;
    std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn read_mark(path: &Path) -> Option<Mark> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

pub(crate) fn io(path: &Path, e: std::io::Error) -> crate::blob::Error {
    crate::blob::Error::Io(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(nuid: &str, bytes: u64, chunks: usize, next_seq: u64) -> Mark {
        Mark { nuid: nuid.into(), bytes, chunks, next_seq }
    }

    #[test]
    fn a_download_resumes_only_from_a_mark_that_fits_the_object_and_the_part() {
        let good = mark("N1", 1 << 20, 8, 42);
        assert_eq!(start(Some(good.clone()), Some(1 << 20), "N1", 4 << 20, 32), Start::Resume(good.clone()));
        // A part longer than its mark (chunks written after the last record) resumes at the mark.
        assert_eq!(start(Some(good.clone()), Some((1 << 20) + 5), "N1", 4 << 20, 32), Start::Resume(good.clone()));
        // No mark, no part, or a part cut shorter than its mark.
        assert_eq!(start(None, Some(1 << 20), "N1", 4 << 20, 32), Start::Fresh);
        assert_eq!(start(Some(good.clone()), None, "N1", 4 << 20, 32), Start::Fresh);
        assert_eq!(start(Some(good.clone()), Some((1 << 20) - 1), "N1", 4 << 20, 32), Start::Fresh);
        // The blob stored again (another object), or a mark claiming more than the object holds.
        assert_eq!(start(Some(good.clone()), Some(1 << 20), "N2", 4 << 20, 32), Start::Fresh);
        assert_eq!(start(Some(good.clone()), Some(1 << 20), "N1", (1 << 20) - 1, 32), Start::Fresh);
        assert_eq!(start(Some(good), Some(1 << 20), "N1", 4 << 20, 7), Start::Fresh);
        // A mark at nothing read is no resume.
        assert_eq!(start(Some(mark("N1", 0, 0, 42)), Some(0), "N1", 4 << 20, 32), Start::Fresh);
    }

    #[tokio::test]
    async fn marks_are_recorded_and_read_back_and_forgotten_with_their_part() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Downloads::new(dir.path().join("dl"), None).expect("folder");
        let digest = "ab".repeat(32);
        assert_eq!(d.mark(&digest), None);
        let m = mark("N1", 3 << 17, 3, 99);
        record(&d.mark_path(&digest), &m).expect("record");
        std::fs::write(d.part(&digest), vec![0u8; 3 << 17]).expect("part");
        assert_eq!(d.mark(&digest), Some(m));
        std::fs::write(d.mark_path(&digest), b"{not json").expect("garbage");
        assert_eq!(d.mark(&digest), None, "an unreadable mark counts as none");
        d.forget(&digest).await;
        assert!(!d.part(&digest).exists() && !d.mark_path(&digest).exists());
    }
}
