//! What `fhir-sync status` and `fhir-sync runs show` print: the read model of
//! [`super::report`] as aligned tables for a person, or as JSON in the shapes the HTTP API
//! serves.
//!
//! Only formats; never queries. Shows what the report carries and nothing more: no URL query
//! strings, no rejected line contents (they may hold patient data).

use std::io::Write;

use serde::Serialize;
use time::OffsetDateTime;

use super::format::{first_line, human_bytes, human_duration, utc};
use super::report::{FileDetail, JobOverview, RunDetail, RunSummary};
use crate::views::materialise::ViewStatus;

/// `fhir-sync status --json`: `{"jobs": [...], "runs": [...], "views": [...]}`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub jobs: Vec<JobOverview>,
    pub runs: Vec<RunSummary>,
    /// The analytics views, as `GET /api/v1/views` serves them.
    pub views: Vec<ViewStatus>,
}

/// Writes the jobs table, a blank line, the runs table, then the views table if there are views.
pub fn write_status(
    out: &mut impl Write,
    status: &StatusReport,
    now: OffsetDateTime,
) -> std::io::Result<()> {
    write_jobs_table(out, &status.jobs, now)?;
    writeln!(out)?;
    write_runs_table(out, &status.runs, now)?;
    if !status.views.is_empty() {
        writeln!(out)?;
        write_views_table(out, &status.views, now)?;
    }
    Ok(())
}

/// Writes one line per analytics view: status, rows, last run applied, last refresh, error.
pub fn write_views_table(
    out: &mut impl Write,
    views: &[ViewStatus],
    now: OffsetDateTime,
) -> std::io::Result<()> {
    let rows: Vec<[String; 7]> = views
        .iter()
        .map(|v| {
            let status = if v.pending_run_ids.is_empty() {
                v.status.clone()
            } else {
                format!("{} ({} runs pending)", v.status, v.pending_run_ids.len())
            };
            [
                format!("{}.{}", v.table_schema, v.name),
                status,
                v.row_count.to_string(),
                v.last_run_id.map_or("-".into(), |r| r.to_string()),
                v.refreshed_at.map_or("never".into(), |at| {
                    format!("{} ago", human_duration((now - at).as_seconds_f64()))
                }),
                v.refresh_duration_ms
                    .map_or("-".into(), |ms| human_duration(ms as f64 / 1000.0)),
                v.error
                    .as_deref()
                    .map_or("-".into(), |e| first_line(Some(e), 60)),
            ]
        })
        .collect();
    write_table(
        out,
        &[
            "view",
            "status",
            "rows",
            "last run",
            "refreshed",
            "took",
            "error",
        ],
        &[false, false, true, true, false, true, false],
        &rows,
    )
}

/// Writes one line per job: schedule, next tick, last run and success, watermark, active run.
pub fn write_jobs_table(
    out: &mut impl Write,
    jobs: &[JobOverview],
    now: OffsetDateTime,
) -> std::io::Result<()> {
    if jobs.is_empty() {
        return writeln!(out, "no jobs configured");
    }
    let rows: Vec<[String; 7]> = jobs
        .iter()
        .map(|job| {
            let schedule = match (&job.schedule, job.enabled) {
                (_, false) => "disabled".to_string(),
                (Some(s), true) => format!("{} ({})", s.cron, s.timezone),
                (None, true) => "manual only".to_string(),
            };
            let last_run = job.last_run.as_ref().map_or("-".into(), |r| {
                format!("{} {} {}", r.id, r.status, utc(r.started_at))
            });
            let last_success = job.last_success_at.map_or("never".into(), |at| {
                format!(
                    "{} ({} ago)",
                    utc(at),
                    human_duration((now - at).as_seconds_f64())
                )
            });
            let watermark = job
                .watermark
                .as_ref()
                .map_or("-".into(), |w| w.transaction_time.clone());
            let active = job
                .active_run
                .as_ref()
                .map_or("-".into(), |r| format!("{} {}", r.id, r.status));
            [
                job.name.clone(),
                schedule,
                job.next_run_at.map_or("-".into(), utc),
                last_run,
                last_success,
                watermark,
                active,
            ]
        })
        .collect();
    write_table(
        out,
        &[
            "job",
            "schedule",
            "next run (UTC)",
            "last run",
            "last success (UTC)",
            "watermark",
            "active run",
        ],
        &[false; 7],
        &rows,
    )
}

