//! Content-addressed model blobs: a local folder (embedded mode) or the
//! JetStream object store (distributed). Reads verify the digest.

use std::path::{Path, PathBuf};

use async_nats::jetstream::{self, object_store};
use async_trait::async_trait;
use tokio::io::AsyncReadExt;

/// The sha256 of bytes, as lower-case hex (a blob's address).
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The object store bucket holding model blobs.
pub const BUCKET: &str = "flame-models";

/// Blob store errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No blob has that digest.
    #[error("blob {0} not found")]
    NotFound(String),
    /// The bytes do not hash to their name.
    #[error("blob {expected} is corrupt: its bytes hash to {actual}")]
    Corrupt {
        /// The digest asked for.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// The name is not a sha256 hex digest.
    #[error("'{0}' is not a sha256 digest (64 lower-case hex characters)")]
    BadDigest(String),
    /// Storage failed.
    #[error("blob store: {0}")]
    Io(String),
}

fn check_digest(d: &str) -> Result<(), Error> {
    if d.len() == 64 && d.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
        Ok(())
    } else {
        Err(Error::BadDigest(d.to_string()))
    }
}

fn verified(expected: &str, bytes: Vec<u8>) -> Result<Vec<u8>, Error> {
    arrived(expected, digest(&bytes), bytes)
}

/// `bytes`, where they hash to `expected` (`actual`, taken as they arrived).
fn arrived(expected: &str, actual: String, bytes: Vec<u8>) -> Result<Vec<u8>, Error> {
    if actual == expected { Ok(bytes) } else { Err(Error::Corrupt { expected: expected.to_string(), actual }) }
}

/// Where model blobs live.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores bytes; returns their sha256 digest.
    async fn put(&self, bytes: Vec<u8>) -> Result<String, Error>;
    /// Fetches the bytes with this digest, verified.
    async fn get(&self, digest: &str) -> Result<Vec<u8>, Error>;
    /// The blob with this digest, verified, in a file, for a reader that
    /// takes it a part at a time without holding it in memory. A file made
    /// for the reader (under `dir` or the store's own download folder) is
    /// removed when the answer is dropped. This default reads the blob into
    /// memory and writes it out; the stores that can, write it as it comes.
    async fn get_file(&self, digest: &str, dir: &Path) -> Result<BlobFile, Error> {
        written(digest, self.get(digest).await?, dir).await
    }
}

/// A blob's bytes, read whole, in a file of its own under `dir`.
async fn written(digest: &str, bytes: Vec<u8>, dir: &Path) -> Result<BlobFile, Error> {
    let path = dir.join(format!(".{digest}.{}", unique()));
    let len = bytes.len() as u64;
    let (folder, file) = (dir.to_path_buf(), path.clone());
    write_moved(move || std::fs::create_dir_all(&folder).and_then(|()| std::fs::write(&file, bytes)))
        .await
        .map_err(|e| Error::Io(format!("cannot write blob {digest} to {}: {e}", path.display())))?;
    Ok(BlobFile { len, path, owned: true })
}

/// Runs a write that owns its bytes on a blocking thread: `tokio::fs::write`
/// would copy them first (a large model held twice).
async fn write_moved(write: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> std::io::Result<()> {
    tokio::task::spawn_blocking(write).await.map_err(std::io::Error::other)?
}

/// A verified blob in a file ([`BlobStore::get_file`]).
#[derive(Debug)]
pub struct BlobFile {
    path: PathBuf,
    len: u64,
    /// Made for this reader (removed on drop), or the store's own file.
    owned: bool,
}

impl BlobFile {
    /// Where the bytes are.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many bytes the blob has.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the blob has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for BlobFile {
    fn drop(&mut self) {
        if self.owned
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A name no other file of this process takes.
fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// `hasher` fed everything `from` reads (a block at a time), and the number of bytes.
fn hash_all(mut from: impl std::io::Read, mut hasher: sha2::Sha256) -> std::io::Result<(sha2::Sha256, u64)> {
    use sha2::Digest;
    let mut block = vec![0u8; 1 << 20];
    let mut len = 0;
    loop {
        let n = from.read(&mut block)?;
        if n == 0 {
            return Ok((hasher, len));
        }
        hasher.update(&block[..n]);
        len += n as u64;
    }
}

/// The sha256 of a file's bytes and their number.
fn digest_of_file(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::Digest;
    let (hasher, len) = hash_all(std::fs::File::open(path)?, sha2::Sha256::new())?;
    Ok((hex::encode(hasher.finalize()), len))
}

/// A hasher fed the first `len` bytes of the file at `path` (an error where it holds fewer).
fn hash_of_prefix(path: &Path, len: u64) -> std::io::Result<sha2::Sha256> {
    use sha2::Digest;
    use std::io::Read;
    match hash_all(std::fs::File::open(path)?.take(len), sha2::Sha256::new())? {
        (hasher, read) if read == len => Ok(hasher),
        (_, read) => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("{read} of {len} bytes"))),
    }
}

/// Checks that the file at `path` holds the blob `expected`.
async fn verified_file(expected: &str, path: PathBuf) -> Result<(PathBuf, u64), Error> {
    let read = path.clone();
    let (actual, len) = tokio::task::spawn_blocking(move || digest_of_file(&read))
        .await
        .map_err(|e| Error::Io(format!("checking blob {expected}: {e}")))?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(expected.to_string()),
            _ => Error::Io(format!("checking blob {expected} in {}: {e}", path.display())),
        })?;
    if actual != expected {
        return Err(Error::Corrupt { expected: expected.to_string(), actual });
    }
    Ok((path, len))
}

