//! The run store: the only code that writes `fhir_sync.run` and `fhir_sync.run_file` (the
//! loader's line checkpoint excepted, which must commit with its batch), and the typed states
//! those rows hold.
//!
//! Every transition of a run is one guarded statement (`... WHERE status = <expected>`), so a
//! step that runs twice, or late, changes nothing:
//!
//! ```text
//! queued → kicking_off → exporting → loading → completing → succeeded | partial
//!    └──────────┴────────────┴──────────┴───────────┴──────→ failed | cancelled
//! (a tick that finds the job busy records a 'skipped' run instead)
//! ```
//!
//! A `partial` run finished and loaded everything it got, but its export was not complete
//! (error files, an empty full export, a Patient count past the job's gate): the watermark
//! stays where it was unless the job says otherwise. It is terminal, like `succeeded`.
//!
//! These rows are the history ops people read (through `ops::report`); they outlive any queue
//! entry. URLs are stored without query strings (the signed download link only until the file
//! is loaded), errors without secrets. It knows nothing of HTTP or of the queue.

use std::fmt;
use std::str::FromStr;

use sqlx::PgPool;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};

pub use super::FileKind;
use crate::metrics::{self, BatchRows};

/// Maps a fieldless enum to the `text` values of a column (sqlx and serde both), one place per
/// enum: no status string literal outside these lists and the migrations.
macro_rules! text_enum {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        text_enum!(@impls $name { $($variant => $text),+ });

        impl $name {
            /// The database (and JSON) spelling.
            pub fn as_str(self) -> &'static str {
                self.text()
            }
        }
    };
    // `FileKind` has its `as_str` beside its definition in the loader.
    (@impls $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// Every spelling, comma-separated, for an error message.
            pub fn spellings() -> String {
                [$($text),+].join(", ")
            }

            fn text(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(text: &str) -> Result<Self, UnknownValue> {
                match text {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownValue {
                        what: stringify!($name),
                        value: other.chars().take(40).collect(),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.text())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.text() == *other
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.text())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.text(), buf)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        impl sqlx::Decode<'_, sqlx::Postgres> for $name {
            fn decode(value: PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(text.parse()?)
            }
        }
    };
}

/// A stored value no variant spells (a row written by a newer version, or a bug): an error,
/// never silently some default.
#[derive(Debug, thiserror::Error)]
#[error("{value:?} is not a known {what}")]
pub struct UnknownValue {
    what: &'static str,
    value: String,
}

/// Where a run is in its life (`fhir_sync.run.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunStatus {
    Queued,
    KickingOff,
    Exporting,
    Loading,
    Completing,
    Succeeded,
    /// Finished, but the export was not complete; see the run's `error` and `hint`.
    Partial,
    Failed,
    Cancelled,
    Skipped,
}

text_enum!(RunStatus {
    Queued => "queued",
    KickingOff => "kicking_off",
    Exporting => "exporting",
    Loading => "loading",
    Completing => "completing",
    Succeeded => "succeeded",
    Partial => "partial",
    Failed => "failed",
    Cancelled => "cancelled",
    Skipped => "skipped",
});

impl RunStatus {
    /// Statuses after which nothing more happens to a run.
    pub const TERMINAL: [RunStatus; 5] = [
        RunStatus::Succeeded,
        RunStatus::Partial,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Skipped,
    ];
    /// Statuses of a run that holds its job's one active slot.
    pub const ACTIVE: [RunStatus; 4] = [
        RunStatus::KickingOff,
        RunStatus::Exporting,
        RunStatus::Loading,
        RunStatus::Completing,
    ];

    /// Statuses of a run that has not finished: queued, or holding its job's slot.
    pub const UNFINISHED: [RunStatus; 5] = [
        RunStatus::Queued,
        RunStatus::KickingOff,
        RunStatus::Exporting,
        RunStatus::Loading,
        RunStatus::Completing,
    ];

    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }
}

/// Where a file of a run is (`fhir_sync.run_file.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileStatus {
    Pending,
    Loading,
    Loaded,
    Failed,
}

text_enum!(FileStatus {
    Pending => "pending",
    Loading => "loading",
    Loaded => "loaded",
    Failed => "failed",
});

text_enum!(@impls FileKind {
    Output => "output",
    Error => "error",
    Deleted => "deleted",
});

impl FileKind {
    /// The counter a committed batch of such a file goes to.
    pub fn batch_rows(self) -> BatchRows {
        match self {
            FileKind::Output => BatchRows::Resources,
            FileKind::Error => BatchRows::Outcomes,
            FileKind::Deleted => BatchRows::Deletions,
        }
    }
}

/// How a run was started (`fhir_sync.run.trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Manual,
    Schedule,
    CatchUp,
}

text_enum!(Trigger {
    Manual => "manual",
    Schedule => "schedule",
    CatchUp => "catch-up",
});

/// The columns of a run the steps need.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunRow {
    pub id: i64,
    pub job: String,
    pub status: RunStatus,
    pub status_url: Option<String>,
    pub since: Option<String>,
    pub full_export: bool,
    pub requires_access_token: Option<bool>,
    pub transaction_time: Option<String>,
    pub started_at: time::OffsetDateTime,
    /// The run is in (or past) its second export, of a group's new members.
    pub member_export: bool,
}

