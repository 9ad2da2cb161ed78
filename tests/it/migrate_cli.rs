//! `fhir-sync migrate` against a database that does not exist yet: created when the role may,
//! else one line naming the URL and the `createdb` to run. And what the migrations give
//! analysts by default: the patient index every partition gets.

use std::process::{Command, Output, Stdio};

use sqlx::Connection;

use crate::helpers::TestDb;

fn migrate(db_url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fhir-sync"))
        .arg("--config-dir")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
        .arg("migrate")
        .env("FHIR_SYNC_DATABASE__URL", db_url)
        .env_remove("FHIR_SYNC_ENV")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn admin() -> sqlx::PgConnection {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    sqlx::PgConnection::connect(&url).await.unwrap()
}

/// A test database's name and URL, with the database itself dropped again: what `migrate`
/// finds on a server where nobody ran `createdb`. The guard drops whatever `migrate` creates.
async fn missing_database() -> (TestDb, String, String) {
    let db = TestDb::unmigrated().await;
    db.pool.close().await;
    let url = db.url();
    let name = url::Url::parse(&url).unwrap().path()[1..].to_string();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
        .execute(&mut admin().await)
        .await
        .unwrap();
    (db, name, url)
}

async fn database_exists(name: &str) -> bool {
    sqlx::query_scalar("SELECT exists (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut admin().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn migrate_creates_a_database_that_does_not_exist() {
    let (_guard, name, url) = missing_database().await;
    assert!(!database_exists(&name).await);

    let out = tokio::task::spawn_blocking(move || migrate(&url))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("created database \"{name}\"")),
        "{stdout}"
    );
    assert!(stdout.contains("database schema is up to date"), "{stdout}");
    assert!(database_exists(&name).await);
}

/// A role that may log in but not create databases, dropped when the test ends.
struct Role(String);

impl Drop for Role {
    fn drop(&mut self) {
        let name = self.0.clone();
        // Drop runs outside any async context, so the clean-up gets a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let _ =
                        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {name}")))
                            .execute(&mut admin().await)
                            .await;
                })
        });
        let _ = cleanup.join();
    }
}

#[tokio::test]
async fn migrate_without_createdb_names_the_url_and_the_command_in_one_line() {
    let (_guard, name, url) = missing_database().await;
    // Generated here, never from input, so it is safe to format into DDL.
    let role = Role(format!(
        "fhir_sync_nocreate_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {} LOGIN NOCREATEDB",
        role.0
    )))
    .execute(&mut admin().await)
    .await
    .unwrap();
    let mut as_role = url::Url::parse(&url).unwrap();
    as_role.set_username(&role.0).unwrap();
    as_role.set_password(None).unwrap();
    let as_role = as_role.to_string();

    let out = {
        let as_role = as_role.clone();
        tokio::task::spawn_blocking(move || migrate(&as_role))
            .await
            .unwrap()
    };
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    let host = url::Url::parse(&url).unwrap();
    let (host, port) = (
        host.host_str().unwrap().to_string(),
        host.port().unwrap_or(5432),
    );
    for expected in [
        format!("database \"{name}\" does not exist"),
        format!("postgres://{}@{host}:{port}/{name}", role.0),
        "may not create databases".to_string(),
        format!("createdb -h {host} -p {port} -O {} {name}", role.0),
    ] {
        assert!(lines[0].contains(&expected), "{expected:?} in {stderr}");
    }
    assert!(!database_exists(&name).await);
}

#[tokio::test]
async fn every_resource_partition_has_a_patient_index_that_joins_use() {
    let env = crate::helpers::TestEnv::new(5, crate::helpers::TestEnv::fast()).await;
    env.run().await.unwrap();
    // Created on the parent, so the partitions the load created have it too.
    let indexed: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i
         JOIN pg_class c ON c.oid = i.indrelid
         JOIN pg_class x ON x.oid = i.indexrelid
         WHERE c.relnamespace = 'fhir_sync'::regnamespace AND c.relname LIKE 'resource\\_%'
           AND c.relkind = 'r'
           AND pg_get_indexdef(x.oid) LIKE '%(source, patient_id) WHERE (patient_id IS NOT NULL)'
         ORDER BY 1",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        indexed,
        [
            "resource_condition",
            "resource_encounter",
            "resource_observation",
            "resource_patient"
        ]
    );
    // A patient's observations: an index lookup, not a scan of the partition.
    let mut tx = env.db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT count(*) FROM fhir.observation WHERE source = 'demo' AND patient_id = 'p1'",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("source_patient_id"), "{plan}");
}
