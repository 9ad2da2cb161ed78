//! Kick-off: the three levels, GET and POST, every parameter encoded as the spec and real
//! servers need, and how refusals and throttling are handled.

use fhir_sync::config::{ExportLevel, ExportMethod};
use fhir_sync::fake::{ALL_PATIENTS_GROUP_ID, Faults};

use crate::export_env::{assert_exactly_the_data_set, env_with, run, run_row};

#[tokio::test]
async fn every_level_kicks_off_at_its_own_endpoint() {
    let cases = [
        (ExportLevel::System, None, "/fhir/$export"),
        (ExportLevel::Patient, None, "/fhir/Patient/$export"),
        (
            ExportLevel::Group,
            Some(ALL_PATIENTS_GROUP_ID),
            "/fhir/Group/all-patients/$export",
        ),
    ];
    for (level, group, path) in cases {
        for method in [ExportMethod::Get, ExportMethod::Post] {
            let mut env = env_with(6, Faults::default()).await;
            env.job.export.level = level;
            env.job.export.group_id = group.map(str::to_string);
            env.job.export.method = method;
            let report = run(&env).await.expect("the export runs");
            assert_exactly_the_data_set(&env, report.run_id).await;
            let kick_offs = env.fake.kick_offs();
            assert_eq!(kick_offs.len(), 1);
            assert_eq!(kick_offs[0].path, path);
            let expected_method = if method == ExportMethod::Get {
                "GET"
            } else {
                "POST"
            };
            assert_eq!(kick_offs[0].method, expected_method);
            assert_eq!(
                kick_offs[0].params,
                [(
                    "_type".to_string(),
                    "Patient,Encounter,Observation,Condition".to_string()
                )],
                "{path} {method:?}: one comma-joined _type"
            );
        }
    }
}

fn every_parameter(env: &mut crate::helpers::TestEnv) {
    let export = &mut env.job.export;
    export.level = ExportLevel::Group;
    export.group_id = Some(ALL_PATIENTS_GROUP_ID.into());
    export.types = vec!["Patient".into(), "Observation".into()];
    export.since = Some("2020-01-01T02:00:00+02:00".into());
    export.until = Some("2099-01-01T00:00:00Z".into());
    export.output_format = Some("application/fhir+ndjson".into());
    export.elements = vec!["id".into(), "meta".into()];
    export.type_filters = vec![
        "Observation?status=final".into(),
        "Patient?active=true&gender=female".into(),
    ];
    export.include_associated_data = vec!["LatestProvenanceResources".into()];
    export.extra_params.insert("_mode".into(), "crawl".into());
    export.lenient = true;
}

