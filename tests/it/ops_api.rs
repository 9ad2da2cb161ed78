//! The ops HTTP API (`/readyz`, `/api/v1/...`) and its token, served in-process against a
//! real database holding real runs driven through the fake FHIR server.

use std::sync::Arc;
use std::time::Duration;

use fhir_sync::config::{JobConfig, OpsSettings, Settings};
use fhir_sync::fake::{Dataset, FakeFhirServer, FakeOptions, Faults};
use fhir_sync::ops::http::{OpsState, router, serve};
use fhir_sync::smart::{self, SigningAlgorithm, SigningKey};
use fhir_sync::sync::{self, RunOptions, SyncContext};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestDb, TestEnv, eventually, queue_settings, sync_settings};

const TOKEN: &str = "test-token-0123456789abcdef";
const BROKEN_DIAGNOSTICS: &str = "the export job ran out of disk";

/// An ops server on 127.0.0.1:0 in this process, stopped when dropped.
struct Ops {
    base: String,
    steps: Arc<SyncContext>,
    shutdown: CancellationToken,
    http: reqwest::Client,
}

impl Ops {
    async fn start(pool: sqlx::PgPool, jobs: Vec<JobConfig>, token: Option<&str>) -> Ops {
        let settings = Settings {
            queue: queue_settings(),
            ops: OpsSettings {
                api_token: token.map(|t| SecretString::from(t.to_string())),
                ..OpsSettings::default()
            },
            ..Settings::default()
        };
        let steps = SyncContext::new(pool, sync_settings(), queue_settings(), jobs.clone());
        let jobs: Vec<_> = jobs.into_iter().map(Arc::new).collect();
        let state = OpsState {
            steps: steps.clone(),
            settings: Arc::new(settings),
            jwks: Arc::new(fhir_sync::ops::http::jwks_of(&jobs).unwrap()),
        };
        let shutdown = CancellationToken::new();
        let (addr, _task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            router(state),
            shutdown.clone(),
        )
        .await
        .unwrap();
        Ops {
            base: format!("http://{addr}"),
            steps,
            shutdown,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET with the test token (ignored by a server without one); status and JSON body.
    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn post(&self, path: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.json().await.unwrap())
    }

    /// Queue workers on the server's own step context, as `serve` runs them.
    fn workers(
        &self,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(sync::steps::run_workers(
            self.steps.clone(),
            stop.clone(),
            Duration::from_secs(5),
        ));
        (stop, task)
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A second fake server whose exports always fail with a fatal OperationOutcome, and the job
/// `broken` that syncs from it.
async fn broken_job() -> (FakeFhirServer, JobConfig) {
    let fake = FakeFhirServer::start(
        Dataset::new(7, 2),
        FakeOptions {
            faults: Faults::default().status_fatal(BROKEN_DIAGNOSTICS),
            ..TestEnv::fast()
        },
    )
    .await
    .unwrap();
    let pem = smart::generate(SigningAlgorithm::RS384).unwrap();
    let key = SigningKey::from_pem(&pem, SigningAlgorithm::RS384, None, "broken key").unwrap();
    fake.register_client("fhir-sync-demo", key.public_jwks());
    let mut job = fhir_sync::demo::demo_job(&fake, pem);
    job.name = "broken".into();
    job.export.poll_min_interval_seconds = 0.001;
    (fake, job)
}

/// A database with one succeeded run of `demo` and one failed run of `broken`.
struct History {
    env: TestEnv,
    _broken_fake: FakeFhirServer,
    broken: JobConfig,
    succeeded: i64,
    failed: i64,
}

async fn history() -> History {
    let env = TestEnv::new(20, TestEnv::fast()).await;
    let succeeded = env.run().await.expect("the demo run succeeds").run_id;
    let (broken_fake, broken) = broken_job().await;
    let failed = sync::run_job(&env.ctx(), &broken, RunOptions { full: true })
        .await
        .expect_err("the broken run fails")
        .run_id
        .unwrap();
    History {
        env,
        _broken_fake: broken_fake,
        broken,
        succeeded,
        failed,
    }
}

fn assert_error(body: &Value, code: &str) -> String {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(
        body["error"].as_object().unwrap().len(),
        2,
        "one error shape: {body}"
    );
    body["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_runs_and_run_detail_show_what_ran_and_why_it_failed() {
    let h = history().await;
    let ops = Ops::start(
        h.env.db.pool.clone(),
        vec![h.env.job.clone(), h.broken.clone()],
        None,
    )
    .await;
    let total = h.env.fake.dataset().total() as i64;

    let (status, body) = ops.get("/api/v1/jobs").await;
    assert_eq!(status, 200, "{body}");
    let jobs = body["jobs"].as_array().unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["broken", "demo"], "sorted by name");
    let (broken, demo) = (&jobs[0], &jobs[1]);
    assert_eq!(demo["last_run"]["id"], h.succeeded);
    assert_eq!(demo["last_run"]["status"], "succeeded");
    assert_eq!(demo["last_run"]["resources_loaded"], total);
    assert_eq!(demo["watermark"]["run_id"], h.succeeded);
    assert!(demo["last_success_at"].is_string(), "{demo}");
    assert!(demo["active_run"].is_null());
    assert_eq!(broken["last_run"]["id"], h.failed);
    assert_eq!(broken["last_run"]["status"], "failed");
    assert_eq!(broken["last_run"]["error_retryable"], false);
    assert!(
        broken["last_run"]["error"]
            .as_str()
            .unwrap()
            .contains(BROKEN_DIAGNOSTICS),
        "the server's diagnostics reach the operator: {broken}"
    );
    assert!(broken["watermark"].is_null() && broken["last_success_at"].is_null());

    let ids = |body: &Value| -> Vec<i64> {
        body["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect()
    };
    let (status, body) = ops.get("/api/v1/runs").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body), [h.failed, h.succeeded], "newest first");
    assert_eq!(
        ids(&ops.get("/api/v1/runs?job=demo").await.1),
        [h.succeeded]
    );
    assert_eq!(
        ids(&ops.get("/api/v1/runs?status=failed").await.1),
        [h.failed]
    );
    assert_eq!(
        ids(&ops.get("/api/v1/runs?job=demo&status=failed").await.1),
        Vec::<i64>::new()
    );
    assert_eq!(ids(&ops.get("/api/v1/runs?limit=1").await.1), [h.failed]);
    assert_eq!(
        ids(&ops.get("/api/v1/runs?job=&status=&limit=").await.1),
        [h.failed, h.succeeded],
        "blank form fields are no filter"
    );

    for (query, parameter) in [
        ("status=runing", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=many", "limit"),
        ("status=failed&status=succeeded", "status"),
        ("state=failed", "query"),
    ] {
        let (status, body) = ops.get(&format!("/api/v1/runs?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        let message = assert_error(&body, "invalid_parameter");
        assert!(
            message.starts_with(&format!("{parameter}: ")),
            "{query}: {message}"
        );
    }

    let (status, run) = ops.get(&format!("/api/v1/runs/{}", h.succeeded)).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["trigger"], "manual");
    assert!(run["finished_at"].is_string());
    let files = run["files"].as_array().unwrap();
    assert_eq!(files.len() as i64, run["files_loaded"].as_i64().unwrap());
    assert!(!files.is_empty());
    let mut loaded = 0;
    for file in files {
        assert_eq!(file["status"], "loaded", "{file}");
        assert!(file["bytes"].as_i64().unwrap() > 0, "{file}");
        assert!(file["attempts"].as_i64().unwrap() >= 1, "{file}");
        assert_eq!(file["lines_rejected"], 0);
        assert!(
            !file["url"].as_str().unwrap().contains('?'),
            "no query strings: {file}"
        );
        loaded += file["resources_loaded"].as_i64().unwrap();
    }
    assert_eq!(loaded, total);
    assert!(run.get("download_url").is_none());

    let (status, run) = ops.get(&format!("/api/v1/runs/{}", h.failed)).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"].as_str().unwrap().contains(BROKEN_DIAGNOSTICS),
        "{run}"
    );

    let (status, body) = ops.get("/api/v1/runs/987654").await;
    assert_eq!(status, 404);
    assert_eq!(assert_error(&body, "not_found"), "there is no run 987654");
    let (status, body) = ops.get("/api/v1/runs/latest").await;
    assert_eq!(status, 400);
    assert!(assert_error(&body, "invalid_parameter").starts_with("id: "));
    let (status, body) = ops.get("/api/v1/nothing/here").await;
    assert_eq!(status, 404);
    assert_error(&body, "not_found");
}

/// Waits, up to a deadline, until the run reaches `status`.
async fn wait_for_status(pool: &sqlx::PgPool, run_id: i64, status: &str) {
    eventually(Duration::from_secs(30), status, || async {
        let now: String = sqlx::query_scalar("SELECT status FROM fhir_sync.run WHERE id = $1")
            .bind(run_id)
            .fetch_one(pool)
            .await
            .unwrap();
        (now == status).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_through_the_api_is_queued_and_runs_to_its_end() {
    let env = TestEnv::new(5, TestEnv::fast()).await;
    let mut disabled = env.job.clone();
    disabled.name = "paused".into();
    disabled.enabled = false;
    let ops = Ops::start(env.db.pool.clone(), vec![env.job.clone(), disabled], None).await;

    let (status, headers, body) = ops.post("/api/v1/jobs/demo/run?full=true").await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_i64().unwrap();
    assert_eq!(headers["location"], format!("/api/v1/runs/{run_id}"));
    assert_eq!(body["status"], "queued");
    assert_eq!(body["full_export"], true);
    assert!(body["waits_for_run"].is_null());

    // A second request while the first is queued: queued too, behind it.
    let (status, _, second) = ops.post("/api/v1/jobs/demo/run").await;
    assert_eq!(status, 202, "{second}");
    assert_eq!(second["waits_for_run"], run_id);
    assert_eq!(second["full_export"], false);

    let (stop, workers) = ops.workers();
    let first = sync::wait_for_run(&env.db.pool, run_id).await.unwrap();
    let second_id = second["run_id"].as_i64().unwrap();
    let second_end = sync::wait_for_run(&env.db.pool, second_id).await.unwrap();
    stop.cancel();
    workers.await.unwrap().unwrap();
    assert_eq!(first.status, "succeeded", "{:?}", first.error);
    assert_eq!(second_end.status, "succeeded", "{:?}", second_end.error);
    let (_, run) = ops.get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["trigger"], "manual");
    assert_eq!(run["full_export"], true);
    assert_eq!(
        run["resources_loaded"].as_i64().unwrap() as usize,
        env.fake.dataset().total()
    );

    let (status, _, body) = ops.post("/api/v1/jobs/nope/run").await;
    assert_eq!(status, 404);
    assert_eq!(
        assert_error(&body, "not_found"),
        "there is no job named \"nope\""
    );
    let (status, _, body) = ops.post("/api/v1/jobs/paused/run").await;
    assert_eq!(status, 409);
    assert!(assert_error(&body, "job_disabled").contains("disabled"));
    let (status, _, body) = ops.post("/api/v1/jobs/demo/run?full=yes").await;
    assert_eq!(status, 400);
    assert!(assert_error(&body, "invalid_parameter").starts_with("full: "));
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 2, "refused requests create no run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_run_and_deletes_its_export_and_a_finished_run_is_a_conflict() {
    // The export never completes, so the run stays `exporting` until cancelled.
    let env = TestEnv::new(
        2,
        FakeOptions {
            polls_before_ready: u32::MAX,
            ..TestEnv::fast()
        },
    )
    .await;
    let ops = Ops::start(env.db.pool.clone(), vec![env.job.clone()], None).await;

    // A queued run that never started an export.
    let (_, _, queued) = ops.post("/api/v1/jobs/demo/run").await;
    let queued = queued["run_id"].as_i64().unwrap();
    let (status, _, body) = ops.post(&format!("/api/v1/runs/{queued}/cancel")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"run_id": queued, "status": "cancelled", "export": "never_started",
               "message": "the run had not started an export; nothing to delete"})
    );
    let (status, _, body) = ops.post(&format!("/api/v1/runs/{queued}/cancel")).await;
    assert_eq!(status, 409);
    assert!(assert_error(&body, "run_finished").contains("cancelled"));
    let (status, _, body) = ops.post("/api/v1/runs/987654/cancel").await;
    assert_eq!(status, 404);
    assert_error(&body, "not_found");

    // A run whose export is going on the server.
    let (_, _, exporting) = ops.post("/api/v1/jobs/demo/run").await;
    let exporting = exporting["run_id"].as_i64().unwrap();
    let (stop, workers) = ops.workers();
    wait_for_status(&env.db.pool, exporting, "exporting").await;
    let (status, _, body) = ops.post(&format!("/api/v1/runs/{exporting}/cancel")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["export"], "deleted");
    stop.cancel();
    workers.await.unwrap().unwrap();
    let (_, run) = ops.get(&format!("/api/v1/runs/{exporting}")).await;
    assert_eq!(run["status"], "cancelled");
    assert!(run["export_deleted_at"].is_string(), "{run}");
    let status_path = url::Url::parse(run["status_url"].as_str().unwrap())
        .unwrap()
        .path()
        .to_string();
    assert!(
        env.fake
            .requests()
            .iter()
            .any(|r| r.method == "DELETE" && r.path == status_path && r.status < 300),
        "the export was deleted on the server"
    );
}

#[tokio::test]
async fn with_a_token_every_route_but_health_readiness_and_jwks_needs_it() {
    let env = TestEnv::new(1, TestEnv::fast()).await;
    let ops = Ops::start(env.db.pool.clone(), vec![env.job.clone()], Some(TOKEN)).await;
    let http = reqwest::Client::new();

    for path in [
        "/api/v1/jobs",
        "/api/v1/runs",
        "/api/v1/openapi.json",
        "/api/v1/unknown",
    ] {
        let response = http.get(ops.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path} without a token");
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer realm="fhir-sync", Basic realm="fhir-sync""#
        );
        let body: Value = response.json().await.unwrap();
        assert_error(&body, "unauthorized");
    }
    let refused = http
        .post(ops.url("/api/v1/jobs/demo/run"))
        .bearer_auth("test-token-0123456789abcdeX")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "a wrong token");
    let refused = http
        .get(ops.url("/api/v1/jobs"))
        .basic_auth("ops", Some("not-the-token-at-all"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "a wrong Basic password");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.run")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 0, "a refused request does nothing");

    let bearer = http
        .get(ops.url("/api/v1/jobs"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    let basic = http
        .get(ops.url("/api/v1/jobs"))
        .basic_auth("anyone", Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
    let body: Value = basic.json().await.unwrap();
    assert_eq!(body["jobs"][0]["name"], "demo");

    for path in ["/healthz", "/readyz", "/.well-known/jwks.json"] {
        let response = http.get(ops.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path} stays anonymous");
    }
}

#[tokio::test]
async fn readiness_needs_the_database_and_every_embedded_migration() {
    let db = TestDb::new().await;
    let ops = Ops::start(db.pool.clone(), Vec::new(), None).await;
    assert_eq!(ops.get("/readyz").await, (200, json!({"status": "ready"})));

    let versions: Vec<i64> = fhir_sync::warehouse::MIGRATOR
        .iter()
        .map(|m| m.version)
        .collect();
    let latest = *versions.last().unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = $1")
        .bind(versions[0])
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        ops.get("/readyz").await,
        (
            503,
            json!({"status": "not_ready",
                   "reason": format!("migrations applied with different contents: {}", versions[0])})
        )
    );
    let first = fhir_sync::warehouse::MIGRATOR.iter().next().unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = $2 WHERE version = $1")
        .bind(first.version)
        .bind(&first.checksum[..])
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(ops.get("/readyz").await.0, 200, "the checksum is restored");
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(versions[0])
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(latest)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        ops.get("/readyz").await,
        (
            503,
            json!({"status": "not_ready",
                   "reason": format!("migrations pending: {}, {latest}", versions[0])})
        )
    );

    let fresh = TestDb::unmigrated().await;
    let unmigrated = Ops::start(fresh.pool.clone(), Vec::new(), None).await;
    let all: Vec<String> = versions.iter().map(i64::to_string).collect();
    assert_eq!(
        unmigrated.get("/readyz").await,
        (
            503,
            json!({"status": "not_ready", "reason": format!("migrations pending: {}", all.join(", "))})
        )
    );

    let closed = sqlx::PgPool::connect(&db.url()).await.unwrap();
    let unreachable = Ops::start(closed.clone(), Vec::new(), None).await;
    closed.close().await;
    assert_eq!(
        unreachable.get("/readyz").await,
        (
            503,
            json!({"status": "not_ready", "reason": "database unreachable"})
        )
    );
}

#[tokio::test]
async fn internal_errors_are_logged_not_echoed() {
    let env = TestEnv::new(1, TestEnv::fast()).await;
    // A database that refuses the statement: the read model's table is gone.
    sqlx::query("DROP TABLE fhir_sync.watermark")
        .execute(&env.db.pool)
        .await
        .unwrap();
    let ops = Ops::start(env.db.pool.clone(), vec![env.job.clone()], None).await;
    let (status, body) = ops.get("/api/v1/jobs").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        body,
        json!({"error": {"code": "internal", "message": "internal error; see the server log"}})
    );

    // A database that cannot be reached.
    let pool = sqlx::PgPool::connect(&env.db.url()).await.unwrap();
    let closed = Ops::start(pool.clone(), vec![env.job.clone()], None).await;
    pool.close().await;
    for path in ["/api/v1/jobs", "/api/v1/runs", "/api/v1/runs/1"] {
        let response = reqwest::get(closed.url(path)).await.unwrap();
        assert_eq!(response.status(), 503, "{path}");
        let text = response.text().await.unwrap();
        for leak in ["pool", "sqlx", "closed", "relation", "watermark"] {
            assert!(
                !text.to_lowercase().contains(leak),
                "{path} leaks {leak:?}: {text}"
            );
        }
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"error": {"code": "internal", "message": "internal error; see the server log"}})
        );
    }
    let (status, _, body) = closed.post("/api/v1/jobs/demo/run").await;
    assert_eq!(status, 503, "{body}");
    assert_error(&body, "internal");
}

