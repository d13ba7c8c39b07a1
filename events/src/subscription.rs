//! Following the global log: everything stored from a position, then new
//! events as they commit, in position order, each exactly once.
//!
//! Every backend's `read_all` returns position N+1 only once N is settled:
//! SQLite allocates positions inside the append's transaction; MongoDB waits
//! for a position that was taken but not yet stored, and voids it after a
//! grace period so that it can never appear later. Reading forward by
//! position therefore never skips an event that commits afterwards.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};

use crate::Envelope;
use crate::store::{Error, EventStore};

const BATCH: usize = 500;

/// Subscribes to the global log from `from` (1 = the start). `poll` bounds how
/// long a caught-up subscriber waits before looking again (stores that can
/// signal appends wake it sooner).
pub fn subscribe(store: Arc<dyn EventStore>, from: u64, poll: Duration) -> BoxStream<'static, Result<Envelope, Error>> {
    let state = (store, from.max(1), VecDeque::<Envelope>::new(), false);
    stream::unfold(state, move |(store, mut next, mut buffer, failed)| async move {
        if failed {
            return None;
        }
        loop {
            if let Some(e) = buffer.pop_front() {
                next = e.position + 1;
                return Some((Ok(e), (store, next, buffer, false)));
            }
            match store.read_all(next, BATCH).await {
                Ok(events) if events.is_empty() => store.wait_for_append(poll).await,
                Ok(events) => buffer.extend(events),
                Err(e) => return Some((Err(e), (store, next, buffer, true))),
            }
        }
    })
    .boxed()
}