fn expected_params() -> Vec<(String, String)> {
    [
        ("_type", "Patient,Observation"),
        ("_since", "2020-01-01T02:00:00+02:00"),
        ("_until", "2099-01-01T00:00:00Z"),
        ("_outputFormat", "application/fhir+ndjson"),
        ("_elements", "id,meta"),
        ("_typeFilter", "Observation?status=final"),
        ("_typeFilter", "Patient?active=true&gender=female"),
        ("includeAssociatedData", "LatestProvenanceResources"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[tokio::test]
async fn get_sends_every_parameter_percent_encoded() {
    let mut env = env_with(4, Faults::default()).await;
    every_parameter(&mut env);
    run(&env).await.expect("the export runs");
    let mut expected = expected_params();
    expected.push(("_mode".into(), "crawl".into()));
    // The fake decodes the query form-style, so an unencoded `+` or `&` would arrive mangled.
    assert_eq!(env.fake.kick_offs()[0].params, expected);
    let request = env
        .fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("$export"))
        .unwrap();
    let query = request.query.unwrap();
    assert!(
        query.contains("_since=2020-01-01T02%3A00%3A00%2B02%3A00"),
        "{query}"
    );
    assert!(query.contains("_type=Patient%2CObservation"), "{query}");
    assert_eq!(
        request.prefer.as_deref(),
        Some("respond-async, handling=lenient")
    );
}

#[tokio::test]
async fn post_sends_a_parameters_body_with_patients() {
    let mut env = env_with(4, Faults::default()).await;
    every_parameter(&mut env);
    env.job.export.method = ExportMethod::Post;
    let patient = env.fake.dataset().id("Patient", 0);
    env.job.export.patients = vec![format!("Patient/{patient}")];
    run(&env).await.expect("the export runs");
    let kick_off = &env.fake.kick_offs()[0];
    assert_eq!(kick_off.method, "POST");
    let mut expected = expected_params();
    expected.push(("patient".into(), format!("Patient/{patient}")));
    expected.push(("_mode".into(), "crawl".into()));
    assert_eq!(kick_off.params, expected);
    let request = env
        .fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("$export"))
        .unwrap();
    assert_eq!(request.query, None, "a POST kick-off carries no query");
}

#[tokio::test]
async fn a_refused_kick_off_fails_fatally_with_the_servers_diagnostics() {
    let mut env = env_with(2, Faults::default()).await;
    env.job.export.output_format = Some("text/csv".into());
    let failed = run(&env).await.expect_err("the server refuses text/csv");
    assert!(!failed.error.is_retryable());
    let (status, error, retryable, retries) = run_row(&env, failed.run_id.unwrap()).await;
    assert_eq!(status, "failed");
    assert_eq!(retryable, Some(false));
    let error = error.unwrap();
    assert!(error.contains("HTTP 400"), "{error}");
    assert!(
        error.contains("_outputFormat \"text/csv\" is not supported"),
        "the server's OperationOutcome diagnostics reach the run record: {error}"
    );
    assert_eq!(retries, 0, "a 4xx is not retried");
    assert_eq!(env.fake.kick_offs().len(), 1);
}

#[tokio::test]
async fn throttled_and_unavailable_kick_offs_are_retried() {
    let env = env_with(3, Faults::default().kick_off_429(2).kick_off_503(2)).await;
    let report = run(&env)
        .await
        .expect("the kick-off gets through in the end");
    assert_exactly_the_data_set(&env, report.run_id).await;
    assert_eq!(env.fake.kick_offs().len(), 5);
    let (_, _, _, retries) = run_row(&env, report.run_id).await;
    assert_eq!(retries, 4);
}

#[tokio::test]
async fn a_kick_off_failing_with_an_error_outcome_is_sent_once() {
    // A 500 whose OperationOutcome reports an error (not `transient`) is the server's answer,
    // not a hiccup: one request, the run fails with the server's text.
    let env = env_with(3, Faults::default().kick_off_500_outcome(100)).await;
    let failed = run(&env).await.expect_err("the server cannot export");
    let (status, error, retryable, retries) = run_row(&env, failed.run_id.unwrap()).await;
    assert_eq!(status, "failed");
    assert_eq!(retryable, Some(false));
    let error = error.unwrap();
    assert!(error.contains("File generation failed"), "{error}");
    assert_eq!(retries, 0);
    assert_eq!(env.fake.kick_offs().len(), 1);
}

#[tokio::test]
async fn a_kick_off_that_stays_unavailable_is_tried_request_attempts_times_in_all() {
    // Retries never multiply across layers: `sync.request_attempts` kick-offs in all, not
    // that many inside each of several step retries.
    let env = env_with(3, Faults::default().kick_off_503(1000)).await;
    let attempts = crate::export_env::retry_fast_settings().request_attempts;
    let failed = run(&env).await.expect_err("the server stays unavailable");
    let (status, _, retryable, retries) = run_row(&env, failed.run_id.unwrap()).await;
    assert_eq!(status, "failed");
    assert_eq!(retryable, Some(true), "a 503 may pass by itself");
    assert_eq!(env.fake.kick_offs().len() as u32, attempts);
    assert_eq!(retries, i64::from(attempts - 1));
}

#[tokio::test]
async fn a_jobs_own_since_is_what_the_run_records_and_reports() {
    // Without a watermark the job's `export.since` is sent; the run must say so, not "(full)".
    let mut env = env_with(3, Faults::default()).await;
    let since = "2020-01-01T00:00:00Z";
    env.job.export.since = Some(since.into());
    let report = run(&env).await.expect("the export runs");
    let sent: Vec<String> = env
        .fake
        .kick_offs()
        .into_iter()
        .flat_map(|k| k.params)
        .filter(|(name, _)| name == "_since")
        .map(|(_, value)| value)
        .collect();
    assert_eq!(sent, [since]);
    assert_eq!(report.since.as_deref(), Some(since));
    let recorded: Option<String> =
        sqlx::query_scalar("SELECT since FROM fhir_sync.run WHERE id = $1")
            .bind(report.run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(recorded.as_deref(), Some(since));
}
