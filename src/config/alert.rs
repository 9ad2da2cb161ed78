//! Alerting configuration: the service-wide `[alerts]` defaults (`config/*.toml` and
//! `FHIR_SYNC_ALERTS__*`), a job's own `[alert]` table, and the rule that the job's settings
//! win over the service's.
//!
//! A webhook URL is a secret (Slack, Teams and Mattermost put the credential in the path), so it
//! is only ever read from an environment variable or a file, held as a [`WebhookUrl`] whose
//! `Debug` shows scheme and host only, and never put into an error message.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

/// `[alerts]` in the service settings: the webhook and thresholds every job uses unless its
/// own `[alert]` table says otherwise, and how deliveries are retried.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertSettings {
    /// The webhook URL. A secret: set it through `FHIR_SYNC_ALERTS__WEBHOOK_URL`, never in a
    /// file (use `webhook_url_file` for that). Default: none, no service-wide alerts.
    #[serde(serialize_with = "serialize_secret_option")]
    pub webhook_url: Option<SecretString>,
    /// A file holding the webhook URL (e.g. a mounted secret). Default: none.
    pub webhook_url_file: Option<PathBuf>,
    /// Allow a plain `http://` webhook on a host other than loopback. Default false.
    pub allow_insecure_http: bool,
    /// Alert when a run fails. Default true.
    pub on_failure: bool,
    /// Alert when a job has had no successful run for this many hours. Default: none (off).
    pub no_success_within_hours: Option<u32>,
    /// Delivery attempts per alert (network errors, 5xx and 429 are retried). Default 5.
    pub attempts: u32,
    /// Seconds one delivery attempt may take. Default 10.
    pub timeout_seconds: u64,
    /// First wait between attempts in milliseconds; it doubles per attempt, and a `Retry-After`
    /// overrides it (both capped at five minutes). Default 1000.
    pub retry_base_delay_ms: u64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            webhook_url: None,
            webhook_url_file: None,
            allow_insecure_http: false,
            on_failure: true,
            no_success_within_hours: None,
            attempts: 5,
            timeout_seconds: 10,
            retry_base_delay_ms: 1000,
        }
    }
}

fn serialize_secret_option<S: serde::Serializer>(
    value: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    // Settings are only serialised to seed figment's defaults layer; the value must round-trip.
    match value {
        Some(secret) => s.serialize_some(secret.expose_secret()),
        None => s.serialize_none(),
    }
}

impl AlertSettings {
    /// The service-wide webhook, if one is configured.
    pub fn webhook(&self) -> Option<Webhook> {
        let source = match (&self.webhook_url, &self.webhook_url_file) {
            (Some(url), _) => WebhookSource::Inline(url.clone()),
            (None, Some(path)) => WebhookSource::File(path.clone()),
            (None, None) => return None,
        };
        Some(Webhook {
            source,
            allow_insecure_http: self.allow_insecure_http,
        })
    }

    /// How deliveries are made.
    pub fn delivery(&self) -> Delivery {
        Delivery {
            attempts: self.attempts,
            timeout_seconds: self.timeout_seconds,
            retry_base_delay_ms: self.retry_base_delay_ms,
        }
    }

    /// Problems as `(dotted field, message)`; the URL itself never appears in a message.
    pub(crate) fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.webhook_url.is_some() && self.webhook_url_file.is_some() {
            problems.push((
                "alerts.webhook_url_file".into(),
                "set one of webhook_url (FHIR_SYNC_ALERTS__WEBHOOK_URL) and webhook_url_file, not both".into(),
            ));
        } else if let Some(webhook) = self.webhook() {
            let field = if self.webhook_url.is_some() {
                "alerts.webhook_url"
            } else {
                "alerts.webhook_url_file"
            };
            if let Err(message) = webhook.resolve("alerts.allow_insecure_http") {
                problems.push((field.into(), message));
            }
        }
        if self.attempts == 0 {
            problems.push(("alerts.attempts".into(), "must be at least 1".into()));
        }
        if self.timeout_seconds == 0 {
            problems.push((
                "alerts.timeout_seconds".into(),
                "must be greater than 0".into(),
            ));
        }
        problems
    }
}

