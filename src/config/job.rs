//! Sync job files: `jobs/<name>.toml`, one per sync job. The job's name is the file stem.
//!
//! A job file says which FHIR server to pull from, how to authenticate, what to export and when.
//! It never holds a secret: the private key comes from a file path or an environment variable
//! that the job names.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use url::Url;

use super::alert::AlertFile;
use super::{AlertConfig, AlertSettings, ConfigError, Problem};
use crate::fhir;
use crate::smart::SigningAlgorithm;
pub use crate::vendor::TypeEncoding;
use crate::vendor::{self, Vendor};

/// A validated sync job.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// The job's name: its file stem. Also the `source` that its rows are keyed by.
    pub name: String,
    /// The file it was read from (for messages), or a placeholder for built-in jobs.
    pub file: PathBuf,
    pub description: Option<String>,
    pub enabled: bool,
    pub fhir: FhirConfig,
    pub auth: AuthConfig,
    pub export: ExportConfig,
    pub schedule: Option<ScheduleConfig>,
    /// Where and when to alert about this job (`[alert]`); unset fields take the service's
    /// `[alerts]` values once [`JobConfig::with_alert_defaults`] has run.
    pub alert: AlertConfig,
}

impl JobConfig {
    /// The job with what its `[alert]` table leaves unset taken from the service settings.
    pub fn with_alert_defaults(mut self, service: &AlertSettings) -> Self {
        self.alert.inherit(service);
        self
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    description: Option<String>,
    #[serde(default = "default_true")]
    enabled: bool,
    fhir: FhirConfig,
    auth: AuthFile,
    export: ExportConfig,
    schedule: Option<ScheduleConfig>,
    alert: Option<AlertFile>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirConfig {
    /// The FHIR server's base URL (`https://ehr.example.org/api/FHIR/R4`). Required.
    pub base_url: Url,
    /// Allow plain `http://` to a host other than loopback. Default false; only for test rigs.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// The token endpoint, overriding discovery (for servers whose discovery is wrong or behind
    /// a proxy). Default: discovered from `.well-known/smart-configuration` or `metadata`.
    #[serde(default)]
    pub token_url: Option<Url>,
    /// Origins (`https://files.example.org`) besides the FHIR server's own that export files
    /// may come from over plain http or at a loopback, private or link-local address, and that
    /// receive the access token when the manifest says `requiresAccessToken`. Default none:
    /// files elsewhere must be https at a public address and get no token.
    #[serde(default)]
    pub file_origins: Vec<Url>,
    /// The EHR vendor (`generic`, `epic`, `oracle`, `veradigm`, `athenahealth`, `bcda`, `ab2d`),
    /// whose documented defaults fill every setting this file leaves unset (see
    /// `src/vendor.rs`). Default `generic`: the Bulk Data spec's defaults.
    #[serde(default)]
    pub vendor: Vendor,
    /// Headers sent with every request to the FHIR server's own origin (not to file hosts
    /// elsewhere). Default: the vendor's (Epic: `Epic-Client-ID` = `auth.client_id`); a header
    /// named here replaces the vendor's of the same name. Not for secrets: job settings may be
    /// shown in logs and reports; credentials belong in `[auth]`.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    client_id: String,
    private_key_file: Option<PathBuf>,
    private_key_env: Option<String>,
    #[serde(default = "default_algorithm")]
    algorithm: String,
    key_id: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    method: Option<String>,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    jku: Option<Url>,
    #[serde(default)]
    keys: Vec<KeyFile>,
    scope_style: Option<String>,
    on_missing_scope: Option<String>,
}

/// One more published key (`[[auth.keys]]`), for key rotation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    private_key_file: Option<PathBuf>,
    private_key_env: Option<String>,
    #[serde(default = "default_algorithm")]
    algorithm: String,
    key_id: Option<String>,
}

fn default_algorithm() -> String {
    "RS384".into()
}

/// Where the private key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A PEM or private JWK file (path resolved against the job file's directory).
    File(PathBuf),
    /// An environment variable holding the PEM text or a private JWK.
    Env(String),
    /// PEM text held in memory (the built-in `demo` job); never read from a job file.
    Inline(secrecy::SecretString),
    /// No key: the job authenticates with `client_secret_basic` or not at all.
    NotNeeded,
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(path) => f.debug_tuple("File").field(path).finish(),
            KeySource::Env(name) => f.debug_tuple("Env").field(name).finish(),
            KeySource::Inline(_) => f.write_str("Inline([REDACTED])"),
            KeySource::NotNeeded => f.write_str("NotNeeded"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The client id the EHR assigned at registration.
    pub client_id: String,
    pub key: KeySource,
    /// RS384 (default) or ES384.
    pub algorithm: SigningAlgorithm,
    /// The `kid` registered with the EHR. Default: the key's RFC 7638 thumbprint, which is what
    /// `fhir-sync keys generate` prints in the JWKS.
    pub key_id: Option<String>,
    /// Scopes to request. Default: one `system/<Type>.read` (or `.rs`) per exported type.
    pub scopes: Vec<String>,
    /// How the client authenticates at the token endpoint. Default `private_key_jwt`.
    pub method: AuthMethod,
    /// Optional `jku` header: the JWKS URL registered with the EHR. Default: not sent.
    pub jku: Option<Url>,
    /// More keys published by `fhir-sync keys jwks` next to the active one (key rotation: the
    /// next key before it signs, the previous one until the EHR's cache has expired). Default
    /// none. One of them signs instead only when the server does not accept the active key's
    /// algorithm.
    pub extra_keys: Vec<KeyConfig>,
    /// SMART scope syntax: `auto` (default: from the server's `capabilities`), `v1` or `v2`.
    pub scope_style: ScopeStyle,
    /// What to do when the granted scopes do not cover an exported type: `fail` (default) or
    /// `drop` (export the covered types and warn).
    pub on_missing_scope: MissingScopePolicy,
}

/// A published key of the job.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub key: KeySource,
    pub algorithm: SigningAlgorithm,
    pub key_id: Option<String>,
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Default)]
pub enum AuthMethod {
    /// SMART Backend Services: a signed client assertion (default).
    #[default]
    PrivateKeyJwt,
    /// OAuth client credentials with HTTP Basic (CMS BCDA, AB2D). The secret comes from a file
    /// or an environment variable.
    ClientSecretBasic(SecretSource),
    /// A static bearer token issued out of band, from a file or an environment variable; it is
    /// sent as is and never renewed (a refusal is a fatal error: replace the token).
    BearerToken(SecretSource),
    /// No authorisation at all (an open test server such as a local HAPI).
    None,
}

