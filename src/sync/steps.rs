//! A run as queued steps: kick-off, poll, load one file, finish. Each step is one queue task;
//! each is idempotent (it checks the run's persisted state first and changes it with guarded
//! statements), so a task that runs twice, or after a crash, does no harm.
//!
//! Retries are scheduled here, not by the queue: a retryable failure pushes the same step again
//! with an exponential, jittered delay (honouring `Retry-After`), up to a per-step limit; a
//! fatal failure, or a panic inside a step, fails the run with the reason on the run record.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apalis::prelude::{BoxDynError, Data, Monitor, WorkerBuilder, WorkerBuilderExt};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use super::state::{self, FileRow, NewFile};
use super::{Session, SyncError, error_chain};
use crate::bulk::{ManifestFile, StatusCheck};
use crate::config::{JobConfig, SyncSettings};
use crate::ops::metrics::{self, Endpoint};
use crate::queue::{self, QueueSettings, TaskQueue};
use crate::warehouse::{FileKind, FileTarget, Runs};

/// The queue all run steps go through.
pub const QUEUE: &str = "fhir-sync-steps";

/// One step of a run. `seq` makes every push of a step unique (the idempotency key), so a
/// re-push after a delay is a new task while a duplicate push of the same one is dropped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    KickOff {
        run_id: i64,
        seq: u32,
        attempt: u32,
    },
    Poll {
        run_id: i64,
        seq: u32,
        errors: u32,
    },
    LoadFile {
        run_id: i64,
        file_id: i64,
        seq: u32,
        attempt: u32,
    },
    Finish {
        run_id: i64,
        seq: u32,
        attempt: u32,
    },
}

impl Step {
    fn run_id(&self) -> i64 {
        match self {
            Step::KickOff { run_id, .. }
            | Step::Poll { run_id, .. }
            | Step::LoadFile { run_id, .. }
            | Step::Finish { run_id, .. } => *run_id,
        }
    }

    fn key(&self) -> String {
        match self {
            Step::KickOff { run_id, seq, .. } => format!("kickoff:{run_id}:{seq}"),
            Step::Poll { run_id, seq, .. } => format!("poll:{run_id}:{seq}"),
            Step::LoadFile { file_id, seq, .. } => format!("load:{file_id}:{seq}"),
            Step::Finish { run_id, seq, .. } => format!("finish:{run_id}:{seq}"),
        }
    }

    /// The same step as a new task (a new `seq`), one attempt further; `None` once the step
    /// kind's attempts are used up.
    fn next_attempt(&self) -> Option<Step> {
        let next = match self.clone() {
            Step::KickOff {
                run_id,
                seq,
                attempt,
            } => Step::KickOff {
                run_id,
                seq: seq + 1,
                attempt: attempt + 1,
            },
            Step::Poll {
                run_id,
                seq,
                errors,
            } => Step::Poll {
                run_id,
                seq: seq + 1,
                errors: errors + 1,
            },
            Step::LoadFile {
                run_id,
                file_id,
                seq,
                attempt,
            } => Step::LoadFile {
                run_id,
                file_id,
                seq: seq + 1,
                attempt: attempt + 1,
            },
            Step::Finish {
                run_id,
                seq,
                attempt,
            } => Step::Finish {
                run_id,
                seq: seq + 1,
                attempt: attempt + 1,
            },
        };
        let limit = match self {
            Step::KickOff { .. } => KICK_OFF_ATTEMPTS,
            Step::Poll { .. } => POLL_ERRORS,
            Step::LoadFile { .. } => LOAD_ATTEMPTS,
            Step::Finish { .. } => FINISH_ATTEMPTS,
        };
        (next.attempt() < limit).then_some(next)
    }

    fn attempt(&self) -> u32 {
        match self {
            Step::KickOff { attempt, .. }
            | Step::LoadFile { attempt, .. }
            | Step::Finish { attempt, .. } => *attempt,
            Step::Poll { errors, .. } => *errors,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Step::KickOff { .. } => "kick-off",
            Step::Poll { .. } => "poll",
            Step::LoadFile { .. } => "load-file",
            Step::Finish { .. } => "finish",
        }
    }
}

