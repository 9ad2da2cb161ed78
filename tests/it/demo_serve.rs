//! `fhir-sync demo --serve` as a user runs it: a process that stays up with the fake EHR and
//! `serve`, whose job file and key the other commands use, and that stops cleanly on Ctrl-C.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::helpers::TestDb;

/// The demo process; killed when dropped so a failing test leaves nothing running.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    fn start(dir: &Path, admin_url: &str, database: &str) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fhir-sync"))
            .args(["demo", "--serve", "--patients", "3", "--database", database])
            .current_dir(dir)
            .env("DATABASE_URL", admin_url)
            .env("RUST_LOG", "info,sqlx=warn")
            .env_remove("FHIR_SYNC_DATABASE__URL")
            .env_remove("FHIR_SYNC_ENV")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("demo.log")).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Demo {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads stdout until a line containing `needle`, returning that line. The bound is for
    /// a process that hangs, not a pace the machine must keep.
    fn wait_for_line(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(300)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line with {needle:?} ({e}); stdout so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn interrupt(&self) {
        let status = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when dropped, unless taken out first.
struct KilledOnDrop(Option<Child>);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Another command, run as a user would from the same directory in a second terminal.
async fn fhir_sync(dir: &Path, db_url: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-sync"));
    command
        .args(args)
        .current_dir(dir)
        .env("FHIR_SYNC_DATABASE__URL", db_url)
        .env("RUST_LOG", "warn")
        .env_remove("FHIR_SYNC_ENV")
        .stdin(Stdio::null());
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serve_stays_up_for_the_other_commands_and_stops_on_ctrl_c() {
    // The demo's database, created (and dropped at the end) by the harness; the demo finds it
    // there and loads into it.
    let db = TestDb::unmigrated().await;
    db.pool.close().await;
    let db_url = db.url();
    let database = url::Url::parse(&db_url).unwrap().path()[1..].to_string();
    let mut admin_url = url::Url::parse(&db_url).unwrap();
    admin_url.set_path("/postgres");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/default.toml"),
        "[ops]\nlisten = \"127.0.0.1:0\"\n[queue]\npoll_interval_ms = 50\nshutdown_grace_seconds = 1\n",
    )
    .unwrap();

    // A jobs/demo.toml the demo did not write is never replaced.
    std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
    std::fs::write(dir.path().join("jobs/demo.toml"), "# mine\n").unwrap();
    let mut refused = Demo::start(dir.path(), admin_url.as_str(), &database);
    let status = tokio::task::spawn_blocking(move || refused.child.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("demo.log")).unwrap();
    assert!(log.contains("was not written by the demo"), "{log}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("jobs/demo.toml")).unwrap(),
        "# mine\n"
    );
    std::fs::remove_file(dir.path().join("jobs/demo.toml")).unwrap();

    let mut demo = Demo::start(dir.path(), admin_url.as_str(), &database);
    demo.wait_for_line("verified: the rows in PostgreSQL match");
    let page = demo.wait_for_line("status page: http://");
    let page = page
        .split("status page: ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    let export = demo.wait_for_line("export FHIR_SYNC_DATABASE__URL=");
    assert!(export.contains(&database), "{export}");
    let first_run: i64 = demo
        .wait_for_line("runs show ")
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // Ready means the ops server answers /readyz with 200: polled, the way a probe would.
    let http = reqwest::Client::new();
    let readyz = format!("{page}readyz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match http.get(&readyz).send().await {
            Ok(response) if response.status() == 200 => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "{readyz} never became ready: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let html = http.get(&page).send().await.unwrap().text().await.unwrap();
    assert!(html.contains("demo"), "{html}");

    // The job and key are files now, so every command works on the demo.
    let job = std::fs::read_to_string(dir.path().join("jobs/demo.toml")).unwrap();
    assert!(job.contains("cron = \"*/5 * * * *\""), "{job}");
    let key = dir.path().join("keys/demo.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let out = fhir_sync(dir.path(), &db_url, &["keys", "jwks", "demo"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let jwks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1, "{jwks}");

    let out = fhir_sync(dir.path(), &db_url, &["check", "demo"]).await;
    assert!(
        out.status.success() && text(&out.stdout).contains("all checks passed"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let out = fhir_sync(dir.path(), &db_url, &["run", "demo", "--full"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ran = text(&out.stdout);
    assert!(ran.contains("loaded 54 resources"), "{ran}");

    let out = fhir_sync(dir.path(), &db_url, &["status"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = text(&out.stdout);
    let demo_row = status
        .lines()
        .find(|l| l.starts_with("demo "))
        .unwrap_or_else(|| panic!("the demo job in {status}"));
    assert!(demo_row.contains("*/5 * * * * (UTC)"), "{demo_row}");

    let out = fhir_sync(
        dir.path(),
        &db_url,
        &["runs", "show", &first_run.to_string()],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&format!("run {first_run} of job demo: succeeded")),
        "{}",
        text(&out.stdout)
    );

    // Ctrl-C: serve stops, the fake server with it, and the process exits cleanly.
    demo.interrupt();
    demo.wait_for_line("stopped the demo");
    let mut child = std::mem::replace(&mut demo.child, Command::new("true").spawn().unwrap());
    let (send, exited) = mpsc::channel();
    std::thread::spawn(move || send.send(child.wait().unwrap()));
    let status = exited
        .recv_timeout(Duration::from_secs(120))
        .expect("the demo exits after Ctrl-C");
    let log = std::fs::read_to_string(dir.path().join("demo.log")).unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        http.get(&readyz).send().await.is_err(),
        "nothing listens after the demo stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_ehr_serves_the_key_s_client_at_its_public_origin_until_sigterm() {
    // compose.yaml's fake EHR: listening on one address, reached at another name.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("demo.pem");
    let pem = fhir_sync::smart::generate(fhir_sync::smart::SigningAlgorithm::RS384).unwrap();
    fhir_sync::smart::write_private_key(&key, &pem, false).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut fake = KilledOnDrop(Some(
        Command::new(env!("CARGO_BIN_EXE_fhir-sync"))
            .args(["fake-ehr", "--patients", "2", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--origin")
            .arg(format!("http://localhost:{port}"))
            .arg("--client-key")
            .arg(&key)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("fake.log")).unwrap())
            .spawn()
            .unwrap(),
    ));
    let http = reqwest::Client::new();
    let discovery = format!("http://127.0.0.1:{port}/fhir/.well-known/smart-configuration");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let config: serde_json::Value = loop {
        match http.get(&discovery).send().await {
            Ok(response) if response.status() == 200 => break response.json().await.unwrap(),
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the fake EHR never answered: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        config["token_endpoint"],
        format!("http://localhost:{port}/auth/token"),
        "its URLs name the origin it is reached at"
    );

    // The client of that key is registered: `check` gets a token and reads.
    std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
    std::fs::write(
        dir.path().join("jobs/ehr.toml"),
        format!(
            "[fhir]\nbase_url = \"http://localhost:{port}/fhir\"\n[auth]\nclient_id = \"fhir-sync-demo\"\n\
             private_key_file = \"../demo.pem\"\n[export]\ntypes = [\"Patient\"]\n"
        ),
    )
    .unwrap();
    let out = fhir_sync(
        dir.path(),
        "postgres://unused@127.0.0.1:1/unused",
        &["check", "ehr"],
    )
    .await;
    assert!(
        out.status.success() && text(&out.stdout).contains("all checks passed"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let mut child = fake.0.take().unwrap();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let (send, exited) = mpsc::channel();
    std::thread::spawn(move || send.send(child.wait().unwrap()));
    let status = exited
        .recv_timeout(Duration::from_secs(60))
        .expect("the fake EHR exits on SIGTERM");
    assert!(
        status.success(),
        "{status:?}\n{}",
        std::fs::read_to_string(dir.path().join("fake.log")).unwrap()
    );
}
