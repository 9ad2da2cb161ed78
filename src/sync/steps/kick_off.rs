//! The kick-off step: take the job's one active slot (runs of a job go one at a time, oldest
//! first), choose the `_since`, delete exports earlier runs left on the server, start the
//! export and store its status URL.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::{
    BUSY_WAIT, Step, SyncContext, add_retries, is_unique_violation, job_of, load_run, queue_next,
};
use crate::bulk::ExportError;
use crate::config::JobConfig;
use crate::sync::SyncError;
use crate::warehouse::runs::{self, RunRow, RunStatus};

/// Why a queued run waits, when it does.
fn waiting_reason(moved: Result<bool, &sqlx::Error>, now: Option<RunStatus>) -> Turn {
    match moved {
        Ok(true) => Turn::Go,
        Ok(false) if now == Some(RunStatus::Queued) => {
            Turn::Wait("an older run of the job is still queued")
        }
        Ok(false) => Turn::Gone,
        Err(e) if is_unique_violation(e) => Turn::Wait("another run of the job is active"),
        Err(_) => Turn::Gone,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Turn {
    Go,
    Wait(&'static str),
    /// The run moved on meanwhile (another task kicked it off, or it was cancelled).
    Gone,
}

/// The `_since` a run exports from, and how to say it in the log: the watermark (moved back
/// by the overlap) for an incremental run, else the job's own `export.since`, else nothing.
pub(super) fn since_of(run: &RunRow, job: &JobConfig, watermark: Option<String>) -> Option<String> {
    if run.full_export {
        job.export.since.clone()
    } else {
        watermark.or_else(|| job.export.since.clone())
    }
}

pub(super) async fn run(
    ctx: &SyncContext,
    run_id: i64,
    seq: u32,
    attempt: u32,
) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    match run.status {
        // The kick-off happened; make sure the step after it was queued (a push that failed
        // after the state changed is why this task is running again).
        RunStatus::Exporting | RunStatus::Loading | RunStatus::Completing => {
            return queue_next(ctx, run_id, 0).await;
        }
        RunStatus::Queued => {
            let job = job_of(ctx, &run)?;
            let watermark = if run.full_export {
                None
            } else {
                runs::watermark(&ctx.pool, &run.job, job.export.since_overlap_seconds).await?
            };
            let since = since_of(&run, &job, watermark);
            let moved = runs::start_kick_off(&ctx.pool, run_id, since.as_deref()).await;
            let now = match &moved {
                Ok(false) => runs::status(&ctx.pool, run_id).await?,
                _ => None,
            };
            match waiting_reason(moved.as_ref().map(|m| *m), now) {
                Turn::Go => {}
                Turn::Gone => return moved.map(drop).map_err(Into::into),
                Turn::Wait(reason) => {
                    tracing::info!(reason, "waiting for the run's turn");
                    return ctx
                        .push(
                            Step::KickOff {
                                run_id,
                                seq: seq + 1,
                                attempt,
                            },
                            BUSY_WAIT,
                        )
                        .await;
                }
            }
        }
        RunStatus::KickingOff => {}
        // Finished, failed or cancelled meanwhile.
        _ => return Ok(()),
    }
    let run = runs::load(&ctx.pool, run_id).await?;
    let job = job_of(ctx, &run)?;
    let retries = Arc::new(AtomicU64::new(0));
    let result = async {
        let session = ctx.session(&job, run_id).await?;
        let bulk = session.bulk.clone().with_retry_counter(retries.clone());
        // Exports this job started before and never deleted (a failed, cancelled or killed
        // run) may hold the server's one-export-per-client slot: delete them first.
        crate::sync::delete_abandoned_exports(&ctx.pool, &bulk, &job.name, run_id, false).await;
        let request = crate::sync::export_request(&job, &session, run.since.clone());
        match bulk.kick_off(&request).await {
            Err(ExportError::Busy { .. })
                if crate::sync::delete_abandoned_exports(
                    &ctx.pool, &bulk, &job.name, run_id, true,
                )
                .await
                    > 0 =>
            {
                tracing::info!(
                    "deleted abandoned exports after the server refused a new one; trying again"
                );
                Ok::<_, SyncError>(bulk.kick_off(&request).await?)
            }
            other => Ok(other?),
        }
    }
    .await;
    add_retries(ctx, run_id, &retries).await?;
    // A failure goes to the queue handler: the retry policy says whether to try again later.
    let kick_off = result?;
    tracing::info!(
        export.status_url = %crate::transport::redacted(&kick_off.status_url),
        export.since = run.since.as_deref().unwrap_or("(full)"),
        "export started"
    );
    if runs::exporting(
        &ctx.pool,
        run_id,
        kick_off.request_url.as_str(),
        kick_off.status_url.as_str(),
    )
    .await?
    {
        queue_next(ctx, run_id, 0).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_run_goes_waits_or_finds_itself_moved_on() {
        assert_eq!(waiting_reason(Ok(true), None), Turn::Go);
        assert_eq!(
            waiting_reason(Ok(false), Some(RunStatus::Queued)),
            Turn::Wait("an older run of the job is still queued")
        );
        assert_eq!(
            waiting_reason(Ok(false), Some(RunStatus::Cancelled)),
            Turn::Gone
        );
    }
}
