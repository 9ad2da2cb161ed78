//! SMART Backend Services: endpoint discovery, the signed client assertion, and access tokens.
//!
//! This module (with `bulk`) is the only code that talks HTTP to a FHIR server's authorization
//! side. Tokens and assertions are `SecretString`s from the moment they exist; they are never
//! logged, never put in an error, and never stored.

mod discovery;
mod keys;
mod token;

pub use discovery::{SmartConfiguration, discover};
pub use keys::{KeyError, SigningAlgorithm, SigningKey, generate, write_private_key};
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
    #[error("token endpoint answered HTTP {status}")]
    Status { status: u16 },
    #[error("token request failed")]
    Transport(#[source] reqwest::Error),
    #[error("token response is not valid: {0}")]
    BadResponse(String),
    #[error("cannot sign the client assertion: {0}")]
    Sign(String),
}

impl AuthError {
    /// Retryable failures may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            AuthError::Discovery { retryable, .. } => *retryable,
            AuthError::Status { status } => *status == 429 || *status >= 500,
            AuthError::Transport(_) => true,
            AuthError::Refused { .. } | AuthError::BadResponse(_) | AuthError::Sign(_) => false,
        }
    }
}
