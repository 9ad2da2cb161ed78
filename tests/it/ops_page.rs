//! The status page as a person sees it: headless Chromium, driven over WebDriver (chromedriver),
//! loads `/` from the ops router against a database holding a succeeded run with server-reported
//! issues, a failed run whose reason carries hostile markup, and a run half-way through loading.
//!
//! The browser is required: when `chromium` or `chromedriver` is missing the test fails and says
//! what to install (scripts/test.sh installs both when it runs as root).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhir_sync::config::ScheduleConfig;
use fhir_sync::fake::{Dataset, FakeFhirServer, FakeOptions, Faults};
use fhir_sync::smart::{SigningAlgorithm, SigningKey};
use fhir_sync::sync::{self, RunOptions, SyncContext, Trigger};
use fhir_sync::warehouse::runs as state;
use fhir_sync::warehouse::{FileKind, FileTarget, LoadLimits, load_ndjson};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::TestEnv;
use crate::webdriver::{Client, Locator};

/// The failed run's reason, as a FHIR server might send it: markup that would run a script or
/// change the page's title if it were not escaped.
const HOSTILE: &str = "disk full <script>document.title='pwned'</script>\
                       <img src=x onerror=\"document.title='pwned'\">";

/// How long chromedriver may take to accept sessions.
const DRIVER_START_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_status_page_shows_jobs_failures_and_the_running_runs_progress_in_a_browser() {
    // Before any set-up, so that a machine without the browser fails at once and says why.
    let (chromium, chromedriver) = browser_programs();

    // 1. A succeeded run of `demo`, whose manifest listed an error file (server-side issues).
    let env = TestEnv::new(
        3,
        FakeOptions {
            faults: Faults::default().error_file(),
            ..TestEnv::fast()
        },
    )
    .await;
    let succeeded = env.run().await.expect("the demo sync succeeds");

    // 2. A failed run of the scheduled job `nightly`: its server fails every status poll with
    // hostile diagnostics. It never succeeded, so with a daily schedule it is also overdue.
    let broken = FakeFhirServer::start(
        Dataset::new(7, 1),
        FakeOptions {
            faults: Faults::default().status_fatal(HOSTILE),
            ..TestEnv::fast()
        },
    )
    .await
    .unwrap();
    let key = SigningKey::from_pem(&env.key_pem, SigningAlgorithm::RS384, None, "key").unwrap();
    broken.register_client("fhir-sync-demo", key.public_jwks());
    let mut nightly = fhir_sync::demo::demo_job(&broken, env.key_pem.clone());
    nightly.name = "nightly".into();
    nightly.export.poll_min_interval_seconds = 0.001;
    nightly.schedule = Some(ScheduleConfig {
        cron: "0 2 * * *".into(),
        timezone: "UTC".into(),
        overlap: Default::default(),
    });
    let failed = sync::run_job(&env.ctx(), &nightly, RunOptions { full: true })
        .await
        .expect_err("the export fails on the server");
    let failed_id = failed.run_id.expect("the failed run was recorded");
    // A job is judged overdue only once it has had a whole period: make the failed run the
    // first tick of a job added three days ago.
    sqlx::query("UPDATE fhir_sync.run SET scheduled_for = now() - interval '3 days' WHERE id = $1")
        .bind(failed_id)
        .execute(&env.db.pool)
        .await
        .unwrap();

    // 3. A run of `demo` in the middle of loading, built through the run state machine and the
    // loader (no worker runs, so it stays where it is): Patient loaded, Observation part-way
    // after a retried download.
    let running = RunningRun::create(&env).await;

    // The ops server, as `serve` builds it, on a free loopback port.
    let shutdown = CancellationToken::new();
    let (addr, server) = fhir_sync::ops::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        fhir_sync::ops::http::router(fhir_sync::ops::http::OpsState {
            steps: SyncContext::new(
                env.db.pool.clone(),
                Default::default(),
                Default::default(),
                vec![env.job.clone(), nightly],
            ),
            settings: Arc::new(Default::default()),
            jwks: Arc::new(jsonwebtoken::jwk::JwkSet { keys: Vec::new() }),
        }),
        shutdown.clone(),
    )
    .await
    .unwrap();

    let browser = Browser::start(&chromium, &chromedriver).await;
    let page = &browser.client;
    page.goto(&format!("http://{addr}/")).await.unwrap();

    // The hostile reason did not run: the title is the page's own and nothing was injected.
    assert_eq!(page.title().await.unwrap(), "fhir-sync status");
    let injected = page
        .execute(
            "return document.querySelectorAll('script, img').length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        injected,
        json!(0),
        "no element came from the run's error text"
    );
    let refresh = page
        .find(Locator::Css("meta[http-equiv=refresh]"))
        .await
        .unwrap()
        .attr("content")
        .await
        .unwrap();
    assert_eq!(refresh.as_deref(), Some("10"), "the page reloads itself");

    // The summary at the top names both problems.
    let summary = text(page, "#summary").await;
    assert!(summary.contains("Needs attention"), "{summary}");
    assert!(
        summary.contains(&format!("Job nightly: last run #{failed_id} failed")),
        "{summary}"
    );
    assert!(summary.contains("Job nightly is overdue"), "{summary}");

    // Jobs: `nightly` failed and is overdue, and both stand out in red and orange.
    let nightly_row = text(page, "#jobs tr[data-job=nightly]").await;
    for expected in [
        "nightly",
        "0 2 * * *",
        "UTC, overlap skip",
        "FAILED",
        &format!("#{failed_id}"),
        "never",
        "OVERDUE",
        "none (next run is full)",
        "idle",
    ] {
        assert!(
            nightly_row.contains(expected),
            "{expected:?} in {nightly_row}"
        );
    }
    let failed_badge = page
        .find(Locator::Css("#jobs tr[data-job=nightly] .s-failed"))
        .await
        .unwrap();
    assert_eq!(
        failed_badge.css_value("background-color").await.unwrap(),
        "rgba(207, 34, 46, 1)"
    );
    let overdue_badge = page
        .find(Locator::Css("#jobs tr[data-job=nightly] .s-overdue"))
        .await
        .unwrap();
    assert_eq!(
        overdue_badge.css_value("background-color").await.unwrap(),
        "rgba(188, 76, 0, 1)"
    );
    // `demo`: its last success and watermark come from the succeeded run; it is loading now.
    let demo_row = text(page, "#jobs tr[data-job=demo]").await;
    for expected in [
        "demo",
        "manual only",
        "loading",
        &format!("#{}", running.run_id),
        &succeeded.transaction_time,
        &format!("from run #{}", succeeded.run_id),
    ] {
        assert!(demo_row.contains(expected), "{expected:?} in {demo_row}");
    }
    assert!(!demo_row.contains("OVERDUE"), "{demo_row}");
    assert!(!demo_row.contains("never"), "{demo_row}");

    // The running run, file by file.
    let section = format!("#run-{}", running.run_id);
    let heading = text(page, &format!("{section} h3")).await;
    assert!(
        heading.contains(&format!("Run #{} · demo", running.run_id)),
        "{heading}"
    );
    assert!(
        text(page, &section).await.contains("files 1 / 2 loaded"),
        "{}",
        text(page, &section).await
    );
    let patients = format!("{section} tr[data-file=\"{}\"]", running.patient_file);
    let patient_row = text(page, &patients).await;
    let total = running.patients.to_string();
    assert!(patient_row.contains("Patient"), "{patient_row}");
    assert!(patient_row.contains("loaded"), "{patient_row}");
    assert!(
        patient_row.contains(&format!("{total} / {total} lines (100 %)")),
        "{patient_row}"
    );
    let observations = format!("{section} tr[data-file=\"{}\"]", running.observation_file);
    let observation_row = text(page, &observations).await;
    let done_percent = running.observations_loaded * 100 / running.observations;
    for expected in [
        "Observation".to_string(),
        "loading".to_string(),
        format!(
            "{} / {} lines ({done_percent} %)",
            running.observations_loaded, running.observations
        ),
    ] {
        assert!(
            observation_row.contains(&expected),
            "{expected:?} in {observation_row}"
        );
    }
    let bar = page
        .find(Locator::Css(&format!("{observations} progress")))
        .await
        .unwrap();
    // The bar as the browser parsed it, not as the markup spelled it.
    let shown = page
        .execute(
            "return [arguments[0].value, arguments[0].max]",
            vec![serde_json::to_value(&bar).unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(
        shown,
        json!([running.observations_loaded, running.observations])
    );
    let attempts = text(page, &format!("{observations} td:nth-child(7)")).await;
    assert_eq!(attempts, "2", "the retried download shows its attempts");

    // Failures: the failed run's reason as plain text, and the succeeded run's server issues.
    let failure = text(page, &format!("#failure-{failed_id}")).await;
    assert!(
        failure.contains(HOSTILE),
        "the reason is shown verbatim as text: {failure}"
    );
    assert!(failure.contains("HTTP 500"), "{failure}");
    assert!(failure.contains("Needs an operator"), "{failure}");
    let issues = text(page, &format!("#failure-{}", succeeded.run_id)).await;
    assert!(
        issues.contains("some Patient resources could not be exported"),
        "{issues}"
    );
    assert!(issues.contains("warning"), "{issues}");

    // Recent runs: all three, newest first, each with its status label.
    let rows = page.find_all(Locator::Css("#runs tbody tr")).await.unwrap();
    let mut listed = Vec::new();
    for row in rows {
        listed.push(row.attr("data-run").await.unwrap().unwrap_or_default());
    }
    assert_eq!(
        listed,
        [running.run_id, failed_id, succeeded.run_id].map(|id| id.to_string())
    );
    let statuses = [
        (succeeded.run_id, "succeeded"),
        (failed_id, "FAILED"),
        (running.run_id, "loading"),
    ];
    for (id, status) in statuses {
        let row = text(page, &format!("#runs tr[data-run=\"{id}\"]")).await;
        assert!(row.contains(status), "{status:?} in {row}");
    }
    let succeeded_row = text(
        page,
        &format!("#runs tr[data-run=\"{}\"]", succeeded.run_id),
    )
    .await;
    assert!(
        succeeded_row.contains(&env.fake.dataset().total().to_string()),
        "resources loaded: {succeeded_row}"
    );

    // No presigned query string reaches the page.
    let source = page.source().await.unwrap();
    assert!(
        !source.contains(RunningRun::SIGNATURE),
        "a file URL's query string leaked"
    );

    // One run's own page.
    page.goto(&format!("http://{addr}/runs/{failed_id}"))
        .await
        .unwrap();
    let heading = text(page, "h1").await;
    assert!(
        heading.contains(&format!("Run #{failed_id} · nightly")),
        "{heading}"
    );
    assert!(text(page, "body").await.contains(HOSTILE));
    assert_eq!(
        page.title().await.unwrap(),
        format!("fhir-sync run #{failed_id} (nightly)")
    );

    browser.close().await;
    shutdown.cancel();
    server.await.unwrap();
}

/// The visible text of the first element matching `css`.
async fn text(page: &Client, css: &str) -> String {
    page.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no element {css} on the page: {e}"))
        .text()
        .await
        .unwrap()
}

/// A run of the test job stopped half-way through loading.
struct RunningRun {
    run_id: i64,
    patient_file: i64,
    observation_file: i64,
    patients: i64,
    observations: i64,
    observations_loaded: i64,
}

impl RunningRun {
    /// A presigned-URL signature on the file links; it must never be shown.
    const SIGNATURE: &str = "s3cr3t-signature";

    async fn create(env: &TestEnv) -> RunningRun {
        let pool = &env.db.pool;
        let base = env.job.fhir.base_url.clone();
        let run_id = state::create(pool, "demo", base.as_str(), Trigger::Manual, None, false)
            .await
            .unwrap()
            .expect("a manual run is always created");
        assert!(state::start_kick_off(pool, run_id, None).await.unwrap());
        let status_url = base.join("bulkstatus/page-test").unwrap();
        assert!(
            state::exporting(pool, run_id, base.as_str(), status_url.as_str())
                .await
                .unwrap()
        );
        let dataset = env.fake.dataset();
        let patients = dataset.count("Patient");
        let observations = dataset.count("Observation");
        let link = |name: &str| {
            base.join(&format!(
                "bulkfiles/page-test/{name}?sig={}",
                Self::SIGNATURE
            ))
            .unwrap()
        };
        let (patient_url, observation_url) = (link("Patient.ndjson"), link("Observation.ndjson"));
        let files = state::manifest_ready(
            pool,
            run_id,
            "2026-11-29T03:00:00Z",
            false,
            &[
                state::NewFile {
                    kind: FileKind::Output,
                    resource_type: "Patient",
                    url: &patient_url,
                    count: Some(patients as u64),
                },
                state::NewFile {
                    kind: FileKind::Output,
                    resource_type: "Observation",
                    url: &observation_url,
                    count: Some(observations as u64),
                },
            ],
        )
        .await
        .unwrap()
        .expect("the run was exporting");
        let file_id = |resource_type: &str| {
            files
                .iter()
                .find(|f| f.resource_type == resource_type)
                .unwrap()
                .id
        };
        let (patient_file, observation_file) = (file_id("Patient"), file_id("Observation"));
        let limits = LoadLimits {
            batch_lines: 2,
            max_line_bytes: 1 << 20,
        };

        let lines = |resource_type: &str, n: usize| -> String {
            (0..n)
                .map(|i| dataset.ndjson_line(resource_type, i) + "\n")
                .collect()
        };
        state::file_started(pool, patient_file).await.unwrap();
        let body = lines("Patient", patients);
        load_ndjson(
            pool,
            &target(run_id, patient_file, "Patient"),
            body.as_bytes(),
            limits,
        )
        .await
        .unwrap();
        state::file_loaded(pool, patient_file, body.len() as u64)
            .await
            .unwrap();

        // Half the Observations arrive, then the connection drops: the batches read so far are
        // committed and the file stays `loading`, as a download cut mid-way leaves it.
        let observations_loaded = observations / 2;
        state::file_started(pool, observation_file).await.unwrap();
        load_ndjson(
            pool,
            &target(run_id, observation_file, "Observation"),
            lines("Observation", observations_loaded).as_bytes(),
            limits,
        )
        .await
        .unwrap();
        // The second download attempt of the file, as the download's retry counter records it.
        sqlx::query("UPDATE fhir_sync.run_file SET attempts = 2 WHERE id = $1")
            .bind(observation_file)
            .execute(pool)
            .await
            .unwrap();
        RunningRun {
            run_id,
            patient_file,
            observation_file,
            patients: patients as i64,
            observations: observations as i64,
            observations_loaded: observations_loaded as i64,
        }
    }
}

fn target(run_id: i64, file_id: i64, resource_type: &str) -> FileTarget {
    FileTarget {
        run_id,
        file_id,
        source: "demo".into(),
        kind: FileKind::Output,
        resource_type: resource_type.into(),
    }
}

/// `chromium` and `chromedriver` from PATH, or a failure that says what to install.
fn browser_programs() -> (PathBuf, PathBuf) {
    let find = |name: &str| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
    };
    match (find("chromium"), find("chromedriver")) {
        (Some(chromium), Some(chromedriver)) => (chromium, chromedriver),
        (chromium, chromedriver) => panic!(
            "the status page test needs headless Chromium and its WebDriver, but {} not on PATH; \
             install Debian's packages with `apt-get install -y chromium chromium-driver` \
             (scripts/test.sh does this itself when run as root)",
            match (chromium, chromedriver) {
                (None, None) => "`chromium` and `chromedriver` are",
                (None, Some(_)) => "`chromium` is",
                _ => "`chromedriver` is",
            }
        ),
    }
}