impl RunRow {
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }
}

/// The end state of a run, as a waiting caller reports it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunEnd {
    pub status: RunStatus,
    pub error: Option<String>,
    pub error_retryable: Option<bool>,
    pub hint: Option<String>,
    pub transaction_time: Option<String>,
    pub since: Option<String>,
    pub export_errors: i64,
}

/// One file of a manifest to register.
pub struct NewFile<'a> {
    pub kind: FileKind,
    pub resource_type: &'a str,
    pub url: &'a url::Url,
    pub count: Option<u64>,
}

/// A registered file, as the load step needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FileRow {
    pub id: i64,
    pub run_id: i64,
    pub kind: FileKind,
    pub resource_type: String,
    /// The signed link as the manifest gave it; `None` once the file is loaded.
    pub download_url: Option<String>,
    pub manifest_count: Option<i64>,
    pub status: FileStatus,
    /// The entry's place among the manifest's files of its kind, from 0.
    pub position: Option<i32>,
}

/// Resources loaded by a run, per type.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, PartialEq, Eq)]
pub struct TypeCount {
    pub resource_type: String,
    pub files: i64,
    pub resources_loaded: i64,
    pub lines_rejected: i64,
}

const FILE_COLUMNS: &str =
    "id, run_id, kind, resource_type, download_url, manifest_count, status, position";

pub async fn load(pool: &PgPool, run_id: i64) -> sqlx::Result<RunRow> {
    sqlx::query_as(
        "SELECT id, job, status, status_url, since, full_export, requires_access_token, transaction_time, started_at,
                member_export
         FROM fhir_sync.run WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(pool)
    .await
}

/// The run's status, or `None` when there is no such run.
pub async fn status(pool: &PgPool, run_id: i64) -> sqlx::Result<Option<RunStatus>> {
    sqlx::query_scalar("SELECT status FROM fhir_sync.run WHERE id = $1")
        .bind(run_id)
        .fetch_optional(pool)
        .await
}

/// The status and the server's progress text, for a caller that watches a run.
pub async fn status_and_progress(
    pool: &PgPool,
    run_id: i64,
) -> sqlx::Result<(RunStatus, Option<String>)> {
    sqlx::query_as("SELECT status, progress FROM fhir_sync.run WHERE id = $1")
        .bind(run_id)
        .fetch_one(pool)
        .await
}

pub async fn run_end(pool: &PgPool, run_id: i64) -> sqlx::Result<RunEnd> {
    sqlx::query_as(
        "SELECT status, error, error_retryable, hint, transaction_time, since, export_errors
         FROM fhir_sync.run WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(pool)
    .await
}

/// Creates a queued run. For a scheduled tick, returns `None` when another process already
/// created the run for the same tick.
pub async fn create(
    pool: &PgPool,
    job: &str,
    fhir_base_url: &str,
    trigger: Trigger,
    scheduled_for: Option<time::OffsetDateTime>,
    full_export: bool,
) -> sqlx::Result<Option<i64>> {
    let created: Option<i64> = sqlx::query_scalar(
        "INSERT INTO fhir_sync.run (job, source, fhir_base_url, status, trigger, scheduled_for, full_export)
         VALUES ($1, $1, $2, $3, $4, $5, $6)
         ON CONFLICT (job, scheduled_for) WHERE scheduled_for IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(job)
    .bind(fhir_base_url)
    .bind(RunStatus::Queued)
    .bind(trigger)
    .bind(scheduled_for)
    .bind(full_export)
    .fetch_optional(pool)
    .await?;
    // Counted only by the process whose insert made the run: a tick seen by several
    // processes is one run.
    if created.is_some() {
        metrics::run_started(job);
    }
    Ok(created)
}

/// Creates a run that loads local files instead of an export (the views conformance
/// harness), with one output file per `(resource type, url)`: a manual run, left queued so no
/// worker or recovery ever picks it up as its own. Returns the run id and the file ids, in
/// the order given.
pub async fn create_local(
    pool: &PgPool,
    job: &str,
    base_url: &str,
    files: &[(&str, &str)],
) -> sqlx::Result<(i64, Vec<i64>)> {
    let mut tx = pool.begin().await?;
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO fhir_sync.run (job, source, fhir_base_url, status, trigger)
         VALUES ($1, $1, $2, $3, $4) RETURNING id",
    )
    .bind(job)
    .bind(base_url)
    .bind(RunStatus::Queued)
    .bind(Trigger::Manual)
    .fetch_one(&mut *tx)
    .await?;
    let mut ids = Vec::with_capacity(files.len());
    for (position, (resource_type, url)) in files.iter().enumerate() {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO fhir_sync.run_file (run_id, kind, resource_type, url, position)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(run_id)
        .bind(FileKind::Output)
        .bind(resource_type)
        .bind(url)
        .bind(position as i32)
        .fetch_one(&mut *tx)
        .await?;
        ids.push(id);
    }
    tx.commit().await?;
    Ok((run_id, ids))
}

/// Compares the manifest's count with what the file's attempts loaded and rejected in total,
/// and records the verdict on the file: the mismatch, or `None` when the counts agree (or the
/// manifest gave none). Not for error files: their `count` (when a server sends one) is of
/// the resources that failed, not of the OperationOutcome lines, and what they report already
/// makes the run partial.
pub async fn check_count(pool: &PgPool, file_id: i64) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "UPDATE fhir_sync.run_file SET count_mismatch =
             CASE WHEN manifest_count IS NOT NULL AND kind <> $2
                       AND manifest_count <> resources_loaded + lines_rejected
                  THEN format('the manifest counts %s lines, but %s loaded and %s were rejected',
                              manifest_count, resources_loaded, lines_rejected)
             END
         WHERE id = $1 RETURNING count_mismatch",
    )
    .bind(file_id)
    .bind(FileKind::Error)
    .fetch_one(pool)
    .await
}

