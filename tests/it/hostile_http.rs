//! Hostile and failing servers at the HTTP level: every body read is bounded, and every failure
//! says what failed, where, the status and the first line of what the server said.

use std::time::Duration;

use fhir_sync::config::SyncSettings;
use fhir_sync::fake::{ExpiresIn, FakeOptions, Faults};
use fhir_sync::sync::{self, error_chain};
use fhir_sync::transport::{self, HttpOptions};
use url::Url;

use crate::export_env::{ctx, env_with, faulty, retry_fast_settings, run, run_row};
use crate::helpers::TestEnv;

/// The failed run's recorded error, which `runs show`, the API and the page all show.
async fn run_error(env: &TestEnv, settings: SyncSettings) -> String {
    let failed = sync::run_job(
        &ctx(env, settings),
        &env.job,
        sync::RunOptions { full: true },
    )
    .await
    .expect_err("the run fails");
    let (status, error, _, _) = run_row(env, failed.run_id.unwrap()).await;
    assert_eq!(status, "failed");
    error.unwrap()
}

#[tokio::test]
async fn a_huge_error_body_is_cut_to_a_few_kib_with_a_note() {
    let mut body = b"the request is not acceptable\n".to_vec();
    body.extend(std::iter::repeat_n(b'x', 5 * 1024 * 1024));
    let env = env_with(
        3,
        Faults::default().kick_off_answer(400, "text/plain", body),
    )
    .await;
    let error = run_error(&env, retry_fast_settings()).await;
    assert!(error.len() < 1024, "{} bytes recorded", error.len());
    assert!(error.contains("HTTP 400"), "{error}");
    assert!(error.contains("the request is not acceptable"), "{error}");
    assert!(error.contains("bytes not read]"), "{error}");
}

#[tokio::test]
async fn a_manifest_over_the_byte_cap_fails_naming_the_setting() {
    let env = env_with(3, Faults::default().manifest_padding_bytes(200_000)).await;
    let settings = SyncSettings {
        max_manifest_bytes: 64 * 1024,
        ..retry_fast_settings()
    };
    let error = run_error(&env, settings).await;
    assert!(
        error.contains("is larger than sync.max_manifest_bytes (65536 bytes)"),
        "{error}"
    );
}

#[tokio::test]
async fn a_manifest_listing_too_many_files_fails_naming_the_setting() {
    let options = FakeOptions {
        resources_per_file: 1,
        ..faulty(Faults::default())
    };
    let mut env = TestEnv::new(3, options).await;
    env.job.export.poll_default_interval_seconds = 0.01;
    let settings = SyncSettings {
        max_manifest_files: 5,
        ..retry_fast_settings()
    };
    let error = run_error(&env, settings).await;
    assert!(
        error.contains("lists more than 5 files (sync.max_manifest_files)"),
        "{error}"
    );
    let registered: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run_file")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(
        registered, 0,
        "no file of an over-long manifest is registered"
    );
}

#[tokio::test]
async fn a_kick_off_500_names_the_endpoint_the_status_and_the_outcome() {
    let outcome = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"File generation failed"}]}"#;
    let env = env_with(
        3,
        Faults::default().kick_off_answer(500, "application/fhir+json", outcome),
    )
    .await;
    let settings = SyncSettings {
        request_attempts: 2,
        ..retry_fast_settings()
    };
    let error = run_error(&env, settings).await;
    let at = format!(
        "export kick-off at 127.0.0.1:{}/fhir/",
        env.fake.fhir_base_url().port().unwrap()
    );
    assert!(error.contains(&at), "{error}");
    assert!(
        error.contains("HTTP 500: File generation failed"),
        "{error}"
    );
}

#[tokio::test]
async fn a_401_with_an_html_body_says_the_status_and_what_the_server_said() {
    for said in ["Token expired", "Invalid token"] {
        let body = format!("<html><body><h1>{said}</h1></body></html>\n<p>more</p>");
        let env = env_with(3, Faults::default().kick_off_answer(401, "text/html", body)).await;
        let error = run_error(&env, retry_fast_settings()).await;
        assert!(error.contains("HTTP 401"), "{error}");
        assert!(error.contains(said), "{error}");
        assert!(!error.contains("more"), "only the first line: {error}");
    }
}

