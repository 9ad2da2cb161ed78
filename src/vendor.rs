//! Vendor profiles: what each EHR's Bulk Data server is documented to offer and refuse, as
//! data, each value with the URL it comes from.
//!
//! A job names its vendor (`[fhir] vendor = "epic"`); `config::job` fills every setting the job
//! file leaves unset from the profile (explicit job value > vendor profile > generic default)
//! and `config check` warns when a job contradicts its vendor. The fake FHIR server uses the
//! same table to play each vendor. This module is a leaf: plain data and pure functions, no IO,
//! and it imports nothing of the crate (config and fake import it).

use std::fmt;
use std::str::FromStr;

/// The EHR vendors with a profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Vendor {
    /// No vendor knowledge: the Bulk Data spec's defaults (default).
    #[default]
    Generic,
    Epic,
    /// Oracle Health (Cerner) Millennium.
    Oracle,
    /// Veradigm (Allscripts TouchWorks, Veradigm EHR).
    Veradigm,
    Athenahealth,
    /// CMS Beneficiary Claims Data API.
    Bcda,
    /// CMS AB2D (Part D sponsors).
    Ab2d,
}

impl Vendor {
    /// Every vendor, in the order the docs list them.
    pub const ALL: [Vendor; 7] = [
        Vendor::Generic,
        Vendor::Epic,
        Vendor::Oracle,
        Vendor::Veradigm,
        Vendor::Athenahealth,
        Vendor::Bcda,
        Vendor::Ab2d,
    ];

    /// The name used in job files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Vendor::Generic => "generic",
            Vendor::Epic => "epic",
            Vendor::Oracle => "oracle",
            Vendor::Veradigm => "veradigm",
            Vendor::Athenahealth => "athenahealth",
            Vendor::Bcda => "bcda",
            Vendor::Ab2d => "ab2d",
        }
    }

    /// The vendor's profile.
    pub fn profile(self) -> &'static Profile {
        match self {
            Vendor::Generic => &GENERIC,
            Vendor::Epic => &EPIC,
            Vendor::Oracle => &ORACLE,
            Vendor::Veradigm => &VERADIGM,
            Vendor::Athenahealth => &ATHENAHEALTH,
            Vendor::Bcda => &BCDA,
            Vendor::Ab2d => &AB2D,
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for Vendor {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl FromStr for Vendor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Vendor::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                let names: Vec<String> = Vendor::ALL
                    .iter()
                    .map(|v| format!("{:?}", v.name()))
                    .collect();
                format!("{s:?} is not one of {}", names.join(", "))
            })
    }
}

/// A value of a profile and the document that says so.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sourced<T> {
    pub value: T,
    /// Where the value comes from: a vendor documentation URL, or a peer's code.
    pub source: &'static str,
}

const fn sourced<T>(value: T, source: &'static str) -> Sourced<T> {
    Sourced { value, source }
}

/// An export level, as profiles name them (`config::ExportLevel` maps to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    System,
    Patient,
    Group,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::System => "system",
            Level::Patient => "patient",
            Level::Group => "group",
        }
    }
}

/// SMART scope syntax a vendor accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scopes {
    /// Whatever the server's `capabilities` say.
    Auto,
    V1,
    V2,
}

/// How several `_type` values are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TypeEncoding {
    /// One `_type=Patient,Observation` (default; Oracle refuses repeated `_type`).
    #[default]
    Comma,
    /// `_type=Patient&_type=Observation`.
    Repeated,
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    PrivateKeyJwt,
    ClientSecretBasic,
}

impl Auth {
    pub fn name(self) -> &'static str {
        match self {
            Auth::PrivateKeyJwt => "private_key_jwt",
            Auth::ClientSecretBasic => "client_secret_basic",
        }
    }
}

/// How many exports the server runs at once for one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// No documented limit.
    Unlimited,
    /// One per client and group (Epic): a second kick-off is refused until the first is deleted.
    OnePerClientAndGroup,
    /// One per client and tenant (Oracle), whatever the group.
    OnePerClientAndTenant,
    /// One per client (BCDA answers 429 to a duplicate job).
    OnePerClient,
}