/// Records a tick that was not run because the job was busy.
pub async fn record_skipped(
    pool: &PgPool,
    job: &str,
    fhir_base_url: &str,
    scheduled_for: time::OffsetDateTime,
    busy_run: i64,
) -> sqlx::Result<()> {
    let inserted = sqlx::query(
        "INSERT INTO fhir_sync.run (job, source, fhir_base_url, status, trigger, scheduled_for, finished_at, error)
         VALUES ($1, $1, $2, $5, $6, $3, now(), $4)
         ON CONFLICT (job, scheduled_for) WHERE scheduled_for IS NOT NULL DO NOTHING",
    )
    .bind(job)
    .bind(fhir_base_url)
    .bind(scheduled_for)
    .bind(format!("skipped: run {busy_run} of this job was still in progress (schedule.overlap = \"skip\")"))
    .bind(RunStatus::Skipped)
    .bind(Trigger::Schedule)
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 1 {
        metrics::run_skipped(job);
    }
    Ok(())
}

fn unfinished() -> Vec<RunStatus> {
    RunStatus::ALL
        .iter()
        .copied()
        .filter(|s| !s.is_terminal())
        .collect()
}

/// The job's unfinished run (queued or active), if any.
pub async fn unfinished_run(pool: &PgPool, job: &str) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT id FROM fhir_sync.run WHERE job = $1 AND status = ANY($2) ORDER BY id LIMIT 1",
    )
    .bind(job)
    .bind(unfinished())
    .fetch_optional(pool)
    .await
}

/// Unfinished runs nothing has touched for `idle_seconds`, with their status.
pub async fn idle_unfinished_runs(
    pool: &PgPool,
    idle_seconds: f64,
) -> sqlx::Result<Vec<(i64, RunStatus)>> {
    sqlx::query_as(
        "SELECT id, status FROM fhir_sync.run
         WHERE status = ANY($2) AND updated_at < now() - make_interval(secs => $1)",
    )
    .bind(idle_seconds)
    .bind(unfinished())
    .fetch_all(pool)
    .await
}

/// Moves `queued` → `kicking_off`. `Ok(false)` when the run was not queued, or when an older
/// run of the same job is still queued (runs of a job start in the order they were created;
/// the caller tells the two apart by re-reading the status); `Err` with a unique violation when
/// another run of the job is active (the caller waits and tries again).
pub async fn start_kick_off(pool: &PgPool, run_id: i64, since: Option<&str>) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run r SET status = $3, since = $2, updated_at = now()
         WHERE r.id = $1 AND r.status = $4
           AND NOT EXISTS (SELECT 1 FROM fhir_sync.run o
                           WHERE o.job = r.job AND o.status = $4 AND o.id < r.id)",
    )
    .bind(run_id)
    .bind(since)
    .bind(RunStatus::KickingOff)
    .bind(RunStatus::Queued)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Stores the status URL and moves to `exporting`, in one statement: a restart that finds the
/// status URL polls it instead of starting a second export.
pub async fn exporting(
    pool: &PgPool,
    run_id: i64,
    request_url: &str,
    status_url: &str,
) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run SET status = $4, export_request = $2, status_url = $3, updated_at = now()
         WHERE id = $1 AND status = $5",
    )
    .bind(run_id)
    .bind(request_url)
    .bind(status_url)
    .bind(RunStatus::Exporting)
    .bind(RunStatus::KickingOff)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

pub async fn progress(pool: &PgPool, run_id: i64, progress: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE fhir_sync.run SET progress = $2 WHERE id = $1 AND progress IS DISTINCT FROM $2",
    )
    .bind(run_id)
    .bind(progress)
    .execute(pool)
    .await
    .map(drop)
}

/// Adds retries to the run's count (several workers add to it concurrently).
pub async fn add_retries(pool: &PgPool, run_id: i64, retries: u64) -> sqlx::Result<()> {
    sqlx::query("UPDATE fhir_sync.run SET retries = retries + $2 WHERE id = $1")
        .bind(run_id)
        .bind(retries as i64)
        .execute(pool)
        .await
        .map(drop)
}

