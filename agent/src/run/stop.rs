//! The shutdown signal as every part of the agent waits for it, and the retry backoff.

use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;

const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Doubles a retry delay, up to 10 s.
pub(super) fn next_backoff(d: Duration) -> Duration {
    (d * 2).min(MAX_BACKOFF)
}

/// Cheap to clone; every clone sees the one shutdown.
#[derive(Clone)]
pub(super) struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Stops once `shutdown` resolves.
    pub(super) fn new(shutdown: impl Future<Output = ()> + Send + 'static) -> Stop {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        Stop(rx)
    }

    pub(super) async fn wait(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    /// [`wait`](Self::wait) as a future of its own, for a server's graceful shutdown.
    pub(super) async fn wait_owned(mut self) {
        self.wait().await
    }

    /// Sleeps `d`; returns true when shutdown came first.
    pub(super) async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.wait() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }

    pub(super) fn stopped(&self) -> bool {
        *self.0.borrow()
    }
}
