//! `fhir-sync views test DIR`: the official SQL-on-FHIR v2 test files, run through PostgreSQL.
//!
//! Each file's `resources` are loaded through the warehouse's own loader into a scratch
//! database (created next to the configured one and dropped afterwards), each test's view is
//! validated, compiled and queried, and the rows are compared as the official runners do:
//! order-insensitive, exact column set, numbers compared by value. Nothing here knows any
//! particular test: a file of the official format is all it needs.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool, Row};

use super::{ViewError, definition, prepare};
use crate::warehouse::{self, FileKind, FileTarget, LoadLimits, runs};

/// One official test file.
#[derive(Debug, Deserialize)]
struct TestFile {
    #[serde(default)]
    resources: Vec<Value>,
    tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TestCase {
    title: String,
    view: Value,
    #[serde(default)]
    expect: Option<Vec<Value>>,
    #[serde(default)]
    expect_count: Option<usize>,
    #[serde(default)]
    expect_error: Option<bool>,
    #[serde(default)]
    expect_columns: Option<Vec<String>>,
}

/// The outcome of one test.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    pub reason: Option<String>,
}

/// Results per file name, in the official report's shape.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub files: BTreeMap<String, Vec<CaseResult>>,
    /// The scratch database the files ran in (dropped), when there was one.
    pub scratch_database: Option<String>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.files.values().flatten().filter(|c| c.passed).count()
    }

    pub fn failed(&self) -> usize {
        self.files.values().flatten().filter(|c| !c.passed).count()
    }

    /// `{"<file>": {"tests": [{"name": ..., "result": {"passed": ..., "reason"?: ...}}]}}`.
    pub fn to_json(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (file, cases) in &self.files {
            let tests: Vec<Value> = cases
                .iter()
                .map(|c| {
                    let mut result = serde_json::json!({ "passed": c.passed });
                    if let Some(reason) = &c.reason {
                        result["reason"] = Value::String(reason.clone());
                    }
                    serde_json::json!({ "name": c.name, "result": result })
                })
                .collect();
            out.insert(file.clone(), serde_json::json!({ "tests": tests }));
        }
        Value::Object(out)
    }
}

/// Runs every test file in `dir` in a scratch database on the server `database_url` points at.
pub async fn run_in_scratch_database(database_url: &str, dir: &Path) -> Result<Report, ViewError> {
    let admin = PgConnectOptions::from_str(database_url)?;
    // The name is generated here, never taken from input, so formatting it into DDL is safe.
    let name = format!("fhir_sync_views_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect_with(&admin).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let result = async {
        let pool = warehouse::pool_options()
            .max_connections(2)
            .connect_with(admin.clone().database(&name))
            .await?;
        let report = async {
            warehouse::migrate(&pool)
                .await
                .map_err(|e| ViewError::Database(sqlx::Error::Migrate(Box::new(e))))?;
            run_dir(&pool, dir).await
        }
        .await;
        pool.close().await;
        report
    }
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    result.map(|report| Report {
        scratch_database: Some(name),
        ..report
    })
}

/// Runs every official-format file in `dir` against `pool`, a migrated database whose
/// warehouse tables it may empty.
pub async fn run_dir(pool: &PgPool, dir: &Path) -> Result<Report, ViewError> {
    let read_err = |source| ViewError::Read {
        path: dir.display().to_string(),
        source,
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut report = Report::default();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| ViewError::Read {
            path: path.display().to_string(),
            source,
        })?;
        // Files of another shape (the JSON schema beside the tests) are not test files.
        let Ok(file) = serde_json::from_str::<TestFile>(&text) else {
            continue;
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        load_resources(pool, &file.resources).await?;
        let mut results = Vec::new();
        for case in &file.tests {
            let outcome = run_case(pool, case).await;
            results.push(CaseResult {
                name: case.title.clone(),
                passed: outcome.is_ok(),
                reason: outcome.err(),
            });
        }
        report.files.insert(file_name, results);
    }
    Ok(report)
}

