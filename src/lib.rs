//! fhir-sync keeps a PostgreSQL analytics warehouse in sync with EHR FHIR servers.
//!
//! The library holds all the behaviour; the `fhir-sync` binary only parses its command line and
//! dispatches here. See `ARCHITECTURE.md` for the map of modules and the invariants they keep.

pub mod fake;
pub mod localpg;
