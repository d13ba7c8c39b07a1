//! The outbox relay against a real NATS server that goes away and comes back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use flame_events::{EventStore, ExpectedVersion, NewEvent};
use flame_stores::sqlite::SqliteStore;
use flame_transport::relay::{EVENT_STREAM, Relay};

use crate::util::{Nats, connect, free_port};

async fn published_ids(js: &async_nats::jetstream::Context) -> Vec<String> {
    let stream = js.get_stream(EVENT_STREAM).await.expect("stream");
    let consumer = stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await.expect("consumer");
    let total = stream.clone().info().await.expect("info").state.messages as usize;
    let mut messages = consumer.messages().await.expect("messages");
    let mut ids = Vec::new();
    while ids.len() < total {
        let m =
            tokio::time::timeout(Duration::from_secs(10), messages.next()).await.expect("message in time").expect("open").expect("message");
        ids.push(m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).expect("msg id").to_string());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_while_nats_is_down_arrive_once_it_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let nats = Nats::start(port, &dir.path().join("js"));
    let client = connect(&url).await;
    let js = async_nats::jetstream::new(client.clone());
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path().join("events.db").to_str().expect("utf8")).expect("store"));
    let relay = Relay::new(store.clone(), js.clone(), "test").await.expect("relay");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(Duration::from_millis(50), async move {
        let _ = stopped.await;
    }));

    nats.stop();
    let mut ids = BTreeSet::new();
    for batch in 0..100 {
        let events: Vec<NewEvent> = (0..10).map(|i| NewEvent::new("Tested", json!({"batch": batch, "i": i}), "test")).collect();
        ids.extend(events.iter().map(|e| e.event_id.to_string()));
        store.append(&format!("test-{}", batch % 7), ExpectedVersion::Any, events).await.expect("append while NATS is down");
    }
    assert_eq!(ids.len(), 1000);

    let _nats = Nats::start(port, &dir.path().join("js"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if store.load_checkpoint("relay:test").await.expect("checkpoint") >= 1000 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the relay did not catch up after NATS came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    running.await.expect("relay task").expect("relay");

    let js = async_nats::jetstream::new(connect(&url).await);
    let published = published_ids(&js).await;
    let unique: BTreeSet<String> = published.iter().cloned().collect();
    assert_eq!(published.len(), 1000, "each event exactly once on JetStream");
    assert_eq!(unique, ids);

    // A relay that crashed before saving its checkpoint publishes again from
    // an older position: NATS's dedup window drops the repeats.
    store.save_checkpoint("relay:test", 500).await.expect("rewind");
    let again = Relay::new(store.clone(), js.clone(), "test").await.expect("relay");
    assert_eq!(again.catch_up().await.expect("catch up"), 500);
    assert_eq!(published_ids(&js).await.len(), 1000);
}