/// Where a client secret comes from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// SMART scope syntax.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ScopeStyle {
    /// v2 when the server advertises `permission-v2` without `permission-v1`, else v1.
    #[default]
    Auto,
    /// `system/Patient.read`.
    V1,
    /// `system/Patient.rs`.
    V2,
}

/// What to do when the granted scopes do not cover an exported type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MissingScopePolicy {
    /// Fail the run before kick-off (default): never export silently less than configured.
    #[default]
    Fail,
    /// Drop the uncovered types from `_type` and warn.
    Drop,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExportLevel {
    /// `[base]/$export`: everything the client may see (default).
    #[default]
    System,
    /// `[base]/Patient/$export`: all patients' compartments.
    Patient,
    /// `[base]/Group/{group_id}/$export`: one group's patients.
    Group,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// `system`, `patient` or `group`. Default: the vendor's first level (`system` for
    /// `generic`, `group` for Epic, Oracle, Veradigm and athenahealth, `patient` for BCDA and AB2D).
    #[serde(default)]
    pub level: ExportLevel,
    /// Group id, required for (and only for) `level = "group"`.
    pub group_id: Option<String>,
    /// Resource types to export. Required, non-empty.
    pub types: Vec<String>,
    /// How `_type` is sent: `comma` (one comma-joined parameter; default, and what Oracle
    /// requires) or `repeated` (one parameter per type).
    #[serde(default)]
    pub type_encoding: TypeEncoding,
    /// Send `_since` with a numeric offset (`+00:00` instead of `Z`), as BCDA and AB2D require.
    /// Default: the vendor's (true for BCDA and AB2D, else false).
    #[serde(default)]
    pub since_with_offset: bool,
    /// Shortest wait between status polls, whatever `Retry-After` says. Default: the vendor's
    /// (1 for `generic`).
    #[serde(default = "default_poll_min")]
    pub poll_min_interval_seconds: f64,
    /// Longest wait between status polls, whatever `Retry-After` says. Default: the vendor's
    /// (300 for `generic`, 600 for Epic and Oracle).
    #[serde(default = "default_poll_max")]
    pub poll_max_interval_seconds: f64,
    /// Wait between polls when the server sends no `Retry-After`. Default: the vendor's (10 for
    /// `generic`).
    #[serde(default = "default_poll_default")]
    pub poll_default_interval_seconds: f64,
    /// Give up on an export that is not ready after this long. Default: the vendor's (86400,
    /// one day, for `generic`; 30 days for Epic).
    #[serde(default = "default_export_timeout")]
    pub timeout_seconds: u64,
    /// Incremental runs ask for this many seconds before the last successful run's
    /// transactionTime, to re-read a little history. Safe because loads are newer-wins.
    /// Default 0: `_since` is the transactionTime exactly as the server sent it.
    #[serde(default)]
    pub since_overlap_seconds: u64,
    /// Kick-off method: `get` (query parameters, default) or `post` (a `Parameters` body;
    /// required for `patients`).
    #[serde(default)]
    pub method: ExportMethod,
    /// `_since`: only resources changed after this FHIR instant; also what `--full` runs send.
    /// Default: the vendor's (AB2D: 2020-01-01T00:00:00+00:00, because AB2D reads a missing
    /// `_since` as "since your last export"), else none (everything).
    pub since: Option<String>,
    /// `_until`: only resources changed before this FHIR instant. Default none.
    pub until: Option<String>,
    /// `_outputFormat`. Default none (the server's default, NDJSON).
    pub output_format: Option<String>,
    /// `_elements`, sent comma-joined. Default none.
    #[serde(default)]
    pub elements: Vec<String>,
    /// `_typeFilter` entries (`Observation?status=final`), one parameter each. Default none.
    #[serde(default)]
    pub type_filters: Vec<String>,
    /// `patient` references (`Patient/123`) for patient or group exports; needs
    /// `method = "post"`. Default none.
    #[serde(default)]
    pub patients: Vec<String>,
    /// `includeAssociatedData` values (`LatestProvenanceResources`), comma-joined. Default none.
    #[serde(default)]
    pub include_associated_data: Vec<String>,
    /// Vendor parameters sent as given, e.g. `[export.extra_params] _mode = "crawl"`. Default none.
    #[serde(default)]
    pub extra_params: std::collections::BTreeMap<String, String>,
    /// Send `Prefer: handling=lenient` so the server ignores parameters it does not support
    /// instead of refusing the export. Default false.
    #[serde(default)]
    pub lenient: bool,
    /// Whether a `partial` run (the export reported error files, a full export listed no
    /// files, or the Patient count fell past `max_patient_drop_percent`) still moves the
    /// watermark. Default false: the next incremental run asks again from where the last
    /// complete run left off, so what the server failed to export is asked for again.
    #[serde(default)]
    pub advance_watermark_on_partial: bool,
    /// Hold the watermark (the run ends `partial`) when a full run loads more than this
    /// percentage fewer Patients than the previous full run that ended `succeeded`. Between
    /// 0 and 100. Default none: no such gate.
    pub max_patient_drop_percent: Option<f64>,
    /// Whether a full run whose export reported no error files marks deleted the rows of the
    /// exported types (of the group's members, for a group export) that the export no longer
    /// contains, for servers that never list deletions in `deleted[]`. Unset in the file, the
    /// vendor profile fills it at load (`lists_deletions`); unset in a job built in code: off.
    pub reconcile_deletes: Option<bool>,
}