/// Counts one retry of a queue step (its request is repeated as a new task).
pub async fn count_retry(pool: &PgPool, run_id: i64) -> sqlx::Result<()> {
    add_retries(pool, run_id, 1).await
}

/// The `Expires` header of the completed status response, as sent.
pub async fn expires(pool: &PgPool, run_id: i64, expires: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE fhir_sync.run SET export_expires = $2 WHERE id = $1")
        .bind(run_id)
        .bind(expires)
        .execute(pool)
        .await
        .map(drop)
}

/// Records that the run's export was deleted on the server (the first time counts).
pub async fn export_deleted(pool: &PgPool, run_id: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE fhir_sync.run SET export_deleted_at = coalesce(export_deleted_at, now()) WHERE id = $1")
        .bind(run_id)
        .execute(pool)
        .await
        .map(drop)
}

/// Moves `completing` → `exporting` for the run's second export, of its group's new members
/// (the first export is deleted on the server already): the new status URL is polled, its
/// files load beside the first export's. Once per run. `true` for the caller that moved it.
pub async fn start_member_export(
    pool: &PgPool,
    run_id: i64,
    request_url: &str,
    status_url: &str,
) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run SET status = $4, member_export = true, export_request = $2,
             status_url = $3, export_deleted_at = NULL, progress = NULL, updated_at = now()
         WHERE id = $1 AND status = $5 AND NOT member_export",
    )
    .bind(run_id)
    .bind(request_url)
    .bind(status_url)
    .bind(RunStatus::Exporting)
    .bind(RunStatus::Completing)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Records that the server refused for good (`status`: 403, 405, 501) to delete the run's
/// export: later runs' clean-up leaves it alone instead of asking, and warning, every time.
/// `true` the first time.
pub async fn export_delete_refused(pool: &PgPool, run_id: i64, status: u16) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run SET export_delete_refused = $2
         WHERE id = $1 AND export_delete_refused IS NULL",
    )
    .bind(run_id)
    .bind(i32::from(status))
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Records how many rows the run's reconciliation marked deleted.
pub async fn deletions_reconciled(pool: &PgPool, run_id: i64, rows: u64) -> sqlx::Result<()> {
    // Added up: a retried step finds nothing more to mark and must not erase the count.
    sqlx::query(
        "UPDATE fhir_sync.run SET deletions_reconciled = coalesce(deletions_reconciled, 0) + $2 WHERE id = $1",
    )
        .bind(run_id)
        .bind(rows as i64)
        .execute(pool)
        .await
        .map(drop)
}

/// Registers the manifest's files and moves `exporting` → `loading`, in one transaction.
/// Every entry is a file of its own, identified by its place in the manifest (never by its
/// URL, which is stored without its query string). Returns the registered files, or `None`
/// if the run was no longer exporting.
pub async fn manifest_ready(
    pool: &PgPool,
    run_id: i64,
    transaction_time: &str,
    requires_access_token: bool,
    files: &[NewFile<'_>],
) -> sqlx::Result<Option<Vec<FileRow>>> {
    let mut tx = pool.begin().await?;
    // A member export's transactionTime is not the run's: the watermark takes the first
    // export's, which covered the other members' changes only up to then.
    let moved = sqlx::query(
        "UPDATE fhir_sync.run SET status = $4,
             transaction_time = CASE WHEN member_export THEN transaction_time ELSE $2 END,
             requires_access_token = $3, progress = NULL, updated_at = now()
         WHERE id = $1 AND status = $5",
    )
    .bind(run_id)
    .bind(transaction_time)
    .bind(requires_access_token)
    .bind(RunStatus::Loading)
    .bind(RunStatus::Exporting)
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() != 1 {
        return Ok(None);
    }
    let mut kinds = Vec::with_capacity(files.len());
    let mut positions = Vec::with_capacity(files.len());
    // A member export's files follow the first export's: positions go on where they ended.
    let ends: Vec<(FileKind, i32)> = sqlx::query_as(
        "SELECT kind, max(position) + 1 FROM fhir_sync.run_file
         WHERE run_id = $1 AND position IS NOT NULL GROUP BY kind",
    )
    .bind(run_id)
    .fetch_all(&mut *tx)
    .await?;
    let slot_of = |kind: FileKind| match kind {
        FileKind::Output => 0,
        FileKind::Error => 1,
        FileKind::Deleted => 2,
    };
    let mut next = [0i32; 3];
    for (kind, end) in ends {
        next[slot_of(kind)] = end;
    }
    for file in files {
        let slot = slot_of(file.kind);
        kinds.push(file.kind.as_str());
        positions.push(next[slot]);
        next[slot] += 1;
    }
    let types: Vec<&str> = files.iter().map(|f| f.resource_type).collect();
    let urls: Vec<String> = files
        .iter()
        .map(|f| crate::transport::redacted(f.url))
        .collect();
    let links: Vec<&str> = files.iter().map(|f| f.url.as_str()).collect();
    let counts: Vec<Option<i64>> = files.iter().map(|f| f.count.map(|c| c as i64)).collect();
    // One statement for the whole manifest: thousands of files register in one round trip.
    sqlx::query(
        "INSERT INTO fhir_sync.run_file (run_id, kind, resource_type, url, download_url, manifest_count, position)
         SELECT $1, kind, resource_type, url, link, count, position
         FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::int[])
              WITH ORDINALITY AS f(kind, resource_type, url, link, count, position, n)
         ORDER BY n
         ON CONFLICT (run_id, kind, position) DO NOTHING",
    )
    .bind(run_id)
    .bind(&kinds)
    .bind(&types)
    .bind(&urls)
    .bind(&links)
    .bind(&counts)
    .bind(&positions)
    .execute(&mut *tx)
    .await?;
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {FILE_COLUMNS} FROM fhir_sync.run_file WHERE run_id = $1 ORDER BY id"
    )))
    .bind(run_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(rows))
}

