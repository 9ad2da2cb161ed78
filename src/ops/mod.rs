//! What operators see: logging setup and the run status report.
//!
//! Reads the run tables; never changes them. Never prints a credential or a resource body.

pub mod alert;
pub mod api;
pub mod http;
pub mod metrics;
pub mod page;
pub mod report;

use std::io::Write;

use crate::config::{LogFormat, LoggingSettings};
use crate::warehouse::RunSummary;

/// Installs the global `tracing` subscriber: human or JSON lines on stderr, filtered by
/// `RUST_LOG` when set, else by `logging.level`.
pub fn init_logging(settings: &LoggingSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests, or a library user with their own subscriber) keeps the first one.
    let _ = match settings.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Writes runs as an aligned table.
pub fn write_runs_table(out: &mut impl Write, runs: &[RunSummary]) -> std::io::Result<()> {
    if runs.is_empty() {
        return writeln!(out, "no runs recorded yet");
    }
    writeln!(
        out,
        "{:>6}  {:<20}  {:<9}  {:<20}  {:>9}  {:>10}  {:>8}  {:>5}  error",
        "run", "job", "status", "started (UTC)", "duration", "resources", "rejected", "files"
    )?;
    for run in runs {
        let started = run.started_at.to_offset(time::UtcOffset::UTC);
        let started = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            started.year(),
            started.month() as u8,
            started.day(),
            started.hour(),
            started.minute(),
            started.second()
        );
        let duration = run
            .finished_at
            .map(|end| format!("{:.1}s", (end - run.started_at).as_seconds_f64()))
            .unwrap_or_else(|| "-".into());
        let error: String = run
            .error
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(100)
            .collect();
        writeln!(
            out,
            "{:>6}  {:<20}  {:<9}  {:<20}  {:>9}  {:>10}  {:>8}  {:>5}  {}",
            run.id,
            run.job,
            run.status,
            started,
            duration,
            run.resources_loaded,
            run.lines_rejected,
            run.files,
            error
        )?;
    }
    Ok(())
}
