//! The warehouse: NDJSON into PostgreSQL, and the record of runs and files.
//!
//! Resources are loaded with COPY (straight into an empty partition, else into a temporary
//! staging table merged set-wise, newer wins) into `fhir_sync.resource`, partitioned by resource
//! type, one transaction per batch that also advances the file's checkpoint, so a load
//! interrupted at any point resumes without duplicating or skipping lines. Deletion Bundles mark
//! rows deleted; analysts read the per-type views in schema `fhir`. This module
//! knows nothing of HTTP or FHIR servers: it reads bytes from whatever stream it is given.

mod loader;
mod runs;

pub use loader::{FileKind, FileTarget, LoadLimits, LoadStats, load_ndjson};
pub use runs::{FileRecord, Runs, TypeCount};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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
}

impl LoadError {
    /// Stream breaks and connection losses can succeed on a retry (which resumes from the
    /// checkpoint); constraint or syntax errors cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            LoadError::Read(_) => true,
            LoadError::Invalid(_) => false,
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