impl ExportConfig {
    /// Whether full runs of this export reconcile deletions (`reconcile_deletes`, off when
    /// unset).
    pub fn reconciles_deletes(&self) -> bool {
        self.reconcile_deletes.unwrap_or(false)
    }
}

/// How the `$export` kick-off is sent.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExportMethod {
    /// Parameters in the query string (default).
    #[default]
    Get,
    /// Parameters in a FHIR `Parameters` resource body.
    Post,
}

impl Default for ExportConfig {
    /// An export of nothing yet (`types` empty), with every other setting at its default.
    fn default() -> Self {
        ExportConfig {
            level: ExportLevel::System,
            group_id: None,
            types: Vec::new(),
            type_encoding: TypeEncoding::Comma,
            since_with_offset: false,
            poll_min_interval_seconds: default_poll_min(),
            poll_max_interval_seconds: default_poll_max(),
            poll_default_interval_seconds: default_poll_default(),
            timeout_seconds: default_export_timeout(),
            since_overlap_seconds: 0,
            method: ExportMethod::Get,
            since: None,
            until: None,
            output_format: None,
            elements: Vec::new(),
            type_filters: Vec::new(),
            patients: Vec::new(),
            include_associated_data: Vec::new(),
            extra_params: Default::default(),
            lenient: false,
            advance_watermark_on_partial: false,
            max_patient_drop_percent: None,
            reconcile_deletes: None,
        }
    }
}

/// Kick-off parameters with their own setting, which `extra_params` may not repeat.
const RESERVED_PARAMS: [&str; 8] = [
    "_type",
    "_since",
    "_until",
    "_outputFormat",
    "_elements",
    "_typeFilter",
    "patient",
    "includeAssociatedData",
];

fn default_poll_min() -> f64 {
    1.0
}
fn default_poll_max() -> f64 {
    300.0
}
fn default_poll_default() -> f64 {
    10.0
}
fn default_export_timeout() -> u64 {
    86_400
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Cron expression, 5 fields or 6 with seconds first (`0 0 2 * * *` = 02:00 every day).
    pub cron: String,
    /// IANA time zone the cron expression is read in. Default `UTC`.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// What a tick does while the job's previous run is still going: `skip` (default; the
    /// skipped tick is recorded as a run with status `skipped`) or `queue` (the run waits).
    #[serde(default)]
    pub overlap: Overlap,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    #[default]
    Skip,
    Queue,
}

fn default_timezone() -> String {
    "UTC".into()
}

/// Reads and validates every `*.toml` in `dir`, returning all problems of all files together.
pub fn load_jobs(dir: &Path) -> Result<Vec<JobConfig>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ConfigError::single(dir, "", format!("cannot read the jobs directory: {e}"))
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    let mut jobs = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        match load_job(&path) {
            Ok(job) => jobs.push(job),
            Err(e) => problems.extend(e.problems),
        }
    }
    if problems.is_empty() {
        Ok(jobs)
    } else {
        Err(ConfigError { problems })
    }
}

/// Reads and validates one job file.
pub fn load_job(path: &Path) -> Result<JobConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::single(path, "", format!("cannot read: {e}")))?;
    let deserializer = toml::Deserializer::parse(&text)
        .map_err(|e| ConfigError::single(path, "", format!("invalid TOML: {}", e.message())))?;
    let file: JobFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        ConfigError::single(path, field, e.inner().message().to_string())
    })?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    let base_dir = path.parent().unwrap_or(Path::new("."));
    // The file parsed as TOML above, so this parse succeeds; it tells set keys from defaults.
    let table: toml::Table = text.parse().unwrap_or_default();
    let mut file = file;
    apply_vendor(&mut file, &table);
    validate(path, base_dir, name, file)
}

/// Whether the job file sets `section.key` itself.
fn is_set(table: &toml::Table, section: &str, key: &str) -> bool {
    table
        .get(section)
        .and_then(|s| s.as_table())
        .is_some_and(|s| s.contains_key(key))
}

