//! nftables announces its changes (`nft monitor`); iptables-legacy does not. So with
//! `--nftables`, and with iptables on an nf_tables host (iptables-nft), flushed or edited rules
//! are noticed at once instead of at the next periodic check.

use crate::rules::{nft_monitor_concerns, MonitorScope};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Runs `nft monitor` in this network namespace for as long as it is held (restarted when it
/// ends); each change that `scope` says may touch tweed's rules sends one `()` (coalesced while
/// unread).
pub(super) struct NftMonitor {
    task: tokio::task::JoinHandle<()>,
    pub(super) changes: mpsc::Receiver<()>,
}

impl NftMonitor {
    pub(super) fn spawn(scope: MonitorScope) -> NftMonitor {
        info!(?scope, "rule changes are watched with nft monitor");
        let (tx, changes) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            loop {
                let child = tokio::process::Command::new("nft")
                    .arg("monitor")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn();
                let mut child = match child {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(
                            "nft monitor: {e} (is the nftables package installed?); rule drift \
                             is found by the periodic check only"
                        );
                        return;
                    }
                };
                let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if nft_monitor_concerns(scope, &line) {
                        let _ = tx.try_send(());
                    }
                }
                let _ = child.wait().await;
                warn!("nft monitor ended; starting it again in 5 s");
                // What changed while it was not running is caught by the check below.
                let _ = tx.try_send(());
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        NftMonitor { task, changes }
    }
}

impl Drop for NftMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}
