//! Cron schedules: each job's ticks become queued runs.
//!
//! Every `serve` process runs the same in-memory scheduler (tokio-cron-scheduler); a tick is
//! turned into a run with the tick's own time as `scheduled_for`, and the database lets only
//! one process create the run for a given tick. The tick time is computed from the cron
//! expression (the latest occurrence at or before the moment the timer fired), never taken
//! from the local clock, so processes whose timers fire a few milliseconds apart agree on it.
//! This module decides when runs start; it does no FHIR work itself.

use std::str::FromStr;
use std::sync::Arc;

use chrono::TimeZone;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::{JobConfig, Overlap, ScheduleConfig};
use crate::sync::{self, SyncContext, SyncError, Trigger};
use crate::warehouse::runs;

/// What a tick did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickOutcome {
    /// This process created the run.
    Started(i64),
    /// Another process had already created the run for this tick.
    AlreadyStarted,
    /// The job's previous run was still going and `overlap = "skip"`; recorded as a run.
    Skipped { busy_run: i64 },
}

/// The cron expression with a seconds field (tokio-cron-scheduler requires six fields; job
/// files may use the common five).
pub fn six_fields(cron: &str) -> String {
    if cron.split_whitespace().count() == 5 {
        format!("0 {}", cron.trim())
    } else {
        cron.trim().to_string()
    }
}

fn parse(schedule: &ScheduleConfig) -> Result<(Cron, chrono_tz::Tz), SyncError> {
    let cron = CronParser::builder()
        .seconds(Seconds::Required)
        .build()
        .parse(&six_fields(&schedule.cron))
        .map_err(|e| SyncError::Schedule(format!("schedule.cron {:?}: {e}", schedule.cron)))?;
    let tz = chrono_tz::Tz::from_str(&schedule.timezone).map_err(|_| {
        SyncError::Schedule(format!(
            "schedule.timezone {:?} is not an IANA time zone",
            schedule.timezone
        ))
    })?;
    Ok((cron, tz))
}

/// The latest tick of `schedule` at or before `at`.
pub fn tick_at_or_before(
    schedule: &ScheduleConfig,
    at: time::OffsetDateTime,
) -> Result<time::OffsetDateTime, SyncError> {
    occurrence(schedule, at, Direction::AtOrBefore)
}

/// The first tick of `schedule` strictly after `at`: when the job runs next.
pub fn next_tick_after(
    schedule: &ScheduleConfig,
    at: time::OffsetDateTime,
) -> Result<time::OffsetDateTime, SyncError> {
    occurrence(schedule, at, Direction::After)
}

enum Direction {
    AtOrBefore,
    After,
}

fn occurrence(
    schedule: &ScheduleConfig,
    at: time::OffsetDateTime,
    direction: Direction,
) -> Result<time::OffsetDateTime, SyncError> {
    let (cron, tz) = parse(schedule)?;
    let at = tz
        .timestamp_opt(at.unix_timestamp(), 0)
        .single()
        .ok_or_else(|| SyncError::Schedule("time out of range".into()))?;
    let (tick, which) = match direction {
        Direction::AtOrBefore => (cron.find_previous_occurrence(&at, true), "previous"),
        Direction::After => (cron.find_next_occurrence(&at, false), "next"),
    };
    let tick = tick.map_err(|e| {
        SyncError::Schedule(format!(
            "schedule.cron {:?} has no {which} occurrence: {e}",
            schedule.cron
        ))
    })?;
    time::OffsetDateTime::from_unix_timestamp(tick.timestamp())
        .map_err(|e| SyncError::Schedule(e.to_string()))
}

/// Handles one tick of `job` that fired at `fired_at`.
pub async fn tick(
    ctx: &SyncContext,
    job: &JobConfig,
    fired_at: time::OffsetDateTime,
) -> Result<TickOutcome, SyncError> {
    let Some(schedule) = &job.schedule else {
        return Err(SyncError::Schedule(format!(
            "job {} has no schedule",
            job.name
        )));
    };
    // A timer may fire a moment early or late; the tick is the occurrence it fired for.
    let scheduled_for = tick_at_or_before(schedule, fired_at + time::Duration::seconds(1))?;
    if schedule.overlap == Overlap::Skip
        && let Some(busy_run) = runs::unfinished_run(&ctx.pool, &job.name).await?
    {
        let base = crate::transport::redacted(&job.fhir.base_url);
        runs::record_skipped(&ctx.pool, &job.name, &base, scheduled_for, busy_run).await?;
        tracing::warn!(job.name = %job.name, busy_run, "tick skipped: the previous run is still going");
        return Ok(TickOutcome::Skipped { busy_run });
    }
    Ok(
        match sync::enqueue_run(ctx, job, Trigger::Schedule, Some(scheduled_for), false).await? {
            Some(run_id) => TickOutcome::Started(run_id),
            None => TickOutcome::AlreadyStarted,
        },
    )
}