/// Fills what the file leaves unset from its vendor's profile: explicit job value > vendor
/// profile > generic default.
fn apply_vendor(file: &mut JobFile, table: &toml::Table) {
    let profile = file.fhir.vendor.profile();
    let export = &mut file.export;
    if !is_set(table, "export", "level") {
        export.level = match profile.levels.value[0] {
            vendor::Level::System => ExportLevel::System,
            vendor::Level::Patient => ExportLevel::Patient,
            vendor::Level::Group => ExportLevel::Group,
        };
    }
    if !is_set(table, "export", "timeout_seconds") {
        export.timeout_seconds = profile.timeout_seconds.value;
    }
    let (min, max, default) = profile.poll_seconds.value;
    if !is_set(table, "export", "poll_min_interval_seconds") {
        export.poll_min_interval_seconds = min.min(export.poll_max_interval_seconds);
    }
    if !is_set(table, "export", "poll_max_interval_seconds") {
        export.poll_max_interval_seconds = max.max(export.poll_min_interval_seconds);
    }
    if !is_set(table, "export", "poll_default_interval_seconds") {
        export.poll_default_interval_seconds = default;
    }
    if !is_set(table, "export", "type_encoding") {
        export.type_encoding = profile.type_encoding.value;
    }
    if !is_set(table, "export", "since_with_offset") {
        export.since_with_offset = profile.since_with_offset.value;
    }
    if !is_set(table, "export", "reconcile_deletes") {
        export.reconcile_deletes = Some(!profile.lists_deletions.value);
    }
    if !is_set(table, "export", "since")
        && let Some(since) = profile.full_run_since.value
    {
        export.since = Some(since.to_string());
    }
    if let Some(header) = profile.client_id_header.value
        && !file
            .fhir
            .headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case(header))
    {
        file.fhir
            .headers
            .insert(header.to_string(), file.auth.client_id.clone());
    }
    if file.auth.scope_style.is_none() {
        file.auth.scope_style = match profile.scope_style.value {
            vendor::Scopes::Auto => None,
            vendor::Scopes::V1 => Some("v1".into()),
            vendor::Scopes::V2 => Some("v2".into()),
        };
    }
    if file.auth.method.is_none() {
        file.auth.method = Some(profile.auth.value.name().to_string());
    }
}