/// Attempts per step kind for retryable failures before the run fails.
pub const KICK_OFF_ATTEMPTS: u32 = 5;
const POLL_ERRORS: u32 = 10;
const LOAD_ATTEMPTS: u32 = 5;
const FINISH_ATTEMPTS: u32 = 5;
/// Wait before a queued run looks again whether the job's active run has finished.
const BUSY_WAIT: Duration = Duration::from_secs(5);

/// Everything a worker needs to execute steps. Shared by all workers of a process.
pub struct StepContext {
    pub pool: PgPool,
    pub settings: SyncSettings,
    pub queue: TaskQueue<Step>,
    /// This process's name (its queue workers' names start with it).
    pub owner: String,
    jobs: std::sync::RwLock<HashMap<String, Arc<JobConfig>>>,
    /// One session (HTTP client, discovery, token manager) per run, shared by all its steps in
    /// this process: discovery is cached for a run, so a server that moves its token endpoint
    /// is followed by the next run. A job has one active run at a time, so this is also one
    /// token manager per source.
    sessions: tokio::sync::Mutex<HashMap<i64, Arc<Session>>>,
}

impl StepContext {
    pub fn new(
        pool: PgPool,
        settings: SyncSettings,
        queue_settings: QueueSettings,
        jobs: Vec<JobConfig>,
    ) -> Arc<Self> {
        let queue = TaskQueue::new(pool.clone(), QUEUE, queue_settings);
        Arc::new(StepContext {
            pool,
            settings,
            queue,
            owner: queue::worker_name("fhir-sync"),
            jobs: std::sync::RwLock::new(
                jobs.into_iter()
                    .map(|j| (j.name.clone(), Arc::new(j)))
                    .collect(),
            ),
            sessions: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Adds or replaces a job definition (the foreground runner registers the job it runs).
    pub fn register_job(&self, job: JobConfig) {
        self.jobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.name.clone(), Arc::new(job));
    }

    pub fn job(&self, name: &str) -> Option<Arc<JobConfig>> {
        self.jobs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn jobs(&self) -> Vec<Arc<JobConfig>> {
        self.jobs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    async fn session(&self, job: &JobConfig, run_id: i64) -> Result<Arc<Session>, SyncError> {
        let mut sessions = self.sessions.lock().await;
        if let Some(session) = sessions.get(&run_id) {
            return Ok(session.clone());
        }
        let session = Arc::new(Session::open(&self.settings, job).await?);
        sessions.insert(run_id, session.clone());
        Ok(session)
    }

    /// Drops a finished run's session.
    async fn forget_session(&self, run_id: i64) {
        self.sessions.lock().await.remove(&run_id);
    }

    pub async fn push(&self, step: Step, delay: Duration) -> Result<(), SyncError> {
        self.queue
            .push(step.clone(), &step.key(), delay)
            .await
            .map_err(|e| SyncError::Queue(e.to_string()))?;
        Ok(())
    }
}

/// Runs the step workers of this process until `shutdown` is cancelled, then lets running
/// steps finish for up to `grace`.
pub async fn run_workers(
    ctx: Arc<StepContext>,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let concurrency = ctx.queue.settings().concurrency;
    let name = ctx.owner.clone();
    let monitor = Monitor::new()
        .register(move |restarts| {
            WorkerBuilder::new(format!("{name}-{restarts}"))
                .backend(ctx.queue.worker_backend())
                .data(ctx.clone())
                .concurrency(concurrency)
                .build(handle_step)
        })
        // A database outage ends a worker's task stream; start it again rather than exit.
        .should_restart(|_, error| {
            tracing::warn!(error = %error, "queue worker stopped, restarting it");
            true
        })
        .shutdown_timeout(grace);
    monitor
        .run_with_signal(async move {
            shutdown.cancelled().await;
            Ok(())
        })
        .await?;
    Ok(())
}

/// The queue handler. It never returns an error to apalis: failures are handled (retried or
/// recorded on the run) here, and a panic fails the run instead of the worker.
async fn handle_step(step: Step, ctx: Data<Arc<StepContext>>) -> Result<(), BoxDynError> {
    let ctx: Arc<StepContext> = (*ctx).clone();
    let run_id = step.run_id();
    // `job.name` is filled in by `load_run`, the first thing every step does, so every line a
    // step logs about its work carries the job and the run.
    let span = tracing::info_span!(
        "step",
        job.name = tracing::field::Empty,
        run.id = run_id,
        step = step.name()
    );
    let retried = step.clone();
    let outcome = AssertUnwindSafe(tracing::Instrument::instrument(
        execute(&ctx, step),
        span.clone(),
    ))
    .catch_unwind()
    .await;
    let _entered = span.enter();
    let failure = match outcome {
        Ok(Ok(())) => return Ok(()),
        // A database blip or a network error outside the steps' own retry loops: the same
        // step again, later. File downloads have retried already by the time they fail.
        Ok(Err(error))
            if error.is_retryable()
                && !matches!(error, SyncError::Download { .. } | SyncError::Load { .. }) =>
        {
            if let Some(next) = retried.next_attempt() {
                let attempt = next.attempt();
                let delay = backoff(&ctx.settings, attempt);
                tracing::warn!(error = %error_chain(&error), attempt, retry_in_ms = delay.as_millis() as u64, "step failed, retrying");
                if push_patiently(&ctx, next, delay).await {
                    let _ = state::count_retry(&ctx.pool, run_id).await;
                    return Ok(());
                }
            }
            (error_chain(&error), true)
        }
        Ok(Err(error)) => (error_chain(&error), error.is_retryable()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            (format!("internal error: a step panicked: {message}"), false)
        }
    };
    tracing::error!(error = %failure.0, retryable = failure.1, "run failed");
    ctx.forget_session(run_id).await;
    match state::fail(&ctx.pool, run_id, &failure.0, failure.1).await {
        // Only the process whose update failed the run alerts, so the alert goes out once.
        Ok(true) => crate::ops::alert::run_failed(&ctx, run_id),
        Ok(false) => {}
        // The queue task is done either way; `serve` re-queues the run's step at start-up.
        Err(e) => tracing::error!(error = %e, "could not record the failed run"),
    }
    Ok(())
}

/// Pushes a step, retrying the push itself for a while: it fails when the database is away,
/// and a step that is never pushed leaves its run waiting until the next `serve` start-up.
async fn push_patiently(ctx: &StepContext, step: Step, delay: Duration) -> bool {
    for attempt in 0..10u32 {
        match ctx.push(step.clone(), delay).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), attempt, "cannot queue the next step yet");
                tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(attempt.min(5))).await;
            }
        }
    }
    false
}

