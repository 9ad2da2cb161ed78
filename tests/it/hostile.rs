//! Hostile and broken export files from the fake server: lines PostgreSQL refuses, byte-order
//! marks, far-future times. One bad line costs that line (a recorded rejection), never the file.

use fhir_sync::fake::Faults;
use fhir_sync::warehouse::{FileKind, FileTarget, LoadLimits, load_ndjson};
use proptest::prelude::*;

use crate::export_env::{env_with, run};
use crate::helpers::{TestDb, TestEnv, run_with_files};

fn patient(id: &str, extra: &str) -> String {
    format!(
        r#"{{"resourceType":"Patient","id":"{id}","meta":{{"lastUpdated":"2024-01-01T00:00:00Z"}}{extra}}}"#
    )
}

/// The rejections recorded for the `extra-N` file of the run: (line, reason).
async fn rejections(env: &TestEnv, run_id: i64, file: &str) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT l.line_number, l.reason FROM fhir_sync.rejected_line l
         JOIN fhir_sync.run_file f ON f.id = l.file_id
         WHERE l.run_id = $1 AND f.url LIKE '%' || $2 || '%' ORDER BY l.line_number",
    )
    .bind(run_id)
    .bind(file)
    .fetch_all(&env.db.pool)
    .await
    .unwrap()
}

