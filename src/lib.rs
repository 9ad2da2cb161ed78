//! fhir-sync keeps a PostgreSQL analytics warehouse in sync with EHR FHIR servers.
//!
//! The library holds all the behaviour; the `fhir-sync` binary only parses its command line and
//! dispatches to [`app`]. See `ARCHITECTURE.md` for the map of modules and the invariants they
//! keep.

pub mod app;
pub mod backoff;
pub mod bench;
pub mod bulk;
pub mod config;
pub mod demo;
pub mod fake;
pub mod fhir;
pub mod localpg;
pub mod metrics;
pub mod ops;
pub mod queue;
pub mod schedule;
pub mod smart;
pub mod sync;
pub mod transport;
pub mod untrusted;
pub mod vendor;
pub mod views;
pub mod warehouse;
