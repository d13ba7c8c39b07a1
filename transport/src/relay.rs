//! The outbox relay: follows the store's global log from a stored checkpoint
//! and publishes every committed event to JetStream, with the event id as
//! `Nats-Msg-Id` so a re-publish after a crash is dropped by NATS's dedup.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::stream::{FuturesOrdered, StreamExt};

use flame_events::store::EventStore;

/// The JetStream stream that carries committed events.
pub const EVENT_STREAM: &str = "FLAME_EVENTS";
const BATCH: usize = 1000;

/// Relay errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] flame_events::store::Error),
    /// NATS failed.
    #[error("publishing events to NATS failed: {0}")]
    Nats(String),
}

/// The NATS subject of an event: `flame.events.<stream-kind>.<id>`.
pub fn subject(stream_id: &str) -> String {
    match stream_id.split_once('-') {
        Some((kind, id)) => format!("flame.events.{kind}.{id}"),
        None => format!("flame.events.{stream_id}"),
    }
}

/// Publishes the store's events to JetStream.
pub struct Relay {
    store: Arc<dyn EventStore>,
    js: jetstream::Context,
    checkpoint: String,
}

impl Relay {
    /// A relay whose progress is saved under the checkpoint `name`.
    pub async fn new(store: Arc<dyn EventStore>, js: jetstream::Context, name: &str) -> Result<Self, Error> {
        Self::with_replicas(store, js, name, 1).await
    }

    /// A relay that creates the event stream with `replicas` if it is missing.
    pub async fn with_replicas(store: Arc<dyn EventStore>, js: jetstream::Context, name: &str, replicas: usize) -> Result<Self, Error> {
        js.get_or_create_stream(stream::Config {
            name: EVENT_STREAM.to_string(),
            subjects: vec!["flame.events.>".to_string()],
            duplicate_window: Duration::from_secs(600),
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Nats(format!("cannot create stream {EVENT_STREAM}: {e}")))?;
        Ok(Self { store, js, checkpoint: format!("relay:{name}") })
    }

    /// Publishes everything committed since the checkpoint; returns how many.
    pub async fn catch_up(&self) -> Result<usize, Error> {
        let mut total = 0;
        loop {
            let from = self.store.load_checkpoint(&self.checkpoint).await? + 1;
            let events = self.store.read_all(from, BATCH).await?;
            let Some(last) = events.last().map(|e| e.position) else {
                return Ok(total);
            };
            let mut acks = FuturesOrdered::new();
            for e in &events {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", e.event_id.to_string().as_str());
                headers.insert("Flame-Position", e.position.to_string().as_str());
                let body = serde_json::to_vec(e).map_err(|err| Error::Nats(err.to_string()))?;
                let ack = self
                    .js
                    .publish_with_headers(subject(&e.stream_id), headers, body.into())
                    .await
                    .map_err(|err| Error::Nats(err.to_string()))?;
                acks.push_back(ack.into_future());
            }
            while let Some(ack) = acks.next().await {
                ack.map_err(|err| Error::Nats(err.to_string()))?;
            }
            self.store.save_checkpoint(&self.checkpoint, last).await?;
            total += events.len();
        }
    }

    /// Catches up every `interval` until `shutdown` resolves, then once more.
    pub async fn run(self, interval: Duration, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.catch_up().await {
                tracing::warn!("event relay: {e}; retrying");
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        self.catch_up().await.map(|_| ())
    }
}