/// Files of a run whose load may be queued now: output and error files not loaded yet, and
/// deletion files once no output or error file is left to load. For recovery: the step chain
/// queues each file once, when it is unblocked.
pub async fn loadable_files(pool: &PgPool, run_id: i64) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT id FROM fhir_sync.run_file f
         WHERE run_id = $1 AND status <> $2
           AND (kind <> $3 OR NOT EXISTS (
                SELECT 1 FROM fhir_sync.run_file o
                WHERE o.run_id = $1 AND o.kind <> $3 AND o.status <> $2))
         ORDER BY id",
    )
    .bind(run_id)
    .bind(FileStatus::Loaded)
    .bind(FileKind::Deleted)
    .fetch_all(pool)
    .await
}

/// How many files of a run are not loaded yet: (output and error files, deletion files).
pub async fn files_left(pool: &PgPool, run_id: i64) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE kind <> $3), count(*) FILTER (WHERE kind = $3)
         FROM fhir_sync.run_file WHERE run_id = $1 AND status <> $2",
    )
    .bind(run_id)
    .bind(FileStatus::Loaded)
    .bind(FileKind::Deleted)
    .fetch_one(pool)
    .await
}

/// The run's files of `kind` not loaded yet.
pub async fn unloaded_files_of_kind(
    pool: &PgPool,
    run_id: i64,
    kind: FileKind,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT id FROM fhir_sync.run_file WHERE run_id = $1 AND kind = $2 AND status <> $3 ORDER BY id",
    )
    .bind(run_id)
    .bind(kind)
    .bind(FileStatus::Loaded)
    .fetch_all(pool)
    .await
}

pub async fn file(pool: &PgPool, file_id: i64) -> sqlx::Result<FileRow> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {FILE_COLUMNS} FROM fhir_sync.run_file WHERE id = $1"
    )))
    .bind(file_id)
    .fetch_one(pool)
    .await
}

/// Takes (or renews) the lease on a file for `owner`. `false` when another live worker holds it.
pub async fn lease_file(
    pool: &PgPool,
    file_id: i64,
    owner: &str,
    seconds: u64,
) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run_file SET lease_owner = $2, lease_expires_at = now() + make_interval(secs => $3)
         WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_expires_at < now())",
    )
    .bind(file_id)
    .bind(owner)
    .bind(seconds as f64)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

pub async fn release_file(pool: &PgPool, file_id: i64, owner: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE fhir_sync.run_file SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1 AND lease_owner = $2",
    )
    .bind(file_id)
    .bind(owner)
    .execute(pool)
    .await
    .map(drop)
}

pub async fn file_started(pool: &PgPool, file_id: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE fhir_sync.run_file SET status = $2, started_at = coalesce(started_at, now()), error = NULL WHERE id = $1",
    )
    .bind(file_id)
    .bind(FileStatus::Loading)
    .execute(pool)
    .await
    .map(drop)
}

/// Counts one download attempt of a file.
pub async fn file_attempt(pool: &PgPool, file_id: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE fhir_sync.run_file SET attempts = attempts + 1 WHERE id = $1")
        .bind(file_id)
        .execute(pool)
        .await
        .map(drop)
}

/// Counts one refresh of a file's expired link and stores the fresh one.
pub async fn link_refreshed(pool: &PgPool, file_id: i64, link: &url::Url) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE fhir_sync.run_file SET link_refreshes = link_refreshes + 1, download_url = $2 WHERE id = $1",
    )
    .bind(file_id)
    .bind(link.as_str())
    .execute(pool)
    .await
    .map(drop)
}

/// Marks a file loaded. Its signed link is dropped: it is a credential and no longer needed.
pub async fn file_loaded(pool: &PgPool, file_id: i64, bytes: u64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE fhir_sync.run_file SET status = $3, finished_at = now(), bytes = bytes + $2, download_url = NULL
         WHERE id = $1",
    )
    .bind(file_id)
    .bind(bytes as i64)
    .bind(FileStatus::Loaded)
    .execute(pool)
    .await
    .map(drop)
}

