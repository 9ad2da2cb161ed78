//! The refresh-views step: every file of the run is loaded, so a full run of a job that
//! reconciles deletions first marks deleted what its export no longer contained
//! (`warehouse::reconcile`), then each analytics view (`views::refresh`) gets the rows of
//! exactly the resources this run changed or deleted, before the finish ends the run.
//!
//! Reconciliation runs here rather than in the finish so that the views see its deletions as
//! this run's changes. It runs only for a `full` run whose export was complete (no error file
//! at all, and what the finish would judge `succeeded`), unnarrowed (no `_since`, `_until`,
//! `_typeFilter` or `patient`), and only over the types the export asked for.
//!
//! A view that cannot be refreshed never fails the run: the data is loaded and complete, the
//! view is derived from it. The view is left marked (`stale` or `error`) with this run still
//! pending on it, and the next refresh of any run catches it up. Running this step again (a
//! retry, start-up recovery of a `completing` run) recomputes the same rows from the
//! warehouse's current state, so it is harmless.

use std::time::Duration;

use super::{Step, SyncContext, job_of, load_run};
use crate::config::{ExportConfig, ExportLevel};
use crate::sync::{SyncError, error_chain};
use crate::views::ViewError;
use crate::views::refresh::{self, Outcome};
use crate::warehouse::reconcile::{self, Reconcile};
use crate::warehouse::runs::{self, RunRow, RunStatus};

pub(super) async fn run(ctx: &SyncContext, run_id: i64) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    if run.status != RunStatus::Completing {
        return Ok(());
    }
    // A group that gained members: their history is exported first, and this step comes
    // again once those files are loaded.
    let job = job_of(ctx, &run)?;
    if super::members::check(ctx, &job, &run).await? {
        return Ok(());
    }
    reconcile_deletions(ctx, &run).await?;
    let views = ctx.views();
    if !views.views.is_empty() {
        match refresh::refresh_for_run(&ctx.pool, &views, run_id).await {
            Ok(report) => {
                for view in &report.views {
                    match &view.outcome {
                        Outcome::Applied {
                            deleted, inserted, ..
                        } => tracing::info!(
                            view.name = %view.name,
                            rows.deleted = deleted,
                            rows.inserted = inserted,
                            duration_ms = view.duration_ms,
                            "view refreshed"
                        ),
                        Outcome::Built { rows } => tracing::info!(
                            view.name = %view.name,
                            rows,
                            duration_ms = view.duration_ms,
                            "view built"
                        ),
                        Outcome::Failed(reason) => tracing::warn!(
                            view.name = %view.name,
                            error = %reason,
                            "view not refreshed; the next refresh catches it up"
                        ),
                    }
                }
            }
            // The view state itself is out of reach: the database is away, so the step is
            // retried at the database's pace (the finish could not commit either).
            Err(ViewError::Database(e)) => return Err(SyncError::Database(e)),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "views not refreshed; the next refresh catches them up")
            }
        }
    }
    ctx.push(
        Step::Finish {
            run_id,
            seq: 0,
            attempt: 0,
        },
        Duration::ZERO,
    )
    .await
}

/// Marks deleted what a full, complete export no longer contained, when the job asks for it.
async fn reconcile_deletions(ctx: &SyncContext, run: &RunRow) -> Result<(), SyncError> {
    let job = job_of(ctx, run)?;
    if !run.full_export || !job.export.reconciles_deletes() {
        return Ok(());
    }
    if let Some(narrowed) = narrowed_by(&job.export) {
        tracing::info!(
            reason = narrowed,
            "deletions not reconciled: the export does not hold everything"
        );
        return Ok(());
    }
    let facts = runs::completeness_facts(&ctx.pool, run.id).await?;
    if facts.error_files > 0
        || super::finish::completion(&facts, &job.export, run.id).status != RunStatus::Succeeded
    {
        tracing::info!("deletions not reconciled: the export was not complete");
        return Ok(());
    }
    let session = ctx.session(&job, run.id).await?;
    let marked = reconcile::mark_missing_deleted(
        &ctx.pool,
        Reconcile {
            source: &job.name,
            run_id: run.id,
            types: &session.types,
            members_only: job.export.level == ExportLevel::Group,
        },
    )
    .await?;
    runs::deletions_reconciled(&ctx.pool, run.id, marked).await?;
    tracing::info!(
        rows.deleted = marked,
        "deletions reconciled: rows the export no longer contained are marked deleted"
    );
    Ok(())
}

/// Why a full export of `export` does not hold every resource of its types, if it does not.
fn narrowed_by(export: &ExportConfig) -> Option<&'static str> {
    if export.since.is_some() {
        Some("export.since")
    } else if export.until.is_some() {
        Some("export.until")
    } else if !export.type_filters.is_empty() {
        Some("export.type_filters")
    } else if !export.patients.is_empty() {
        Some("export.patients")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unnarrowed_export_is_reconciled() {
        assert_eq!(narrowed_by(&ExportConfig::default()), None);
        let narrowed = [
            ExportConfig {
                since: Some("2024-01-01T00:00:00Z".into()),
                ..ExportConfig::default()
            },
            ExportConfig {
                until: Some("2024-01-01T00:00:00Z".into()),
                ..ExportConfig::default()
            },
            ExportConfig {
                type_filters: vec!["Observation?status=final".into()],
                ..ExportConfig::default()
            },
            ExportConfig {
                patients: vec!["Patient/1".into()],
                ..ExportConfig::default()
            },
        ];
        for export in narrowed {
            assert!(narrowed_by(&export).is_some(), "{export:?}");
        }
    }
}