/// Blobs as files named by digest in one folder.
#[derive(Clone, Debug)]
pub struct LocalBlobs {
    dir: PathBuf,
}

impl LocalBlobs {
    /// Uses (and creates) `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Self { dir })
    }
}

#[async_trait]
impl BlobStore for LocalBlobs {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, Error> {
        let d = digest(&bytes);
        let path = self.dir.join(&d);
        if !path.exists() {
            // Write then rename, so a reader never sees half a blob.
            let tmp = self.dir.join(format!(".{d}.{}", unique()));
            write_moved(move || std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)))
                .await
                .map_err(|e| Error::Io(e.to_string()))?;
        }
        Ok(d)
    }

    async fn get(&self, digest: &str) -> Result<Vec<u8>, Error> {
        check_digest(digest)?;
        let bytes = tokio::fs::read(self.dir.join(digest)).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(digest.to_string()),
            _ => Error::Io(e.to_string()),
        })?;
        verified(digest, bytes)
    }

    /// The store's own file, checked as it is read (blobs are written whole, then renamed into place).
    async fn get_file(&self, digest: &str, _dir: &Path) -> Result<BlobFile, Error> {
        check_digest(digest)?;
        let (path, len) = verified_file(digest, self.dir.join(digest)).await?;
        Ok(BlobFile { path, len, owned: false })
    }
}

/// Blobs in the JetStream object store (chunked, so any size works).
#[derive(Clone)]
pub struct NatsBlobs {
    store: object_store::ObjectStore,
    /// The bucket's stream, for reading small blobs chunk by chunk.
    stream: jetstream::stream::Stream<()>,
    /// Whether direct reads work here (an identity made before they were
    /// allowed may not have them): cleared at the first refusal.
    direct: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// For the ordered consumers' delivery subjects (under this connection's inbox prefix).
    client: async_nats::Client,
    /// For publishing chunks many at a time.
    js: jetstream::Context,
    /// Where large blobs are downloaded so that a read cut short goes on
    /// from where it stopped (none: they are read into memory, and a read
    /// cut short starts again).
    downloads: Option<std::sync::Arc<crate::download::Downloads>>,
}

/// Blobs of at most this many chunks (128 KiB each) are read with one direct
/// get per chunk; larger ones through an ordered consumer, which streams
/// faster but costs the server a consumer for the read.
pub const DIRECT_CHUNKS: usize = 16;

/// The size of the chunks this process writes (the object store's own).
pub const PUT_CHUNK: usize = 128 << 10;

/// Chunks of one blob published before the first of them is acknowledged.
pub const PUT_IN_FLIGHT: usize = 64;