/// At start-up: if a job's latest tick passed while no process was running (the job has run
/// before, and nothing started since that tick), start one run for it now. One, however many
/// ticks were missed: each run exports everything since the watermark anyway.
pub async fn catch_up(
    ctx: &SyncContext,
    job: &JobConfig,
    now: time::OffsetDateTime,
) -> Result<Option<i64>, SyncError> {
    let Some(schedule) = &job.schedule else {
        return Ok(None);
    };
    if !job.enabled {
        return Ok(None);
    }
    let missed = tick_at_or_before(schedule, now)?;
    let (last_tick, last_start) = runs::schedule_history(&ctx.pool, &job.name).await?;
    let Some(last_start) = last_start else {
        return Ok(None); // A new job starts at its next tick, not at deploy time.
    };
    if last_start >= missed || last_tick.is_some_and(|t| t >= missed) {
        return Ok(None);
    }
    if runs::unfinished_run(&ctx.pool, &job.name).await?.is_some() {
        return Ok(None);
    }
    tracing::info!(job.name = %job.name, tick = %missed, "catching up a missed tick");
    sync::enqueue_run(ctx, job, Trigger::CatchUp, Some(missed), false).await
}

/// Starts the scheduler for every enabled job with a schedule.
pub async fn start(ctx: Arc<SyncContext>) -> anyhow::Result<JobScheduler> {
    let scheduler = JobScheduler::new().await?;
    for job in ctx.jobs() {
        let Some(schedule) = job.schedule.clone() else {
            continue;
        };
        if !job.enabled {
            continue;
        }
        let (_, tz) = parse(&schedule)?;
        let ctx = ctx.clone();
        let name = job.name.clone();
        let timer = Job::new_async_tz(six_fields(&schedule.cron), tz, move |_, _| {
            let ctx = ctx.clone();
            let name = name.clone();
            Box::pin(async move {
                let Some(job) = ctx.job(&name) else { return };
                match tick(&ctx, &job, time::OffsetDateTime::now_utc()).await {
                    Ok(outcome) => tracing::debug!(job.name = %name, ?outcome, "tick"),
                    Err(e) => {
                        tracing::error!(job.name = %name, error = %sync::error_chain(&e), "tick failed")
                    }
                }
            })
        })?;
        scheduler.add(timer).await?;
        tracing::info!(job.name = %job.name, schedule.cron = %schedule.cron, schedule.timezone = %schedule.timezone, "scheduled");
    }
    scheduler.start().await?;
    Ok(scheduler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overlap;

    fn schedule(cron: &str, timezone: &str) -> ScheduleConfig {
        ScheduleConfig {
            cron: cron.into(),
            timezone: timezone.into(),
            overlap: Overlap::Skip,
        }
    }

    fn at(text: &str) -> time::OffsetDateTime {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn next_tick_is_strictly_after_and_in_the_job_time_zone() {
        let nightly = schedule("0 2 * * *", "UTC");
        assert_eq!(
            next_tick_after(&nightly, at("2026-03-10T02:00:00Z")).unwrap(),
            at("2026-03-11T02:00:00Z")
        );
        assert_eq!(
            next_tick_after(&nightly, at("2026-03-10T01:59:59Z")).unwrap(),
            at("2026-03-10T02:00:00Z")
        );
        // 02:00 in New York (EDT, UTC-4 after 8 March 2026) is 06:00 UTC.
        let new_york = schedule("0 2 * * *", "America/New_York");
        assert_eq!(
            next_tick_after(&new_york, at("2026-03-10T12:00:00Z")).unwrap(),
            at("2026-03-11T06:00:00Z")
        );
    }

    #[test]
    fn five_field_expressions_get_seconds() {
        assert_eq!(six_fields("0 2 * * *"), "0 0 2 * * *");
        assert_eq!(six_fields(" 0 0 2 * * * "), "0 0 2 * * *");
    }

    #[test]
    fn ticks_are_the_cron_occurrence_not_the_clock() {
        let nightly = schedule("0 0 2 * * *", "UTC");
        // Fired a little late, or a little early and then nudged by the caller's tolerance.
        assert_eq!(
            tick_at_or_before(&nightly, at("2026-03-10T02:00:00.400Z")).unwrap(),
            at("2026-03-10T02:00:00Z")
        );
        assert_eq!(
            tick_at_or_before(&nightly, at("2026-03-10T01:59:59Z")).unwrap(),
            at("2026-03-09T02:00:00Z")
        );
        // In a time zone: 02:00 in New York is 07:00 UTC in winter.
        let ny = schedule("0 2 * * *", "America/New_York");
        assert_eq!(
            tick_at_or_before(&ny, at("2026-01-15T12:00:00Z")).unwrap(),
            at("2026-01-15T07:00:00Z")
        );
    }
}
