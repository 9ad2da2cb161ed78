//! A run as queued steps: kick-off, poll, load one file, finish — one file each beside this
//! one, which holds what they share: the [`Step`] task, the runtime context, the worker loop
//! that turns each step's failure into the retry policy's directive, the one rule for which
//! step a run's state calls for next, and start-up recovery (which uses that same rule).
//!
//! Each step is one queue task and idempotent: it re-reads the run's persisted state first
//! and changes it only with the run store's guarded statements, so a task that runs twice, or
//! after a crash, does no harm. Retries are new tasks with a delay, never back-to-back re-runs.
//!
//! The chain: kick-off → poll (re-queued until the manifest) → one load-file per file →
//! refresh-views → finish. A group run whose group gained members goes once more from
//! refresh-views back to poll, for the export of the new members' history (`members`).
//!
//! Adding a step: add a variant
//! to [`Step`] (with its `key`, `name` and attempt limit), a file beside this one with its
//! plain async function, an arm in [`execute`], and let [`next_for`] (or the step before it)
//! name it.

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

use super::policy::{self, Directive};
use super::{Session, SyncError, error_chain};
use crate::config::{JobConfig, SyncSettings};
use crate::metrics::{self, Endpoint};
use crate::queue::{self, QueueSettings, TaskQueue};
use crate::views::ViewSet;
use crate::warehouse::runs::{self, FileKind, RunRow, RunStatus};

mod finish;
mod kick_off;
mod load_file;
mod members;
mod poll;
mod refresh_views;

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
    RefreshViews {
        run_id: i64,
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
            | Step::RefreshViews { run_id, .. }
            | Step::Finish { run_id, .. } => *run_id,
        }
    }

    fn key(&self) -> String {
        match self {
            Step::KickOff { run_id, seq, .. } => format!("kickoff:{run_id}:{seq}"),
            Step::Poll { run_id, seq, .. } => format!("poll:{run_id}:{seq}"),
            Step::LoadFile { file_id, seq, .. } => format!("load:{file_id}:{seq}"),
            Step::RefreshViews { run_id, seq, .. } => format!("views:{run_id}:{seq}"),
            Step::Finish { run_id, seq, .. } => format!("finish:{run_id}:{seq}"),
        }
    }

    /// The same step as a new task (a new `seq`), one attempt further.
    fn next_attempt(&self) -> Step {
        let mut next = self.clone();
        match &mut next {
            Step::KickOff { seq, attempt, .. }
            | Step::LoadFile { seq, attempt, .. }
            | Step::RefreshViews { seq, attempt, .. }
            | Step::Finish { seq, attempt, .. }
            | Step::Poll {
                seq,
                errors: attempt,
                ..
            } => {
                *seq += 1;
                *attempt += 1;
            }
        }
        next
    }

    /// Tries of this step so far, this one included (1-based).
    fn tries(&self) -> u32 {
        match self {
            Step::KickOff { attempt, .. }
            | Step::LoadFile { attempt, .. }
            | Step::RefreshViews { attempt, .. }
            | Step::Finish { attempt, .. }
            | Step::Poll {
                errors: attempt, ..
            } => attempt + 1,
        }
    }

    /// Tries a step kind gets for failures the policy retries as steps. The kick-off is the
    /// one place a kick-off request is retried, so it gets the requests' budget.
    fn tries_allowed(&self, settings: &SyncSettings) -> u32 {
        match self {
            Step::KickOff { .. } => settings.request_attempts.max(1),
            Step::Poll { .. } => POLL_ERRORS,
            Step::LoadFile { .. } => LOAD_ATTEMPTS,
            Step::RefreshViews { .. } | Step::Finish { .. } => FINISH_ATTEMPTS,
        }
    }

    /// The FHIR endpoint a retry of this step repeats a request to, for the retry metric.
    fn endpoint(&self) -> Endpoint {
        match self {
            Step::KickOff { .. } => Endpoint::KickOff,
            Step::Poll { .. } => Endpoint::Status,
            Step::LoadFile { .. } => Endpoint::File,
            // Refreshing views makes no FHIR request; its retries are the database's.
            Step::RefreshViews { .. } | Step::Finish { .. } => Endpoint::Delete,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Step::KickOff { .. } => "kick-off",
            Step::Poll { .. } => "poll",
            Step::LoadFile { .. } => "load-file",
            Step::RefreshViews { .. } => "refresh-views",
            Step::Finish { .. } => "finish",
        }
    }
}

