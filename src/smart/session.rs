//! Authorisation for one run of one job, in two steps both `sync` and `fhir-sync check` use:
//! [`prepare`] (keys, discovery, algorithm and scope choice, the token manager) and
//! [`authorize`] (the first token, and what its granted scopes mean for the export).
//!
//! Discovery happens once here and is reused for the whole run. Nothing here logs a secret;
//! what it chose (algorithm, kid, scope style) is returned so callers can report it.

use std::sync::Arc;

use secrecy::SecretString;
use url::Url;

use super::AuthError;
use super::discovery::{self, SmartConfiguration};
use super::keys::{KeyError, SigningAlgorithm, SigningKey};
use super::scopes;
use super::token::TokenManager;
use crate::config::{AuthMethod, JobConfig, MissingScopePolicy, ScopeStyle, SecretSource};

/// What was decided before the first token request.
pub struct Prepared {
    /// The discovered configuration; `None` for `auth.method = "none"` or when discovery
    /// failed and `fhir.token_url` stood in for it.
    pub discovered: Option<SmartConfiguration>,
    /// The token endpoint used (`None` for `auth.method = "none"`).
    pub token_url: Option<Url>,
    /// The signing key's algorithm and kid (private_key_jwt only).
    pub signing: Option<(SigningAlgorithm, String)>,
    /// Things worth a warning: discovery failures covered by an override, an algorithm the
    /// server does not advertise.
    pub notes: Vec<String>,
    pub scope_style: ScopeStyle,
    pub tokens: Arc<TokenManager>,
}

/// The outcome of the first token request.
pub struct Authorized {
    /// The `scope` the server granted, if it said.
    pub granted: Option<String>,
    /// The types to export: the job's, minus the ones dropped for lack of scope.
    pub types: Vec<String>,
    /// Types dropped because no granted scope covers them (`on_missing_scope = "drop"`).
    pub dropped: Vec<String>,
}

/// Every key of the job, the active one first, with the job's `jku` applied.
pub fn job_keys(job: &JobConfig) -> Result<Vec<SigningKey>, KeyError> {
    let jku = job.auth.jku.as_ref().map(Url::to_string);
    let mut keys = vec![
        SigningKey::load(&job.auth.key, job.auth.algorithm, job.auth.key_id.clone())?
            .with_jku(jku.clone()),
    ];
    for extra in &job.auth.extra_keys {
        keys.push(
            SigningKey::load(&extra.key, extra.algorithm, extra.key_id.clone())?
                .with_jku(jku.clone()),
        );
    }
    Ok(keys)
}

/// Loads credentials, discovers the token endpoint and builds the job's token manager.
pub async fn prepare(http: &reqwest::Client, job: &JobConfig) -> Result<Prepared, AuthError> {
    let allow_insecure_http = job.fhir.allow_insecure_http;
    let base = &job.fhir.base_url;
    // No authorization, or a token issued out of band: no discovery and no token endpoint.
    let without_endpoint = |tokens: TokenManager| Prepared {
        discovered: None,
        token_url: None,
        signing: None,
        notes: Vec::new(),
        scope_style: job.auth.scope_style,
        tokens: Arc::new(tokens.for_job(&job.name)),
    };
    match &job.auth.method {
        AuthMethod::None => {
            return Ok(without_endpoint(TokenManager::without_authorization(
                http.clone(),
                base.clone(),
            )));
        }
        AuthMethod::BearerToken(source) => {
            let token = read_secret(source, "token")?;
            return Ok(without_endpoint(TokenManager::with_static_token(
                base.clone(),
                token,
            )));
        }
        _ => {}
    }
    let mut notes = Vec::new();
    let (discovered, token_url) = match &job.fhir.token_url {
        None => {
            let discovered =
                discovery::discover(http, base, allow_insecure_http, &job.name).await?;
            let url = discovered.token_endpoint.clone();
            // Credentials (a secret above all) go only where the job says: the FHIR server's
            // own origin, or an endpoint pinned in the job file. A server's discovery
            // document alone cannot send them elsewhere.
            if !crate::transport::same_origin(&url, base) {
                return Err(AuthError::Discovery {
                    url: crate::transport::redacted(base),
                    message: format!(
                        "the advertised token endpoint {} is not on the FHIR server's origin ({}); credentials are sent only there (hint: if that endpoint is right, pin it in the job file: fhir.token_url = \"{}\")",
                        crate::transport::redacted(&url),
                        base.origin().ascii_serialization(),
                        crate::transport::redacted(&url),
                    ),
                    retryable: false,
                });
            }
            (Some(discovered), url)
        }
        // With an override, discovery only informs the algorithm and scope choice, so its
        // failure is a note rather than the end of the run.
        Some(url) => match discovery::discover(http, base, allow_insecure_http, &job.name).await {
            Ok(discovered) => (Some(discovered), url.clone()),
            Err(e) => {
                notes.push(format!(
                    "discovery failed ({e}); using fhir.token_url with default algorithm and scope choices"
                ));
                (None, url.clone())
            }
        },
    };
    tracing::info!(
        token.url = %crate::transport::redacted(&token_url),
        overridden = job.fhir.token_url.is_some(),
        "token endpoint"
    );
    let capabilities = discovered
        .as_ref()
        .map(|d| d.capabilities.clone())
        .unwrap_or_default();
    let scope_style = scopes::choose_style(job.auth.scope_style, &capabilities);
    let requested = if job.auth.scopes.is_empty() {
        scopes::read_scopes(&job.export.types, scope_style)
    } else {
        job.auth.scopes.clone()
    };

    let token_http = crate::transport::token_client().map_err(|e| AuthError::Transport {
        at: crate::transport::endpoint(&token_url),
        cause: e.to_string(),
    })?;
    let (tokens, signing) = match &job.auth.method {
        AuthMethod::PrivateKeyJwt => {
            let advertised = discovered
                .as_ref()
                .map(|d| d.signing_algorithms.clone())
                .unwrap_or_default();
            let key = choose_key(job_keys(job)?, &advertised, &mut notes);
            let signing = (key.algorithm(), key.kid().to_string());
            let manager = TokenManager::new(
                token_http.clone(),
                token_url.clone(),
                job.auth.client_id.clone(),
                key,
                requested,
            );
            (manager, Some(signing))
        }
        AuthMethod::ClientSecretBasic(source) => {
            let secret = read_secret(source, "client secret")?;
            let manager = TokenManager::with_client_secret(
                token_http.clone(),
                token_url.clone(),
                job.auth.client_id.clone(),
                secret,
                requested,
            );
            (manager, None)
        }
        AuthMethod::None | AuthMethod::BearerToken(_) => unreachable!("handled above"),
    };
    Ok(Prepared {
        discovered,
        token_url: Some(token_url),
        signing,
        notes,
        scope_style,
        tokens: Arc::new(tokens.for_job(&job.name)),
    })
}