pub async fn file_failed(pool: &PgPool, file_id: i64, bytes: u64, error: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE fhir_sync.run_file SET status = $4, finished_at = now(), bytes = bytes + $2, error = $3 WHERE id = $1",
    )
    .bind(file_id)
    .bind(bytes as i64)
    .bind(error)
    .bind(FileStatus::Failed)
    .execute(pool)
    .await
    .map(drop)
}

/// Moves `loading` → `completing` once every file is loaded. `true` for the one caller that
/// made the move: the statement re-checks both conditions under the row lock, so when two
/// files finish together exactly one of them moves the run on.
pub async fn all_files_loaded(pool: &PgPool, run_id: i64) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE fhir_sync.run SET status = $2, updated_at = now()
         WHERE id = $1 AND status = $3
           AND NOT EXISTS (SELECT 1 FROM fhir_sync.run_file WHERE run_id = $1 AND status <> $4)",
    )
    .bind(run_id)
    .bind(RunStatus::Completing)
    .bind(RunStatus::Loading)
    .bind(FileStatus::Loaded)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Sums the run's files into its totals, as part of an ending statement.
const TOTALS: &str =
    "SELECT coalesce(sum(resources_loaded) FILTER (WHERE kind = 'output'), 0) AS loaded,
                      coalesce(sum(lines_rejected), 0) AS rejected,
                      coalesce(sum(resources_loaded) FILTER (WHERE kind = 'error'), 0) AS outcomes
               FROM fhir_sync.run_file WHERE run_id = $1";

/// How a run that got through its files ends: `succeeded`, or `partial` with the reason and
/// what to look at, and whether the watermark moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub status: RunStatus,
    pub error: Option<String>,
    pub hint: Option<String>,
    pub advance_watermark: bool,
}

impl Completion {
    pub fn succeeded() -> Completion {
        Completion {
            status: RunStatus::Succeeded,
            error: None,
            hint: None,
            advance_watermark: true,
        }
    }
}

/// Moves `completing` → `succeeded`, totals the counts and advances the job's watermark, in one
/// transaction: the watermark never moves unless every file of the run is loaded.
pub async fn succeed(pool: &PgPool, run_id: i64) -> sqlx::Result<bool> {
    complete(pool, run_id, &Completion::succeeded()).await
}

/// Moves `completing` → `succeeded` or `partial` (`end.status`), totals the counts and, when
/// `end.advance_watermark`, advances the job's watermark, in one transaction: the watermark
/// never moves unless every file of the run is loaded, and a held watermark keeps pointing at
/// the last run that moved it (the next incremental run's `_since`).
pub async fn complete(pool: &PgPool, run_id: i64, end: &Completion) -> sqlx::Result<bool> {
    debug_assert!(matches!(
        end.status,
        RunStatus::Succeeded | RunStatus::Partial
    ));
    let mut tx = pool.begin().await?;
    let row: Option<(String, Option<String>, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE fhir_sync.run r SET status = $2, finished_at = now(), updated_at = now(), progress = NULL,
             error = $4, error_retryable = NULL, hint = $5,
             resources_loaded = t.loaded, lines_rejected = t.rejected, export_errors = t.outcomes
         FROM ({TOTALS}) t
         WHERE r.id = $1 AND r.status = $3
         RETURNING r.job, r.transaction_time, extract(epoch FROM r.finished_at - r.started_at)::float8",
    )))
    .bind(run_id)
    .bind(end.status)
    .bind(RunStatus::Completing)
    .bind(end.error.as_deref())
    .bind(end.hint.as_deref())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((job, transaction_time, duration)) = row else {
        return Ok(false);
    };
    if let Some(transaction_time) = transaction_time.filter(|_| end.advance_watermark) {
        sqlx::query(
            "INSERT INTO fhir_sync.watermark (job, transaction_time, run_id) VALUES ($1, $2, $3)
             ON CONFLICT (job) DO UPDATE SET transaction_time = EXCLUDED.transaction_time,
                 run_id = EXCLUDED.run_id, updated_at = now()",
        )
        .bind(&job)
        .bind(&transaction_time)
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    // After the commit: a rolled-back success is no success.
    metrics::run_finished(&job, end.status.as_str(), duration);
    Ok(true)
}

/// What the finish step weighs before it lets the watermark move: the run's error and output
/// files, and its Patients against the previous complete full run's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct CompletenessFacts {
    pub full_export: bool,
    pub output_files: i64,
    /// Every file of the manifest's `error[]`.
    pub error_files: i64,
    /// Error files that report a failure: an OperationOutcome with an issue that is not a
    /// `warning` or `information` (or with no issue at all), or a line that is no
    /// OperationOutcome. Error files of warnings only (a lenient server's notes on parameters
    /// it ignored) do not make a run partial.
    pub failing_error_files: i64,
    /// Patients this run loaded.
    pub patients: i64,
    /// Patients the job's last full run that ended `succeeded` loaded, if there was one.
    pub previous_full_patients: Option<i64>,
}

