//! The read-side commands of the binary against a migrated database.

use std::process::Command;

use crate::common::migrated_database;
use orderly_test_support::TestDb;

fn orderly(db: &TestDb, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_orderly"))
        .args(args)
        .env("ORDERLY_DATABASE_URL", db.url())
        .output()
        .expect("run orderly");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn operators_see_status_rebuild_and_dead_letters() {
    let db = migrated_database().await;
    let (ok, out) = orderly(&db, &["projections", "status"]);
    assert!(ok, "{out}");
    assert!(out.contains("orders") && out.contains("products"), "{out}");
    let (ok, out) = orderly(&db, &["projections", "rebuild", "--all"]);
    assert!(ok, "{out}");
    assert!(out.contains("swapped in"), "{out}");
    let (ok, out) = orderly(&db, &["dlq", "list"]);
    assert!(ok, "{out}");
    assert!(out.contains("no dead letters"), "{out}");
    let (ok, _) = orderly(&db, &["dlq", "skip", "42"]);
    assert!(!ok, "skipping a dead letter that does not exist must fail");
    let (ok, _) = orderly(&db, &["projections", "rebuild", "nonsense"]);
    assert!(!ok);
}