/// How alert deliveries are made (service-wide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub attempts: u32,
    pub timeout_seconds: u64,
    pub retry_base_delay_ms: u64,
}

impl Default for Delivery {
    fn default() -> Self {
        AlertSettings::default().delivery()
    }
}

/// Where a webhook URL comes from.
#[derive(Clone)]
pub enum WebhookSource {
    /// An environment variable holding the URL.
    Env(String),
    /// A file holding the URL (path resolved against the job file's directory).
    File(PathBuf),
    /// The URL in memory: `FHIR_SYNC_ALERTS__WEBHOOK_URL`, or a job built in code (tests).
    /// Never read from a job file.
    Inline(SecretString),
}

impl std::fmt::Debug for WebhookSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WebhookSource::Env(name) => f.debug_tuple("Env").field(name).finish(),
            WebhookSource::File(path) => f.debug_tuple("File").field(path).finish(),
            WebhookSource::Inline(_) => f.write_str("Inline([REDACTED])"),
        }
    }
}

/// A configured webhook: where its URL comes from and whether plain http may leave loopback.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub source: WebhookSource,
    pub allow_insecure_http: bool,
}

impl Webhook {
    /// Reads and checks the URL. `opt_in_field` names the setting that allows plain http, for
    /// the message. Errors never contain the URL.
    pub fn resolve(&self, opt_in_field: &str) -> Result<WebhookUrl, String> {
        let text = match &self.source {
            WebhookSource::Inline(url) => url.expose_secret().to_string(),
            WebhookSource::Env(name) => std::env::var(name)
                .map_err(|_| format!("environment variable {name} is not set"))?,
            WebhookSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        };
        let url = Url::parse(text.trim())
            .map_err(|e| format!("the webhook URL is not a valid URL ({e})"))?;
        if crate::transport::check_url(&url, self.allow_insecure_http).is_err() {
            return Err(match url.scheme() {
                "http" => format!(
                    "plain http to {} is refused (use https, or set {opt_in_field} = true)",
                    url.host_str().unwrap_or("?")
                ),
                other => format!("the webhook URL must be https, not {other:?}"),
            });
        }
        Ok(WebhookUrl(url))
    }
}

/// A webhook URL ready to be called. Only [`WebhookUrl::host`] may be logged.
#[derive(Clone)]
pub struct WebhookUrl(Url);

impl WebhookUrl {
    /// The URL, with its secret, for the request only.
    pub fn expose(&self) -> &Url {
        &self.0
    }

    /// `scheme://host`: what logs and the database show of the webhook.
    pub fn host(&self) -> String {
        format!("{}://{}", self.0.scheme(), self.0.host_str().unwrap_or("?"))
    }
}

impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookUrl({}/[REDACTED])", self.host())
    }
}

/// Alerting for one job: its `[alert]` table, with every field it leaves unset filled from
/// the service's `[alerts]` by [`AlertConfig::inherit`] before the job runs. Without a webhook
/// nothing is sent.
#[derive(Debug, Clone, Default)]
pub struct AlertConfig {
    /// Where alerts go. Default: the service's webhook.
    pub webhook: Option<Webhook>,
    /// Alert when a run fails. Default: the service's `on_failure` (true).
    pub on_failure: Option<bool>,
    /// Alert when the job has had no successful run for this many hours; 0 turns it off for
    /// this job. Default: the service's `no_success_within_hours` (off).
    pub no_success_within_hours: Option<u32>,
    /// How deliveries are made; always the service's.
    pub delivery: Delivery,
}

impl AlertConfig {
    /// Fills what the job file left unset from the service settings; the job's values win.
    pub fn inherit(&mut self, service: &AlertSettings) {
        if self.webhook.is_none() {
            self.webhook = service.webhook();
        }
        self.on_failure = self.on_failure.or(Some(service.on_failure));
        self.no_success_within_hours = self
            .no_success_within_hours
            .or(service.no_success_within_hours);
        self.delivery = service.delivery();
    }

    /// The webhook to call when a run fails, if any.
    pub fn failure_webhook(&self) -> Option<&Webhook> {
        self.webhook
            .as_ref()
            .filter(|_| self.on_failure.unwrap_or(true))
    }