#[tokio::test]
async fn an_expiring_file_link_names_the_status_and_what_the_server_said() {
    let env = env_with(3, Faults::default().expire_files(1000)).await;
    let error = run(&env).await.expect_err("the links keep expiring");
    let (_, error_text, _, _) = run_row(&env, error.run_id.unwrap()).await;
    let error_text = error_text.unwrap();
    assert!(error_text.contains("kept expiring"), "{error_text}");
    assert!(error_text.contains("HTTP 410"), "{error_text}");
    assert!(
        error_text.contains("this file link has expired"),
        "the server's own text: {error_text}"
    );
}

/// Discovery of `base` with a client whose reads time out after `read_timeout`.
async fn discovery_error(base: &str, read_timeout: Duration) -> String {
    let http = transport::client(HttpOptions {
        connect_timeout: Duration::from_secs(10),
        read_timeout,
        allow_insecure_http: true,
    })
    .unwrap();
    let error = fhir_sync::smart::discover(&http, &Url::parse(base).unwrap(), true, "job")
        .await
        .expect_err("discovery fails");
    error_chain(&error)
}

#[tokio::test]
async fn connection_failures_each_say_what_went_wrong_and_where() {
    // DNS: `.invalid` never resolves (RFC 6761).
    let error = discovery_error("http://no-such-host.invalid/fhir", Duration::from_secs(10)).await;
    assert!(error.contains("no-such-host.invalid:80/fhir/"), "{error}");
    assert!(error.contains("dns error"), "{error}");

    // Refused: a port that was just free.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let error = discovery_error(
        &format!("http://127.0.0.1:{port}/fhir"),
        Duration::from_secs(10),
    )
    .await;
    assert!(error.contains(&format!("127.0.0.1:{port}/fhir")), "{error}");
    assert!(
        error.to_lowercase().contains("connection refused"),
        "{error}"
    );

    // TLS: https to a server that speaks plain HTTP.
    let env = env_with(1, Faults::default()).await;
    let mut base = env.fake.fhir_base_url();
    base.set_scheme("https").unwrap();
    let error = discovery_error(base.as_str(), Duration::from_secs(10)).await;
    assert!(error.contains("cannot connect"), "{error}");
    assert!(
        error.to_lowercase().contains("tls") || error.contains("corrupt message"),
        "{error}"
    );

    // Timeout: a server that accepts the connection and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let error = discovery_error(
        &format!("http://127.0.0.1:{port}/fhir"),
        Duration::from_millis(200),
    )
    .await;
    holder.abort();
    assert!(error.contains(&format!("127.0.0.1:{port}/fhir")), "{error}");
    assert!(error.contains("timed out"), "{error}");
}

/// `expires_in: 1e300` once made `fhir-sync check` exit 101 (a panic computing the deadline);
/// an absurd lifetime is clamped to a day and the run goes on.
#[tokio::test]
async fn an_absurd_expires_in_is_clamped_not_a_panic() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            expires_in: ExpiresIn::Absurd,
            ..TestEnv::fast()
        },
    )
    .await;
    let report = env
        .run()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(report.resources_loaded() > 0);
}

fn http() -> reqwest::Client {
    transport::client(HttpOptions {
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(10),
        allow_insecure_http: false,
    })
    .unwrap()
}

#[tokio::test]
async fn credentials_go_only_to_the_fhir_origin_or_a_pinned_token_endpoint() {
    let foreign = "http://127.0.0.2:9/oauth/token";
    let mut env = env_with(3, Faults::default().advertised_token_endpoint(foreign)).await;
    let error = fhir_sync::smart::prepare(&http(), &env.job)
        .await
        .err()
        .expect("a foreign token endpoint is refused");
    assert!(!error.is_retryable());
    let text = error_chain(&error);
    assert!(text.contains("not on the FHIR server's origin"), "{text}");
    assert!(
        text.contains(&format!(
            "pin it in the job file: fhir.token_url = \"{foreign}\""
        )),
        "{text}"
    );
    assert!(env.fake.token_attempts().is_empty());
    // Pinned in the job, the same endpoint is the operator's choice.
    env.job.fhir.token_url = Some(Url::parse(foreign).unwrap());
    let prepared = fhir_sync::smart::prepare(&http(), &env.job)
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(prepared.token_url, Some(Url::parse(foreign).unwrap()));
}