async fn stored(env: &TestEnv, id: &str) -> Option<(Option<String>, bool)> {
    sqlx::query_as(
        "SELECT last_updated::text, deleted_at IS NOT NULL FROM fhir_sync.resource
         WHERE resource_type = 'Patient' AND id = $1",
    )
    .bind(id)
    .fetch_optional(&env.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn lines_postgresql_refuses_are_rejected_and_the_rest_of_the_file_loads() {
    let deep = format!(r#","x":{}1{}"#, "[".repeat(20_000), "]".repeat(20_000));
    let mut body = Vec::new();
    let lines: Vec<Vec<u8>> = vec![
        patient("ok-1", "").into(),
        patient("surrogate", r#","name":[{"family":"\ud800"}]"#).into(),
        patient("huge-number", r#","x":1e200000"#).into(),
        patient("deep", &deep).into(),
        r#"{"resourceType":"Patient","id":"year-zero","meta":{"lastUpdated":"0000-01-01T00:00:00Z"}}"#.into(),
        r#"{"resourceType":"Patient","id":"offset","meta":{"lastUpdated":"2024-01-01T00:00:00+23:00"}}"#.into(),
        [
            br#"{"resourceType":"Patient","id":"latin1","name":[{"family":"M"#.as_slice(),
            b"\xfc",
            br#"ller"}]}"#.as_slice(),
        ]
        .concat(),
        patient("ok-2", "").into(),
    ];
    for line in &lines {
        body.extend_from_slice(line);
        body.push(b'\n');
    }
    let deleted = concat!(
        r#"{"resourceType":"Bundle","entry":[{"request":{"method":"DELETE","url":"Patient/gone-1"},"response":{"lastModified":"0000-01-01T00:00:00Z"}}]}"#,
        "\n",
        r#"{"resourceType":"Bundle","entry":[{"request":{"method":"DELETE","url":"Patient/gone-2"}}]}"#,
        "\n",
    );
    let env = env_with(
        3,
        Faults::default()
            .extra_file("Patient", body)
            .deleted_body(deleted),
    )
    .await;
    let report = run(&env)
        .await
        .expect("the run succeeds despite the bad lines");
    let rejected = rejections(&env, report.run_id, "extra-0").await;
    let lines: Vec<i64> = rejected.iter().map(|(line, _)| *line).collect();
    assert_eq!(lines, [2, 3, 4, 5, 6, 7], "{rejected:?}");
    for (expected, (_, reason)) in [
        "surrogate",
        "numeric",
        "nested deeper",
        "not a FHIR instant",
        "not a FHIR instant",
        "not valid UTF-8",
    ]
    .iter()
    .zip(&rejected)
    {
        assert!(reason.contains(expected), "{reason}");
    }
    for id in ["ok-1", "ok-2"] {
        assert!(stored(&env, id).await.is_some(), "{id} loads");
    }
    let rejected = rejections(&env, report.run_id, "deleted").await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, 1);
    assert!(rejected[0].1.contains("lastModified is not a FHIR instant"));
    assert_eq!(stored(&env, "gone-1").await, None);
    assert_eq!(
        stored(&env, "gone-2").await.map(|(_, deleted)| deleted),
        Some(true)
    );
}

#[tokio::test]
async fn a_byte_order_mark_does_not_cost_the_first_resource() {
    let body = format!(
        "\u{feff}{}\n{}\n",
        patient("bom-1", ""),
        patient("bom-2", "")
    );
    let env = env_with(3, Faults::default().extra_file("Patient", body)).await;
    let report = run(&env).await.expect("the run succeeds");
    assert_eq!(rejections(&env, report.run_id, "extra-0").await, []);
    for id in ["bom-1", "bom-2"] {
        assert!(stored(&env, id).await.is_some(), "{id} loads");
    }
}

#[tokio::test]
async fn times_far_past_the_transaction_time_are_rejected_not_frozen() {
    // TestEnv's data set: seed 7, three patients.
    let real = fhir_sync::fake::Dataset::new(7, 3).resource("Patient", 0)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let body = format!(
        "{}\n{}\n",
        patient("ok", ""),
        r#"{"resourceType":"Patient","id":"future","meta":{"lastUpdated":"9999-01-01T00:00:00Z"}}"#,
    );
    let deleted = format!(
        r#"{{"resourceType":"Bundle","entry":[{{"request":{{"method":"DELETE","url":"Patient/{real}"}},"response":{{"lastModified":"9999-01-01T00:00:00Z"}}}}]}}"#
    ) + "\n";
    let env = env_with(
        3,
        Faults::default()
            .extra_file("Patient", body)
            .deleted_body(deleted),
    )
    .await;
    let report = run(&env).await.expect("the run succeeds");
    let rejected = rejections(&env, report.run_id, "extra-0").await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, 2);
    assert!(
        rejected[0]
            .1
            .contains("meta.lastUpdated is more than 24 hours after the export's transactionTime"),
        "{}",
        rejected[0].1
    );
    assert_eq!(stored(&env, "future").await, None);
    assert!(stored(&env, "ok").await.is_some());
    let rejected = rejections(&env, report.run_id, "deleted").await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0]
            .1
            .contains("response.lastModified is more than 24 hours")
    );
    assert_eq!(
        stored(&env, &real).await.map(|(_, deleted)| deleted),
        Some(false),
        "a far-future tombstone must not hide the resource"
    );
}

/// Lines that pass every check before COPY but that this database still refuses: a SQL_ASCII
/// warehouse's jsonb refuses `\u` escapes of characters beyond ASCII. The batch is split until the refused
/// lines stand alone; the rest loads, on the first load's direct COPY and on the merge path.
#[tokio::test]
async fn a_line_that_still_breaks_a_copy_batch_is_isolated() {
    let lines = [
        patient("ok-1", ""),
        patient("escaped", r#","name":[{"family":"\u20ac"}]"#),
        patient("ok-2", ""),
        patient("accent", r#","name":[{"family":"\u00e9"}]"#),
        patient("ok-3", ""),
    ];
    let body = lines.join("\n") + "\n";
    let mut env = env_with(3, Faults::default().extra_file("Patient", body)).await;
    env.db = TestDb::sql_ascii().await;
    for attempt in ["first load (direct COPY)", "second load (staged merge)"] {
        let report = run(&env).await.expect(attempt);
        let rejected = rejections(&env, report.run_id, "extra-0").await;
        let numbers: Vec<i64> = rejected.iter().map(|(line, _)| *line).collect();
        assert_eq!(numbers, [2, 4], "{attempt}: {rejected:?}");
        for (_, reason) in &rejected {
            assert!(
                reason.starts_with("PostgreSQL refused the line (SQLSTATE "),
                "{attempt}: {reason}"
            );
        }
        for id in ["ok-1", "ok-2", "ok-3"] {
            assert!(stored(&env, id).await.is_some(), "{attempt}: {id} loads");
        }
    }
}

/// One file per case, registered straight in the run tables.
async fn new_file(db: &TestDb, run_id: i64, n: usize) -> FileTarget {
    let file_id: i64 = sqlx::query_scalar(
        "INSERT INTO fhir_sync.run_file (run_id, kind, resource_type, url)
         VALUES ($1, 'output', 'Patient', $2) RETURNING id",
    )
    .bind(run_id)
    .bind(format!("https://ehr.example.org/case-{n}.ndjson"))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    FileTarget {
        run_id,
        file_id,
        source: "src".into(),
        kind: FileKind::Output,
        resource_type: "Patient".into(),
    }
}

/// A line: arbitrary bytes, or a resource carrying one hostile value (an escape, a number, a
/// nesting, an instant, raw bytes in a string).
fn hostile_line() -> impl Strategy<Value = Vec<u8>> {
    let escape = any::<u16>().prop_map(|unit| format!(r#""\u{unit:04x}""#).into_bytes());
    let number =
        (any::<i32>(), 0u32..200_000, any::<bool>()).prop_map(|(mantissa, exponent, negative)| {
            let sign = if negative { "-" } else { "" };
            format!("{mantissa}e{sign}{exponent}").into_bytes()
        });
    let nesting = (0usize..30_000)
        .prop_map(|depth| [b"[".repeat(depth), b"1".to_vec(), b"]".repeat(depth)].concat());
    let instant = (0u32..10_000, 0u32..30, -30i32..30).prop_map(|(year, hour, offset)| {
        let sign = if offset < 0 { '-' } else { '+' };
        format!(
            r#"{{"lastUpdated":"{year:04}-01-01T{hour:02}:00:00{sign}{:02}:00"}}"#,
            offset.abs()
        )
        .into_bytes()
    });
    let raw_string = proptest::collection::vec(any::<u8>(), 0..16)
        .prop_map(|bytes| [b"\"".to_vec(), bytes, b"\"".to_vec()].concat());
    let value = prop_oneof![escape, number, nesting, raw_string];
    let resource = (value, instant).prop_map(|(value, meta)| {
        [
            br#"{"resourceType":"Patient","id":"hostile","x":"#.to_vec(),
            value,
            br#","meta":"#.to_vec(),
            meta,
            b"}".to_vec(),
        ]
        .concat()
    });
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        4 => resource,
    ]
    .prop_map(|line| {
        line.into_iter()
            .map(|b| if b == b'\n' { b' ' } else { b })
            .collect()
    })
}

#[test]
fn any_line_is_loaded_or_rejected_and_the_lines_around_it_load() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    // A run made the way a run is made; each case adds a file of its own to it.
    let (run_id, _) =
        runtime.block_on(run_with_files(&db.pool, "job", "2025-01-01T00:00:00Z", &[]));
    let cases = std::sync::atomic::AtomicUsize::new(0);
    let limits = LoadLimits {
        batch_lines: 3,
        max_line_bytes: 1 << 20,
    };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    runner
        .run(&hostile_line(), |line| {
            let n = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            runtime.block_on(async {
                let target = new_file(&db, run_id, n).await;
                let before = patient(&format!("before-{n}"), "");
                let after = patient(&format!("after-{n}"), "");
                let body = [
                    before.as_bytes(),
                    b"\n",
                    &line,
                    b"\n",
                    after.as_bytes(),
                    b"\n",
                ]
                .concat();
                let stats = load_ndjson(&db.pool, &target, body.as_slice(), limits)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("the load failed: {e:?}")))?;
                let blank = line.iter().all(u8::is_ascii_whitespace);
                prop_assert_eq!(stats.loaded + stats.rejected, if blank { 2 } else { 3 });
                let neighbours: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM fhir_sync.resource WHERE id = ANY($1)",
                )
                .bind([format!("before-{n}"), format!("after-{n}")])
                .fetch_one(&db.pool)
                .await
                .unwrap();
                prop_assert_eq!(neighbours, 2);
                Ok(())
            })
        })
        .unwrap();
}
