//! The watch on everyone's leases, as a task that feeds the main loop: a listing, then a watch
//! from the next revision; on errors it reconnects with backoff from the last revision seen, and
//! on compaction it lists again so the lease table can diff what it missed.

use super::report::Report;
use super::stop::{next_backoff, Stop};
use super::AgentError;
use crate::registry::{LeaseWatch, Registry, RegistryError, Snapshot, WatchEvent};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

/// What the watch task hands the main loop.
pub(super) enum Feed {
    /// With when the watch task got them: the main loop may be busy with something else, and
    /// the wait counts towards the event's latency.
    Events(Vec<WatchEvent>, Instant),
    Resync(Snapshot),
    /// Whether a watch stream is established (readiness).
    Live(bool),
}

/// The first listing, retried every second until it succeeds; `None` when stopped first.
pub(super) async fn list(registry: &Registry, stop: &mut Stop) -> Option<Snapshot> {
    loop {
        match registry.list_leases().await {
            Ok(s) => return Some(s),
            Err(e) => {
                warn!("listing leases: {e}");
                if stop.sleep(Duration::from_secs(1)).await {
                    return None;
                }
            }
        }
    }
}

/// The running watch task. It only ends when the main loop drops this, or when it dies.
pub(super) struct Feeds {
    rx: mpsc::Receiver<Feed>,
    task: JoinHandle<()>,
}

impl Feeds {
    /// Watches from `revision` (the listing's revision + 1).
    pub(super) fn spawn(registry: Arc<Registry>, revision: i64, report: Report) -> Feeds {
        let (tx, rx) = mpsc::channel(64);
        Feeds {
            rx,
            task: tokio::spawn(follow(registry, revision, tx, report)),
        }
    }

    /// The next feed; an error when the task died, naming why.
    pub(super) async fn next(&mut self) -> Result<Feed, AgentError> {
        match self.rx.recv().await {
            Some(f) => Ok(f),
            // The task holds the only sender: it ended.
            None => Err(AgentError::task_died("lease watch", (&mut self.task).await)),
        }
    }
}

impl Drop for Feeds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(registry: Arc<Registry>, start: i64, tx: mpsc::Sender<Feed>, report: Report) {
    let mut next = start;
    let mut backoff = Duration::from_millis(200);
    let mut first = true;
    loop {
        if !first {
            report.watch_reconnect();
        }
        first = false;
        let mut w: LeaseWatch = match registry.watch(next).await {
            Ok(w) => {
                let _ = tx.send(Feed::Live(true)).await;
                w
            }
            Err(e) => {
                down(&report, &tx, &mut backoff, "watch", e).await;
                continue;
            }
        };
        loop {
            match w.next().await {
                Ok(events) => {
                    let received = Instant::now();
                    backoff = Duration::from_millis(200);
                    if let Some(l) = events.last() {
                        next = l.revision() + 1;
                    }
                    if tx.send(Feed::Events(events, received)).await.is_err() {
                        return;
                    }
                }
                Err(RegistryError::Compacted {
                    requested,
                    compacted,
                }) => {
                    warn!(requested, compacted, "watch history compacted; re-listing");
                    match registry.list_leases().await {
                        Ok(snap) => {
                            next = snap.revision + 1;
                            if tx.send(Feed::Resync(snap)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => warn!("re-list after compaction: {e}"),
                    }
                    break;
                }
                Err(e) => {
                    down(&report, &tx, &mut backoff, "watch broke", e).await;
                    break;
                }
            }
        }
    }
}

/// The watch is down: counted, reported as not live, then a backoff before the next attempt.
async fn down(
    report: &Report,
    tx: &mpsc::Sender<Feed>,
    backoff: &mut Duration,
    what: &str,
    e: RegistryError,
) {
    report.watch_failed(what, &e, *backoff);
    let _ = tx.send(Feed::Live(false)).await;
    tokio::time::sleep(*backoff).await;
    *backoff = next_backoff(*backoff);
}
