//! Complete cohorts, inside the finish phase of a group run: read the group's members
//! (`GET Group/{id}`), record who joined and who left (`warehouse::cohort`), and when an
//! incremental run finds new members, ask for their whole history in a second export of the
//! same run (`patient` parameters, no `_since`: the Bulk Data Group Membership Request
//! Pattern). The first export is deleted on the server first (one export at a time is all
//! some EHRs allow), then the run goes back to `exporting` with the member export's status
//! URL; its files load beside the first export's, with the same newer-wins merge, and the
//! watermark still takes the first export's transactionTime.
//!
//! A full run records the members and needs no second export: it asked for everything.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::{SyncContext, add_retries, queue_next};
use crate::config::ExportMethod;
use crate::config::{ExportLevel, JobConfig};
use crate::sync::{SyncError, error_chain};
use crate::warehouse::cohort;
use crate::warehouse::runs::{self, RunRow};

/// Reads and records the group's members; starts the member export when the run is
/// incremental and found new members. `true` when the run went back to exporting (the caller
/// stops: the poll is queued).
pub(super) async fn check(
    ctx: &SyncContext,
    job: &JobConfig,
    run: &RunRow,
) -> Result<bool, SyncError> {
    let (ExportLevel::Group, Some(group_id)) = (job.export.level, &job.export.group_id) else {
        return Ok(false);
    };
    // A run narrowed to given patients has no cohort to complete; a member export already
    // done needs no second look.
    if run.member_export || !job.export.patients.is_empty() {
        return Ok(false);
    }
    let session = ctx.session(job, run.id).await?;
    let retries = Arc::new(AtomicU64::new(0));
    let bulk = session.bulk.clone().with_retry_counter(retries.clone());
    let members = bulk.group_members(group_id).await;
    add_retries(ctx, run.id, &retries).await?;
    let members = match members {
        Ok(members) => members,
        // A server that will not show the Group (no `Group.read` scope, say) costs the run
        // its cohort check, not its data: what was exported is loaded and complete as asked.
        Err(e) if !e.is_retryable() => {
            tracing::warn!(
                group.id = %group_id,
                error = %error_chain(&e),
                "cannot read the group's members; members who joined since the last run may lack their older history"
            );
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    let membership =
        cohort::record_members(&ctx.pool, &job.name, group_id, run.id, &members).await?;
    tracing::info!(
        group.id = %group_id,
        group.members = members.len(),
        group.joined = membership.new.len(),
        group.left = membership.left,
        group.known_before = membership.known_before,
        "group membership read"
    );
    if run.full_export || membership.new.is_empty() {
        return Ok(false);
    }
    // The first export is done with: delete it before starting the next one.
    if let Some(status_url) = run
        .status_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
    {
        match bulk.delete(&status_url).await {
            Ok(()) => runs::export_deleted(&ctx.pool, run.id).await?,
            Err(e) => match e.refused_for_good() {
                Some(status) => crate::sync::record_delete_refused(&ctx.pool, run.id, status).await,
                None => {
                    tracing::warn!(error = %error_chain(&e), "could not delete the first export on the server")
                }
            },
        }
    }
    let mut request = crate::sync::export_request(job, &session, None);
    request.since = None;
    request.patients = membership
        .new
        .iter()
        .map(|id| format!("Patient/{id}"))
        .collect();
    // `patient` is a POST parameter.
    request.method = ExportMethod::Post;
    let kicked_off = bulk.kick_off(&request).await;
    add_retries(ctx, run.id, &retries).await?;
    let kick_off = kicked_off?;
    tracing::info!(
        export.status_url = %crate::transport::redacted(&kick_off.status_url),
        group.joined = membership.new.len(),
        "member export started: the new members' whole history"
    );
    if runs::start_member_export(
        &ctx.pool,
        run.id,
        kick_off.request_url.as_str(),
        kick_off.status_url.as_str(),
    )
    .await?
    {
        queue_next(ctx, run.id, 0).await?;
    }
    Ok(true)
}
