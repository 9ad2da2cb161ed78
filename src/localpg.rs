//! Finds or starts the PostgreSQL server that `fhir-sync demo` loads into, so the quick start works on
//! a machine where PostgreSQL is installed but not running.
//!
//! The order is the one `scripts/test.sh` follows: `DATABASE_URL` if set, else a server accepting
//! connections as `postgres` on 127.0.0.1:5432, else a private cluster created with `initdb` and
//! started with `pg_ctl` in a directory the caller names, on a free loopback port. A cluster started
//! here is left running on purpose: the demo tells the user how to look at the data and prints the
//! command that stops it. This is for development only, not for `serve`, whose database comes from
//! configuration. The module must never stop or reconfigure a server it did not start (creating the
//! demo's database is the one change it makes to someone else's server), and must never log a
//! password: every URL it logs or puts in an error goes through [`redact_url`] first.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::process::Command;
use tracing::{debug, info};
use url::Url;

/// The server a developer machine usually runs (Debian's `main` cluster, trust auth for `postgres`).
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long the "is something already there" probe may take. A refused connection returns at once;
/// the bound only matters for a filtered port or a wedged server, where giving up and starting our
/// own cluster is the right outcome.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a connection we actually need (not a probe) may take before we report it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The unprivileged account the cluster runs as when we are root: `initdb` and `postgres` refuse to
/// run as root, and Debian's packages create this account (it owns the machine's own clusters).
const CLUSTER_OWNER_WHEN_ROOT: &str = "postgres";

/// Where Debian and Ubuntu install the server binaries, one directory per major version. They are
/// not on PATH there, unlike the client tools.
const DEBIAN_PG_LIB: &str = "/usr/lib/postgresql";

/// `sun_path` holds 108 bytes including the terminating NUL; postgres refuses longer socket paths
/// and then fails to start with a message that does not say which directory to shorten.
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// The PostgreSQL server chosen by [`find_or_start`]. Its `Debug` output redacts the URL, which may
/// be a `DATABASE_URL` carrying a password.
#[derive(Clone)]
pub struct LocalPostgres {
    /// A URL to the `postgres` maintenance database (or `DATABASE_URL` unchanged when it was set).
    pub admin_url: String,
    /// Set when the server is a cluster this module created or started under the caller's directory.
    pub started: Option<StartedCluster>,
}

impl std::fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("admin_url", &redact_url(&self.admin_url))
            .field("started", &self.started)
            .finish()
    }
}

/// A cluster living under the directory given to [`find_or_start`], left running for the user.
#[derive(Debug, Clone)]
pub struct StartedCluster {
    /// The cluster's data directory (`<cluster_dir>/data`).
    pub data_dir: PathBuf,
    /// The loopback TCP port it listens on.
    pub port: u16,
    /// A shell command, ready to paste, that stops the cluster.
    pub stop_command: String,
}

/// Returns `DATABASE_URL` if set (as is, `started: None`), else
/// `postgres://postgres@127.0.0.1:5432/postgres` if a server accepts a connection there, else a
/// cluster under `cluster_dir`: created with `initdb` if the directory holds none yet, started with
/// `pg_ctl` on a free loopback port unless it is already running, its Unix socket in `cluster_dir`
/// and trust authentication for local connections. The cluster is left running.
///
/// Trust authentication is acceptable because the cluster is a throwaway for the demo that listens on
/// 127.0.0.1 only; it is the same policy as the machine's own development server.
pub async fn find_or_start(cluster_dir: &Path) -> anyhow::Result<LocalPostgres> {
    // An empty DATABASE_URL is what `DATABASE_URL= fhir-sync demo` produces; treat it as unset
    // rather than failing to parse it.
    let database_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty());
    resolve(database_url, DEFAULT_ADMIN_URL, cluster_dir).await
}

