//! Shared pieces of the authorisation tests: job files on disk for the tests that load or run
//! jobs the way an operator does, and running the `fhir-sync` binary.

use std::path::{Path, PathBuf};
use tokio::process::Command;

use fhir_sync::fake::FakeFhirServer;

/// A temporary directory with `config/` and `jobs/`, for the binary.
pub struct JobDir {
    pub dir: tempfile::TempDir,
}

impl JobDir {
    pub fn new() -> JobDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
        JobDir { dir }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Writes `jobs/<name>.toml` for `fake` with the given `[auth]` lines.
    pub fn write_job(&self, name: &str, fake: &FakeFhirServer, auth: &str) -> PathBuf {
        let path = self.path(&format!("jobs/{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[fhir]\nbase_url = \"{}\"\n[auth]\n{auth}\n[export]\ntypes = [\"Patient\", \"Condition\"]\npoll_min_interval_seconds = 0.001\n",
                fake.fhir_base_url()
            ),
        )
        .unwrap();
        path
    }

    /// Runs `fhir-sync <args>` with this directory's config and jobs; returns (success, stdout
    /// and stderr together).
    pub async fn run(&self, args: &[&str]) -> (bool, String) {
        run_binary(self.dir.path(), args).await
    }
}

/// Async, so that the fake server on the test's runtime keeps answering while the binary runs.
async fn run_binary(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fhir-sync"))
        .args(args)
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("--jobs-dir")
        .arg(dir.join("jobs"))
        .env_remove("FHIR_SYNC_ENV")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}