/// Consecutive failed polls (not throttled ones) before the run fails.
const POLL_ERRORS: u32 = 10;
const LOAD_ATTEMPTS: u32 = 5;
const FINISH_ATTEMPTS: u32 = 5;
/// Wait before a queued run looks again whether the job's active run has finished.
const BUSY_WAIT: Duration = Duration::from_secs(5);
/// Wait before a step whose run's failure could not be recorded runs again.
const RECORD_AGAIN: Duration = Duration::from_secs(5);

/// What a run in `status` needs next. The one rule: the step chain and start-up recovery both
/// queue by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    KickOff,
    Poll,
    /// Every file that may load now (deletion files wait for the output), and the finish once
    /// none is left.
    LoadFiles,
    /// The views, then the finish (the refresh step queues it).
    RefreshViews,
    Nothing,
}

pub fn next_for(status: RunStatus) -> Next {
    match status {
        RunStatus::Queued | RunStatus::KickingOff => Next::KickOff,
        RunStatus::Exporting => Next::Poll,
        RunStatus::Loading => Next::LoadFiles,
        RunStatus::Completing => Next::RefreshViews,
        RunStatus::Succeeded
        | RunStatus::Partial
        | RunStatus::Failed
        | RunStatus::Cancelled
        | RunStatus::Skipped => Next::Nothing,
    }
}

/// Everything a worker needs to execute steps. Shared by all workers of a process.
pub struct SyncContext {
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
    /// Cancelled when this process stops taking work and its grace period is over: running
    /// loads give their files back instead of being cut off holding a lease.
    stopping: CancellationToken,
    /// File leases this process holds (file id → lease owner), handed back at shutdown.
    leases: std::sync::Mutex<HashMap<i64, String>>,
    /// The analytics views every run refreshes (none until [`SyncContext::set_views`]).
    views: std::sync::RwLock<Arc<ViewSet>>,
}

impl SyncContext {
    pub fn new(
        pool: PgPool,
        settings: SyncSettings,
        queue_settings: QueueSettings,
        jobs: Vec<JobConfig>,
    ) -> Arc<Self> {
        let queue = TaskQueue::new(pool.clone(), QUEUE, queue_settings);
        Arc::new(SyncContext {
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
            stopping: CancellationToken::new(),
            leases: std::sync::Mutex::new(HashMap::new()),
            views: std::sync::RwLock::new(Arc::new(ViewSet::default())),
        })
    }

    /// Sets the analytics views the runs of this process refresh.
    pub fn set_views(&self, views: Arc<ViewSet>) {
        *self.views.write().unwrap_or_else(|e| e.into_inner()) = views;
    }

    /// This context with `views` set (see [`SyncContext::set_views`]).
    pub fn with_views(self: Arc<Self>, views: Arc<ViewSet>) -> Arc<Self> {
        self.set_views(views);
        self
    }

    /// A context for driving one run of `job` in the foreground (`run_job`): the same
    /// database, settings and views, with workers, leases and sessions of its own, so that
    /// stopping them when the run ends stops nothing else.
    pub fn foreground(&self, job: &JobConfig) -> Arc<Self> {
        let ctx = SyncContext::new(
            self.pool.clone(),
            self.settings.clone(),
            self.queue.settings().clone(),
            vec![job.clone()],
        );
        ctx.set_views(self.views());
        ctx
    }