/// Replaces the warehouse's resources with `resources`, loaded by the loader one type at a time.
async fn load_resources(pool: &PgPool, resources: &[Value]) -> Result<(), ViewError> {
    sqlx::query("TRUNCATE fhir_sync.resource")
        .execute(pool)
        .await?;
    let mut by_type: BTreeMap<String, String> = BTreeMap::new();
    // The warehouse keys resources by id, so a test resource without one (the format allows
    // it) is loaded under a generated id that is taken out of its body again afterwards:
    // the view then sees the resource exactly as the file has it.
    let mut generated = Vec::new();
    for (n, r) in resources.iter().enumerate() {
        let mut r = r.clone();
        if r.get("id").is_none()
            && let Some(object) = r.as_object_mut()
        {
            let id = format!("views-test-generated-{n}");
            object.insert("id".into(), Value::String(id.clone()));
            generated.push(id);
        }
        let t = r
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("Unknown")
            .to_string();
        let ndjson = by_type.entry(t).or_default();
        ndjson.push_str(&r.to_string());
        ndjson.push('\n');
    }
    if by_type.is_empty() {
        return Ok(());
    }
    let urls: Vec<(String, String)> = by_type
        .keys()
        .map(|t| (t.clone(), format!("http://localhost/{t}.ndjson")))
        .collect();
    let files: Vec<(&str, &str)> = urls.iter().map(|(t, u)| (t.as_str(), u.as_str())).collect();
    let (run_id, file_ids) =
        runs::create_local(pool, "views-test", "http://localhost/fhir", &files).await?;
    for ((t, ndjson), file_id) in by_type.into_iter().zip(file_ids) {
        let target = FileTarget {
            run_id,
            file_id,
            source: "views-test".into(),
            kind: FileKind::Output,
            resource_type: t,
        };
        let limits = LoadLimits {
            batch_lines: 1000,
            max_line_bytes: 16 * 1024 * 1024,
        };
        warehouse::load_ndjson(pool, &target, ndjson.as_bytes(), limits).await?;
    }
    sqlx::query("UPDATE fhir_sync.resource SET resource = resource - 'id' WHERE id = ANY($1)")
        .bind(&generated)
        .execute(pool)
        .await?;
    Ok(())
}

/// Runs one test; `Err` says why it failed.
async fn run_case(pool: &PgPool, case: &TestCase) -> Result<(), String> {
    let expect_error = case.expect_error == Some(true);
    let compiled = definition::from_value(&case.view)
        .map_err(|p| vec![p])
        .and_then(|d| prepare(&d, false));
    let compiled = match compiled {
        Ok(c) => c,
        Err(_) if expect_error => return Ok(()),
        Err(problems) => {
            let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(format!("view rejected: {}", shown.join("; ")));
        }
    };
    let sql = format!(
        "SELECT to_jsonb(q) - '_source' - '_resource_id' FROM ({}) AS q",
        compiled.query()
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await;
    let rows: Vec<Value> = match rows {
        Err(_) if expect_error => return Ok(()),
        Err(e) => return Err(format!("query failed: {e}")),
        Ok(_) if expect_error => return Err("expected an error, the view ran".into()),
        Ok(rows) => rows
            .iter()
            .map(|r| r.try_get::<Value, _>(0))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("reading rows failed: {e}"))?,
    };
    if let Some(expected) = &case.expect_columns {
        let got: Vec<&str> = compiled.columns.iter().map(|c| c.name.as_str()).collect();
        if got != *expected {
            return Err(format!("columns {got:?}, expected {expected:?}"));
        }
    }
    if let Some(count) = case.expect_count
        && rows.len() != count
    {
        return Err(format!("{} rows, expected {count}", rows.len()));
    }
    if let Some(expected) = &case.expect {
        let mut got: Vec<String> = rows.iter().map(canonical).collect();
        let mut want: Vec<String> = expected.iter().map(canonical).collect();
        got.sort();
        want.sort();
        if got != want {
            return Err(format!(
                "rows differ: got [{}], expected [{}]",
                got.join(", "),
                want.join(", ")
            ));
        }
    }
    Ok(())
}

/// A JSON value as text with sorted keys and numbers by value (5 and 5.0 are equal).
fn canonical(value: &Value) -> String {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            Some(f) => format!("{f}"),
            None => n.to_string(),
        },
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            format!(
                "{{{}}}",
                entries
                    .iter()
                    .map(|(k, v)| format!("{}:{}", Value::String((*k).clone()), canonical(v)))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_rows_ignore_key_order_and_number_spelling() {
        let a = serde_json::json!({"b": 5, "a": [1.0, "x"]});
        let b: Value = serde_json::from_str(r#"{"a": [1, "x"], "b": 5.0}"#).unwrap();
        assert_eq!(canonical(&a), canonical(&b));
        assert_ne!(
            canonical(&serde_json::json!({"a": null})),
            canonical(&serde_json::json!({}))
        );
    }

    #[test]
    fn the_report_has_the_official_shape() {
        let mut report = Report::default();
        report.files.insert(
            "basic.json".into(),
            vec![
                CaseResult {
                    name: "one".into(),
                    passed: true,
                    reason: None,
                },
                CaseResult {
                    name: "two".into(),
                    passed: false,
                    reason: Some("rows differ".into()),
                },
            ],
        );
        assert_eq!(
            report.to_json(),
            serde_json::json!({"basic.json": {"tests": [
                {"name": "one", "result": {"passed": true}},
                {"name": "two", "result": {"passed": false, "reason": "rows differ"}}
            ]}})
        );
        assert_eq!((report.passed(), report.failed()), (1, 1));
    }
}