/// Creates database `name` if it does not exist yet and returns a URL to it, built from `admin_url`
/// by replacing its path (user, password, host, port and query are kept; a `dbname` query parameter,
/// which would override the path, is dropped).
pub async fn ensure_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let database_url = database_url_for(admin_url, name)?;
    let mut conn = connect(admin_url).await?;

    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .context("could not look up existing databases")?;
    if !exists {
        // The name is quoted as an identifier, so it cannot end the statement early.
        let create = format!("create database {}", quote_identifier(name));
        match sqlx::raw_sql(AssertSqlSafe(create))
            .execute(&mut conn)
            .await
        {
            Ok(_) => info!(database.name = name, "created database"),
            // CREATE DATABASE cannot run in a transaction, so two callers can both see the database
            // missing and both try to create it. The loser gets 42P04 (duplicate_database), or
            // 23505 (unique_violation on pg_database's name index) when the two inserts race inside
            // the server. Either way the database now exists, which is all the caller asked for.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04" | "23505")) =>
            {
                debug!(database.name = name, "database created concurrently");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("could not create database {name:?}"));
            }
        }
    }
    // A failed close only loses a connection that is being dropped anyway.
    let _ = conn.close().await;
    Ok(database_url)
}

/// The decision behind [`find_or_start`], with its inputs explicit so tests can take each branch
/// without touching process-global environment variables.
async fn resolve(
    database_url: Option<String>,
    probe_url: &str,
    cluster_dir: &Path,
) -> anyhow::Result<LocalPostgres> {
    if let Some(admin_url) = database_url {
        info!(database.url = %redact_url(&admin_url), "using PostgreSQL from DATABASE_URL");
        return Ok(LocalPostgres {
            admin_url,
            started: None,
        });
    }
    if accepts_connections(probe_url).await {
        info!(database.url = %redact_url(probe_url), "using the PostgreSQL server already running");
        return Ok(LocalPostgres {
            admin_url: probe_url.to_owned(),
            started: None,
        });
    }
    info!(
        database.url = %redact_url(probe_url),
        cluster.dir = %cluster_dir.display(),
        "no PostgreSQL server accepts connections; using a local cluster"
    );
    let started = start_cluster(cluster_dir).await?;
    let admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", started.port);
    // pg_ctl has waited for the server to report itself ready; this checks that it is reachable the
    // way callers will reach it, over TCP as `postgres`, so a problem surfaces here and not later.
    if !accepts_connections(&admin_url).await {
        bail!(
            "the cluster in {} is running but does not accept connections on 127.0.0.1:{}; see {}",
            started.data_dir.display(),
            started.port,
            started.data_dir.with_file_name("server.log").display()
        );
    }
    Ok(LocalPostgres {
        admin_url,
        started: Some(started),
    })
}

/// Whether a real PostgreSQL connection succeeds: a bare TCP connect would also succeed against a
/// server that then rejects us, or against something that is not PostgreSQL at all.
async fn accepts_connections(url: &str) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect(url)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            true
        }
        Ok(Err(error)) => {
            debug!(database.url = %redact_url(url), %error, "probe connection failed");
            false
        }
        Err(_) => {
            debug!(database.url = %redact_url(url), "probe connection timed out");
            false
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    let redacted = redact_url(url);
    tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url))
        .await
        .with_context(|| format!("timed out connecting to {redacted}"))?
        .with_context(|| format!("could not connect to {redacted}"))
}

