//! The PostgreSQL-backed task queue (apalis with its Postgres storage), wrapped so the rest of
//! the crate sees three things: push a task with an idempotency key and a delay, build a worker
//! backend that wakes up promptly, and clean up old queue rows.
//!
//! This module knows nothing of FHIR: tasks are any serde type. It also hides apalis' sharp
//! edges (see `shared/reference/stack.md`): the queue name is always set explicitly, every task
//! gets `max_attempts = 1` because retries are scheduled by the caller with a real delay (the
//! database would otherwise re-run a failed task at once), worker names are unique per process
//! start (a reused name strands its tasks), and workers poll on an interval as well as on
//! LISTEN/NOTIFY so delayed tasks start on time.

use std::marker::PhantomData;
use std::time::Duration;

use apalis::prelude::{Strategy, TaskBuilder, TaskSink};
use apalis_postgres::{PostgresStorage, Pubsub};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;

/// How queue workers behave. Every field has a default suitable for production.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// Tasks one process runs at the same time. Default 4.
    pub concurrency: usize,
    /// Seconds between worker heartbeats. Default 10.
    pub heartbeat_interval_seconds: u64,
    /// Missed heartbeats after which another process takes over a worker's tasks. Default 3,
    /// so a killed process's work resumes elsewhere after about 30 s.
    pub missed_heartbeats: usize,
    /// Milliseconds between polls for tasks whose delay has passed. Default 500.
    pub poll_interval_ms: u64,
    /// Days finished tasks are kept in `apalis.jobs` before the cleanup removes them. Default 7.
    pub retention_days: u32,
    /// Seconds a file load is leased to a worker; renewed every third of it while loading. A
    /// killed worker's file is taken over once its lease lapses. Default 60.
    pub file_lease_seconds: u64,
    /// Seconds `serve` waits on SIGTERM for running steps before exiting; what is left resumes
    /// in the next process from its checkpoint. Default 30.
    pub shutdown_grace_seconds: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            concurrency: 4,
            heartbeat_interval_seconds: 10,
            missed_heartbeats: 3,
            poll_interval_ms: 500,
            retention_days: 7,
            file_lease_seconds: 60,
            shutdown_grace_seconds: 30,
        }
    }
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot queue the task")]
pub struct QueueError(#[source] pub apalis::prelude::BoxDynError);

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// A task with the same idempotency key exists already (another process, or a retry of
    /// the same step, queued it first); nothing was added.
    Duplicate,
}

/// Creates or updates the queue's own schema (`apalis`). Idempotent.
pub async fn setup(pool: &PgPool) -> Result<(), apalis_postgres::Error> {
    PostgresStorage::<()>::setup(pool).await
}

/// A named queue of `T` tasks.
pub struct TaskQueue<T> {
    pool: PgPool,
    name: String,
    settings: QueueSettings,
    /// Signalled each time this process finishes a task: a free worker slot fetches the next
    /// due tasks at once instead of waiting for the next poll tick.
    freed: std::sync::Arc<tokio::sync::Notify>,
    _task: PhantomData<fn() -> T>,
}

impl<T> Clone for TaskQueue<T> {
    fn clone(&self) -> Self {
        TaskQueue {
            pool: self.pool.clone(),
            name: self.name.clone(),
            settings: self.settings.clone(),
            freed: self.freed.clone(),
            _task: PhantomData,
        }
    }
}

impl<T> TaskQueue<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + Unpin + 'static,
{
    pub fn new(pool: PgPool, name: &str, settings: QueueSettings) -> Self {
        TaskQueue {
            pool,
            name: name.to_string(),
            settings,
            freed: std::sync::Arc::new(tokio::sync::Notify::new()),
            _task: PhantomData,
        }
    }