#[tokio::test]
async fn a_token_request_never_follows_a_redirect() {
    let env = env_with(3, Faults::default().token_redirects(1)).await;
    let failed = run(&env)
        .await
        .expect_err("a redirected token request fails");
    let (_, error, _, _) = run_row(&env, failed.run_id.unwrap()).await;
    let error = error.unwrap();
    assert!(error.contains("HTTP 307"), "{error}");
    assert!(
        env.fake.token_attempts().is_empty(),
        "the assertion was not re-sent to the redirect's target"
    );
}

/// A manifest pointing at another service on this machine (PostgreSQL's port) is refused
/// before any connection: plain http off the FHIR origin needs the origin listed.
#[tokio::test]
async fn a_manifest_cannot_point_fhir_sync_at_another_local_service() {
    let db_port = 5432;
    let target = format!("http://127.0.0.1:{db_port}/");
    let env = env_with(3, Faults::default().foreign_file("Patient", &target)).await;
    let failed = run(&env).await.expect_err("the foreign file is refused");
    let (_, error, retryable, _) = run_row(&env, failed.run_id.unwrap()).await;
    let error = error.unwrap();
    assert_eq!(retryable, Some(false));
    assert!(error.contains("127.0.0.1:5432"), "{error}");
    assert!(error.contains("fhir.file_origins"), "{error}");
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.rejected_line")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(rejected, 0, "nothing was read from the other service");
}

#[test]
fn a_private_key_others_can_read_is_refused_and_generate_force_writes_0600() {
    use fhir_sync::config::KeySource;
    use fhir_sync::smart::{SigningAlgorithm, SigningKey};
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.pem");
    let pem = fhir_sync::smart::generate(SigningAlgorithm::RS384).unwrap();
    std::fs::write(&path, secrecy::ExposeSecret::expose_secret(&pem)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let source = KeySource::File(path.clone());
    let error = SigningKey::load(&source, SigningAlgorithm::RS384, None)
        .expect_err("a world-readable key is refused");
    let text = error.to_string();
    assert!(text.contains("mode 644"), "{text}");
    assert!(
        text.contains(&format!("chmod 600 {}", path.display())),
        "{text}"
    );

    // `keys generate --force` over that file leaves it private, and then it loads.
    fhir_sync::app::keys_generate(SigningAlgorithm::RS384, &path, None, true).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    SigningKey::load(&source, SigningAlgorithm::RS384, None).unwrap();
}

/// Server text reaches the run record on one line, `runs show` without escape sequences, and a
/// Slack webhook without working mentions or links.
#[tokio::test]
async fn server_text_cannot_forge_log_lines_drive_a_terminal_or_ping_a_channel() {
    let diagnostics = "\u{1b}[2J\u{1b}]0;owned\u{7}<!channel> see <https://evil.example|the docs>\nINFO forged log line";
    let outcome = serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "error", "code": "invalid", "diagnostics": diagnostics }],
    })
    .to_string();
    let env = env_with(
        3,
        Faults::default().kick_off_answer(400, "application/fhir+json", outcome),
    )
    .await;
    let error = run_error(&env, retry_fast_settings()).await;
    assert!(
        !error.contains('\n') && !error.contains('\u{1b}'),
        "{error:?}"
    );
    assert!(
        error.contains("<!channel>"),
        "the record keeps the text: {error}"
    );

    let run_id: i64 = sqlx::query_scalar("SELECT max(id) FROM fhir_sync.run")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    let detail = fhir_sync::ops::report::run_detail(&env.db.pool, run_id)
        .await
        .unwrap()
        .unwrap();
    let mut shown = Vec::new();
    fhir_sync::ops::console::write_run_detail(&mut shown, &detail, time::OffsetDateTime::now_utc())
        .unwrap();
    let shown = String::from_utf8(shown).unwrap();
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
        "{shown:?}"
    );

    let alert = fhir_sync::ops::alert::Alert::run_failed(
        "demo",
        run_id,
        &error,
        false,
        time::OffsetDateTime::now_utc(),
        None,
    );
    let payload = serde_json::to_value(&alert).unwrap();
    let text = payload["text"].as_str().unwrap();
    assert!(text.contains("&lt;!channel&gt;"), "{text}");
    assert!(
        text.contains("&lt;https://evil.example|the docs&gt;"),
        "{text}"
    );
    assert!(!text.contains("<!channel>"), "{text}");
}