/// Writes one line per run, newest first as given.
pub fn write_runs_table(
    out: &mut impl Write,
    runs: &[RunSummary],
    now: OffsetDateTime,
) -> std::io::Result<()> {
    let out = &mut Terminal(out);
    if runs.is_empty() {
        return writeln!(out, "no runs recorded yet");
    }
    let rows: Vec<[String; 10]> = runs
        .iter()
        .map(|run| {
            [
                run.id.to_string(),
                run.job.clone(),
                run.status.to_string(),
                run.trigger.to_string(),
                utc(run.started_at),
                human_duration(run.duration_seconds(now)),
                run.resources_loaded.to_string(),
                run.lines_rejected.to_string(),
                format!("{}/{}", run.files_loaded, run.files),
                first_line(run.error.as_deref(), 100),
            ]
        })
        .collect();
    write_table(
        out,
        &[
            "run",
            "job",
            "status",
            "trigger",
            "started (UTC)",
            "duration",
            "resources",
            "rejected",
            "files",
            "error",
        ],
        &[
            true, false, false, false, false, true, true, true, true, false,
        ],
        &rows,
    )
}

/// Writes one run in detail: state, timings, export, counts, the error, then its files,
/// export issues and rejected-line summary.
pub fn write_run_detail(
    out: &mut impl Write,
    detail: &RunDetail,
    now: OffsetDateTime,
) -> std::io::Result<()> {
    // Errors, export issues and progress are server text: no escape sequence reaches the
    // terminal.
    let out = &mut Terminal(out);
    let run = &detail.run;
    writeln!(
        out,
        "run {} of job {}: {} ({} run{})",
        run.id,
        run.job,
        run.status,
        run.trigger,
        if run.full_export { ", full export" } else { "" }
    )?;
    let field = |out: &mut dyn Write, name: &str, value: String| -> std::io::Result<()> {
        writeln!(out, "  {name:<18} {value}")
    };
    if let Some(tick) = run.scheduled_for {
        field(out, "scheduled for", utc(tick))?;
    }
    field(out, "started", utc(run.started_at))?;
    field(out, "finished", run.finished_at.map_or("-".into(), utc))?;
    let duration = human_duration(run.duration_seconds(now));
    field(
        out,
        "duration",
        if run.is_active() {
            format!("{duration} so far")
        } else {
            duration
        },
    )?;
    field(
        out,
        "since",
        run.since.clone().unwrap_or_else(|| "- (everything)".into()),
    )?;
    field(
        out,
        "transactionTime",
        run.transaction_time.clone().unwrap_or_else(|| "-".into()),
    )?;
    if let Some(progress) = &run.progress {
        field(out, "export progress", progress.clone())?;
    }
    if let Some(url) = &detail.status_url {
        field(out, "status URL", url.clone())?;
    }
    if let Some(deleted) = detail.export_deleted_at {
        field(out, "export deleted", utc(deleted))?;
    }
    field(
        out,
        "resources",
        format!(
            "{} loaded, {} lines rejected, {} export errors",
            run.resources_loaded, run.lines_rejected, run.export_errors
        ),
    )?;
    field(
        out,
        "files",
        format!(
            "{}/{} loaded, {}",
            run.files_loaded,
            run.files,
            human_bytes(run.bytes)
        ),
    )?;
    field(out, "retries", run.retries.to_string())?;
    if let Some(error) = &run.error {
        let kind = match run.error_retryable {
            Some(true) => " (may pass on a later run)",
            Some(false) => " (needs an operator)",
            None => "",
        };
        let mut lines = error.lines();
        field(
            out,
            "error",
            format!("{}{kind}", lines.next().unwrap_or("")),
        )?;
        for more in lines {
            writeln!(out, "  {:<18} {more}", "")?;
        }
    }
    if let Some(hint) = &run.hint {
        field(out, "hint", hint.clone())?;
    }

    writeln!(out)?;
    if detail.files.is_empty() {
        writeln!(out, "files: none ({})", detail.no_files_note())?;
    } else {
        writeln!(out, "files:")?;
        write_files_table(out, &detail.files)?;
    }
    if !detail.export_issues.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "export issues (the server's OperationOutcomes, first {}):",
            super::report::ISSUE_LIMIT
        )?;
        let rows: Vec<[String; 5]> = detail
            .export_issues
            .iter()
            .map(|i| {
                [
                    i.file_id.to_string(),
                    i.line_number.to_string(),
                    i.severity.clone().unwrap_or_else(|| "-".into()),
                    i.code.clone().unwrap_or_else(|| "-".into()),
                    first_line(i.diagnostics.as_deref(), 200),
                ]
            })
            .collect();
        write_table(
            out,
            &["file", "line", "severity", "code", "diagnostics"],
            &[true, true, false, false, false],
            &rows,
        )?;
    }
    if !detail.rejects.is_empty() {
        writeln!(out)?;
        writeln!(out, "rejected lines (contents in fhir_sync.rejected_line):")?;
        let rows: Vec<[String; 4]> = detail
            .rejects
            .iter()
            .map(|r| {
                [
                    r.file_id.to_string(),
                    r.lines.to_string(),
                    r.first_line.to_string(),
                    r.reason.clone(),
                ]
            })
            .collect();
        write_table(
            out,
            &["file", "lines", "first line", "reason"],
            &[true, true, true, false],
            &rows,
        )?;
    }
    Ok(())
}