/// What in `value` does not match the OpenAPI schema `schema`, by a JSON Schema 2020-12
/// validator (OpenAPI 3.1's schema dialect), its `$ref`s resolved against the document's
/// components.
fn schema_errors(doc: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    // `#/components/schemas/...` points into the root of the schema document, so the schema
    // is checked as part of a document that carries the components.
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "allOf": [schema],
        "components": doc["components"],
    });
    let validator = jsonschema::draft202012::new(&root)
        .unwrap_or_else(|e| panic!("{at}: the document's schema is not valid JSON Schema: {e}"));
    validator
        .iter_errors(value)
        .map(|e| format!("{at}{}: {e}", e.instance_path()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route_and_the_real_responses() {
    let h = history().await;
    let mut disabled = h.env.job.clone();
    disabled.name = "paused".into();
    disabled.enabled = false;
    let ops = Ops::start(
        h.env.db.pool.clone(),
        vec![h.env.job.clone(), h.broken.clone(), disabled],
        Some(TOKEN),
    )
    .await;
    let (status, doc) = ops.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();

    // Every route the router serves is documented...
    for (method, path) in fhir_sync::ops::api::served_routes() {
        let operation = &paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not documented"))[method.as_str().to_lowercase()];
        assert!(operation.is_object(), "{method} {path} is not documented");
        assert!(
            operation["responses"].is_object(),
            "{method} {path}: no responses"
        );
    }
    for path in ["/healthz", "/readyz", "/.well-known/jwks.json"] {
        assert!(paths.contains_key(path), "{path} is not documented");
    }
    // ...and every documented API operation is served (a real id and job stand in for the
    // path parameters).
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().unwrap() {
            let concrete = path
                .replace("{id}", &h.succeeded.to_string())
                .replace("{name}", "paused");
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = ops
                .http
                .request(method.clone(), ops.url(&concrete))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            assert!(
                operation["responses"][status.to_string()].is_object(),
                "{method} {concrete} answered {status}, which is not documented"
            );
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_string();
            if content_type.starts_with("application/json") {
                let body: Value = response.json().await.unwrap();
                let schema = &operation["responses"][status.to_string()]["content"]["application/json"]
                    ["schema"];
                let errors = schema_errors(&doc, schema, &body, &format!("{method} {concrete}"));
                assert!(errors.is_empty(), "{errors:#?}");
            }
        }
    }

    // The GETs' bodies with everything filled in: a failed run with its error, a finished one
    // with files, jobs with last runs and a watermark.
    for (path, schema) in [
        ("/api/v1/jobs".to_string(), "JobList"),
        ("/api/v1/runs".to_string(), "RunList"),
        (format!("/api/v1/runs/{}", h.succeeded), "RunDetail"),
        (format!("/api/v1/runs/{}", h.failed), "RunDetail"),
        ("/readyz".to_string(), "Readiness"),
        ("/api/v1/runs?status=nope".to_string(), "Error"),
    ] {
        let (_, body) = ops.get(&path).await;
        let errors = schema_errors(
            &doc,
            &json!({"$ref": format!("#/components/schemas/{schema}")}),
            &body,
            &path,
        );
        assert!(errors.is_empty(), "{errors:#?}");
    }
    // The validator is not vacuous: a run without its id, and a file whose id is text, are
    // caught.
    let (_, mut run) = ops.get(&format!("/api/v1/runs/{}", h.failed)).await;
    run.as_object_mut().unwrap().remove("id");
    run["files"] = json!([{"id": "one"}]);
    let errors = schema_errors(
        &doc,
        &json!({"$ref": "#/components/schemas/RunDetail"}),
        &run,
        "run",
    );
    assert!(
        errors
            .iter()
            .any(|e| e == "run: \"id\" is a required property"),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("run/files/0/id: ")),
        "{errors:#?}"
    );
}

