//! The warehouse data model against real PostgreSQL: partitions and views per type, deletions
//! and revival, tombstones, versionId ordering, manifest counts, error files, a loader task
//! dropped mid-file, and the migration of the skeleton's table.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use fhir_sync::warehouse::{self, FileKind, FileTarget, LoadLimits, load_ndjson};
use tokio::io::{AsyncRead, BufReader, ReadBuf};
use tokio::sync::Notify;

use crate::helpers::{TestDb, run_with_files};

const LIMITS: LoadLimits = LoadLimits {
    batch_lines: 2,
    max_line_bytes: 64 * 1024,
};

/// Registers a new run with one file and returns the loader's target for it.
async fn new_file(
    db: &TestDb,
    kind: FileKind,
    resource_type: &str,
    count: Option<u64>,
    transaction_time: &str,
) -> FileTarget {
    let (_, mut files) = run_with_files(
        &db.pool,
        "src",
        transaction_time,
        &[(kind, resource_type, count)],
    )
    .await;
    files.remove(0)
}

async fn output(db: &TestDb, resource_type: &str) -> FileTarget {
    new_file(
        db,
        FileKind::Output,
        resource_type,
        None,
        "2030-01-01T00:00:00Z",
    )
    .await
}

async fn load(db: &TestDb, target: &FileTarget, lines: &[String]) -> warehouse::LoadStats {
    let body = lines.join("\n") + "\n";
    load_ndjson(&db.pool, target, body.as_bytes(), LIMITS)
        .await
        .unwrap()
}

fn patient(id: &str, version: &str, updated: &str, family: &str) -> String {
    format!(
        r#"{{"resourceType":"Patient","id":"{id}","meta":{{"versionId":"{version}","lastUpdated":"{updated}"}},"name":[{{"family":"{family}"}}]}}"#
    )
}