fn write_files_table(out: &mut impl Write, files: &[FileDetail]) -> std::io::Result<()> {
    let rows: Vec<[String; 11]> = files
        .iter()
        .map(|f| {
            [
                f.id.to_string(),
                f.kind.as_str().to_string(),
                f.resource_type.clone(),
                f.status.to_string(),
                human_bytes(f.bytes),
                match f.manifest_count {
                    Some(count) => format!("{}/{count}", f.lines_committed),
                    None => f.lines_committed.to_string(),
                },
                f.resources_loaded.to_string(),
                f.lines_rejected.to_string(),
                f.attempts.to_string(),
                f.link_refreshes.to_string(),
                first_line(f.error.as_deref(), 120),
            ]
        })
        .collect();
    write_table(
        out,
        &[
            "file",
            "kind",
            "type",
            "status",
            "bytes",
            "lines",
            "loaded",
            "rejected",
            "attempts",
            "refreshes",
            "error",
        ],
        &[
            true, false, false, false, true, true, true, true, true, true, false,
        ],
        &rows,
    )
}

/// Writes a header and rows, each column as wide as its widest cell; `right[i]` right-aligns
/// column `i` (numbers). Trailing blanks are trimmed.
fn write_table<const N: usize>(
    out: &mut impl Write,
    header: &[&str; N],
    right: &[bool; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| -> String {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            if right[i] {
                text.push_str(&format!("{cell:>w$}", w = widths[i]));
            } else {
                text.push_str(&format!("{cell:<w$}", w = widths[i]));
            }
        }
        text.trim_end().to_string()
    };
    writeln!(out, "{}", line(*header))?;
    for row in rows {
        writeln!(out, "{}", line(row.each_ref().map(String::as_str)))?;
    }
    Ok(())
}

