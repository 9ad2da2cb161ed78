//! The record of sync runs and their files: `fhir_sync.run` and `fhir_sync.run_file`.
//!
//! These rows are the history ops people read (through `ops::report`); they outlive any queue
//! entry. URLs are stored without query strings, errors without secrets.

use sqlx::PgPool;

/// Access to the run tables.
#[derive(Clone)]
pub struct Runs {
    pool: PgPool,
}

/// One file of a run, as registered from the manifest.
#[derive(Debug, Clone)]
pub struct FileRecord {
    pub id: i64,
    pub kind: String,
    pub resource_type: String,
    pub manifest_count: Option<i64>,
}

/// Resources loaded by a run, per type.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, PartialEq, Eq)]
pub struct TypeCount {
    pub resource_type: String,
    pub files: i64,
    pub resources_loaded: i64,
    pub lines_rejected: i64,
}

impl Runs {
    pub fn new(pool: PgPool) -> Self {
        Runs { pool }
    }

    pub async fn start(
        &self,
        job: &str,
        source: &str,
        fhir_base_url: &str,
        since: Option<&str>,
    ) -> sqlx::Result<i64> {
        sqlx::query_scalar(
            "INSERT INTO fhir_sync.run (job, source, fhir_base_url, since) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(job)
        .bind(source)
        .bind(fhir_base_url)
        .bind(since)
        .fetch_one(&self.pool)
        .await
    }

    /// Records the manifest's transaction time and registers its files (idempotently: a file
    /// already registered keeps its row and checkpoint). `files` holds (kind, type, redacted
    /// url, count).
    pub async fn manifest(
        &self,
        run_id: i64,
        transaction_time: &str,
        files: &[(&str, &str, String, Option<u64>)],
    ) -> sqlx::Result<Vec<FileRecord>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE fhir_sync.run SET transaction_time = $2, progress = NULL WHERE id = $1",
        )
        .bind(run_id)
        .bind(transaction_time)
        .execute(&mut *tx)
        .await?;
        let kinds: Vec<&str> = files.iter().map(|f| f.0).collect();
        let types: Vec<&str> = files.iter().map(|f| f.1).collect();
        let urls: Vec<&str> = files.iter().map(|f| f.2.as_str()).collect();
        let counts: Vec<Option<i64>> = files.iter().map(|f| f.3.map(|c| c as i64)).collect();
        sqlx::query(
            "INSERT INTO fhir_sync.run_file (run_id, kind, resource_type, url, manifest_count)
             SELECT $1, kind, resource_type, url, count
             FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bigint[]) WITH ORDINALITY AS f(kind, resource_type, url, count, n)
             ORDER BY n
             ON CONFLICT (run_id, kind, url) DO NOTHING",
        )
        .bind(run_id)
        .bind(&kinds)
        .bind(&types)
        .bind(&urls)
        .bind(&counts)
        .execute(&mut *tx)
        .await?;
        let rows: Vec<(i64, String, String, Option<i64>)> = sqlx::query_as(
            "SELECT id, kind, resource_type, manifest_count FROM fhir_sync.run_file WHERE run_id = $1 ORDER BY id",
        )
        .bind(run_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|(id, kind, resource_type, manifest_count)| FileRecord {
                id,
                kind,
                resource_type,
                manifest_count,
            })
            .collect())
    }

    pub async fn file_started(&self, file_id: i64) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE fhir_sync.run_file SET status = 'loading', started_at = coalesce(started_at, now()), error = NULL WHERE id = $1",
        )
        .bind(file_id)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    pub async fn file_loaded(&self, file_id: i64, bytes: u64) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE fhir_sync.run_file SET status = 'loaded', finished_at = now(), bytes = bytes + $2 WHERE id = $1",
        )
        .bind(file_id)
        .bind(bytes as i64)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    pub async fn file_failed(&self, file_id: i64, bytes: u64, error: &str) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE fhir_sync.run_file SET status = 'failed', finished_at = now(), bytes = bytes + $2, error = $3 WHERE id = $1",
        )
        .bind(file_id)
        .bind(bytes as i64)
        .bind(error)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    /// Output files and resources per type for one run.
    pub async fn type_counts(&self, run_id: i64) -> sqlx::Result<Vec<TypeCount>> {
        sqlx::query_as(
            "SELECT resource_type, count(*) AS files, sum(resources_loaded)::bigint AS resources_loaded,
                    sum(lines_rejected)::bigint AS lines_rejected
             FROM fhir_sync.run_file WHERE run_id = $1 AND kind = 'output'
             GROUP BY resource_type ORDER BY resource_type",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await
    }
}
