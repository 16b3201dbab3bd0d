//! Logging: a `tracing` subscriber filtered by `RUST_LOG`, human-readable or JSON, on stderr.
//!
//! Stdout is left to commands' own output (`config check` prints TOML there), so logs never mix
//! into something a script parses.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Coloured text when stderr is a terminal, for people.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The filter used when `RUST_LOG` is unset: our lifecycle events, others' warnings.
const DEFAULT_FILTER: &str = "warn,vqclip=info";

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec)
            .map_err(|e| anyhow::anyhow!("RUST_LOG = {spec:?} is not a valid log filter: {e}"))?,
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("Failed to install the log subscriber: {e}"))
}