/// How long a direct read may take before this process reads through consumers instead.
const DIRECT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl NatsBlobs {
    /// Opens (creating if needed) the `flame-models` bucket: a worker's way in.
    pub async fn new(js: &jetstream::Context) -> Result<Self, Error> {
        Self::open(js, 1, false).await
    }

    /// Opens the bucket, creating it with `replicas` if needed, and lets its
    /// stream hold as many readers at once as the command stream (the
    /// server's default is 1,000: thousands of trainers reading at once
    /// would be refused): the engine's way in.
    pub async fn with_replicas(js: &jetstream::Context, replicas: usize) -> Result<Self, Error> {
        Self::open(js, replicas, true).await
    }

    async fn open(js: &jetstream::Context, replicas: usize, engine: bool) -> Result<Self, Error> {
        let store = match js.get_object_store(BUCKET).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(object_store::Config { bucket: BUCKET.to_string(), num_replicas: replicas, ..Default::default() })
                .await
                .map_err(|e| Error::Io(format!("cannot create object store bucket {BUCKET}: {e}")))?,
        };
        let name = format!("OBJ_{BUCKET}");
        if engine {
            match js.get_stream(&name).await {
                Ok(stream) if stream.cached_info().config.max_consumers != crate::MAX_CONSUMERS => {
                    let config = jetstream::stream::Config { max_consumers: crate::MAX_CONSUMERS, ..stream.cached_info().config.clone() };
                    if let Err(e) = js.update_stream(config).await {
                        tracing::warn!("cannot raise the consumer limit of {name} (many readers at once may be refused): {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot read the settings of {name}: {e}"),
            }
        }
        let stream = js.get_stream_no_info(&name).await.map_err(|e| Error::Io(format!("stream {name}: {e}")))?;
        let direct = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        Ok(Self { store, stream, direct, client: js.client(), js: js.clone(), downloads: None })
    }

    /// Downloads blobs of more than [`DIRECT_CHUNKS`] chunks into `dir`
    /// (see [`crate::download`]): a read cut short, in this process or in a
    /// later one with the same folder, goes on from its last checkpoint
    /// instead of the blob's first byte. `observer` is told of each chunk.
    pub fn resuming_in(mut self, dir: impl Into<PathBuf>, observer: Option<crate::download::Observer>) -> Result<Self, Error> {
        self.downloads = Some(std::sync::Arc::new(crate::download::Downloads::new(dir, observer)?));
        Ok(self)
    }
}

/// How long a blob read or write that fails for want of the server (a NATS
/// server restarting, a leaf node's link cut, a stream electing its leader)
/// is tried again before it counts as failed.
pub const BLOB_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a blob read may go without a byte before it counts as failed (and is tried again).
pub const BLOB_STALL: std::time::Duration = std::time::Duration::from_secs(15);

/// Why a direct read gave no blob.
enum Direct {
    /// Direct reads do not work here (not allowed, not answered).
    Unavailable(String),
    /// The blob could not be read (missing, storage away).
    Failed(Error),
}

/// Whether an error may pass (storage away for a while), unlike a missing or corrupt blob.
fn is_io(e: &Error) -> bool {
    matches!(e, Error::Io(_))
}

impl NatsBlobs {
    /// One read, checked: chunk by chunk with direct gets where the blob is
    /// small, into the download folder where it is large and there is one,
    /// else through an ordered consumer.
    async fn fetch(&self, digest: &str) -> Result<Vec<u8>, Error> {
        use std::sync::atomic::Ordering;
        let info = self.info(digest).await?;
        if info.chunks > DIRECT_CHUNKS {
            return match &self.downloads {
                Some(downloads) => match self.download(downloads, digest, &info, true).await? {
                    Fetched::Bytes(bytes) => Ok(bytes),
                    Fetched::File(file) => Err(Error::Io(format!("blob {digest}: read to {}, not into memory", file.path().display()))),
                },
                None => {
                    let (bytes, actual) = self.download_from(None, digest, &info, crate::download::Start::Fresh, true).await?;
                    arrived(digest, actual, bytes)
                }
            };
        }
        if self.direct.load(Ordering::Relaxed) {
            match self.fetch_direct(digest, &info).await {
                Ok(bytes) => return verified(digest, bytes),
                Err(Direct::Unavailable(why)) => {
                    if self.direct.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            "reading blobs through consumers from now on: a direct read failed ({why}); with per-worker NATS identities, `flame-engine worker add` again allows direct reads ($JS.API.DIRECT.GET.OBJ_{BUCKET})"
                        );
                    }
                }
                Err(Direct::Failed(e)) => return Err(e),
            }
        }
        self.fetch_streamed(digest).await
    }

    /// A blob's description in the bucket (not a deleted one).
    async fn info(&self, digest: &str) -> Result<object_store::ObjectInfo, Error> {
        let info = self.store.info(digest).await.map_err(|e| match e.kind() {
            object_store::InfoErrorKind::NotFound => Error::NotFound(digest.to_string()),
            _ => Error::Io(e.to_string()),
        })?;
        if info.deleted {
            return Err(Error::NotFound(digest.to_string()));
        }
        Ok(info)
    }

    /// A small blob's chunks by direct gets, one request each and no consumer.
    async fn fetch_direct(&self, digest: &str, info: &object_store::ObjectInfo) -> Result<Vec<u8>, Direct> {
        let subject = format!("$O.{BUCKET}.C.{}", info.nuid);
        // The description's size is what its writer said: room for at most 1 GiB up front.
        let mut bytes = Vec::with_capacity(info.size.min(1 << 30));
        let mut next = None;
        for chunk in 0..info.chunks {
            let got = tokio::time::timeout(DIRECT_WAIT, self.stream.direct_get_next_for_subject(subject.clone(), next)).await;
            let message = match got {
                Err(_) => return Err(Direct::Unavailable(format!("no answer in {} s", DIRECT_WAIT.as_secs()))),
                Ok(Err(e)) => {
                    use jetstream::stream::DirectGetErrorKind as K;
                    return Err(match e.kind() {
                        K::TimedOut => Direct::Unavailable(e.to_string()),
                        K::NotFound => Direct::Failed(Error::Io(format!(
                            "blob {digest}: chunk {} of {} is missing (the object store may have lost it)",
                            chunk + 1,
                            info.chunks
                        ))),
                        _ => Direct::Failed(Error::Io(e.to_string())),
                    });
                }
                Ok(Ok(m)) => m,
            };
            bytes.extend_from_slice(&message.payload);
            next = Some(message.sequence + 1);
        }
        Ok(bytes)
    }

    /// A blob through an ordered consumer, with a bound on silence.
    async fn fetch_streamed(&self, digest: &str) -> Result<Vec<u8>, Error> {
        let mut object = self.store.get(digest).await.map_err(|e| match e.kind() {
            object_store::GetErrorKind::NotFound => Error::NotFound(digest.to_string()),
            _ => Error::Io(e.to_string()),
        })?;
        // Read with a bound on silence: a chunk the server lost (a stream cut short by a
        // crash) would otherwise leave the read waiting for it forever.
        let mut bytes = Vec::with_capacity(object.info().size.min(1 << 30));
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            match tokio::time::timeout(BLOB_STALL, object.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return Err(Error::Io(e.to_string())),
                Err(_) => {
                    return Err(Error::Io(format!(
                        "blob {digest}: nothing arrived for {} s after {} of {} bytes (the object store may have lost a chunk)",
                        BLOB_STALL.as_secs(),
                        bytes.len(),
                        object.info().size
                    )));
                }
            }
        }
        verified(digest, bytes)
    }

    /// A large blob into the download folder, going on from a part left by
    /// an earlier read, and checked: its bytes in memory as well (`keep`),
    /// or only the file. A part that does not hash right is thrown away and
    /// the blob read once more from the start.
    async fn download(
        &self,
        downloads: &crate::download::Downloads,
        digest: &str,
        info: &object_store::ObjectInfo,
        keep: bool,
    ) -> Result<Fetched, Error> {
        use crate::download::{Start, start};
        // Held until this read and its writer are done (a read dropped mid-way
        // leaves its writer to finish what it was given).
        let only_one = std::sync::Arc::new(downloads.lock(digest).lock_owned().await);
        let part = downloads.part(digest);
        let part_len = tokio::fs::metadata(&part).await.ok().map(|m| m.len());
        let from = start(downloads.mark(digest), part_len, &info.nuid, info.size as u64, info.chunks);
        let resumed = matches!(from, Start::Resume(_));
        if let Start::Resume(m) = &from {
            tracing::info!("blob {digest}: going on from byte {} of {} (a part from an earlier read)", m.bytes, info.size);
        }
        // Checked by the hash of what arrived (and, going on from a part, of the part's first
        // bytes): the file is not read again.
        let check = |(bytes, actual): (Vec<u8>, String)| async {
            let bytes = arrived(digest, actual, bytes)?;
            if keep {
                return Ok(Fetched::Bytes(bytes));
            }
            let len = tokio::fs::metadata(&part).await.map_err(|e| crate::download::io(&part, e))?.len();
            // The part becomes the reader's file, under a name no later download of the blob takes.
            let taken = part.with_extension(format!("{}.blob", unique()));
            tokio::fs::rename(&part, &taken).await.map_err(|e| crate::download::io(&taken, e))?;
            Ok(Fetched::File(BlobFile { path: taken, len, owned: true }))
        };
        let read = self.download_from(Some((downloads, only_one.clone())), digest, info, from, keep).await?;
        let checked = check(read).await;
        downloads.forget(digest).await;
        match checked {
            Err(e) if resumed => {
                tracing::warn!("blob {digest}: the part from an earlier read was not good ({e}); reading it again from the start");
                let read = self.download_from(Some((downloads, only_one.clone())), digest, info, Start::Fresh, keep).await?;
                let checked = check(read).await;
                downloads.forget(digest).await;
                checked
            }
            checked => checked,
        }
    }

    /// The blob in a file under `dir`, written there as it arrives without
    /// its bytes held in memory (a read cut short goes on from its part there).
    async fn fetch_file(&self, digest: &str, dir: &Path) -> Result<BlobFile, Error> {
        let info = self.info(digest).await?;
        if info.chunks <= DIRECT_CHUNKS {
            // Small: read as any read is, then written out.
            return written(digest, self.fetch(digest).await?, dir).await;
        }
        // Told of as this store's own downloads are.
        let downloads = crate::download::Downloads::new(dir, self.downloads.as_ref().and_then(|d| d.observer()))?;
        match self.download(&downloads, digest, &info, false).await? {
            Fetched::File(file) => Ok(file),
            Fetched::Bytes(_) => Err(Error::Io(format!("blob {digest}: read into memory, not to a file"))),
        }
    }

    /// The blob's bytes, read from its chunks through an ordered consumer:
    /// with a download folder, the part's first bytes where it goes on from a
    /// mark, then the chunks from there on, each [`crate::download::CHECKPOINT`]
    /// chunks written to the part and recorded in its mark; without one, all
    /// its chunks into memory. Without `keep`, the bytes go only to the part
    /// (none are returned), and a part that cannot be written fails the read.
    /// With the bytes, the sha256 of all of them (the part's first bytes
    /// too), hashed as they arrive.
    async fn download_from(
        &self,
        disk: Option<(&crate::download::Downloads, std::sync::Arc<tokio::sync::OwnedMutexGuard<()>>)>,
        digest: &str,
        info: &object_store::ObjectInfo,
        from: crate::download::Start,
        keep: bool,
    ) -> Result<(Vec<u8>, String), Error> {
        use crate::download::{CHECKPOINT, Mark, Progress, Start, io};
        use async_nats::jetstream::consumer::{DeliverPolicy, push};
        use futures::StreamExt;
        use sha2::Digest;
        use tokio::io::AsyncReadExt;
        let size = info.size as u64;
        // The description's size is what its writer said: room for at most 1 GiB up front.
        let mut bytes = if keep { Vec::with_capacity(info.size.min(1 << 30)) } else { Vec::new() };
        let fresh = Mark { nuid: info.nuid.clone(), bytes: 0, chunks: 0, next_seq: 0 };
        let mut mark = fresh.clone();
        let mut hasher = sha2::Sha256::new();
        let mut to_disk = None;
        let mut writer = None;
        // Set once every byte is in memory: what the writer has not written yet is not needed
        // (the part is only for going on after a cut, and is removed once the bytes are checked).
        let in_memory = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let downloads = disk.as_ref().map(|(d, _)| *d);
        if let Some((downloads, only_one)) = disk {
            let part = downloads.part(digest);
            if let Start::Resume(m) = &from
                && !keep
            {
                // The part's first bytes stay where they are (`start` saw the part hold them); only their hash is taken.
                let (path, len) = (part.clone(), m.bytes);
                if let Ok(Ok(prefix)) = tokio::task::spawn_blocking(move || hash_of_prefix(&path, len)).await {
                    (mark, hasher) = (m.clone(), prefix);
                }
            } else if let Start::Resume(m) = from {
                let prefix = async {
                    let file = tokio::fs::File::open(&part).await?;
                    file.take(m.bytes).read_to_end(&mut bytes).await
                };
                match prefix.await {
                    Ok(_) if bytes.len() as u64 == m.bytes => {
                        hasher.update(&bytes);
                        mark = m;
                    }
                    _ => bytes.clear(),
                }
            }
            let opened = (|| {
                let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(&part)?;
                // Chunks written after the last record are written again.
                file.set_len(mark.bytes)?;
                std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(mark.bytes))?;
                Ok::<_, std::io::Error>(file)
            })();
            match opened {
                Err(e) if !keep => return Err(io(&part, e)),
                Err(e) => {
                    // A folder that cannot be written does not stop a round: the read goes on in memory.
                    tracing::warn!("blob {digest}: cannot keep the download in {} ({e}); reading it into memory only", part.display());
                }
                Ok(mut file) => {
                    // The disk is written by a thread of its own, so that the chunks keep coming
                    // while it writes: each checkpoint's chunks, then the mark that counts them.
                    // At most 16 checkpoints wait for the disk (the reader waits beyond).
                    let (tx, mut checkpoints) = tokio::sync::mpsc::channel::<(Vec<bytes::Bytes>, Mark)>(16);
                    let mark_path = downloads.mark_path(digest);
                    to_disk = Some(tx);
                    let in_memory = in_memory.clone();
                    writer = Some(tokio::task::spawn_blocking(move || {
                        use std::io::Write;
                        let _only_one = only_one;
                        while let Some((segment, mark)) = checkpoints.blocking_recv() {
                            if in_memory.load(std::sync::atomic::Ordering::Relaxed) {
                                break;
                            }
                            for chunk in segment {
                                file.write_all(&chunk).map_err(|e| io(&part, e))?;
                            }
                            crate::download::record(&mark_path, &mark)?;
                        }
                        Ok::<(), Error>(())
                    }));
                }
            }
        }
        let resumed_from = mark.bytes;
        // Set when the chunks are not this object's (more bytes than it holds).
        let mut foreign = false;
        let read = async {
            if mark.chunks == info.chunks {
                return Ok(());
            }
            let deliver_policy = match mark.next_seq {
                0 => DeliverPolicy::All,
                seq => DeliverPolicy::ByStartSequence { start_sequence: seq },
            };
            let consumer = self
                .stream
                .create_consumer(push::OrderedConfig {
                    deliver_subject: self.client.new_inbox(),
                    filter_subject: format!("$O.{BUCKET}.C.{}", info.nuid),
                    deliver_policy,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::Io(format!("blob {digest}: cannot start reading its chunks: {e}")))?;
            let mut chunks = consumer.messages().await.map_err(|e| Error::Io(format!("blob {digest}: {e}")))?;
            let mut segment = Vec::with_capacity(CHECKPOINT);
            while mark.chunks < info.chunks {
                let message = match tokio::time::timeout(BLOB_STALL, chunks.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => return Err(Error::Io(format!("blob {digest}: {e}"))),
                    Ok(None) => return Err(Error::Io(format!("blob {digest}: the chunks stopped coming"))),
                    Err(_) => {
                        return Err(Error::Io(format!(
                            "blob {digest}: nothing arrived for {} s after {} of {size} bytes (the object store may have lost a chunk{})",
                            BLOB_STALL.as_secs(),
                            mark.bytes,
                            if downloads.is_some() { "; what was read is kept" } else { "" }
                        )));
                    }
                };
                let seq = message.info().map_err(|e| Error::Io(format!("blob {digest}: {e}")))?.stream_sequence;
                hasher.update(&message.payload);
                if keep {
                    bytes.extend_from_slice(&message.payload);
                }
                mark.bytes += message.payload.len() as u64;
                mark.chunks += 1;
                mark.next_seq = seq + 1;
                if mark.bytes > size {
                    foreign = true;
                    return Err(Error::Io(format!("blob {digest}: its chunks hold more than its {size} bytes")));
                }
                if let (Some(to_disk), Some(downloads)) = (&to_disk, downloads) {
                    // The payload is shared, not copied.
                    segment.push(message.payload.clone());
                    if mark.chunks.is_multiple_of(CHECKPOINT) || mark.chunks == info.chunks {
                        // The writer stops only on an error, which it returns.
                        let _ = to_disk.send((std::mem::take(&mut segment), mark.clone())).await;
                    }
                    downloads.tell(&Progress { digest: digest.to_string(), resumed_from, done: mark.bytes, size });
                }
            }
            Ok(())
        };
        let read = read.await;
        if keep && read.is_ok() {
            in_memory.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        drop(to_disk);
        let wrote = match writer {
            Some(writer) => writer.await.unwrap_or_else(|e| Err(Error::Io(format!("the download's writer: {e}")))),
            None => Ok(()),
        };
        if let (Err(e), Some(downloads)) = (&wrote, downloads) {
            if !keep {
                // Only the file was to hold the bytes.
                let e = Error::Io(format!("blob {digest}: cannot write the download: {e}"));
                downloads.forget(digest).await;
                return Err(e);
            }
            // The read goes on in memory (a full disk does not stop a round); only going on
            // from here after a cut is lost.
            tracing::warn!("blob {digest}: cannot keep the download on disk ({e}); reading it into memory only");
            downloads.forget(digest).await;
        }
        if foreign && let Some(downloads) = downloads {
            // Not this object's chunks: start over next time.
            downloads.forget(digest).await;
        }
        read.map(|()| (bytes, hex::encode(hasher.finalize())))
    }

    /// One write of `bytes` under their digest `d`.
    async fn store_once(&self, d: &str, bytes: &bytes::Bytes) -> Result<(), Error> {
        // Kept only when the stored bytes are these bytes: anyone who may write blobs may
        // write other bytes under this name, and this put then puts them right.
        if self.fetch(d).await.is_ok() {
            return Ok(());
        }
        if let Err(e) = self.put_chunks(d, bytes).await {
            // What counts is whether these bytes are there now.
            self.fetch(d).await.map_err(|_| e)?;
        }
        Ok(())
    }

    /// Writes `bytes` as a new object named `d`: its chunks published
    /// [`PUT_IN_FLIGHT`] at a time (the object store's own put waits for
    /// each chunk's acknowledgement before it sends the next), then its
    /// description, which replaces any earlier one; then the earlier
    /// object's chunks are purged where this identity may do so.
    async fn put_chunks(&self, d: &str, bytes: &bytes::Bytes) -> Result<(), Error> {
        use base64::Engine;
        use sha2::Digest;
        let io = |what: &str, e: &dyn std::fmt::Display| Error::Io(format!("storing blob {d}: {what}: {e}"));
        let earlier = self.store.info(d).await.ok();
        let nuid = uuid::Uuid::now_v7().simple().to_string();
        let subject = format!("$O.{BUCKET}.C.{nuid}");
        let mut acks = std::collections::VecDeque::new();
        let mut chunks = 0;
        for at in (0..bytes.len()).step_by(PUT_CHUNK) {
            let chunk = bytes.slice(at..(at + PUT_CHUNK).min(bytes.len()));
            acks.push_back(self.js.publish(subject.clone(), chunk).await.map_err(|e| io("a chunk", &e))?);
            chunks += 1;
            if acks.len() >= PUT_IN_FLIGHT
                && let Some(ack) = acks.pop_front()
            {
                ack.await.map_err(|e| io("a chunk's acknowledgement", &e))?;
            }
        }
        for ack in acks {
            ack.await.map_err(|e| io("a chunk's acknowledgement", &e))?;
        }
        let sha = sha2::Sha256::digest(bytes);
        let info = serde_json::json!({
            "name": d,
            "bucket": BUCKET,
            "nuid": nuid,
            "size": bytes.len(),
            "chunks": chunks,
            "mtime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            "digest": format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(sha)),
            "options": {"max_chunk_size": PUT_CHUNK},
        });
        let meta = format!("$O.{BUCKET}.M.{}", base64::engine::general_purpose::URL_SAFE.encode(d));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        let body = serde_json::to_vec(&info).map_err(|e| io("its description", &e))?;
        self.js
            .publish_with_headers(meta, headers, body.into())
            .await
            .map_err(|e| io("its description", &e))?
            .await
            .map_err(|e| io("its description's acknowledgement", &e))?;
        if let Some(earlier) = earlier.filter(|e| e.nuid != nuid) {
            // A worker's identity may not purge: the earlier chunks then stay until they expire.
            if let Err(e) = self.stream.purge().filter(format!("$O.{BUCKET}.C.{}", earlier.nuid)).await {
                tracing::debug!("blob {d}: the chunks of the object it replaces stay: {e}");
            }
        }
        Ok(())
    }
}

