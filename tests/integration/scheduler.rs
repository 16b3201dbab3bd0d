//! The scheduler with fake runners (the engine is not the point here) on a real SQLite
//! database: fairness, caps and refusals, cancel, panic isolation, two workers, events, restart
//! recovery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use vqclip::engine::generate::{GenerationSpec, Progress};
use vqclip::engine::prompt::WeightedPrompt;
use vqclip::jobs::scheduler::{CancelError, Cancelled, DeviceSlot, DeviceState};
use vqclip::jobs::worker::{Assignment, RunError, RunOutput, Runner, StopFlags};
use vqclip::jobs::{Actor, JobEvent, JobId, JobParams, Scheduler, SchedulerOptions, SubmitError};
use vqclip::store::Store;
use vqclip::store::jobs::{self, JobKind, JobStatus, NewJob};

use crate::support::{fetcher, test_pool};

/// Runs `steps` iterations of `delay` each, checking the stop flag between them. Prompts steer
/// it: "panic" panics, "fail" fails, "hang" runs until stopped or `release` is set, "deaf"
/// ignores stops until `release` is set.
#[derive(Clone)]
pub(crate) struct FakeRunner {
    delay: Duration,
    pub(crate) started: Arc<Mutex<Vec<JobId>>>,
    pub(crate) release: Arc<AtomicBool>,
}

impl FakeRunner {
    pub(crate) fn new(delay_ms: u64) -> Self {
        Self {
            delay: Duration::from_millis(delay_ms),
            started: Arc::default(),
            release: Arc::default(),
        }
    }
}

impl Runner for FakeRunner {
    fn run(
        &mut self,
        job: &Assignment,
        stop: &StopFlags,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<RunOutput, RunError> {
        self.started.lock().unwrap().push(job.id);
        match job.prompt.as_str() {
            "panic" => panic!("a fake out-of-memory"),
            "fail" => return Err(RunError::Failed("bad weights".into())),
            _ => {}
        }
        let total = job.params.spec.steps;
        if job.prompt == "deaf" {
            // Deaf to stop requests, as a step that takes minutes is: only `release` ends it.
            while !self.release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            return Err(RunError::Stopped);
        }
        let mut iteration = 0;
        while iteration < total || job.prompt == "hang" {
            if stop.stop.load(Ordering::SeqCst) {
                return Err(RunError::Stopped);
            }
            if job.prompt == "hang" && self.release.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(self.delay);
            iteration = (iteration + 1).min(total);
            on_progress(&Progress {
                iteration,
                total,
                loss: 1.0 / f64::from(iteration),
                prompt_losses: vec![],
                elapsed: self.delay * iteration,
                eta: self.delay * (total - iteration),
                preview: None,
            });
        }
        let picture = image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]));
        Ok(RunOutput {
            png: vqclip::engine::image::encode_png(&picture).unwrap(),
            width: 8,
            height: 8,
            final_loss: 0.5,
            video: None,
        })
    }
}

pub(crate) fn options(dir: &TempDir) -> SchedulerOptions {
    SchedulerOptions {
        queue_capacity: 10,
        max_queued_per_user: 5,
        max_running_per_user: 1,
        prioritize_follow_ups: true,
        device_failure_limit: 3,
        max_attempts: 3,
        progress_interval: Duration::from_millis(100),
        max_pixels: 512 * 512,
        images: dir.path().join("images"),
        auto: vqclip::request::AutoDefaults::CPU,
        claims: None,
    }
}

pub(crate) fn request(user: u64, prompt: &str, steps: u32) -> (NewJob, JobParams) {
    let spec = GenerationSpec {
        steps,
        ..GenerationSpec::new(
            vec![WeightedPrompt {
                text: prompt.into(),
                weight: 1.0,
                stop: None,
            }],
            64,
            64,
            7,
        )
    };
    let params = JobParams {
        spec,
        inputs: Default::default(),
        grid: 1,
        video: None,
    };
    let job = NewJob {
        kind: JobKind::Imagine,
        parent: None,
        requester_id: user,
        guild_id: Some(5),
        channel_id: None,
        prompt: prompt.into(),
        params: serde_json::to_value(&params).unwrap(),
        seed: 7,
        width: 64,
        height: 64,
        steps,
        cutn: 4,
        vqgan_model: "tiny_vqgan".into(),
        clip_model: "tiny_clip".into(),
    };
    (job, params)
}

