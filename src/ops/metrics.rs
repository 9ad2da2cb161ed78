//! Prometheus metrics: the process's counters and histograms, and gauges read from the
//! database at scrape time.

use axum::Router;

use super::http::OpsState;

/// The routes this module serves.
pub fn routes() -> Router<OpsState> {
    Router::new()
}
