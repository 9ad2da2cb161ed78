//! `fhir-sync config check` as an operator runs it.

use std::process::Command;

fn check(dir: &std::path::Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fhir-sync"))
        .args(["config", "check", "--config-dir"])
        .arg(dir.join("config"))
        .arg("--jobs-dir")
        .arg(dir.join("jobs"))
        .env_remove("FHIR_SYNC_ENV")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn names_every_problem_with_file_and_field_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
    std::fs::write(
        dir.path().join("jobs/epic.toml"),
        r#"
[fhir]
base_url = "https://ehr.example.org/api/FHIR/R4"
[auth]
client_id = "abc"
private_key_file = "missing-key.pem"
[export]
types = ["Patient", "Obsrvation"]
[schedule]
cron = "0 0 25 * * * *"
"#,
    )
    .unwrap();
    let (ok, text) = check(dir.path());
    assert!(!ok, "config check must fail:\n{text}");
    let file = dir.path().join("jobs/epic.toml").display().to_string();
    for expected in [
        format!(
            "{file}: export.types[1]: \"Obsrvation\" is not a FHIR R4 resource type (did you mean \"Observation\"?)"
        ),
        format!("{file}: auth.private_key_file: cannot read private key file"),
        format!("{file}: schedule.cron: \"0 0 25 * * * *\" is not a valid cron expression"),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    assert!(text.contains("3 configuration problems"), "{text}");
}

#[test]
fn a_valid_setup_passes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
    let key = dir.path().join("jobs/key.pem");
    let status = Command::new(env!("CARGO_BIN_EXE_fhir-sync"))
        .args(["keys", "generate", "--alg", "ES384", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(status.status.success());
    let jwks: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(jwks["keys"][0]["crv"], "P-384");
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "the JWKS must not carry the private part"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::write(
        dir.path().join("jobs/ok.toml"),
        "[fhir]\nbase_url = \"https://ehr.example.org/fhir\"\n[auth]\nclient_id = \"abc\"\nprivate_key_file = \"key.pem\"\nalgorithm = \"ES384\"\n[export]\ntypes = [\"Patient\"]\n[schedule]\ncron = \"0 0 2 * * *\"\ntimezone = \"Europe/Berlin\"\n",
    )
    .unwrap();
    let (ok, text) = check(dir.path());
    assert!(ok, "{text}");
    assert!(text.contains("job ok: 1 types"), "{text}");
}

#[test]
fn a_bad_settings_file_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
    std::fs::write(
        dir.path().join("config/default.toml"),
        "[sync]\nmax_parallel_downloads = \"many\"\n",
    )
    .unwrap();
    let (ok, text) = check(dir.path());
    assert!(!ok);
    assert!(
        text.contains("default.toml: sync.max_parallel_downloads"),
        "{text}"
    );
}

#[test]
fn view_files_are_checked_with_file_and_element_path() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["config", "jobs", "views"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let views = dir.path().join("views");
    std::fs::write(
        dir.path().join("config/default.toml"),
        format!("[views]\ndir = {:?}\n", views.display().to_string()),
    )
    .unwrap();
    std::fs::write(
        views.join("bp.json"),
        r#"{"name": "bp", "resource": "Observation", "select": [
            {"column": [{"name": "id", "path": "id"}]},
            {"column": [{"name": "systolic", "path": "component.value.frist()"}]}]}"#,
    )
    .unwrap();
    std::fs::write(
        views.join("two.json"),
        r#"{"name": "two", "resource": "Patient", "constant": [{"name": "c"}], "select": [
            {"unionAll": [{"column": [{"name": "a", "path": "id"}]}, {"column": [{"name": "b", "path": "id"}]}]}]}"#,
    )
    .unwrap();
    let (ok, text) = check(dir.path());
    assert!(!ok, "config check must fail:\n{text}");
    let bp = views.join("bp.json").display().to_string();
    let two = views.join("two.json").display().to_string();
    for expected in [
        format!(
            "{bp}: select[1].column[0].path: unknown function \"frist\" (did you mean first()?)"
        ),
        format!("{two}: constant[0]: a constant needs a value[x]"),
        format!("{two}: select[0].unionAll[1]: unionAll branches must have the same columns"),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }

    std::fs::remove_file(views.join("two.json")).unwrap();
    std::fs::write(
        views.join("bp.json"),
        r#"{"name": "bp", "resource": "Observation", "select": [{"column": [{"name": "id", "path": "id"}]}]}"#,
    )
    .unwrap();
    let (ok, text) = check(dir.path());
    assert!(ok, "{text}");
    assert!(
        text.contains("view bp: 1 columns over Observation"),
        "{text}"
    );
}

#[test]
fn warns_about_jobs_that_contradict_their_vendor_and_refuses_unknown_vendors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
    let job = |vendor: &str, export: &str| {
        format!(
            "[fhir]\nbase_url = \"https://ehr.example.org/fhir\"\nvendor = \"{vendor}\"\n[auth]\nclient_id = \"abc\"\nmethod = \"none\"\n[export]\ntypes = [\"Patient\"]\n{export}"
        )
    };
    std::fs::write(
        dir.path().join("jobs/epic.toml"),
        job("epic", "level = \"system\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("jobs/ab2d.toml"),
        job("ab2d", "since = \"2026-01-01T00:00:00+00:00\"\n"),
    )
    .unwrap();
    let (ok, text) = check(dir.path());
    assert!(ok, "warnings do not fail the check:\n{text}");
    let epic = dir.path().join("jobs/epic.toml").display().to_string();
    let ab2d = dir.path().join("jobs/ab2d.toml").display().to_string();
    for expected in [
        format!(
            "warning: {epic}: export.level: epic does not offer \"system\" exports, only group"
        ),
        format!(
            "warning: {ab2d}: export.since: ab2d reads a missing _since as \"since your last export\""
        ),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }

    std::fs::write(
        dir.path().join("jobs/epic.toml"),
        job("cerner", "level = \"group\"\ngroup_id = \"g\"\n"),
    )
    .unwrap();
    let (ok, text) = check(dir.path());
    assert!(!ok, "an unknown vendor is an error:\n{text}");
    assert!(
        text.contains(&format!("{epic}: fhir.vendor: \"cerner\" is not one of")),
        "{text}"
    );
}