pub(crate) fn slots(runners: &[&FakeRunner]) -> Vec<DeviceSlot> {
    runners
        .iter()
        .enumerate()
        .map(|(i, r)| DeviceSlot {
            label: format!("cpu#{i}"),
            runner: Box::new((*r).clone()),
        })
        .collect()
}

pub(crate) async fn submit(s: &Scheduler, user: u64, prompt: &str, steps: u32) -> JobId {
    let (job, params) = request(user, prompt, steps);
    s.submit(job, params).await.unwrap().id
}

/// Waits until `id` has ended in the database and returns its status.
/// Waits (up to a minute: debug builds on a busy machine are slow) for a job to end; a job the
/// bot has not stored yet (commands with attachments are deferred) counts as not ended.
pub(crate) async fn finished(pool: &Store, id: JobId) -> JobStatus {
    for _ in 0..3000 {
        let job = jobs::get_job(pool, id).await.unwrap();
        if let Some(job) = job.filter(|job| job.status.is_finished()) {
            return job.status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} did not finish");
}

pub(crate) async fn wait_until(mut check: impl FnMut() -> bool) {
    for _ in 0..600 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn jobs_are_served_fairly_across_users() {
    let (dir, pool) = test_pool().await;
    let runner = FakeRunner::new(5);
    let s = Scheduler::start(pool.clone(), options(&dir), slots(&[&runner]))
        .await
        .unwrap();
    let first = submit(&s, 1, "hang", 1).await;
    wait_until(|| runner.started.lock().unwrap().len() == 1).await;
    let mut ids = vec![first];
    for (user, prompt) in [(1, "a1"), (1, "a2"), (1, "a3"), (2, "b1"), (3, "c1")] {
        ids.push(submit(&s, user, prompt, 2).await);
    }
    // While the first job runs, the others wait in fair order: B and C before A's second.
    let order: Vec<JobId> = s.snapshot().waiting.iter().map(|w| w.0).collect();
    assert_eq!(order, [ids[4], ids[5], ids[1], ids[2], ids[3]]);
    match s.subscribe(ids[5]).unwrap().borrow().clone() {
        JobEvent::Queued { position } => assert_eq!(position, 2),
        other => panic!("{other:?}"),
    }

    runner.release.store(true, Ordering::SeqCst);
    for &id in &ids {
        assert_eq!(finished(&pool, id).await, JobStatus::Succeeded);
    }
    let started = runner.started.lock().unwrap().clone();
    assert_eq!(started, [ids[0], ids[4], ids[5], ids[1], ids[2], ids[3]]);
    let done = jobs::get_job(&pool, ids[4]).await.unwrap().unwrap();
    assert_eq!(done.device.as_deref(), Some("cpu#0"));
    let path = done.output_path.unwrap();
    assert!(path.is_file(), "{}", path.display());
    assert_eq!(done.output_sha256.unwrap().len(), 64);
}

#[tokio::test]
async fn caps_and_bans_refuse_with_reasons() {
    let (dir, pool) = test_pool().await;
    let runner = FakeRunner::new(5);
    let opts = SchedulerOptions {
        queue_capacity: 3,
        max_queued_per_user: 2,
        ..options(&dir)
    };
    let s = Scheduler::start(pool.clone(), opts, slots(&[&runner]))
        .await
        .unwrap();
    submit(&s, 1, "hang", 1).await;
    wait_until(|| runner.started.lock().unwrap().len() == 1).await;
    submit(&s, 1, "a", 1).await;
    submit(&s, 1, "b", 1).await;
    let (job, params) = request(1, "c", 1);
    assert!(matches!(
        s.submit(job, params).await,
        Err(SubmitError::UserQueueFull(2))
    ));
    submit(&s, 2, "d", 1).await;
    let (job, params) = request(3, "e", 1);
    let err = s.submit(job, params).await.unwrap_err();
    assert!(matches!(err, SubmitError::QueueFull(3)), "{err}");
    assert!(err.to_string().contains("queue is full"));

    vqclip::store::users::ban_user(&pool, 5, 4, 99, Some("spam"))
        .await
        .unwrap();
    let (job, params) = request(4, "f", 1);
    assert!(matches!(
        s.submit(job, params).await,
        Err(SubmitError::Banned)
    ));
    let (mut job, params) = request(5, "g", 1);
    job.width = 1024;
    job.height = 1024;
    let err = s.submit(job, params).await.unwrap_err();
    assert!(err.to_string().contains("1024x1024"), "{err}");

    runner.release.store(true, Ordering::SeqCst);
    s.shutdown(Duration::from_secs(5)).await;
    let (job, params) = request(6, "h", 1);
    assert!(matches!(
        s.submit(job, params).await,
        Err(SubmitError::ShuttingDown)
    ));
}

#[tokio::test]
async fn owners_and_moderators_cancel_queued_and_running_jobs() {
    let (dir, pool) = test_pool().await;
    let runner = FakeRunner::new(5);
    let s = Scheduler::start(pool.clone(), options(&dir), slots(&[&runner]))
        .await
        .unwrap();
    let running = submit(&s, 1, "hang", 1).await;
    wait_until(|| runner.started.lock().unwrap().len() == 1).await;
    let queued = submit(&s, 2, "waiting", 3).await;
    let mut events = s.subscribe(running).unwrap();

    let stranger = Actor {
        user: 3,
        moderator: false,
    };
    assert!(matches!(
        s.cancel(queued, stranger).await,
        Err(CancelError::NotAllowed(_))
    ));
    let owner = Actor {
        user: 2,
        moderator: false,
    };
    assert_eq!(s.cancel(queued, owner).await.unwrap(), Cancelled::Dequeued);
    assert_eq!(
        jobs::get_job(&pool, queued).await.unwrap().unwrap().status,
        JobStatus::Cancelled
    );
    let moderator = Actor {
        user: 9,
        moderator: true,
    };
    assert_eq!(
        s.cancel(running, moderator).await.unwrap(),
        Cancelled::Stopping
    );
    assert_eq!(finished(&pool, running).await, JobStatus::Cancelled);
    events
        .wait_for(|e| matches!(e, JobEvent::Cancelled))
        .await
        .unwrap();
    assert!(matches!(
        s.cancel(running, moderator).await,
        Err(CancelError::AlreadyFinished(_, JobStatus::Cancelled))
    ));
    assert!(matches!(
        s.cancel(JobId(999), moderator).await,
        Err(CancelError::NotFound(_))
    ));
    assert!(matches!(s.snapshot().devices[0].state, DeviceState::Idle));
}

#[tokio::test]
async fn a_panicking_job_fails_alone_and_repeated_failures_retire_the_device() {
    let (dir, pool) = test_pool().await;
    let runner = FakeRunner::new(2);
    let opts = SchedulerOptions {
        device_failure_limit: 2,
        ..options(&dir)
    };
    let s = Scheduler::start(pool.clone(), opts, slots(&[&runner]))
        .await
        .unwrap();
    let crash = submit(&s, 1, "panic", 2).await;
    assert_eq!(finished(&pool, crash).await, JobStatus::Failed);
    let error = jobs::get_job(&pool, crash).await.unwrap().unwrap().error;
    assert!(
        error.as_deref().unwrap().contains("a fake out-of-memory"),
        "{error:?}"
    );
    // The worker lives on: the next job succeeds and resets the count.
    let fine = submit(&s, 2, "fine", 2).await;
    assert_eq!(finished(&pool, fine).await, JobStatus::Succeeded);

    // A job that fails at once is still seen failing by whoever submitted it.
    let (job, params) = request(3, "fail", 2);
    let submitted = s.submit(job, params).await.unwrap();
    let mut events = submitted.events;
    let last = events.wait_for(JobEvent::is_final).await.unwrap().clone();
    assert!(
        matches!(&last, JobEvent::Failed { message } if message == "bad weights"),
        "{last:?}"
    );
    let a = submitted.id;
    assert_eq!(finished(&pool, a).await, JobStatus::Failed);
    let b = submit(&s, 4, "fail", 2).await;
    assert_eq!(finished(&pool, b).await, JobStatus::Failed);
    wait_until(|| {
        matches!(
            s.snapshot().devices[0].state,
            DeviceState::OutOfService { .. }
        )
    })
    .await;
    // Out of service: a new job waits rather than failing.
    let waits = submit(&s, 5, "fine", 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        jobs::get_job(&pool, waits).await.unwrap().unwrap().status,
        JobStatus::Queued
    );
}

#[tokio::test]
async fn two_cpu_workers_share_one_queue_and_report_progress() {
    let (dir, pool) = test_pool().await;
    let a = FakeRunner::new(10);
    let b = FakeRunner::new(10);
    let s = Scheduler::start(pool.clone(), options(&dir), slots(&[&a, &b]))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for user in 1..=6 {
        ids.push(submit(&s, user, "fine", 5).await);
    }
    let mut events = s.subscribe(ids[5]).unwrap();
    let mut seen = Vec::new();
    loop {
        let event = events.borrow_and_update().clone();
        let last = event.is_final();
        seen.push(event);
        if last {
            break;
        }
        events.changed().await.unwrap();
    }
    match seen.last().unwrap() {
        JobEvent::Finished(done) => {
            assert_eq!((done.width, done.height), (8, 8));
            assert!(image::load_from_memory(&done.png).is_ok());
        }
        other => panic!("{other:?}"),
    }
    assert!(seen.iter().any(|e| matches!(e, JobEvent::Queued { .. })));
    assert!(
        seen.iter()
            .any(|e| matches!(e, JobEvent::Progress(p) if p.total == 5))
    );
    let mut devices = std::collections::BTreeSet::new();
    for &id in &ids {
        assert_eq!(finished(&pool, id).await, JobStatus::Succeeded);
        devices.insert(
            jobs::get_job(&pool, id)
                .await
                .unwrap()
                .unwrap()
                .device
                .unwrap(),
        );
    }
    assert_eq!(devices.len(), 2, "both workers ran jobs: {devices:?}");
    assert!(!a.started.lock().unwrap().is_empty() && !b.started.lock().unwrap().is_empty());
}

#[test]
fn a_job_left_running_by_a_crash_completes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.sqlite");
    let hung = FakeRunner::new(5);
    let crashed = {
        // The first run: its runtime is dropped mid-job, as a crash would end it.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let pool = vqclip::store::connect(&vqclip::store::Location::Sqlite(db.clone()))
                .await
                .unwrap();
            vqclip::store::migrate(&pool).await.unwrap();
            let s = Scheduler::start(pool.clone(), options(&dir), slots(&[&hung]))
                .await
                .unwrap();
            let id = submit(&s, 1, "hang", 3).await;
            wait_until(|| hung.started.lock().unwrap().len() == 1).await;
            for _ in 0..200 {
                let job = jobs::get_job(&pool, id).await.unwrap().unwrap();
                if job.status == JobStatus::Running {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            pool.close().await;
            id
        })
    };
    // The stranded worker thread of the first run ends on its own; it reports to nobody.
    hung.release.store(true, Ordering::SeqCst);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let pool = vqclip::store::connect(&vqclip::store::Location::Sqlite(db.clone()))
            .await
            .unwrap();
        let before = jobs::get_job(&pool, crashed).await.unwrap().unwrap();
        assert_eq!(before.status, JobStatus::Running);
        let fresh = FakeRunner::new(5);
        fresh.release.store(true, Ordering::SeqCst);
        let _s = Scheduler::start(pool.clone(), options(&dir), slots(&[&fresh]))
            .await
            .unwrap();
        assert_eq!(finished(&pool, crashed).await, JobStatus::Succeeded);
        assert_eq!(fresh.started.lock().unwrap().as_slice(), [crashed]);
    });
}

