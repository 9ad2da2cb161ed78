//! SMART Backend Services: endpoint discovery, the signed client assertion, and access tokens.
//!
//! This module (with `bulk`) is the only code that talks HTTP to a FHIR server's authorization
//! side. Tokens and assertions are `SecretString`s from the moment they exist; they are never
//! logged, never put in an error, and never stored.

mod discovery;
pub mod doctor;
mod keys;
pub mod scopes;
mod session;
mod token;

pub use discovery::{ExportSupport, SmartConfiguration, discover, export_support};
pub use keys::{KeyError, SigningAlgorithm, SigningKey, generate, publish_jwks, write_private_key};
pub use session::{Authorized, Prepared, authorize, job_keys, prepare};
pub use token::{AccessToken, TokenManager};

/// Why authorisation failed. Each variant says whether trying again later can help.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("discovery at {url} failed: {message}")]
    Discovery {
        url: String,
        message: String,
        retryable: bool,
    },
    #[error("the token endpoint refused the request: {error}: {description} (hint: {hint})")]
    Refused {
        error: String,
        description: String,
        hint: String,
    },
    #[error("token endpoint {at} answered HTTP {status}: {said}")]
    Status {
        status: u16,
        at: String,
        said: String,
    },
    /// No response: DNS, connection, TLS or timeout (`cause` says which).
    #[error("token request to {at} failed: {cause}")]
    Transport { at: String, cause: String },
    #[error("token response is not valid: {0}")]
    BadResponse(String),
    #[error("cannot sign the client assertion: {0}")]
    Sign(String),
    #[error("cannot load the job's private key")]
    Key(#[from] KeyError),
    #[error("cannot read the client secret or token: {0}")]
    Secret(String),
    #[error(
        "the server requires an access token but the job has auth.method = \"none\" (hint: set auth.method to private_key_jwt or client_secret_basic)"
    )]
    Unauthenticated,
    #[error(
        "the static token was refused; replace it (hint: get a new token from the server's administrators and put it where auth.token_file or auth.token_env points)"
    )]
    StaticTokenRefused,
    #[error(
        "the server granted {granted:?}, which does not cover {missing:?} (hint: ask the EHR to grant read access to these types, remove them from export.types, or set auth.on_missing_scope = \"drop\")"
    )]
    ScopeNotGranted {
        granted: String,
        missing: Vec<String>,
    },
}

impl AuthError {
    /// Retryable failures may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            AuthError::Discovery { retryable, .. } => *retryable,
            AuthError::Status { status, .. } => *status == 429 || *status >= 500,
            AuthError::Transport { .. } => true,
            AuthError::Refused { .. }
            | AuthError::BadResponse(_)
            | AuthError::Sign(_)
            | AuthError::Key(_)
            | AuthError::Secret(_)
            | AuthError::Unauthenticated
            | AuthError::StaticTokenRefused
            | AuthError::ScopeNotGranted { .. } => false,
        }
    }
}
