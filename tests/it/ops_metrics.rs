//! `/metrics`: counters recorded during real syncs against the fake server (429s, a revoked
//! token, expiring tokens, a failed run), loader counts, and the gauges read from the database
//! at scrape time, all scraped through the ops router.
//!
//! The recorder is global to the test binary and tests run in parallel, so every test gives
//! its job a name of its own and asserts only on series with that `job` label.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use fhir_sync::config::JobConfig;
use fhir_sync::fake::{FakeOptions, Faults};
use fhir_sync::metrics;
use fhir_sync::ops::http::{OpsState, router, serve};
use fhir_sync::sync::{self, Step, SyncContext, Trigger};
use fhir_sync::warehouse::{FileKind, FileTarget, LoadLimits, load_ndjson};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestDb, TestEnv, run_with_files};

/// One sample of the text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format (comments skipped, label values unescaped).
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                (name.to_string(), parse_labels(body))
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label {key} is quoted");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => panic!("dangling escape"),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

/// The scrape, parsed.
struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    /// The sum of the samples of `name` carrying every label in `labels`; `None` when no
    /// sample matches.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like [`Scrape::get`], 0 when absent (a counter never incremented has no series).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Every sample of `name` for `job`, keyed by its other labels.
    fn series(&self, name: &str, job: &str) -> BTreeMap<Vec<(String, String)>, f64> {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.labels.get("job").map(String::as_str) == Some(job))
            .map(|s| {
                let key = s
                    .labels
                    .iter()
                    .filter(|(k, _)| k.as_str() != "job")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (key, s.value)
            })
            .collect()
    }
}

