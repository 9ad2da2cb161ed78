//! Where the bearer token goes: only to the FHIR server's origin and to files whose manifest
//! says `requiresAccessToken`; never across a redirect to another origin; never to the token
//! endpoint; and no plain http except to loopback or with the job's opt-in.

use std::sync::Arc;
use std::time::Duration;

use fhir_sync::bulk::{BulkClient, ExportError, ExportRequest, ManifestFile, StatusCheck};
use fhir_sync::config::ExportLevel;
use fhir_sync::fake::FakeOptions;
use fhir_sync::smart;
use fhir_sync::sync::error_chain;
use fhir_sync::transport::{self, HttpOptions};

use crate::helpers::TestEnv;

fn http(allow_insecure_http: bool) -> reqwest::Client {
    transport::client(HttpOptions {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(30),
        allow_insecure_http,
    })
    .unwrap()
}

/// A bulk client for `env`'s job and the first output file of a finished Patient export.
async fn client_and_file(env: &TestEnv, allow_insecure_http: bool) -> (BulkClient, ManifestFile) {
    let http = http(allow_insecure_http);
    let prepared = smart::prepare(&http, &env.job).await.unwrap();
    let bulk = BulkClient::new(
        http,
        env.job.fhir.base_url.clone(),
        Arc::clone(&prepared.tokens),
        allow_insecure_http,
    );
    let kick_off = bulk
        .kick_off(&ExportRequest {
            level: ExportLevel::System,
            types: vec!["Patient".into()],
            ..ExportRequest::from_config(&env.job.export)
        })
        .await
        .unwrap();
    // The fake answers 202 a fixed number of times, then the manifest.
    let manifest = loop {
        match bulk.check_status(&kick_off.status_url).await.unwrap() {
            StatusCheck::Complete(manifest) => break manifest,
            _ => tokio::task::yield_now().await,
        }
    };
    let file = manifest.output[0].clone();
    (bulk, file)
}

#[tokio::test]
async fn a_file_on_another_origin_gets_the_token_only_when_the_manifest_requires_it() {
    let env = TestEnv::new(
        3,
        FakeOptions {
            requires_access_token: false,
            ..TestEnv::fast()
        },
    )
    .await;
    let other = env.fake.start_other_origin().await.unwrap();
    let (bulk, file) = client_and_file(&env, false).await;
    let elsewhere = ManifestFile {
        url: other.rebase(&file.url),
        ..file
    };
    let other_host = format!("127.0.0.1:{}", other.origin().port().unwrap());
    let on_other = || {
        env.fake
            .requests()
            .into_iter()
            .filter(|r| r.host.as_deref() == Some(other_host.as_str()))
            .map(|r| r.had_authorization)
            .collect::<Vec<_>>()
    };

    // Plain http on another origin (here another loopback port) is fetched only when the job
    // lists that origin, with or without the token.
    for requires_token in [false, true] {
        match bulk.open_file(&elsewhere, requires_token).await {
            Err(ExportError::Policy(message)) => {
                assert!(message.contains("fhir.file_origins"), "{message}")
            }
            other => panic!("expected a refusal, got {:?}", other.map(|r| r.status())),
        }
    }
    assert_eq!(on_other(), Vec::<bool>::new(), "nothing was sent");
    let bulk = bulk.with_file_origins(std::slice::from_ref(other.origin()));

    let response = bulk.open_file(&elsewhere, false).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(on_other(), [false], "requiresAccessToken false: no token");

    // requiresAccessToken true and the origin listed: the token goes with the request.
    bulk.open_file(&elsewhere, true).await.unwrap();
    assert_eq!(on_other(), [false, true]);
}

#[tokio::test]
async fn a_redirect_to_another_origin_drops_the_token() {
    let mut env = TestEnv::new(20, TestEnv::fast()).await;
    let other = env.fake.start_other_origin().await.unwrap();
    env.fake.redirect_files_to(&other);
    // Plain http on another loopback port: followed only because the job lists it.
    env.job.fhir.file_origins = vec![other.origin().clone()];
    let report = env
        .run()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(
        report.resources_loaded() as usize,
        env.fake.dataset().total()
    );

    let primary = format!("127.0.0.1:{}", env.fake.fhir_base_url().port().unwrap());
    let other_host = format!("127.0.0.1:{}", other.origin().port().unwrap());
    let files: Vec<_> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/bulkfiles/"))
        .collect();
    let redirected: Vec<_> = files
        .iter()
        .filter(|r| r.host.as_deref() == Some(primary.as_str()))
        .collect();
    let followed: Vec<_> = files
        .iter()
        .filter(|r| r.host.as_deref() == Some(other_host.as_str()))
        .collect();
    assert_eq!(redirected.len(), report.output_files);
    assert!(
        redirected
            .iter()
            .all(|r| r.status == 307 && r.had_authorization)
    );
    assert_eq!(followed.len(), report.output_files);
    assert!(
        followed
            .iter()
            .all(|r| r.status == 200 && !r.had_authorization),
        "the token crossed to another origin: {followed:?}"
    );
    // The token endpoint gets the assertion, never a bearer token.
    assert!(
        env.fake
            .requests()
            .iter()
            .filter(|r| r.path == "/auth/token")
            .all(|r| !r.had_authorization)
    );
}

#[tokio::test]
async fn plain_http_is_refused_except_to_loopback_or_with_the_opt_in() {
    let env = TestEnv::new(3, TestEnv::fast()).await;
    let (bulk, file) = client_and_file(&env, false).await;
    // Loopback over http is what the whole suite runs on; another host is refused before any
    // connection is made.
    let remote = ManifestFile {
        url: url::Url::parse("http://files.example.invalid/export/1.ndjson").unwrap(),
        ..file.clone()
    };
    match bulk.open_file(&remote, true).await {
        Err(ExportError::Policy(message)) => {
            assert!(
                message.contains("plain http") && message.contains("allow_insecure_http"),
                "{message}"
            )
        }
        other => panic!(
            "expected a policy refusal, got {:?}",
            other.map(|r| r.status())
        ),
    }

    // The opt-in allows plain http for the FHIR server; a file on another origin over plain
    // http needs that origin listed too.
    let (opted_in, _) = client_and_file(&env, true).await;
    match opted_in.open_file(&remote, false).await {
        Err(ExportError::Policy(message)) => {
            assert!(message.contains("fhir.file_origins"), "{message}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|r| r.status())),
    }
    // Listed, the policy lets it through (and the made-up host then fails to resolve).
    let listed =
        opted_in.with_file_origins(&[url::Url::parse("http://files.example.invalid").unwrap()]);
    if let Err(ExportError::Policy(message)) = listed.open_file(&remote, false).await {
        panic!("the listed origin was refused: {message}");
    }
}
