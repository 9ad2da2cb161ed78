//! Analytics views against real PostgreSQL: `apply` (create, rebuild on change, prune) and the
//! incremental refresh, whose tables must equal a full rebuild after any sequence of loads,
//! deletions, failed refreshes and a refresh dropped mid-transaction.

use std::path::Path;

use fhir_sync::fake::{Dataset, RESOURCE_TYPES};
use fhir_sync::views::materialise::{self, Applied, ApplyOptions};
use fhir_sync::views::refresh::{self, Outcome};
use fhir_sync::views::{ViewSet, conformance};
use fhir_sync::warehouse::{FileKind, FileTarget, LoadLimits, load_ndjson};
use sqlx::PgPool;

use crate::helpers::TestDb;

const SOURCE: &str = "ehr";

async fn new_run(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        // The transactionTime lies past every lastUpdated these tests write (the loader rejects
        // times far past it as from the future).
        "INSERT INTO fhir_sync.run (job, source, fhir_base_url, transaction_time) VALUES ('job', $1, 'https://ehr.example.org/fhir', '2031-01-01T00:00:00Z') RETURNING id",
    )
    .bind(SOURCE)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Loads `lines` of `kind` as one file of run `run_id` through the warehouse's loader.
async fn load(pool: &PgPool, run_id: i64, kind: FileKind, resource_type: &str, lines: &[String]) {
    let file_id: i64 = sqlx::query_scalar(
        "INSERT INTO fhir_sync.run_file (run_id, kind, resource_type, url) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(run_id)
    .bind(kind.as_str())
    .bind(resource_type)
    .bind(format!("https://ehr.example.org/{run_id}/{resource_type}.ndjson"))
    .fetch_one(pool)
    .await
    .unwrap();
    let target = FileTarget {
        run_id,
        file_id,
        source: SOURCE.into(),
        kind,
        resource_type: resource_type.into(),
    };
    let body = lines.join("\n");
    let limits = LoadLimits {
        batch_lines: 50,
        max_line_bytes: 1 << 20,
    };
    let stats = load_ndjson(pool, &target, body.as_bytes(), limits)
        .await
        .unwrap();
    assert_eq!(stats.rejected, 0, "{resource_type} lines rejected");
}

/// A run that loads every resource of `data`.
async fn load_dataset(pool: &PgPool, data: &Dataset) -> i64 {
    let run_id = new_run(pool).await;
    for t in RESOURCE_TYPES {
        let lines: Vec<String> = (0..data.count(t)).map(|i| data.ndjson_line(t, i)).collect();
        load(pool, run_id, FileKind::Output, t, &lines).await;
    }
    run_id
}

/// A run that deletes `ids` (`Type/id`).
async fn delete(pool: &PgPool, refs: &[String]) -> i64 {
    let run_id = new_run(pool).await;
    let entries: Vec<serde_json::Value> = refs
        .iter()
        .map(|r| serde_json::json!({"request": {"method": "DELETE", "url": r}}))
        .collect();
    let bundle =
        serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    load(
        pool,
        run_id,
        FileKind::Deleted,
        "Bundle",
        &[bundle.to_string()],
    )
    .await;
    run_id
}

pub fn shipped_views() -> ViewSet {
    ViewSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("views"), "sof").unwrap()
}

/// Every view's table holds exactly the rows a full rebuild would, and its row count is right.
pub async fn assert_equals_rebuild(pool: &PgPool, views: &ViewSet) {
    for view in &views.views {
        let table = format!("sof.\"{}\"", view.name);
        let query = view.compiled.query();
        let differing: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM ((TABLE {table} EXCEPT ALL {query}) UNION ALL ({query} EXCEPT ALL TABLE {table})) AS d"
        )))
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(differing, 0, "view {} differs from a rebuild", view.name);
        let (recorded, status, pending): (i64, String, Vec<i64>) = sqlx::query_as(
            "SELECT row_count, status, pending_run_ids FROM fhir_sync.view_state WHERE name = $1",
        )
        .bind(&view.name)
        .fetch_one(pool)
        .await
        .unwrap();
        let actual: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(
            (recorded, status.as_str(), pending),
            (actual, "fresh", vec![]),
            "view {}",
            view.name
        );
    }
}