fn config_check(dir: &std::path::Path, token_env: Option<&str>) -> (bool, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-sync"));
    command
        .args(["config", "check", "--config-dir"])
        .arg(dir.join("config"))
        .arg("--jobs-dir")
        .arg(dir.join("jobs"))
        .env_remove("FHIR_SYNC_ENV")
        .env_remove(fhir_sync::config::OPS_API_TOKEN_ENV);
    if let Some(token) = token_env {
        command.env(fhir_sync::config::OPS_API_TOKEN_ENV, token);
    }
    let output = command.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn listening_beyond_loopback_without_a_token_is_a_configuration_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
    let settings = dir.path().join("config/default.toml");
    std::fs::write(&settings, "[ops]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
    let (ok, text) = config_check(dir.path(), None);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "{}: ops.api_token_file: required because ops.listen (0.0.0.0:8080) is not a loopback address",
            settings.display()
        )),
        "{text}"
    );

    let (ok, text) = config_check(dir.path(), Some(TOKEN));
    assert!(ok, "a token from the environment is enough: {text}");
    let (ok, text) = config_check(dir.path(), Some("short"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("FHIR_SYNC_OPS__API_TOKEN: the API token must be at least 16 characters"),
        "{text}"
    );
    assert!(
        !text.contains("short\n") && !text.contains("\"short\""),
        "{text}"
    );

    let token_file = dir.path().join("token");
    std::fs::write(
        &settings,
        format!(
            "[ops]\nlisten = \"0.0.0.0:8080\"\napi_token_file = \"{}\"\n",
            token_file.display()
        ),
    )
    .unwrap();
    let (ok, text) = config_check(dir.path(), None);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "{}: ops.api_token_file: cannot read the API token file",
            token_file.display()
        )),
        "{text}"
    );
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (ok, text) = config_check(dir.path(), None);
    assert!(ok, "{text}");

    std::fs::write(&settings, format!("[ops]\napi_token = \"{TOKEN}\"\n")).unwrap();
    let (ok, text) = config_check(dir.path(), None);
    assert!(!ok, "the token itself is not a settings-file key: {text}");
    assert!(text.contains("ops.api_token"), "{text}");
    assert!(!text.contains(TOKEN), "{text}");
}