/// What one vendor's Bulk Data server is documented to do.
#[derive(Debug)]
pub struct Profile {
    pub vendor: Vendor,
    /// The vendor's Bulk Data documentation, for the README and `config check`.
    pub docs: &'static [&'static str],
    /// Export levels offered; the first is the default level.
    pub levels: Sourced<&'static [Level]>,
    /// `export.timeout_seconds` default.
    pub timeout_seconds: Sourced<u64>,
    /// `export.poll_min_interval_seconds`, `poll_max_interval_seconds`,
    /// `poll_default_interval_seconds` defaults.
    pub poll_seconds: Sourced<(f64, f64, f64)>,
    /// A header the FHIR endpoints require whose value is the client id (`Epic-Client-ID`).
    pub client_id_header: Sourced<Option<&'static str>>,
    /// `auth.scope_style` default.
    pub scope_style: Sourced<Scopes>,
    /// `export.type_encoding` default.
    pub type_encoding: Sourced<TypeEncoding>,
    /// Exports running at once per client. The kick-off step always deletes exports earlier
    /// runs left behind before it starts one, so this is what makes that clean-up necessary,
    /// and what `config check` uses to warn about jobs that would refuse each other.
    pub concurrency: Sourced<Concurrency>,
    /// `export.since_with_offset` default: `_since` must carry a numeric offset (`+00:00`, not `Z`).
    pub since_with_offset: Sourced<bool>,
    /// Whether `_since` finds every changed resource. False when resources lack
    /// `meta.lastUpdated`: schedule periodic `--full` runs.
    pub since_trusted: Sourced<bool>,
    /// Whether the server is known to list deleted resources in the manifest's `deleted[]`.
    /// Where it is not (its documentation never mentions `deleted[]`), full runs default to
    /// reconciling deletions (`export.reconcile_deletes`): rows the full export no longer
    /// contains are marked deleted. CMS claims exports keep this true: claims are history
    /// that is replaced (adjusted), not removed, and a full export is not run to find gaps.
    pub lists_deletions: Sourced<bool>,
    /// `export.since` default: a "full" run must send this explicit early `_since`, because a
    /// missing one means something else (AB2D: "since your last export").
    pub full_run_since: Sourced<Option<&'static str>>,
    /// Export files answer 307 to a storage host on another origin.
    pub files_redirect: Sourced<bool>,
    /// `auth.method` default.
    pub auth: Sourced<Auth>,
    /// A pattern group ids follow, for a warning when a job's does not (`a-1.c-` for athenahealth).
    pub group_id_prefix: Sourced<Option<&'static str>>,
    /// Host names of the vendor's production servers, for a warning when a job points at one
    /// with another vendor.
    pub hosts: &'static [&'static str],
}

const SPEC: &str = "https://hl7.org/fhir/uv/bulkdata/export.html";
const SMART_FETCH: &str =
    "https://github.com/smart-on-fhir/smart-fetch/blob/main/smart_fetch/bulk_utils.py";

const GENERIC: Profile = Profile {
    vendor: Vendor::Generic,
    docs: &[SPEC],
    levels: sourced(&[Level::System, Level::Patient, Level::Group], SPEC),
    timeout_seconds: sourced(86_400, SPEC),
    poll_seconds: sourced((1.0, 300.0, 10.0), SPEC),
    client_id_header: sourced(None, SPEC),
    scope_style: sourced(
        Scopes::Auto,
        "https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html",
    ),
    type_encoding: sourced(TypeEncoding::Comma, SPEC),
    concurrency: sourced(Concurrency::Unlimited, SPEC),
    since_with_offset: sourced(false, SPEC),
    lists_deletions: sourced(true, SPEC),
    since_trusted: sourced(true, SPEC),
    full_run_since: sourced(None, SPEC),
    files_redirect: sourced(false, SPEC),
    auth: sourced(
        Auth::PrivateKeyJwt,
        "https://hl7.org/fhir/smart-app-launch/backend-services.html",
    ),
    group_id_prefix: sourced(None, SPEC),
    hosts: &[],
};

const EPIC_BULK: &str = "https://fhir.epic.com/Documentation?docId=fhir_bulk_data";
const EPIC_OAUTH: &str =
    "https://fhir.epic.com/Documentation?docId=oauth2&section=BackendOAuth2Guide";