fn validate(
    path: &Path,
    base_dir: &Path,
    name: String,
    file: JobFile,
) -> Result<JobConfig, ConfigError> {
    let mut problems = Vec::new();
    let mut problem = |field: String, message: String| {
        problems.push(Problem {
            file: path.to_path_buf(),
            field,
            message,
        });
    };

    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        problem(
            String::new(),
            "the file name must be letters, digits, '-' or '_' (it names the job)".into(),
        );
    }

    if let Err(message) =
        crate::transport::check_url(&file.fhir.base_url, file.fhir.allow_insecure_http)
    {
        problem("fhir.base_url".into(), message);
    }

    let algorithm = match SigningAlgorithm::from_str(&file.auth.algorithm) {
        Ok(alg) => Some(alg),
        Err(message) => {
            problem("auth.algorithm".into(), message);
            None
        }
    };
    if file.auth.client_id.trim().is_empty() {
        problem("auth.client_id".into(), "must not be empty".into());
    }
    let method = match file.auth.method.as_deref().unwrap_or("private_key_jwt") {
        "private_key_jwt" => Some(AuthMethod::PrivateKeyJwt),
        "none" => Some(AuthMethod::None),
        "client_secret_basic" => {
            match (&file.auth.client_secret_file, &file.auth.client_secret_env) {
                (Some(path), None) => Some(AuthMethod::ClientSecretBasic(SecretSource::File(
                    if path.is_absolute() {
                        path.clone()
                    } else {
                        base_dir.join(path)
                    },
                ))),
                (None, Some(var)) => Some(AuthMethod::ClientSecretBasic(SecretSource::Env(
                    var.clone(),
                ))),
                _ => {
                    problem(
                        "auth.client_secret_file".into(),
                        "client_secret_basic needs exactly one of client_secret_file and client_secret_env".into(),
                    );
                    None
                }
            }
        }
        "bearer_token" => match (&file.auth.token_file, &file.auth.token_env) {
            (Some(path), None) => Some(AuthMethod::BearerToken(SecretSource::File(
                if path.is_absolute() {
                    path.clone()
                } else {
                    base_dir.join(path)
                },
            ))),
            (None, Some(var)) => Some(AuthMethod::BearerToken(SecretSource::Env(var.clone()))),
            _ => {
                problem(
                    "auth.token_file".into(),
                    "bearer_token needs exactly one of token_file and token_env".into(),
                );
                None
            }
        },
        other => {
            problem(
                "auth.method".into(),
                format!(
                    "{other:?} is not supported (use \"private_key_jwt\", \"client_secret_basic\", \"bearer_token\" or \"none\")"
                ),
            );
            None
        }
    };
    if !matches!(method, Some(AuthMethod::BearerToken(_)))
        && (file.auth.token_file.is_some() || file.auth.token_env.is_some())
    {
        problem(
            "auth.token_file".into(),
            "only used with method = \"bearer_token\"".into(),
        );
    }
    for (name, value) in &file.fhir.headers {
        let valid = reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
            && reqwest::header::HeaderValue::from_str(value).is_ok();
        let reserved = ["authorization", "accept", "prefer", "content-type", "host"]
            .contains(&name.to_ascii_lowercase().as_str());
        if !valid || reserved {
            problem(
                format!("fhir.headers.{name}"),
                "is not a header fhir-sync may send as given".into(),
            );
        }
    }
    let needs_key = matches!(method, Some(AuthMethod::PrivateKeyJwt));
    if !matches!(method, Some(AuthMethod::ClientSecretBasic(_)))
        && (file.auth.client_secret_file.is_some() || file.auth.client_secret_env.is_some())
    {
        problem(
            "auth.client_secret_file".into(),
            "only used with method = \"client_secret_basic\"".into(),
        );
    }
    let scope_style = match file.auth.scope_style.as_deref().unwrap_or("auto") {
        "auto" => ScopeStyle::Auto,
        "v1" => ScopeStyle::V1,
        "v2" => ScopeStyle::V2,
        other => {
            problem(
                "auth.scope_style".into(),
                format!("{other:?} is not one of \"auto\", \"v1\", \"v2\""),
            );
            ScopeStyle::Auto
        }
    };
    let on_missing_scope = match file.auth.on_missing_scope.as_deref().unwrap_or("fail") {
        "fail" => MissingScopePolicy::Fail,
        "drop" => MissingScopePolicy::Drop,
        other => {
            problem(
                "auth.on_missing_scope".into(),
                format!("{other:?} is not one of \"fail\", \"drop\""),
            );
            MissingScopePolicy::Fail
        }
    };
    if let Some(url) = &file.fhir.token_url
        && let Err(message) = crate::transport::check_url(url, file.fhir.allow_insecure_http)
    {
        problem("fhir.token_url".into(), message);
    }
    for (n, origin) in file.fhir.file_origins.iter().enumerate() {
        let bare = origin.path() == "/" && origin.query().is_none() && origin.username().is_empty();
        if !matches!(origin.scheme(), "https" | "http") || origin.host().is_none() || !bare {
            problem(
                format!("fhir.file_origins[{n}]"),
                format!(
                    "{:?} is not an origin (scheme://host[:port], nothing after it)",
                    origin.as_str()
                ),
            );
        }
    }
    if let Some(url) = &file.auth.jku
        && url.scheme() != "https"
    {
        problem("auth.jku".into(), "must be an https URL".into());
    }
    let mut extra_keys = Vec::new();
    for (i, extra) in file.auth.keys.iter().enumerate() {
        let field = format!("auth.keys[{i}]");
        let algorithm = match SigningAlgorithm::from_str(&extra.algorithm) {
            Ok(alg) => alg,
            Err(message) => {
                problem(format!("{field}.algorithm"), message);
                continue;
            }
        };
        let source = match (&extra.private_key_file, &extra.private_key_env) {
            (Some(path), None) => KeySource::File(if path.is_absolute() {
                path.clone()
            } else {
                base_dir.join(path)
            }),
            (None, Some(var)) => KeySource::Env(var.clone()),
            _ => {
                problem(
                    field,
                    "set exactly one of private_key_file and private_key_env".into(),
                );
                continue;
            }
        };
        match crate::smart::SigningKey::load(&source, algorithm, extra.key_id.clone()) {
            Ok(_) => extra_keys.push(KeyConfig {
                key: source,
                algorithm,
                key_id: extra.key_id.clone(),
            }),
            Err(e) => problem(field, e.to_string()),
        }
    }
    let key = match (&file.auth.private_key_file, &file.auth.private_key_env) {
        (None, None) if !needs_key => Some(("auth", KeySource::NotNeeded)),
        (Some(_), Some(_)) => {
            problem(
                "auth".into(),
                "set one of private_key_file and private_key_env, not both".into(),
            );
            None
        }
        (None, None) => {
            problem(
                "auth.private_key_file".into(),
                "required (or set auth.private_key_env)".into(),
            );
            None
        }
        (Some(file_path), None) => {
            let resolved = if file_path.is_absolute() {
                file_path.clone()
            } else {
                base_dir.join(file_path)
            };
            Some(("auth.private_key_file", KeySource::File(resolved)))
        }
        (None, Some(var)) => Some(("auth.private_key_env", KeySource::Env(var.clone()))),
    };
    // Load the key now so that a missing file, an unset variable or a key of the wrong kind is a
    // config error, reported with the others, rather than a failure at 2 a.m.
    if let (Some((field, source)), Some(alg)) = (&key, algorithm)
        && !matches!(source, KeySource::NotNeeded)
        && let Err(e) = crate::smart::SigningKey::load(source, alg, file.auth.key_id.clone())
    {
        problem((*field).into(), e.to_string());
    }
    for (i, scope) in file.auth.scopes.iter().enumerate() {
        if !scope.starts_with("system/") {
            problem(
                format!("auth.scopes[{i}]"),
                format!("{scope:?} is not a system-level scope (system/<Type>.<access>)"),
            );
        }
    }

    if file.export.types.is_empty() {
        problem(
            "export.types".into(),
            "must list at least one resource type".into(),
        );
    }
    for (i, resource_type) in file.export.types.iter().enumerate() {
        if !fhir::is_resource_type(resource_type) {
            let hint = fhir::closest_resource_type(resource_type)
                .map(|t| format!(" (did you mean {t:?}?)"))
                .unwrap_or_default();
            problem(
                format!("export.types[{i}]"),
                format!("{resource_type:?} is not a FHIR R4 resource type{hint}"),
            );
        }
    }
    match (file.export.level, &file.export.group_id) {
        (ExportLevel::Group, None) => problem(
            "export.group_id".into(),
            "required when level = \"group\"".into(),
        ),
        (ExportLevel::Group, Some(id)) if !fhir::is_valid_id(id) => problem(
            "export.group_id".into(),
            format!("{id:?} is not a valid FHIR id"),
        ),
        (ExportLevel::System | ExportLevel::Patient, Some(_)) => problem(
            "export.group_id".into(),
            "only allowed when level = \"group\"".into(),
        ),
        _ => {}
    }
    let export = &file.export;
    let positive = |seconds: f64| seconds.is_finite() && seconds > 0.0;
    if !positive(export.poll_min_interval_seconds) {
        problem(
            "export.poll_min_interval_seconds".into(),
            "must be greater than 0".into(),
        );
    }
    if !positive(export.poll_max_interval_seconds)
        || export.poll_max_interval_seconds < export.poll_min_interval_seconds
    {
        problem(
            "export.poll_max_interval_seconds".into(),
            "must be at least poll_min_interval_seconds".into(),
        );
    }
    if !positive(export.poll_default_interval_seconds) {
        problem(
            "export.poll_default_interval_seconds".into(),
            "must be greater than 0".into(),
        );
    }
    if export.timeout_seconds == 0 {
        problem(
            "export.timeout_seconds".into(),
            "must be greater than 0".into(),
        );
    }
    if let Some(percent) = export.max_patient_drop_percent
        && !(0.0..=100.0).contains(&percent)
    {
        problem(
            "export.max_patient_drop_percent".into(),
            format!("{percent} is not a percentage between 0 and 100"),
        );
    }
    for (field, value) in [
        ("export.since", &export.since),
        ("export.until", &export.until),
    ] {
        if let Some(value) = value
            && fhir::parse_instant(value).is_none()
        {
            problem(
                field.into(),
                format!("{value:?} is not a FHIR instant (e.g. 2024-01-01T00:00:00+02:00)"),
            );
        }
    }
    if !export.patients.is_empty() {
        if export.method != ExportMethod::Post {
            problem(
                "export.patients".into(),
                "needs method = \"post\" (the spec allows patient only in a POST body)".into(),
            );
        }
        if export.level == ExportLevel::System {
            problem(
                "export.patients".into(),
                "only allowed with level = \"patient\" or \"group\"".into(),
            );
        }
    }
    for (i, reference) in export.patients.iter().enumerate() {
        let valid = reference
            .strip_prefix("Patient/")
            .is_some_and(fhir::is_valid_id);
        if !valid {
            problem(
                format!("export.patients[{i}]"),
                format!("{reference:?} is not a Patient reference (Patient/<id>)"),
            );
        }
    }
    for name in export.extra_params.keys() {
        if RESERVED_PARAMS.contains(&name.as_str()) {
            problem(
                format!("export.extra_params.{name}"),
                "is set by its own export setting; use that instead".into(),
            );
        }
    }

    if let Some(schedule) = &file.schedule {
        if let Err(e) = croner::Cron::from_str(&schedule.cron) {
            problem(
                "schedule.cron".into(),
                format!("{:?} is not a valid cron expression: {e}", schedule.cron),
            );
        }
        if schedule.timezone.parse::<chrono_tz::Tz>().is_err() {
            problem(
                "schedule.timezone".into(),
                format!("{:?} is not an IANA time zone", schedule.timezone),
            );
        }
    }

    let alert = match file.alert.map(|a| a.validate(base_dir)) {
        None => AlertConfig::default(),
        Some(Ok(alert)) => alert,
        Some(Err(alert_problems)) => {
            for (field, message) in alert_problems {
                problem(field, message);
            }
            AlertConfig::default()
        }
    };

    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    // Both are Some here: a None pushed a problem above.
    let (Some((_, key)), Some(algorithm), Some(method)) = (key, algorithm, method) else {
        unreachable!("missing key, algorithm or method was reported as a problem");
    };
    Ok(JobConfig {
        name,
        file: path.to_path_buf(),
        description: file.description,
        enabled: file.enabled,
        fhir: file.fhir,
        auth: AuthConfig {
            client_id: file.auth.client_id,
            key,
            algorithm,
            key_id: file.auth.key_id,
            scopes: file.auth.scopes,
            method,
            jku: file.auth.jku,
            extra_keys,
            scope_style,
            on_missing_scope,
        },
        export: file.export,
        schedule: file.schedule,
        alert,
    })
}