#[async_trait]
impl BlobStore for NatsBlobs {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, Error> {
        let d = digest(&bytes);
        // Shared by the chunks, not copied.
        let bytes = bytes::Bytes::from(bytes);
        crate::retrying(&format!("storing blob {d}"), BLOB_RETRY_FOR, is_io, || self.store_once(&d, &bytes)).await?;
        Ok(d)
    }

    async fn get(&self, digest: &str) -> Result<Vec<u8>, Error> {
        check_digest(digest)?;
        crate::retrying(&format!("reading blob {digest}"), BLOB_RETRY_FOR, is_io, || self.fetch(digest)).await
    }

    async fn get_file(&self, digest: &str, dir: &Path) -> Result<BlobFile, Error> {
        check_digest(digest)?;
        crate::retrying(&format!("reading blob {digest}"), BLOB_RETRY_FOR, is_io, || self.fetch_file(digest, dir)).await
    }
}

/// A checked read: the bytes, or the file holding them.
enum Fetched {
    Bytes(Vec<u8>),
    File(BlobFile),
}

/// Reads from another store and keeps its own writes in memory: a dry run
/// (re-deriving a model to compare it) that leaves the real store as it was.
pub struct Overlay {
    base: std::sync::Arc<dyn BlobStore>,
    written: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

impl Overlay {
    /// Over `base`.
    pub fn new(base: std::sync::Arc<dyn BlobStore>) -> Self {
        Self { base, written: Default::default() }
    }

