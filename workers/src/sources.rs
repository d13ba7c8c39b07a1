//! Dataset files kept parsed in memory, one copy per process.
//!
//! A trainer reads its dataset for every command (its deployment, every
//! round's training and evaluation), and a process of virtual workers holds
//! thousands of trainers that each take their part of the same file. Parsed
//! once per process instead of once per trainer and command, a file of real
//! size no longer costs a fleet a parse per client per round.
//!
//! A source is kept while it fits the process's budget (the least recently
//! used goes first; one larger than the budget is not kept) and read again
//! when what it was read from changes: a file's length, modification or
//! change time or inode, or any of these for a file in an image folder.
//! The parse of what it held before is then let go at once, rather than
//! left to age out of the budget.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use crate::split::{Data, Split};

/// Bytes of parsed datasets a process keeps unless told otherwise
/// (`flame-worker --datasets-in-memory-mb`).
pub const DEFAULT_BUDGET: usize = 1 << 30;

/// Values kept under a byte budget, the least recently used let go first.
pub(crate) struct Kept<K, V> {
    budget: usize,
    used: usize,
    /// Least recently used first.
    entries: Vec<(K, Arc<V>, usize)>,
}

impl<K: PartialEq, V> Kept<K, V> {
    pub(crate) const fn new(budget: usize) -> Self {
        Self { budget, used: 0, entries: Vec::new() }
    }

    /// The value under `key`, now the most recently used.
    pub(crate) fn get(&mut self, key: &K) -> Option<Arc<V>> {
        let at = self.entries.iter().position(|(k, _, _)| k == key)?;
        let entry = self.entries.remove(at);
        let value = entry.1.clone();
        self.entries.push(entry);
        Some(value)
    }

    /// Keeps `value` (of `bytes`) under `key` if it fits the budget, letting the least recently used go to make room.
    pub(crate) fn put(&mut self, key: K, value: Arc<V>, bytes: usize) {
        if let Some(at) = self.entries.iter().position(|(k, _, _)| *k == key) {
            self.used -= self.entries.remove(at).2;
        }
        if bytes > self.budget {
            return;
        }
        self.entries.push((key, value, bytes));
        self.used += bytes;
        self.fit();
    }

    /// Lets go every value whose key `stale` picks.
    pub(crate) fn forget(&mut self, stale: impl Fn(&K) -> bool) {
        let mut used = 0;
        self.entries.retain(|(k, _, bytes)| {
            let keep = !stale(k);
            used += if keep { *bytes } else { 0 };
            keep
        });
        self.used = used;
    }

    /// A new budget; what no longer fits is let go.
    pub(crate) fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.fit();
    }

    fn fit(&mut self) {
        while self.used > self.budget && !self.entries.is_empty() {
            self.used -= self.entries.remove(0).2;
        }
    }

    /// Bytes held.
    pub(crate) fn used(&self) -> usize {
        self.used
    }
}

/// What a source was read as: its path, the options that shape how it is
/// parsed (not how it is dealt), and a stamp of the files it was read from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    path: String,
    options: String,
    stamp: u64,
}

impl Key {
    /// The key of `path` read with `options` from `files` (a file, or an image folder walked whole);
    /// none where one of them cannot be looked at (the read then says why).
    pub(crate) fn new(path: &str, options: &str, files: &[&Path]) -> Option<Self> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for f in files {
            stamp(f, &mut h).ok()?;
        }
        Some(Self { path: path.to_string(), options: options.to_string(), stamp: h.finish() })
    }
}

/// Hashes what changes when a file is written or replaced; a folder's files, in name order, whole.
fn stamp(path: &Path, h: &mut impl Hasher) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()).hash(h);
    if m.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            name.hash(h);
            stamp(&path.join(name), h)?;
        }
    }
    Ok(())
}

/// Bytes a dataset holds.
pub(crate) fn bytes(d: &Data) -> usize {
    let split = |s: &Split| s.x.len() * 4 + s.y.len() * 8 + s.targets.len() * 4;
    split(&d.train) + split(&d.test)
}

static KEPT: Mutex<Kept<Key, Data>> = Mutex::new(Kept::new(DEFAULT_BUDGET));
/// The sources being read now: a second reader of one waits for the first instead of reading it too.
static READING: LazyLock<Mutex<HashMap<Key, Weak<Mutex<()>>>>> = LazyLock::new(Mutex::default);

/// Sets how many bytes of parsed datasets this process keeps (0: none).
pub fn keep_in_memory(bytes: usize) {
    KEPT.lock().unwrap_or_else(PoisonError::into_inner).set_budget(bytes);
}

/// Bytes of parsed datasets this process holds now.
pub fn held() -> usize {
    KEPT.lock().unwrap_or_else(PoisonError::into_inner).used()
}

