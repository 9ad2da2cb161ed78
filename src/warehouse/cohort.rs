//! Complete cohorts: the members of the groups jobs export (`fhir_sync.group_member`), as read
//! from the server at each group run. This is the only writer of that table.
//!
//! A member first seen by a run is new to it: an incremental group export (`_since`) holds only
//! their recent changes, so the run asks for their whole history in a second export. A member
//! no longer listed is recorded as left by the run that first saw them gone; their rows stay
//! in the warehouse as they were (nothing on the server says they were deleted). A member who
//! comes back is new again. Recording is idempotent: a retried step finds the same new members.

use sqlx::PgPool;

/// What one reading of a group changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Members first seen by this run (or back after leaving), in id order.
    pub new: Vec<String>,
    /// Members this run recorded as left.
    pub left: u64,
    /// Whether any member of the group had been recorded before this run.
    pub known_before: bool,
}

/// Records the members `members` of `group_id` as read by run `run_id` of `job`.
pub async fn record_members(
    pool: &PgPool,
    job: &str,
    group_id: &str,
    run_id: i64,
    members: &[String],
) -> sqlx::Result<Membership> {
    let mut tx = pool.begin().await?;
    let known_before: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM fhir_sync.group_member
                        WHERE job = $1 AND group_id = $2 AND first_seen_run <> $3)",
    )
    .bind(job)
    .bind(group_id)
    .bind(run_id)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO fhir_sync.group_member AS g (job, group_id, patient_id, first_seen_run)
         SELECT $1, $2, p, $3 FROM unnest($4::text[]) AS p
         ON CONFLICT (job, group_id, patient_id) DO UPDATE
             SET first_seen_run = EXCLUDED.first_seen_run, left_run = NULL
             WHERE g.left_run IS NOT NULL",
    )
    .bind(job)
    .bind(group_id)
    .bind(run_id)
    .bind(members)
    .execute(&mut *tx)
    .await?;
    let left = sqlx::query(
        "UPDATE fhir_sync.group_member SET left_run = $3
         WHERE job = $1 AND group_id = $2 AND left_run IS NULL AND NOT (patient_id = ANY($4))",
    )
    .bind(job)
    .bind(group_id)
    .bind(run_id)
    .bind(members)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let new: Vec<String> = sqlx::query_scalar(
        "SELECT patient_id FROM fhir_sync.group_member
         WHERE job = $1 AND group_id = $2 AND first_seen_run = $3 AND left_run IS NULL
         ORDER BY patient_id",
    )
    .bind(job)
    .bind(group_id)
    .bind(run_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Membership {
        new,
        left,
        known_before,
    })
}