#[tokio::test]
async fn apply_creates_typed_tables_rebuilds_changed_views_and_prunes() {
    let db = TestDb::new().await;
    let data = Dataset::new(11, 30);
    load_dataset(&db.pool, &data).await;
    let views = shipped_views();
    let names: Vec<&str> = views.views.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        ["blood_pressure", "condition", "encounter", "patient"]
    );

    let applied = materialise::apply(&db.pool, &views, ApplyOptions::default())
        .await
        .unwrap();
    assert!(
        applied
            .iter()
            .all(|(_, a)| matches!(a, Applied::Created { .. })),
        "{applied:?}"
    );
    let patients: i64 = sqlx::query_scalar("SELECT count(*) FROM sof.patient")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(patients, 30);
    // Systolic and diastolic come from the panel's components, typed.
    let (bp, bp_panels): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sof.blood_pressure WHERE systolic > diastolic AND patient_id IS NOT NULL),
                (SELECT count(*) FROM fhir_sync.resource WHERE resource @> '{\"code\":{\"coding\":[{\"code\":\"85354-9\"}]}}')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        bp > 0 && bp == bp_panels,
        "{bp} rows for {bp_panels} panels"
    );
    let types: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = 'sof' AND table_name = 'blood_pressure' ORDER BY ordinal_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(types[0], ("_source".into(), "text".into()));
    assert_eq!(types[1], ("_resource_id".into(), "text".into()));
    assert!(types.contains(&("systolic".into(), "numeric".into())));
    assert!(types.contains(&("effective".into(), "timestamp with time zone".into())));
    assert_equals_rebuild(&db.pool, &views).await;

    // Nothing changed: nothing rebuilt.
    let again = materialise::apply(&db.pool, &views, ApplyOptions::default())
        .await
        .unwrap();
    assert!(
        again.iter().all(|(_, a)| *a == Applied::Unchanged),
        "{again:?}"
    );

    // A changed definition is rebuilt; a view whose file is gone is pruned with --prune.
    let dir = tempfile::tempdir().unwrap();
    let patient =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("views/patient.json"))
            .unwrap()
            .replace("\"name\": \"gender\"", "\"name\": \"sex\"");
    std::fs::write(dir.path().join("patient.json"), patient).unwrap();
    let changed = ViewSet::load(dir.path(), "sof").unwrap();
    let applied = materialise::apply(
        &db.pool,
        &changed,
        ApplyOptions {
            rebuild: false,
            prune: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        applied[0],
        ("patient".to_string(), Applied::Rebuilt { rows: 30 })
    );
    let pruned: Vec<&str> = applied
        .iter()
        .filter(|(_, a)| *a == Applied::Pruned)
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(pruned, ["blood_pressure", "condition", "encounter"]);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'sof' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(tables, ["patient"]);
    let sex: i64 = sqlx::query_scalar("SELECT count(sex) FROM sof.patient")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(sex, 30);
}

/// A view that fails to refresh when a patient has two phone numbers (a non-collection column
/// with several values), next to the shipped ones.
fn views_with_a_fragile_one() -> ViewSet {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("views")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("phone.json"),
        r#"{"name": "phone", "resource": "Patient", "select": [{"column": [{"name": "phone", "path": "telecom.value", "type": "string"}]}]}"#,
    )
    .unwrap();
    ViewSet::load(dir.path(), "sof").unwrap()
}

fn patient_with_phones(data: &Dataset, index: usize, phones: &[&str], updated: &str) -> String {
    let mut patient = data.resource("Patient", index);
    patient["telecom"] = phones
        .iter()
        .map(|p| serde_json::json!({"system": "phone", "value": p}))
        .collect();
    patient["meta"] = serde_json::json!({"versionId": "90", "lastUpdated": updated});
    patient.to_string()
}