    /// Tells this process's workers that a task ended and a slot is free, so they fetch the
    /// next due tasks now: otherwise a run of many small files waits a poll tick per batch.
    pub fn task_done(&self) {
        self.freed.notify_one();
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    fn config(&self) -> apalis_postgres::Config {
        apalis_postgres::Config::default()
            .queue(&self.name)
            .heartbeat_interval(Duration::from_secs(
                self.settings.heartbeat_interval_seconds,
            ))
            .missed_heartbeats(self.settings.missed_heartbeats)
    }

    fn storage(&self) -> PostgresStorage<T> {
        PostgresStorage::new(&self.pool).with_config(self.config())
    }

    /// Queues `task` to run after `delay`. `key` makes the push idempotent: a second push with
    /// the same key, from this process or another, is reported as [`Pushed::Duplicate`].
    pub async fn push(&self, task: T, key: &str, delay: Duration) -> Result<Pushed, QueueError> {
        let mut storage = self.storage();
        let task = TaskBuilder::new(task)
            // One attempt: failures are retried by the caller pushing a new task with a delay.
            // Orphan recovery (a dead worker) still re-runs the task, as it resets it to pending.
            .max_attempts(1)
            .run_after(delay)
            .idempotency_key(key)
            .build();
        match storage.push_task(task).await {
            Ok(()) => Ok(Pushed::Queued),
            Err(apalis::prelude::TaskSinkError::PushError(e)) if is_unique_violation(&e) => {
                Ok(Pushed::Duplicate)
            }
            Err(e) => Err(QueueError(e.into())),
        }
    }

    /// A backend for one worker: tasks are fetched once at start-up, on NOTIFY (prompt pick-up
    /// of new tasks), whenever this process finishes a task ([`TaskQueue::task_done`]: the
    /// next due task starts at once) and on an interval (delayed tasks, and notifications
    /// missed while reconnecting).
    pub fn worker_backend(&self) -> apalis::prelude::PollWith<PostgresStorage<T>, Strategy> {
        use apalis::prelude::BackendExt;
        use futures::StreamExt;
        // apalis' interval first fires one interval after the worker starts, and a NOTIFY sent
        // before the worker listened is lost: without this first fetch, a task queued just
        // before the workers start (every `fhir-sync run`) waits a whole poll interval. The
        // stream yields once and then stays pending, so it never fetches again.
        let at_start = futures::stream::once(futures::future::ready(()))
            .chain(futures::stream::pending::<()>());
        let freed = Box::pin(futures::stream::unfold(
            self.freed.clone(),
            |freed| async move {
                freed.notified().await;
                Some(((), freed))
            },
        ));
        let strategy = Strategy::new()
            .stream(at_start)
            .stream(freed)
            .stream(Pubsub::new(self.pool.clone(), self.name.clone()))
            .interval(Duration::from_millis(self.settings.poll_interval_ms));
        self.storage().poll_with_strategy(strategy)
    }

    /// Tasks of this queue not yet finished (pending, queued or running).
    pub async fn backlog(&self) -> sqlx::Result<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status IN ('Pending', 'Queued', 'Running')",
        )
        .bind(&self.name)
        .fetch_one(&self.pool)
        .await
    }

    /// How many tasks of this queue wait or run, and how long the oldest due one has waited.
    /// Read from the database, so every process sees the same numbers.
    pub async fn stats(&self) -> sqlx::Result<QueueStats> {
        let (scheduled, pending, queued, running, oldest_due_seconds) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'Pending' AND run_at > now()),
                    count(*) FILTER (WHERE status = 'Pending' AND run_at <= now()),
                    count(*) FILTER (WHERE status = 'Queued'),
                    count(*) FILTER (WHERE status = 'Running'),
                    coalesce(extract(epoch FROM now() - min(run_at)
                        FILTER (WHERE status IN ('Pending', 'Queued') AND run_at <= now())), 0)::float8
             FROM apalis.jobs WHERE job_type = $1 AND status IN ('Pending', 'Queued', 'Running')",
        )
        .bind(&self.name)
        .fetch_one(&self.pool)
        .await?;
        Ok(QueueStats {
            scheduled,
            pending,
            queued,
            running,
            oldest_due_seconds,
        })
    }

    /// Deletes finished tasks older than the retention period and workers not seen for a day.
    /// apalis keeps both forever otherwise.
    pub async fn purge(&self) -> sqlx::Result<u64> {
        let days = i32::try_from(self.settings.retention_days).unwrap_or(i32::MAX);
        let jobs = sqlx::query(
            "DELETE FROM apalis.jobs WHERE job_type = $1 AND status IN ('Done', 'Failed', 'Killed')
               AND done_at < now() - make_interval(days => $2)",
        )
        .bind(&self.name)
        .bind(days)
        .execute(&self.pool)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM apalis.workers WHERE worker_type = $1 AND last_seen < now() - interval '1 day'")
            .bind(&self.name)
            .execute(&self.pool)
            .await?;
        Ok(jobs)
    }
}

/// A snapshot of one queue (see [`TaskQueue::stats`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueStats {
    /// Pending tasks whose delay has not passed yet (a poll after `Retry-After`, a retry).
    pub scheduled: i64,
    /// Pending tasks that are due: they wait for a free worker.
    pub pending: i64,
    /// Tasks a worker has fetched and not started yet.
    pub queued: i64,
    pub running: i64,
    /// Seconds the oldest due task (pending or queued) has waited since it became due; 0 when
    /// none waits. Growing means no worker is taking work.
    pub oldest_due_seconds: f64,
}

fn is_unique_violation(error: &apalis_postgres::Error) -> bool {
    matches!(error, apalis_postgres::Error::Database(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505"))
}

/// A worker name unique to this process start: a restarted process must not reuse its old
/// name, or apalis leaves the old incarnation's tasks marked running forever.
pub fn worker_name(role: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{role}-{host}-{}-{}", std::process::id(), &id[..8])
}
