//! Jobs of different users run together on one device: which jobs join a batch (compatible
//! ones, fairly, only those already waiting), each keeping its own progress, cancel and
//! result; and a worker on the shared queue claiming a whole batch at once.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vqclip::engine::generate::Progress;
use vqclip::jobs::scheduler::DeviceSlot;
use vqclip::jobs::worker::{Assignment, BatchEvent, RunError, RunOutput, Runner, StopFlags};
use vqclip::jobs::{Actor, JobEvent, JobId, Scheduler};
use vqclip::store::jobs::JobStatus;

use crate::scheduler::{finished, options, request, wait_until};
use crate::support::test_pool;

/// Runs its batches in lockstep, one step every `delay`, recording each batch it was given and
/// the steps each job ran; a job prompted "hang" runs until `release`.
#[derive(Clone)]
struct LockstepRunner {
    delay: Duration,
    max_batch: usize,
    batches: Arc<Mutex<Vec<Vec<JobId>>>>,
    steps: Arc<Mutex<Vec<(JobId, u32)>>>,
    release: Arc<std::sync::atomic::AtomicBool>,
}

impl LockstepRunner {
    fn new(max_batch: usize) -> Self {
        Self {
            delay: Duration::from_millis(10),
            max_batch,
            batches: Arc::default(),
            steps: Arc::default(),
            release: Arc::default(),
        }
    }

    fn batches(&self) -> Vec<Vec<JobId>> {
        self.batches.lock().unwrap().clone()
    }
}

fn picture() -> RunOutput {
    let picture = image::RgbImage::from_pixel(8, 8, image::Rgb([10, 200, 10]));
    RunOutput {
        png: vqclip::engine::image::encode_png(&picture).unwrap(),
        width: 8,
        height: 8,
        final_loss: 0.25,
        video: None,
    }
}