const EPIC: Profile = Profile {
    vendor: Vendor::Epic,
    docs: &[EPIC_BULK, EPIC_OAUTH],
    // Group exports of registry-backed Groups; patient and system level are not offered.
    levels: sourced(&[Level::Group], EPIC_BULK),
    // Exports run on the operational database and have taken weeks; smart-fetch waits 30 days.
    timeout_seconds: sourced(30 * 86_400, SMART_FETCH),
    poll_seconds: sourced((10.0, 600.0, 60.0), EPIC_BULK),
    client_id_header: sourced(
        Some("Epic-Client-ID"),
        "https://github.com/smart-on-fhir/cumulus-fhir-support/blob/main/cumulus_fhir_support/client.py",
    ),
    scope_style: sourced(Scopes::Auto, EPIC_OAUTH),
    type_encoding: sourced(TypeEncoding::Comma, EPIC_BULK),
    concurrency: sourced(Concurrency::OnePerClientAndGroup, SMART_FETCH),
    since_with_offset: sourced(false, EPIC_BULK),
    // Many resources carry no meta.lastUpdated, so `_since` can miss changes.
    lists_deletions: sourced(false, EPIC_BULK),
    since_trusted: sourced(
        false,
        "https://github.com/smart-on-fhir/smart-fetch/blob/main/docs/since.md",
    ),
    full_run_since: sourced(None, EPIC_BULK),
    files_redirect: sourced(false, EPIC_BULK),
    // Backend apps register a JWKS URL (or a public key) and sign assertions.
    auth: sourced(Auth::PrivateKeyJwt, EPIC_OAUTH),
    group_id_prefix: sourced(None, EPIC_BULK),
    hosts: &["fhir.epic.com"],
};

const ORACLE_GROUP: &str = "https://docs.oracle.com/en/industries/health/millennium-platform-apis/mfbda/op-group-group_id-export-get.html";
const ORACLE_STATUS: &str = "https://docs.oracle.com/en/industries/health/millennium-platform-apis/mfbda/op-bulk-export-jobs-job_id-get.html";
const ORACLE_AUTH: &str = "https://docs.oracle.com/en/industries/health/millennium-platform-apis/millennium-authorization-framework";
const ORACLE_BULK: &str = "https://docs.oracle.com/en/industries/health/millennium-platform-apis/mfbda/bulk_data_access.html";

const ORACLE: Profile = Profile {
    vendor: Vendor::Oracle,
    docs: &[ORACLE_BULK, ORACLE_GROUP, ORACLE_STATUS, ORACLE_AUTH],
    // "Oracle Cerner supports the Group Export operation and the Patient Export operation".
    levels: sourced(&[Level::Group, Level::Patient], ORACLE_BULK),
    timeout_seconds: sourced(3 * 86_400, ORACLE_STATUS),
    // Status polls answer `Retry-After: 600`; honour it rather than poll ten times as often.
    poll_seconds: sourced((10.0, 600.0, 600.0), ORACLE_STATUS),
    client_id_header: sourced(None, ORACLE_GROUP),
    scope_style: sourced(Scopes::V1, ORACLE_AUTH),
    // Repeated `_type` is not supported.
    type_encoding: sourced(TypeEncoding::Comma, SMART_FETCH),
    concurrency: sourced(Concurrency::OnePerClientAndTenant, ORACLE_GROUP),
    since_with_offset: sourced(false, ORACLE_GROUP),
    lists_deletions: sourced(false, ORACLE_BULK),
    since_trusted: sourced(true, ORACLE_GROUP),
    full_run_since: sourced(None, ORACLE_GROUP),
    files_redirect: sourced(true, "https://github.com/cerner/fhir.cerner.com/issues/899"),
    auth: sourced(Auth::PrivateKeyJwt, ORACLE_AUTH),
    group_id_prefix: sourced(None, ORACLE_GROUP),
    hosts: &["fhir-ehr.cerner.com", "fhir-ehr-code.cerner.com"],
};

const VERADIGM_BULK: &str = "https://developer.veradigm.com/Fhir/BulkData";

