//! Live progress of one run for a person at a terminal: a line for the export phase (status,
//! the server's `X-Progress`, files loaded) and a bar per file being loaded (type, lines of the
//! manifest's count, rate). `fhir-sync run` shows it only when stderr is a terminal; elsewhere
//! the log lines are the record.
//!
//! It reads the run's rows on a short tick (per-file counters move once per committed batch,
//! so a faster feed would show nothing new) and never changes them. Log lines written while
//! bars are on screen go through [`LogWriter`], which lifts the bars, prints the line and draws
//! them again, so neither garbles the other.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;

use super::report::{self, FileDetail, RunSummary};
use crate::warehouse::runs::{FileStatus, RunStatus};

/// How often the run's rows are read while bars are shown.
pub const REFRESH: Duration = Duration::from_millis(250);

/// The bars on screen, if any; log lines are printed around them.
static ACTIVE: Mutex<Option<MultiProgress>> = Mutex::new(None);

fn active() -> Option<MultiProgress> {
    // A poisoned lock only means a log line panicked mid-write; the value is still usable.
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn set_active(multi: Option<MultiProgress>) {
    *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = multi;
}

/// Where `tracing` output goes: stderr, printed above the progress bars while they are shown.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer writes one whole event per call, so lifting the bars once per write
        // keeps every line intact.
        match active() {
            Some(multi) => multi.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The bars of one run.
pub struct RunProgress {
    multi: MultiProgress,
    phase: ProgressBar,
    files: HashMap<i64, ProgressBar>,
}

impl RunProgress {
    /// Bars drawn to `target` (`ProgressDrawTarget::stderr()` for a person); log lines are
    /// routed around them until [`RunProgress::finish`].
    pub fn new(run_id: i64, target: ProgressDrawTarget) -> RunProgress {
        let multi = MultiProgress::with_draw_target(target);
        let phase = multi.add(ProgressBar::new_spinner());
        phase.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {msg} [{elapsed}]")
                .expect("a valid template"),
        );
        phase.set_prefix(format!("run {run_id}:"));
        phase.enable_steady_tick(Duration::from_millis(120));
        set_active(Some(multi.clone()));
        RunProgress {
            multi,
            phase,
            files: HashMap::new(),
        }
    }

    /// Shows the run and its files as read now: a bar for each file being loaded; a file that
    /// is done loses its bar (its "file loaded" log line records it).
    pub fn update(&mut self, run: &RunSummary, files: &[FileDetail]) {
        self.phase.set_message(phase_message(run, files));
        for file in files {
            let bar = self.files.get(&file.id);
            match (file.status, bar) {
                (FileStatus::Loading, None) => {
                    let bar = self.multi.add(file_bar(file));
                    bar.set_position(file.lines_committed.max(0) as u64);
                    self.files.insert(file.id, bar);
                }
                (FileStatus::Loading, Some(bar)) => {
                    bar.set_position(file.lines_committed.max(0) as u64)
                }
                (_, Some(_)) => {
                    if let Some(bar) = self.files.remove(&file.id) {
                        bar.finish_and_clear();
                        self.multi.remove(&bar);
                    }
                }
                (_, None) => {}
            }
        }
    }

    /// The phase line's text and each shown file bar's prefix and position, for tests.
    pub fn snapshot(&self) -> (String, Vec<(String, u64, Option<u64>)>) {
        let mut files: Vec<_> = self
            .files
            .values()
            .map(|bar| (bar.prefix(), bar.position(), bar.length()))
            .collect();
        files.sort();
        (self.phase.message(), files)
    }

    /// Takes the bars off the screen and prints the phase line's last state once.
    pub fn finish(self) {
        for bar in self.files.values() {
            bar.finish_and_clear();
        }
        let last = format!("{} {}", self.phase.prefix(), self.phase.message());
        self.phase.finish_and_clear();
        let _ = self.multi.println(last);
        let _ = self.multi.clear();
        set_active(None);
    }
}

impl Drop for RunProgress {
    fn drop(&mut self) {
        // Whatever happens to the bars, log lines must not keep waiting on them.
        set_active(None);
    }
}

fn file_bar(file: &FileDetail) -> ProgressBar {
    let prefix = match file.kind.as_str() {
        "output" => format!("{} #{}", file.resource_type, file.id),
        kind => format!("{} {kind} #{}", file.resource_type, file.id),
    };
    let bar = match file.manifest_count {
        Some(count) if count > 0 => {
            let bar = ProgressBar::new(count as u64);
            bar.set_style(
                lines_style("  {prefix:<26} [{bar:30}] {human_pos}/{human_len} lines  {rate}")
                    .progress_chars("=> "),
            );
            bar
        }
        // Without the manifest's count the size is unknown until the file ends.
        _ => {
            let bar = ProgressBar::no_length();
            bar.set_style(
                ProgressStyle::with_template(
                    "  {prefix:<26} {spinner} {human_pos} lines  {per_sec}",
                )
                .expect("a valid template"),
            );
            bar
        }
    };
    bar.set_prefix(prefix);
    bar
}

/// A file bar's style; `{rate}` is whole lines per second (indicatif's own rate keeps four
/// decimals).
fn lines_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("a valid template")
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} lines/s", state.per_sec());
            },
        )
}

