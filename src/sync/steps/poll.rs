//! The poll step: one status request, then the next poll after the server's pace, or the
//! manifest registered and the files queued.
//!
//! A 202 waits the server's `Retry-After` within the job's interval bounds; a 429 is the server
//! pacing us, not an error: it waits the `Retry-After` beyond the maximum interval and uses up no
//! error budget; a transient failure waits the retry backoff. No wait goes past the export's
//! deadline (`export.timeout_seconds`): a wait that would fails the run as timed out at once.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::{POLL_ERRORS, Step, SyncContext, add_retries, job_of, load_run, queue_next};
use crate::bulk::{ExportError, Manifest, PollPolicy, StatusCheck};
use crate::metrics::{self, Endpoint};
use crate::sync::SyncError;
use crate::warehouse::runs::{self, FileKind, NewFile, RunStatus};

/// What to do after one status answer that is not the manifest: poll again after a delay
/// (with the consecutive-error count to carry), or fail.
#[derive(Debug)]
enum Then {
    PollAgain { errors: u32, delay: Duration },
    Fail(ExportError),
}

/// The decision after a status answer, given the errors so far, the backoff of a failure and
/// the time left before the export's deadline.
fn after(
    policy: &PollPolicy,
    check: &StatusCheck,
    errors: u32,
    backoff: Duration,
    remaining: Duration,
) -> Then {
    let (errors, delay) = match check {
        StatusCheck::InProgress { retry_after, .. } => (0, policy.after_progress(*retry_after)),
        StatusCheck::Transient {
            status: 429,
            retry_after,
        } => (errors, policy.after_throttling(*retry_after)),
        StatusCheck::Transient {
            status,
            retry_after,
        } => {
            if errors + 1 > POLL_ERRORS {
                return Then::Fail(ExportError::Status {
                    context: "export status",
                    status: *status,
                });
            }
            (errors + 1, policy.after_failure(*retry_after, backoff))
        }
        StatusCheck::Complete(_) => (0, Duration::ZERO),
    };
    // A wait that reaches the deadline ends the run now: the export cannot be ready in time
    // if the server will not be asked again before then.
    if delay >= remaining {
        return Then::Fail(ExportError::TimedOut {
            seconds: policy.timeout.as_secs(),
        });
    }
    Then::PollAgain { errors, delay }
}

pub(super) async fn run(
    ctx: &SyncContext,
    run_id: i64,
    seq: u32,
    errors: u32,
) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    if run.status != RunStatus::Exporting {
        return queue_next(ctx, run_id, 0).await;
    }
    let job = job_of(ctx, &run)?;
    let policy = crate::sync::poll_policy(&job);
    let elapsed = (time::OffsetDateTime::now_utc() - run.started_at).unsigned_abs();
    if elapsed > policy.timeout {
        return Err(ExportError::TimedOut {
            seconds: policy.timeout.as_secs(),
        }
        .into());
    }
    let status_url = run
        .status_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
        .ok_or(SyncError::BadRecord {
            run_id,
            what: "status URL",
        })?;
    let retries = Arc::new(AtomicU64::new(0));
    let checked = async {
        let session = ctx.session(&job, run_id).await?;
        let bulk = session.bulk.clone().with_retry_counter(retries.clone());
        Ok::<_, SyncError>(bulk.check_status(&status_url).await?)
    }
    .await;
    add_retries(ctx, run_id, &retries).await?;
    // A request failure goes to the queue handler: the retry policy says when to poll again.
    let check = checked?;
    let manifest = match check {
        StatusCheck::Complete(manifest) => manifest,
        check => {
            match &check {
                StatusCheck::InProgress {
                    progress: Some(progress),
                    ..
                } => {
                    tracing::info!(export.progress = %progress, "export in progress");
                    runs::progress(&ctx.pool, run_id, progress).await?;
                }
                StatusCheck::Transient { status, .. } => {
                    tracing::warn!(
                        http.status = status,
                        attempt = errors + 1,
                        "export status poll refused for now, will poll again"
                    );
                    runs::count_retry(&ctx.pool, run_id).await?;
                    metrics::http_retry(&job.name, Endpoint::Status);
                }
                _ => {}
            }
            let remaining = policy.timeout.saturating_sub(elapsed);
            let backoff = crate::sync::retry_policy(&ctx.settings).delay(errors + 1, None);
            return match after(&policy, &check, errors, backoff, remaining) {
                Then::Fail(error) => Err(error.into()),
                Then::PollAgain { errors, delay } => {
                    ctx.push(
                        Step::Poll {
                            run_id,
                            seq: seq + 1,
                            errors,
                        },
                        delay,
                    )
                    .await
                }
            };
        }
    };
    register(ctx, run_id, &manifest).await?;
    // Queues the file loads (deletion files wait for the output); a manifest without files
    // is complete at once.
    queue_next(ctx, run_id, 0).await
}

