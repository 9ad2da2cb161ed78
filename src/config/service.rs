//! Service settings: `config/default.toml`, then `config/{FHIR_SYNC_ENV}.toml`, then environment
//! variables prefixed `FHIR_SYNC_` with `__` separating nested keys
//! (`FHIR_SYNC_DATABASE__URL`). Later layers override earlier ones.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{ConfigError, Problem};

/// How the service runs. Every field has a default, so an empty `config/` works on a developer
/// machine with PostgreSQL on 127.0.0.1:5432.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub logging: LoggingSettings,
    pub sync: SyncSettings,
    pub queue: crate::queue::QueueSettings,
    pub ops: OpsSettings,
    pub alerts: super::AlertSettings,
    pub views: ViewsSettings,
}

/// Analytics views: SQL-on-FHIR v2 ViewDefinitions materialised as tables.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewsSettings {
    /// Directory of ViewDefinition files (`*.json`, one view each), relative to the working
    /// directory. A missing directory means no views. Default `views`.
    pub dir: PathBuf,
    /// PostgreSQL schema the view tables are created in. Default `sof`.
    pub schema: String,
}

impl Default for ViewsSettings {
    fn default() -> Self {
        ViewsSettings {
            dir: PathBuf::from("views"),
            schema: "sof".into(),
        }
    }
}

/// The environment variable that carries the ops API token (it never comes from a file of
/// settings, so it cannot be committed with them).
pub const OPS_API_TOKEN_ENV: &str = "FHIR_SYNC_OPS__API_TOKEN";

/// Shortest API token accepted: long enough that guessing it over HTTP is hopeless.
const MIN_API_TOKEN_CHARS: usize = 16;

/// The ops HTTP server that `serve` runs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsSettings {
    /// Run it. Default true.
    pub enabled: bool,
    /// Address to listen on. Default `127.0.0.1:8080`. Any address other than loopback needs an
    /// API token. The JWKS it serves is public by nature; put it behind your reverse proxy to let
    /// an EHR fetch it.
    pub listen: std::net::SocketAddr,
    /// File holding the bearer token the API, metrics and status page require (e.g. a mounted
    /// secret; surrounding whitespace is ignored). Default: none. `FHIR_SYNC_OPS__API_TOKEN`,
    /// when set, wins. Without either, the ops server is open, which is allowed on loopback only.
    pub api_token_file: Option<PathBuf>,
    /// The token itself, resolved by [`Settings::load`] from `FHIR_SYNC_OPS__API_TOKEN` or
    /// `api_token_file`. Never read from or written to a settings file.
    #[serde(skip)]
    pub api_token: Option<SecretString>,
    /// Host names the ops server answers to when `listen` is beyond loopback (`Host` with or
    /// without a port); requests naming another host are refused, which defeats DNS
    /// rebinding. IP-address hosts are always answered. Default none.
    pub allowed_hosts: Vec<String>,
}

impl Default for OpsSettings {
    fn default() -> Self {
        OpsSettings {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_token_file: None,
            api_token: None,
            allowed_hosts: Vec::new(),
        }
    }
}

impl OpsSettings {
    /// Sets [`OpsSettings::api_token`] from the environment's value (which wins) or the token
    /// file. The error names what is wrong without the token's value.
    pub fn resolve_api_token(&mut self, from_env: Option<String>) -> Result<(), Problem> {
        // A problem is reported against where the token came from: the environment, or the
        // token file itself.
        let problem = |file: PathBuf, field: &str, message: String| Problem {
            file,
            field: field.into(),
            message,
        };
        let (token, file, field) = match (from_env, &self.api_token_file) {
            (Some(token), _) => (token, PathBuf::from("environment"), OPS_API_TOKEN_ENV),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(token) => (token, path.clone(), "ops.api_token_file"),
                Err(e) => {
                    return Err(problem(
                        path.clone(),
                        "ops.api_token_file",
                        format!("cannot read the API token file: {e}"),
                    ));
                }
            },
            (None, None) => {
                self.api_token = None;
                return Ok(());
            }
        };
        let token = token.trim();
        if token.chars().count() < MIN_API_TOKEN_CHARS {
            return Err(problem(
                file,
                field,
                format!("the API token must be at least {MIN_API_TOKEN_CHARS} characters long"),
            ));
        }
        self.api_token = Some(SecretString::from(token.to_string()));
        Ok(())
    }

    /// Whether the server is reachable from other machines (so it must not be open).
    pub fn listens_beyond_loopback(&self) -> bool {
        !self.listen.ip().is_loopback()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// PostgreSQL URL. Default `postgres://postgres@127.0.0.1:5432/fhir_sync`. Keep passwords out
    /// of files: use `password_file`, or set the whole URL through `FHIR_SYNC_DATABASE__URL`.
    #[serde(serialize_with = "serialize_redacted")]
    pub url: SecretString,
    /// File holding the database password (e.g. a mounted secret). Default: none.
    pub password_file: Option<PathBuf>,
    /// Maximum pooled connections. Default 16: a file merging into the warehouse uses two
    /// (`sync.max_parallel_downloads` files at once), plus the queue, leases and the ops server.
    pub max_connections: u32,
    /// Seconds to wait for a connection before giving up. Default 10.
    pub connect_timeout_seconds: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/fhir_sync"),
            password_file: None,
            max_connections: 16,
            connect_timeout_seconds: 10,
        }
    }
}

