use anyhow::Context;
use std::io::IsTerminal;
use tweed_agent::settings::{Settings, SettingsError};

fn main() -> anyhow::Result<()> {
    let settings = match Settings::load() {
        Ok(s) => s,
        // Usage errors, --help and --version print as clap formats them, with clap's exit status.
        Err(SettingsError::Cli(e)) => e.exit(),
        Err(e) => return Err(e.into()),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log_level)
        .with_context(|| format!("--log-level {:?}", settings.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "tweedd starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // An error (a task that died included) ends the process with a non-zero status.
    let res = rt.block_on(tweed_agent::run::run(settings, shutdown_signal()));
    // A rules check that outlived run()'s own bounded wait (an iptables behind another
    // program's xtables lock) would otherwise hold the exit for as long as it blocks.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    res?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