pub async fn completeness_facts(pool: &PgPool, run_id: i64) -> sqlx::Result<CompletenessFacts> {
    sqlx::query_as(
        "SELECT r.full_export,
                (SELECT count(*) FROM fhir_sync.run_file f WHERE f.run_id = r.id AND f.kind = $2) AS output_files,
                (SELECT count(*) FROM fhir_sync.run_file f WHERE f.run_id = r.id AND f.kind = $3) AS error_files,
                (SELECT count(*) FROM fhir_sync.run_file f
                 WHERE f.run_id = r.id AND f.kind = $3
                   AND (f.lines_rejected > 0 OR EXISTS (
                        SELECT 1 FROM fhir_sync.export_error e
                        WHERE e.file_id = f.id
                          AND NOT coalesce((
                              SELECT bool_and(i->>'severity' IN ('warning', 'information'))
                              FROM jsonb_array_elements(CASE jsonb_typeof(e.outcome->'issue')
                                                        WHEN 'array' THEN e.outcome->'issue'
                                                        ELSE '[]'::jsonb END) AS i), false)))
                ) AS failing_error_files,
                (SELECT coalesce(sum(f.resources_loaded), 0)::bigint FROM fhir_sync.run_file f
                 WHERE f.run_id = r.id AND f.kind = $2 AND f.resource_type = 'Patient') AS patients,
                (SELECT (SELECT coalesce(sum(f.resources_loaded), 0)::bigint FROM fhir_sync.run_file f
                         WHERE f.run_id = p.id AND f.kind = $2 AND f.resource_type = 'Patient')
                 FROM fhir_sync.run p
                 WHERE p.job = r.job AND p.id < r.id AND p.full_export AND p.status = $4
                 ORDER BY p.id DESC LIMIT 1) AS previous_full_patients
         FROM fhir_sync.run r WHERE r.id = $1",
    )
    .bind(run_id)
    .bind(FileKind::Output)
    .bind(FileKind::Error)
    .bind(RunStatus::Succeeded)
    .fetch_one(pool)
    .await
}

/// Fails a run that is not finished yet, with the reason and the operator's hint. The
/// watermark is not touched. `true` for the one caller whose statement ended the run.
pub async fn fail(
    pool: &PgPool,
    run_id: i64,
    error: &str,
    retryable: bool,
    hint: Option<&str>,
) -> sqlx::Result<bool> {
    let ended: Option<(String, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE fhir_sync.run r SET status = $5, error = $2, error_retryable = $3, hint = $4,
             finished_at = now(), updated_at = now(), progress = NULL,
             resources_loaded = t.loaded, lines_rejected = t.rejected, export_errors = t.outcomes
         FROM ({TOTALS}) t
         WHERE r.id = $1 AND NOT (r.status = ANY($6))
         RETURNING r.job, extract(epoch FROM r.finished_at - r.started_at)::float8",
    )))
    .bind(run_id)
    .bind(error)
    .bind(retryable)
    .bind(hint)
    .bind(RunStatus::Failed)
    .bind(RunStatus::TERMINAL.to_vec())
    .fetch_optional(pool)
    .await?;
    Ok(finished(ended, RunStatus::Failed))
}

/// Counts a run the guarded statement ended (`Some`); `None` means another step or process
/// ended it first and counted it.
fn finished(ended: Option<(String, f64)>, status: RunStatus) -> bool {
    match ended {
        Some((job, duration)) => {
            metrics::run_finished(&job, status.as_str(), duration);
            true
        }
        None => false,
    }
}

/// Marks an unfinished run cancelled; its remaining queued steps then do nothing. `false`
/// when the run had already ended.
pub async fn cancel(pool: &PgPool, run_id: i64) -> sqlx::Result<bool> {
    let ended: Option<(String, f64)> = sqlx::query_as(
        "UPDATE fhir_sync.run SET status = $2, finished_at = now(), updated_at = now(), progress = NULL,
             error = coalesce(error, 'cancelled by an operator')
         WHERE id = $1 AND NOT (status = ANY($3))
         RETURNING job, extract(epoch FROM finished_at - started_at)::float8",
    )
    .bind(run_id)
    .bind(RunStatus::Cancelled)
    .bind(RunStatus::TERMINAL.to_vec())
    .fetch_optional(pool)
    .await?;
    Ok(finished(ended, RunStatus::Cancelled))
}

/// The `_since` for the job's next run: the last successful run's transactionTime, moved back
/// by `overlap_seconds` when configured (safe because loads are newer-wins).
pub async fn watermark(
    pool: &PgPool,
    job: &str,
    overlap_seconds: u64,
) -> sqlx::Result<Option<String>> {
    let stored: Option<String> =
        sqlx::query_scalar("SELECT transaction_time FROM fhir_sync.watermark WHERE job = $1")
            .bind(job)
            .fetch_optional(pool)
            .await?;
    Ok(stored.map(|since| {
        if overlap_seconds == 0 {
            return since;
        }
        match crate::fhir::parse_instant(&since) {
            Some(instant) => {
                let earlier = instant - time::Duration::seconds(overlap_seconds as i64);
                earlier
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or(since)
            }
            None => since,
        }
    }))
}

