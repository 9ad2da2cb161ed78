//! The finish step: every file is loaded, so the export is deleted on the server (a failure
//! there loses nothing and is only logged), then the run is marked succeeded and the
//! watermark advanced in one transaction.

use super::{SyncContext, job_of, load_run};
use crate::sync::{SyncError, error_chain};
use crate::warehouse::runs::{self, RunStatus};

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
            Ok(session) => session.bulk.delete(&status_url).await.map_err(Into::into),
            Err(e) => Err(e),
        };
        match deleted {
            Ok(()) => runs::export_deleted(&ctx.pool, run_id).await?,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not delete the finished export on the server")
            }
        }
    }
    if runs::succeed(&ctx.pool, run_id).await? {
        ctx.forget_session(run_id).await;
        tracing::info!("run succeeded");
    }
    Ok(())
}
