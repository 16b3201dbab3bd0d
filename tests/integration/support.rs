//! Shared helpers: temporary migrated databases and sample jobs.

use tempfile::TempDir;
use vqclip::store::{
    self, Backend, Location, Store,
    jobs::{JobKind, NewJob},
};

/// What keeps a test database alive: an SQLite file's directory, or nothing (a PostgreSQL test
/// database lives as long as the test server).
pub struct DbGuard {
    _dir: Option<TempDir>,
}

/// A migrated SQLite database in a fresh temporary directory (deleted when the `TempDir` drops).
pub async fn test_pool() -> (TempDir, Store) {
    init_test_log();
    let dir = tempfile::tempdir().expect("temporary directory");
    let location = Location::Sqlite(dir.path().join("test.sqlite"));
    let db = store::connect(&location).await.expect("open database");
    store::migrate(&db).await.expect("migrate");
    (dir, db)
}

/// A fresh migrated database on `backend`: an SQLite file, or a new database on the test
/// PostgreSQL server (see `postgres.rs`).
pub async fn test_db(backend: Backend) -> (DbGuard, Store) {
    match backend {
        Backend::Sqlite => {
            let (dir, db) = test_pool().await;
            (DbGuard { _dir: Some(dir) }, db)
        }
        Backend::Postgres => {
            init_test_log();
            let location = Location::Postgres(crate::postgres::new_database().await);
            let db = store::connect(&location).await.expect("open database");
            store::migrate(&db).await.expect("migrate");
            (DbGuard { _dir: None }, db)
        }
    }
}

/// Runs each test body on both backends: `mod NAME { fn sqlite(); fn postgres(); }`, the body
/// getting a fresh migrated [`Store`] named as given.
macro_rules! on_both_backends {
    ($(async fn $name:ident($db:ident) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn run($db: vqclip::store::Store) $body

                #[tokio::test]
                async fn sqlite() {
                    let (_guard, db) =
                        crate::support::test_db(vqclip::store::Backend::Sqlite).await;
                    run(db).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let (_guard, db) =
                        crate::support::test_db(vqclip::store::Backend::Postgres).await;
                    run(db).await;
                }
            }
        )*
    };
}
pub(crate) use on_both_backends;

/// A plausible `/imagine` job for `requester`.
pub fn sample_job(requester: u64, prompt: &str) -> NewJob {
    NewJob {
        kind: JobKind::Imagine,
        parent: None,
        requester_id: requester,
        guild_id: Some(1_100_000_000_000_000_001),
        channel_id: Some(1_100_000_000_000_000_002),
        prompt: prompt.to_owned(),
        params: serde_json::json!({ "prompts": [{ "text": prompt, "weight": 1.0 }], "cutn": 32 }),
        seed: 42,
        width: 256,
        height: 256,
        steps: 300,
        cutn: 32,
        vqgan_model: "imagenet_f16_16384".into(),
        clip_model: "vit_b32".into(),
    }
}

/// Prints the code's logs when `TEST_LOG` is set; silent otherwise.
fn init_test_log() {
    if let Some(filter) = std::env::var_os("TEST_LOG") {
        // `TEST_LOG=1`: everything at debug; otherwise a filter, e.g. `TEST_LOG=vqclip=debug`.
        let filter = filter.to_string_lossy();
        let filter = if filter == "1" { "debug" } else { &filter };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}