async fn execute(ctx: &StepContext, step: Step) -> Result<(), SyncError> {
    match step {
        Step::KickOff {
            run_id,
            seq,
            attempt,
        } => kick_off(ctx, run_id, seq, attempt).await,
        Step::Poll {
            run_id,
            seq,
            errors,
        } => poll(ctx, run_id, seq, errors).await,
        Step::LoadFile {
            run_id,
            file_id,
            seq,
            attempt,
        } => load(ctx, run_id, file_id, seq, attempt).await,
        Step::Finish { run_id, .. } => finish(ctx, run_id).await,
    }
}

/// Exponential backoff with jitter from `sync.retry_base_delay_ms`: base, 2×base, 4×base, ...
/// each drawn between half and all of that, capped at 5 minutes.
fn backoff(settings: &SyncSettings, attempt: u32) -> Duration {
    let base = Duration::from_millis(settings.retry_base_delay_ms.max(1));
    let ceiling = (base * 2u32.saturating_pow(attempt.min(16))).min(Duration::from_secs(300));
    ceiling.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

/// Reads the run a step is about and names its job on the step's span (the queue task only
/// carries the run id). Call it once per step: a span shows each recording of a field.
async fn load_run(ctx: &StepContext, run_id: i64) -> Result<state::RunRow, SyncError> {
    let run = state::load(&ctx.pool, run_id).await?;
    tracing::Span::current().record("job.name", run.job.as_str());
    Ok(run)
}

fn job_of(ctx: &StepContext, run: &state::RunRow) -> Result<Arc<JobConfig>, SyncError> {
    ctx.job(&run.job).ok_or_else(|| {
        SyncError::Unsupported(format!(
            "job {:?} is not configured in this process (jobs/{}.toml missing?)",
            run.job, run.job
        ))
    })
}

async fn kick_off(ctx: &StepContext, run_id: i64, seq: u32, attempt: u32) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    if matches!(run.status.as_str(), "exporting" | "loading" | "completing") {
        // The kick-off happened; make sure the step after it was queued (a push that failed
        // after the state changed is why this task is running again).
        return ensure_next(ctx, run_id).await;
    }
    if run.status == "queued" {
        let job = job_of(ctx, &run)?;
        let since = if run.full_export {
            None
        } else {
            state::watermark(&ctx.pool, &run.job, job.export.since_overlap_seconds).await?
        };
        // Runs of a job go one at a time, oldest first; a run whose turn has not come stays
        // queued and looks again later.
        let waiting_for = match state::start_kick_off(&ctx.pool, run_id, since.as_deref()).await {
            Ok(true) => None,
            Ok(false) => match state::load(&ctx.pool, run_id).await?.status.as_str() {
                "queued" => Some("an older run of the job is still queued"),
                _ => return Ok(()),
            },
            Err(e) if is_unique_violation(&e) => Some("another run of the job is active"),
            Err(e) => return Err(e.into()),
        };
        if let Some(reason) = waiting_for {
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
    } else if run.status != "kicking_off" {
        return Ok(()); // Finished, failed or cancelled meanwhile.
    }
    let run = state::load(&ctx.pool, run_id).await?;
    let job = job_of(ctx, &run)?;
    let retries = Arc::new(AtomicU64::new(0));
    let result = async {
        let session = ctx.session(&job, run_id).await?;
        let bulk = session.bulk.clone().with_retry_counter(retries.clone());
        // Exports this job started before and never deleted (a failed, cancelled or killed
        // run) may hold the server's one-export-per-client slot: delete them first.
        super::delete_abandoned_exports(&ctx.pool, &bulk, &job.name, run_id, false).await;
        let request = super::export_request(&job, &session, run.since.clone());
        match bulk.kick_off(&request).await {
            Err(crate::bulk::ExportError::Busy { .. })
                if super::delete_abandoned_exports(&ctx.pool, &bulk, &job.name, run_id, true)
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
    match result {
        Ok(kick_off) => {
            tracing::info!(
                export.status_url = %crate::transport::redacted(&kick_off.status_url),
                export.since = run.since.as_deref().unwrap_or("(full)"),
                "export started"
            );
            if state::exporting(
                &ctx.pool,
                run_id,
                kick_off.request_url.as_str(),
                kick_off.status_url.as_str(),
            )
            .await?
            {
                ensure_next(ctx, run_id).await?;
            }
            Ok(())
        }
        // The queue handler retries it as a new task, later.
        Err(error) => Err(error),
    }
}

async fn poll(ctx: &StepContext, run_id: i64, seq: u32, errors: u32) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    if run.status != "exporting" {
        return ensure_next(ctx, run_id).await;
    }
    let job = job_of(ctx, &run)?;
    let policy = super::poll_policy(&job);
    let elapsed = time::OffsetDateTime::now_utc() - run.started_at;
    if elapsed.whole_seconds() > policy.timeout.as_secs() as i64 {
        return Err(crate::bulk::ExportError::TimedOut {
            seconds: policy.timeout.as_secs(),
        }
        .into());
    }
    let status_url = run
        .status_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
        .ok_or_else(|| {
            SyncError::Unsupported("the run is exporting but has no status URL".into())
        })?;
    let clamp = |d: Duration| d.clamp(policy.min_interval, policy.max_interval);
    let retries = Arc::new(AtomicU64::new(0));
    let checked = async {
        let session = ctx.session(&job, run_id).await?;
        let bulk = session.bulk.clone().with_retry_counter(retries.clone());
        Ok::<_, SyncError>(bulk.check_status(&status_url).await?)
    }
    .await;
    add_retries(ctx, run_id, &retries).await?;
    match checked {
        Ok(StatusCheck::InProgress {
            progress,
            retry_after,
        }) => {
            if let Some(progress) = &progress {
                tracing::info!(export.progress = %progress, "export in progress");
                state::progress(&ctx.pool, run_id, progress).await?;
            }
            let delay = clamp(retry_after.unwrap_or(policy.default_interval));
            ctx.push(
                Step::Poll {
                    run_id,
                    seq: seq + 1,
                    errors: 0,
                },
                delay,
            )
            .await
        }
        Ok(StatusCheck::Transient {
            status,
            retry_after,
        }) => {
            if errors + 1 > POLL_ERRORS {
                return Err(crate::bulk::ExportError::Status {
                    context: "export status",
                    status,
                }
                .into());
            }
            tracing::warn!(
                http.status = status,
                attempt = errors + 1,
                "export status poll failed, will poll again"
            );
            state::count_retry(&ctx.pool, run_id).await?;
            metrics::http_retry(&job.name, Endpoint::Status);
            let delay = clamp(policy.after_transient(status, retry_after, errors + 1));
            ctx.push(
                Step::Poll {
                    run_id,
                    seq: seq + 1,
                    errors: errors + 1,
                },
                delay,
            )
            .await
        }
        Ok(StatusCheck::Complete(manifest)) => {
            if let Some(expires) = &manifest.expires {
                super::export_record::expires(&ctx.pool, run_id, expires).await?;
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
                .map(|f| ("output", f))
                .chain(manifest.error.iter().map(|f| ("error", f)))
                .chain(manifest.deleted.iter().map(|f| ("deleted", f)))
                .map(|(kind, f)| NewFile {
                    kind,
                    resource_type: &f.resource_type,
                    url: &f.url,
                    count: f.count,
                })
                .collect();
            let pending = state::manifest_ready(
                &ctx.pool,
                run_id,
                &manifest.transaction_time,
                manifest.requires_access_token,
                &files,
            )
            .await?;
            if pending.is_none() {
                tracing::debug!("the manifest was registered by an earlier attempt");
            }
            // Queues the file loads (deletion files wait for the output, see
            // `queue_next_files`); a manifest without files is complete at once.
            ensure_next(ctx, run_id).await
        }
        // The queue handler retries it as a new task, later.
        Err(error) => Err(error),
    }
}

async fn load(
    ctx: &StepContext,
    run_id: i64,
    file_id: i64,
    seq: u32,
    attempt: u32,
) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    if run.status != "loading" {
        return ensure_next(ctx, run_id).await;
    }
    let file = state::file(&ctx.pool, file_id).await?;
    if file.status == "loaded" {
        return complete_if_done(ctx, run_id).await;
    }
    let job = job_of(ctx, &run)?;
    let lease = ctx.queue.settings().file_lease_seconds;
    // The lease belongs to this attempt, not to the process: two tasks for the same file in one
    // process (a re-push and an orphan recovery, say) must not both load it.
    let owner = format!("{}/{}", ctx.owner, uuid::Uuid::new_v4().simple());
    if !state::lease_file(&ctx.pool, file_id, &owner, lease).await? {
        // Another live worker is loading it; look again after its lease could have lapsed.
        return ctx
            .push(
                Step::LoadFile {
                    run_id,
                    file_id,
                    seq: seq + 1,
                    attempt,
                },
                Duration::from_secs(lease),
            )
            .await;
    }
    let Some(slot) =
        SourceSlot::acquire(&ctx.pool, &job.name, ctx.settings.max_parallel_downloads).await?
    else {
        state::release_file(&ctx.pool, file_id, &owner).await?;
        let wait = Duration::from_millis(200) + backoff(&ctx.settings, 0);
        return ctx
            .push(
                Step::LoadFile {
                    run_id,
                    file_id,
                    seq: seq + 1,
                    attempt,
                },
                wait,
            )
            .await;
    };
    // Renew the lease while the load runs; a killed process stops renewing and another worker
    // takes the file over from its checkpoint once the lease lapses.
    let heartbeat = {
        let pool = ctx.pool.clone();
        let owner = owner.clone();
        let renewal = async move {
            let mut every = tokio::time::interval(Duration::from_secs(lease.div_ceil(3).max(1)));
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = state::lease_file(&pool, file_id, &owner, lease).await {
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
    let result = load_one(ctx, &job, &run, &file).await;
    heartbeat.abort();
    drop(slot);
    state::release_file(&ctx.pool, file_id, &owner).await?;
    match result {
        Ok(Ok(())) => complete_if_done(ctx, run_id).await,
        // The download retried what it could; the run fails with its reason.
        Ok(Err(error)) => Err(error),
        // The queue handler retries it as a new task, later.
        Err(error) => Err(error),
    }
}

/// Loads one file. The outer error is about getting ready (a session, the run's URLs) and is
/// worth retrying as a step; the inner result is the download's own outcome, which already
/// retried with backoff and refreshed expired links, so its error is final.
async fn load_one(
    ctx: &StepContext,
    job: &JobConfig,
    run: &state::RunRow,
    file: &FileRow,
) -> Result<Result<(), SyncError>, SyncError> {
    let session = ctx.session(job, run.id).await?;
    let parse = |url: Option<&str>, what: &str| {
        url.and_then(|u| url::Url::parse(u).ok())
            .ok_or_else(|| SyncError::Unsupported(format!("file {} has no usable {what}", file.id)))
    };
    let url = parse(file.download_url.as_deref(), "download URL")?;
    let status_url = parse(run.status_url.as_deref(), "status URL")?;
    let kind = match file.kind.as_str() {
        "error" => FileKind::Error,
        "deleted" => FileKind::Deleted,
        _ => FileKind::Output,
    };
    let target = FileTarget {
        run_id: run.id,
        file_id: file.id,
        source: job.name.clone(),
        kind,
        resource_type: kind
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
    let runs = Runs::new(ctx.pool.clone());
    let bytes = AtomicU64::new(0);
    let download = super::Download::new(
        &ctx.pool,
        &runs,
        &bulk,
        &status_url,
        run.requires_access_token.unwrap_or(true),
        &ctx.settings,
        &bytes,
        &retries,
    );
    let span = tracing::info_span!("file", file.id = file.id, resource.type = %file.resource_type);
    let outcome =
        tracing::Instrument::instrument(download.load_file(target, &manifest_file, kind), span)
            .await;
    add_retries(ctx, run.id, &retries).await?;
    Ok(outcome)
}

/// Adds the retries a step's requests made to the run's count.
async fn add_retries(ctx: &StepContext, run_id: i64, retries: &AtomicU64) -> Result<(), SyncError> {
    let count = retries.load(Ordering::Relaxed);
    if count > 0 {
        super::export_record::add_retries(&ctx.pool, run_id, count).await?;
    }
    Ok(())
}

async fn complete_if_done(ctx: &StepContext, run_id: i64) -> Result<(), SyncError> {
    queue_next_files(ctx, run_id).await?;
    state::all_files_loaded(&ctx.pool, run_id).await?;
    if state::load(&ctx.pool, run_id).await?.status == "completing" {
        ctx.push(
            Step::Finish {
                run_id,
                seq: 0,
                attempt: 0,
            },
            Duration::ZERO,
        )
        .await?;
    }
    Ok(())
}

/// Queues the step the run's persisted state calls for next. A state change and the push of
/// the step after it are two writes; if the push failed (the database went away between them),
/// the step is retried, finds the state already moved, and lands here. Every push uses the
/// first key of its step (`seq` 0), so when the step was queued after all this adds nothing.
async fn ensure_next(ctx: &StepContext, run_id: i64) -> Result<(), SyncError> {
    match state::load(&ctx.pool, run_id).await?.status.as_str() {
        "exporting" => {
            ctx.push(
                Step::Poll {
                    run_id,
                    seq: 0,
                    errors: 0,
                },
                Duration::ZERO,
            )
            .await
        }
        "loading" | "completing" => complete_if_done(ctx, run_id).await,
        _ => Ok(()),
    }
}

/// Queues the load of every file that may start now: output and error files at once, deletion
/// files once every output and error file has loaded — an export's output lists what existed
/// at its transactionTime, so the loader lets this run's output win over this run's deletion
/// of the same resource only if the output is loaded first. Pushes are idempotent per file.
async fn queue_next_files(ctx: &StepContext, run_id: i64) -> Result<(), SyncError> {
    for file_id in state::loadable_files(&ctx.pool, run_id).await? {
        ctx.push(
            Step::LoadFile {
                run_id,
                file_id,
                seq: 0,
                attempt: 0,
            },
            Duration::ZERO,
        )
        .await?;
    }
    Ok(())
}

async fn finish(ctx: &StepContext, run_id: i64) -> Result<(), SyncError> {
    let run = load_run(ctx, run_id).await?;
    if run.status != "completing" {
        return Ok(());
    }
    let job = job_of(ctx, &run)?;
    if let Some(status_url) = run
        .status_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
    {
        // Every file is loaded: the server may drop the files. Failing here loses nothing.
        match ctx.session(&job, run_id).await {
            Ok(session) => {
                let deleted = session.bulk.delete(&status_url).await;
                if deleted.is_ok() {
                    super::export_record::deleted(&ctx.pool, run_id).await?;
                }
                if let Err(e) = deleted {
                    tracing::warn!(error = %error_chain(&e), "could not delete the finished export on the server");
                }
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not delete the finished export on the server")
            }
        }
    }
    match state::succeed(&ctx.pool, run_id).await {
        Ok(true) => {
            ctx.forget_session(run_id).await;
            tracing::info!("run succeeded");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// One of a source's download slots, held as a session-level advisory lock on a connection of
/// its own: the limit holds across all processes, and a killed process's slots are freed by
/// PostgreSQL when its connection drops.
struct SourceSlot {
    _conn: sqlx::PgConnection,
}

impl SourceSlot {
    async fn acquire(
        pool: &PgPool,
        source: &str,
        slots: usize,
    ) -> Result<Option<SourceSlot>, SyncError> {
        let mut conn = sqlx::PgConnection::connect_with(&pool.connect_options()).await?;
        for slot in 0..slots.max(1) as i32 {
            let taken: bool = sqlx::query_scalar(
                "SELECT pg_try_advisory_lock(hashtext('fhir-sync-source:' || $1), $2)",
            )
            .bind(source)
            .bind(slot)
            .fetch_one(&mut conn)
            .await?;
            if taken {
                return Ok(Some(SourceSlot { _conn: conn }));
            }
        }
        conn.close().await?;
        Ok(None)
    }
}

/// At start-up: re-queues the current step of every unfinished run that nothing has touched
/// for a while — its process died between changing the run's state and queueing the next
/// step, or the queue lost the task. Steps are idempotent, so an extra push is harmless.
pub async fn resume_stranded(ctx: &StepContext, idle: Duration) -> Result<usize, SyncError> {
    let idle_seconds = idle.as_secs_f64();
    let runs: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, status FROM fhir_sync.run
         WHERE status IN ('queued', 'kicking_off', 'exporting', 'loading', 'completing')
           AND updated_at < now() - make_interval(secs => $1)",
    )
    .bind(idle_seconds)
    .fetch_all(&ctx.pool)
    .await?;
    // A sequence number no earlier push used: the current time.
    let seq = time::OffsetDateTime::now_utc().unix_timestamp() as u32;
    let mut pushed = 0;
    for (run_id, status) in runs {
        let steps = match status.as_str() {
            "queued" | "kicking_off" => vec![Step::KickOff {
                run_id,
                seq,
                attempt: 0,
            }],
            "exporting" => vec![Step::Poll {
                run_id,
                seq,
                errors: 0,
            }],
            "completing" => vec![Step::Finish {
                run_id,
                seq,
                attempt: 0,
            }],
            _ => {
                let files: Vec<i64> = sqlx::query_scalar(
                    "SELECT id FROM fhir_sync.run_file WHERE run_id = $1 AND status <> 'loaded'",
                )
                .bind(run_id)
                .fetch_all(&ctx.pool)
                .await?;
                files
                    .into_iter()
                    .map(|file_id| Step::LoadFile {
                        run_id,
                        file_id,
                        seq,
                        attempt: 0,
                    })
                    .collect()
            }
        };
        for step in steps {
            tracing::info!(run.id = run_id, run.status = %status, step = step.name(), "resuming a stranded run");
            ctx.push(step, Duration::ZERO).await?;
            pushed += 1;
        }
    }
    Ok(pushed)
}
