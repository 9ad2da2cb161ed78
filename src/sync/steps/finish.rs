//! The finish step: every file is loaded (and the views refreshed), so the export is deleted
//! on the server (a failure there loses nothing and is only logged), then the run ends in one
//! transaction: `succeeded` with the watermark advanced, or `partial` when the export was not
//! complete, with the watermark held unless the job says otherwise.
//!
//! Completeness is judged here, before the watermark can move, from what the run recorded:
//! error files in the manifest that report failures (the server failed to export some
//! resources; error files of warnings only, such as a lenient server's notes on parameters it
//! ignored, do not count), a full export
//! that listed no files at all (what a mistyped `group_id` looks like), and the job's optional
//! Patient-drop gate. A partial run's data is real and stays loaded; only the watermark waits,
//! so the next incremental run asks again from the last complete run's transactionTime.

use super::{SyncContext, job_of, load_run};
use crate::config::ExportConfig;
use crate::sync::{SyncError, error_chain};
use crate::warehouse::runs::{self, CompletenessFacts, Completion, RunStatus};

pub(super) async fn run(ctx: &SyncContext, run_id: i64) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    if run.status != RunStatus::Completing {
        return Ok(());
    }
    let job = job_of(ctx, &run)?;
    if let Some(status_url) = run
        .status_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
    {
        let deleted = match ctx.session(&job, run_id).await {
            Ok(session) => session
                .bulk
                .delete(&status_url)
                .await
                .map_err(SyncError::from),
            Err(e) => Err(e),
        };
        match deleted {
            Ok(()) => runs::export_deleted(&ctx.pool, run_id).await?,
            Err(e) => match &e {
                // Recorded once: later runs' clean-up will not ask again.
                SyncError::Export(refusal) if refusal.refused_for_good().is_some() => {
                    let status = refusal.refused_for_good().unwrap_or(405);
                    crate::sync::record_delete_refused(&ctx.pool, run_id, status).await;
                }
                _ => {
                    tracing::warn!(error = %error_chain(&e), "could not delete the finished export on the server")
                }
            },
        }
    }
    let facts = runs::completeness_facts(&ctx.pool, run_id).await?;
    let end = completion(&facts, &job.export, run_id);
    if runs::complete(&ctx.pool, run_id, &end).await? {
        ctx.forget_session(run_id).await;
        match &end.error {
            None => tracing::info!("run succeeded"),
            Some(reason) => tracing::warn!(
                reason = %reason,
                watermark.advanced = end.advance_watermark,
                "run partial: the export was not complete"
            ),
        }
    }
    Ok(())
}

/// How a run whose files all loaded ends, given what it recorded: every reason it is not
/// complete, or `succeeded`.
pub(super) fn completion(
    facts: &CompletenessFacts,
    export: &ExportConfig,
    run_id: i64,
) -> Completion {
    let mut reasons = Vec::new();
    let mut hints = Vec::new();
    if facts.failing_error_files > 0 {
        reasons.push(format!(
            "the export reported {} error file{}",
            facts.failing_error_files,
            if facts.failing_error_files == 1 {
                ""
            } else {
                "s"
            }
        ));
        hints.push(format!(
            "see the export issues of `fhir-sync runs show {run_id}` (fhir_sync.export_error); \
             the next incremental run asks again from the last complete run"
        ));
    }
    if facts.full_export && facts.output_files == 0 && facts.error_files == 0 {
        reasons.push("the full export listed no files".to_string());
        hints.push(
            "check export.level and export.group_id: a group or server with no data looks \
             exactly like this"
                .to_string(),
        );
    }
    if let (true, Some(limit), Some(previous)) = (
        facts.full_export,
        export.max_patient_drop_percent,
        facts.previous_full_patients,
    ) && let Some(dropped) = drop_percent(previous, facts.patients)
        && dropped > limit
    {
        reasons.push(format!(
            "the full export has {} Patients, {dropped:.1}% fewer than the previous full run's {previous} \
             (export.max_patient_drop_percent = {limit})",
            facts.patients
        ));
        hints.push(
            "check the server's cohort; if the drop is real, raise export.max_patient_drop_percent \
             for one run"
                .to_string(),
        );
    }
    if reasons.is_empty() {
        return Completion::succeeded();
    }
    let advance = export.advance_watermark_on_partial;
    Completion {
        status: RunStatus::Partial,
        error: Some(format!(
            "{}; the watermark was {}",
            reasons.join("; "),
            if advance {
                "advanced anyway (export.advance_watermark_on_partial)"
            } else {
                "not advanced"
            }
        )),
        hint: Some(hints.join("; ")),
        advance_watermark: advance,
    }
}