fn deletion_bundle(entries: &[(&str, Option<&str>)]) -> String {
    let entries: Vec<String> = entries
        .iter()
        .map(|(url, at)| match at {
            Some(at) => format!(
                r#"{{"request":{{"method":"DELETE","url":"{url}"}},"response":{{"status":"204","lastModified":"{at}"}}}}"#
            ),
            None => format!(r#"{{"request":{{"method":"DELETE","url":"{url}"}}}}"#),
        })
        .collect();
    format!(
        r#"{{"resourceType":"Bundle","type":"transaction","entry":[{}]}}"#,
        entries.join(",")
    )
}

/// Patient ids visible in `fhir.patient`, with their family names.
async fn visible_patients(db: &TestDb) -> Vec<(String, String)> {
    sqlx::query_as("SELECT id, resource #>> '{name,0,family}' FROM fhir.patient ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// (id, deleted_at as text, deleted_by_run_id, has a resource) of every stored Patient row.
async fn patient_rows(db: &TestDb) -> Vec<(String, Option<String>, Option<i64>, bool)> {
    sqlx::query_as(
        "SELECT id, to_char(deleted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), deleted_by_run_id, resource IS NOT NULL
         FROM fhir_sync.resource WHERE resource_type = 'Patient' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_type_never_seen_gets_its_partition_and_view_with_patient_ids() {
    let db = TestDb::new().await;
    let types: Vec<String> =
        sqlx::query_scalar("SELECT resource_type FROM fhir_sync.resource_type")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(types.is_empty(), "{types:?}");

    let target = output(&db, "MedicationRequest").await;
    let stats = load(
        &db,
        &target,
        &[
            r#"{"resourceType":"MedicationRequest","id":"m1","subject":{"reference":"Patient/p1"}}"#.into(),
            r#"{"resourceType":"MedicationRequest","id":"m2","subject":{"reference":"https://ehr.example.org/fhir/Patient/p2/_history/3"}}"#.into(),
            r#"{"resourceType":"MedicationRequest","id":"m3","subject":{"reference":"Group/g1"}}"#.into(),
        ],
    )
    .await;
    assert_eq!(stats.loaded, 3);
    let target = output(&db, "Immunization").await;
    load(
        &db,
        &target,
        &[
            r#"{"resourceType":"Immunization","id":"i1","patient":{"reference":"Patient/p9"}}"#
                .into(),
        ],
    )
    .await;

    let registered: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT resource_type, partition_name, view_name FROM fhir_sync.resource_type ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        registered,
        [
            (
                "Immunization".into(),
                "resource_immunization".into(),
                "immunization".into()
            ),
            (
                "MedicationRequest".into(),
                "resource_medication_request".into(),
                "medication_request".into()
            ),
        ]
    );
    let partition_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fhir_sync.resource_medication_request")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(partition_rows, 3);
    let view: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, patient_id FROM fhir.medication_request ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        view,
        [
            ("m1".into(), Some("p1".into())),
            ("m2".into(), Some("p2".into())),
            ("m3".into(), None)
        ]
    );
    let immunization: Option<String> =
        sqlx::query_scalar("SELECT patient_id FROM fhir.immunization WHERE id = 'i1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(immunization.as_deref(), Some("p9"));
}

#[tokio::test]
async fn a_deleted_resource_is_hidden_and_a_newer_version_revives_it() {
    let db = TestDb::new().await;
    let first = output(&db, "Patient").await;
    load(
        &db,
        &first,
        &[
            patient("a", "1", "2024-01-01T00:00:00Z", "A1"),
            patient("b", "1", "2024-01-01T00:00:00Z", "B1"),
        ],
    )
    .await;

    let deletion = new_file(
        &db,
        FileKind::Deleted,
        "Bundle",
        None,
        "2024-06-01T00:00:00Z",
    )
    .await;
    let stats = load(
        &db,
        &deletion,
        &[deletion_bundle(&[(
            "Patient/a",
            Some("2024-02-01T00:00:00Z"),
        )])],
    )
    .await;
    assert_eq!((stats.loaded, stats.deletions), (1, 1));
    assert_eq!(visible_patients(&db).await, [("b".into(), "B1".into())]);
    assert_eq!(
        patient_rows(&db).await,
        [
            (
                "a".into(),
                Some("2024-02-01".into()),
                Some(deletion.run_id),
                true
            ),
            ("b".into(), None, None, true),
        ],
        "the tombstone keeps the time, the run and the last version"
    );

    // A version older than the deletion (a late, out-of-order file) does not revive it.
    let late = output(&db, "Patient").await;
    load(
        &db,
        &late,
        &[patient("a", "2", "2024-01-15T00:00:00Z", "A older")],
    )
    .await;
    assert_eq!(visible_patients(&db).await, [("b".into(), "B1".into())]);

    // A version updated after the deletion does.
    let revived = output(&db, "Patient").await;
    load(
        &db,
        &revived,
        &[patient("a", "3", "2024-03-01T00:00:00Z", "A3")],
    )
    .await;
    assert_eq!(
        visible_patients(&db).await,
        [("a".into(), "A3".into()), ("b".into(), "B1".into())]
    );
    assert_eq!(
        patient_rows(&db).await[0],
        ("a".into(), None, None, true),
        "revival clears the deletion marker"
    );
}

#[tokio::test]
async fn a_deletion_of_an_unknown_id_is_a_tombstone_that_older_versions_cannot_pass() {
    let db = TestDb::new().await;
    // No lastModified on the entry: the deletion is dated by the export's transactionTime.
    let deletion = new_file(
        &db,
        FileKind::Deleted,
        "Bundle",
        None,
        "2024-06-01T00:00:00Z",
    )
    .await;
    load(
        &db,
        &deletion,
        &[deletion_bundle(&[
            ("Patient/ghost", None),
            ("Observation/o1", None),
        ])],
    )
    .await;
    assert_eq!(
        patient_rows(&db).await,
        [(
            "ghost".into(),
            Some("2024-06-01".into()),
            Some(deletion.run_id),
            false
        )]
    );
    // The deletion of a type never loaded created its partition and view too.
    let observations: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir.observation")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(observations, 0);

    let older = output(&db, "Patient").await;
    load(
        &db,
        &older,
        &[patient("ghost", "7", "2024-05-31T23:59:59Z", "old")],
    )
    .await;
    assert!(visible_patients(&db).await.is_empty());
    let newer = output(&db, "Patient").await;
    load(
        &db,
        &newer,
        &[patient("ghost", "8", "2024-06-02T00:00:00Z", "new")],
    )
    .await;
    assert_eq!(
        visible_patients(&db).await,
        [("ghost".into(), "new".into())]
    );
}

#[tokio::test]
async fn in_one_run_the_output_wins_over_an_undated_deletion_of_the_same_resource() {
    let db = TestDb::new().await;
    let old = output(&db, "Patient").await;
    load(
        &db,
        &old,
        &[patient("a", "1", "2024-01-01T00:00:00Z", "A1")],
    )
    .await;

    // One export lists a in output (it exists at the transactionTime, recreated) and in deleted.
    let (_, files) = run_with_files(
        &db.pool,
        "src",
        "2024-06-01T00:00:00Z",
        &[
            (FileKind::Output, "Patient", None),
            (FileKind::Deleted, "Bundle", None),
        ],
    )
    .await;
    let (output_target, deleted_target) = (files[0].clone(), files[1].clone());
    load(
        &db,
        &output_target,
        &[patient("a", "5", "2024-05-01T00:00:00Z", "A5")],
    )
    .await;
    load(
        &db,
        &deleted_target,
        &[deletion_bundle(&[("Patient/a", None)])],
    )
    .await;
    assert_eq!(visible_patients(&db).await, [("a".into(), "A5".into())]);
}

#[tokio::test]
async fn a_newer_version_is_merged_onto_the_page_of_the_one_it_replaces() {
    let db = TestDb::new().await;
    // Rows of about 1.1 KB: a packed 8 KB page would have no room for another one.
    let family = |n: usize| format!("{n:04}{}", "x".repeat(1000));
    let first: Vec<String> = (0..40)
        .map(|n| patient(&format!("p{n}"), "1", "2024-01-01T00:00:00Z", &family(n)))
        .collect();
    load(&db, &output(&db, "Patient").await, &first).await;
    let options: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(reloptions) FROM pg_class WHERE oid = 'fhir_sync.resource_patient'::regclass",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(options, ["fillfactor=80"]);
    let block = |id: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, f64>(
                "SELECT (ctid::text::point)[0] FROM fhir_sync.resource_patient WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (on_first_page, pages): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE (ctid::text::point)[0] = 0),
                count(DISTINCT (ctid::text::point)[0])
         FROM fhir_sync.resource_patient",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        pages > 2 && on_first_page > 1,
        "{pages} pages, {on_first_page} rows on the first"
    );
    assert_eq!(block("p0".into()).await, 0.0);

    // An incremental run's newer version goes through the staged merge, and lands on the same
    // page (a HOT update: no new key entry, no page at the end of the table).
    let newer = patient("p0", "2", "2025-01-01T00:00:00Z", &family(0));
    load(&db, &output(&db, "Patient").await, &[newer]).await;
    assert_eq!(block("p0".into()).await, 0.0);
    let version: String =
        sqlx::query_scalar("SELECT version_id FROM fhir_sync.resource WHERE id = 'p0'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(version, "2");
}

#[tokio::test]
async fn version_ids_break_ties_numerically() {
    let db = TestDb::new().await;
    let at = "2024-01-01T00:00:00Z";
    for (version, family) in [("9", "v9"), ("10", "v10"), ("2", "v2 (older)")] {
        let target = output(&db, "Patient").await;
        load(&db, &target, &[patient("a", version, at, family)]).await;
    }
    assert_eq!(visible_patients(&db).await, [("a".into(), "v10".into())]);

    // Within one batch as well: the numerically highest version of an id is the one kept.
    let target = output(&db, "Patient").await;
    let body = [patient("b", "10", at, "b10"), patient("b", "9", at, "b9")].join("\n");
    load_ndjson(
        &db.pool,
        &target,
        body.as_bytes(),
        LoadLimits {
            batch_lines: 10,
            ..LIMITS
        },
    )
    .await
    .unwrap();
    let b: String = sqlx::query_scalar(
        "SELECT resource #>> '{name,0,family}' FROM fhir.patient WHERE id = 'b'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(b, "b10");
}

#[tokio::test]
async fn a_manifest_count_that_disagrees_is_reported_on_the_file() {
    let db = TestDb::new().await;
    let lines = [
        patient("a", "1", "2024-01-01T00:00:00Z", "A"),
        "not json".to_string(),
        patient("b", "1", "2024-01-01T00:00:00Z", "B"),
    ];
    let wrong = new_file(
        &db,
        FileKind::Output,
        "Patient",
        Some(5),
        "2030-01-01T00:00:00Z",
    )
    .await;
    let stats = load(&db, &wrong, &lines).await;
    let expected = "the manifest counts 5 lines, but 2 loaded and 1 were rejected";
    assert_eq!(stats.count_mismatch.as_deref(), Some(expected));
    let stored: Option<String> =
        sqlx::query_scalar("SELECT count_mismatch FROM fhir_sync.run_file WHERE id = $1")
            .bind(wrong.file_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored.as_deref(), Some(expected));

    let right = new_file(
        &db,
        FileKind::Output,
        "Patient",
        Some(3),
        "2030-01-01T00:00:00Z",
    )
    .await;
    assert_eq!(load(&db, &right, &lines).await.count_mismatch, None);
}

#[tokio::test]
async fn error_files_are_stored_per_run_and_queryable() {
    let db = TestDb::new().await;
    let target = new_file(
        &db,
        FileKind::Error,
        "OperationOutcome",
        None,
        "2030-01-01T00:00:00Z",
    )
    .await;
    let outcome = |text: &str| {
        format!(
            r#"{{"resourceType":"OperationOutcome","issue":[{{"severity":"error","code":"processing","diagnostics":"{text}"}}]}}"#
        )
    };
    let stats = load(
        &db,
        &target,
        &[
            outcome("Patient/x could not be read"),
            r#"{"resourceType":"Patient","id":"p"}"#.into(),
            outcome("timeout"),
        ],
    )
    .await;
    assert_eq!((stats.loaded, stats.rejected), (2, 1));
    let stored: Vec<(i64, String)> = sqlx::query_as(
        "SELECT line_number, outcome #>> '{issue,0,diagnostics}' FROM fhir_sync.export_error
         WHERE run_id = $1 ORDER BY line_number",
    )
    .bind(target.run_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        [
            (1, "Patient/x could not be read".into()),
            (3, "timeout".into())
        ]
    );
}

#[tokio::test]
async fn bad_deletion_lines_are_rejected_and_the_rest_applies() {
    let db = TestDb::new().await;
    let target = new_file(
        &db,
        FileKind::Deleted,
        "Bundle",
        None,
        "2024-06-01T00:00:00Z",
    )
    .await;
    let stats = load(
        &db,
        &target,
        &[
            deletion_bundle(&[("Patient/a", None)]),
            "{oops".into(),
            r#"{"resourceType":"Bundle","entry":[{"request":{"method":"PUT","url":"Patient/b"}}]}"#
                .into(),
            deletion_bundle(&[("Patient/b", None), ("Nonsense/c", None)]),
            deletion_bundle(&[("Patient/d", None)]),
        ],
    )
    .await;
    assert_eq!((stats.loaded, stats.rejected, stats.deletions), (2, 3, 2));
    let ids: Vec<String> = patient_rows(&db).await.into_iter().map(|r| r.0).collect();
    assert_eq!(ids, ["a", "d"]);
    let reasons: Vec<(i64, String)> = sqlx::query_as(
        "SELECT line_number, reason FROM fhir_sync.rejected_line WHERE file_id = $1 ORDER BY 1",
    )
    .bind(target.file_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let numbers: Vec<i64> = reasons.iter().map(|r| r.0).collect();
    assert_eq!(numbers, [2, 3, 4]);
    // Reasons name the field and the rule, never the value (issue 12).
    assert!(
        reasons[1].1.contains("request.method is not \"DELETE\""),
        "{reasons:?}"
    );
    assert!(
        reasons[2].1.contains("entry 1: request.url is not Type/id"),
        "{reasons:?}"
    );
    assert!(
        !reasons
            .iter()
            .any(|(_, r)| r.contains("PUT") || r.contains("Nonsense"))
    );
}

/// Serves `data` up to `stall_at`, then signals `stalled` and never yields another byte: a
/// download hanging mid-file, at which point the test drops the loader.
struct StallsAt {
    data: Vec<u8>,
    stall_at: usize,
    pos: usize,
    stalled: Arc<Notify>,
}

impl AsyncRead for StallsAt {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos >= self.stall_at {
            // Never woken: the task stays pending until it is aborted.
            self.stalled.notify_one();
            return Poll::Pending;
        }
        let end = self
            .stall_at
            .min(self.pos + buf.remaining())
            .min(self.pos + 100);
        buf.put_slice(&self.data[self.pos..end]);
        self.pos = end;
        Poll::Ready(Ok(()))
    }
}

/// Loads `lines` into `target` until the download hangs 20 bytes into line `stall_line`
/// (1-based), drops the loader there, and returns the file's committed checkpoint.
async fn load_until_dropped(
    db: &TestDb,
    target: &FileTarget,
    lines: &[String],
    stall_line: usize,
    limits: LoadLimits,
) -> i64 {
    let body = lines.join("\n") + "\n";
    let stall_at = lines[..stall_line - 1]
        .iter()
        .map(|l| l.len() + 1)
        .sum::<usize>()
        + 20;
    let stalled = Arc::new(Notify::new());
    let reader = StallsAt {
        data: body.into_bytes(),
        stall_at,
        pos: 0,
        stalled: stalled.clone(),
    };
    let pool = db.pool.clone();
    let task_target = target.clone();
    let task = tokio::spawn(async move {
        load_ndjson(&pool, &task_target, BufReader::new(reader), limits).await
    });
    stalled.notified().await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    sqlx::query_scalar("SELECT lines_committed FROM fhir_sync.run_file WHERE id = $1")
        .bind(target.file_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_loader_dropped_mid_file_resumes_to_the_exact_row_set() {
    let db = TestDb::new().await;
    let target = output(&db, "Patient").await;
    let mut lines: Vec<String> = (0..25)
        .map(|i| {
            patient(
                &format!("p{i:02}"),
                "1",
                "2024-01-01T00:00:00Z",
                &format!("f{i}"),
            )
        })
        .collect();
    lines.insert(7, "garbage".into());
    // The same resource twice, so the second attempt's merge path meets rows of the first.
    lines.push(patient("p03", "2", "2024-02-01T00:00:00Z", "f3 v2"));
    let body = lines.join("\n") + "\n";
    let limits = LoadLimits {
        batch_lines: 4,
        ..LIMITS
    };
    // Stall in the middle of line 14: batches of 4 lines mean lines 1-8 are committed, and lines
    // 9-12 too unless the drop interrupts their commit (a batch is committed while the next one
    // is read), which must then leave no trace of them.
    let committed = load_until_dropped(&db, &target, &lines, 14, limits).await;
    assert!(committed == 8 || committed == 12, "{committed}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_sync.resource")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        stored,
        committed - 1,
        "the rows of exactly the committed lines (one is garbage)"
    );

    let stats = load_ndjson(&db.pool, &target, body.as_bytes(), limits)
        .await
        .unwrap();
    assert_eq!(stats.resumed_after_line, committed as u64);
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, resource #>> '{name,0,family}' FROM fhir_sync.resource ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected: Vec<(String, String)> = (0..25)
        .map(|i| {
            let family = if i == 3 {
                "f3 v2".to_string()
            } else {
                format!("f{i}")
            };
            (format!("p{i:02}"), family)
        })
        .collect();
    assert_eq!(rows, expected);
    let (loaded, rejected, mismatch): (i64, i64, Option<String>) = sqlx::query_as(
        "SELECT resources_loaded, lines_rejected, count_mismatch FROM fhir_sync.run_file WHERE id = $1",
    )
    .bind(target.file_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((loaded, rejected, mismatch), (26, 1, None));
}

/// An incremental load: the partition holds rows already, so batches go through the staging
/// table, the next one staged on a second connection while the previous one merges.
#[tokio::test]
async fn an_incremental_load_dropped_mid_file_leaves_no_transaction_open_and_resumes_exactly() {
    let db = TestDb::new().await;
    let first = output(&db, "Patient").await;
    let old: Vec<String> = (0..30)
        .map(|i| patient(&format!("p{i:02}"), "1", "2024-01-01T00:00:00Z", "old"))
        .collect();
    load(&db, &first, &old).await;

    let target = output(&db, "Patient").await;
    let mut lines: Vec<String> = (0..30)
        .map(|i| {
            patient(
                &format!("p{i:02}"),
                "2",
                "2024-02-01T00:00:00Z",
                &format!("new {i}"),
            )
        })
        .collect();
    lines.insert(5, "garbage".into());
    let body = lines.join("\n") + "\n";
    let limits = LoadLimits {
        batch_lines: 4,
        ..LIMITS
    };
    let committed = load_until_dropped(&db, &target, &lines, 18, limits).await;
    assert!(
        committed % 4 == 0 && (4..=16).contains(&committed),
        "{committed}"
    );
    let new_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fhir_sync.resource WHERE resource #>> '{name,0,family}' <> 'old'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        new_rows,
        committed - 1,
        "exactly the committed lines were merged (one is garbage)"
    );
    // The staged batch's transaction did not outlive the loader: its connection was closed.
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND state LIKE 'idle in transaction%'",
        )
        .bind(&database)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} transactions left open"
        );
        tokio::task::yield_now().await;
    }

    let stats = load_ndjson(&db.pool, &target, body.as_bytes(), limits)
        .await
        .unwrap();
    assert_eq!(stats.resumed_after_line, committed as u64);
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, resource #>> '{name,0,family}' FROM fhir_sync.resource ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected: Vec<(String, String)> = (0..30)
        .map(|i| (format!("p{i:02}"), format!("new {i}")))
        .collect();
    assert_eq!(rows, expected);
    let (loaded, rejected): (i64, i64) = sqlx::query_as(
        "SELECT resources_loaded, lines_rejected FROM fhir_sync.run_file WHERE id = $1",
    )
    .bind(target.file_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((loaded, rejected), (30, 1));
}

/// resource_type, id, version_id, patient_id, first_run_id, last_run_id.
type MigratedRow = (String, String, Option<String>, Option<String>, i64, i64);

#[tokio::test]
async fn the_migration_keeps_the_skeletons_rows() {
    let db = TestDb::unmigrated().await;
    let initial = warehouse::MIGRATOR.iter().next().unwrap().version;
    warehouse::MIGRATOR.run_to(initial, &db.pool).await.unwrap();
    sqlx::raw_sql(
        r#"INSERT INTO fhir_sync.resource (source, resource_type, id, version_id, last_updated, resource, first_run_id, last_run_id) VALUES
           ('s', 'Patient', 'p1', '1', '2024-01-01T00:00:00Z', '{"resourceType":"Patient","id":"p1"}', 1, 2),
           ('s', 'Observation', 'o1', '3', NULL, '{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"}}', 1, 1),
           ('s', 'Encounter', 'e1', NULL, NULL, '{"resourceType":"Encounter","id":"e1","subject":{"reference":"Group/g"}}', 2, 2)"#,
    )
    .execute(&db.pool)
    .await
    .unwrap();
    warehouse::migrate(&db.pool).await.unwrap();
    let rows: Vec<MigratedRow> = sqlx::query_as(
        "SELECT resource_type, id, version_id, patient_id, first_run_id, last_run_id
         FROM fhir_sync.resource ORDER BY resource_type",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("Encounter".into(), "e1".into(), None, None, 2, 2),
            (
                "Observation".into(),
                "o1".into(),
                Some("3".into()),
                Some("p1".into()),
                1,
                1
            ),
            (
                "Patient".into(),
                "p1".into(),
                Some("1".into()),
                Some("p1".into()),
                1,
                2
            ),
        ]
    );
    let in_views: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM fhir.patient) + (SELECT count(*) FROM fhir.observation)
              + (SELECT count(*) FROM fhir.encounter)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(in_views, 3);
}

#[tokio::test]
async fn the_readme_queries_work_on_demo_data() {
    let env = crate::helpers::TestEnv::new(5, crate::helpers::TestEnv::fast()).await;
    env.run().await.unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/data-model.md"))
            .unwrap();
    let section = readme
        .split("## Querying the warehouse")
        .nth(1)
        .expect("docs/data-model.md has a querying section");
    let sql = section
        .split("```sql")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .expect("the section has an sql block");
    let statements: Vec<&str> = sql
        .split(';')
        .map(str::trim)
        .filter(|s| {
            s.lines()
                .any(|l| !l.trim().is_empty() && !l.trim().starts_with("--"))
        })
        .collect();
    assert!(statements.len() >= 3, "{statements:?}");
    for (n, statement) in statements.iter().enumerate() {
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_string()))
            .fetch_all(&env.db.pool)
            .await
            .unwrap_or_else(|e| panic!("docs/data-model.md query {n} failed: {e}\n{statement}"));
        if n < 2 {
            assert!(
                !rows.is_empty(),
                "docs/data-model.md query {n} returned nothing:\n{statement}"
            );
        }
    }
}
