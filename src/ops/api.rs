//! The status API under `/api/v1` and `/readyz`.

use axum::Router;

use super::http::OpsState;

/// The routes this module serves.
pub fn routes() -> Router<OpsState> {
    Router::new()
}