#[tokio::test]
async fn incremental_refresh_equals_a_rebuild_through_changes_deletions_failures_and_a_crash() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let data = Dataset::new(5, 40);
    let views = views_with_a_fragile_one();

    // A full load, then the first refresh builds every table.
    let run = load_dataset(pool, &data).await;
    let report = refresh::refresh_for_run(pool, &views, run).await.unwrap();
    assert!(
        report
            .views
            .iter()
            .all(|v| matches!(v.outcome, Outcome::Built { .. })),
        "{report:?}"
    );
    assert_equals_rebuild(pool, &views).await;

    // An incremental run changing one resource in ten: only those rows are replaced.
    let run = load_dataset(pool, &data.changed(10)).await;
    let report = refresh::refresh_for_run(pool, &views, run).await.unwrap();
    let patient = report.views.iter().find(|v| v.name == "patient").unwrap();
    assert_eq!(
        patient.outcome,
        Outcome::Applied {
            runs: vec![run],
            deleted: 4,
            inserted: 4
        }
    );
    assert_equals_rebuild(pool, &views).await;

    // Deletions remove the rows; refreshing the same run again changes nothing.
    let deleted: Vec<String> = vec![
        format!("Patient/{}", data.id("Patient", 1)),
        format!("Observation/{}", data.id("Observation", 3)),
        format!("Encounter/{}", data.id("Encounter", 2)),
        format!("Condition/{}", data.id("Condition", 0)),
    ];
    let run = delete(pool, &deleted).await;
    refresh::refresh_for_run(pool, &views, run).await.unwrap();
    assert_equals_rebuild(pool, &views).await;
    let report = refresh::refresh_for_run(pool, &views, run).await.unwrap();
    assert!(report.all_applied());
    assert_equals_rebuild(pool, &views).await;

    // A refresh that fails leaves its run pending and the view in error; the others go on.
    let failing_run = new_run(pool).await;
    load(
        pool,
        failing_run,
        FileKind::Output,
        "Patient",
        &[patient_with_phones(
            &data,
            7,
            &["555-1", "555-2"],
            "2030-01-01T00:00:00Z",
        )],
    )
    .await;
    let report = refresh::refresh_for_run(pool, &views, failing_run)
        .await
        .unwrap();
    assert!(!report.all_applied());
    let failed: Vec<(&str, &Outcome)> = report
        .views
        .iter()
        .filter(|v| matches!(v.outcome, Outcome::Failed(_)))
        .map(|v| (v.name.as_str(), &v.outcome))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "phone");
    let Outcome::Failed(reason) = failed[0].1 else {
        unreachable!()
    };
    assert!(
        reason.contains("\"phone\"") && reason.contains(&data.id("Patient", 7)),
        "{reason}"
    );
    assert!(
        !reason.contains("555-1"),
        "the reason never quotes patient data: {reason}"
    );
    let (status, pending): (String, Vec<i64>) = sqlx::query_as(
        "SELECT status, pending_run_ids FROM fhir_sync.view_state WHERE name = 'phone'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), pending), ("error", vec![failing_run]));

    // The next run fixes the data; its refresh applies the failed run too.
    let run = new_run(pool).await;
    load(
        pool,
        run,
        FileKind::Output,
        "Patient",
        &[patient_with_phones(
            &data,
            7,
            &["555-3"],
            "2030-01-02T00:00:00Z",
        )],
    )
    .await;
    let report = refresh::refresh_for_run(pool, &views, run).await.unwrap();
    let phone = report.views.iter().find(|v| v.name == "phone").unwrap();
    assert!(
        matches!(&phone.outcome, Outcome::Applied { runs, .. } if *runs == vec![failing_run, run]),
        "{phone:?}"
    );
    assert_equals_rebuild(pool, &views).await;

    // A crash mid-refresh: the refresh is dropped while its transaction waits on a lock.
    let run = load_dataset(pool, &data.changed(3)).await;
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE sof.condition IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    {
        let refreshing = refresh::refresh_for_run(pool, &views, run);
        tokio::pin!(refreshing);
        let blocked = async {
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM \"sof\".\"condition\"%'",
                )
                .fetch_one(pool)
                .await
                .unwrap();
                if waiting > 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            _ = &mut refreshing => panic!("the refresh finished while its table was locked"),
            _ = blocked => {}
        }
        // Dropping `refreshing` here is the crash.
    }
    blocker.rollback().await.unwrap();
    let pending: Vec<i64> = sqlx::query_scalar(
        "SELECT pending_run_ids FROM fhir_sync.view_state WHERE name = 'condition'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        pending,
        vec![run],
        "the crashed refresh's run is still owed"
    );
    // Resuming is running the same step again.
    let report = refresh::refresh_for_run(pool, &views, run).await.unwrap();
    assert!(report.all_applied(), "{report:?}");
    assert_equals_rebuild(pool, &views).await;

    // A full reload of the original (older) versions, refreshed: still equal.
    let run = load_dataset(pool, &data).await;
    refresh::refresh_for_run(pool, &views, run).await.unwrap();
    assert_equals_rebuild(pool, &views).await;
}

