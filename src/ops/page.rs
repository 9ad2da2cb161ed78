//! The status page at `/`: server-rendered HTML, no front-end build step.

use axum::Router;

use super::http::OpsState;

/// The routes this module serves.
pub fn routes() -> Router<OpsState> {
    Router::new()
}
