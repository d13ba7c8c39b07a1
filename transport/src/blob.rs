//! Content-addressed model blobs: a local folder (embedded mode) or the
//! JetStream object store (distributed). Reads verify the digest.

use std::path::PathBuf;

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
    let actual = digest(&bytes);
    if actual == expected { Ok(bytes) } else { Err(Error::Corrupt { expected: expected.to_string(), actual }) }
}

/// Where model blobs live.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores bytes; returns their sha256 digest.
    async fn put(&self, bytes: Vec<u8>) -> Result<String, Error>;
    /// Fetches the bytes with this digest, verified.
    async fn get(&self, digest: &str) -> Result<Vec<u8>, Error>;
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
            let tmp = self.dir.join(format!(".{d}.{}", std::process::id()));
            tokio::fs::write(&tmp, &bytes).await.map_err(|e| Error::Io(e.to_string()))?;
            tokio::fs::rename(&tmp, &path).await.map_err(|e| Error::Io(e.to_string()))?;
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
}

/// Blobs in the JetStream object store (chunked, so any size works).
#[derive(Clone)]
pub struct NatsBlobs {
    store: object_store::ObjectStore,
}

impl NatsBlobs {
    /// Opens (creating if needed) the `flame-models` bucket.
    pub async fn new(js: &jetstream::Context) -> Result<Self, Error> {
        Self::with_replicas(js, 1).await
    }

    /// Opens the bucket, creating it with `replicas` if needed.
    pub async fn with_replicas(js: &jetstream::Context, replicas: usize) -> Result<Self, Error> {
        let store = match js.get_object_store(BUCKET).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(object_store::Config { bucket: BUCKET.to_string(), num_replicas: replicas, ..Default::default() })
                .await
                .map_err(|e| Error::Io(format!("cannot create object store bucket {BUCKET}: {e}")))?,
        };
        Ok(Self { store })
    }
}

/// How long a blob read or write that fails for want of the server (a NATS
/// server restarting, a leaf node's link cut, a stream electing its leader)
/// is tried again before it counts as failed.
pub const BLOB_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a blob read may go without a byte before it counts as failed (and is tried again).
pub const BLOB_STALL: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether an error may pass (storage away for a while), unlike a missing or corrupt blob.
fn is_io(e: &Error) -> bool {
    matches!(e, Error::Io(_))
}

impl NatsBlobs {
    /// One read, checked.
    async fn fetch(&self, digest: &str) -> Result<Vec<u8>, Error> {
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

    /// One write of `bytes` under their digest `d`.
    async fn store_once(&self, d: &str, bytes: &[u8]) -> Result<(), Error> {
        // Kept only when the stored bytes are these bytes: anyone who may write blobs may
        // write other bytes under this name, and this put then puts them right.
        if self.fetch(d).await.is_ok() {
            return Ok(());
        }
        if let Err(e) = self.store.put(d, &mut &bytes[..]).await {
            // A put over a name also purges the old chunks, which a worker's identity may not
            // do; what counts is whether these bytes are there now.
            self.fetch(d).await.map_err(|_| Error::Io(e.to_string()))?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlobStore for NatsBlobs {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, Error> {
        let d = digest(&bytes);
        crate::retrying(&format!("storing blob {d}"), BLOB_RETRY_FOR, is_io, || self.store_once(&d, &bytes)).await?;
        Ok(d)
    }

    async fn get(&self, digest: &str) -> Result<Vec<u8>, Error> {
        check_digest(digest)?;
        crate::retrying(&format!("reading blob {digest}"), BLOB_RETRY_FOR, is_io, || self.fetch(digest)).await
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