    pub fn views(&self) -> Arc<ViewSet> {
        self.views.read().unwrap_or_else(|e| e.into_inner()).clone()
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
        self.queue.push(step.clone(), &step.key(), delay).await?;
        Ok(())
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<i64, String>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands back every file lease this process still holds, so the next process need not
    /// wait one out.
    async fn release_leases(&self) {
        let held: Vec<(i64, String)> = self.leases().drain().collect();
        for (file_id, owner) in held {
            if let Err(e) = runs::release_file(&self.pool, file_id, &owner).await {
                tracing::warn!(file.id = file_id, error = %e, "could not hand back a file lease");
            }
        }
    }
}

/// Runs the step workers of this process until `shutdown` is cancelled, lets running steps
/// finish for up to `grace`, then stops the loads still running (their files go back on the
/// queue) and hands back every file lease.
pub async fn run_workers(
    ctx: Arc<SyncContext>,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let concurrency = ctx.queue.settings().concurrency;
    let name = ctx.owner.clone();
    let workers = ctx.clone();
    let monitor = Monitor::new()
        .register(move |restarts| {
            WorkerBuilder::new(format!("{name}-{restarts}"))
                .backend(workers.queue.worker_backend())
                .data(workers.clone())
                .concurrency(concurrency)
                .build(handle_step)
        })
        // A database outage ends a worker's task stream; start it again rather than exit.
        .should_restart(|_, error| {
            tracing::warn!(error = %error, "queue worker stopped, restarting it");
            true
        })
        .shutdown_timeout(grace);
    let ran = monitor
        .run_with_signal(async move {
            shutdown.cancelled().await;
            Ok(())
        })
        .await;
    ctx.stopping.cancel();
    // A load that saw the cancellation releases its own lease; one whose future the monitor
    // dropped cannot, so every lease still on the books is released here.
    tokio::task::yield_now().await;
    ctx.release_leases().await;
    ran?;
    Ok(())
}

/// The queue handler. It never returns an error to apalis: each failure becomes the retry
/// policy's directive here, and a panic fails the run instead of the worker.
async fn handle_step(step: Step, ctx: Data<Arc<SyncContext>>) -> Result<(), BoxDynError> {
    let ctx: Arc<SyncContext> = (*ctx).clone();
    let _slot = FreedOnDrop(&ctx.queue);
    let run_id = step.run_id();
    // `job.name` is filled in by `load_run`, the first thing every step does, so every line a
    // step logs about its work carries the job and the run.
    let span = tracing::info_span!(
        "step",
        job.name = tracing::field::Empty,
        run.id = run_id,
        step = step.name()
    );
    let outcome = AssertUnwindSafe(tracing::Instrument::instrument(
        execute(&ctx, step.clone()),
        span.clone(),
    ))
    .catch_unwind()
    .await;
    let _entered = span.enter();
    let (message, retryable, hint) = match outcome {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(error)) => {
            let backoff = super::retry_policy(&ctx.settings).backoff();
            match policy::directive(
                &error,
                step.tries(),
                step.tries_allowed(&ctx.settings),
                &backoff,
            ) {
                Directive::Retry { delay } => {
                    let next = step.next_attempt();
                    let (attempt, retry_in_ms) = (next.tries(), delay.as_millis() as u64);
                    match (&step, &error) {
                        (Step::KickOff { .. }, SyncError::Export(_)) => {
                            tracing::warn!(error = %error_chain(&error), attempt, retry_in_ms, "export kick-off refused for now, retrying")
                        }
                        _ => {
                            tracing::warn!(error = %error_chain(&error), attempt, retry_in_ms, "step failed, retrying")
                        }
                    }
                    if push_patiently(&ctx, next, delay).await {
                        let _ = runs::count_retry(&ctx.pool, run_id).await;
                        if let SyncError::Export(_) = error
                            && let Ok(run) = runs::load(&ctx.pool, run_id).await
                        {
                            metrics::http_retry(&run.job, step.endpoint());
                        }
                        return Ok(());
                    }
                    (error_chain(&error), true, None)
                }
                Directive::Yield => {
                    tracing::info!(reason = %error_chain(&error), "step yielded");
                    if let SyncError::Stopped = error {
                        // The work goes back on the queue for whichever process is up next.
                        let _ = push_patiently(&ctx, step.next_attempt(), Duration::ZERO).await;
                    }
                    return Ok(());
                }
                Directive::Fail { retryable, hint } => (error_chain(&error), retryable, hint),
            }
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            (
                format!("internal error: a step panicked: {message}"),
                false,
                None,
            )
        }
    };
    tracing::error!(error = %message, retryable, "run failed");
    ctx.forget_session(run_id).await;
    // The failure alert is sent by the ops sweep, which claims it once across processes, so
    // it goes out even if this process dies right after this statement.
    if let Err(e) = runs::fail(&ctx.pool, run_id, &message, retryable, hint.as_deref()).await {
        // Dropping the task now would leave the run with nothing queued: stranded until a
        // `serve` start-up. The step runs again later instead, and fails (or not) then.
        tracing::error!(error = %e, "could not record the failed run; trying the step again later");
        if !push_patiently(&ctx, step.next_attempt(), RECORD_AGAIN).await {
            tracing::error!(
                "cannot queue the step either; the next `serve` start-up resumes the run"
            );
        }
    }
    Ok(())
}

/// Tells the queue a worker slot is free when a step ends, however it ends.
struct FreedOnDrop<'a>(&'a TaskQueue<Step>);

impl Drop for FreedOnDrop<'_> {
    fn drop(&mut self) {
        self.0.task_done();
    }
}

