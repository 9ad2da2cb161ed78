//! The load-file step: lease the file (one loader at a time), take one of the source's
//! download slots, stream the file into the loader while renewing the lease, then queue what
//! the finished file unblocks.
//!
//! The lease belongs to this attempt; a process that stops hands it back (the load is stopped
//! and the step goes back on the queue), one that is killed stops renewing it and another
//! worker takes the file over from its checkpoint once it lapses. A loader whose lease lapsed
//! anyway finds the checkpoint moved under it and yields.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::{SourceSlot, Step, SyncContext, add_retries, file_done, job_of, load_run, queue_next};
use crate::bulk::ManifestFile;
use crate::config::JobConfig;
use crate::sync::SyncError;
use crate::sync::download::Download;
use crate::warehouse::FileTarget;
use crate::warehouse::runs::{self, FileRow, FileStatus, RunRow, RunStatus};

pub(super) async fn run(
    ctx: &SyncContext,
    run_id: i64,
    file_id: i64,
    seq: u32,
    attempt: u32,
) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    if run.status != RunStatus::Loading {
        return queue_next(ctx, run_id, 0).await;
    }
    let file = runs::file(&ctx.pool, file_id).await?;
    if file.status == FileStatus::Loaded {
        return file_done(ctx, run_id, file.kind).await;
    }
    let job = job_of(ctx, &run)?;
    let later = |delay| {
        ctx.push(
            Step::LoadFile {
                run_id,
                file_id,
                seq: seq + 1,
                attempt,
            },
            delay,
        )
    };
    let lease = ctx.queue.settings().file_lease_seconds;
    // The lease belongs to this attempt, not to the process: two tasks for the same file in one
    // process (a re-push and an orphan recovery, say) must not both load it.
    let owner = format!("{}/{}", ctx.owner, uuid::Uuid::new_v4().simple());
    if !runs::lease_file(&ctx.pool, file_id, &owner, lease).await? {
        // Another live worker is loading it; look again after its lease could have lapsed.
        return later(Duration::from_secs(lease)).await;
    }
    ctx.leases().insert(file_id, owner.clone());
    let Some(slot) =
        SourceSlot::acquire(&ctx.pool, &job.name, ctx.settings.max_parallel_downloads).await?
    else {
        release(ctx, file_id, &owner).await?;
        let backoff = crate::backoff::Backoff::new(Duration::from_millis(
            ctx.settings.retry_base_delay_ms.max(1),
        ));
        return later(Duration::from_millis(200) + backoff.delay(1, None)).await;
    };
    // Renew the lease while the load runs, until it ends or this process stops.
    let heartbeat = {
        let pool = ctx.pool.clone();
        let owner = owner.clone();
        let stopping = ctx.stopping.clone();
        let renewal = async move {
            let mut every = tokio::time::interval(Duration::from_secs(lease.div_ceil(3).max(1)));
            every.tick().await;
            loop {
                tokio::select! {
                    _ = stopping.cancelled() => break,
                    _ = every.tick() => {}
                }
                if let Err(e) = runs::lease_file(&pool, file_id, &owner, lease).await {
                    tracing::warn!(error = %e, "could not renew the file lease");
                }
            }
        };
        // A spawned task leaves the step's span behind unless it is handed over.
        tokio::spawn(tracing::Instrument::instrument(
            renewal,
            tracing::info_span!("lease", file.id = file_id),
        ))
    };
    // Stopping drops the load mid-batch: the batch's transaction rolls back and the file's
    // checkpoint stays where the last committed batch left it.
    let result = tokio::select! {
        result = load(ctx, &job, &run, &file) => result,
        _ = ctx.stopping.cancelled() => Err(SyncError::Stopped),
    };
    heartbeat.abort();
    drop(slot);
    release(ctx, file_id, &owner).await?;
    result?;
    file_done(ctx, run_id, file.kind).await
}

async fn release(ctx: &SyncContext, file_id: i64, owner: &str) -> Result<(), SyncError> {
    ctx.leases().remove(&file_id);
    runs::release_file(&ctx.pool, file_id, owner).await?;
    Ok(())
}

/// Downloads and loads one file (the download retries, refreshes expired links and resumes
/// on its own; its failure reaches the queue handler already retried).
async fn load(
    ctx: &SyncContext,
    job: &JobConfig,
    run: &RunRow,
    file: &FileRow,
) -> Result<(), SyncError> {
    let session = ctx.session(job, run.id).await?;
    let parse = |url: Option<&str>, what| {
        url.and_then(|u| url::Url::parse(u).ok())
            .ok_or(SyncError::BadRecord {
                run_id: run.id,
                what,
            })
    };
    let url = parse(file.download_url.as_deref(), "file download URL")?;
    let status_url = parse(run.status_url.as_deref(), "status URL")?;
    let target = FileTarget {
        run_id: run.id,
        file_id: file.id,
        source: job.name.clone(),
        kind: file.kind,
        resource_type: file
            .kind
            .line_type()
            .map_or_else(|| file.resource_type.clone(), str::to_string),
    };
    let manifest_file = ManifestFile {
        resource_type: file.resource_type.clone(),
        url,
        count: file.manifest_count.map(|c| c as u64),
    };
    let retries = Arc::new(AtomicU64::new(0));
    let bulk = session.bulk.clone().with_retry_counter(retries.clone());
    let download = Download {
        pool: &ctx.pool,
        bulk: &bulk,
        status_url: &status_url,
        requires_access_token: run.requires_access_token.unwrap_or(true),
        settings: &ctx.settings,
        retries: &retries,
    };
    let span = tracing::info_span!("file", file.id = file.id, resource.type = %file.resource_type);
    let outcome = tracing::Instrument::instrument(
        download.load_file(target, &manifest_file, file.kind, file.position),
        span,
    )
    .await;
    add_retries(ctx, run.id, &retries).await?;
    outcome
}