#[tokio::test]
async fn the_runner_works_in_a_scratch_database_it_drops() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sof");
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let report = conformance::run_in_scratch_database(&url, &dir)
        .await
        .unwrap();
    assert_eq!(report.failed(), 0);
    assert!(report.passed() > 0);
    let admin = fhir_sync::warehouse::pool_options()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let name = report
        .scratch_database
        .expect("the runner names its scratch database");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "the scratch database {name} is dropped");
}

#[tokio::test]
async fn the_documented_queries_work_on_demo_data() {
    let db = TestDb::new().await;
    load_dataset(&db.pool, &Dataset::new(3, 40)).await;
    materialise::apply(&db.pool, &shipped_views(), ApplyOptions::default())
        .await
        .unwrap();
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/analytics-views.md"
    ))
    .unwrap();
    let sql = doc
        .split("```sql")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("docs/analytics-views.md has an sql block");
    for (n, statement) in sql.split(';').filter(|s| !s.trim().is_empty()).enumerate() {
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_string()))
            .fetch_all(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("query {n} failed: {e}\n{statement}"));
        if n != 1 {
            assert!(!rows.is_empty(), "query {n} returned nothing:\n{statement}");
        }
    }
}

/// `fhir-sync views test DIR --report FILE` as an operator runs it: a failing case fails the
/// command, and the report has the official shape.
#[test]
fn the_views_test_command_reports_and_fails_on_a_failed_case() {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases");
    std::fs::create_dir(&cases).unwrap();
    std::fs::write(
        cases.join("mine.json"),
        r#"{"title": "t", "resources": [{"resourceType": "Patient", "id": "p1", "gender": "male"}],
            "tests": [
              {"title": "right", "view": {"resource": "Patient", "select": [{"column": [{"name": "g", "path": "gender", "type": "code"}]}]}, "expect": [{"g": "male"}]},
              {"title": "wrong", "view": {"resource": "Patient", "select": [{"column": [{"name": "g", "path": "gender", "type": "code"}]}]}, "expect": [{"g": "female"}]}
            ]}"#,
    )
    .unwrap();
    let report = dir.path().join("report.json");
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-sync"))
        .args(["views", "test"])
        .arg(&cases)
        .arg("--config-dir")
        .arg(dir.path())
        .arg("--report")
        .arg(&report)
        .env("FHIR_SYNC_DATABASE__URL", url)
        .env_remove("FHIR_SYNC_ENV")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stdout.lines().any(|l| l == "1 passed, 1 failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL mine.json: wrong: rows differ"),
        "{stdout}"
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(
        written["mine.json"]["tests"][0],
        serde_json::json!({"name": "right", "result": {"passed": true}})
    );
    assert_eq!(written["mine.json"]["tests"][1]["result"]["passed"], false);
}

/// Readers see the old table, complete, while a rebuild runs, and the new one once it commits.
#[tokio::test]
async fn readers_never_see_a_half_built_view() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let data = Dataset::new(9, 20);
    load_dataset(pool, &data).await;
    let views = shipped_views();
    let patient = ViewSet {
        schema: "sof".into(),
        views: vec![views.get("patient").unwrap().clone()],
    };
    materialise::apply(pool, &patient, ApplyOptions::default())
        .await
        .unwrap();
    // Ten more patients, then a rebuild that is held up while it reads the resources.
    let more = Dataset::new(10, 10);
    let run = new_run(pool).await;
    let lines: Vec<String> = (0..10).map(|i| more.ndjson_line("Patient", i)).collect();
    load(pool, run, FileKind::Output, "Patient", &lines).await;
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE fhir_sync.resource_patient IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut rebuild = tokio::spawn({
        let pool = pool.clone();
        let patient = patient.clone();
        async move {
            materialise::apply(
                &pool,
                &patient,
                ApplyOptions {
                    rebuild: true,
                    prune: false,
                },
            )
            .await
            .unwrap()
        }
    });
    let held_up = async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO \"sof\".\"patient__new\"%'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::select! {
        _ = &mut rebuild => panic!("the rebuild finished while the resources were locked"),
        _ = held_up => {}
    }
    let during: i64 = sqlx::query_scalar("SELECT count(*) FROM sof.patient")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(during, 20, "the old table, whole, while the rebuild runs");
    blocker.rollback().await.unwrap();
    let applied = rebuild.await.unwrap();
    assert_eq!(applied[0].1, Applied::Rebuilt { rows: 30 });
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM sof.patient")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(after, 30);
}