/// Picks the signing key: the active (first) one when the server accepts its algorithm or
/// advertises none; otherwise the first published key whose algorithm it advertises; otherwise
/// the active one anyway (servers' lists are often incomplete), with a note.
fn choose_key(
    mut keys: Vec<SigningKey>,
    advertised: &[String],
    notes: &mut Vec<String>,
) -> SigningKey {
    let accepted = |key: &SigningKey| {
        advertised.is_empty() || advertised.iter().any(|a| a == key.algorithm().as_str())
    };
    if let Some(at) = keys.iter().position(accepted) {
        if at > 0 {
            notes.push(format!(
                "the server does not advertise {} (the active key's algorithm); signing with key {} ({}) instead",
                keys[0].algorithm(),
                keys[at].kid(),
                keys[at].algorithm()
            ));
        }
        return keys.swap_remove(at);
    }
    notes.push(format!(
        "the server advertises only {advertised:?} for token_endpoint_auth_signing_alg_values_supported; trying {} anyway",
        keys[0].algorithm()
    ));
    keys.swap_remove(0)
}

/// Reads a secret (`what`: "client secret", "token") from its file or environment variable.
fn read_secret(source: &SecretSource, what: &str) -> Result<SecretString, AuthError> {
    let text = match source {
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| AuthError::Secret(format!("cannot read {}: {e}", path.display())))?,
        SecretSource::Env(var) => std::env::var(var)
            .map_err(|_| AuthError::Secret(format!("environment variable {var} is not set")))?,
    };
    // A trailing newline from `echo secret > file` is not part of the secret.
    let secret = text.trim_end_matches(['\r', '\n']).to_string();
    if secret.is_empty() {
        return Err(AuthError::Secret(format!("the {what} is empty")));
    }
    Ok(SecretString::from(secret))
}

/// Gets the first token and compares the granted scopes with the exported types, dropping
/// or failing per `auth.on_missing_scope`.
pub async fn authorize(prepared: &Prepared, job: &JobConfig) -> Result<Authorized, AuthError> {
    if prepared.token_url.is_none() {
        return Ok(Authorized {
            granted: None,
            types: job.export.types.clone(),
            dropped: Vec::new(),
        });
    }
    prepared.tokens.token().await?;
    let granted = prepared.tokens.granted_scope().await;
    let Some(granted_text) = &granted else {
        tracing::info!(
            "the token response has no scope; assuming the requested scopes were granted"
        );
        return Ok(Authorized {
            granted,
            types: job.export.types.clone(),
            dropped: Vec::new(),
        });
    };
    let missing = scopes::uncovered_types(granted_text, &job.export.types);
    if missing.is_empty() {
        return Ok(Authorized {
            granted,
            types: job.export.types.clone(),
            dropped: Vec::new(),
        });
    }
    let types: Vec<String> = job
        .export
        .types
        .iter()
        .filter(|t| !missing.contains(t))
        .cloned()
        .collect();
    if job.auth.on_missing_scope == MissingScopePolicy::Fail || types.is_empty() {
        return Err(AuthError::ScopeNotGranted {
            granted: granted_text.clone(),
            missing,
        });
    }
    tracing::warn!(
        scope.granted = %granted_text,
        dropped = ?missing,
        "the granted scopes do not cover every exported type; exporting the covered ones (auth.on_missing_scope = \"drop\")"
    );
    Ok(Authorized {
        granted,
        types,
        dropped: missing,
    })
}
