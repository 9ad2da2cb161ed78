//! TEMPORARY stub.
#![allow(dead_code, unused_variables)]
pub struct LocalPostgres { pub admin_url: String, pub started: Option<StartedCluster> }
pub struct StartedCluster { pub data_dir: std::path::PathBuf, pub port: u16, pub stop_command: String }
pub async fn find_or_start(d: &std::path::Path) -> anyhow::Result<LocalPostgres> { todo!() }
pub async fn ensure_database(a: &str, n: &str) -> anyhow::Result<String> { todo!() }