/// A writer for a terminal: control characters other than newline and tab (ANSI escapes
/// among them) are dropped from whatever passes through. `write!` hands it whole `str`
/// fragments, so each write is valid UTF-8.
struct Terminal<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Terminal<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0
            .write_all(crate::untrusted::for_terminal(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::warehouse::runs::RunStatus;

    fn run(id: i64, status: RunStatus, error: Option<&str>) -> RunSummary {
        RunSummary {
            trigger: crate::warehouse::runs::Trigger::Schedule,
            finished_at: Some(datetime!(2026-11-29 02:03:05 UTC)),
            updated_at: datetime!(2026-11-29 02:03:05 UTC),
            resources_loaded: 3600,
            lines_rejected: 2,
            retries: 1,
            files: 12,
            files_loaded: 12,
            bytes: 1_500_000,
            error: error.map(str::to_string),
            ..RunSummary::for_test(id, "epic", status, datetime!(2026-11-29 02:00:00 UTC))
        }
    }

    #[test]
    fn durations_bytes_and_lines_read_well() {
        let cases = [
            (0.42, "0.4s"),
            (59.94, "59.9s"),
            (185.0, "3m 05s"),
            (7620.0, "2h 07m"),
            (3.0 * 86_400.0 + 4.0 * 3600.0 + 59.0, "3d 4h"),
            (-1.0, "0.0s"),
        ];
        for (seconds, expected) in cases {
            assert_eq!(human_duration(seconds), expected, "{seconds}");
        }
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(12_340_000), "12.3 MB");
        assert_eq!(first_line(Some("one\ntwo"), 10), "one");
        assert_eq!(first_line(Some("abcdef"), 4), "abc…");
        assert_eq!(first_line(None, 4), "");
    }

    #[test]
    fn the_runs_table_aligns_and_shows_the_first_line_of_an_error() {
        let runs = [
            run(
                12,
                RunStatus::Failed,
                Some("export failed: the server said: try later\nmore detail"),
            ),
            run(9, RunStatus::Succeeded, None),
        ];
        let mut out = Vec::new();
        write_runs_table(&mut out, &runs, datetime!(2026-11-29 03:00:00 UTC)).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("run  job   status"), "{text}");
        assert!(
            lines[1].starts_with(
                " 12  epic  failed     schedule  2026-11-29 02:00:00    3m 05s       3600"
            ),
            "{text}"
        );
        assert!(
            lines[1].ends_with("12/12  export failed: the server said: try later"),
            "{text}"
        );
        assert!(!text.contains("more detail"));
        assert!(lines[2].ends_with("12/12"), "no trailing blanks: {text:?}");
    }

    #[test]
    fn a_failed_run_shows_its_hint_below_the_error() {
        let mut run = run(
            9,
            RunStatus::Failed,
            Some("export failed: the export was not ready after 5 s"),
        );
        run.hint = Some("the server needs longer: raise export.timeout_seconds".into());
        let detail = RunDetail::for_test(run);
        let mut out = Vec::new();
        write_run_detail(&mut out, &detail, datetime!(2026-11-29 03:00:00 UTC)).unwrap();
        let text = String::from_utf8(out).unwrap();
        let error = text.find("error").unwrap();
        let hint = text
            .find("hint               the server needs longer: raise export.timeout_seconds")
            .unwrap_or_else(|| panic!("{text}"));
        assert!(error < hint, "{text}");
    }

    #[test]
    fn a_run_that_failed_before_exporting_says_so() {
        let detail = RunDetail::for_test(RunSummary {
            files: 0,
            files_loaded: 0,
            ..run(3, RunStatus::Failed, Some("token request refused"))
        });
        let mut out = Vec::new();
        write_run_detail(&mut out, &detail, datetime!(2026-11-29 03:00:00 UTC)).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("files: none (the run ended before an export was started)"),
            "{text}"
        );
        assert!(!text.contains("has not finished"), "{text}");
    }

    #[test]
    fn empty_tables_say_so() {
        let mut out = Vec::new();
        write_status(
            &mut out,
            &StatusReport {
                jobs: vec![],
                runs: vec![],
                views: vec![],
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "no jobs configured\n\nno runs recorded yet\n"
        );
    }

    #[test]
    fn the_views_table_shows_pending_runs_and_the_first_line_of_an_error() {
        let now = datetime!(2026-11-29 03:00:00 UTC);
        let view = |name: &str, status: &str, pending: Vec<i64>, error: Option<&str>| ViewStatus {
            name: name.into(),
            table_schema: "sof".into(),
            resource_type: "Patient".into(),
            status: status.into(),
            row_count: 1200,
            last_run_id: Some(7),
            pending_run_ids: pending,
            built_at: Some(now),
            refreshed_at: Some(now - time::Duration::minutes(5)),
            refresh_duration_ms: Some(1500),
            error: error.map(str::to_string),
        };
        let views = [
            view("patient", "fresh", vec![], None),
            view(
                "phone",
                "error",
                vec![8],
                Some("view \"phone\" column \"phone\": several values\nmore"),
            ),
        ];
        let mut out = Vec::new();
        write_views_table(&mut out, &views, now).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("view"), "{text}");
        assert!(lines[1].starts_with("sof.patient  fresh"), "{text}");
        assert!(
            lines[1].contains("1200") && lines[1].contains("5m"),
            "{text}"
        );
        assert!(lines[2].contains("error (1 runs pending)"), "{text}");
        assert!(lines[2].ends_with("several values"), "{text}");
    }
}