const VERADIGM: Profile = Profile {
    vendor: Vendor::Veradigm,
    docs: &[VERADIGM_BULK],
    levels: sourced(&[Level::Group], VERADIGM_BULK),
    timeout_seconds: sourced(86_400, VERADIGM_BULK),
    poll_seconds: sourced((1.0, 300.0, 10.0), VERADIGM_BULK),
    client_id_header: sourced(None, VERADIGM_BULK),
    scope_style: sourced(Scopes::V1, VERADIGM_BULK),
    type_encoding: sourced(TypeEncoding::Comma, VERADIGM_BULK),
    concurrency: sourced(Concurrency::Unlimited, VERADIGM_BULK),
    since_with_offset: sourced(false, VERADIGM_BULK),
    lists_deletions: sourced(false, VERADIGM_BULK),
    since_trusted: sourced(true, VERADIGM_BULK),
    full_run_since: sourced(None, VERADIGM_BULK),
    files_redirect: sourced(false, VERADIGM_BULK),
    auth: sourced(Auth::PrivateKeyJwt, VERADIGM_BULK),
    group_id_prefix: sourced(None, VERADIGM_BULK),
    hosts: &[],
};

const ATHENA_WORKFLOW: &str =
    "https://docs.athenahealth.com/api/workflows/fhir-bulk-export-workflow";
const ATHENA_GROUP: &str = "https://docs.athenahealth.com/api/fhir-r4/group";

const ATHENAHEALTH: Profile = Profile {
    vendor: Vendor::Athenahealth,
    docs: &[ATHENA_WORKFLOW, ATHENA_GROUP],
    levels: sourced(&[Level::Group], ATHENA_GROUP),
    timeout_seconds: sourced(86_400, ATHENA_WORKFLOW),
    poll_seconds: sourced((1.0, 300.0, 10.0), ATHENA_WORKFLOW),
    client_id_header: sourced(None, ATHENA_WORKFLOW),
    scope_style: sourced(Scopes::V1, ATHENA_WORKFLOW),
    type_encoding: sourced(TypeEncoding::Comma, ATHENA_WORKFLOW),
    concurrency: sourced(Concurrency::Unlimited, ATHENA_WORKFLOW),
    since_with_offset: sourced(false, ATHENA_WORKFLOW),
    lists_deletions: sourced(false, ATHENA_WORKFLOW),
    since_trusted: sourced(true, ATHENA_WORKFLOW),
    full_run_since: sourced(None, ATHENA_WORKFLOW),
    files_redirect: sourced(false, ATHENA_WORKFLOW),
    auth: sourced(Auth::PrivateKeyJwt, ATHENA_WORKFLOW),
    group_id_prefix: sourced(Some("a-1.c-"), ATHENA_GROUP),
    hosts: &[
        "api.platform.athenahealth.com",
        "api.preview.platform.athenahealth.com",
    ],
};

const BCDA_BUILD: &str = "https://bcda.cms.gov/build.html";
const BCDA_FILTER: &str = "https://bcda.cms.gov/api-documentation/filter-claims-data.html";
const BCDA_RUNOUT: &str = "https://bcda.cms.gov/announcements/2025-py-data-limit-ended.html";

const BCDA: Profile = Profile {
    vendor: Vendor::Bcda,
    docs: &[BCDA_BUILD, BCDA_FILTER, BCDA_RUNOUT],
    // `/Patient/$export`, `/Group/all/$export` and the year-end `/Group/runout/$export`.
    levels: sourced(&[Level::Patient, Level::Group], BCDA_BUILD),
    timeout_seconds: sourced(86_400, BCDA_BUILD),
    poll_seconds: sourced((1.0, 300.0, 10.0), BCDA_BUILD),
    client_id_header: sourced(None, BCDA_BUILD),
    scope_style: sourced(Scopes::Auto, BCDA_BUILD),
    type_encoding: sourced(TypeEncoding::Comma, BCDA_BUILD),
    // 429 for a duplicate job of the same client.
    concurrency: sourced(Concurrency::OnePerClient, BCDA_BUILD),
    since_with_offset: sourced(true, BCDA_FILTER),
    lists_deletions: sourced(true, BCDA_FILTER),
    since_trusted: sourced(true, BCDA_FILTER),
    full_run_since: sourced(None, BCDA_FILTER),
    files_redirect: sourced(false, BCDA_BUILD),
    auth: sourced(Auth::ClientSecretBasic, BCDA_BUILD),
    group_id_prefix: sourced(None, BCDA_RUNOUT),
    hosts: &["api.bcda.cms.gov", "sandbox.bcda.cms.gov"],
};