/// What `config check` warns about: settings that contradict the job's vendor profile
/// (each names the file, the field and the profile's source). Not errors: every profile value
/// may be overridden, and the vendor may have changed since its documentation was read.
pub fn vendor_warnings(job: &JobConfig) -> Vec<Problem> {
    let profile = job.fhir.vendor.profile();
    let vendor = job.fhir.vendor;
    let mut warnings = Vec::new();
    let mut warn = |field: &str, message: String| {
        warnings.push(Problem {
            file: job.file.clone(),
            field: field.to_string(),
            message,
        });
    };
    let level = match job.export.level {
        ExportLevel::System => vendor::Level::System,
        ExportLevel::Patient => vendor::Level::Patient,
        ExportLevel::Group => vendor::Level::Group,
    };
    if !profile.levels.value.contains(&level) {
        let offered: Vec<&str> = profile.levels.value.iter().map(|l| l.name()).collect();
        warn(
            "export.level",
            format!(
                "{vendor} does not offer {:?} exports, only {} (see {})",
                level.name(),
                offered.join(", "),
                profile.levels.source
            ),
        );
    }
    if job.export.timeout_seconds < profile.timeout_seconds.value {
        warn(
            "export.timeout_seconds",
            format!(
                "{} is shorter than {vendor}'s exports may take ({} seconds; see {})",
                job.export.timeout_seconds,
                profile.timeout_seconds.value,
                profile.timeout_seconds.source
            ),
        );
    }
    if let Some(earliest) = profile.full_run_since.value {
        let early = fhir::parse_instant(earliest);
        let since = job.export.since.as_deref().and_then(fhir::parse_instant);
        if since.is_none() || since > early {
            warn(
                "export.since",
                format!(
                    "{vendor} reads a missing _since as \"since your last export\", so a --full run exports everything only with an explicit early since (set since = {earliest:?}; see {})",
                    profile.full_run_since.source
                ),
            );
        }
    }
    if let (Some(prefix), Some(id)) = (profile.group_id_prefix.value, &job.export.group_id)
        && !id.starts_with(prefix)
    {
        warn(
            "export.group_id",
            format!(
                "{vendor} group ids look like {prefix}<practice id>, not {id:?} (see {})",
                profile.group_id_prefix.source
            ),
        );
    }
    let method = match &job.auth.method {
        AuthMethod::PrivateKeyJwt => Some(vendor::Auth::PrivateKeyJwt),
        AuthMethod::ClientSecretBasic(_) => Some(vendor::Auth::ClientSecretBasic),
        AuthMethod::BearerToken(_) | AuthMethod::None => None,
    };
    if method.is_some_and(|m| m != profile.auth.value) {
        warn(
            "auth.method",
            format!(
                "{vendor} authenticates clients with {} (see {})",
                profile.auth.value.name(),
                profile.auth.source
            ),
        );
    }
    if profile.scope_style.value == vendor::Scopes::V1 && job.auth.scope_style == ScopeStyle::V2 {
        warn(
            "auth.scope_style",
            format!(
                "{vendor} grants SMART v1 scopes only (see {})",
                profile.scope_style.source
            ),
        );
    }
    if profile.type_encoding.value == TypeEncoding::Comma
        && job.export.type_encoding == TypeEncoding::Repeated
        && vendor != Vendor::Generic
    {
        warn(
            "export.type_encoding",
            format!(
                "{vendor} expects one comma-joined _type (see {})",
                profile.type_encoding.source
            ),
        );
    }
    if let Some(host) = job.fhir.base_url.host_str()
        && let Some(hosted) = vendor::vendor_of_host(host)
        && hosted != vendor
    {
        warn(
            "fhir.vendor",
            format!("{host} is {hosted}'s server; set vendor = \"{hosted}\" to use its profile"),
        );
    }
    warnings
}