/// The phase line: what the run is doing, in words.
pub fn phase_message(run: &RunSummary, files: &[FileDetail]) -> String {
    match run.status {
        RunStatus::Exporting => match run.progress.as_deref().filter(|p| !p.is_empty()) {
            Some(progress) => format!("exporting (server says: {progress})"),
            None => "exporting (waiting for the server)".into(),
        },
        RunStatus::Loading | RunStatus::Completing | RunStatus::Succeeded | RunStatus::Partial => {
            let loaded = files
                .iter()
                .filter(|f| f.status == FileStatus::Loaded)
                .count();
            let resources: i64 = files.iter().map(|f| f.resources_loaded).sum();
            let rejected: i64 = files.iter().map(|f| f.lines_rejected).sum();
            let mut text = format!(
                "{}: {loaded}/{} files, {resources} resources loaded",
                run.status,
                files.len()
            );
            if rejected > 0 {
                text.push_str(&format!(", {rejected} lines rejected"));
            }
            text
        }
        RunStatus::Failed | RunStatus::Cancelled => {
            let reason = run.error.as_deref().and_then(|e| e.lines().next());
            format!("{}: {}", run.status, reason.unwrap_or("no reason recorded"))
        }
        other => other.as_str().replace('_', " "),
    }
}

/// Shows the run's progress on `target` until `stop` is cancelled, then shows its final state
/// once more and takes the bars away. A failed read is skipped: the display must never be the
/// reason a run fails.
pub async fn watch(pool: PgPool, run_id: i64, target: ProgressDrawTarget, stop: CancellationToken) {
    let mut progress = RunProgress::new(run_id, target);
    loop {
        let stopping = stop.is_cancelled();
        match read(&pool, run_id).await {
            Ok(Some((run, files))) => progress.update(&run, &files),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(run.id = run_id, error = %e, "cannot read the run's progress")
            }
        }
        if stopping {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
    progress.finish();
}

async fn read(pool: &PgPool, run_id: i64) -> sqlx::Result<Option<(RunSummary, Vec<FileDetail>)>> {
    let Some(run) = report::run(pool, run_id).await? else {
        return Ok(None);
    };
    let files = report::run_files(pool, run_id).await?;
    Ok(Some((run, files)))
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;

    fn run(status: RunStatus) -> RunSummary {
        RunSummary::for_test(3, "epic", status, OffsetDateTime::now_utc())
    }

    fn file(id: i64, status: FileStatus, count: Option<i64>, committed: i64) -> FileDetail {
        FileDetail {
            id,
            kind: crate::warehouse::FileKind::Output,
            resource_type: "Patient".into(),
            url: "https://ehr.example/files/1.ndjson".into(),
            manifest_count: count,
            status,
            bytes: 0,
            lines_committed: committed,
            resources_loaded: committed,
            lines_rejected: 0,
            attempts: 1,
            link_refreshes: 0,
            started_at: None,
            finished_at: None,
            error: None,
        }
    }

    #[test]
    fn the_phase_line_says_what_the_run_does() {
        let mut exporting = run(RunStatus::Exporting);
        assert_eq!(
            phase_message(&exporting, &[]),
            "exporting (waiting for the server)"
        );
        exporting.progress = Some("45% done".into());
        assert_eq!(
            phase_message(&exporting, &[]),
            "exporting (server says: 45% done)"
        );
        let files = [
            file(1, FileStatus::Loaded, Some(10), 10),
            file(2, FileStatus::Loading, None, 4),
        ];
        assert_eq!(
            phase_message(&run(RunStatus::Loading), &files),
            "loading: 1/2 files, 14 resources loaded"
        );
        let mut failed = run(RunStatus::Failed);
        failed.error = Some("export failed: the server said no\nsecond line".into());
        assert_eq!(
            phase_message(&failed, &[]),
            "failed: export failed: the server said no"
        );
        assert_eq!(
            phase_message(&run(RunStatus::KickingOff), &[]),
            "kicking off"
        );
    }

    #[test]
    fn a_bar_follows_each_file_while_it_loads() {
        let mut progress = RunProgress::new(3, ProgressDrawTarget::hidden());
        progress.update(
            &run(RunStatus::Loading),
            &[
                file(1, FileStatus::Loading, Some(500), 0),
                file(2, FileStatus::Pending, None, 0),
            ],
        );
        progress.update(
            &run(RunStatus::Loading),
            &[
                file(1, FileStatus::Loading, Some(500), 250),
                file(2, FileStatus::Loading, None, 40),
            ],
        );
        let (phase, bars) = progress.snapshot();
        assert_eq!(phase, "loading: 0/2 files, 290 resources loaded");
        assert_eq!(
            bars,
            vec![
                ("Patient #1".to_string(), 250, Some(500)),
                ("Patient #2".to_string(), 40, None),
            ]
        );
        progress.update(
            &run(RunStatus::Loading),
            &[
                file(1, FileStatus::Loaded, Some(500), 500),
                file(2, FileStatus::Loading, None, 90),
            ],
        );
        let (_, bars) = progress.snapshot();
        assert_eq!(bars, vec![("Patient #2".to_string(), 90, None)]);
        progress.finish();
        assert!(active().is_none(), "log lines no longer wait on bars");
    }
}