/// The source under `key`, read by `read` only if it is not kept (or being read by another caller, whose result it takes).
pub(crate) fn get_or_read<E>(key: Key, read: impl FnOnce() -> Result<Data, E>) -> Result<Arc<Data>, E> {
    let kept = |key: &Key| KEPT.lock().unwrap_or_else(PoisonError::into_inner).get(key);
    if let Some(d) = kept(&key) {
        return Ok(d);
    }
    let lock = {
        let mut reading = READING.lock().unwrap_or_else(PoisonError::into_inner);
        reading.retain(|_, w| w.strong_count() > 0);
        match reading.get(&key).and_then(Weak::upgrade) {
            Some(lock) => lock,
            None => {
                let lock = Arc::new(Mutex::new(()));
                reading.insert(key.clone(), Arc::downgrade(&lock));
                lock
            }
        }
    };
    let _reading = lock.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(d) = kept(&key) {
        return Ok(d);
    }
    let d = Arc::new(read()?);
    let mut kept = KEPT.lock().unwrap_or_else(PoisonError::into_inner);
    // What the file held before it was written again is no one's any more: its key's stamp is gone.
    kept.forget(|k| k.path == key.path && k.options == key.options);
    kept.put(key, d.clone(), bytes(&d));
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_goes_first_and_what_exceeds_the_budget_is_not_kept() {
        let mut k: Kept<&str, u32> = Kept::new(10);
        k.put("a", Arc::new(1), 4);
        k.put("b", Arc::new(2), 4);
        assert_eq!(k.get(&"a").as_deref(), Some(&1), "a is now the most recently used");
        k.put("c", Arc::new(3), 4);
        assert_eq!(k.get(&"b"), None, "b was the least recently used");
        assert_eq!((k.get(&"a").as_deref(), k.get(&"c").as_deref()), (Some(&1), Some(&3)));
        assert_eq!(k.used(), 8);
        k.put("big", Arc::new(4), 11);
        assert_eq!((k.get(&"big"), k.used()), (None, 8), "larger than the budget: not kept, nothing let go");
        k.put("a", Arc::new(5), 6);
        assert_eq!((k.get(&"a").as_deref(), k.get(&"c").as_deref(), k.used()), (Some(&5), Some(&3), 10), "a replaced in place");
        k.set_budget(7);
        assert_eq!((k.get(&"a"), k.get(&"c").as_deref(), k.used()), (None, Some(&3), 4), "a lower budget lets the oldest go");
        k.set_budget(0);
        assert_eq!((k.get(&"c"), k.used()), (None, 0));

        let mut k: Kept<(&str, u32), u32> = Kept::new(100);
        k.put(("a", 1), Arc::new(1), 10);
        k.put(("b", 1), Arc::new(2), 20);
        k.put(("a", 2), Arc::new(3), 30);
        k.forget(|key| key.0 == "a" && key.1 != 2);
        assert_eq!((k.get(&("a", 1)), k.get(&("a", 2)).as_deref(), k.get(&("b", 1)).as_deref()), (None, Some(&3), Some(&2)));
        assert_eq!(k.used(), 50, "what was let go no longer counts");
    }

    #[test]
    fn a_key_changes_when_its_file_or_a_file_in_its_folder_is_written_or_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.csv");
        std::fs::write(&file, "1,0\n").expect("write");
        let key = || Key::new("a.csv", "", &[&file]).expect("stamped");
        let first = key();
        assert_eq!(key(), first, "unchanged: the same key");
        assert_ne!(Key::new("a.csv", "label=y", &[&file]), Some(first.clone()), "other options: another key");
        std::fs::write(&file, "2,0\n").expect("rewrite, same length");
        let second = key();
        assert_ne!(second, first, "written again");
        let other = dir.path().join("b.csv");
        std::fs::write(&other, "2,0\n").expect("write");
        std::fs::rename(&other, &file).expect("replace");
        assert_ne!(key(), second, "replaced by a rename");
        assert_eq!(Key::new("gone.csv", "", &[&dir.path().join("gone.csv")]), None, "a missing file has no key");

        let folder = dir.path().join("images");
        std::fs::create_dir_all(folder.join("cat")).expect("mkdir");
        std::fs::write(folder.join("cat/1.png"), "x").expect("write");
        let folder_key = || Key::new("images", "", &[&folder]).expect("stamped");
        let before = folder_key();
        std::fs::write(folder.join("cat/1.png"), "y").expect("rewrite an image");
        assert_ne!(folder_key(), before, "an image written again changes the folder's key");
    }

    #[test]
    fn a_source_is_read_once_while_kept_and_by_one_of_many_readers_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("once.csv");
        std::fs::write(&file, "1,0\n").expect("write");
        let key = Key::new(&file.to_string_lossy(), "", &[&file]).expect("stamped");
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let data = || Data { train: Split::classes(vec![1.0; 256], vec![0; 256], 1), test: Split::classes(vec![], vec![], 1), classes: 1 };
        let got: Vec<Arc<Data>> = std::thread::scope(|s| {
            let readers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        get_or_read::<()>(key.clone(), || {
                            reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(data())
                        })
                        .expect("read")
                    })
                })
                .collect();
            readers.into_iter().map(|r| r.join().expect("reader")).collect()
        });
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1, "eight readers at once, one read");
        assert!(got.iter().all(|d| Arc::ptr_eq(d, &got[0])), "all share the one copy");
        let again = get_or_read::<()>(key.clone(), || panic!("kept: not read again")).expect("kept");
        assert!(Arc::ptr_eq(&again, &got[0]));
        // Written again: the new contents are read, and the old parse is let go (its stamp is gone).
        std::fs::write(&file, "2,0\n").expect("rewrite");
        let new_key = Key::new(&file.to_string_lossy(), "", &[&file]).expect("stamped");
        assert_ne!(new_key, key);
        let fresh = get_or_read::<()>(new_key, || Ok(data())).expect("read");
        assert!(!Arc::ptr_eq(&fresh, &got[0]));
        let mut read_old = false;
        let _ = get_or_read::<()>(key.clone(), || {
            read_old = true;
            Ok(data())
        });
        assert!(read_old, "the parse of what the file held before was let go");
        // A read that fails is not kept: the next caller reads.
        let failing = Key::new(&file.to_string_lossy(), "fails", &[&file]).expect("stamped");
        assert_eq!(get_or_read(failing.clone(), || Err("bad")).err(), Some("bad"));
        assert_eq!(get_or_read::<()>(failing, || Ok(data())).map(|d| d.train.len()), Ok(256));
    }
}