#[tokio::test]
async fn shutdown_requeues_what_outlives_the_grace_period() {
    let (dir, pool) = test_pool().await;
    let runner = FakeRunner::new(5);
    let s = Scheduler::start(pool.clone(), options(&dir), slots(&[&runner]))
        .await
        .unwrap();
    let id = submit(&s, 1, "hang", 3).await;
    wait_until(|| runner.started.lock().unwrap().len() == 1).await;
    s.shutdown(Duration::from_millis(200)).await;
    let job = jobs::get_job(&pool, id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued, "interrupted, not lost");
    assert_eq!(job.device, None);
}

/// Settings that run the tiny fixture models.
pub(crate) fn tiny_settings(dir: &TempDir) -> vqclip::config::Settings {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let text = format!(
        "[storage]\nimages = {:?}\n[models]\nallow_tiny = true\ncache_dir = {:?}\n\
         [models.tiny_vqgan]\npath = \"{fixtures}/ckpt/tiny_vqgan.ckpt\"\n\
         [models.tiny_clip]\npath = \"{fixtures}/parity/tiny_clip.safetensors\"\n",
        dir.path().join("images").display().to_string(),
        dir.path().join("cache").display().to_string(),
    );
    vqclip::config::Settings::from_toml(&text, &Default::default()).unwrap()
}