/// Scrapes `/metrics` from the ops router serving `pool` with `jobs` configured.
async fn scrape(pool: &PgPool, jobs: Vec<JobConfig>) -> (u16, String, String) {
    let state = OpsState {
        steps: SyncContext::new(pool.clone(), Default::default(), Default::default(), jobs),
        settings: Arc::new(Default::default()),
        jwks: Arc::new(jsonwebtoken::jwk::JwkSet { keys: Vec::new() }),
    };
    let shutdown = CancellationToken::new();
    let (addr, server) = serve(
        "127.0.0.1:0".parse().unwrap(),
        router(state),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    let body = response.text().await.unwrap();
    shutdown.cancel();
    server.await.unwrap();
    (status, content_type, body)
}

async fn scrape_ok(pool: &PgPool, jobs: Vec<JobConfig>) -> Scrape {
    let (status, content_type, body) = scrape(pool, jobs).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_no_unbounded_labels(&body);
    Scrape {
        samples: parse(&body),
    }
}

/// No label may hold a URL, a path or an id: those grow without bound and may carry
/// credentials. Numbers are allowed only as histogram bounds and as the 429 outcome.
fn assert_no_unbounded_labels(body: &str) {
    let outcomes = ["2xx", "3xx", "4xx", "429", "5xx", "network_error", "other"];
    for sample in parse(body) {
        for (key, value) in &sample.labels {
            let where_ = format!("{} {key}={value:?}", sample.name);
            assert!(
                !["run", "run_id", "file", "file_id", "url", "id"].contains(&key.as_str()),
                "{where_}"
            );
            assert!(
                !value.contains("://") && !value.contains('/') && !value.contains('?'),
                "a URL-like label value: {where_}"
            );
            match key.as_str() {
                "le" | "quantile" => {}
                "outcome" if sample.name == "fhir_sync_http_requests_total" => {
                    assert!(outcomes.contains(&value.as_str()), "{where_}")
                }
                _ => assert!(
                    value.is_empty() || !value.chars().all(|c| c.is_ascii_digit()),
                    "an id-like label value: {where_}"
                ),
            }
        }
    }
}

/// A test environment whose job has a name no other test uses.
async fn env_with(patients: usize, options: FakeOptions) -> TestEnv {
    metrics::install();
    let mut env = TestEnv::new(patients, options).await;
    env.job.name = format!(
        "metrics_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    env
}

/// What the fake server answered, as (endpoint kind, outcome) → requests.
fn served(env: &TestEnv) -> BTreeMap<(String, String), f64> {
    let mut counts = BTreeMap::new();
    for request in env.fake.requests() {
        let endpoint =
            if request.path.contains("/.well-known/") || request.path.ends_with("/metadata") {
                "discovery"
            } else if request.path.ends_with("/auth/token") {
                "token"
            } else if request.path.contains("$export") {
                "kickoff"
            } else if request.path.contains("/bulkstatus/") && request.method == "DELETE" {
                "delete"
            } else if request.path.contains("/bulkstatus/") {
                "status"
            } else if request.path.contains("/bulkfiles/") {
                "file"
            } else {
                panic!("unexpected request to {}", request.path)
            };
        let outcome = metrics::http_outcome(Some(request.status));
        *counts
            .entry((endpoint.to_string(), outcome.to_string()))
            .or_insert(0.0) += 1.0;
    }
    counts
}

/// The client's request counts for `job`, in the shape of [`served`].
fn requested(scrape: &Scrape, job: &str) -> BTreeMap<(String, String), f64> {
    scrape
        .series("fhir_sync_http_requests_total", job)
        .into_iter()
        .map(|(labels, value)| {
            let labels: HashMap<String, String> = labels.into_iter().collect();
            (
                (labels["endpoint"].clone(), labels["outcome"].clone()),
                value,
            )
        })
        .collect()
}

fn served_count(env: &TestEnv, endpoint: &str, status: u16) -> f64 {
    env.fake
        .requests()
        .iter()
        .filter(|r| r.status == status)
        .filter(|r| match endpoint {
            "status" => r.path.contains("/bulkstatus/") && r.method == "GET",
            "file" => r.path.contains("/bulkfiles/"),
            "kickoff" => r.path.contains("$export"),
            other => panic!("{other}"),
        })
        .count() as f64
}

fn epoch(at: time::OffsetDateTime) -> f64 {
    at.unix_timestamp_nanos() as f64 / 1e9
}

#[tokio::test]
async fn a_sync_through_429s_and_a_revoked_token_is_counted_per_job() {
    let env = env_with(
        20,
        FakeOptions {
            // Kick-off and the first status poll use the first token; the next request finds
            // it revoked.
            revoke_tokens_after_requests: Some(2),
            faults: Faults::default().status_429(1).file_429(1),
            ..TestEnv::fast()
        },
    )
    .await;
    let job = env.job.name.clone();
    let report = env.run().await.expect("the run rides out the faults");
    let m = scrape_ok(&env.db.pool, vec![env.job.clone()]).await;
    let j = job.as_str();

    assert_eq!(m.count("fhir_sync_runs_started_total", &[("job", j)]), 1.0);
    assert_eq!(
        m.series("fhir_sync_runs_finished_total", j),
        BTreeMap::from([(vec![("status".into(), "succeeded".into())], 1.0)])
    );
    assert_eq!(
        m.count(
            "fhir_sync_run_duration_seconds_count",
            &[("job", j), ("status", "succeeded")]
        ),
        1.0
    );
    let duration = m.count(
        "fhir_sync_run_duration_seconds_sum",
        &[("job", j), ("status", "succeeded")],
    );
    assert!(duration > 0.0 && duration < 600.0, "{duration}");

    // Every request the server answered was counted once, by endpoint and outcome, and only
    // under this job.
    let served = served(&env);
    assert_eq!(requested(&m, j), served);
    assert_eq!(served[&("status".to_string(), "429".to_string())], 1.0);
    assert_eq!(served[&("file".to_string(), "429".to_string())], 1.0);
    assert!(served.contains_key(&("delete".to_string(), "2xx".to_string())));
    assert!(
        m.count(
            "fhir_sync_http_request_duration_seconds_count",
            &[("job", j)]
        ) == served.values().sum::<f64>()
    );

    // One retry per 429 and per 401 (the request is repeated with the renewed token).
    for endpoint in ["kickoff", "status", "file"] {
        let expected = served_count(&env, endpoint, 429) + served_count(&env, endpoint, 401);
        assert_eq!(
            m.count(
                "fhir_sync_http_retries_total",
                &[("job", j), ("endpoint", endpoint)]
            ),
            expected,
            "retries of {endpoint}"
        );
    }
    let unauthorized: f64 = ["kickoff", "status", "file"]
        .iter()
        .map(|e| served_count(&env, e, 401))
        .sum();
    assert!(unauthorized >= 1.0, "the revoked token was used");

    // The first token, then one renewal after the 401s however many requests saw them.
    assert_eq!(
        m.series("fhir_sync_token_requests_total", j),
        BTreeMap::from([
            (
                vec![
                    ("outcome".into(), "succeeded".into()),
                    ("reason".into(), "initial".into())
                ],
                1.0
            ),
            (
                vec![
                    ("outcome".into(), "succeeded".into()),
                    ("reason".into(), "renew_after_401".into())
                ],
                1.0
            ),
        ])
    );
    assert_eq!(env.fake.token_attempts().len(), 2);

    // Loaded resources per type agree with the warehouse, and bytes with the file records.
    let per_type: Vec<(String, i64)> = sqlx::query_as(
        "SELECT resource_type, count(*) FROM fhir_sync.resource WHERE source = $1 GROUP BY 1",
    )
    .bind(j)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert!(per_type.len() >= 3, "{per_type:?}");
    for (resource_type, rows) in &per_type {
        assert_eq!(
            m.count(
                "fhir_sync_resources_loaded_total",
                &[("job", j), ("resource_type", resource_type)]
            ),
            *rows as f64,
            "{resource_type}"
        );
    }
    assert_eq!(
        m.count("fhir_sync_resources_loaded_total", &[("job", j)]),
        report.resources_loaded() as f64
    );
    assert_eq!(m.get("fhir_sync_lines_rejected_total", &[("job", j)]), None);
    assert_eq!(
        m.count("fhir_sync_download_bytes_total", &[("job", j)]),
        report.bytes as f64
    );
    assert!(report.bytes > 0);

    // Database gauges: nothing left running, the success and the watermark as recorded.
    let active = m.series("fhir_sync_runs_active", j);
    assert_eq!(active.len(), 5, "{active:?}");
    assert!(active.values().all(|v| *v == 0.0), "{active:?}");
    let (finished_at, transaction_time): (time::OffsetDateTime, String) =
        sqlx::query_as("SELECT finished_at, transaction_time FROM fhir_sync.run WHERE id = $1")
            .bind(report.run_id)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    let last = m
        .get("fhir_sync_last_success_timestamp_seconds", &[("job", j)])
        .unwrap();
    assert!((last - epoch(finished_at)).abs() < 0.001, "{last}");
    let since = m
        .get("fhir_sync_seconds_since_last_success", &[("job", j)])
        .unwrap();
    assert!((0.0..600.0).contains(&since), "{since}");
    let watermark = m
        .get("fhir_sync_watermark_timestamp_seconds", &[("job", j)])
        .unwrap();
    let expected = fhir_sync::fhir::parse_instant(&transaction_time).unwrap();
    assert!((watermark - epoch(expected)).abs() < 0.001);
    assert_eq!(m.get("fhir_sync_database_up", &[]), Some(1.0));
}

#[tokio::test]
async fn tokens_near_their_expiry_are_renewed_and_counted_as_refreshes() {
    // One-second tokens and one-second waits between polls: each poll finds the token within
    // its renewal margin, so it is refreshed before use (no 401 needed).
    let env = env_with(
        5,
        FakeOptions {
            token_lifetime_seconds: 1,
            retry_after_seconds: 1,
            polls_before_ready: 2,
            ..TestEnv::fast()
        },
    )
    .await;
    let j = env.job.name.clone();
    env.run().await.expect("the run survives expiring tokens");
    let m = scrape_ok(&env.db.pool, vec![env.job.clone()]).await;
    let tokens = m.series("fhir_sync_token_requests_total", &j);
    let get = |reason: &str| {
        tokens
            .get(&vec![
                ("outcome".to_string(), "succeeded".to_string()),
                ("reason".to_string(), reason.to_string()),
            ])
            .copied()
            .unwrap_or(0.0)
    };
    assert_eq!(get("initial"), 1.0);
    assert!(get("refresh") >= 1.0, "{tokens:?}");
    assert_eq!(
        tokens.values().sum::<f64>(),
        env.fake.token_attempts().len() as f64,
        "one token request per token the server issued"
    );
    assert_eq!(
        m.count(
            "fhir_sync_http_requests_total",
            &[("job", &j), ("endpoint", "token"), ("outcome", "2xx")]
        ),
        env.fake.token_attempts().len() as f64
    );
    assert_eq!(requested(&m, &j), served(&env));
}

#[tokio::test]
async fn a_failed_run_is_counted_and_the_alert_number_counts_from_its_first_run() {
    let env = env_with(
        5,
        FakeOptions {
            faults: Faults::default().status_fatal("the export worker ran out of disk"),
            ..TestEnv::fast()
        },
    )
    .await;
    let j = env.job.name.clone();
    let failed = env.run().await.expect_err("a fatal status fails the run");
    let run_id = failed.run_id.unwrap();
    let m = scrape_ok(&env.db.pool, vec![env.job.clone()]).await;

    assert_eq!(m.count("fhir_sync_runs_started_total", &[("job", &j)]), 1.0);
    assert_eq!(
        m.series("fhir_sync_runs_finished_total", &j),
        BTreeMap::from([(vec![("status".into(), "failed".into())], 1.0)])
    );
    assert_eq!(
        m.count(
            "fhir_sync_run_duration_seconds_count",
            &[("job", &j), ("status", "failed")]
        ),
        1.0
    );
    assert_eq!(requested(&m, &j), served(&env));
    assert_eq!(
        m.count(
            "fhir_sync_http_requests_total",
            &[("job", &j), ("endpoint", "status"), ("outcome", "5xx")]
        ),
        1.0
    );
    // Nothing loaded, no success, no watermark; the alert number runs from the first run.
    assert_eq!(
        m.get("fhir_sync_resources_loaded_total", &[("job", &j)]),
        None
    );
    assert_eq!(
        m.get("fhir_sync_last_success_timestamp_seconds", &[("job", &j)]),
        None
    );
    assert_eq!(
        m.get("fhir_sync_watermark_timestamp_seconds", &[("job", &j)]),
        None
    );
    let (age,): (f64,) = sqlx::query_as(
        "SELECT extract(epoch FROM now() - started_at)::float8 FROM fhir_sync.run WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    let since = m
        .get("fhir_sync_seconds_since_last_success", &[("job", &j)])
        .unwrap();
    // The scrape came before the age was read, so it saw a little less.
    assert!(
        since <= age + 0.001 && since >= age - 60.0,
        "{since} vs {age}"
    );
    let active = m.series("fhir_sync_runs_active", &j);
    assert!(active.values().all(|v| *v == 0.0), "{active:?}");
}

#[tokio::test]
async fn queue_depth_oldest_step_and_active_runs_are_read_from_the_database() {
    let env = env_with(1, TestEnv::fast()).await;
    let j = env.job.name.clone();
    // Nothing runs yet: the metrics of an idle database.
    let m = scrape_ok(&env.db.pool, vec![env.job.clone()]).await;
    for state in ["scheduled", "pending", "queued", "running"] {
        assert_eq!(
            m.get("fhir_sync_queue_depth", &[("state", state)]),
            Some(0.0),
            "{state}"
        );
    }
    assert_eq!(m.get("fhir_sync_queue_oldest_age_seconds", &[]), Some(0.0));
    assert_eq!(
        m.get("fhir_sync_seconds_since_last_success", &[("job", &j)]),
        None,
        "a job that never ran has no age"
    );

    // A queued run with no worker: its kick-off is due, and a poll is queued for later.
    let steps = SyncContext::new(
        env.db.pool.clone(),
        Default::default(),
        Default::default(),
        vec![env.job.clone()],
    );
    let run_id = sync::enqueue_run(&steps, &env.job, Trigger::Manual, None, false)
        .await
        .unwrap()
        .unwrap();
    steps
        .push(
            Step::Poll {
                run_id,
                seq: 1,
                errors: 0,
            },
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    // The kick-off became due 90 s ago and no worker took it.
    sqlx::query(
        "UPDATE apalis.jobs SET run_at = now() - interval '90 seconds'
         WHERE status = 'Pending' AND run_at <= now()",
    )
    .execute(&env.db.pool)
    .await
    .unwrap();

    let m = scrape_ok(&env.db.pool, vec![env.job.clone()]).await;
    assert_eq!(
        m.get("fhir_sync_queue_depth", &[("state", "pending")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("fhir_sync_queue_depth", &[("state", "scheduled")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("fhir_sync_queue_depth", &[("state", "running")]),
        Some(0.0)
    );
    let oldest = m.get("fhir_sync_queue_oldest_age_seconds", &[]).unwrap();
    assert!((90.0..150.0).contains(&oldest), "{oldest}");
    assert_eq!(
        m.get(
            "fhir_sync_runs_active",
            &[("job", &j), ("status", "queued")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "fhir_sync_runs_active",
            &[("job", &j), ("status", "exporting")]
        ),
        Some(0.0)
    );
    assert_eq!(m.count("fhir_sync_runs_started_total", &[("job", &j)]), 1.0);
    let since = m
        .get("fhir_sync_seconds_since_last_success", &[("job", &j)])
        .unwrap();
    assert!((0.0..60.0).contains(&since), "{since}");

    // Cancelling ends the run once, however often it is asked.
    assert!(
        fhir_sync::warehouse::runs::cancel(&env.db.pool, run_id)
            .await
            .unwrap()
    );
    assert!(
        !fhir_sync::warehouse::runs::cancel(&env.db.pool, run_id)
            .await
            .unwrap()
    );
    let m = scrape_ok(&env.db.pool, vec![env.job.clone()]).await;
    assert_eq!(
        m.series("fhir_sync_runs_finished_total", &j),
        BTreeMap::from([(vec![("status".into(), "cancelled".into())], 1.0)])
    );
    assert_eq!(
        m.get(
            "fhir_sync_runs_active",
            &[("job", &j), ("status", "queued")]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn rejected_lines_and_deletions_are_counted_per_job_and_type() {
    metrics::install();
    let db = TestDb::new().await;
    let job = format!(
        "metrics_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let (run_id, files) = run_with_files(
        &db.pool,
        &job,
        "2024-06-01T00:00:00Z",
        &[
            (FileKind::Output, "Patient", None),
            (FileKind::Deleted, "Bundle", None),
        ],
    )
    .await;
    let target = |i: usize, kind, resource_type: &str| FileTarget {
        kind,
        resource_type: resource_type.into(),
        ..files[i].clone()
    };
    let limits = LoadLimits {
        batch_lines: 2,
        max_line_bytes: 4096,
    };
    let patient = |id: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"{id}","meta":{{"lastUpdated":"2024-01-01T00:00:00Z"}}}}"#
        )
    };
    let output = [
        patient("a"),
        "{not json".to_string(),
        patient("b"),
        r#"{"resourceType":"Observation","id":"o1"}"#.to_string(),
        patient("c"),
    ]
    .join("\n");
    load_ndjson(
        &db.pool,
        &target(0, FileKind::Output, "Patient"),
        output.as_bytes(),
        limits,
    )
    .await
    .unwrap();
    let deletions = [
        r#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":"Patient/a"}},{"request":{"method":"DELETE","url":"Observation/x"}}]}"#,
        r#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":"Patient/b"}}]}"#,
        r#"{"resourceType":"Bundle","entry":[{"request":{"method":"GET","url":"Patient/c"}}]}"#,
    ]
    .join("\n");
    load_ndjson(
        &db.pool,
        &target(1, FileKind::Deleted, "Bundle"),
        deletions.as_bytes(),
        limits,
    )
    .await
    .unwrap();

    let m = scrape_ok(&db.pool, Vec::new()).await;
    assert_eq!(
        m.series("fhir_sync_resources_loaded_total", &job),
        BTreeMap::from([(vec![("resource_type".into(), "Patient".into())], 3.0)])
    );
    assert_eq!(
        m.series("fhir_sync_lines_rejected_total", &job),
        BTreeMap::from([
            (vec![("resource_type".into(), "Bundle".into())], 1.0),
            (vec![("resource_type".into(), "Patient".into())], 2.0),
        ])
    );
    assert_eq!(
        m.series("fhir_sync_deletes_applied_total", &job),
        BTreeMap::from([
            (vec![("resource_type".into(), "Observation".into())], 1.0),
            (vec![("resource_type".into(), "Patient".into())], 2.0),
        ])
    );
    // The counts agree with what the warehouse recorded.
    let (loaded, rejected): (i64, i64) = sqlx::query_as(
        "SELECT (sum(resources_loaded) FILTER (WHERE kind = 'output'))::bigint, sum(lines_rejected)::bigint
         FROM fhir_sync.run_file WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((loaded, rejected), (3, 3));
}

#[tokio::test]
async fn without_a_database_the_scrape_still_answers_with_database_up_0() {
    metrics::install();
    let db = TestDb::new().await;
    let job = format!(
        "metrics_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    metrics::run_started(&job);
    let pool = db.pool.clone();
    pool.close().await;
    let (status, _, body) = scrape(&pool, Vec::new()).await;
    assert_eq!(status, 200);
    assert_no_unbounded_labels(&body);
    let m = Scrape {
        samples: parse(&body),
    };
    assert_eq!(m.get("fhir_sync_database_up", &[]), Some(0.0));
    assert_eq!(
        m.get("fhir_sync_runs_started_total", &[("job", &job)]),
        Some(1.0),
        "the process's own metrics are still there"
    );
    assert_eq!(m.get("fhir_sync_queue_depth", &[]), None);
    assert!(
        !body.to_lowercase().contains("pool"),
        "no database error text"
    );
}

#[tokio::test]
async fn each_analytics_view_reports_its_state_rows_and_pending_runs() {
    let env = TestEnv::new(5, TestEnv::fast()).await;
    let views = crate::views::shipped_views();
    let ctx = env.ctx().with_views(Arc::new(views.clone()));
    sync::run_job(&ctx, &env.job, sync::RunOptions { full: true })
        .await
        .unwrap();
    // One view left behind by a refresh that did not commit: its run is still pending.
    sqlx::query(
        "UPDATE fhir_sync.view_state SET status = 'stale', pending_run_ids = '{7}' WHERE name = 'condition'",
    )
    .execute(&env.db.pool)
    .await
    .unwrap();
    let scrape = scrape_ok(&env.db.pool, vec![env.job.clone()]).await;
    for view in &views.views {
        let name = view.name.as_str();
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM sof.\"{name}\""
        )))
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
        assert_eq!(
            scrape.get("fhir_sync_view_rows", &[("view", name)]),
            Some(rows as f64),
            "{name}"
        );
        let expected = if name == "condition" {
            "stale"
        } else {
            "fresh"
        };
        for state in ["fresh", "stale", "building", "error"] {
            assert_eq!(
                scrape.get(
                    "fhir_sync_view_status",
                    &[("view", name), ("status", state)]
                ),
                Some(if state == expected { 1.0 } else { 0.0 }),
                "{name} {state}"
            );
        }
        assert_eq!(
            scrape.get("fhir_sync_view_pending_runs", &[("view", name)]),
            Some(if name == "condition" { 1.0 } else { 0.0 }),
            "{name}"
        );
        assert!(
            scrape
                .get(
                    "fhir_sync_view_refreshed_timestamp_seconds",
                    &[("view", name)]
                )
                .is_some_and(|t| t > 1.7e9),
            "{name}"
        );
    }
}
