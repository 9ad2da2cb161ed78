//! The warehouse: NDJSON into PostgreSQL, and the record of runs and files.
//!
//! Resources are loaded with COPY (straight into an empty partition, else into a temporary
//! staging table merged set-wise, newer wins) into `fhir_sync.resource`, partitioned by resource
//! type, one transaction per batch that also advances the file's checkpoint, so a load
//! interrupted at any point resumes without duplicating or skipping lines. Deletion Bundles mark
//! rows deleted, and so does a full run's reconciliation (`reconcile`) for servers that list no
//! deletions; analysts read the per-type views in schema `fhir`. This module
//! knows nothing of HTTP or FHIR servers: it reads bytes from whatever stream it is given.

pub mod cohort;
mod jsonb;
mod loader;
pub mod reconcile;
pub mod runs;

pub use loader::{FileKind, FileTarget, LoadLimits, LoadStats, load_ndjson};
pub use runs::{FileRow, FileStatus, RunStatus, Trigger, TypeCount};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// True when the statement runs inside a transaction block opened by an earlier statement.
/// Send it with the simple query protocol (`raw_sql`).
pub const IN_TRANSACTION_BLOCK: &str = "SELECT transaction_timestamp() <> statement_timestamp()";

/// Pool options every fhir-sync pool starts from.
///
/// sqlx 0.9.0 can hand out a connection that is still inside a transaction: a future
/// cancelled while `Pool::begin` waits for the server's answer to `BEGIN` (a timeout, a
/// `select!`, a worker stopped at shutdown) returns the connection to the pool without the
/// rollback it would otherwise queue (sqlx issues #4385 and #4393, fixed upstream after
/// 0.9.0). The next borrower's writes then run inside that forgotten transaction: invisible to
/// every other connection, and lost when it ends. So every released connection is asked
/// whether it is inside a transaction block; one that is gets closed, which ends the
/// transaction on the server. The question costs one round trip per release. Outside an
/// explicit transaction a statement is its own transaction, so its start time is the
/// transaction's; inside one begun earlier they differ. (Only with the simple query protocol:
/// the extended one stamps Parse and Execute apart.)
/// How long a statement may run before sqlx logs it, and at which level. sqlx's default (WARN
/// after 1 s, with the whole statement) fires on every view build and large merge, which are
/// slow by nature; a minute is worth a line, at INFO.
const SLOW_STATEMENT: std::time::Duration = std::time::Duration::from_secs(60);

/// `options` with [`SLOW_STATEMENT`] as the slow-statement threshold.
pub fn quiet_slow_statements(
    options: sqlx::postgres::PgConnectOptions,
) -> sqlx::postgres::PgConnectOptions {
    use sqlx::ConnectOptions;
    options.log_slow_statements(log::LevelFilter::Info, SLOW_STATEMENT)
}

pub fn pool_options() -> sqlx::postgres::PgPoolOptions {
    use sqlx::Row;
    sqlx::postgres::PgPoolOptions::new().after_release(|conn, _meta| {
        Box::pin(async move {
            let in_transaction: bool = sqlx::raw_sql(IN_TRANSACTION_BLOCK)
                .fetch_one(&mut *conn)
                .await?
                .try_get(0)?;
            if in_transaction {
                tracing::warn!(
                    "closing a database connection returned inside a transaction (a cancelled BEGIN)"
                );
            }
            Ok(!in_transaction)
        })
    })
}

/// Why loading a file failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("database error while loading")]
    Database(#[from] sqlx::Error),
    #[error("reading the file failed")]
    Read(#[source] std::io::Error),
    /// The file cannot be loaded as asked (a type that is not a FHIR resource type, say).
    #[error("{0}")]
    Invalid(String),
    /// The file's checkpoint moved under this loader: its lease lapsed and another loader
    /// holds the file now. Not a failure of the run: this loader yields.
    #[error("file {file_id} is being loaded by another worker now (this loader's lease lapsed)")]
    Superseded { file_id: i64 },
}

impl LoadError {
    /// Stream breaks and connection losses can succeed on a retry (which resumes from the
    /// checkpoint); constraint or syntax errors cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            LoadError::Read(_) => true,
            LoadError::Invalid(_) | LoadError::Superseded { .. } => false,
            LoadError::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|code| {
                        // 40001 serialization failure, 40P01 deadlock, 57P01 admin shutdown, 08xxx connection.
                        code == "40001"
                            || code == "40P01"
                            || code == "57P01"
                            || code.starts_with("08")
                    })
            }
        }
    }
}

/// Applies the migrations (idempotent; sqlx takes an advisory lock so concurrent processes
/// don't race).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
