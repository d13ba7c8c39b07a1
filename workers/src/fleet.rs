//! Virtual workers: many worker identities in one process
//! (`flame-worker --virtual N`), for simulations at scale through exactly
//! the deployment's code path. Each identity registers and heartbeats under
//! its own id, takes the commands addressed to it and reports as a worker
//! process would; they share the process's transport, blob store and
//! libtorch, one bound on the commands running at once, and one command
//! consumer per group of [`GROUP`] (the server would otherwise keep, pull
//! for and heartbeat thousands of consumers).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use futures::{FutureExt, StreamExt, TryStreamExt};

use flame_events::protocol::Command;
use flame_transport::{Delivery, Inbox};

use crate::Worker;
use crate::runtime::HEARTBEAT;

/// Where a dispatcher hands a worker its commands.
type Route = tokio::sync::mpsc::UnboundedSender<Result<Delivery<Command>, flame_transport::Error>>;

/// Virtual workers whose commands come through one consumer.
pub const GROUP: usize = 500;

/// Identities registered at once while the fleet starts.
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

/// The id of the `g`-th group of virtual workers under `base` (it names the
/// group's command consumer, `group-<id>`, as it did before groups were registered).
fn group_id(base: &str, g: usize) -> String {
    format!("{base}-{g}")
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
    let ids = virtual_ids(&template.info().id, n);
    let started = Instant::now();
    // Not while another live process is one of these workers (a fleet started twice with one --id).
    template.transport().claim_ids(&ids).await.with_context(|| format!("starting {n} virtual workers"))?;
    // Each group of GROUP workers is registered as such: the engine sends its commands in
    // batches on the group's subject, and the group's reports go out in batches.
    let mut workers: Vec<Worker> = Vec::with_capacity(n);
    for (g, members) in ids.chunks(GROUP).enumerate() {
        let group = group_id(&template.info().id, g);
        let reports: Arc<dyn flame_transport::Transport> =
            Arc::new(flame_transport::group::GroupReports::new(template.transport().clone(), group.clone()));
        for id in members {
            workers.push(template.with_id(id.clone()).with_shared_limit(limit.clone()).in_group(group.clone(), reports.clone()));
        }
    }
    // Registered ones heartbeat from the start: registering thousands may take longer than a registration lives.
    let registered: Arc<Mutex<Vec<Worker>>> = Arc::default();
    let heartbeat = {
        let registered = registered.clone();
        tokio::spawn(async move {
            // On a fixed beat (not a pause after each pass): a pass over thousands that runs
            // long under load must not push the next one past the registry's expiry.
            let mut beat = tokio::time::interval(HEARTBEAT);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                beat.tick().await;
                let now: Vec<Worker> = registered.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                futures::stream::iter(now.iter()).for_each_concurrent(HEARTBEATS_AT_ONCE, |w| w.heartbeat(HEARTBEAT).map(drop)).await;
            }
        })
    };
    futures::stream::iter(workers.iter())
        .map(|w| {
            let registered = registered.clone();
            async move {
                w.register().await?;
                registered.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(w.clone());
                anyhow::Ok(())
            }
        })
        .buffer_unordered(OPEN_AT_ONCE)
        .try_collect::<()>()
        .await
        .inspect_err(|_| heartbeat.abort())?;
    // Commands come through one consumer per group of workers and are handed to the worker
    // each is addressed to: the server keeps a few consumers, not thousands.
    let mut inboxes = Vec::with_capacity(n);
    let mut dispatchers = Vec::new();
    for (g, members) in ids.chunks(GROUP).enumerate() {
        let mut routes = HashMap::with_capacity(members.len());
        for id in members {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            routes.insert(id.clone(), tx);
            inboxes.push(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed());
        }
        let group = group_id(&template.info().id, g);
        let inbox = template.transport().group_inbox(&group, members).await.inspect_err(|_| heartbeat.abort())?;
        dispatchers.push(tokio::spawn(dispatch(group, inbox, routes)));
    }
    tracing::info!(
        workers = n,
        groups = dispatchers.len(),
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
    dispatchers.iter().for_each(tokio::task::JoinHandle::abort);
    result
}

/// Hands each command of a group's inbox to the worker it is addressed to.
/// A worker's inbox closes when the group's does.
async fn dispatch(group: String, mut inbox: Inbox<(String, Command)>, routes: HashMap<String, Route>) {
    while let Some(next) = inbox.next().await {
        match next {
            Ok(delivery) => {
                let id = delivery.message.0.clone();
                match routes.get(&id) {
                    Some(route) => {
                        let _ = route.send(Ok(delivery.map(|(_, command)| command)));
                    }
                    None => tracing::warn!(group = %group, "a command for '{id}', not a worker of this group: left unacknowledged"),
                }
            }
            Err(e) => tracing::warn!(group = %group, "reading the group's commands: {e}"),
        }
    }
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