/// Creates (if needed) and starts (if needed) the cluster under `cluster_dir`.
async fn start_cluster(cluster_dir: &Path) -> anyhow::Result<StartedCluster> {
    let initdb = find_pg_bin("initdb")?;
    // Prefer the pg_ctl installed next to initdb so the cluster is created and run by the same major
    // version even when PATH and /usr/lib/postgresql disagree.
    let pg_ctl = match initdb.with_file_name("pg_ctl") {
        sibling if is_executable(&sibling) => sibling,
        _ => find_pg_bin("pg_ctl")?,
    };
    let run_as = running_as_root().then_some(CLUSTER_OWNER_WHEN_ROOT);
    let cluster_dir = prepare_cluster_dir(cluster_dir, run_as).await?;
    let socket_dir = cluster_dir
        .to_str()
        .context("the cluster directory path is not valid utf-8")?;
    if socket_dir.len() + "/.s.PGSQL.65535".len() > MAX_SOCKET_PATH_BYTES {
        bail!(
            "the cluster directory {socket_dir} is too long to hold a unix socket \
             (at most {} bytes); choose a shorter path",
            MAX_SOCKET_PATH_BYTES - "/.s.PGSQL.65535".len()
        );
    }
    let data_dir = cluster_dir.join("data");
    let log_file = cluster_dir.join("server.log");

    if data_dir.join("PG_VERSION").exists() {
        debug!(cluster.data_dir = %data_dir.display(), "reusing existing cluster");
    } else {
        info!(cluster.data_dir = %data_dir.display(), initdb = %initdb.display(), "creating cluster");
        let mut initdb_cmd = command(&initdb, run_as, &cluster_dir);
        initdb_cmd
            .arg("--pgdata")
            .arg(&data_dir)
            .args(["--username=postgres", "--auth=trust"])
            // C locale: the demo must not depend on which locales the machine has generated, and
            // initdb fails outright when LANG names one that is missing (common in containers).
            .args(["--encoding=UTF8", "--locale=C"]);
        run(initdb_cmd, "initdb").await?;
    }

    let stop_command = format!(
        "{} -D {} stop",
        display_command(&pg_ctl, run_as),
        shell_quote(&data_dir.to_string_lossy())
    );

    let port = match cluster_status(&pg_ctl, run_as, &cluster_dir, &data_dir).await? {
        ClusterStatus::Running => {
            let port = running_port(&data_dir).await?;
            info!(cluster.data_dir = %data_dir.display(), cluster.port = port, "cluster already running");
            port
        }
        ClusterStatus::Stopped => {
            let port = free_port()?;
            let mut start = command(&pg_ctl, run_as, &cluster_dir);
            start
                .arg("-D")
                .arg(&data_dir)
                // The log file matters beyond diagnostics: without -l the postmaster inherits
                // pg_ctl's stdout and stderr, and waiting for pg_ctl's output would then wait for
                // the server to exit.
                .arg("-l")
                .arg(&log_file)
                // -w makes pg_ctl return only once the server reports itself ready to accept
                // connections (or fail after its timeout), so nothing here sleeps and polls.
                .arg("-w")
                // pg_ctl hands -o to /bin/sh, hence the quoting of the socket directory.
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1",
                    shell_quote(socket_dir)
                ))
                .arg("start");
            run(start, "pg_ctl start").await.map_err(|e| {
                // The reason (port taken, bad permissions, ...) is in the server log, not in
                // pg_ctl's own output.
                e.context(format!(
                    "the cluster in {} did not start; its log ends with:\n{}",
                    data_dir.display(),
                    log_tail(&log_file)
                ))
            })?;
            info!(cluster.data_dir = %data_dir.display(), cluster.port = port, "started cluster");
            port
        }
    };

    Ok(StartedCluster {
        data_dir,
        port,
        stop_command,
    })
}