/// The latest tick a run was created for, and when the job's newest run started.
pub async fn schedule_history(
    pool: &PgPool,
    job: &str,
) -> sqlx::Result<(Option<time::OffsetDateTime>, Option<time::OffsetDateTime>)> {
    sqlx::query_as("SELECT max(scheduled_for), max(started_at) FROM fhir_sync.run WHERE job = $1")
        .bind(job)
        .fetch_one(pool)
        .await
}

/// (run id, status URL) of this job's exports that were started and never deleted: runs that
/// ended, and (when `include_running`) older runs still marked active, which is what a killed
/// process leaves. Exports whose deletion the server refused for good are not listed.
pub async fn abandoned_exports(
    pool: &PgPool,
    job: &str,
    current_run: i64,
    include_running: bool,
) -> sqlx::Result<Vec<(i64, String)>> {
    sqlx::query_as(
        "SELECT id, status_url FROM fhir_sync.run
         WHERE job = $1 AND id <> $2 AND status_url IS NOT NULL AND export_deleted_at IS NULL
           AND export_delete_refused IS NULL
           AND (status = ANY($4) OR ($3 AND status = ANY($5) AND id < $2))
         ORDER BY id",
    )
    .bind(job)
    .bind(current_run)
    .bind(include_running)
    .bind(vec![
        RunStatus::Succeeded,
        RunStatus::Partial,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ])
    .bind(RunStatus::ACTIVE.to_vec())
    .fetch_all(pool)
    .await
}

/// What `cancel` needs of a run: its job, status, status URL and when its export was deleted.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExportRecord {
    pub job: String,
    pub status: RunStatus,
    pub status_url: Option<String>,
    pub export_deleted_at: Option<time::OffsetDateTime>,
}

pub async fn export_of(pool: &PgPool, run_id: i64) -> sqlx::Result<Option<ExportRecord>> {
    sqlx::query_as(
        "SELECT job, status, status_url, export_deleted_at FROM fhir_sync.run WHERE id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await
}

/// Output files and resources per type for one run.
pub async fn type_counts(pool: &PgPool, run_id: i64) -> sqlx::Result<Vec<TypeCount>> {
    sqlx::query_as(
        "SELECT resource_type, count(*) AS files, sum(resources_loaded)::bigint AS resources_loaded,
                sum(lines_rejected)::bigint AS lines_rejected
         FROM fhir_sync.run_file WHERE run_id = $1 AND kind = $2
         GROUP BY resource_type ORDER BY resource_type",
    )
    .bind(run_id)
    .bind(FileKind::Output)
    .fetch_all(pool)
    .await
}

/// (output files, error files, bytes received) of a run.
pub async fn file_totals(pool: &PgPool, run_id: i64) -> sqlx::Result<(i64, i64, i64)> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE kind = $2), count(*) FILTER (WHERE kind = $3), coalesce(sum(bytes), 0)::bigint
         FROM fhir_sync.run_file WHERE run_id = $1",
    )
    .bind(run_id)
    .bind(FileKind::Output)
    .bind(FileKind::Error)
    .fetch_one(pool)
    .await
}

/// Failed and partial runs of the last `within_hours` whose `run_failed` alert nobody claimed
/// yet (the process that ended them died before it could, or it was never sent), oldest first.
/// A partial run alerts like a failed one: its data is incomplete until someone looks.
pub async fn failed_runs_without_alert(
    pool: &PgPool,
    within_hours: i64,
) -> sqlx::Result<Vec<(i64, String)>> {
    sqlx::query_as(
        "SELECT r.id, r.job FROM fhir_sync.run r
         WHERE r.status = ANY($1) AND r.finished_at > now() - make_interval(hours => $2::int)
           AND NOT EXISTS (SELECT 1 FROM fhir_sync.alert_sent a
                           WHERE a.job = r.job AND a.kind = 'run_failed' AND a.episode = r.id)
         ORDER BY r.id",
    )
    .bind(vec![RunStatus::Failed, RunStatus::Partial])
    .bind(within_hours as i32)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_text() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>().unwrap(), *status);
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::Value::String(status.to_string())
            );
        }
        for status in FileStatus::ALL {
            assert_eq!(status.as_str().parse::<FileStatus>().unwrap(), *status);
        }
        for kind in FileKind::ALL {
            assert_eq!(kind.as_str().parse::<FileKind>().unwrap(), *kind);
        }
        assert_eq!(
            "catch-up".parse::<Trigger>().unwrap(),
            Trigger::CatchUp,
            "a trigger keeps its stored spelling"
        );
    }

    #[test]
    fn an_unknown_value_is_an_error_never_a_default() {
        let error = "archived".parse::<FileKind>().unwrap_err();
        assert_eq!(error.to_string(), "\"archived\" is not a known FileKind");
        assert!("running".parse::<RunStatus>().is_err());
    }

    #[test]
    fn terminal_and_active_states_partition_the_unfinished_ones() {
        assert_eq!(
            unfinished(),
            [
                RunStatus::Queued,
                RunStatus::KickingOff,
                RunStatus::Exporting,
                RunStatus::Loading,
                RunStatus::Completing
            ]
        );
        assert!(RunStatus::ACTIVE.iter().all(|s| !s.is_terminal()));
    }
}
