//! `fhir-sync check <job>`: a doctor for a job's connection to its FHIR server. Runs the steps of
//! a sync up to (not including) the kick-off, one check each, and says for each what passed or
//! what failed, why, and what to change.
//!
//! It never kicks off an export and never prints a token, assertion or key: only URLs, kids,
//! algorithm names, scopes and counts.

use url::Url;

use super::{AuthError, ExportSupport, discovery, scopes, session};
use crate::config::{AuthMethod, JobConfig};
use crate::transport;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Worth knowing, but a sync may still work.
    Warn,
    Fail,
    /// Not run because an earlier check failed, or not applicable.
    Skip,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to change, for warnings and failures.
    pub fix: Option<String>,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
        fix: None,
    }
}

fn failed(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// Runs every check in order; later checks are skipped when one they depend on failed.
pub async fn run(http: &reqwest::Client, job: &JobConfig) -> Vec<Check> {
    let mut report = Vec::new();
    let base = &job.fhir.base_url;
    let skip_rest = |report: &mut Vec<Check>, from: &[&'static str]| {
        for name in from {
            report.push(check(name, Verdict::Skip, "an earlier check failed"));
        }
    };

    // Discovery, reported on its own so that a token_url override does not hide a broken
    // discovery document.
    let discovered = if matches!(
        job.auth.method,
        AuthMethod::None | AuthMethod::BearerToken(_)
    ) {
        report.push(check(
            "discovery",
            Verdict::Skip,
            "no token endpoint needed for this auth.method",
        ));
        None
    } else {
        match discovery::discover(http, base, job.fhir.allow_insecure_http, &job.name).await {
            Ok(d) => {
                let mut line = check(
                    "discovery",
                    Verdict::Pass,
                    format!("token endpoint {}", transport::redacted(&d.token_endpoint)),
                );
                if let Some(url) = &job.fhir.token_url {
                    line.detail.push_str(&format!(
                        " (overridden by fhir.token_url {})",
                        transport::redacted(url)
                    ));
                }
                report.push(line);
                Some(d)
            }
            Err(e) if job.fhir.token_url.is_some() => {
                report.push(Check {
                    name: "discovery",
                    verdict: Verdict::Warn,
                    detail: e.to_string(),
                    fix: Some("fhir.token_url is used instead".into()),
                });
                None
            }
            Err(e) => {
                report.push(failed(
                    "discovery",
                    e.to_string(),
                    "check fhir.base_url; if the server's discovery is broken, set fhir.token_url",
                ));
                skip_rest(
                    &mut report,
                    &[
                        "algorithms",
                        "token request",
                        "granted scopes",
                        "export operation",
                        "authorised request",
                    ],
                );
                return report;
            }
        }
    };

    let prepared = match session::prepare(http, job).await {
        Ok(p) => p,
        Err(e) => {
            report.push(failed("algorithms", e.to_string(), fix_for(&e)));
            skip_rest(
                &mut report,
                &[
                    "token request",
                    "granted scopes",
                    "export operation",
                    "authorised request",
                ],
            );
            return report;
        }
    };

    match &prepared.signing {
        Some((algorithm, kid)) => {
            let advertised = discovered
                .as_ref()
                .map(|d| d.signing_algorithms.clone())
                .unwrap_or_default();
            let verdict =
                if advertised.is_empty() || advertised.iter().any(|a| a == algorithm.as_str()) {
                    Verdict::Pass
                } else {
                    Verdict::Warn
                };
            let mut detail = format!(
                "signing with {algorithm} key {kid}; server advertises {}; scope style {}",
                if advertised.is_empty() {
                    "no algorithms".to_string()
                } else {
                    advertised.join(", ")
                },
                match prepared.scope_style {
                    crate::config::ScopeStyle::V2 => "v2 (system/<Type>.rs)",
                    _ => "v1 (system/<Type>.read)",
                }
            );
            for note in &prepared.notes {
                detail.push_str("; ");
                detail.push_str(note);
            }
            report.push(Check {
                name: "algorithms",
                verdict,
                detail,
                fix: (verdict == Verdict::Warn).then(|| {
                    format!(
                        "generate a key the server accepts (`fhir-sync keys generate --alg {}`) and register it",
                        advertised.first().map(String::as_str).unwrap_or("RS384")
                    )
                }),
            });
        }
        None => report.push(check(
            "algorithms",
            Verdict::Skip,
            "no client assertion for this auth.method",
        )),
    }

    let authorized = if prepared.token_url.is_none() {
        let why = match job.auth.method {
            AuthMethod::BearerToken(_) => {
                "auth.method = \"bearer_token\": the static token is used as is"
            }
            _ => "auth.method = \"none\"",
        };
        report.push(check("token request", Verdict::Skip, why));
        report.push(check("granted scopes", Verdict::Skip, why));
        None
    } else {
        match prepared.tokens.token().await {
            Ok(_) => {
                report.push(check(
                    "token request",
                    Verdict::Pass,
                    format!(
                        "token issued for client {:?} asking {:?}",
                        job.auth.client_id,
                        prepared.tokens.scopes().join(" ")
                    ),
                ));
                let granted = prepared.tokens.granted_scope().await;
                match &granted {
                    None => report.push(check(
                        "granted scopes",
                        Verdict::Warn,
                        "the server did not say which scopes it granted; assuming all",
                    )),
                    Some(text) => {
                        let missing = scopes::uncovered_types(text, &job.export.types);
                        if missing.is_empty() {
                            report.push(check(
                                "granted scopes",
                                Verdict::Pass,
                                format!("granted {text:?}, covering every exported type"),
                            ));
                        } else {
                            report.push(failed(
                                "granted scopes",
                                format!("granted {text:?}, which does not cover {missing:?}"),
                                "ask the EHR to grant read access to these types, remove them from export.types, or set auth.on_missing_scope = \"drop\"",
                            ));
                        }
                    }
                }
                Some(())
            }
            Err(e) => {
                report.push(failed("token request", describe(&e), fix_for(&e)));
                report.push(check("granted scopes", Verdict::Skip, "no token"));
                None
            }
        }
    };

    match discovery::export_support(http, base, job.export.level, &job.name).await {
        ExportSupport::Offered => report.push(check(
            "export operation",
            Verdict::Pass,
            "the CapabilityStatement declares the export this job runs",
        )),
        ExportSupport::NotDeclared(why) => report.push(Check {
            name: "export operation",
            verdict: Verdict::Warn,
            detail: why,
            fix: Some(
                "the kick-off may still work; if it is refused, check export.level or ask the EHR to enable Bulk Data export".into(),
            ),
        }),
        ExportSupport::Unknown(why) => report.push(Check {
            name: "export operation",
            verdict: Verdict::Warn,
            detail: format!("cannot read the CapabilityStatement: {why}"),
            fix: Some("check fhir.base_url".into()),
        }),
    }

    if authorized.is_none() && prepared.token_url.is_some() {
        report.push(check("authorised request", Verdict::Skip, "no token"));
        return report;
    }
    report.push(probe(http, job, &prepared).await);
    report
}

/// One cheap authorised read: `GET [base]/<first type>?_count=1`.
async fn probe(http: &reqwest::Client, job: &JobConfig, prepared: &session::Prepared) -> Check {
    let name = "authorised request";
    let resource_type = job
        .export
        .types
        .first()
        .map(String::as_str)
        .unwrap_or("Patient");
    let mut url: Url = transport::append_path(&job.fhir.base_url, resource_type);
    url.query_pairs_mut().append_pair("_count", "1");
    let shown = format!("GET {}?_count=1", transport::redacted(&url));
    let token = match prepared.tokens.token().await {
        Ok(token) => token,
        Err(e) => return failed(name, e.to_string(), fix_for(&e)),
    };
    let mut request = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/fhir+json");
    if let Some(value) = token.authorization() {
        request = request.header(reqwest::header::AUTHORIZATION, value);
    }
    match request.send().await {
        Ok(response) if response.status().is_success() => check(
            name,
            Verdict::Pass,
            format!("{shown}: HTTP {}", response.status().as_u16()),
        ),
        Ok(response) if response.status().as_u16() == 401 => failed(
            name,
            format!("{shown}: HTTP 401, the FHIR server refused the token"),
            "the token endpoint and the FHIR server disagree: check fhir.token_url and fhir.base_url belong together",
        ),
        Ok(response) if response.status().as_u16() == 403 => failed(
            name,
            format!("{shown}: HTTP 403, the token does not allow reading {resource_type}"),
            "ask the EHR to grant system read access to the exported types",
        ),
        Ok(response) => Check {
            name,
            verdict: Verdict::Warn,
            detail: format!("{shown}: HTTP {}", response.status().as_u16()),
            fix: Some(
                "the server may not support search on this type; the export may still work".into(),
            ),
        },
        Err(e) => failed(
            name,
            format!("{shown}: {}", e.without_url()),
            "check that the server is reachable from this host",
        ),
    }
}

/// An authorisation failure without the hint, which goes on the fix line instead.
fn describe(error: &AuthError) -> String {
    match error {
        AuthError::Refused {
            error, description, ..
        } => format!("the token endpoint refused the request: {error}: {description}"),
        other => other.to_string(),
    }
}

/// The operator's next step for an authorisation failure.
fn fix_for(error: &AuthError) -> String {
    match error {
        AuthError::Refused { hint, .. } => hint.clone(),
        AuthError::Key(_) => {
            "check auth.private_key_file / auth.private_key_env and auth.algorithm".into()
        }
        AuthError::Secret(_) => "check auth.client_secret_file / auth.client_secret_env (or auth.token_file / auth.token_env)".into(),
        AuthError::StaticTokenRefused => "replace the static token".into(),
        e if e.is_retryable() => "the server or network failed; try again later".into(),
        _ => "see the message".into(),
    }
}
