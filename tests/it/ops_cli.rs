//! The real `fhir-sync` binary's ops commands against a test database: `status` (tables and
//! JSON), `runs show`, and `run` with and without a terminal.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use fhir_sync::fake::{Dataset, FakeFhirServer, FakeOptions, Faults};
use fhir_sync::smart::{SigningAlgorithm, SigningKey};
use fhir_sync::sync::{self, RunOptions};
use serde_json::Value;

use crate::helpers::TestEnv;
use crate::processes::write_setup;

/// Runs the binary with `args` against the test's config, jobs and database, off the async
/// runtime (the fake server it talks to runs there).
async fn fhir_sync(dir: &Path, db_url: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-sync"));
    command
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("--jobs-dir")
        .arg(dir.join("jobs"))
        .args(args);
    with_test_env(&mut command, db_url);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn with_test_env(command: &mut Command, db_url: &str) {
    command
        .env("FHIR_SYNC_DATABASE__URL", db_url)
        .env("RUST_LOG", "info,sqlx=warn")
        .env_remove("FHIR_SYNC_ENV")
        .env_remove("FHIR_SYNC_LOGGING__FORMAT")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A second fake server whose every file download answers 500, and a job `broken` syncing
/// from it with the same key as `env`'s job. Writes `jobs/broken.toml` for the binary.
async fn broken_source(
    env: &TestEnv,
    dir: &Path,
) -> (FakeFhirServer, fhir_sync::config::JobConfig) {
    let fake = FakeFhirServer::start(
        Dataset::new(7, 5),
        FakeOptions {
            faults: Faults {
                file_500: u32::MAX,
                ..Faults::default()
            },
            ..TestEnv::fast()
        },
    )
    .await
    .unwrap();
    let key =
        SigningKey::from_pem(&env.key_pem, SigningAlgorithm::RS384, None, "test key").unwrap();
    fake.register_client("fhir-sync-demo", key.public_jwks());
    let mut job = fhir_sync::demo::demo_job(&fake, env.key_pem.clone());
    job.name = "broken".into();
    job.export.poll_min_interval_seconds = 0.001;
    std::fs::write(
        dir.join("jobs/broken.toml"),
        format!(
            "[fhir]\nbase_url = \"{}\"\n[auth]\nclient_id = \"fhir-sync-demo\"\nprivate_key_file = \"demo.pem\"\n\
             [export]\ntypes = [\"Patient\", \"Encounter\", \"Observation\", \"Condition\"]\n",
            fake.fhir_base_url()
        ),
    )
    .unwrap();
    (fake, job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_runs_show_tell_a_finished_run_from_a_failed_one() {
    let env = TestEnv::new(
        5,
        FakeOptions {
            faults: Faults::default().error_file(),
            ..TestEnv::fast()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(&env, dir.path(), Some("0 2 * * *"));
    let (_broken_fake, broken_job) = broken_source(&env, dir.path()).await;
    let ok = env.run().await.expect("the demo run succeeds");
    let failed = sync::run_job(&env.ctx(), &broken_job, RunOptions { full: true })
        .await
        .expect_err("every file download fails");
    let failed_id = failed.run_id.expect("the failed run was recorded");
    let detail = fhir_sync::ops::report::run_detail(&env.db.pool, failed_id)
        .await
        .unwrap()
        .unwrap();
    let reason = detail
        .run
        .error
        .clone()
        .expect("the failed run has a reason");
    let failed_file = detail
        .files
        .iter()
        .find(|f| f.status == "failed")
        .expect("a file failed")
        .clone();
    let db = env.db.url();

    // status --json: both jobs and both runs, in the report model's shapes.
    let out = fhir_sync(dir.path(), &db, &["status", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let jobs = status["jobs"].as_array().unwrap();
    let job = |name: &str| {
        jobs.iter()
            .find(|j| j["name"] == name)
            .unwrap_or_else(|| panic!("job {name} listed in {status}"))
    };
    assert_eq!(job("demo")["last_run"]["id"], ok.run_id);
    assert_eq!(job("demo")["last_run"]["status"], "succeeded");
    assert_eq!(job("demo")["schedule"]["cron"], "0 2 * * *");
    assert!(job("demo")["next_run_at"].is_string());
    assert_eq!(
        job("demo")["watermark"]["transaction_time"],
        ok.transaction_time.as_str()
    );
    assert!(job("demo")["last_success_at"].is_string());
    assert_eq!(job("broken")["last_run"]["status"], "failed");
    assert!(job("broken")["last_success_at"].is_null());
    assert!(job("broken")["watermark"].is_null());
    let runs = status["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    // Newest first.
    assert_eq!(runs[0]["id"], failed_id);
    assert_eq!(runs[0]["status"], "failed");
    assert_eq!(runs[0]["error"], reason.as_str());
    assert_eq!(runs[1]["id"], ok.run_id);
    assert_eq!(runs[1]["resources_loaded"], ok.resources_loaded());

    // The tables say the same for a person.
    let out = fhir_sync(dir.path(), &db, &["status"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let first_line = reason.lines().next().unwrap();
    for expected in [
        "next run (UTC)",
        "0 2 * * * (UTC)",
        &format!("{} succeeded", ok.run_id),
        &format!("{failed_id} failed"),
        &ok.transaction_time,
        &first_line[..first_line.len().min(60)],
    ] {
        assert!(
            table.contains(expected),
            "{expected:?} missing from:\n{table}"
        );
    }
    let out = fhir_sync(dir.path(), &db, &["status", "--job", "demo", "--json"]).await;
    let only: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(only["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(only["runs"].as_array().unwrap().len(), 1);
    assert_eq!(only["runs"][0]["id"], ok.run_id);

    // runs show: the failed run's reason and its files, the failed one with its error.
    let out = fhir_sync(dir.path(), &db, &["runs", "show", &failed_id.to_string()]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.starts_with(&format!(
            "run {failed_id} of job broken: failed (manual run, full export)"
        )),
        "{shown}"
    );
    assert!(shown.contains(first_line), "{shown}");
    let verdict = match detail.run.error_retryable {
        Some(true) => "(may pass on a later run)",
        Some(false) => "(needs an operator)",
        None => "",
    };
    assert!(
        shown.contains(&format!("{first_line} {verdict}")),
        "{shown}"
    );
    assert!(shown.contains("\nfiles:\n"), "{shown}");
    let file_error = failed_file
        .error
        .as_deref()
        .unwrap()
        .lines()
        .next()
        .unwrap();
    let file_line = shown
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{} ", failed_file.id)))
        .unwrap_or_else(|| panic!("file {} listed in:\n{shown}", failed_file.id));
    for expected in [
        "output",
        &failed_file.resource_type,
        "failed",
        &file_error[..file_error.len().min(60)],
    ] {
        assert!(
            file_line.contains(expected),
            "{expected:?} missing from {file_line:?}"
        );
    }
    assert!(
        file_line.contains(&format!("  {}  ", failed_file.attempts)),
        "attempts shown: {file_line:?}"
    );
    assert_eq!(
        shown.lines().filter(|l| l.contains(" output ")).count(),
        detail.files.iter().filter(|f| f.kind == "output").count(),
        "every file listed:\n{shown}"
    );

    // The finished run shows the server's export issues with their diagnostics.
    let out = fhir_sync(dir.path(), &db, &["runs", "show", &ok.run_id.to_string()]).await;
    let shown = text(&out.stdout);
    assert!(shown.contains("export issues"), "{shown}");
    assert!(
        shown.contains("some Patient resources could not be exported"),
        "{shown}"
    );
    let out = fhir_sync(
        dir.path(),
        &db,
        &["runs", "show", &ok.run_id.to_string(), "--json"],
    )
    .await;
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["id"], ok.run_id);
    assert_eq!(json["status"], "succeeded");
    assert_eq!(
        json["files"].as_array().unwrap().len(),
        ok.output_files + ok.error_files
    );
    assert_eq!(json["export_issues"].as_array().unwrap().len(), 4);

    // An unknown run is an error that says so.
    let out = fhir_sync(dir.path(), &db, &["runs", "show", "999999"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("there is no run 999999"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());

    // runs list filters by status.
    let out = fhir_sync(
        dir.path(),
        &db,
        &["runs", "list", "--status", "failed", "--json"],
    )
    .await;
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<i64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [failed_id]);
    let out = fhir_sync(dir.path(), &db, &["runs", "list", "--status", "fine"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not a run status"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_a_terminal_writes_plain_lines() {
    let env = TestEnv::new(5, TestEnv::fast()).await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(&env, dir.path(), None);
    let out = fhir_sync(dir.path(), &env.db.url(), &["run", "demo"]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("job demo: run "), "{stdout}");
    assert!(stderr.contains("file loaded"), "{stderr}");
    assert!(stderr.contains("run state"), "{stderr}");
    for (name, output) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(
            !output.contains('\u{1b}'),
            "no escape codes on {name}: {output:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_json_logs_puts_the_ids_on_every_file_line() {
    let env = TestEnv::new(5, TestEnv::fast()).await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(&env, dir.path(), None);
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-sync"));
    command
        .arg("--config-dir")
        .arg(dir.path().join("config"))
        .arg("--jobs-dir")
        .arg(dir.path().join("jobs"))
        .args(["run", "demo"]);
    with_test_env(&mut command, &env.db.url());
    command.env("FHIR_SYNC_LOGGING__FORMAT", "json");
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let loaded: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "file loaded")
        .collect();
    let files: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run_file")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(loaded.len() as i64, files, "one line per file");
    let run_id: i64 = sqlx::query_scalar("SELECT max(id) FROM fhir_sync.run")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    for line in loaded {
        assert_eq!(line["job.name"], "demo", "{line}");
        assert_eq!(line["run.id"], run_id, "{line}");
        assert!(line["file.id"].is_i64(), "{line}");
        assert!(line["resource.type"].is_string(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_in_a_terminal_shows_progress_and_ends_with_the_run_s_state() {
    let env = TestEnv::new(5, TestEnv::fast()).await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(&env, dir.path(), None);
    // `script` gives the binary a pseudo-terminal, as a person's shell would.
    let inner = format!(
        "{} --config-dir {} --jobs-dir {} run demo",
        env!("CARGO_BIN_EXE_fhir-sync"),
        dir.path().join("config").display(),
        dir.path().join("jobs").display()
    );
    let mut command = Command::new("script");
    command
        .args(["-qefc", &inner, "/dev/null"])
        .env("TERM", "xterm");
    with_test_env(&mut command, &env.db.url());
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let screen = text(&out.stdout);
    assert!(out.status.success(), "{screen}{}", text(&out.stderr));
    let run_id: i64 = sqlx::query_scalar("SELECT max(id) FROM fhir_sync.run")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    let files: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run_file")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    let resources = env.fake.dataset().total();
    assert!(
        screen.contains(&format!(
            "run {run_id}: succeeded: {files}/{files} files, {resources} resources loaded"
        )),
        "the last state of the phase line stays on screen:\n{screen}"
    );
    assert!(screen.contains("job demo: run "), "{screen}");
    // Log lines printed above the bars stay whole lines.
    assert!(screen.contains("file loaded"), "{screen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_a_finished_run_says_it_had_ended_and_exits_non_zero() {
    let env = TestEnv::new(3, TestEnv::fast()).await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(&env, dir.path(), None);
    let done = env.run().await.expect("the run succeeds");
    let id = done.run_id.to_string();
    let out = fhir_sync(dir.path(), &env.db.url(), &["cancel", &id]).await;
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("already ended (succeeded)"), "{said}");
    let status: String = sqlx::query_scalar("SELECT status FROM fhir_sync.run WHERE id = $1")
        .bind(done.run_id)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "succeeded", "a finished run stays as it ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_for_a_job_that_is_not_configured_says_which() {
    let env = TestEnv::new(3, TestEnv::fast()).await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(&env, dir.path(), None);
    let run = env.run().await.expect("the demo run succeeds");
    let db = env.db.url();

    // A typo: no such file and no run of it. An error naming the job, not an empty table.
    let out = fhir_sync(dir.path(), &db, &["status", "--job", "nosuch"]).await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no job named \"nosuch\""), "{stderr}");
    assert!(stderr.contains("nosuch.toml does not exist"), "{stderr}");
    assert!(!text(&out.stdout).contains("no jobs configured"));

    // A job whose file was removed: its recorded runs are still shown, and the line says why
    // the jobs table is missing.
    std::fs::remove_file(dir.path().join("jobs/demo.toml")).unwrap();
    let out = fhir_sync(dir.path(), &db, &["status", "--job", "demo"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("job \"demo\" is not configured ("),
        "{stdout}"
    );
    assert!(!stdout.contains("no jobs configured"), "{stdout}");
    let run_line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&run.run_id.to_string()))
        .unwrap_or_else(|| panic!("run {} listed in {stdout}", run.run_id));
    assert!(run_line.contains("succeeded"), "{run_line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_jwks_into_a_closed_pipe_exits_quietly() {
    let env = TestEnv::new(1, TestEnv::fast()).await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(&env, dir.path(), None);
    // `fhir-sync keys jwks demo | head -0`, made deterministic: the reading end is closed
    // before the process starts, so its first write meets a broken pipe.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-sync"));
    command
        .arg("--config-dir")
        .arg(dir.path().join("config"))
        .arg("--jobs-dir")
        .arg(dir.path().join("jobs"))
        .args(["keys", "jwks", "demo"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert_eq!(stderr, "", "nothing to report");
}
