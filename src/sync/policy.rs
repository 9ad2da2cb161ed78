//! The one retry policy: every failure of a step becomes one [`Directive`] — run the step again
//! after a delay, fail the run (retryable or not, with an operator hint), or yield.
//!
//! Each request is retried in exactly one place, so retries never multiply across layers: the
//! kick-off, status and DELETE requests go out once per step and the step is the retry; token
//! requests, manifest pages and file downloads retry inside their own loops, so their failures
//! reach the step already retried and fail the run. Database and queue failures retry the step
//! at a pace of their own ([`DATABASE_BACKOFF`]), long enough for a database restart.
//! The pattern follows supabase/etl's `runtime/error_policy.rs`.

use std::time::Duration;

use super::SyncError;
use crate::backoff::Backoff;
use crate::bulk::ExportError;
use crate::warehouse::LoadError;

/// What to do about a failed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    /// Queue the same step again after `delay`.
    Retry { delay: Duration },
    /// End the run failed. `retryable`: running the job again later, unchanged, may succeed.
    Fail {
        retryable: bool,
        hint: Option<String>,
    },
    /// Stop without failing the run: another worker holds the work now (a file whose lease
    /// passed to another loader), or this process is stopping and the work goes back on the
    /// queue for the next one.
    Yield,
}

/// Tries of a step that failed because the database or the queue was away. A restart or a
/// failover takes seconds to tens of seconds: these retries are paced for that (about a
/// minute in all), never by the FHIR retry settings, whose delays can be milliseconds.
pub const DATABASE_TRIES: u32 = 10;

/// The backoff of those retries: 0.2 s doubling, so ten tries span about a minute.
pub const DATABASE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
};

/// The directive for `error`, the failure of a step's `attempt`-th try (1-based) when the
/// step kind allows `limit` tries.
pub fn directive(error: &SyncError, attempt: u32, limit: u32, backoff: &Backoff) -> Directive {
    match class(error) {
        Class::Yield => Directive::Yield,
        Class::RetryStep if attempt < limit => Directive::Retry {
            delay: backoff.delay(attempt, None),
        },
        Class::DatabaseAway if attempt < limit.max(DATABASE_TRIES) => Directive::Retry {
            delay: DATABASE_BACKOFF.delay(attempt.min(6), None),
        },
        Class::RetryStep | Class::DatabaseAway | Class::Fail => Directive::Fail {
            retryable: error.is_retryable(),
            hint: hint(error),
        },
    }
}

enum Class {
    Yield,
    RetryStep,
    /// The database (or the queue in it) failed: retried patiently.
    DatabaseAway,
    Fail,
}

fn class(error: &SyncError) -> Class {
    match error {
        SyncError::Stopped
        | SyncError::Load {
            source: LoadError::Superseded { .. },
            ..
        } => Class::Yield,
        // The file loop retried it at the FHIR pace; the database may need longer.
        SyncError::Load {
            source: source @ LoadError::Database(_),
            ..
        } if source.is_retryable() => Class::DatabaseAway,
        SyncError::Database(_) | SyncError::Queue(_) => Class::DatabaseAway,
        // Retried inside their own loops already (file attempts, token renewals).
        SyncError::Download { .. }
        | SyncError::Load { .. }
        | SyncError::Auth(_)
        | SyncError::Export(ExportError::Auth(_))
        // Past the deadline now is past it on every retry.
        | SyncError::Export(ExportError::TimedOut { .. }) => Class::Fail,
        SyncError::Export(e) if e.is_retryable() => Class::RetryStep,
        _ => Class::Fail,
    }
}

/// What an operator can do about a failure, when there is something.
pub fn hint(error: &SyncError) -> Option<String> {
    let text = match error {
        SyncError::Auth(crate::smart::AuthError::Refused { hint, .. }) => {
            return Some(hint.clone());
        }
        SyncError::Export(ExportError::TimedOut { .. }) => {
            "the server needs longer: raise export.timeout_seconds in the job file"
        }
        SyncError::Export(ExportError::Busy { .. }) => {
            "cancel the other export with `fhir-sync cancel <run>` or wait for it to finish"
        }
        SyncError::Export(ExportError::Refused { .. }) => {
            "check the job's [export] parameters against what the server supports"
        }
        SyncError::Download {
            source: ExportError::TooLarge { .. },
            ..
        } => "raise sync.max_file_bytes if files this large are expected",
        SyncError::JobNotConfigured { .. } => {
            "put the job's file in the jobs directory of every process serving this database"
        }
        _ => return None,
    };
    Some(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_millis(100))
    }

    fn export(e: ExportError) -> SyncError {
        SyncError::Export(e)
    }

    #[test]
    fn a_single_request_that_may_pass_retries_the_step_until_the_limit() {
        let unavailable = || {
            export(ExportError::Status {
                context: "export kick-off",
                status: 503,
            })
        };
        assert!(matches!(
            directive(&unavailable(), 1, 3, &backoff()),
            Directive::Retry { .. }
        ));
        assert_eq!(
            directive(&unavailable(), 3, 3, &backoff()),
            Directive::Fail {
                retryable: true,
                hint: None
            }
        );
    }

    #[test]
    fn failures_retried_in_their_own_loop_fail_the_run_at_once() {
        let download = SyncError::Download {
            file: "f".into(),
            source: ExportError::FileStatus {
                status: 429,
                retry_after: None,
                at: "ehr.example.org:443/files/1".into(),
                said: "slow down".into(),
            },
        };
        assert_eq!(
            directive(&download, 1, 5, &backoff()),
            Directive::Fail {
                retryable: true,
                hint: None
            }
        );
    }

    #[test]
    fn a_lost_lease_and_a_stopping_process_yield() {
        let superseded = SyncError::Load {
            file: "f".into(),
            source: LoadError::Superseded { file_id: 7 },
        };
        assert_eq!(directive(&superseded, 1, 5, &backoff()), Directive::Yield);
        assert_eq!(
            directive(&SyncError::Stopped, 1, 5, &backoff()),
            Directive::Yield
        );
    }

    #[test]
    fn a_database_outage_is_retried_patiently_whatever_the_step_allows() {
        let away = || SyncError::Database(sqlx::Error::PoolTimedOut);
        for attempt in 1..DATABASE_TRIES {
            assert!(
                matches!(
                    directive(&away(), attempt, 2, &backoff()),
                    Directive::Retry { .. }
                ),
                "try {attempt}"
            );
        }
        assert!(matches!(
            directive(&away(), DATABASE_TRIES, 2, &backoff()),
            Directive::Fail {
                retryable: true,
                ..
            }
        ));
        let load = SyncError::Load {
            file: "f".into(),
            source: LoadError::Database(sqlx::Error::PoolTimedOut),
        };
        assert!(matches!(
            directive(&load, 1, 1, &backoff()),
            Directive::Retry { .. }
        ));
    }

    #[test]
    fn fatal_failures_carry_a_hint_where_one_helps() {
        let timed_out = export(ExportError::TimedOut { seconds: 5 });
        // A deadline that passed may pass next time, but the operator can do something.
        let Directive::Fail { retryable, hint } = directive(&timed_out, 1, 5, &backoff()) else {
            panic!("a missed deadline is not retried within the run")
        };
        assert!(retryable);
        assert!(hint.unwrap().contains("export.timeout_seconds"));
        let refused = export(ExportError::Refused {
            status: 400,
            diagnostics: "bad _type".into(),
        });
        assert!(matches!(
            directive(&refused, 1, 5, &backoff()),
            Directive::Fail {
                retryable: false,
                hint: Some(_)
            }
        ));
    }
}