/// chromedriver and the Chromium it starts, in a process group of their own so that every
/// process of theirs is killed when this value drops, also when an assertion fails.
struct Browser {
    client: Client,
    driver: DriverProcess,
    _profile: tempfile::TempDir,
}

struct DriverProcess {
    child: std::process::Child,
}

impl Drop for DriverProcess {
    fn drop(&mut self) {
        // The whole group: chromedriver, Chromium and Chromium's helpers. Chromium does not
        // always exit when the driver that started it dies, so killing the driver alone could
        // leave browsers behind on a CI machine.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        // In case `kill` is missing: at least the driver goes, so that `wait` cannot hang.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = profile.path().join("chromedriver.log");
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()))
        };
        let driver = DriverProcess { child };
        let url = format!("http://127.0.0.1:{port}");
        wait_until_ready(&url, &log).await;

        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Root in CI and containers: Chromium's sandbox refuses to start as root.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().join("profile").display()),
                ],
            }),
        );
        let client = Client::connect(&url, capabilities)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver could not start Chromium: {e}\n{}",
                    log_tail(&log)
                )
            });
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Ends the session (chromedriver then quits Chromium) and stops the driver.
    async fn close(self) {
        let Browser {
            client,
            driver,
            _profile,
        } = self;
        client.close().await.unwrap();
        drop(driver);
    }
}

async fn wait_until_ready(url: &str, log: &Path) {
    let deadline = Instant::now() + DRIVER_START_DEADLINE;
    loop {
        if let Ok(response) = reqwest::get(format!("{url}/status")).await
            && let Ok(status) = response.json::<serde_json::Value>().await
            && status["value"]["ready"] == json!(true)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver did not become ready within {DRIVER_START_DEADLINE:?}\n{}",
            log_tail(log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_tail(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(log) {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    listener.local_addr().unwrap().port()
}
