//! What every ops handler can reach: the runtime context, the settings and the published
//! keys. Its own module so that the route modules and the server that mounts them do not
//! import each other.

use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;

use crate::config::Settings;
use crate::sync::SyncContext;

/// What every ops handler can reach.
#[derive(Clone)]
pub struct OpsState {
    /// The database, the configured jobs and the queue (to start and cancel runs).
    pub steps: Arc<SyncContext>,
    /// The service settings `serve` runs with (`ops.api_token` decides whether routes need it).
    pub settings: Arc<Settings>,
    /// The public keys of every job, served at `/.well-known/jwks.json`.
    pub jwks: Arc<JwkSet>,
}
