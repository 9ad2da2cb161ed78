//! The fake server's vendor personalities: what each EHR's Bulk Data server is documented to
//! accept and refuse (see `crate::vendor` for the profiles and their sources), so that a sync
//! test against a personality proves the vendor's profile is what makes the client work.
//!
//! [`FakeOptions::vendor`] sets the knobs a vendor implies (scope styles, `Retry-After`, token
//! lifetime, the tenant in the base URL); [`check_kick_off`] refuses a kick-off the real server
//! would refuse, with the status and OperationOutcome it would send. Every refusal is a
//! deterministic function of the request and the server's state; nothing here sleeps.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use time::OffsetDateTime;

use super::outcome;
use super::state::{Inner, IssuedToken};
use super::{ExpiresIn, FakeOptions};
use crate::vendor::{Concurrency, Level, Vendor};

/// The Group every personality without its own group ids exports: every patient in the data
/// set.
pub const ALL_PATIENTS_GROUP_ID: &str = "all-patients";

/// The athenahealth-style practice Group the athenahealth personality serves.
pub const ATHENAHEALTH_GROUP_ID: &str = "a-1.c-195900";
/// The tenant of the Oracle personality's base URL (Oracle's public sandbox tenant).
pub const ORACLE_TENANT: &str = "ec2458f2-1e24-41c8-b71b-0e701af7583d";
/// The `Retry-After` Oracle sends on in-progress status polls.
pub const ORACLE_RETRY_AFTER_SECONDS: u64 = 600;
/// The `Retry-After` the Epic personality sends: Epic exports take long, and say so.
pub const EPIC_RETRY_AFTER_SECONDS: u64 = 3600;

impl FakeOptions {
    /// The options of a fake playing `vendor`. Long waits are sent as the vendor sends them
    /// (`Retry-After: 600`); a test makes them short with the job's
    /// `poll_max_interval_seconds`, the bound every client applies to `Retry-After`, never by
    /// changing what the fake says.
    pub fn vendor(vendor: Vendor) -> FakeOptions {
        let v1_only = vec![
            "client-confidential-asymmetric".to_string(),
            "permission-v1".to_string(),
        ];
        let base = FakeOptions {
            vendor,
            ..FakeOptions::default()
        };
        match vendor {
            Vendor::Generic => base,
            Vendor::Epic => FakeOptions {
                polls_before_ready: 3,
                retry_after_seconds: EPIC_RETRY_AFTER_SECONDS,
                ..base
            },
            Vendor::Oracle => FakeOptions {
                retry_after_seconds: ORACLE_RETRY_AFTER_SECONDS,
                capabilities: v1_only,
                tenant: Some(ORACLE_TENANT.to_string()),
                ..base
            },
            Vendor::Veradigm | Vendor::Athenahealth => FakeOptions {
                capabilities: v1_only,
                ..base
            },
            // BCDA: 20-minute tokens, `expires_in` sent as a string.
            Vendor::Bcda => FakeOptions {
                token_lifetime_seconds: 1200,
                expires_in: ExpiresIn::String,
                capabilities: vec![
                    "client-confidential-symmetric".into(),
                    "permission-v1".into(),
                ],
                ..base
            },
            Vendor::Ab2d => FakeOptions {
                capabilities: vec![
                    "client-confidential-symmetric".into(),
                    "permission-v1".into(),
                ],
                ..base
            },
        }
    }
}

/// The Group ids the personality serves (all of them hold every patient of the data set).
pub(crate) fn group_ids(vendor: Vendor) -> &'static [&'static str] {
    match vendor {
        Vendor::Athenahealth => &[ATHENAHEALTH_GROUP_ID],
        // BCDA's attributed beneficiaries and the year-end runout group.
        Vendor::Bcda => &["all", "runout"],
        _ => &[ALL_PATIENTS_GROUP_ID],
    }
}

/// The Group id a job exporting from the personality uses.
pub fn group_id(vendor: Vendor) -> &'static str {
    group_ids(vendor)[0]
}

/// What a kick-off asks for, as far as the personalities care.
pub(crate) struct KickOffRequest<'a> {
    pub(crate) level: Level,
    pub(crate) group: Option<&'a str>,
    pub(crate) pairs: &'a [(String, String)],
    pub(crate) headers: &'a HeaderMap,
}