const AB2D_PARAMS: &str = "https://ab2d.cms.gov/query-parameters-v2";
const AB2D_ACCESS: &str = "https://ab2d.cms.gov/access-production-claims-data";

const AB2D: Profile = Profile {
    vendor: Vendor::Ab2d,
    docs: &[AB2D_PARAMS, AB2D_ACCESS],
    levels: sourced(&[Level::Patient, Level::Group], AB2D_ACCESS),
    // "If it takes more than 30 hours for a job to complete, the request will time out".
    timeout_seconds: sourced(30 * 3600, AB2D_ACCESS),
    poll_seconds: sourced((1.0, 300.0, 10.0), AB2D_ACCESS),
    client_id_header: sourced(None, AB2D_ACCESS),
    scope_style: sourced(Scopes::Auto, AB2D_ACCESS),
    type_encoding: sourced(TypeEncoding::Comma, AB2D_PARAMS),
    concurrency: sourced(Concurrency::OnePerClient, AB2D_ACCESS),
    since_with_offset: sourced(true, AB2D_PARAMS),
    lists_deletions: sourced(true, AB2D_PARAMS),
    since_trusted: sourced(true, AB2D_PARAMS),
    // A missing `_since` means "since your last successful export"; the earliest data is
    // from 2020-01-01, so a full run asks from then.
    full_run_since: sourced(Some(AB2D_EARLIEST), AB2D_PARAMS),
    files_redirect: sourced(false, AB2D_ACCESS),
    auth: sourced(Auth::ClientSecretBasic, AB2D_ACCESS),
    group_id_prefix: sourced(None, AB2D_ACCESS),
    hosts: &["api.ab2d.cms.gov", "sandbox.ab2d.cms.gov"],
};

/// The earliest `_since` AB2D has data for, the explicit start of a full AB2D run.
pub const AB2D_EARLIEST: &str = "2020-01-01T00:00:00+00:00";

/// A `_since` value with `Z` spelled as the numeric offset `+00:00` (BCDA and AB2D refuse `Z`).
pub fn with_numeric_offset(instant: &str) -> String {
    match instant.strip_suffix(['Z', 'z']) {
        Some(rest) => format!("{rest}+00:00"),
        None => instant.to_string(),
    }
}

/// The vendor whose production host `host` is, if any.
pub fn vendor_of_host(host: &str) -> Option<Vendor> {
    Vendor::ALL.into_iter().find(|v| {
        v.profile()
            .hosts
            .iter()
            .any(|h| host.eq_ignore_ascii_case(h))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for vendor in Vendor::ALL {
            assert_eq!(vendor.name().parse::<Vendor>(), Ok(vendor));
            assert_eq!(vendor.profile().vendor, vendor);
        }
        let err = "cerner".parse::<Vendor>().unwrap_err();
        assert!(err.contains("\"oracle\""), "{err}");
    }

    #[test]
    fn every_profile_value_cites_a_url() {
        for vendor in Vendor::ALL {
            let p = vendor.profile();
            let sources = [
                p.levels.source,
                p.timeout_seconds.source,
                p.poll_seconds.source,
                p.client_id_header.source,
                p.scope_style.source,
                p.type_encoding.source,
                p.concurrency.source,
                p.since_with_offset.source,
                p.since_trusted.source,
                p.full_run_since.source,
                p.files_redirect.source,
                p.auth.source,
                p.group_id_prefix.source,
            ];
            for source in sources.iter().chain(p.docs) {
                assert!(source.starts_with("https://"), "{vendor}: {source}");
            }
            assert!(!p.levels.value.is_empty(), "{vendor}");
            let (min, max, default) = p.poll_seconds.value;
            assert!(min <= default && default <= max, "{vendor}");
        }
    }

    #[test]
    fn z_becomes_a_numeric_offset_and_offsets_stay() {
        assert_eq!(
            with_numeric_offset("2026-01-01T00:00:00.123Z"),
            "2026-01-01T00:00:00.123+00:00"
        );
        assert_eq!(
            with_numeric_offset("2026-01-01T00:00:00-05:00"),
            "2026-01-01T00:00:00-05:00"
        );
        assert_eq!(vendor_of_host("FHIR.epic.com"), Some(Vendor::Epic));
        assert_eq!(vendor_of_host("ehr.example.org"), None);
    }
}