/// An ops server for `env`'s job with `ops` settings, on 127.0.0.1:0; its base URL.
async fn ops_server(
    env: &TestEnv,
    ops: fhir_sync::config::OpsSettings,
) -> (String, tokio_util::sync::CancellationToken) {
    use std::sync::Arc;
    let settings = fhir_sync::config::Settings {
        queue: crate::helpers::queue_settings(),
        ops,
        ..fhir_sync::config::Settings::default()
    };
    let steps = fhir_sync::sync::SyncContext::new(
        env.db.pool.clone(),
        crate::helpers::sync_settings(),
        crate::helpers::queue_settings(),
        vec![env.job.clone()],
    );
    let state = fhir_sync::ops::http::OpsState {
        steps,
        settings: Arc::new(settings),
        jwks: Arc::new(fhir_sync::ops::http::jwks_of(&[Arc::new(env.job.clone())]).unwrap()),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (addr, _task) = fhir_sync::ops::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        fhir_sync::ops::http::router(state),
        shutdown.clone(),
    )
    .await
    .unwrap();
    (format!("http://{addr}"), shutdown)
}

async fn runs(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run")
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_cross_site_form_post_cannot_start_a_run() {
    let env = env_with(3, Faults::default()).await;
    let (base, shutdown) = ops_server(&env, fhir_sync::config::OpsSettings::default()).await;
    let http = reqwest::Client::new();
    let url = format!("{base}/api/v1/jobs/demo/run");
    for (name, value) in [
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let response = http
            .post(&url)
            .header(name, value)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("full=true")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{name}: {value}");
    }
    assert_eq!(runs(&env).await, 0, "no cross-site request started a run");
    // The same request from the server's own page, or from curl, goes through.
    let own = base.clone();
    let response = http.post(&url).header("origin", own).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(runs(&env).await, 1);
    shutdown.cancel();
}

#[tokio::test]
async fn a_server_bound_beyond_loopback_answers_only_its_own_host_names() {
    let env = env_with(3, Faults::default()).await;
    let ops = fhir_sync::config::OpsSettings {
        listen: "0.0.0.0:8080".parse().unwrap(),
        allowed_hosts: vec!["ops.example.org".into()],
        ..fhir_sync::config::OpsSettings::default()
    };
    let (base, shutdown) = ops_server(&env, ops).await;
    let http = reqwest::Client::new();
    let status = |host: &'static str| {
        let request = http.get(format!("{base}/healthz")).header("host", host);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("evil.example").await, 421, "a rebinding page's name");
    assert_eq!(status("ops.example.org").await, 200);
    assert_eq!(status("ops.example.org:8080").await, 200);
    assert_eq!(status("10.0.0.5:8080").await, 200, "an IP address");
    shutdown.cancel();
}

/// Through a real client and the system resolver: `localhost` resolves to loopback on any
/// machine, and a job whose FHIR server is elsewhere must not connect there by name.
#[tokio::test]
async fn the_jobs_client_does_not_connect_to_a_name_that_resolves_to_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let options = HttpOptions {
        connect_timeout: Duration::from_secs(30),
        read_timeout: Duration::from_secs(30),
        allow_insecure_http: false,
    };
    let base = Url::parse("https://ehr.example.org/fhir").unwrap();
    let client =
        transport::client_for(options, transport::OriginPolicy::for_job(&base, &[])).unwrap();
    let error = client
        .get(format!("http://localhost:{port}/file.ndjson"))
        .send()
        .await
        .unwrap_err();
    let text = transport::failure(&error);
    assert!(text.contains("resolves only to loopback"), "{text}");
    // The same name through a client of a job that lists the origin connects.
    let listed = Url::parse(&format!("http://localhost:{port}")).unwrap();
    let client =
        transport::client_for(options, transport::OriginPolicy::for_job(&base, &[listed])).unwrap();
    let answer = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 1024];
        let _ = socket.read(&mut request).await.unwrap();
        socket
            .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
    });
    let response = client
        .get(format!("http://localhost:{port}/file.ndjson"))
        .send()
        .await
        .expect("a listed origin is connected to");
    assert_eq!(response.status().as_u16(), 204);
    answer.await.unwrap();
}
