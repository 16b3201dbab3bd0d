//! Shared helpers: temporary migrated databases and sample jobs.

use sqlx::SqlitePool;
use tempfile::TempDir;
use vqclip::store::{
    self,
    jobs::{JobKind, NewJob},
};

/// A migrated database in a fresh temporary directory (deleted when the `TempDir` drops).
pub async fn test_pool() -> (TempDir, SqlitePool) {
    init_test_log();
    let dir = tempfile::tempdir().expect("temporary directory");
    let pool = store::connect(&dir.path().join("test.sqlite"))
        .await
        .expect("open database");
    store::migrate(&pool).await.expect("migrate");
    (dir, pool)
}

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
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_test_writer()
            .try_init();
    }
}
