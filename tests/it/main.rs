//! Integration tests: one binary, real PostgreSQL (a fresh database per test, dropped after),
//! the in-process fake FHIR server on 127.0.0.1:0 per test (and, in `outside`, a FHIR server
//! from outside the project, installed from PyPI).
//!
//! PostgreSQL comes from `DATABASE_URL` (set by `scripts/test.sh`), else 127.0.0.1:5432.

mod auth;
mod auth_check;
mod auth_discovery;
mod auth_keys;
mod auth_logs;
mod auth_methods;
mod auth_origin;
mod auth_support;
mod auth_tokens;
mod bench;
mod cohorts;
mod completeness;
mod config_check;
mod deletions;
mod demo_serve;
mod export_cleanup;
mod export_download;
mod export_env;
mod export_faults;
mod export_kickoff;
mod export_manifest;
mod export_polling;
mod helpers;
mod hostile;
mod hostile_http;
mod loader;
mod loader_model;
mod migrate_cli;
mod ops_alerts;
mod ops_api;
mod ops_cli;
mod ops_jwks;
mod ops_logs;
mod ops_metrics;
mod ops_page;
mod outside;
mod pool;
mod processes;
mod queue;
mod queue_edges;
mod secrets;
mod sync;
mod vendors;
mod views;
mod views_conformance;
mod views_sync;
mod webdriver;