/// Jobs that would refuse each other's exports: two jobs of one client on one server whose
/// vendor runs one export at a time per client (and group, for Epic). Each warning names the
/// later job's file.
pub fn concurrency_warnings(jobs: &[JobConfig]) -> Vec<Problem> {
    let mut warnings = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let concurrency = job.fhir.vendor.profile().concurrency.value;
        let clash = |other: &&JobConfig| {
            let same_client = other.fhir.vendor == job.fhir.vendor
                && other.fhir.base_url == job.fhir.base_url
                && other.auth.client_id == job.auth.client_id;
            same_client
                && match concurrency {
                    vendor::Concurrency::Unlimited => false,
                    vendor::Concurrency::OnePerClientAndGroup => {
                        other.export.group_id == job.export.group_id
                    }
                    vendor::Concurrency::OnePerClientAndTenant
                    | vendor::Concurrency::OnePerClient => true,
                }
        };
        if let Some(other) = jobs[..i].iter().find(clash) {
            warnings.push(Problem {
                file: job.file.clone(),
                field: "auth.client_id".into(),
                message: format!(
                    "job {} uses the same client on the same server, and {} runs one export at a time per client{}: their runs will refuse each other's kick-offs unless scheduled apart (see {})",
                    other.name,
                    job.fhir.vendor,
                    if concurrency == vendor::Concurrency::OnePerClientAndGroup { " and group" } else { "" },
                    job.fhir.vendor.profile().concurrency.source
                ),
            });
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const VALID: &str = r#"
        [fhir]
        base_url = "https://ehr.example.org/fhir"
        [auth]
        client_id = "abc"
        private_key_env = "FHIR_SYNC_TEST_KEY_THAT_IS_NOT_SET"
        [export]
        types = ["Patient"]
    "#;

    #[test]
    fn unknown_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "j.toml",
            &VALID.replace("types =", "typo = 1\ntypes ="),
        );
        let err = load_job(&path).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].field, "export.typo");
        assert!(
            err.problems[0].message.contains("unknown field `typo`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "j.toml",
            &VALID.replace(r#"["Patient"]"#, r#"["Patient", 7]"#),
        );
        let err = load_job(&path).unwrap_err();
        assert_eq!(err.problems[0].field, "export.types[1]", "{err}");
    }

    #[test]
    fn reports_every_semantic_problem() {
        let dir = tempfile::tempdir().unwrap();
        let text = VALID
            .replace(r#"["Patient"]"#, r#"["Patient", "Obsrvation"]"#)
            .replace("https://ehr.example.org", "http://ehr.example.org")
            + "[schedule]\ncron = \"61 * * * *\"\ntimezone = \"Mars/Olympus\"\n";
        let path = write(dir.path(), "j.toml", &text);
        let err = load_job(&path).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "fhir.base_url",
                "auth.private_key_env",
                "export.types[1]",
                "schedule.cron",
                "schedule.timezone"
            ],
            "{err}"
        );
        assert!(
            err.to_string().contains("did you mean \"Observation\""),
            "{err}"
        );
    }

    #[test]
    fn export_parameters_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let text = VALID.replace(
            r#"types = ["Patient"]"#,
            "types = [\"Patient\"]\nsince = \"yesterday\"\nuntil = \"2024-01-01T00:00:00+02:00\"\n\
             patients = [\"Patient/1\", \"Observation/2\"]\n\
             [export.extra_params]\n_since = \"x\"\n_mode = \"crawl\"\n",
        );
        let path = write(dir.path(), "j.toml", &text);
        let err = load_job(&path).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "auth.private_key_env",
                "export.since",
                "export.patients",
                "export.patients",
                "export.patients[1]",
                "export.extra_params._since",
            ],
            "{err}"
        );
        assert!(err.to_string().contains("method = \"post\""), "{err}");
    }

    #[test]
    fn the_alert_table_is_validated_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let hook = write(
            dir.path(),
            "hook",
            "https://hooks.example.org/services/SECRET",
        );
        let valid = VALID.replace(
            "private_key_env = \"FHIR_SYNC_TEST_KEY_THAT_IS_NOT_SET\"\n",
            "method = \"none\"\n",
        );
        let path = write(
            dir.path(),
            "ok.toml",
            &format!(
                "{valid}[alert]\nwebhook_url_file = {:?}\nno_success_within_hours = 26\n",
                hook.file_name().unwrap()
            ),
        );
        let job = load_job(&path).unwrap();
        assert_eq!(job.alert.staleness().map(|(_, h)| h), Some(26));
        assert!(!format!("{job:?}").contains("SECRET"));

        let path = write(
            dir.path(),
            "typo.toml",
            &format!("{valid}[alert]\nno_success_within = 26\n"),
        );
        let err = load_job(&path).unwrap_err();
        assert_eq!(err.problems[0].field, "alert.no_success_within", "{err}");

        let path = write(
            dir.path(),
            "bad.toml",
            &format!(
                "{valid}[alert]\nwebhook_url_env = \"FHIR_SYNC_TEST_WEBHOOK_THAT_IS_NOT_SET\"\n[schedule]\ncron = \"61 * * * *\"\n"
            ),
        );
        let err = load_job(&path).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["schedule.cron", "alert.webhook_url_env"], "{err}");
    }

    fn no_key(text: &str) -> String {
        text.replace(
            "private_key_env = \"FHIR_SYNC_TEST_KEY_THAT_IS_NOT_SET\"\n",
            "method = \"none\"\n",
        )
    }

    #[test]
    fn the_vendor_fills_what_the_job_leaves_unset_and_explicit_values_win() {
        let dir = tempfile::tempdir().unwrap();
        let epic = no_key(VALID)
            .replace("[auth]", "vendor = \"epic\"\n[auth]")
            .replace(
                "types = [\"Patient\"]",
                "types = [\"Patient\"]\ngroup_id = \"g1\"\npoll_max_interval_seconds = 30",
            );
        let job = load_job(&write(dir.path(), "epic.toml", &epic)).unwrap();
        assert_eq!(job.fhir.vendor, Vendor::Epic);
        assert_eq!(job.export.level, ExportLevel::Group);
        assert_eq!(job.export.timeout_seconds, 30 * 86_400);
        assert_eq!(job.export.poll_max_interval_seconds, 30.0, "explicit wins");
        assert_eq!(job.export.poll_min_interval_seconds, 10.0);
        assert_eq!(
            job.fhir.headers.get("Epic-Client-ID").map(String::as_str),
            Some("abc")
        );
        assert!(
            vendor_warnings(&job).is_empty(),
            "{:?}",
            vendor_warnings(&job)
        );

        let oracle = no_key(VALID)
            .replace("[auth]", "vendor = \"oracle\"\n[auth]")
            .replace(
                "types = [\"Patient\"]",
                "types = [\"Patient\"]\nlevel = \"system\"",
            );
        let job = load_job(&write(dir.path(), "oracle.toml", &oracle)).unwrap();
        assert_eq!(job.export.level, ExportLevel::System, "explicit wins");
        assert_eq!(job.auth.scope_style, ScopeStyle::V1);
        let warnings = vendor_warnings(&job);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].field, "export.level");
        assert!(
            warnings[0].message.contains("only group, patient"),
            "{}",
            warnings[0]
        );
        assert!(
            warnings[0].to_string().contains("oracle.toml"),
            "{}",
            warnings[0]
        );

        let generic = load_job(&write(dir.path(), "generic.toml", &no_key(VALID))).unwrap();
        assert_eq!(generic.fhir.vendor, Vendor::Generic);
        assert_eq!(generic.export.level, ExportLevel::System);
        assert_eq!(generic.export.timeout_seconds, 86_400);
        assert!(generic.fhir.headers.is_empty());
    }

    #[test]
    fn cms_vendors_default_to_basic_auth_offsets_and_an_early_since() {
        let dir = tempfile::tempdir().unwrap();
        let ab2d = VALID
            .replace("[auth]", "vendor = \"ab2d\"\n[auth]")
            .replace(
                "private_key_env = \"FHIR_SYNC_TEST_KEY_THAT_IS_NOT_SET\"\n",
                "client_secret_env = \"AB2D_SECRET\"\n",
            );
        let job = load_job(&write(dir.path(), "ab2d.toml", &ab2d)).unwrap();
        assert!(matches!(job.auth.method, AuthMethod::ClientSecretBasic(_)));
        assert_eq!(job.export.level, ExportLevel::Patient);
        assert!(job.export.since_with_offset);
        assert_eq!(job.export.since.as_deref(), Some(vendor::AB2D_EARLIEST));
        assert!(vendor_warnings(&job).is_empty());

        let late = ab2d.replace(
            "types = [\"Patient\"]",
            "types = [\"Patient\"]\nsince = \"2025-06-01T00:00:00+00:00\"",
        );
        let job = load_job(&write(dir.path(), "late.toml", &late)).unwrap();
        let warnings = vendor_warnings(&job);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].field, "export.since");
    }

    #[test]
    fn an_unknown_vendor_is_named_with_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let text = no_key(VALID).replace("[auth]", "vendor = \"cerner\"\n[auth]");
        let path = write(dir.path(), "j.toml", &text);
        let err = load_job(&path).unwrap_err();
        assert_eq!(err.problems[0].field, "fhir.vendor", "{err}");
        assert!(err.to_string().contains("j.toml"), "{err}");
        assert!(err.to_string().contains("\"oracle\""), "{err}");
    }

    #[test]
    fn bearer_tokens_come_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let text = VALID.replace(
            "private_key_env = \"FHIR_SYNC_TEST_KEY_THAT_IS_NOT_SET\"\n",
            "method = \"bearer_token\"\ntoken_env = \"FHIR_SYNC_TEST_TOKEN\"\n",
        );
        let job = load_job(&write(dir.path(), "t.toml", &text)).unwrap();
        assert!(
            matches!(&job.auth.method, AuthMethod::BearerToken(SecretSource::Env(v)) if v == "FHIR_SYNC_TEST_TOKEN")
        );
        let both = text.replace("token_env", "token_file = \"t\"\ntoken_env");
        let err = load_job(&write(dir.path(), "both.toml", &both)).unwrap_err();
        assert_eq!(err.problems[0].field, "auth.token_file", "{err}");
    }
}
