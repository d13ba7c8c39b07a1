//! Leases: one holder at a time for a named piece of work (driving a job,
//! relaying the event log, writing the job views) among engine replicas.
//!
//! A lease is an entry of the NATS KV bucket `flame-leases` whose value is the
//! holder's name. The bucket's entries expire `ttl` after they were last
//! written, so a holder that dies loses its leases within `ttl`. A holder
//! renews with a compare-and-set on the entry's revision; a replica takes a
//! free lease with a create, which fails while anyone holds it.
//!
//! A holder acts only while its lease is *valid*: less than half the TTL
//! since its last renewal was sent. The entry lives at least a full TTL from
//! when the server stored that renewal, so a holder that cannot renew (NATS
//! away, the process paused) stops acting well before anyone else may take
//! over. The event store's expected versions stay the last fence: a write
//! that was already on its way is refused if the stream moved.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use tokio::sync::watch;

use crate::Error;

/// The KV bucket of leases.
pub const LEASE_BUCKET: &str = "flame-leases";
/// How long a lease outlives its holder's last renewal, by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

/// The leases of one holder (an engine replica).
#[derive(Clone)]
pub struct Leases {
    kv: kv::Store,
    holder: String,
    ttl: Duration,
}

/// A lease this holder has.
#[derive(Debug)]
pub struct Lease {
    name: String,
    revision: u64,
    renewed: Instant,
}

impl Lease {
    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn nats(e: impl std::fmt::Display) -> Error {
    Error::Nats(e.to_string())
}

/// KV keys allow letters, digits and `-/_=.`; anything else becomes `_`.
fn key(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-/_=.".contains(c) { c } else { '_' }).collect()
}

impl Leases {
    /// Opens (or creates) the lease bucket, whose entries expire after `ttl`.
    pub async fn open(js: &jetstream::Context, holder: &str, ttl: Duration, replicas: usize) -> Result<Self, Error> {
        let kv = js
            .create_or_update_key_value(kv::Config {
                bucket: LEASE_BUCKET.to_string(),
                history: 1,
                max_age: ttl,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Nats(format!("cannot open the lease bucket {LEASE_BUCKET}: {e}")))?;
        Ok(Self { kv, holder: holder.to_string(), ttl })
    }

    /// This holder's name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// How long a lease outlives its last renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often a holder should renew: three times per validity window.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 6
    }

    /// Whether this holder may still act on `lease`.
    pub fn valid(&self, lease: &Lease) -> bool {
        Instant::now() < self.valid_until(lease)
    }

    /// Until when this holder may act on `lease`: half the TTL after its last renewal was sent.
    pub fn valid_until(&self, lease: &Lease) -> Instant {
        lease.renewed + self.ttl / 2
    }

    /// Takes the lease if nobody holds it; `None` while someone does.
    pub async fn acquire(&self, name: &str) -> Result<Option<Lease>, Error> {
        let sent = Instant::now();
        match self.kv.create(key(name), self.holder.clone().into()).await {
            Ok(revision) => Ok(Some(Lease { name: name.to_string(), revision, renewed: sent })),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(Error::Nats(format!("cannot take the lease {name}: {e}"))),
        }
    }

    /// Who holds the lease now, if anyone.
    pub async fn holder_of(&self, name: &str) -> Result<Option<String>, Error> {
        let entry = self.kv.entry(key(name)).await.map_err(nats)?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put).map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }

    /// Renews the lease. `Ok(false)`: it is lost (it expired and may have been
    /// taken); `Err`: NATS did not answer, and the lease stands as long as it
    /// is valid.
    pub async fn renew(&self, lease: &mut Lease) -> Result<bool, Error> {
        let sent = Instant::now();
        match self.kv.update(key(&lease.name), self.holder.clone().into(), lease.revision).await {
            Ok(revision) => {
                lease.revision = revision;
                lease.renewed = sent;
                Ok(true)
            }
            Err(e) => {
                // Lost if the entry is gone or is not the one this holder wrote last.
                match self.kv.entry(key(&lease.name)).await {
                    Ok(Some(entry)) if entry.revision == lease.revision && entry.operation == kv::Operation::Put => {
                        Err(Error::Nats(format!("cannot renew the lease {}: {e}", lease.name)))
                    }
                    Ok(_) => Ok(false),
                    Err(read) => Err(Error::Nats(format!("cannot renew the lease {}: {e}; nor read it: {read}", lease.name))),
                }
            }
        }
    }

    /// Renews the lease, waiting at most one renewal period for NATS;
    /// whether this holder may go on acting on it.
    pub async fn keep(&self, lease: &mut Lease) -> bool {
        match tokio::time::timeout(self.renew_every(), self.renew(lease)).await {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                tracing::warn!(lease = lease.name, "{e}");
                self.valid(lease)
            }
            Err(_) => {
                tracing::warn!(lease = lease.name, "renewing the lease timed out");
                self.valid(lease)
            }
        }
    }

    /// Gives the lease up, so that another replica may take it at once.
    pub async fn release(&self, lease: Lease) {
        if let Err(e) = self.kv.delete_expect_revision(key(&lease.name), Some(lease.revision)).await {
            tracing::debug!(lease = lease.name, "releasing the lease: {e}");
        }
    }

    /// The names after `prefix` of the leases held now (by anyone).
    pub async fn held(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let mut keys = self.kv.keys().await.map_err(nats)?;
        let mut out = Vec::new();
        while let Some(k) = keys.try_next().await.map_err(nats)? {
            if let Some(rest) = k.strip_prefix(prefix) {
                out.push(rest.to_string());
            }
        }
        Ok(out)
    }

    /// Runs `work` whenever this holder has the lease `name`, until `stop`
    /// turns true: waits for the lease, runs `work(end)`, where `end` turns
    /// true when the lease is lost or `stop` fires, renews meanwhile, and
    /// waits for the lease again after a loss. For work that one replica
    /// should do at a time (relaying the log, writing the views).
    pub async fn serve<F, Fut>(&self, name: &str, mut stop: watch::Receiver<bool>, work: F)
    where
        F: Fn(watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        while !*stop.borrow() {
            let mut lease = match self.acquire(name).await {
                Ok(Some(lease)) => lease,
                other => {
                    if let Err(e) = other {
                        tracing::warn!(lease = name, "{e}");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(self.renew_every()) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
            tracing::info!(lease = name, holder = self.holder, "took the lease");
            let (end, ended) = watch::channel(false);
            let run = work(ended);
            tokio::pin!(run);
            let mut renew = tokio::time::interval(self.renew_every());
            let (mut lost, mut stopping) = (false, false);
            loop {
                tokio::select! {
                    () = &mut run => break,
                    _ = stop.changed(), if !stopping => {
                        stopping = true;
                        let _ = end.send(true);
                    }
                    _ = renew.tick(), if !lost => {
                        if !self.keep(&mut lease).await {
                            tracing::warn!(lease = name, holder = self.holder, "lost the lease; stopping its work");
                            lost = true;
                            let _ = end.send(true);
                        }
                    }
                }
            }
            if !lost {
                self.release(lease).await;
            }
        }
    }
}