fn engine_slot(settings: &vqclip::config::Settings) -> Vec<DeviceSlot> {
    vec![DeviceSlot {
        label: "cpu".into(),
        runner: Box::new(vqclip::jobs::engine::EngineRunner::new(
            candle_core::Device::Cpu,
            fetcher(settings),
            1024,
            settings.storage.images.clone(),
        )),
    }]
}

async fn start_engine(pool: &Store, settings: &vqclip::config::Settings) -> Scheduler {
    Scheduler::start(
        pool.clone(),
        SchedulerOptions::from_settings(settings),
        engine_slot(settings),
    )
    .await
    .unwrap()
}

fn latent_values(path: &std::path::Path) -> Vec<f32> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    tensors["latent"].flatten_all().unwrap().to_vec1().unwrap()
}

/// A device's worker thread gets weights it does not have by asking the runtime (it does no
/// networking of its own): on a single-threaded runtime too, the first job downloads the CLIP
/// from the Hub and runs, and the next finds it resident.
#[tokio::test]
async fn a_device_downloads_missing_weights_through_the_runtime() {
    let hub = crate::fake_hub::FakeHub::start().await;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let clip = std::fs::read(format!("{fixtures}/parity/tiny_clip.safetensors")).unwrap();
    hub.publish("vqclip-test/tiny-clip", "main", "model.safetensors", clip);
    let (dir, pool) = test_pool().await;
    let text = format!(
        "[storage]\nimages = {:?}\n[models]\nallow_tiny = true\ncache_dir = {:?}\n\
         hub_endpoint = \"{}\"\n\
         [models.tiny_vqgan]\npath = \"{fixtures}/ckpt/tiny_vqgan.ckpt\"\n\
         [models.tiny_clip]\nrepo = \"vqclip-test/tiny-clip\"\nfile = \"model.safetensors\"\n",
        dir.path().join("images").display().to_string(),
        dir.path().join("cache").display().to_string(),
        hub.url,
    );
    let settings = vqclip::config::Settings::from_toml(&text, &Default::default()).unwrap();
    let s = start_engine(&pool, &settings).await;
    let first = submit(&s, 1, "a lighthouse", 2).await;
    assert_eq!(finished(&pool, first).await, JobStatus::Succeeded);
    let downloads = hub.answered();
    assert!(
        hub.log()
            .iter()
            .any(|seen| seen.file == "model.safetensors"),
        "{:?}",
        hub.log()
    );
    assert!(
        dir.path()
            .join("cache/models--vqclip-test--tiny-clip")
            .is_dir()
    );
    let second = submit(&s, 1, "a harbour", 2).await;
    assert_eq!(finished(&pool, second).await, JobStatus::Succeeded);
    assert_eq!(
        hub.answered(),
        downloads,
        "the resident model is not fetched again"
    );
    s.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_engine_job_resumes_and_ends_as_if_never_stopped() {
    let tiny = |steps: u32| {
        let (mut job, mut params) = request(1, "a lighthouse", steps);
        params.spec.width = 32;
        params.spec.height = 32;
        params.spec.cutn = 2;
        params.spec.preview_every = 0;
        job.width = 32;
        job.height = 32;
        job.cutn = 2;
        job.params = serde_json::to_value(&params).unwrap();
        (job, params)
    };

    // The reference: the same job, never interrupted.
    let (ref_dir, ref_pool) = test_pool().await;
    let settings = tiny_settings(&ref_dir);
    let s = start_engine(&ref_pool, &settings).await;
    let (job, params) = tiny(40);
    let reference = s.submit(job, params).await.unwrap().id;
    assert_eq!(finished(&ref_pool, reference).await, JobStatus::Succeeded);
    let reference_latent = latent_values(&vqclip::jobs::latent_path(
        &settings.storage.images,
        reference,
    ));

    // The same job, held at iteration 5 until the shutdown stops it there, however fast the
    // machine.
    let (dir, pool) = test_pool().await;
    let settings = tiny_settings(&dir);
    let gate = crate::support::Gate::at(5);
    let slots = engine_slot(&settings)
        .into_iter()
        .map(|slot| DeviceSlot {
            label: slot.label,
            runner: gate.wrap(slot.runner),
        })
        .collect();
    let s = Scheduler::start(
        pool.clone(),
        SchedulerOptions::from_settings(&settings),
        slots,
    )
    .await
    .unwrap();
    let (job, params) = tiny(40);
    let id = s.submit(job, params).await.unwrap().id;
    gate.reached().await;
    s.shutdown(Duration::ZERO).await;
    let stopped = jobs::get_job(&pool, id).await.unwrap().unwrap();
    assert_eq!(stopped.status, JobStatus::Queued);
    assert_eq!(stopped.lost_runs, 0, "a shutdown is not a lost run");
    let checkpoint = vqclip::jobs::resume_path(&settings.storage.images, id);
    let saved_at =
        vqclip::engine::generate::Checkpoint::load(&checkpoint, &candle_core::Device::Cpu)
            .unwrap()
            .iteration;
    assert_eq!(saved_at, 5);

    let s = start_engine(&pool, &settings).await;
    let mut events = s.subscribe(id).unwrap();
    let first = events
        .wait_for(|e| matches!(e, JobEvent::Progress(_)))
        .await
        .unwrap()
        .clone();
    match first {
        JobEvent::Progress(p) => assert!(p.iteration > saved_at, "restarted at {}", p.iteration),
        other => panic!("{other:?}"),
    }
    assert_eq!(finished(&pool, id).await, JobStatus::Succeeded);
    assert!(!checkpoint.exists(), "the checkpoint is removed at the end");
    let resumed_latent = latent_values(&vqclip::jobs::latent_path(&settings.storage.images, id));
    assert_eq!(resumed_latent, reference_latent);
    s.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_database_refuses_frees_the_device_and_shutdown_always_ends() {
    let (dir, pool) = test_pool().await;
    // As a full disk would: recording a success fails.
    sqlx::raw_sql(
        "CREATE TRIGGER disk_full BEFORE UPDATE OF status ON jobs
         WHEN NEW.status = 'succeeded'
         BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;",
    )
    .execute(pool.pool())
    .await
    .unwrap();
    let runner = FakeRunner::new(1);
    let s = Scheduler::start(pool.clone(), options(&dir), slots(&[&runner]))
        .await
        .unwrap();
    let (job, params) = request(1, "a fox", 3);
    let mut events = s.submit(job, params).await.unwrap().events;
    let ended = events.wait_for(JobEvent::is_final).await.unwrap().clone();
    match ended {
        JobEvent::Failed { message } => {
            assert!(message.contains("disk is full"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The device is free again: the next job starts.
    let deaf = submit(&s, 2, "deaf", 3).await;
    wait_until(|| runner.started.lock().unwrap().contains(&deaf)).await;

    // A job that does not stop when asked cannot hold shutdown: it ends after the grace period
    // and a bounded wait, with the job queued again (not counted as a lost run).
    tokio::time::timeout(Duration::from_secs(120), s.shutdown(Duration::ZERO))
        .await
        .expect("shutdown ended");
    let requeued = jobs::get_job(&pool, deaf).await.unwrap().unwrap();
    assert_eq!(
        (requeued.status, requeued.lost_runs),
        (JobStatus::Queued, 0)
    );
    runner.release.store(true, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kept_killing_its_process_fails_at_start_and_its_watchers_hear_why() {
    let (dir, pool) = test_pool().await;
    let (job, _) = request(1, "poison", 3);
    let id = jobs::insert_job(&pool, &job).await.unwrap();
    let (job, _) = request(2, "fine", 3);
    let fine = jobs::insert_job(&pool, &job).await.unwrap();
    // Two earlier runs died with their process (recovered by the starts that followed them)...
    for _ in 0..2 {
        jobs::mark_job_running(&pool, id, "cpu#0").await.unwrap();
        jobs::recover_lost_runs(&pool, jobs::LostRuns::SingleHost, 3)
            .await
            .unwrap();
    }
    // ...and a third leaves the row running again: this start fails it.
    jobs::mark_job_running(&pool, id, "cpu#0").await.unwrap();
    let runner = FakeRunner::new(1);
    let s = Scheduler::start(pool.clone(), options(&dir), slots(&[&runner]))
        .await
        .unwrap();
    assert_eq!(s.failed_at_start(), [id]);
    let event = s.subscribe(id).unwrap().borrow().clone();
    match event {
        JobEvent::Failed { message } => assert!(message.contains("stopped 3 times"), "{message}"),
        other => panic!("{other:?}"),
    }
    // The queue moves on without it.
    assert_eq!(finished(&pool, fine).await, JobStatus::Succeeded);
    assert!(!runner.started.lock().unwrap().contains(&id));
    s.shutdown(Duration::from_secs(1)).await;
    let failed = jobs::get_job(&pool, id).await.unwrap().unwrap();
    assert_eq!((failed.status, failed.lost_runs), (JobStatus::Failed, 3));
}

/// On the shared queue, a worker that cannot record how a job ended (a full disk on the
/// database server, a dropped connection) stops renewing its lease: the job runs again when the
/// lease is over, and whoever follows it hears of the run that ends it. Renewing it would keep it
/// `running` forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_job_whose_end_was_not_recorded_runs_again_when_its_lease_is_over() {
    use vqclip::jobs::scheduler::ClaimOptions;
    let (_guard, pool) = crate::support::test_db(vqclip::store::Backend::Postgres).await;
    // The first success is refused, as a full disk would; a sequence is not rolled back with
    // the failed statement, so the second one passes.
    sqlx::raw_sql(
        "CREATE SEQUENCE refusals;
         CREATE FUNCTION refuse_first_success() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.status = 'succeeded' AND nextval('refusals') = 1 THEN
                 RAISE EXCEPTION 'could not extend file: No space left on device';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER disk_full BEFORE UPDATE OF status ON jobs
             FOR EACH ROW EXECUTE FUNCTION refuse_first_success();",
    )
    .execute(pool.pool())
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut claims = ClaimOptions::for_this_process(Duration::from_secs(2));
    claims.follow = Some(Duration::from_millis(100));
    let runner = FakeRunner::new(1);
    let s = Scheduler::start(
        pool.clone(),
        SchedulerOptions {
            claims: Some(claims),
            ..options(&dir)
        },
        slots(&[&runner]),
    )
    .await
    .unwrap();
    let id = submit(&s, 1, "a fox", 3).await;
    let mut events = s.subscribe(id).unwrap();
    let ended = tokio::time::timeout(
        Duration::from_secs(120),
        events.wait_for(JobEvent::is_final),
    )
    .await
    .expect("the job ended")
    .expect("its watchers kept hearing of it")
    .clone();
    assert!(matches!(ended, JobEvent::Finished(_)), "{ended:?}");
    let job = jobs::get_job(&pool, id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert!(job.attempts >= 2 && job.lost_runs >= 1, "{job:?}");
    assert!(runner.started.lock().unwrap().len() >= 2, "it ran again");
    s.shutdown(Duration::from_secs(1)).await;
}