/// Creates `cluster_dir`, checks it is safe to use, hands it to the cluster owner when we are root,
/// and returns it as an absolute path (pg_ctl runs the server from the data directory, so a relative
/// socket directory would point somewhere else).
async fn prepare_cluster_dir(cluster_dir: &Path, run_as: Option<&str>) -> anyhow::Result<PathBuf> {
    tokio::fs::create_dir_all(cluster_dir)
        .await
        .with_context(|| format!("could not create {}", cluster_dir.display()))?;
    let cluster_dir = tokio::fs::canonicalize(cluster_dir)
        .await
        .with_context(|| format!("could not resolve {}", cluster_dir.display()))?;

    // The socket and the log go straight into this directory, and as root it is handed to another
    // user: refuse a directory that already holds something other than our cluster, such as the
    // repository root passed by mistake.
    if !cluster_dir.join("data").exists() {
        let mut entries = tokio::fs::read_dir(&cluster_dir)
            .await
            .with_context(|| format!("could not read {}", cluster_dir.display()))?;
        if entries.next_entry().await?.is_some() {
            bail!(
                "{} is not empty and holds no cluster; refusing to create one there",
                cluster_dir.display()
            );
        }
    }

    if let Some(user) = run_as {
        let mut chown = Command::new("chown");
        chown.arg(format!("{user}:")).arg(&cluster_dir);
        run(chown, "chown").await?;
        // The owner also needs to reach the directory: a checkout under /root (mode 0700) is
        // readable by root only, and initdb would then fail with a less helpful message.
        let mut check = command(Path::new("test"), run_as, Path::new("/"));
        check.arg("-w").arg(&cluster_dir);
        if run(check, "test").await.is_err() {
            bail!(
                "running as root, the cluster must run as the `{user}` user, which cannot write to {}; \
                 choose a directory it can reach, start PostgreSQL, or set DATABASE_URL",
                cluster_dir.display()
            );
        }
    }
    Ok(cluster_dir)
}

enum ClusterStatus {
    Running,
    Stopped,
}

async fn cluster_status(
    pg_ctl: &Path,
    run_as: Option<&str>,
    cluster_dir: &Path,
    data_dir: &Path,
) -> anyhow::Result<ClusterStatus> {
    let mut status = command(pg_ctl, run_as, cluster_dir);
    status.arg("-D").arg(data_dir).arg("status");
    let output = output(status, "pg_ctl status").await?;
    // pg_ctl documents its status exit codes: 0 running, 3 not running, 4 no usable data directory.
    match output.status.code() {
        Some(0) => Ok(ClusterStatus::Running),
        Some(3) => Ok(ClusterStatus::Stopped),
        _ => Err(command_failed("pg_ctl status", &output)),
    }
}

/// The port of a running cluster, from the fourth line of `postmaster.pid`: it was picked when the
/// cluster was started, possibly by an earlier run, and is not recorded anywhere else.
async fn running_port(data_dir: &Path) -> anyhow::Result<u16> {
    let pid_file = data_dir.join("postmaster.pid");
    let contents = tokio::fs::read_to_string(&pid_file)
        .await
        .with_context(|| format!("could not read {}", pid_file.display()))?;
    contents
        .lines()
        .nth(3)
        .and_then(|line| line.trim().parse().ok())
        .with_context(|| format!("{} holds no port on its fourth line", pid_file.display()))
}

/// A loopback port that was free a moment ago. The listener is closed before postgres binds the
/// port, so another process can take it in between; pg_ctl then fails, the error carries the log
/// saying the address is in use, and running again picks another port.
fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context("could not find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of the server log, for error messages. The log of a fresh trust-auth cluster holds
/// no secrets.
fn log_tail(log_file: &Path) -> String {
    match std::fs::read_to_string(log_file) {
        Ok(log) => {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        }
        Err(e) => format!("(could not read {}: {e})", log_file.display()),
    }
}

/// Whether this process runs as root. `/proc/self` is owned by the process's effective uid; std
/// offers no geteuid and this crate does not depend on libc. Without /proc we assume not root, and
/// initdb's own "cannot be run as root" error is what the user sees.
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Finds a PostgreSQL server program: on PATH first, then in `/usr/lib/postgresql/<highest
/// version>/bin`, where Debian installs it without putting it on PATH.
fn find_pg_bin(name: &str) -> anyhow::Result<PathBuf> {
    find_pg_bin_in(
        name,
        std::env::var_os("PATH").as_deref(),
        Path::new(DEBIAN_PG_LIB),
    )
}

fn find_pg_bin_in(name: &str, path: Option<&OsStr>, lib_root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = path {
        // An empty PATH entry means the current directory to a shell; a server binary picked up from
        // wherever we happen to run is not one we want.
        for dir in std::env::split_paths(path).filter(|d| !d.as_os_str().is_empty()) {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = match std::fs::read_dir(lib_root) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let version = parse_version(entry.file_name().to_str()?)?;
                Some((version, entry.path()))
            })
            .collect(),
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("could not list {}", lib_root.display())),
    };
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    for (_, dir) in versions {
        let candidate = dir.join("bin").join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!(
        "could not find `{name}` on PATH or in {}/<version>/bin; install the PostgreSQL server \
         package, start a server on 127.0.0.1:5432, or set DATABASE_URL",
        lib_root.display()
    )
}

