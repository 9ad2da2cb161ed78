//! The official SQL-on-FHIR v2 test files (`tests/sof-official/`, copied unchanged from the
//! upstream suite with its licence and provenance) through PostgreSQL.

use std::path::Path;

use crate::helpers::TestDb;

#[tokio::test]
async fn every_official_case_passes_through_postgresql() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sof-official");
    let db = TestDb::new().await;
    let report = fhir_sync::views::conformance::run_dir(&db.pool, &dir)
        .await
        .unwrap();
    let failures: Vec<String> = report
        .files
        .iter()
        .flat_map(|(file, cases)| {
            cases.iter().filter(|c| !c.passed).map(move |c| {
                format!(
                    "{file}: {}: {}",
                    c.name,
                    c.reason.clone().unwrap_or_default()
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(report.passed(), 99);
}

/// fhir-sync's own cases in the official format (`tests/sof/`): the language beyond the 99.
#[tokio::test]
async fn our_own_cases_in_the_official_format_pass_too() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sof");
    let db = TestDb::new().await;
    let report = fhir_sync::views::conformance::run_dir(&db.pool, &dir)
        .await
        .unwrap();
    let failures: Vec<String> = report
        .files
        .values()
        .flatten()
        .filter(|c| !c.passed)
        .map(|c| format!("{}: {}", c.name, c.reason.clone().unwrap_or_default()))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!((report.passed(), report.files.len()), (10, 2));
}
