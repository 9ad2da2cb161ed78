//! The NDJSON loader against real PostgreSQL: bad lines, newer-wins, exactly-once, resume.

use std::pin::Pin;
use std::task::{Context, Poll};

use fhir_sync::warehouse::{FileKind, FileTarget, LoadError, LoadLimits, load_ndjson};
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader, ReadBuf};

use crate::helpers::{TestDb, eventually, run_with_files};

async fn file(db: &TestDb) -> FileTarget {
    let (_, mut files) = run_with_files(
        &db.pool,
        "src",
        // After every lastUpdated below: later ones are rejected as from the future.
        "2025-01-01T00:00:00Z",
        &[(FileKind::Output, "Patient", None)],
    )
    .await;
    files.remove(0)
}

fn patient(id: &str, updated: &str, family: &str) -> String {
    format!(
        r#"{{"resourceType":"Patient","id":"{id}","meta":{{"versionId":"1","lastUpdated":"{updated}"}},"name":[{{"family":"{family}"}}]}}"#
    )
}

const LIMITS: LoadLimits = LoadLimits {
    batch_lines: 2,
    max_line_bytes: 4096,
};

async fn families(db: &TestDb) -> Vec<(String, String)> {
    sqlx::query_as("SELECT id, resource #>> '{name,0,family}' FROM fhir_sync.resource ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn bad_lines_are_recorded_and_the_rest_loads() {
    let db = TestDb::new().await;
    let target = file(&db).await;
    let lines = [
        patient("a", "2024-01-01T00:00:00Z", "O\\\"Brien \\\\ Zoë"),
        "{this is not json".to_string(),
        r#"{"resourceType":"Observation","id":"o1"}"#.to_string(),
        String::new(),
        patient("b", "2024-01-01T00:00:00Z", "B"),
        format!(
            r#"{{"resourceType":"Patient","id":"c","text":"{}"}}"#,
            "x".repeat(5000)
        ),
        r#"{"resourceType":"Patient"}"#.to_string(),
        patient("d", "2024-01-01T00:00:00Z", "D"),
    ];
    let body = lines.join("\n") + "\n";
    let stats = load_ndjson(&db.pool, &target, body.as_bytes(), LIMITS)
        .await
        .unwrap();
    assert_eq!((stats.loaded, stats.rejected, stats.lines), (3, 4, 8));
    assert_eq!(
        families(&db).await,
        [
            ("a".into(), "O\"Brien \\ Zoë".into()),
            ("b".into(), "B".into()),
            ("d".into(), "D".into())
        ]
    );
    let rejected: Vec<(i64, String)> =
        sqlx::query_as("SELECT line_number, reason FROM fhir_sync.rejected_line WHERE file_id = $1 ORDER BY line_number")
            .bind(target.file_id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let numbers: Vec<i64> = rejected.iter().map(|r| r.0).collect();
    assert_eq!(numbers, [2, 3, 6, 7]);
    assert!(rejected[0].1.starts_with("not valid JSON"), "{rejected:?}");
    assert!(rejected[1].1.contains("\"Observation\""), "{rejected:?}");
    assert!(rejected[2].1.contains("byte limit"), "{rejected:?}");
    assert_eq!(rejected[3].1, "no id");
    let (committed, loaded, rejected_count): (i64, i64, i64) =
        sqlx::query_as("SELECT lines_committed, resources_loaded, lines_rejected FROM fhir_sync.run_file WHERE id = $1")
            .bind(target.file_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((committed, loaded, rejected_count), (8, 3, 4));

    // Loading the complete file again is a no-op.
    let again = load_ndjson(&db.pool, &target, body.as_bytes(), LIMITS)
        .await
        .unwrap();
    assert_eq!(
        (again.resumed_after_line, again.lines, again.loaded),
        (8, 0, 0)
    );
}

#[tokio::test]
async fn newer_versions_win_and_older_ones_never_regress_a_row() {
    let db = TestDb::new().await;
    let first = file(&db).await;
    let body = [
        patient("a", "2024-03-01T00:00:00Z", "new"),
        patient("a", "2024-01-01T00:00:00Z", "old in the same batch"),
        patient("b", "2024-01-01T00:00:00Z", "b1"),
    ]
    .join("\n");
    load_ndjson(
        &db.pool,
        &first,
        body.as_bytes(),
        LoadLimits {
            batch_lines: 10,
            ..LIMITS
        },
    )
    .await
    .unwrap();
    let second = file(&db).await;
    let body = [
        patient("a", "2024-02-01T00:00:00+01:00", "older, from a later file"),
        patient("b", "2024-06-01T00:00:00Z", "b2"),
    ]
    .join("\n");
    load_ndjson(&db.pool, &second, body.as_bytes(), LIMITS)
        .await
        .unwrap();
    assert_eq!(
        families(&db).await,
        [("a".into(), "new".into()), ("b".into(), "b2".into())]
    );
}

/// Yields `data` and then fails, like a download cut off mid-file.
struct BreaksAfter {
    data: Vec<u8>,
    at: usize,
    pos: usize,
}

impl AsyncRead for BreaksAfter {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos >= self.at {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset",
            )));
        }
        let end = self.at.min(self.pos + buf.remaining()).min(self.pos + 7);
        buf.put_slice(&self.data[self.pos..end]);
        self.pos = end;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn an_interrupted_load_resumes_without_duplicates_or_gaps() {
    let db = TestDb::new().await;
    let target = file(&db).await;
    let mut lines: Vec<String> = (0..9)
        .map(|i| patient(&format!("p{i}"), "2024-01-01T00:00:00Z", &format!("f{i}")))
        .collect();
    lines.insert(4, "garbage".into());
    let body = lines.join("\n") + "\n";
    // Break in the middle of line 6: batches of 2 lines mean lines 1-4 are committed.
    let cut = lines[..5].iter().map(|l| l.len() + 1).sum::<usize>() + 10;
    let broken = BreaksAfter {
        data: body.clone().into_bytes(),
        at: cut,
        pos: 0,
    };
    let err = load_ndjson(&db.pool, &target, BufReader::new(broken), LIMITS)
        .await
        .unwrap_err();
    assert!(
        matches!(err, LoadError::Read(_)) && err.is_retryable(),
        "{err:?}"
    );
    let committed: i64 =
        sqlx::query_scalar("SELECT lines_committed FROM fhir_sync.run_file WHERE id = $1")
            .bind(target.file_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(committed, 4);

    let stats = load_ndjson(&db.pool, &target, body.as_bytes(), LIMITS)
        .await
        .unwrap();
    assert_eq!(stats.resumed_after_line, 4);
    let ids: Vec<String> = families(&db).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, (0..9).map(|i| format!("p{i}")).collect::<Vec<_>>());
    let (loaded, rejected): (i64, i64) = sqlx::query_as(
        "SELECT resources_loaded, lines_rejected FROM fhir_sync.run_file WHERE id = $1",
    )
    .bind(target.file_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (loaded, rejected),
        (9, 1),
        "each line counted exactly once across both attempts"
    );
}

#[tokio::test]
async fn a_loader_whose_checkpoint_moves_under_it_yields_to_the_new_holder() {
    let db = TestDb::new().await;
    let target = file(&db).await;
    let (mut server, client) = tokio::io::duplex(64 * 1024);
    let loader = {
        let pool = db.pool.clone();
        let target = target.clone();
        tokio::spawn(
            async move { load_ndjson(&pool, &target, BufReader::new(client), LIMITS).await },
        )
    };
    let lines = |from: usize, to: usize| -> String {
        (from..to)
            .map(|i| patient(&format!("p{i}"), "2024-01-01T00:00:00Z", "f") + "\n")
            .collect()
    };
    server.write_all(lines(0, 2).as_bytes()).await.unwrap();
    let committed = || async {
        let lines: i64 =
            sqlx::query_scalar("SELECT lines_committed FROM fhir_sync.run_file WHERE id = $1")
                .bind(target.file_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        (lines == 2).then_some(())
    };
    eventually(
        std::time::Duration::from_secs(60),
        "the first batch",
        committed,
    )
    .await;
    // Its lease lapsed: another loader took the file over and committed two more lines.
    sqlx::query("UPDATE fhir_sync.run_file SET lines_committed = 4 WHERE id = $1")
        .bind(target.file_id)
        .execute(&db.pool)
        .await
        .unwrap();
    server.write_all(lines(2, 6).as_bytes()).await.unwrap();
    drop(server);
    let error = loader.await.unwrap().unwrap_err();
    assert!(
        matches!(error, LoadError::Superseded { file_id } if file_id == target.file_id),
        "{error:?}"
    );
    assert!(!error.is_retryable(), "the file is the other loader's now");
}
