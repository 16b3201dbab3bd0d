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

/// The weights client an engine runner built for `settings` uses, on the test's runtime.
pub fn fetcher(settings: &vqclip::config::Settings) -> vqclip::models::hub::Fetcher {
    vqclip::models::hub::Fetcher::new(
        vqclip::models::hub::Hub::new(&settings.models).unwrap(),
        tokio::runtime::Handle::current(),
    )
}

/// Prints the code's logs when `TEST_LOG` is set; silent otherwise.
pub fn init_test_log() {
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

/// Holds a job at one iteration until the test lets it go: tests that need a job caught
/// mid-run (a preview shown, a shutdown mid-job) drive it there instead of hoping a sleep or a
/// slow machine leaves it running long enough.
#[derive(Clone)]
pub struct Gate {
    inner: std::sync::Arc<(std::sync::Mutex<GateState>, std::sync::Condvar)>,
}

struct GateState {
    /// The iteration to hold at; `None` once released.
    hold_at: Option<u32>,
    /// Set when a job is held there.
    reached: bool,
}

impl Gate {
    /// A gate that holds the first job to complete iteration `at`.
    pub fn at(at: u32) -> Self {
        Self {
            inner: std::sync::Arc::new((
                std::sync::Mutex::new(GateState {
                    hold_at: Some(at),
                    reached: false,
                }),
                std::sync::Condvar::new(),
            )),
        }
    }

    /// Wraps `runner`: after reporting iteration `at`, a job waits until [`Self::release`] or
    /// until it is asked to stop (then it stops there, at exactly that iteration).
    pub fn wrap(
        &self,
        runner: Box<dyn vqclip::jobs::worker::Runner>,
    ) -> Box<dyn vqclip::jobs::worker::Runner> {
        Box::new(Gated {
            inner: runner,
            gate: self.clone(),
        })
    }

    /// Waits until a job is held at the gate.
    pub async fn reached(&self) {
        let gate = self.clone();
        tokio::task::spawn_blocking(move || {
            let (lock, changed) = &*gate.inner;
            let mut state = lock.lock().unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
            while !state.reached {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(!left.is_zero(), "no job reached the gate");
                state = changed.wait_timeout(state, left).unwrap().0;
            }
        })
        .await
        .unwrap();
    }

    /// Lets the held job (and every later one) go on.
    pub fn release(&self) {
        let (lock, changed) = &*self.inner;
        lock.lock().unwrap().hold_at = None;
        changed.notify_all();
    }
}

struct Gated {
    inner: Box<dyn vqclip::jobs::worker::Runner>,
    gate: Gate,
}

impl vqclip::jobs::worker::Runner for Gated {
    fn run(
        &mut self,
        job: &vqclip::jobs::worker::Assignment,
        stop: &vqclip::jobs::worker::StopFlags,
        on_progress: &mut dyn FnMut(&vqclip::engine::generate::Progress),
    ) -> Result<vqclip::jobs::worker::RunOutput, vqclip::jobs::worker::RunError> {
        let gate = self.gate.clone();
        self.inner.run(job, stop, &mut |progress| {
            on_progress(progress);
            let (lock, changed) = &*gate.inner;
            let mut state = lock.lock().unwrap();
            if state.hold_at != Some(progress.iteration) {
                return;
            }
            state.reached = true;
            changed.notify_all();
            // Polls the stop flag, which the scheduler sets without touching the gate.
            while state.hold_at.is_some() && !stop.stop.load(std::sync::atomic::Ordering::SeqCst) {
                state = changed
                    .wait_timeout(state, std::time::Duration::from_millis(10))
                    .unwrap()
                    .0;
            }
        })
    }

    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }

    fn run_batch(
        &mut self,
        jobs: &[vqclip::jobs::worker::Assignment],
        events: &mut dyn FnMut(vqclip::jobs::worker::BatchEvent<'_>),
    ) {
        let gate = self.gate.clone();
        self.inner.run_batch(jobs, &mut |event| {
            let held = match &event {
                vqclip::jobs::worker::BatchEvent::Progress(id, progress) => {
                    Some((*id, progress.iteration))
                }
                vqclip::jobs::worker::BatchEvent::Done(..) => None,
            };
            events(event);
            let Some((id, iteration)) = held else {
                return;
            };
            let (lock, changed) = &*gate.inner;
            let mut state = lock.lock().unwrap();
            if state.hold_at != Some(iteration) {
                return;
            }
            state.reached = true;
            changed.notify_all();
            let stop = jobs.iter().find(|j| j.id == id).map(|j| j.stop.clone());
            let stopped = || {
                stop.as_ref()
                    .is_some_and(|s| s.stop.load(std::sync::atomic::Ordering::SeqCst))
            };
            while state.hold_at.is_some() && !stopped() {
                state = changed
                    .wait_timeout(state, std::time::Duration::from_millis(10))
                    .unwrap()
                    .0;
            }
        })
    }

    fn resident(&self) -> Vec<String> {
        self.inner.resident()
    }

    fn reset(&mut self) {
        self.inner.reset();
    }
}