    /// Whether `digest` was written here (not in the base store).
    pub fn wrote(&self, digest: &str) -> bool {
        self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(digest)
    }
}

#[async_trait]
impl BlobStore for Overlay {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, Error> {
        let d = digest(&bytes);
        self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(d.clone()).or_insert(bytes);
        Ok(d)
    }

    async fn get(&self, digest: &str) -> Result<Vec<u8>, Error> {
        check_digest(digest)?;
        let mine = self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(digest).cloned();
        match mine {
            Some(bytes) => Ok(bytes),
            None => self.base.get(digest).await,
        }
    }
}

/// Reads shared by the workers of one process (virtual workers): a blob is
/// fetched once however many ask for it at the same time, and the most
/// recently read are kept up to a byte budget. Blobs are named by their
/// digest, so what is kept never goes stale. Writes go straight through.
pub struct Cached {
    base: std::sync::Arc<dyn BlobStore>,
    budget: usize,
    state: std::sync::Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// Each blob's read, in flight or done.
    cells: std::collections::HashMap<String, std::sync::Arc<tokio::sync::OnceCell<std::sync::Arc<Vec<u8>>>>>,
    /// Digests read, least recent first.
    order: std::collections::VecDeque<String>,
}

impl Cached {
    /// Over `base`, keeping at most `budget` bytes of blobs read.
    pub fn new(base: std::sync::Arc<dyn BlobStore>, budget: usize) -> Self {
        Self { base, budget, state: Default::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl BlobStore for Cached {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, Error> {
        self.base.put(bytes).await
    }

    async fn get(&self, digest: &str) -> Result<Vec<u8>, Error> {
        check_digest(digest)?;
        let cell = {
            let mut state = self.state();
            let cell = state.cells.entry(digest.to_string()).or_default().clone();
            if let Some(at) = state.order.iter().position(|d| d == digest) {
                state.order.remove(at);
            }
            state.order.push_back(digest.to_string());
            cell
        };
        let mut fetched = false;
        let bytes = cell
            .get_or_try_init(|| async {
                fetched = true;
                self.base.get(digest).await.map(std::sync::Arc::new)
            })
            .await;
        let bytes = match bytes {
            Ok(b) => b.clone(),
            Err(e) => {
                // A failed read is not kept: the next one tries again.
                let mut state = self.state();
                if state.cells.get(digest).is_some_and(|c| std::sync::Arc::ptr_eq(c, &cell)) {
                    state.cells.remove(digest);
                    state.order.retain(|d| d != digest);
                }
                return Err(e);
            }
        };
        if fetched {
            // The least recent go first; a blob alone over the budget is not kept either.
            let mut state = self.state();
            while state.cells.values().filter_map(|c| c.get()).map(|b| b.len()).sum::<usize>() > self.budget {
                let Some(old) = state.order.pop_front() else { break };
                state.cells.remove(&old);
            }
        }
        Ok(bytes.as_ref().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parts_first_bytes_hash_as_the_blobs_do_when_the_rest_follows() {
        use sha2::Digest;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("part");
        // Over two of the hash's read blocks, so that a block boundary falls inside the prefix.
        let bytes: Vec<u8> = (0..(2 << 20) + 777u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &bytes).expect("part");
        for len in [0, 1, 1 << 20, (1 << 20) + 5, bytes.len() as u64] {
            let mut hasher = hash_of_prefix(&path, len).expect("prefix");
            hasher.update(&bytes[len as usize..]);
            assert_eq!(hex::encode(hasher.finalize()), digest(&bytes), "prefix of {len}");
        }
        let short = hash_of_prefix(&path, bytes.len() as u64 + 1).expect_err("the part holds fewer");
        assert_eq!(short.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(hash_of_prefix(&dir.path().join("none"), 1).is_err());
        assert!(matches!(arrived(&digest(b"a"), digest(b"b"), b"b".to_vec()), Err(Error::Corrupt { .. })));
        assert_eq!(arrived(&digest(b"a"), digest(b"a"), b"a".to_vec()).expect("the bytes"), b"a");
    }

    #[tokio::test]
    async fn local_blobs_are_content_addressed_and_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = LocalBlobs::new(dir.path()).expect("blobs");
        let d = blobs.put(b"model bytes".to_vec()).await.expect("put");
        assert_eq!(d, digest(b"model bytes"));
        assert_eq!(blobs.get(&d).await.expect("get"), b"model bytes");
        std::fs::write(dir.path().join(&d), b"tampered").expect("tamper");
        assert!(matches!(blobs.get(&d).await, Err(Error::Corrupt { .. })));
        assert!(matches!(blobs.get(&"0".repeat(64)).await, Err(Error::NotFound(_))));
        assert!(matches!(blobs.get("../etc/passwd").await, Err(Error::BadDigest(_))));
    }

    #[tokio::test]
    async fn a_blob_in_a_file_is_checked_and_only_a_copy_made_for_the_reader_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = std::sync::Arc::new(LocalBlobs::new(dir.path().join("store")).expect("blobs"));
        let d = blobs.put(b"model bytes".to_vec()).await.expect("put");
        let own = blobs.get_file(&d, dir.path()).await.expect("the store's file");
        assert_eq!((std::fs::read(own.path()).expect("read"), own.len()), (b"model bytes".to_vec(), 11));
        let path = own.path().to_path_buf();
        drop(own);
        assert!(path.exists(), "the store's own file stays");
        // A store without files of its own (the default) writes a copy, removed on drop.
        let overlay = Overlay::new(blobs.clone());
        let copy = overlay.get_file(&d, &dir.path().join("copies")).await.expect("a copy");
        assert!(copy.path().starts_with(dir.path().join("copies")) && copy.path().exists());
        let path = copy.path().to_path_buf();
        drop(copy);
        assert!(!path.exists(), "the copy goes");
        std::fs::write(dir.path().join("store").join(&d), b"tampered").expect("tamper");
        assert!(matches!(blobs.get_file(&d, dir.path()).await, Err(Error::Corrupt { .. })));
        assert!(matches!(blobs.get_file(&"0".repeat(64), dir.path()).await, Err(Error::NotFound(_))));
    }

    #[tokio::test]
    async fn an_overlay_reads_through_and_keeps_its_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = std::sync::Arc::new(LocalBlobs::new(dir.path()).expect("blobs"));
        let stored = base.put(b"stored".to_vec()).await.expect("put");
        let overlay = Overlay::new(base.clone());
        assert_eq!(overlay.get(&stored).await.expect("read through"), b"stored");
        let mine = overlay.put(b"dry run".to_vec()).await.expect("put");
        assert_eq!(overlay.get(&mine).await.expect("own write"), b"dry run");
        assert!(overlay.wrote(&mine) && !overlay.wrote(&stored));
        assert!(matches!(base.get(&mine).await, Err(Error::NotFound(_))), "the base store is untouched");
    }

    /// Counts the reads that reach the store below.
    struct Counting {
        base: LocalBlobs,
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl BlobStore for Counting {
        async fn put(&self, bytes: Vec<u8>) -> Result<String, Error> {
            self.base.put(bytes).await
        }
        async fn get(&self, digest: &str) -> Result<Vec<u8>, Error> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.base.get(digest).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cache_reads_a_blob_once_for_many_readers_and_keeps_the_recent_ones_within_its_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let counting = std::sync::Arc::new(Counting { base: LocalBlobs::new(dir.path()).expect("blobs"), reads: Default::default() });
        let reads = || counting.reads.load(std::sync::atomic::Ordering::SeqCst);
        let cached = std::sync::Arc::new(Cached::new(counting.clone(), 25));
        let a = cached.put(vec![1; 10]).await.expect("put");
        let b = cached.put(vec![2; 10]).await.expect("put");
        let c = cached.put(vec![3; 10]).await.expect("put");
        // A hundred readers at once: one read below.
        let many: Vec<_> = (0..100)
            .map(|_| {
                let (cached, a) = (cached.clone(), a.clone());
                tokio::spawn(async move { cached.get(&a).await })
            })
            .collect();
        for r in many {
            assert_eq!(r.await.expect("join").expect("get"), vec![1; 10]);
        }
        assert_eq!(reads(), 1);
        cached.get(&b).await.expect("get");
        cached.get(&a).await.expect("get");
        assert_eq!(reads(), 2, "a and b fit the budget");
        // c goes over the budget: the least recent (b) is let go, a is kept.
        cached.get(&c).await.expect("get");
        cached.get(&a).await.expect("get");
        assert_eq!(reads(), 3);
        cached.get(&b).await.expect("get");
        assert_eq!(reads(), 4, "b was let go");
        // What is missing is not kept as missing; a corrupt blob is refused every time.
        let missing = "0".repeat(64);
        assert!(matches!(cached.get(&missing).await, Err(Error::NotFound(_))));
        std::fs::write(dir.path().join(&missing), b"late").expect("write");
        assert!(matches!(cached.get(&missing).await, Err(Error::Corrupt { .. })), "read again, and verified below");
        assert!(matches!(cached.get("nope").await, Err(Error::BadDigest(_))));
    }
}