/// By how many percent `now` is below `before` (`None` when it is not below, or there was
/// nothing before).
fn drop_percent(before: i64, now: i64) -> Option<f64> {
    (before > 0 && now < before).then(|| (before - now) as f64 * 100.0 / before as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> CompletenessFacts {
        CompletenessFacts {
            full_export: true,
            output_files: 4,
            error_files: 0,
            failing_error_files: 0,
            patients: 100,
            previous_full_patients: Some(100),
        }
    }

    fn job(drop: Option<f64>, advance: bool) -> ExportConfig {
        ExportConfig {
            max_patient_drop_percent: drop,
            advance_watermark_on_partial: advance,
            ..ExportConfig::default()
        }
    }

    #[test]
    fn a_complete_export_succeeds() {
        assert_eq!(
            completion(&facts(), &job(Some(10.0), false), 1),
            Completion::succeeded()
        );
    }

    #[test]
    fn error_files_make_a_partial_run_that_holds_the_watermark() {
        let end = completion(
            &CompletenessFacts {
                error_files: 12,
                failing_error_files: 12,
                full_export: false,
                ..facts()
            },
            &job(None, false),
            7,
        );
        assert_eq!(end.status, RunStatus::Partial);
        assert!(!end.advance_watermark);
        let error = end.error.unwrap();
        assert!(
            error.starts_with("the export reported 12 error files"),
            "{error}"
        );
        assert!(end.hint.unwrap().contains("fhir-sync runs show 7"));
    }

    #[test]
    fn the_job_may_let_a_partial_run_move_the_watermark() {
        let end = completion(
            &CompletenessFacts {
                error_files: 1,
                failing_error_files: 1,
                ..facts()
            },
            &job(None, true),
            1,
        );
        assert_eq!(end.status, RunStatus::Partial);
        assert!(end.advance_watermark);
    }

    #[test]
    fn error_files_of_warnings_only_do_not_hold_the_watermark() {
        let warned = CompletenessFacts {
            error_files: 1,
            ..facts()
        };
        assert_eq!(
            completion(&warned, &job(None, false), 1),
            Completion::succeeded()
        );
    }

    #[test]
    fn an_empty_full_export_is_flagged_an_empty_incremental_one_is_not() {
        let empty = CompletenessFacts {
            output_files: 0,
            patients: 0,
            previous_full_patients: None,
            ..facts()
        };
        let end = completion(&empty, &job(None, false), 1);
        assert_eq!(end.status, RunStatus::Partial);
        assert!(end.hint.unwrap().contains("export.group_id"));
        let incremental = CompletenessFacts {
            full_export: false,
            ..empty
        };
        assert_eq!(
            completion(&incremental, &job(None, false), 1),
            Completion::succeeded()
        );
    }

    #[test]
    fn the_patient_gate_holds_only_past_its_limit_and_only_for_full_runs() {
        let dropped = |patients, full| CompletenessFacts {
            patients,
            full_export: full,
            ..facts()
        };
        let gate = job(Some(10.0), false);
        assert_eq!(
            completion(&dropped(90, true), &gate, 1).status,
            RunStatus::Succeeded
        );
        let end = completion(&dropped(89, true), &gate, 1);
        assert_eq!(end.status, RunStatus::Partial);
        assert!(end.error.unwrap().contains("11.0% fewer"));
        assert_eq!(
            completion(&dropped(50, false), &gate, 1).status,
            RunStatus::Succeeded
        );
        assert_eq!(
            completion(&dropped(50, true), &job(None, false), 1).status,
            RunStatus::Succeeded,
            "no gate unless the job sets one"
        );
        assert_eq!(drop_percent(0, 0), None);
        assert_eq!(drop_percent(10, 12), None);
    }
}
