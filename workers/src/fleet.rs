//! Virtual workers: many worker identities in one process
//! (`flame-worker --virtual N`), for simulations at scale through exactly
//! the deployment's code path. Each identity registers, heartbeats and takes
//! commands from its own consumer as a worker process would; they share the
//! process's transport, blob store and libtorch, and one bound on the
//! commands running at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use futures::{FutureExt, StreamExt, TryStreamExt};

use crate::Worker;
use crate::runtime::HEARTBEAT;

/// Identities registered and opened at once while the fleet starts: the
/// JetStream API takes consumer creations one by one, and a burst of
/// thousands is refused as over its queue.
const OPEN_AT_ONCE: usize = 32;
/// Bytes of model blobs the virtual workers of a process keep once read
/// (the global model every trainer starts from, read once per round).
pub const BLOB_CACHE: usize = 512 << 20;
/// Heartbeats in flight at once.
const HEARTBEATS_AT_ONCE: usize = 256;

/// The ids of `n` virtual workers under `base`: `base-0` .. `base-(n-1)`,
/// zero-padded to one width so that they sort in number order.
pub fn virtual_ids(base: &str, n: usize) -> Vec<String> {
    let width = n.saturating_sub(1).to_string().len();
    (0..n).map(|i| format!("{base}-{i:0width$}")).collect()
}

/// Runs `n` virtual workers with `template`'s settings under ids from
/// [`virtual_ids`] of its id, at most `concurrency` commands at once in
/// all, until `shutdown` resolves. A worker whose serving fails (a report
/// that could not be sent for [`crate::runtime::REPORT_RETRY_FOR`]) stops
/// them all, as it would stop a worker process, so that its supervisor
/// restarts the fleet and the unacknowledged commands are redelivered.
pub async fn run_virtual(
    template: &Worker,
    n: usize,
    concurrency: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let workers: Vec<Worker> =
        virtual_ids(&template.info().id, n).into_iter().map(|id| template.with_id(id).with_shared_limit(limit.clone())).collect();
    // Opened ones heartbeat from the start: opening thousands takes longer than a registration lives.
    let opened: Arc<Mutex<Vec<Worker>>> = Arc::default();
    let heartbeat = {
        let opened = opened.clone();
        tokio::spawn(async move {
            // On a fixed beat (not a pause after each pass): a pass over thousands that runs
            // long under load must not push the next one past the registry's expiry.
            let mut beat = tokio::time::interval(HEARTBEAT);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                beat.tick().await;
                let now: Vec<Worker> = opened.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                futures::stream::iter(now.iter()).for_each_concurrent(HEARTBEATS_AT_ONCE, Worker::heartbeat).await;
            }
        })
    };
    let started = Instant::now();
    let inboxes: Vec<_> = futures::stream::iter(workers.iter())
        .map(|w| {
            let opened = opened.clone();
            async move {
                let inbox = w.open().await?;
                opened.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(w.clone());
                anyhow::Ok(inbox)
            }
        })
        .buffered(OPEN_AT_ONCE)
        .try_collect()
        .await
        .inspect_err(|_| heartbeat.abort())?;
    tracing::info!(
        workers = n,
        first = %workers.first().map_or("", |w| w.info().id.as_str()),
        last = %workers.last().map_or("", |w| w.info().id.as_str()),
        concurrency,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "virtual workers ready"
    );
    let shutdown = shutdown.boxed().shared();
    let mut serving = tokio::task::JoinSet::new();
    for (w, inbox) in workers.into_iter().zip(inboxes) {
        serving.spawn(w.serve(inbox, shutdown.clone()));
    }
    let mut result = Ok(());
    while let Some(done) = serving.join_next().await {
        let failed = match done {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => anyhow!(e).context("a virtual worker panicked"),
        };
        result = Err(failed.context("a virtual worker stopped; stopping them all"));
        serving.abort_all();
        // What is aborted finishes at once; what was mid-command is redelivered to the restarted fleet.
        tokio::time::timeout(Duration::from_secs(5), async { while serving.join_next().await.is_some() {} }).await.ok();
        break;
    }
    heartbeat.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_ids_are_distinct_valid_and_sort_in_number_order() {
        let ids = virtual_ids("sim", 200);
        assert_eq!(ids.len(), 200);
        assert_eq!((ids[0].as_str(), ids[7].as_str(), ids[199].as_str()), ("sim-000", "sim-007", "sim-199"));
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids, "string order is number order");
        assert!(ids.iter().all(|id| flame_transport::check_id(id).is_ok()));
        assert_eq!(virtual_ids("v", 1), vec!["v-0"]);
        assert_eq!(virtual_ids("v", 10).last().map(String::as_str), Some("v-9"));
        assert_eq!(virtual_ids("v", 11).last().map(String::as_str), Some("v-10"));
    }
}
