//! What operators see: logs, the status tables and progress bars of the CLI, and the ops HTTP
//! server with its status API, metrics and page.
//!
//! Reads the run tables (the API also starts and cancels runs, through `sync`). Never shows a
//! credential or a resource body.

pub mod alert;
pub mod api;
pub mod auth;
pub mod console;
pub mod error;
pub mod format;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod page;
pub mod progress;
pub mod report;
pub mod state;

pub use logging::init_logging;
