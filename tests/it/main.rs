//! Integration tests: one binary, real PostgreSQL (a fresh database per test, dropped after),
//! the in-process fake FHIR server on 127.0.0.1:0 per test.
//!
//! PostgreSQL comes from `DATABASE_URL` (set by `scripts/test.sh`), else 127.0.0.1:5432.

mod auth;
mod config_check;
mod helpers;
mod loader;
mod loader_model;
mod secrets;
mod sync;