/// Refuses what `vendor`'s server refuses: a level it does not offer, a missing
/// `Epic-Client-ID`, repeated `_type` (Oracle), `_since` without a numeric offset (BCDA,
/// AB2D), a second export while the client's (group's, tenant's) first is not deleted.
pub(crate) fn check_kick_off(
    vendor: Vendor,
    inner: &Inner,
    token: &IssuedToken,
    request: &KickOffRequest<'_>,
) -> Result<(), Box<Response>> {
    let profile = vendor.profile();
    if !profile.levels.value.contains(&request.level) {
        return Err(Box::new(outcome::error(
            StatusCode::BAD_REQUEST,
            "not-supported",
            &format!(
                "{} level export is not supported by this server",
                request.level.name()
            ),
        )));
    }
    if let Some(name) = profile.client_id_header.value {
        let sent = request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == token.client_id);
        if !sent {
            return Err(Box::new(outcome::error(
                StatusCode::BAD_REQUEST,
                "required",
                &format!("the {name} header must carry the client id"),
            )));
        }
    }
    if vendor == Vendor::Oracle && request.pairs.iter().filter(|(n, _)| n == "_type").count() > 1 {
        return Err(Box::new(outcome::error(
            StatusCode::BAD_REQUEST,
            "not-supported",
            "repeated _type parameters are not supported; send one comma-separated _type",
        )));
    }
    if profile.since_with_offset.value
        && let Some((_, since)) = request.pairs.iter().find(|(n, _)| n == "_since")
        && since.ends_with(['Z', 'z'])
    {
        return Err(Box::new(outcome::error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "_since must be a FHIR instant with a timezone offset (e.g. 2020-02-13T08:00:00.000-05:00)",
        )));
    }
    let busy = inner.exports.values().any(|e| {
        e.client_id == token.client_id
            && match profile.concurrency.value {
                Concurrency::Unlimited => false,
                Concurrency::OnePerClientAndGroup => e.group.as_deref() == request.group,
                // One tenant per fake server: per tenant is per client.
                Concurrency::OnePerClientAndTenant | Concurrency::OnePerClient => true,
            }
    });
    if busy {
        return Err(Box::new(outcome::export_in_progress()));
    }
    Ok(())
}

/// The `_since` the export filters by. AB2D reads a missing `_since` as "since your last
/// export" (its transactionTime); everyone else as "everything".
pub(crate) fn effective_since(
    vendor: Vendor,
    inner: &Inner,
    client_id: &str,
    since: Option<OffsetDateTime>,
) -> Option<OffsetDateTime> {
    match (vendor, since) {
        (Vendor::Ab2d, None) => inner.last_exports.get(client_id).copied(),
        _ => since,
    }
}

/// Whether exported resources carry `meta.lastUpdated` (Epic's often do not).
pub(crate) fn sends_last_updated(vendor: Vendor) -> bool {
    vendor != Vendor::Epic
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> IssuedToken {
        IssuedToken {
            client_id: "c".into(),
            scopes: vec!["system/*.read".into()],
            expires_at: OffsetDateTime::now_utc() + time::Duration::hours(1),
        }
    }

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The status the personality answers, or 202 when it lets the kick-off through.
    fn answer(vendor: Vendor, level: Level, query: &[(&str, &str)], client_header: bool) -> u16 {
        let mut headers = HeaderMap::new();
        if client_header {
            headers.insert("Epic-Client-ID", axum::http::HeaderValue::from_static("c"));
        }
        let pairs = pairs(query);
        let request = KickOffRequest {
            level,
            group: (level == Level::Group).then_some("g"),
            pairs: &pairs,
            headers: &headers,
        };
        match check_kick_off(vendor, &Inner::default(), &token(), &request) {
            Ok(()) => 202,
            Err(response) => response.status().as_u16(),
        }
    }

    #[test]
    fn each_personality_refuses_what_its_vendor_refuses() {
        let types = [("_type", "Patient,Observation")];
        let cases = [
            (Vendor::Generic, Level::System, &types[..], false, 202),
            (Vendor::Epic, Level::Group, &types[..], true, 202),
            (Vendor::Epic, Level::Group, &types[..], false, 400),
            (Vendor::Epic, Level::System, &types[..], true, 400),
            (Vendor::Oracle, Level::Patient, &types[..], false, 202),
            (Vendor::Oracle, Level::System, &types[..], false, 400),
            (
                Vendor::Oracle,
                Level::Group,
                &[("_type", "Patient"), ("_type", "Observation")][..],
                false,
                400,
            ),
            (Vendor::Athenahealth, Level::Patient, &types[..], false, 400),
            (Vendor::Veradigm, Level::Group, &types[..], false, 202),
            (
                Vendor::Bcda,
                Level::Patient,
                &[("_since", "2026-01-01T00:00:00Z")][..],
                false,
                400,
            ),
            (
                Vendor::Bcda,
                Level::Patient,
                &[("_since", "2026-01-01T00:00:00+00:00")][..],
                false,
                202,
            ),
            (Vendor::Ab2d, Level::System, &types[..], false, 400),
        ];
        for (vendor, level, query, header, expected) in cases {
            assert_eq!(
                answer(vendor, level, query, header),
                expected,
                "{vendor} {level:?} {query:?}"
            );
        }
    }

    #[test]
    fn ab2d_reads_a_missing_since_as_since_the_last_export() {
        let mut inner = Inner::default();
        let last = OffsetDateTime::now_utc();
        inner.last_exports.insert("c".into(), last);
        assert_eq!(effective_since(Vendor::Ab2d, &inner, "c", None), Some(last));
        assert_eq!(effective_since(Vendor::Ab2d, &inner, "other", None), None);
        assert_eq!(effective_since(Vendor::Bcda, &inner, "c", None), None);
    }
}
