//! A transport for the workers of one group (virtual workers of one
//! process): their reports go out together, in as few messages as fit, on
//! the group's subject ([`Transport::send_reports`]); everything else goes
//! through the transport it wraps.
//!
//! No timer holds a report back: one batch is out at a time, and the reports
//! that come meanwhile go in the next. One worker reporting alone sends at
//! once; a thousand finishing together send in a few messages.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use flame_events::protocol::{Command, Report, WorkerInfo};

use crate::{Error, Inbox, Transport};

/// Reports in one batch at most (more wait for the next).
const MOST: usize = 1000;

type Waiting = (Report, oneshot::Sender<Result<(), String>>);

/// See the module's documentation.
pub struct GroupReports {
    inner: Arc<dyn Transport>,
    queue: mpsc::UnboundedSender<Waiting>,
}

impl GroupReports {
    /// Reports of `group`'s workers through `inner`, batched. Needs a Tokio runtime.
    pub fn new(inner: Arc<dyn Transport>, group: String) -> Self {
        let (queue, mut waiting) = mpsc::unbounded_channel::<Waiting>();
        let out = inner.clone();
        tokio::spawn(async move {
            while let Some(first) = waiting.recv().await {
                let mut batch = vec![first];
                while batch.len() < MOST {
                    match waiting.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                let (reports, answers): (Vec<Report>, Vec<_>) = batch.into_iter().unzip();
                let sent = out.send_reports(&group, &reports).await.map_err(|e| match e {
                    Error::Nats(m) => m,
                    other => other.to_string(),
                });
                for answer in answers {
                    // The worker may have given up waiting; its report went out all the same.
                    let _ = answer.send(sent.clone());
                }
            }
        });
        Self { inner, queue }
    }
}

#[async_trait]
impl Transport for GroupReports {
    async fn register(&self, info: &WorkerInfo) -> Result<(), Error> {
        self.inner.register(info).await
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        self.inner.workers().await
    }

    fn connects(&self) -> u64 {
        self.inner.connects()
    }

    async fn heartbeat_ages(&self) -> Result<Vec<(String, f64)>, Error> {
        self.inner.heartbeat_ages().await
    }

    async fn send_command(&self, worker_id: &str, command: &Command) -> Result<(), Error> {
        self.inner.send_command(worker_id, command).await
    }

    async fn command_inbox(&self, worker_id: &str) -> Result<Inbox<Command>, Error> {
        self.inner.command_inbox(worker_id).await
    }

    async fn group_inbox(&self, group: &str, worker_ids: &[String]) -> Result<Inbox<(String, Command)>, Error> {
        self.inner.group_inbox(group, worker_ids).await
    }

    async fn send_commands(&self, group: &str, commands: &[(String, Command)]) -> Result<(), Error> {
        self.inner.send_commands(group, commands).await
    }

    /// Waits until the batch holding this report is out (or failed).
    async fn send_report(&self, report: &Report) -> Result<(), Error> {
        let (answer, sent) = oneshot::channel();
        self.queue.send((report.clone(), answer)).map_err(|_| Error::Closed("the group's report batches".into()))?;
        match sent.await {
            Ok(result) => result.map_err(Error::Nats),
            Err(_) => Err(Error::Closed("the group's report batches".into())),
        }
    }

    async fn send_reports(&self, group: &str, reports: &[Report]) -> Result<(), Error> {
        self.inner.send_reports(group, reports).await
    }

    async fn report_inbox(&self, job_id: &str) -> Result<Inbox<Report>, Error> {
        self.inner.report_inbox(job_id).await
    }

    async fn forget_job(&self, job_id: &str) -> Result<(), Error> {
        self.inner.forget_job(job_id).await
    }
}
