//! Configuration: how the service runs (`config/`, layered with `FHIR_SYNC_` environment
//! variables) and what it syncs (`jobs/*.toml`, one file per sync job).
//!
//! Loading is split from validation so that `fhir-sync config check` can report every problem
//! at once, each with its file and dotted field. This module reads files but never contacts a
//! FHIR server or the database, and never puts secret values into an error message.

mod alert;
mod job;
mod service;

pub use alert::{AlertConfig, AlertSettings, Delivery, Webhook, WebhookSource, WebhookUrl};
pub use job::{
    AuthConfig, AuthMethod, ExportConfig, ExportLevel, ExportMethod, FhirConfig, JobConfig,
    KeyConfig, KeySource, MissingScopePolicy, Overlap, ScheduleConfig, ScopeStyle, SecretSource,
    TypeEncoding, concurrency_warnings, load_job, load_jobs, vendor_warnings,
};
pub use service::{
    DatabaseSettings, LogFormat, LoggingSettings, OPS_API_TOKEN_ENV, OpsSettings, Settings,
    SyncSettings, ViewsSettings,
};

use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// Dotted path of the offending field (`export.types[2]`), empty when the whole file is at fault.
    pub field: String,
    /// What is wrong, lowercase, without secret values.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        }
    }
}

/// Every problem found in a set of configuration files; startup stops on any of them.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "{count} configuration problem{}:",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub(crate) fn single(
        file: &Path,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            problems: vec![Problem {
                file: file.to_path_buf(),
                field: field.into(),
                message: message.into(),
            }],
        }
    }
}