/// Pushes a step, retrying the push itself for a while: it fails when the database is away,
/// and a step that is never pushed leaves its run waiting until the next `serve` start-up.
async fn push_patiently(ctx: &SyncContext, step: Step, delay: Duration) -> bool {
    let backoff = policy::DATABASE_BACKOFF;
    for attempt in 1..=policy::DATABASE_TRIES {
        match ctx.push(step.clone(), delay).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), attempt, "cannot queue the next step yet");
                tokio::time::sleep(backoff.delay(attempt.min(6), None)).await;
            }
        }
    }
    false
}

async fn execute(ctx: &SyncContext, step: Step) -> Result<(), SyncError> {
    match step {
        Step::KickOff {
            run_id,
            seq,
            attempt,
        } => kick_off::run(ctx, run_id, seq, attempt).await,
        Step::Poll {
            run_id,
            seq,
            errors,
        } => poll::run(ctx, run_id, seq, errors).await,
        Step::LoadFile {
            run_id,
            file_id,
            seq,
            attempt,
        } => load_file::run(ctx, run_id, file_id, seq, attempt).await,
        Step::RefreshViews { run_id, .. } => refresh_views::run(ctx, run_id).await,
        Step::Finish { run_id, .. } => finish::run(ctx, run_id).await,
    }
}

/// Reads the run a step is about and names its job on the step's span (the queue task only
/// carries the run id). Call it once per step: a span shows each recording of a field.
async fn load_run(ctx: &SyncContext, run_id: i64) -> Result<RunRow, SyncError> {
    let run = runs::load(&ctx.pool, run_id).await?;
    tracing::Span::current().record("job.name", run.job.as_str());
    Ok(run)
}

fn job_of(ctx: &SyncContext, run: &RunRow) -> Result<Arc<JobConfig>, SyncError> {
    ctx.job(&run.job)
        .ok_or_else(|| SyncError::JobNotConfigured {
            job: run.job.clone(),
        })
}

/// Adds the retries a step's requests made to the run's count.
async fn add_retries(ctx: &SyncContext, run_id: i64, retries: &AtomicU64) -> Result<(), SyncError> {
    let count = retries.load(Ordering::Relaxed);
    if count > 0 {
        runs::add_retries(&ctx.pool, run_id, count).await?;
    }
    Ok(())
}

/// Queues the step the run's persisted state calls for next ([`next_for`]). A state change
/// and the push of the step after it are two writes; if the push failed (the database went
/// away between them), the step is retried, finds the state already moved, and lands here.
/// The step chain pushes with `seq` 0 (the first key of each step), so when the step was
/// queued after all this adds nothing; recovery passes a fresh `seq`.
async fn queue_next(ctx: &SyncContext, run_id: i64, seq: u32) -> Result<(), SyncError> {
    let Some(status) = runs::status(&ctx.pool, run_id).await? else {
        return Ok(());
    };
    match next_for(status) {
        Next::KickOff => {
            ctx.push(
                Step::KickOff {
                    run_id,
                    seq,
                    attempt: 0,
                },
                Duration::ZERO,
            )
            .await
        }
        Next::Poll => {
            let seq = phase_seq(ctx, run_id, seq).await?;
            ctx.push(
                Step::Poll {
                    run_id,
                    seq,
                    errors: 0,
                },
                Duration::ZERO,
            )
            .await
        }
        Next::LoadFiles => {
            let loadable = runs::loadable_files(&ctx.pool, run_id).await?;
            if loadable.is_empty() {
                return finish_if_done(ctx, run_id, seq).await;
            }
            for file_id in loadable {
                push_load(ctx, run_id, file_id, seq).await?;
            }
            Ok(())
        }
        Next::RefreshViews => finish_if_done(ctx, run_id, seq).await,
        Next::Nothing => Ok(()),
    }
}

/// Where the `seq` of a run's member export's polls and views refresh starts: far past any
/// first export's, so their idempotency keys (`poll:{run}:{seq}`, `views:{run}:{seq}`) are
/// new, not duplicates of the first export's steps that the queue would drop.
const MEMBER_EXPORT_SEQ: u32 = 1 << 30;

/// `seq` for the run's current export: moved past the first export's in a member export.
async fn phase_seq(ctx: &SyncContext, run_id: i64, seq: u32) -> Result<u32, SyncError> {
    Ok(if runs::load(&ctx.pool, run_id).await?.member_export {
        seq.saturating_add(MEMBER_EXPORT_SEQ)
    } else {
        seq
    })
}

