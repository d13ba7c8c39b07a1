//! Where an aggregator holds the updates of a rule that needs every one at
//! once (median, trimmed mean, Krum: [`crate::aggregate::Needs::Blocks`]):
//! in memory while all of them fit a budget, otherwise in files on disk, one
//! per update, which the rule reads back a block at a time. The files are
//! removed when the updates are dropped.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::robust::{InMemory, Layout, Updates, layout, numel};
use crate::weights::{Error, Weights};

/// How many bytes of updates an aggregator holds in memory unless told
/// otherwise (`flame-worker --updates-in-memory-mb`): 1 GiB.
pub const DEFAULT_IN_MEMORY: u64 = 1 << 30;

/// The folder, in a worker's download folder, that an aggregator's updates
/// on disk go to (a folder of their own for each aggregation in it).
pub const FOLDER: &str = "aggregator-updates";

/// How the folders of updates on disk begin.
const PREFIX: &str = "updates-";

/// Updates written to disk: each a file of its values, little-endian f32,
/// tensor after tensor in the layout's order.
pub struct Spilled {
    dir: tempfile::TempDir,
    layout: Layout,
    /// Where each tensor starts in a file, in bytes.
    offsets: Vec<u64>,
    files: Vec<File>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

impl Spilled {
    /// No updates yet, in a new folder under `parent`, all of them of this layout.
    pub fn new(parent: &Path, layout: Layout) -> Result<Self, Error> {
        std::fs::create_dir_all(parent).map_err(io(format!("creating the folder for updates {}", parent.display())))?;
        let dir = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir_in(parent)
            .map_err(io(format!("creating a folder for updates in {}", parent.display())))?;
        let offsets = layout
            .iter()
            .scan(0u64, |at, (_, shape)| {
                let start = *at;
                *at += numel(shape) as u64 * 4;
                Some(start)
            })
            .collect();
        Ok(Self { dir, layout, offsets, files: Vec::new() })
    }

    /// The folder the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the next update; it must have the layout given.
    pub fn push(&mut self, update: &Weights) -> Result<(), Error> {
        if layout(update) != self.layout {
            return Err(Error::Mismatch(format!(
                "update {} has tensors {:?}, expected {:?}",
                self.files.len(),
                layout(update),
                self.layout
            )));
        }
        let path = self.dir.path().join(format!("{}.f32", self.files.len()));
        let what = || format!("writing update {} to {}", self.files.len(), path.display());
        let file = File::options().read(true).write(true).create_new(true).open(&path).map_err(io(what()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
        let mut bytes = Vec::with_capacity(1 << 16);
        for t in update.values() {
            for part in t.data.chunks(1 << 14) {
                bytes.clear();
                bytes.extend(part.iter().flat_map(|v| v.to_le_bytes()));
                out.write_all(&bytes).map_err(io(what()))?;
            }
        }
        out.flush().map_err(io(what()))?;
        drop(out);
        self.files.push(file);
        Ok(())
    }
}

impl Updates for Spilled {
    fn count(&self) -> usize {
        self.files.len()
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn read(&self, update: usize, tensor: usize, start: usize, out: &mut [f32]) -> Result<(), Error> {
        let (Some(file), Some(offset)) = (self.files.get(update), self.offsets.get(tensor)) else {
            return Err(Error::Mismatch(format!("no update {update} or tensor {tensor} on disk")));
        };
        let mut bytes = vec![0u8; out.len() * 4];
        file.read_exact_at(&mut bytes, offset + start as u64 * 4)
            .map_err(io(format!("reading update {update} back from {}", self.dir.path().display())))?;
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
}

/// Removes the folders of updates under `parent` that a process killed while
/// it aggregated left behind (best effort: what cannot be removed stays).
/// Give it the folder made for them alone ([`FOLDER`]): it removes every
/// folder in it whose name begins as theirs do.
pub fn clear_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(PREFIX) && entry.path().is_dir() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(folder = %entry.path().display(), "removed the updates a stopped aggregator left"),
                Err(e) => tracing::warn!(folder = %entry.path().display(), "could not remove the updates a stopped aggregator left: {e}"),
            }
        }
    }
}

/// The round's updates as an aggregator holds them for a rule that needs
/// every one at once.
pub enum Held {
    /// In memory.
    Memory(Vec<Weights>),
    /// On disk.
    Disk(Spilled),
}

impl Held {
    /// Where `count` updates of `model`'s layout will be held: in memory if
    /// their `model_bytes` each add up to at most `budget`, otherwise in a
    /// new folder under `dir`.
    pub fn new(model: &Weights, model_bytes: usize, count: usize, budget: u64, dir: &Path) -> Result<Self, Error> {
        match (model_bytes as u64).saturating_mul(count as u64) <= budget {
            true => Ok(Self::Memory(Vec::with_capacity(count))),
            false => Ok(Self::Disk(Spilled::new(dir, layout(model))?)),
        }
    }