/// Registers the manifest's files and moves the run to loading.
async fn register(ctx: &SyncContext, run_id: i64, manifest: &Manifest) -> Result<(), SyncError> {
    if let Some(expires) = &manifest.expires {
        runs::expires(&ctx.pool, run_id, expires).await?;
    }
    tracing::info!(
        export.transaction_time = %manifest.transaction_time,
        output_files = manifest.output.len(),
        error_files = manifest.error.len(),
        "export complete"
    );
    let files: Vec<NewFile<'_>> = manifest
        .output
        .iter()
        .map(|f| (FileKind::Output, f))
        .chain(manifest.error.iter().map(|f| (FileKind::Error, f)))
        .chain(manifest.deleted.iter().map(|f| (FileKind::Deleted, f)))
        .map(|(kind, f)| NewFile {
            kind,
            resource_type: &f.resource_type,
            url: &f.url,
            count: f.count,
        })
        .collect();
    let registered = runs::manifest_ready(
        &ctx.pool,
        run_id,
        &manifest.transaction_time,
        manifest.requires_access_token,
        &files,
    )
    .await?;
    if registered.is_none() {
        tracing::debug!("the manifest was registered by an earlier attempt");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: PollPolicy = PollPolicy {
        min_interval: Duration::from_millis(10),
        max_interval: Duration::from_secs(60),
        default_interval: Duration::from_secs(5),
        timeout: Duration::from_secs(900),
    };
    const BACKOFF: Duration = Duration::from_secs(1);
    const PLENTY: Duration = Duration::from_secs(900);

    fn throttled(seconds: u64) -> StatusCheck {
        StatusCheck::Transient {
            status: 429,
            retry_after: Some(Duration::from_secs(seconds)),
        }
    }

    #[test]
    fn throttling_uses_no_error_budget_and_waits_the_servers_word() {
        assert!(matches!(
            after(&POLICY, &throttled(600), POLL_ERRORS, BACKOFF, PLENTY),
            Then::PollAgain { errors, delay } if errors == POLL_ERRORS && delay == Duration::from_secs(600)
        ));
    }

    #[test]
    fn a_wait_past_the_deadline_ends_the_run_now() {
        assert!(matches!(
            after(&POLICY, &throttled(600), 0, BACKOFF, Duration::from_secs(3)),
            Then::Fail(ExportError::TimedOut { seconds: 900 })
        ));
    }

    #[test]
    fn a_transient_failure_waits_the_backoff_and_counts_until_the_limit() {
        let failed = StatusCheck::Transient {
            status: 500,
            retry_after: None,
        };
        assert!(matches!(
            after(&POLICY, &failed, 0, BACKOFF, PLENTY),
            Then::PollAgain { errors, delay } if errors == 1 && delay == BACKOFF
        ));
        assert!(matches!(
            after(&POLICY, &failed, POLL_ERRORS, BACKOFF, PLENTY),
            Then::Fail(ExportError::Status { status: 500, .. })
        ));
    }

    #[test]
    fn progress_resets_the_error_count() {
        let progress = StatusCheck::InProgress {
            progress: None,
            retry_after: None,
        };
        assert!(matches!(
            after(&POLICY, &progress, 4, BACKOFF, PLENTY),
            Then::PollAgain { errors, delay } if errors == 0 && delay == Duration::from_secs(5)
        ));
    }
}