/// "15" → [15], "9.6" → [9, 6]; anything else is not a version directory.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `program`, run as `run_as` through runuser when set, from `cwd`. The working directory matters
/// when switching user: the caller's may be unreadable to the cluster owner.
fn command(program: &Path, run_as: Option<&str>, cwd: &Path) -> Command {
    let mut cmd = match run_as {
        Some(user) => {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", user, "--"]).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

/// How [`command`] reads when pasted into a shell.
fn display_command(program: &Path, run_as: Option<&str>) -> String {
    let program = shell_quote(&program.to_string_lossy()).into_owned();
    match run_as {
        Some(user) => format!("runuser -u {} -- {program}", shell_quote(user)),
        None => program,
    }
}

async fn output(mut cmd: Command, what: &str) -> anyhow::Result<Output> {
    cmd.output()
        .await
        .with_context(|| format!("could not run {what}"))
}

async fn run(cmd: Command, what: &str) -> anyhow::Result<Output> {
    let output = output(cmd, what).await?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(command_failed(what, &output))
    }
}

fn command_failed(what: &str, output: &Output) -> anyhow::Error {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let detail = [stderr.trim(), stdout.trim()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    anyhow::anyhow!("{what} failed ({}): {detail}", output.status)
}

/// `s` quoted for a POSIX shell, left bare when it needs no quoting so printed commands stay readable.
fn shell_quote(s: &str) -> Cow<'_, str> {
    let bare = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if bare {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("'{}'", s.replace('\'', r"'\''")))
    }
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `admin_url` pointing at database `name` instead. Pure, so the rewriting is unit-tested.
fn database_url_for(admin_url: &str, name: &str) -> anyhow::Result<String> {
    // PostgreSQL truncates longer identifiers, which would make the URL name a different database
    // than the one created; NUL cannot be sent at all.
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        bail!("invalid database name {name:?}: it must be 1 to 63 bytes without NUL");
    }
    let mut url = Url::parse(admin_url)
        .with_context(|| format!("could not parse database url {}", redact_url(admin_url)))?;
    url.path_segments_mut()
        .map_err(|()| {
            anyhow::anyhow!(
                "database url {} cannot name a database",
                redact_url(admin_url)
            )
        })?
        .clear()
        // push percent-encodes, so '/', '%', '?' and spaces in the name survive; sqlx decodes it.
        .push(name);
    remove_query_param(&mut url, "dbname");
    Ok(url.into())
}

/// Drops every `key` parameter from `url`'s query. The query is re-encoded only when something is
/// removed, so a URL without `key` comes back byte for byte.
fn remove_query_param(url: &mut Url, key: &str) {
    if !url.query_pairs().any(|(k, _)| k == key) {
        return;
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != key)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
}

/// `url` without its password (user info or `password` query parameter), for logs and errors. An
/// unparseable URL is not echoed at all, since where its password is cannot be known.
fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        return "<unparseable database url>".to_owned();
    };
    // set_password only fails for URLs without a host, which cannot carry one in user info.
    let _ = parsed.set_password(None);
    remove_query_param(&mut parsed, "password");
    parsed.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_replaces_only_the_database() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "fhir_sync_demo",
                "postgres://postgres@127.0.0.1:5432/fhir_sync_demo",
            ),
            (
                "postgres://app:s3cret@db.example:6543/postgres?sslmode=require&application_name=x",
                "warehouse",
                "postgres://app:s3cret@db.example:6543/warehouse?sslmode=require&application_name=x",
            ),
            (
                "postgres://postgres@localhost",
                "w",
                "postgres://postgres@localhost/w",
            ),
            (
                "postgresql://u@h/postgres?dbname=postgres&sslmode=disable",
                "w",
                "postgresql://u@h/w?sslmode=disable",
            ),
            (
                "postgres://u@h/postgres?dbname=other",
                "w",
                "postgres://u@h/w",
            ),
            (
                "postgres:///postgres?host=/var/run/postgresql",
                "w",
                "postgres:///w?host=/var/run/postgresql",
            ),
            (
                "postgres://u@h:1/a/b",
                "odd name/%?",
                "postgres://u@h:1/odd%20name%2F%25%3F",
            ),
        ];
        for (admin_url, name, expected) in cases {
            assert_eq!(
                database_url_for(admin_url, name).unwrap(),
                expected,
                "{admin_url} + {name}"
            );
        }
    }

    #[test]
    fn database_url_round_trips_through_sqlx() {
        let url = database_url_for("postgres://u@h/postgres", "odd name/%?").unwrap();
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        assert_eq!(options.get_database(), Some("odd name/%?"));
    }

    #[test]
    fn database_url_rejects_bad_names_and_urls() {
        assert!(database_url_for("postgres://u@h/p", "").is_err());
        assert!(database_url_for("postgres://u@h/p", &"x".repeat(64)).is_err());
        assert!(database_url_for("postgres://u@h/p", "a\0b").is_err());
        let error = database_url_for("not a url :pw@", "w").unwrap_err();
        assert!(!format!("{error:#}").contains("pw"));
    }

    #[test]
    fn redacted_urls_carry_no_password() {
        let cases = [
            (
                "postgres://app:s3cret@db:5432/w?sslmode=require",
                "postgres://app@db:5432/w?sslmode=require",
            ),
            (
                "postgres://app@db/w?password=s3cret&sslmode=require",
                "postgres://app@db/w?sslmode=require",
            ),
            ("postgres://app@db/w?password=s3cret", "postgres://app@db/w"),
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            ("s3cret", "<unparseable database url>"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected);
        }
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(
            shell_quote("/usr/lib/postgresql/15/bin/pg_ctl"),
            "/usr/lib/postgresql/15/bin/pg_ctl"
        );
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(quote_identifier(r#"a"b"#), r#""a""b""#);
    }

    #[test]
    fn versions_order_numerically() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("15-beta"), None);
        assert!(parse_version("10").unwrap() > parse_version("9.6").unwrap());
    }

    #[test]
    fn pg_bin_falls_back_to_the_highest_installed_version() {
        let root = tempfile::tempdir().unwrap();
        for version in ["9.6", "15", "13", "notes"] {
            let bin = root.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("initdb"), "").unwrap();
            std::fs::set_permissions(bin.join("initdb"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        // Version 16 is installed without the server package: no initdb there.
        std::fs::create_dir_all(root.path().join("16/bin")).unwrap();

        let found = find_pg_bin_in("initdb", None, root.path()).unwrap();
        assert_eq!(found, root.path().join("15/bin/initdb"));

        let error = find_pg_bin_in("pg_ctl", Some(OsStr::new("")), root.path()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("could not find `pg_ctl` on PATH")
        );
    }

    #[test]
    fn pg_bin_finds_this_machines_initdb() {
        let initdb = find_pg_bin("initdb").unwrap();
        assert!(is_executable(&initdb), "{}", initdb.display());
    }

    /// Stops the cluster whatever the test's outcome, so a failed assertion leaves no server behind.
    struct StopOnDrop(String);

    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = stop(&self.0);
        }
    }

    fn stop(stop_command: &str) -> bool {
        std::process::Command::new("sh")
            .args(["-c", stop_command])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    async fn select_one(url: &str) -> i32 {
        let mut conn = connect(url).await.unwrap();
        let one = sqlx::query_scalar("select 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        one
    }

    #[tokio::test]
    async fn database_url_wins_without_probing() {
        // The probe URL is unparseable: reaching it would fail the test.
        let found = resolve(
            Some("postgres://u:pw@db.invalid/w".to_owned()),
            "not a url",
            Path::new("/nonexistent"),
        )
        .await
        .unwrap();
        assert_eq!(found.admin_url, "postgres://u:pw@db.invalid/w");
        assert!(found.started.is_none());
        assert!(!format!("{found:?}").contains("pw"), "{found:?}");
    }

    #[tokio::test]
    async fn refuses_a_non_empty_directory_without_a_cluster() {
        let probe_url = format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            free_port().unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Cargo.toml"), "").unwrap();
        let error = resolve(None, &probe_url, dir.path()).await.unwrap_err();
        assert!(
            error
                .to_string()
                .contains("is not empty and holds no cluster"),
            "{error:#}"
        );
    }

    #[tokio::test]
    async fn starts_reuses_and_restarts_a_cluster_when_nothing_listens() {
        // Nothing listens on a port that was free a moment ago, so the probe fails as it does on a
        // machine where PostgreSQL is installed but not running. The tempdir itself is the cluster
        // directory: as root it is handed to `postgres`, and its /tmp parent is reachable by that user.
        let probe_url = format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            free_port().unwrap()
        );
        let cluster_dir = tempfile::Builder::new()
            .prefix("fhir-sync-localpg-")
            .tempdir()
            .unwrap();

        let first = resolve(None, &probe_url, cluster_dir.path()).await.unwrap();
        let started = first.started.clone().expect("a cluster was started");
        // Declared after the tempdir, so dropped (and the server stopped) before the dir is removed.
        let _stop_on_drop = StopOnDrop(started.stop_command.clone());
        assert_eq!(
            started.data_dir,
            cluster_dir.path().canonicalize().unwrap().join("data")
        );
        assert_eq!(
            first.admin_url,
            format!("postgres://postgres@127.0.0.1:{}/postgres", started.port)
        );
        assert_eq!(select_one(&first.admin_url).await, 1);

        // While it runs, a second call finds it instead of starting another.
        let second = resolve(None, &probe_url, cluster_dir.path()).await.unwrap();
        assert_eq!(second.started.unwrap().port, started.port);

        // Once stopped, the existing cluster is started again rather than recreated.
        assert!(stop(&started.stop_command), "{}", started.stop_command);
        let marker = started.data_dir.join("PG_VERSION");
        let created_at = std::fs::metadata(&marker).unwrap().modified().unwrap();
        let third = resolve(None, &probe_url, cluster_dir.path()).await.unwrap();
        assert_eq!(
            std::fs::metadata(&marker).unwrap().modified().unwrap(),
            created_at
        );
        assert_eq!(select_one(&third.admin_url).await, 1);

        // ensure_database is idempotent and its URL reaches the new database.
        let url = ensure_database(&third.admin_url, "fhir_sync_localpg_test")
            .await
            .unwrap();
        let again = ensure_database(&third.admin_url, "fhir_sync_localpg_test")
            .await
            .unwrap();
        assert_eq!(url, again);
        assert!(url.ends_with("/fhir_sync_localpg_test"));
        assert_eq!(select_one(&url).await, 1);

        assert!(stop(&started.stop_command), "{}", started.stop_command);
    }
}
