//! The `chatcache` binary: `chatcache --config FILE`, or `--check-config FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use chatcache::config::{Config, LogFormat};
use clap::Parser;
use tracing_subscriber::{reload, EnvFilter};

/// Sidecar proxy cache for coderd's chat message stream.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The TOML config file; without it, embedded defaults plus CHATCACHE_* variables.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate FILE, print the effective config (secrets redacted) and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = cli.check_config {
        return match Config::load(&path) {
            Ok(config) => {
                print!("{}", config.redacted_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chatcache: {e}");
                ExitCode::from(2)
            }
        };
    }
    let config = match &cli.config {
        Some(path) => Config::load(path),
        None => Config::from_env(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chatcache: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::new(&config.log_level);
    let (filter, reload_handle) = reload::Layer::new(filter);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json())
            .init(),
        LogFormat::Text => {
            // Colours only on a terminal: files and log collectors get plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
            registry
                .with(tracing_subscriber::fmt::layer().with_ansi(ansi))
                .init()
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatcache: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, cli.config, reload_handle))
}

type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

async fn run(config: Config, path: Option<PathBuf>, filter: FilterHandle) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let running = match chatcache::start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let (Ok(mut term), Ok(mut hup), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&running.app, path.as_deref(), &filter),
        }
    }
    tracing::info!("shutting down: closing streams with 1001 and draining requests");
    running.app.shutdown.send_replace(true);
    let grace = running.app.config().shutdown_grace();
    let deadline = tokio::time::Instant::now() + grace;
    let _ = tokio::time::timeout_at(deadline, running.proxy).await;
    // Streams are told to go at once; give their close frames time to leave.
    while running.app.metrics.subscribers.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tracing::info!("bye");
    ExitCode::SUCCESS
}

fn reload(app: &chatcache::App, path: Option<&std::path::Path>, filter: &FilterHandle) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP ignored: started without --config");
        return;
    };
    match Config::load(path) {
        Ok(new) => {
            if let Err(e) = filter.modify(|f| *f = EnvFilter::new(&new.log_level)) {
                tracing::warn!(error = %e, "cannot change the log level");
            }
            let ignored = app.reload(new);
            if !ignored.is_empty() {
                tracing::warn!(fields = ?ignored, "changed fields need a restart; kept old values");
            }
            tracing::info!(config = %path.display(), "config reloaded");
        }
        Err(e) => tracing::error!(error = %e, "config reload failed; keeping the running config"),
    }
}