fn serialize_redacted<S: serde::Serializer>(value: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    // Settings are only serialised to seed figment's defaults layer; the value must round-trip.
    s.serialize_str(value.expose_secret())
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSettings {
    /// `human` (default) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter directive. Default `info,sqlx=warn`. `RUST_LOG`, when set, wins.
    pub level: String,
}

impl Default for LoggingSettings {
    fn default() -> Self {
        LoggingSettings {
            format: LogFormat::Human,
            level: "info,sqlx=warn".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSettings {
    /// Directory of job files, relative to the working directory. Default `jobs`.
    pub jobs_dir: PathBuf,
    /// Files of one source (job) downloaded and loaded at the same time, across every process
    /// serving the database. Default 4.
    pub max_parallel_downloads: usize,
    /// Seconds allowed to establish a connection to a FHIR server. Default 30.
    pub connect_timeout_seconds: u64,
    /// Seconds a single HTTP read may stall before the request fails. Default 300.
    pub read_timeout_seconds: u64,
    /// NDJSON lines per COPY batch (one transaction, one checkpoint). Default 5000.
    pub batch_lines: usize,
    /// Longest accepted NDJSON line in bytes; longer lines are rejected and recorded. Default 64 MiB.
    pub max_line_bytes: usize,
    /// Largest export file accepted, in bytes as received (compressed if the server
    /// compresses); a bigger file fails the run. Default 64 GiB.
    pub max_file_bytes: u64,
    /// Largest export manifest body accepted, in bytes (each page of a paged manifest); a
    /// bigger one fails the run. Default 64 MiB.
    pub max_manifest_bytes: usize,
    /// Most files one export's manifest may list (all pages together); more fails the run.
    /// Default 100000.
    pub max_manifest_files: usize,
    /// Tries per request (kick-off, file download) on 429, 5xx and connection failures
    /// before the run fails. Default 6.
    pub request_attempts: u32,
    /// First retry delay in milliseconds; it doubles per attempt (with jitter), and a
    /// server's `Retry-After` overrides it. Default 1000.
    pub retry_base_delay_ms: u64,
    /// Slowest download accepted, in bytes per second averaged over each
    /// `download_window_seconds`: a server that trickles a file (every read on time, the
    /// file never done) fails that attempt, which is then retried. 0 turns the check off.
    /// Default 1024.
    pub min_download_bytes_per_second: u64,
    /// The window over which `min_download_bytes_per_second` is measured. Default 60.
    pub download_window_seconds: u64,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            jobs_dir: PathBuf::from("jobs"),
            max_parallel_downloads: 4,
            connect_timeout_seconds: 30,
            read_timeout_seconds: 300,
            batch_lines: 5000,
            max_line_bytes: 64 * 1024 * 1024,
            max_file_bytes: 64 * 1024 * 1024 * 1024,
            max_manifest_bytes: 64 * 1024 * 1024,
            max_manifest_files: 100_000,
            request_attempts: 6,
            retry_base_delay_ms: 1000,
            min_download_bytes_per_second: 1024,
            download_window_seconds: 60,
        }
    }
}

impl Settings {
    /// Loads `dir/default.toml`, `dir/{env}.toml` (env from `FHIR_SYNC_ENV`, default `development`)
    /// and `FHIR_SYNC_*` variables, then validates. Missing files are fine; unknown keys are not.
    pub fn load(dir: &Path) -> Result<Settings, ConfigError> {
        let env_name = std::env::var("FHIR_SYNC_ENV").unwrap_or_else(|_| "development".into());
        let default_file = dir.join("default.toml");
        let env_file = dir.join(format!("{env_name}.toml"));
        let figment = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::file(&default_file))
            .merge(Toml::file(&env_file))
            // The API token is read below, verbatim: figment would turn a token that looks
            // like a number into one, and `api_token` is not a settings-file key.
            .merge(
                Env::prefixed("FHIR_SYNC_")
                    .ignore(&["env", "ops__api_token"])
                    .split("__"),
            );
        let mut settings: Settings = figment.extract().map_err(|error| {
            let problems = error
                .into_iter()
                .map(|e| {
                    // Name where the bad value came from: a file, or the environment.
                    let file = match e.metadata.as_ref() {
                        Some(meta) => match &meta.source {
                            Some(figment::Source::File(path)) => path.clone(),
                            Some(other) => PathBuf::from(other.to_string()),
                            None => PathBuf::from(meta.name.to_string()),
                        },
                        None => default_file.clone(),
                    };
                    let field = e.path.join(".");
                    Problem {
                        file,
                        field,
                        message: e.kind.to_string(),
                    }
                })
                .collect();
            ConfigError { problems }
        })?;
        // The webhook URL carries a credential: only the environment may hold it.
        if let Some(meta) = figment.find_metadata("alerts.webhook_url")
            && let Some(figment::Source::File(path)) = &meta.source
        {
            return Err(ConfigError::single(
                path,
                "alerts.webhook_url",
                "holds a secret: set FHIR_SYNC_ALERTS__WEBHOOK_URL or alerts.webhook_url_file instead",
            ));
        }
        let mut problems = Vec::new();
        if let Err(problem) = settings
            .ops
            .resolve_api_token(std::env::var(OPS_API_TOKEN_ENV).ok())
        {
            problems.push(problem);
        }
        settings.validate(&default_file, problems)?;
        Ok(settings)
    }

    fn validate(&self, file: &Path, mut problems: Vec<Problem>) -> Result<(), ConfigError> {
        let mut check = |ok: bool, field: &str, message: &str| {
            if !ok {
                problems.push(Problem {
                    file: file.to_path_buf(),
                    field: field.into(),
                    message: message.into(),
                });
            }
        };
        let url = self.database.url.expose_secret();
        check(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "database.url",
            "must be a postgres:// URL",
        );
        check(
            self.database.max_connections >= 2,
            "database.max_connections",
            "must be at least 2",
        );
        check(
            self.sync.max_parallel_downloads >= 1,
            "sync.max_parallel_downloads",
            "must be at least 1",
        );
        check(
            self.sync.batch_lines >= 1,
            "sync.batch_lines",
            "must be at least 1",
        );
        check(
            self.sync.max_line_bytes >= 1024,
            "sync.max_line_bytes",
            "must be at least 1024",
        );
        check(
            self.sync.max_file_bytes >= 1024,
            "sync.max_file_bytes",
            "must be at least 1024",
        );
        check(
            self.sync.download_window_seconds >= 1,
            "sync.download_window_seconds",
            "must be at least 1",
        );
        check(
            self.sync.max_manifest_bytes >= 1024,
            "sync.max_manifest_bytes",
            "must be at least 1024",
        );
        check(
            self.sync.max_manifest_files >= 1,
            "sync.max_manifest_files",
            "must be at least 1",
        );
        check(
            self.sync.request_attempts >= 1,
            "sync.request_attempts",
            "must be at least 1",
        );
        let open_beyond_loopback = self.ops.enabled
            && self.ops.listens_beyond_loopback()
            && self.ops.api_token.is_none()
            && self.ops.api_token_file.is_none();
        check(
            !open_beyond_loopback,
            "ops.api_token_file",
            &format!(
                "required because ops.listen ({}) is not a loopback address: name a file holding \
                 the API token, or set {OPS_API_TOKEN_ENV}",
                self.ops.listen
            ),
        );
        check(
            crate::views::definition::is_sql_name(&self.views.schema),
            "views.schema",
            "must be a sql name (a letter, then letters, digits or _)",
        );
        for (field, message) in self.alerts.problems() {
            problems.push(Problem {
                file: file.to_path_buf(),
                field,
                message,
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The database URL with the password from `password_file` filled in, if one is configured.
    pub fn database_url(&self) -> Result<SecretString, ConfigError> {
        let Some(path) = &self.database.password_file else {
            return Ok(self.database.url.clone());
        };
        let password = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::single(path, "database.password_file", format!("cannot read: {e}"))
        })?;
        let mut url = url::Url::parse(self.database.url.expose_secret()).map_err(|e| {
            ConfigError::single(path, "database.url", format!("not a valid URL: {e}"))
        })?;
        url.set_password(Some(password.trim_end_matches(['\r', '\n'])))
            .map_err(|()| ConfigError::single(path, "database.url", "cannot carry a password"))?;
        Ok(SecretString::from(url.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(settings: &Settings) -> Vec<Problem> {
        match settings.validate(Path::new("config/default.toml"), Vec::new()) {
            Ok(()) => Vec::new(),
            Err(e) => e.problems,
        }
    }

    fn listening_on(address: &str) -> Settings {
        let mut settings = Settings::default();
        settings.ops.listen = address.parse().unwrap();
        settings
    }

    #[test]
    fn an_open_ops_server_is_allowed_on_loopback_only() {
        assert!(problems(&listening_on("127.0.0.1:8080")).is_empty());
        assert!(problems(&listening_on("[::1]:8080")).is_empty());
        let found = problems(&listening_on("0.0.0.0:8080"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "ops.api_token_file");
        assert!(found[0].message.contains("0.0.0.0:8080"), "{found:?}");
        assert!(found[0].message.contains(OPS_API_TOKEN_ENV), "{found:?}");

        let mut disabled = listening_on("0.0.0.0:8080");
        disabled.ops.enabled = false;
        assert!(problems(&disabled).is_empty());

        let mut with_token = listening_on("0.0.0.0:8080");
        with_token
            .ops
            .resolve_api_token(Some("0123456789abcdef0123".into()))
            .unwrap();
        assert!(problems(&with_token).is_empty());
    }

    #[test]
    fn the_token_from_the_environment_is_trimmed_and_must_be_long_enough() {
        let mut ops = OpsSettings::default();
        ops.resolve_api_token(Some("  0123456789abcdef\n".into()))
            .unwrap();
        assert_eq!(
            ops.api_token.as_ref().unwrap().expose_secret(),
            "0123456789abcdef"
        );
        let problem = ops
            .resolve_api_token(Some("short-secret".into()))
            .unwrap_err();
        assert_eq!(problem.field, OPS_API_TOKEN_ENV);
        assert!(
            !problem.to_string().contains("short-secret"),
            "the value stays out of the message: {problem}"
        );
        ops.resolve_api_token(None).unwrap();
        assert!(ops.api_token.is_none());
    }

    #[test]
    fn the_token_is_never_printed_or_serialized() {
        let mut settings = Settings::default();
        settings
            .ops
            .resolve_api_token(Some("the-token-0123456789".into()))
            .unwrap();
        assert!(!format!("{settings:?}").contains("the-token-0123456789"));
        let toml = toml::to_string(&settings).unwrap();
        assert!(!toml.contains("the-token"), "{toml}");
        assert!(!toml.contains("api_token ="), "{toml}");
    }

    #[test]
    fn a_webhook_url_in_a_file_is_refused_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("default.toml"),
            "[alerts]\nwebhook_url = \"https://hooks.example.org/SECRET\"\n",
        )
        .unwrap();
        let err = Settings::load(dir.path()).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].field, "alerts.webhook_url");
        assert!(
            err.to_string().contains("FHIR_SYNC_ALERTS__WEBHOOK_URL"),
            "{err}"
        );
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn alert_settings_load_with_their_defaults_and_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::load(dir.path()).unwrap();
        assert!(settings.alerts.webhook().is_none());
        assert_eq!(settings.alerts.no_success_within_hours, None);
        assert!(settings.alerts.on_failure);
        assert_eq!(settings.alerts.attempts, 5);

        std::fs::write(
            dir.path().join("default.toml"),
            "[alerts]\nwebhook_url_file = \"/nonexistent/hook\"\nno_success_within_hours = 26\nattempts = 0\n",
        )
        .unwrap();
        let err = Settings::load(dir.path()).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["alerts.webhook_url_file", "alerts.attempts"],
            "{err}"
        );
    }
}