async fn push_load(
    ctx: &SyncContext,
    run_id: i64,
    file_id: i64,
    seq: u32,
) -> Result<(), SyncError> {
    ctx.push(
        Step::LoadFile {
            run_id,
            file_id,
            seq,
            attempt: 0,
        },
        Duration::ZERO,
    )
    .await
}

/// Moves a run whose files are all loaded to `completing` and queues its views' refresh, which
/// queues the finish.
async fn finish_if_done(ctx: &SyncContext, run_id: i64, seq: u32) -> Result<(), SyncError> {
    runs::all_files_loaded(&ctx.pool, run_id).await?;
    if runs::status(&ctx.pool, run_id).await? == Some(RunStatus::Completing) {
        let seq = phase_seq(ctx, run_id, seq).await?;
        ctx.push(
            Step::RefreshViews {
                run_id,
                seq,
                attempt: 0,
            },
            Duration::ZERO,
        )
        .await?;
    }
    Ok(())
}

/// After a file of `kind` loaded: queue what it unblocks, and the finish when it was the last.
/// Output and error files were queued when the manifest came; the deletion files wait for the
/// last of them (an export's output lists what existed at its transactionTime, so this run's
/// output must load before this run's deletions of the same resources), and are queued once,
/// by whichever file finished last. So a run's queue work is linear in its files.
async fn file_done(ctx: &SyncContext, run_id: i64, kind: FileKind) -> Result<(), SyncError> {
    let (others_left, deletions_left) = runs::files_left(&ctx.pool, run_id).await?;
    if others_left > 0 {
        return Ok(());
    }
    if deletions_left > 0 {
        // Only the output's last file unblocks them; a deletion file finishing changes nothing.
        if kind != FileKind::Deleted {
            for file_id in
                runs::unloaded_files_of_kind(&ctx.pool, run_id, FileKind::Deleted).await?
            {
                push_load(ctx, run_id, file_id, 0).await?;
            }
        }
        return Ok(());
    }
    finish_if_done(ctx, run_id, 0).await
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

/// At start-up: re-queues what every unfinished run that nothing has touched for a while calls
/// for next ([`next_for`], the step chain's own rule) — its process died between changing the
/// run's state and queueing the next step, or the queue lost the task. Steps are idempotent, so
/// an extra push is harmless.
pub async fn resume_stranded(ctx: &SyncContext, idle: Duration) -> Result<usize, SyncError> {
    let stranded = runs::idle_unfinished_runs(&ctx.pool, idle.as_secs_f64()).await?;
    // A sequence number no earlier push used: the current time.
    let seq = time::OffsetDateTime::now_utc().unix_timestamp() as u32;
    for (run_id, status) in &stranded {
        tracing::info!(run.id = run_id, run.status = %status, next = ?next_for(*status), "resuming a stranded run");
        queue_next(ctx, *run_id, seq).await?;
    }
    Ok(stranded.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_names_its_next_step() {
        let expected = [
            (RunStatus::Queued, Next::KickOff),
            (RunStatus::KickingOff, Next::KickOff),
            (RunStatus::Exporting, Next::Poll),
            (RunStatus::Loading, Next::LoadFiles),
            (RunStatus::Completing, Next::RefreshViews),
            (RunStatus::Succeeded, Next::Nothing),
            (RunStatus::Partial, Next::Nothing),
            (RunStatus::Failed, Next::Nothing),
            (RunStatus::Cancelled, Next::Nothing),
            (RunStatus::Skipped, Next::Nothing),
        ];
        assert_eq!(expected.len(), RunStatus::ALL.len());
        for (status, next) in expected {
            assert_eq!(next_for(status), next, "{status}");
        }
    }

    #[test]
    fn a_retry_is_a_new_task_one_try_further() {
        let step = Step::LoadFile {
            run_id: 1,
            file_id: 9,
            seq: 0,
            attempt: 0,
        };
        let next = step.next_attempt();
        assert_eq!(step.tries(), 1);
        assert_eq!(next.tries(), 2);
        assert_ne!(step.key(), next.key());
        assert_eq!(next.key(), "load:9:1");
    }

    #[test]
    fn a_kick_off_gets_the_request_budget() {
        let settings = SyncSettings {
            request_attempts: 3,
            ..SyncSettings::default()
        };
        let kick_off = Step::KickOff {
            run_id: 1,
            seq: 0,
            attempt: 0,
        };
        assert_eq!(kick_off.tries_allowed(&settings), 3);
    }
}
