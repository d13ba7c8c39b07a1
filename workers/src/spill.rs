//! Where an aggregator holds the updates of a rule that needs every one at
//! once (median, trimmed mean, Krum: [`crate::aggregate::Needs::Blocks`]):
//! in memory while all of them fit a budget, otherwise in files on disk, one
//! per update, which the rule reads back a block at a time: the file the
//! blob store handed over (checked), or one written here from decoded
//! values. The files are removed when the updates are dropped (a store's
//! own file stays: it is the store's).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::blob::BlobFile;
use crate::robust::{InMemory, Layout, Updates, layout, numel};
use crate::weights::{Error, PackedFile, Weights, read_f32s_at};

/// How many bytes of updates an aggregator holds in memory unless told
/// otherwise (`flame-worker --updates-in-memory-mb`): 1 GiB.
pub const DEFAULT_IN_MEMORY: u64 = 1 << 30;

/// The folder, in a worker's download folder, that an aggregator's updates
/// on disk go to (a folder of their own for each aggregation in it).
pub const FOLDER: &str = "aggregator-updates";

/// How the folders of updates on disk begin.
const PREFIX: &str = "updates-";

/// Updates on disk.
pub struct Spilled {
    dir: tempfile::TempDir,
    layout: Layout,
    /// Where each tensor starts in a file written here, in bytes.
    offsets: Vec<u64>,
    files: Vec<OnDisk>,
}

/// One update on disk.
enum OnDisk {
    /// A file of its values written here: little-endian f32, tensor after tensor in the layout's order.
    Written(File),
    /// The safetensors file the blob store handed over, read where it is.
    Stored { packed: PackedFile, _file: BlobFile },
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
        self.files.push(OnDisk::Written(file));
        Ok(())
    }

    /// Holds the next update in the file the store handed over (`packed`, read from `file`);
    /// it must have the layout given.
    pub fn push_file(&mut self, packed: PackedFile, file: BlobFile) -> Result<(), Error> {
        let theirs: Layout = packed.layout().map(|(name, shape)| (name.clone(), shape.clone())).collect();
        if theirs != self.layout {
            return Err(Error::Mismatch(format!("update {} has tensors {theirs:?}, expected {:?}", self.files.len(), self.layout)));
        }
        self.files.push(OnDisk::Stored { packed, _file: file });
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
        let (Some(held), Some(offset), Some((name, _))) = (self.files.get(update), self.offsets.get(tensor), self.layout.get(tensor))
        else {
            return Err(Error::Mismatch(format!("no update {update} or tensor {tensor} on disk")));
        };
        match held {
            OnDisk::Written(file) => read_f32s_at(file, offset + start as u64 * 4, out)
                .map_err(io(format!("reading update {update} back from {}", self.dir.path().display()))),
            OnDisk::Stored { packed, .. } => packed.read_values(name, start, out),
        }
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

    /// Holds the next update, handed over by the store in a file: read where it is when on
    /// disk, decoded when in memory.
    pub fn push_file(&mut self, packed: PackedFile, file: BlobFile) -> Result<(), Error> {
        match self {
            Self::Memory(v) => {
                v.push(packed.params()?);
                Ok(())
            }
            Self::Disk(s) => s.push_file(packed, file),
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

    #[tokio::test]
    async fn updates_in_the_stores_files_are_read_where_they_are_as_the_rules_read_decoded_ones() {
        use crate::blob::BlobStore;
        let parent = tempfile::tempdir().expect("tempdir");
        let store = crate::blob::LocalBlobs::new(parent.path().join("blobs")).expect("blobs");
        let ups: Vec<Weights> = (0..7).map(model).collect();
        let mut stored = Held::new(&ups[0], 824, ups.len(), 0, parent.path()).expect("held");
        let mut written = Held::new(&ups[0], 824, ups.len(), 0, parent.path()).expect("held");
        let mut memory = Held::new(&ups[0], 824, ups.len(), 824 * 7, parent.path()).expect("held");
        for u in &ups {
            let d = store.put(crate::weights::encode(u).expect("encoded")).await.expect("stored");
            let file = store.get_file(&d, parent.path()).await.expect("the store's file");
            let packed = PackedFile::open(file.path()).expect("checked");
            let in_memory = PackedFile::open(file.path()).expect("checked");
            stored.push_file(packed, file).expect("held where it is");
            memory.push_file(in_memory, store.get_file(&d, parent.path()).await.expect("file")).expect("decoded");
            written.push(u.clone()).expect("written");
        }
        let folder = stored.on_disk().expect("on disk");
        assert_eq!(std::fs::read_dir(&folder).expect("folder").count(), 0, "nothing written: the store's files are read");
        for (u, w) in ups.iter().enumerate() {
            for (t, tensor) in w.values().enumerate() {
                let mut out = vec![f32::NAN; tensor.data.len() - 1];
                stored.read(|d| d.read(u, t, 1, &mut out)).expect("read");
                assert_eq!(out, tensor.data[1..], "update {u}, tensor {t}");
            }
        }
        assert!(stored.read(|d| d.read(0, 1, 200, &mut [0.0])).is_err(), "past a tensor's end");
        for rule in [flame_events::algorithm::ServerOptimizer::Median, flame_events::algorithm::ServerOptimizer::Krum { f: 2, m: 3 }] {
            let from_files = stored.read(|d| crate::aggregate::robust(&rule, d)).expect("from the store's files");
            assert_eq!(from_files, written.read(|d| crate::aggregate::robust(&rule, d)).expect("written"), "{}", rule.name());
            assert_eq!(from_files, memory.read(|m| crate::aggregate::robust(&rule, m)).expect("memory"), "{}", rule.name());
        }
        let mut other = model(1);
        other.remove("scale");
        let d = store.put(crate::weights::encode(&other).expect("encoded")).await.expect("stored");
        let file = store.get_file(&d, parent.path()).await.expect("file");
        let packed = PackedFile::open(file.path()).expect("checked");
        assert!(matches!(stored.push_file(packed, file), Err(Error::Mismatch(_))), "another layout is refused");
        drop(stored);
        assert!(!folder.exists());
        assert_eq!(std::fs::read_dir(parent.path().join("blobs")).expect("blobs").count(), 8, "the store's own files stay");
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
