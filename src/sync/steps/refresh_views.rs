//! The refresh-views step: every file of the run is loaded, so each analytics view
//! (`views::refresh`) gets the rows of exactly the resources this run changed or deleted,
//! before the finish marks the run succeeded.
//!
//! A view that cannot be refreshed never fails the run: the data is loaded and complete, the
//! view is derived from it. The view is left marked (`stale` or `error`) with this run still
//! pending on it, and the next refresh of any run catches it up. Running this step again (a
//! retry, start-up recovery of a `completing` run) recomputes the same rows from the
//! warehouse's current state, so it is harmless.

use std::time::Duration;

use super::{Step, SyncContext, load_run};
use crate::sync::{SyncError, error_chain};
use crate::views::ViewError;
use crate::views::refresh::{self, Outcome};
use crate::warehouse::runs::RunStatus;

pub(super) async fn run(ctx: &SyncContext, run_id: i64) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    if run.status != RunStatus::Completing {
        return Ok(());
    }
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