#[tokio::test]
async fn a_cancel_whose_export_cannot_be_deleted_still_cancels_and_says_so_without_the_cause() {
    let db = TestDb::new().await;
    // A run of a job that has since lost its job file: its export cannot be deleted without
    // the job's credentials.
    let run_id = fhir_sync::warehouse::runs::create(
        &db.pool,
        "retired",
        "https://ehr.example.org/fhir",
        sync::Trigger::Manual,
        None,
        false,
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        fhir_sync::warehouse::runs::start_kick_off(&db.pool, run_id, None)
            .await
            .unwrap()
    );
    assert!(
        fhir_sync::warehouse::runs::exporting(
            &db.pool,
            run_id,
            "https://ehr.example.org/fhir/$export",
            "https://ehr.example.org/fhir/status/42?sig=secret",
        )
        .await
        .unwrap()
    );
    let ops = Ops::start(db.pool.clone(), Vec::new(), None).await;
    let (status, _, body) = ops.post(&format!("/api/v1/runs/{run_id}/cancel")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["export"], "delete_failed");
    let text = body.to_string();
    assert!(
        !text.contains("job file") && !text.contains("secret"),
        "{text}"
    );
    let (_, run) = ops.get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["status_url"], "https://ehr.example.org/fhir/status/42");
    assert!(run["export_deleted_at"].is_null(), "left for the next run");
}