    /// Holds the next update.
    pub fn push(&mut self, update: Weights) -> Result<(), Error> {
        match self {
            Self::Memory(v) => {
                v.push(update);
                Ok(())
            }
            Self::Disk(s) => s.push(&update),
        }
    }

    /// The folder they are in, if on disk.
    pub fn on_disk(&self) -> Option<PathBuf> {
        match self {
            Self::Memory(_) => None,
            Self::Disk(s) => Some(s.dir().to_path_buf()),
        }
    }

    /// Runs `f` over them, wherever they are.
    pub fn read<T>(&self, f: impl FnOnce(&dyn Updates) -> Result<T, Error>) -> Result<T, Error> {
        match self {
            Self::Memory(v) => f(&InMemory::new(v)?),
            Self::Disk(s) => f(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Tensor;

    fn model(seed: u32) -> Weights {
        let v = |n: usize, k: u32| (0..n).map(|i| ((i as u32 * 7919 + seed * 104_729 + k) % 1000) as f32 / 250.0 - 2.0).collect();
        Weights::from([
            ("a.bias".to_string(), Tensor { shape: vec![5], data: v(5, 1) }),
            ("a.weight".to_string(), Tensor { shape: vec![5, 40], data: v(200, 2) }),
            ("scale".to_string(), Tensor { shape: vec![], data: v(1, 3) }),
        ])
    }

    #[test]
    fn updates_on_disk_read_back_as_they_were_and_go_with_them() {
        let parent = tempfile::tempdir().expect("tempdir");
        let ups: Vec<Weights> = (0..9).map(model).collect();
        let mut disk = Held::new(&ups[0], 824, ups.len(), 823 * 9, parent.path()).expect("held");
        let mut memory = Held::new(&ups[0], 824, ups.len(), 824 * 9, parent.path()).expect("held");
        let folder = disk.on_disk().expect("over the budget: on disk");
        assert!(memory.on_disk().is_none(), "within the budget: in memory");
        for u in &ups {
            disk.push(u.clone()).expect("push");
            memory.push(u.clone()).expect("push");
        }
        assert_eq!(std::fs::read_dir(&folder).expect("folder").count(), 9);
        assert_eq!(std::fs::metadata(folder.join("4.f32")).expect("file").len(), 206 * 4);
        // Every block, of every tensor, of every update, as it was.
        for (u, w) in ups.iter().enumerate() {
            for (t, tensor) in w.values().enumerate() {
                for (start, len) in [(0, tensor.data.len()), (tensor.data.len() - 1, 1), (0, 0)] {
                    let mut out = vec![f32::NAN; len];
                    disk.read(|d| d.read(u, t, start, &mut out)).expect("read");
                    assert_eq!(out, tensor.data[start..start + len], "update {u}, tensor {t}, from {start}");
                }
            }
        }
        for rule in [
            flame_events::algorithm::ServerOptimizer::Median,
            flame_events::algorithm::ServerOptimizer::TrimmedMean { beta: 0.2 },
            flame_events::algorithm::ServerOptimizer::Krum { f: 2, m: 3 },
        ] {
            let from_disk = disk.read(|d| crate::aggregate::robust(&rule, d)).expect("from disk");
            let from_memory = memory.read(|m| crate::aggregate::robust(&rule, m)).expect("from memory");
            assert_eq!(from_disk, from_memory, "{}", rule.name());
        }
        let mut other = model(1);
        other.remove("scale");
        assert!(matches!(disk.push(other), Err(Error::Mismatch(_))), "another layout is refused");
        assert!(disk.read(|d| d.read(9, 0, 0, &mut [0.0])).is_err(), "no tenth update");
        drop(disk);
        assert!(!folder.exists(), "the files go with the updates");
        assert_eq!(std::fs::read_dir(parent.path()).expect("parent").count(), 0);
    }

    #[test]
    fn the_updates_a_killed_aggregator_left_are_cleared_and_nothing_else() {
        let parent = tempfile::tempdir().expect("tempdir");
        let mut held = Held::new(&model(0), 824, 1, 0, parent.path()).expect("held");
        held.push(model(0)).expect("push");
        let left = held.on_disk().expect("on disk");
        std::mem::forget(held);
        std::fs::write(parent.path().join("abc.part"), b"a download's part").expect("part");
        clear_stale(parent.path());
        assert!(!left.exists());
        assert!(parent.path().join("abc.part").exists(), "a download's part stays");
        clear_stale(&parent.path().join("none"));
    }

    #[test]
    fn a_folder_that_cannot_be_made_is_named() {
        let file = tempfile::NamedTempFile::new().expect("file");
        let err = Held::new(&model(0), 824, 2, 0, &file.path().join("sub")).err().expect("a file is not a folder");
        assert!(err.to_string().contains(&file.path().display().to_string()), "{err}");
    }
}
