//! Finding the token endpoint: `/.well-known/smart-configuration` first, then the SMART 1.0
//! `oauth-uris` extension of the CapabilityStatement (`/metadata`) for servers without it.
//!
//! Servers often advertise incompletely; only a missing token endpoint is fatal.

use serde::Deserialize;
use url::Url;

use super::AuthError;
use crate::metrics::{self, Endpoint};
use crate::transport;

/// What the server says about its authorization.
#[derive(Debug, Clone)]
pub struct SmartConfiguration {
    pub token_endpoint: Url,
    /// `token_endpoint_auth_signing_alg_values_supported`, empty when not advertised.
    pub signing_algorithms: Vec<String>,
    /// `capabilities`, empty when not advertised.
    pub capabilities: Vec<String>,
    /// `grant_types_supported`, empty when not advertised.
    pub grant_types: Vec<String>,
    /// `scopes_supported`, empty when not advertised.
    pub scopes_supported: Vec<String>,
}

#[derive(Deserialize)]
struct WellKnown {
    token_endpoint: Option<String>,
    #[serde(default)]
    token_endpoint_auth_signing_alg_values_supported: Vec<String>,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    grant_types_supported: Vec<String>,
    #[serde(default)]
    scopes_supported: Vec<String>,
}

const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

/// Discovers the authorization endpoints of the FHIR server at `base` for `job` (the label of
/// its request metrics).
pub async fn discover(
    http: &reqwest::Client,
    base: &Url,
    allow_insecure_http: bool,
    job: &str,
) -> Result<SmartConfiguration, AuthError> {
    let well_known = transport::append_path(base, ".well-known/smart-configuration");
    let first_failure = match fetch_json::<WellKnown>(http, &well_known, job).await {
        Ok(doc) => match doc.token_endpoint {
            Some(endpoint) => {
                let token_endpoint = resolve(base, &endpoint, allow_insecure_http, &well_known)?;
                return Ok(SmartConfiguration {
                    token_endpoint,
                    signing_algorithms: doc.token_endpoint_auth_signing_alg_values_supported,
                    capabilities: doc.capabilities,
                    grant_types: doc.grant_types_supported,
                    scopes_supported: doc.scopes_supported,
                });
            }
            None => "it has no token_endpoint".to_string(),
        },
        Err(e) if e.is_retryable() => return Err(e),
        Err(e) => e.to_string(),
    };
    tracing::info!(
        discovery.url = %well_known,
        reason = %first_failure,
        "smart-configuration unusable, trying the CapabilityStatement"
    );
    let metadata = transport::append_path(base, "metadata");
    let capability: serde_json::Value = fetch_json(http, &metadata, job).await?;
    let token = capability["rest"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rest| {
            rest["security"]["extension"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .filter(|ext| ext["url"] == OAUTH_URIS)
        .flat_map(|ext| ext["extension"].as_array().into_iter().flatten())
        .find(|ext| ext["url"] == "token")
        .and_then(|ext| ext["valueUri"].as_str().map(str::to_owned));
    let Some(token) = token else {
        return Err(AuthError::Discovery {
            url: well_known.to_string(),
            message: format!(
                "no token endpoint: smart-configuration failed ({first_failure}) and {metadata} has no oauth-uris extension"
            ),
            retryable: false,
        });
    };
    Ok(SmartConfiguration {
        token_endpoint: resolve(base, &token, allow_insecure_http, &metadata)?,
        signing_algorithms: Vec::new(),
        capabilities: Vec::new(),
        grant_types: Vec::new(),
        scopes_supported: Vec::new(),
    })
}

/// Resolves a possibly relative endpoint against the FHIR base (as SMART says clients should)
/// and applies the transport policy to it.
fn resolve(
    base: &Url,
    endpoint: &str,
    allow_insecure_http: bool,
    from: &Url,
) -> Result<Url, AuthError> {
    let url = match Url::parse(endpoint) {
        Ok(url) => url,
        Err(url::ParseError::RelativeUrlWithoutBase) => transport::append_path(base, endpoint),
        Err(e) => {
            return Err(AuthError::Discovery {
                url: from.to_string(),
                message: format!("token endpoint {endpoint:?} is not a URL: {e}"),
                retryable: false,
            });
        }
    };
    transport::check_url(&url, allow_insecure_http).map_err(|message| AuthError::Discovery {
        url: from.to_string(),
        message: format!("token endpoint: {message}"),
        retryable: false,
    })?;
    Ok(url)
}

async fn fetch_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &Url,
    job: &str,
) -> Result<T, AuthError> {
    let failure = |message: String, retryable: bool| AuthError::Discovery {
        url: url.to_string(),
        message,
        retryable,
    };
    let started = std::time::Instant::now();
    let response = http
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await;
    metrics::http_request(
        job,
        Endpoint::Discovery,
        response.as_ref().ok().map(|r| r.status().as_u16()),
        started.elapsed(),
    );
    // A connection that cannot be made is worth retrying only when the network may be at
    // fault; a name that does not resolve is a wrong URL far more often than a DNS outage.
    let response = response.map_err(|e| {
        let cause = transport::failure(&e);
        let dns = cause.contains("dns error");
        failure(format!("{}: {cause}", transport::endpoint(url)), !dns)
    })?;
    let status = response.status();
    if !status.is_success() {
        let retryable = status.as_u16() == 429 || status.is_server_error();
        let said = transport::error_body(response).await.server_said();
        return Err(failure(
            format!("HTTP {}: {said}", status.as_u16()),
            retryable,
        ));
    }
    let body = transport::read_capped(response, transport::DOCUMENT_BYTES)
        .await
        .map_err(|e| failure(transport::failure(&e), true))?;
    if !body.complete {
        return Err(failure(
            format!(
                "the document is larger than {} bytes",
                transport::DOCUMENT_BYTES
            ),
            false,
        ));
    }
    serde_json::from_slice(&body.bytes).map_err(|e| {
        failure(
            format!(
                "not the expected JSON (at line {} column {})",
                e.line(),
                e.column()
            ),
            false,
        )
    })
}

/// Whether the CapabilityStatement offers the export the job needs. Advisory only: servers
/// often under-declare, so a missing declaration is a warning and the kick-off decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportSupport {
    /// The operation is declared.
    Offered,
    /// The CapabilityStatement was read and does not declare it; the text says what is missing.
    NotDeclared(String),
    /// The CapabilityStatement could not be read.
    Unknown(String),
}

/// Reads `[base]/metadata` and looks for the export operation of `level`, accepting the
/// Bulk Data v1.0.0 (all under `rest.operation`), v1.0.1 and v2 shapes. `job` labels the
/// request's metrics.
pub async fn export_support(
    http: &reqwest::Client,
    base: &Url,
    level: crate::config::ExportLevel,
    job: &str,
) -> ExportSupport {
    let metadata = transport::append_path(base, "metadata");
    match fetch_json::<serde_json::Value>(http, &metadata, job).await {
        Ok(capability) => declared_export(&capability, level),
        Err(e) => ExportSupport::Unknown(e.to_string()),
    }
}

/// The pure half of [`export_support`].
pub(crate) fn declared_export(
    capability: &serde_json::Value,
    level: crate::config::ExportLevel,
) -> ExportSupport {
    use crate::config::ExportLevel;
    let (resource, names, definition, what) = match level {
        ExportLevel::System => (None, &["export"][..], "export", "[base]/$export"),
        ExportLevel::Patient => (
            Some("Patient"),
            &["export", "patient-export"][..],
            "patient-export",
            "Patient/$export",
        ),
        ExportLevel::Group => (
            Some("Group"),
            &["export", "group-export"][..],
            "group-export",
            "Group/[id]/$export",
        ),
    };
    // The definition's last path segment without a `|version` suffix; v1.0.0 used relative
    // names such as `OperationDefinition/BulkDataExport`, which only the name can match.
    let defines = |op: &serde_json::Value| {
        op["definition"]
            .as_str()
            .map(|d| d.split('|').next().unwrap_or(d))
            .and_then(|d| d.rsplit('/').next())
            .is_some_and(|last| last == definition)
    };
    let named = |op: &serde_json::Value, allowed: &[&str]| {
        op["name"].as_str().is_some_and(|n| allowed.contains(&n))
    };
    let rests: Vec<&serde_json::Value> = capability["rest"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let found = rests.iter().any(|rest| {
        let operations = rest["operation"].as_array().into_iter().flatten();
        match resource {
            None => operations
                .into_iter()
                .any(|op| defines(op) || named(op, names)),
            Some(resource_type) => {
                // v1.0.0 listed patient-export / group-export at the rest level.
                let legacy = operations
                    .into_iter()
                    .any(|op| defines(op) || named(op, &names[1..]));
                legacy
                    || rest["resource"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|r| r["type"] == resource_type)
                        .flat_map(|r| r["operation"].as_array().into_iter().flatten())
                        .any(|op| defines(op) || named(op, names))
            }
        }
    });
    if found {
        ExportSupport::Offered
    } else {
        ExportSupport::NotDeclared(format!("the CapabilityStatement does not declare {what}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExportLevel;
    use serde_json::json;

    #[test]
    fn export_declarations_in_every_version_shape() {
        let v2 = json!({"rest": [{
        "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export|2.0.0"}],
        "resource": [
            {"type": "Patient", "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}]},
            {"type": "Group", "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}]}
        ]}]});
        let v100 = json!({"rest": [{"operation": [
            {"name": "export", "definition": "OperationDefinition/BulkDataExport"},
            {"name": "patient-export", "definition": "OperationDefinition/PatientLevelExport"},
            {"name": "group-export", "definition": "OperationDefinition/GroupLevelExport"}
        ]}]});
        let v101 = json!({"rest": [{
        "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}],
        "resource": [
            {"type": "Patient", "operation": [{"name": "patient-export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}]},
            {"type": "Group", "operation": [{"name": "group-export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}]}
        ]}]});
        for doc in [&v2, &v100, &v101] {
            for level in [
                ExportLevel::System,
                ExportLevel::Patient,
                ExportLevel::Group,
            ] {
                assert_eq!(
                    declared_export(doc, level),
                    ExportSupport::Offered,
                    "{level:?} {doc}"
                );
            }
        }
        let none = json!({"rest": [{"resource": [{"type": "Patient"}]}]});
        match declared_export(&none, ExportLevel::Patient) {
            ExportSupport::NotDeclared(m) => assert!(m.contains("Patient/$export"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            declared_export(&json!({}), ExportLevel::System),
            ExportSupport::NotDeclared(_)
        ));
    }
}
