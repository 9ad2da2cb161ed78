//! Finding the token endpoint: `/.well-known/smart-configuration` first, then the SMART 1.0
//! `oauth-uris` extension of the CapabilityStatement (`/metadata`) for servers without it.
//!
//! Servers often advertise incompletely; only a missing token endpoint is fatal.

use serde::Deserialize;
use url::Url;

use super::AuthError;
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

/// Discovers the authorization endpoints of the FHIR server at `base`.
pub async fn discover(
    http: &reqwest::Client,
    base: &Url,
    allow_insecure_http: bool,
) -> Result<SmartConfiguration, AuthError> {
    let well_known = transport::append_path(base, ".well-known/smart-configuration");
    let first_failure = match fetch_json::<WellKnown>(http, &well_known).await {
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
    let capability: serde_json::Value = fetch_json(http, &metadata).await?;
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
) -> Result<T, AuthError> {
    let failure = |message: String, retryable: bool| AuthError::Discovery {
        url: url.to_string(),
        message,
        retryable,
    };
    let response = http
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| failure(e.without_url().to_string(), true))?;
    let status = response.status();
    if !status.is_success() {
        let retryable = status.as_u16() == 429 || status.is_server_error();
        return Err(failure(format!("HTTP {status}"), retryable));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| failure(e.without_url().to_string(), true))?;
    serde_json::from_slice(&body).map_err(|e| failure(format!("not the expected JSON: {e}"), false))
}