impl Runner for LockstepRunner {
    fn run(
        &mut self,
        job: &Assignment,
        _stop: &StopFlags,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<RunOutput, RunError> {
        let mut result = None;
        self.run_batch(std::slice::from_ref(job), &mut |event| match event {
            BatchEvent::Progress(_, p) => on_progress(p),
            BatchEvent::Done(_, r) => result = Some(r),
        });
        result.unwrap()
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn run_batch(&mut self, jobs: &[Assignment], events: &mut dyn FnMut(BatchEvent<'_>)) {
        self.batches
            .lock()
            .unwrap()
            .push(jobs.iter().map(|j| j.id).collect());
        let mut active: Vec<(&Assignment, u32)> = jobs.iter().map(|j| (j, 0)).collect();
        while !active.is_empty() {
            std::thread::sleep(self.delay);
            let mut i = 0;
            while i < active.len() {
                let (job, done) = active[i];
                let total = job.params.spec.steps;
                if job.stop.stop.load(Ordering::SeqCst) {
                    active.remove(i);
                    events(BatchEvent::Done(job.id, Err(RunError::Stopped)));
                    continue;
                }
                let hanging = job.prompt == "hang" && !self.release.load(Ordering::SeqCst);
                if done >= total && !hanging {
                    active.remove(i);
                    events(BatchEvent::Done(job.id, Ok(picture())));
                    continue;
                }
                let done = (done + 1).min(total);
                active[i].1 = done;
                self.steps.lock().unwrap().push((job.id, done));
                events(BatchEvent::Progress(
                    job.id,
                    &Progress {
                        iteration: done,
                        total,
                        loss: 1.0,
                        prompt_losses: vec![],
                        elapsed: Duration::ZERO,
                        eta: Duration::ZERO,
                        preview: None,
                    },
                ));
                i += 1;
            }
        }
    }
}

fn slot(runner: &LockstepRunner) -> Vec<DeviceSlot> {
    vec![DeviceSlot {
        label: "gpu#0".into(),
        runner: Box::new(runner.clone()),
    }]
}

async fn submit_sized(s: &Scheduler, user: u64, prompt: &str, steps: u32, side: u32) -> JobId {
    submit_grid(s, user, prompt, (steps, side), 1).await
}

async fn submit_grid(
    s: &Scheduler,
    user: u64,
    prompt: &str,
    (steps, side): (u32, u32),
    grid: u32,
) -> JobId {
    let (mut job, mut params) = request(user, prompt, steps);
    (job.width, job.height) = (side, side);
    (params.spec.width, params.spec.height) = (side, side);
    params.grid = grid;
    job.params = serde_json::to_value(&params).unwrap();
    s.submit(job, params).await.unwrap().id
}

/// A batch holds at most four images of the largest size a request may ask for: two grids of
/// four at that size run one after the other, single images four at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_holds_at_most_four_images_of_the_largest_size() {
    let (dir, pool) = test_pool().await;
    let runner = LockstepRunner::new(8);
    let mut limits = options(&dir);
    limits.max_pixels = 64 * 64;
    limits.queue_capacity = 20;
    let s = Scheduler::start(pool.clone(), limits, slot(&runner))
        .await
        .unwrap();
    let hold = submit_sized(&s, 1, "hang", 1, 64).await;
    wait_until(|| runner.batches().len() == 1).await;
    let grids = [
        submit_grid(&s, 2, "g", (2, 64), 4).await,
        submit_grid(&s, 3, "h", (2, 64), 4).await,
    ];
    let singles: Vec<JobId> = {
        let mut ids = Vec::new();
        for user in 4..10 {
            ids.push(submit_sized(&s, user, "s", 2, 64).await);
        }
        ids
    };
    runner.release.store(true, Ordering::SeqCst);
    for &id in std::iter::once(&hold).chain(&grids).chain(&singles) {
        assert_eq!(finished(&pool, id).await, JobStatus::Succeeded);
    }
    assert_eq!(
        runner.batches(),
        [
            vec![hold],
            vec![grids[0]],
            vec![grids[1]],
            singles[..4].to_vec(),
            singles[4..].to_vec()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_jobs_that_agree_share_a_batch_and_each_ends_on_its_own() {
    let (dir, pool) = test_pool().await;
    let runner = LockstepRunner::new(4);
    let s = Scheduler::start(pool.clone(), options(&dir), slot(&runner))
        .await
        .unwrap();
    // The device is busy while the others arrive; alone, the first job was a batch of one.
    let first = submit_sized(&s, 1, "hang", 2, 64).await;
    wait_until(|| runner.batches().len() == 1).await;
    let b = submit_sized(&s, 2, "b", 400, 64).await;
    let c = submit_sized(&s, 3, "c", 6, 64).await;
    let other_size = submit_sized(&s, 4, "d", 3, 32).await;
    let second_of_b = submit_sized(&s, 2, "e", 3, 64).await;
    let mut events = s.subscribe(c).unwrap();
    runner.release.store(true, Ordering::SeqCst);
    assert_eq!(finished(&pool, first).await, JobStatus::Succeeded);
    // B and C agree and belong to different users: one batch. D is another size; B's owner is
    // at their running cap with B.
    wait_until(|| runner.batches().len() >= 2).await;
    assert_eq!(runner.batches()[1], [b, c]);
    let snapshot = s.snapshot();
    let vqclip::jobs::scheduler::DeviceState::Busy { batch, .. } = &snapshot.devices[0].state
    else {
        panic!("{snapshot:?}");
    };
    assert_eq!(batch, &[b, c]);
    // C ends on its own (6 steps) while B runs on; its watchers hear of it at once.
    assert_eq!(finished(&pool, c).await, JobStatus::Succeeded);
    assert_eq!(
        vqclip::store::jobs::get_job(&pool, b)
            .await
            .unwrap()
            .unwrap()
            .status,
        JobStatus::Running
    );
    events.wait_for(JobEvent::is_final).await.unwrap();
    // Cancelling B stops B alone; then the rest run, D and E apart (they differ in size).
    let owner = Actor {
        user: 2,
        moderator: false,
    };
    s.cancel(b, owner).await.unwrap();
    assert_eq!(finished(&pool, b).await, JobStatus::Cancelled);
    assert_eq!(finished(&pool, other_size).await, JobStatus::Succeeded);
    assert_eq!(finished(&pool, second_of_b).await, JobStatus::Succeeded);
    assert_eq!(
        runner.batches(),
        [vec![first], vec![b, c], vec![other_size], vec![second_of_b]]
    );
    // Every step C ran, it ran beside B: one batch, each job its own count.
    let steps = runner.steps.lock().unwrap().clone();
    let c_steps: Vec<u32> = steps.iter().filter(|s| s.0 == c).map(|s| s.1).collect();
    assert_eq!(c_steps, [1, 2, 3, 4, 5, 6]);
    let b_steps = steps.iter().filter(|s| s.0 == b).count();
    assert!((6..400).contains(&b_steps), "{b_steps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_never_waits_for_jobs_that_have_not_arrived() {
    let (dir, pool) = test_pool().await;
    let runner = LockstepRunner::new(4);
    let s = Scheduler::start(pool.clone(), options(&dir), slot(&runner))
        .await
        .unwrap();
    // A free device takes the first job at once, alone.
    let first = submit_sized(&s, 1, "a", 30, 64).await;
    wait_until(|| runner.batches().len() == 1).await;
    // One that arrives while it runs waits for the device; it does not join the running batch.
    let late = submit_sized(&s, 2, "b", 2, 64).await;
    assert_eq!(finished(&pool, first).await, JobStatus::Succeeded);
    assert_eq!(finished(&pool, late).await, JobStatus::Succeeded);
    assert_eq!(runner.batches(), [vec![first], vec![late]]);
    // A device that runs one job at a time is never handed more.
    let (dir, pool) = test_pool().await;
    let single = LockstepRunner::new(1);
    let s = Scheduler::start(pool.clone(), options(&dir), slot(&single))
        .await
        .unwrap();
    let hold = submit_sized(&s, 1, "hang", 1, 64).await;
    wait_until(|| single.batches().len() == 1).await;
    let x = submit_sized(&s, 2, "x", 1, 64).await;
    let y = submit_sized(&s, 3, "y", 1, 64).await;
    single.release.store(true, Ordering::SeqCst);
    for id in [hold, x, y] {
        assert_eq!(finished(&pool, id).await, JobStatus::Succeeded);
    }
    assert!(single.batches().iter().all(|b| b.len() == 1));
}

/// The real engine's batch: a job stopped by its owner leaves it and the others finish as they
/// would alone (the same bytes), each with its own progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_stops_one_job_of_a_batch_and_finishes_the_others_as_alone() {
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::scheduler::tiny_settings(&dir);
    let fetcher = crate::support::fetcher(&settings);
    let assignment = |id: i64, user: u64, seed: u64, grid: u32| {
        let (_, mut params) = request(user, "a red fox", 3);
        params.spec.seed = seed;
        params.spec.cutn = 3;
        (params.spec.width, params.spec.height) = (32, 32);
        params.spec.preview_every = 0;
        params.grid = grid;
        Assignment {
            id: JobId(id),
            user,
            prompt: "a red fox".into(),
            params,
            vqgan: "tiny_vqgan".into(),
            clip: "tiny_clip".into(),
            stop: Arc::default(),
        }
    };
    let images = settings.storage.images.clone();
    let jobs = vec![
        assignment(1, 1, 11, 1),
        assignment(2, 2, 12, 4),
        assignment(3, 3, 13, 1),
    ];
    let (together, alone) = tokio::task::spawn_blocking(move || {
        let mut runner = vqclip::jobs::engine::EngineRunner::new(
            candle_core::Device::Cpu,
            fetcher,
            1024,
            images,
        )
        .with_max_batch(4);
        let mut progress: Vec<(JobId, u32)> = Vec::new();
        let mut done = Vec::new();
        runner.run_batch(&jobs, &mut |event| match event {
            BatchEvent::Progress(id, p) => {
                progress.push((id, p.iteration));
                // The third job's owner cancels it after its first step.
                if id == JobId(3) {
                    jobs[2].stop.stop.store(true, Ordering::SeqCst);
                }
            }
            BatchEvent::Done(id, result) => done.push((id, result.map(|o| o.png))),
        });
        let alone: Vec<Vec<u8>> = jobs[..2]
            .iter()
            .map(|job| {
                let fresh = Assignment {
                    id: JobId(job.id.0 + 10),
                    stop: Arc::default(),
                    ..job.clone()
                };
                runner.run(&fresh, &fresh.stop, &mut |_| {}).unwrap().png
            })
            .collect();
        ((progress, done), alone)
    })
    .await
    .unwrap();
    let (progress, done) = together;
    assert_eq!(
        progress.iter().filter(|p| p.0 == JobId(3)).count(),
        1,
        "{progress:?}"
    );
    for id in [JobId(1), JobId(2)] {
        let steps: Vec<u32> = progress.iter().filter(|p| p.0 == id).map(|p| p.1).collect();
        assert_eq!(steps, [1, 2, 3]);
    }
    assert_eq!(done.len(), 3);
    assert!(
        matches!(done[0], (JobId(3), Err(RunError::Stopped))),
        "{:?}",
        done[0].0
    );
    for (k, id) in [JobId(1), JobId(2)].into_iter().enumerate() {
        let png = done
            .iter()
            .find(|d| d.0 == id)
            .and_then(|d| d.1.as_ref().ok())
            .unwrap();
        // The same pixels as the job alone (the PNG's text is the same too: the same spec).
        assert!(*png == alone[k], "job {id} differs from its run alone");
    }
    // The grid job kept each image's latent.
    for k in 1..=4 {
        let latent = settings
            .storage
            .images
            .join(format!("2-{k}.latent.safetensors"));
        assert!(latent.is_file(), "{}", latent.display());
    }
}