    /// The webhook and threshold in hours for the "no recent success" alert, if on.
    pub fn staleness(&self) -> Option<(&Webhook, u32)> {
        let hours = self.no_success_within_hours.filter(|h| *h > 0)?;
        Some((self.webhook.as_ref()?, hours))
    }
}

/// A job file's `[alert]` table, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AlertFile {
    webhook_url_env: Option<String>,
    webhook_url_file: Option<PathBuf>,
    #[serde(default)]
    allow_insecure_http: bool,
    no_success_within_hours: Option<u32>,
    on_failure: Option<bool>,
}

impl AlertFile {
    /// Validates the table, resolving the webhook URL now so that an unset variable or a
    /// missing file is a config error rather than a lost alert at 3 a.m. Problems are
    /// `(dotted field, message)`.
    pub(crate) fn validate(self, base_dir: &Path) -> Result<AlertConfig, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let webhook = match (self.webhook_url_env, self.webhook_url_file) {
            (Some(_), Some(_)) => {
                problems.push((
                    "alert".into(),
                    "set one of webhook_url_env and webhook_url_file, not both".into(),
                ));
                None
            }
            (Some(var), None) => Some(("alert.webhook_url_env", WebhookSource::Env(var))),
            (None, Some(path)) => Some((
                "alert.webhook_url_file",
                WebhookSource::File(if path.is_absolute() {
                    path
                } else {
                    base_dir.join(path)
                }),
            )),
            (None, None) => {
                if self.allow_insecure_http {
                    problems.push((
                        "alert.allow_insecure_http".into(),
                        "only applies to this job's own webhook (webhook_url_env or webhook_url_file)"
                            .into(),
                    ));
                }
                None
            }
        };
        let webhook = webhook.and_then(|(field, source)| {
            let webhook = Webhook {
                source,
                allow_insecure_http: self.allow_insecure_http,
            };
            match webhook.resolve("alert.allow_insecure_http") {
                Ok(_) => Some(webhook),
                Err(message) => {
                    problems.push((field.into(), message));
                    None
                }
            }
        });
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(AlertConfig {
            webhook,
            on_failure: self.on_failure,
            no_success_within_hours: self.no_success_within_hours,
            delivery: Delivery::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> AlertFile {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_job_webhook_from_a_file_is_resolved_against_the_job_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("hook"),
            "https://hooks.example.org/services/T0/B0/SECRET\n",
        )
        .unwrap();
        let config = file("webhook_url_file = \"hook\"\nno_success_within_hours = 26")
            .validate(dir.path())
            .unwrap();
        let webhook = config.webhook.as_ref().unwrap();
        let url = webhook.resolve("x").unwrap();
        assert_eq!(url.host(), "https://hooks.example.org");
        assert_eq!(
            url.expose().path(),
            "/services/T0/B0/SECRET",
            "trailing newline trimmed"
        );
        assert!(!format!("{config:?}").contains("SECRET"));
        assert!(!format!("{url:?}").contains("SECRET"));
        assert_eq!(config.staleness().map(|(_, h)| h), Some(26));
        assert!(config.failure_webhook().is_some(), "on_failure defaults on");
    }

    #[test]
    fn job_problems_name_the_field_and_never_the_url() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), "http://chat.example.org/SECRET").unwrap();
        std::fs::write(dir.path().join("junk"), "not a url SECRET").unwrap();
        let cases = [
            (
                "webhook_url_env = \"A\"\nwebhook_url_file = \"plain\"",
                "alert",
                "not both",
            ),
            (
                "webhook_url_env = \"FHIR_SYNC_TEST_WEBHOOK_THAT_IS_NOT_SET\"",
                "alert.webhook_url_env",
                "is not set",
            ),
            (
                "webhook_url_file = \"missing\"",
                "alert.webhook_url_file",
                "cannot read",
            ),
            (
                "webhook_url_file = \"plain\"",
                "alert.webhook_url_file",
                "plain http to chat.example.org is refused (use https, or set alert.allow_insecure_http = true)",
            ),
            (
                "webhook_url_file = \"junk\"",
                "alert.webhook_url_file",
                "not a valid URL",
            ),
            (
                "allow_insecure_http = true",
                "alert.allow_insecure_http",
                "own webhook",
            ),
        ];
        for (text, field, message) in cases {
            let problems = file(text).validate(dir.path()).unwrap_err();
            assert_eq!(problems.len(), 1, "{text}: {problems:?}");
            assert_eq!(problems[0].0, field, "{text}");
            assert!(problems[0].1.contains(message), "{text}: {problems:?}");
            assert!(!problems[0].1.contains("SECRET"), "{text}: {problems:?}");
        }
        let allowed =
            file("webhook_url_file = \"plain\"\nallow_insecure_http = true").validate(dir.path());
        assert!(allowed.is_ok(), "the opt-in allows plain http");
    }

    #[test]
    fn the_job_wins_over_the_service_and_inherits_the_rest() {
        let service = AlertSettings {
            webhook_url: Some(SecretString::from("https://global.example.org/x")),
            on_failure: false,
            no_success_within_hours: Some(26),
            attempts: 2,
            ..AlertSettings::default()
        };
        let own = Webhook {
            source: WebhookSource::Inline(SecretString::from("https://job.example.org/y")),
            allow_insecure_http: false,
        };
        // (the job's table, failure webhook host, staleness webhook host, staleness hours)
        type Case = (
            AlertConfig,
            Option<&'static str>,
            Option<&'static str>,
            Option<u32>,
        );
        let cases: [Case; 3] = [
            // Nothing set: everything from the service.
            (
                AlertConfig::default(),
                None,
                Some("https://global.example.org"),
                Some(26),
            ),
            // Its own webhook, failures on, staleness off.
            (
                AlertConfig {
                    webhook: Some(own.clone()),
                    on_failure: Some(true),
                    no_success_within_hours: Some(0),
                    ..AlertConfig::default()
                },
                Some("https://job.example.org"),
                Some("https://job.example.org"),
                None,
            ),
            // Its own threshold, the service's webhook.
            (
                AlertConfig {
                    no_success_within_hours: Some(2),
                    ..AlertConfig::default()
                },
                None,
                Some("https://global.example.org"),
                Some(2),
            ),
        ];
        for (mut config, failure_host, stale_host, hours) in cases {
            config.inherit(&service);
            let host = |w: &Webhook| w.resolve("x").unwrap().host();
            assert_eq!(config.failure_webhook().map(host).as_deref(), failure_host);
            assert_eq!(
                config.staleness().map(|(w, _)| host(w)).as_deref(),
                stale_host.filter(|_| hours.is_some())
            );
            assert_eq!(config.staleness().map(|(_, h)| h), hours);
            assert_eq!(config.delivery.attempts, 2);
        }
    }

    #[test]
    fn service_settings_problems() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                AlertSettings {
                    webhook_url: Some(SecretString::from("https://a.example/SECRET")),
                    webhook_url_file: Some(dir.path().join("f")),
                    ..AlertSettings::default()
                },
                "alerts.webhook_url_file",
                "not both",
            ),
            (
                AlertSettings {
                    webhook_url: Some(SecretString::from("http://chat.example.org/SECRET")),
                    ..AlertSettings::default()
                },
                "alerts.webhook_url",
                "set alerts.allow_insecure_http = true",
            ),
            (
                AlertSettings {
                    webhook_url_file: Some(dir.path().join("missing")),
                    ..AlertSettings::default()
                },
                "alerts.webhook_url_file",
                "cannot read",
            ),
            (
                AlertSettings {
                    attempts: 0,
                    ..AlertSettings::default()
                },
                "alerts.attempts",
                "at least 1",
            ),
            (
                AlertSettings {
                    timeout_seconds: 0,
                    ..AlertSettings::default()
                },
                "alerts.timeout_seconds",
                "greater than 0",
            ),
        ];
        for (settings, field, message) in cases {
            let problems = settings.problems();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].0, field);
            assert!(problems[0].1.contains(message), "{problems:?}");
            assert!(!problems[0].1.contains("SECRET"));
        }
        assert!(AlertSettings::default().problems().is_empty());
    }
}
