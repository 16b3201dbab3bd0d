//! The bot's buttons, reactions, gallery, moderation and fault handling, end to end against the
//! loopback fake Discord: the real poise/serenity client, scheduler and SQLite; the real engine
//! with the tiny models where pictures matter, a fake runner where only timing does.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use vqclip::config::{Environment, Settings};
use vqclip::jobs::scheduler::DeviceSlot;
use vqclip::jobs::{JobId, Scheduler};
use vqclip::store::Store;
use vqclip::store::jobs::{self, JobKind, JobStatus};
use vqclip::store::{gallery, guilds, names};

use crate::bot::eventually;
use crate::fake_discord::{APP_ID, FakeDiscord, Request_, message, user};
use crate::scheduler::{FakeRunner, finished, options, slots};
use crate::support::{Gate, fetcher, test_pool};

pub(crate) const GUILD: u64 = 1_500_000_000_000_000_001;
pub(crate) const GALLERY: u64 = 1_500_000_000_000_000_002;
/// Manage Server.
pub(crate) const MODERATOR: &str = "32";
pub(crate) const MEMBER: &str = "0";

/// The bot's configuration for these tests: the fake Discord, images under `dir`, the tiny
/// models; `discord` and `scheduler` add keys to those sections.
/// Settings for a bot on `fake`: `discord` holds extra `[discord]` keys, then optionally a
/// `[generation]` line and extra `[generation]` keys, then optionally a `[moderation]` line and
/// its keys (otherwise results are scored but never flagged).
fn bot_settings(fake: &FakeDiscord, dir: &TempDir, discord: &str, scheduler: &str) -> Settings {
    let env: Environment = [("HOME", dir.path().to_str().unwrap())]
        .into_iter()
        .collect();
    // Scored by the safety check but never flagged, unless a test says otherwise.
    let (discord, moderation) = discord
        .split_once("[moderation]\n")
        .unwrap_or((discord, "nsfw_threshold = 1.0\n"));
    let (discord, generation) = discord
        .split_once("[generation]\n")
        .unwrap_or((discord, ""));
    Settings::from_toml(
        &format!(
            "[discord]\ntoken = \"fake.bot.token\"\napi_base = \"{}\"\n{discord}\n\
             [storage]\nimages = \"{}\"\n\
             [scheduler]\nprogress_interval_ms = 100\n{scheduler}\
             [models]\nallow_tiny = true\n\
             [generation]\ndefault_vqgan = \"tiny_vqgan\"\ndefault_clip = \"tiny_clip\"\n\
             preview_every = 2\n{generation}\n[moderation]\n{moderation}",
            fake.url,
            dir.path().join("images").display()
        ),
        &env,
    )
    .unwrap()
}

/// A running bot and what it talks to.
pub(crate) struct Bot {
    pub(crate) discord: FakeDiscord,
    pub(crate) dir: TempDir,
    pub(crate) pool: Store,
    pub(crate) scheduler: Scheduler,
    pub(crate) settings: Arc<Settings>,
    pub(crate) stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Bot {
    /// Starts the bot with `extra` configuration; `engine` picks the real tiny engine over a
    /// fake runner that sleeps `delay_ms` per step.
    pub(crate) async fn start(extra: &str, engine: bool, delay_ms: u64) -> (Self, FakeRunner) {
        Self::start_gated(extra, engine, delay_ms, None, 10).await
    }

    /// As [`Self::start`]; the engine's jobs pass through `gate`, and the queue holds
    /// `capacity` jobs.
    pub(crate) async fn start_gated(
        extra: &str,
        engine: bool,
        delay_ms: u64,
        gate: Option<&Gate>,
        capacity: usize,
    ) -> (Self, FakeRunner) {
        Self::start_with(extra, engine.then_some(1), delay_ms, gate, capacity).await
    }

    /// As [`Self::start_gated`]; `engine` is the real engine's batch size, `None` a fake runner.
    pub(crate) async fn start_with(
        extra: &str,
        engine: Option<usize>,
        delay_ms: u64,
        gate: Option<&Gate>,
        capacity: usize,
    ) -> (Self, FakeRunner) {
        let discord = FakeDiscord::start().await;
        let (dir, pool) = test_pool().await;
        let settings = bot_settings(&discord, &dir, extra, "");
        let runner = FakeRunner::new(delay_ms);
        let devices = if let Some(max_batch) = engine {
            let engine: Box<dyn vqclip::jobs::worker::Runner> = Box::new(
                vqclip::jobs::engine::EngineRunner::new(
                    candle_core::Device::Cpu,
                    fetcher(&settings),
                    1024,
                    settings.storage.images.clone(),
                )
                .with_max_batch(max_batch),
            );
            vec![DeviceSlot {
                label: "cpu#0".into(),
                runner: match gate {
                    Some(gate) => gate.wrap(engine),
                    None => engine,
                },
            }]
        } else {
            slots(&[&runner])
                .into_iter()
                .map(|slot| DeviceSlot {
                    label: slot.label,
                    runner: match gate {
                        Some(gate) => gate.wrap(slot.runner),
                        None => slot.runner,
                    },
                })
                .collect()
        };
        let mut scheduler_options = options(&dir);
        scheduler_options.images = settings.storage.images.clone();
        scheduler_options.queue_capacity = capacity;
        let scheduler = Scheduler::start(pool.clone(), scheduler_options, devices)
            .await
            .unwrap();
        let bot = Self::launch(discord, dir, pool, scheduler, settings).await;
        (bot, runner)
    }

    /// Starts a front-end bot on PostgreSQL with no devices of its own, and a worker as on
    /// another host: its own pool and images directory, the real tiny engine, sharing nothing
    /// with the bot but the database.
    pub(crate) async fn start_front_end(gate: &Gate) -> (Self, Scheduler, TempDir) {
        let (_guard, pool) = crate::support::test_db(vqclip::store::Backend::Postgres).await;
        let (bot, mut workers) = Self::start_front_end_on(pool, gate, 1).await;
        let (worker, elsewhere) = workers.pop().unwrap();
        (bot, worker, elsewhere)
    }

    /// As [`Self::start_front_end`] on the database of `pool`, with `workers` workers
    /// (`gpu-elsewhere-1`, `-2`, …, each with one device labelled `cuda:7`) whose jobs all pass
    /// through `gate`.
    pub(crate) async fn start_front_end_on(
        pool: Store,
        gate: &Gate,
        workers: usize,
    ) -> (Self, Vec<(Scheduler, TempDir)>) {
        use vqclip::jobs::scheduler::ClaimOptions;
        let discord = FakeDiscord::start().await;
        let dir = tempfile::tempdir().unwrap();
        // 20 steps at most: a zoom video of 2 frames.
        let settings = bot_settings(
            &discord,
            &dir,
            "[generation]\nmax_steps = 20\ndefault_steps = 20",
            "devices = []\n",
        );
        let mut front = options(&dir);
        front.images = settings.storage.images.clone();
        let mut claims = ClaimOptions::for_this_process(Duration::from_secs(10));
        claims.follow = Some(Duration::from_millis(100));
        front.claims = Some(claims);
        let scheduler = Scheduler::start(pool.clone(), front, Vec::new())
            .await
            .unwrap();

        let mut started = Vec::new();
        for n in 1..=workers {
            let elsewhere = tempfile::tempdir().unwrap();
            let remote_pool = vqclip::store::connect(pool.location()).await.unwrap();
            let mut remote = options(&elsewhere);
            remote.images = elsewhere.path().join("images");
            let mut claims = ClaimOptions::for_this_process(Duration::from_secs(10));
            claims.host = "gpu-elsewhere".into();
            claims.worker_id = format!("gpu-elsewhere-{n}");
            remote.claims = Some(claims);
            let device = DeviceSlot {
                label: "cuda:7".into(),
                runner: gate.wrap(Box::new(vqclip::jobs::engine::EngineRunner::new(
                    candle_core::Device::Cpu,
                    fetcher(&settings),
                    1024,
                    remote.images.clone(),
                ))),
            };
            let worker = Scheduler::start(remote_pool, remote, vec![device])
                .await
                .unwrap();
            started.push((worker, elsewhere));
        }
        let bot = Self::launch(discord, dir, pool, scheduler, settings).await;
        (bot, started)
    }

    /// Connects a bot with these parts.
    pub(crate) async fn launch(
        discord: FakeDiscord,
        dir: TempDir,
        pool: Store,
        scheduler: Scheduler,
        settings: Settings,
    ) -> Self {
        let mut bot = Self {
            discord,
            dir,
            pool,
            scheduler,
            settings: Arc::new(settings),
            stop: None,
            task: None,
        };
        bot.connect().await;
        bot
    }

    /// (Re)connects the bot and waits for its command registration.
    pub(crate) async fn connect(&mut self) {
        let registered = self.count(|r| r.method == "PUT" && r.path.ends_with("/commands"));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        self.task = Some(tokio::spawn(vqclip::bot::run(
            self.settings.clone(),
            self.pool.clone(),
            self.scheduler.clone(),
            vqclip::bot::Gateway::default(),
            async move {
                let _ = stop_rx.await;
            },
        )));
        self.stop = Some(stop_tx);
        let discord = self.discord.clone();
        eventually("command registration", || {
            (discord
                .log()
                .iter()
                .filter(|r| r.method == "PUT" && r.path.ends_with("/commands"))
                .count()
                > registered)
                .then_some(())
        })
        .await;
    }

    pub(crate) async fn disconnect(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    pub(crate) async fn stop(mut self) {
        self.disconnect().await;
        self.scheduler.shutdown(Duration::from_secs(1)).await;
    }

    pub(crate) fn count(&self, what: impl Fn(&Request_) -> bool) -> usize {
        self.discord.log().iter().filter(|r| what(r)).count()
    }

    /// Dispatches an interaction and returns its response callback.
    pub(crate) async fn interact(&self, payload: Value) -> Request_ {
        let id = payload["id"].as_str().unwrap().to_owned();
        self.discord.dispatch("INTERACTION_CREATE", payload);
        eventually("the interaction's response", || {
            self.discord
                .log()
                .into_iter()
                .find(|r| r.path.starts_with(&format!("/interactions/{id}/")))
        })
        .await
    }

    /// An interaction of `kind` with `data` by `user` (with `permissions`) in the guild's
    /// channel 900.
    pub(crate) fn interaction(
        &self,
        kind: u64,
        data: Value,
        user_id: u64,
        permissions: &str,
    ) -> Value {
        json!({
            "id": self.discord.id().to_string(),
            "application_id": APP_ID.to_string(),
            "type": kind,
            "data": data,
            "guild_id": GUILD.to_string(),
            "channel_id": "900",
            "member": member(user_id, permissions),
            "token": format!("token-{}", self.discord.id()),
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "app_permissions": "0",
            "authorizing_integration_owners": {},
            "context": 0,
            "attachment_size_limit": 10485760
        })
    }

    /// A slash command by `user` (with `permissions`).
    pub(crate) fn command(
        &self,
        user_id: u64,
        permissions: &str,
        name: &str,
        options: Value,
    ) -> Value {
        let data = json!({ "id": "1", "name": name, "type": 1, "options": options,
            "resolved": {
                "channels": { GALLERY.to_string(): {
                    "id": GALLERY.to_string(), "type": 0, "name": "gallery",
                    "permissions": "0" } },
                "attachments": self.attachments() } });
        self.interaction(2, data, user_id, permissions)
    }

    pub(crate) fn attachments(&self) -> Value {
        let picture = image::RgbImage::from_fn(48, 32, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 7) as u8, 128])
        });
        let png = vqclip::engine::image::encode_png(&picture).unwrap();
        let good = self.discord.attach("start.png", png.clone());
        let bad = self
            .discord
            .attach("notes.png", b"not a picture at all".to_vec());
        let other = image::RgbImage::from_fn(40, 40, |x, y| {
            image::Rgb([200, (x * 6) as u8, (y * 6) as u8])
        });
        let other = vqclip::engine::image::encode_png(&other).unwrap();
        let other_url = self.discord.attach("other.png", other.clone());
        json!({
            "11": { "id": "11", "filename": "start.png", "size": png.len(), "url": good,
                    "proxy_url": good, "content_type": "image/png" },
            "12": { "id": "12", "filename": "notes.png", "size": 20, "url": bad,
                    "proxy_url": bad, "content_type": "image/png" },
            "13": { "id": "13", "filename": "huge.png", "size": 9 << 20, "url": good,
                    "proxy_url": good, "content_type": "image/png" },
            "14": { "id": "14", "filename": "other.png", "size": other.len(), "url": other_url,
                    "proxy_url": other_url, "content_type": "image/png" }
        })
    }

    pub(crate) fn imagine(&self, user_id: u64, prompt: &str) -> Value {
        self.command(
            user_id,
            MEMBER,
            "imagine",
            json!([{ "name": "prompt", "type": 3, "value": prompt }]),
        )
    }

    /// A button press by `user` on message `message_id`.
    pub(crate) fn press(
        &self,
        user_id: u64,
        permissions: &str,
        custom_id: &str,
        message_id: u64,
    ) -> Value {
        let data = json!({ "custom_id": custom_id, "component_type": 2 });
        let mut payload = self.interaction(3, data, user_id, permissions);
        payload["message"] = message(message_id, "900", &json!(""));
        payload
    }

    /// `user` reacts with `emoji` to `message_id` in `channel`.
    pub(crate) fn react(&self, user_id: u64, channel: u64, message_id: u64, emoji: &str) {
        self.discord.dispatch(
            "MESSAGE_REACTION_ADD",
            json!({
                "user_id": user_id.to_string(), "channel_id": channel.to_string(),
                "message_id": message_id.to_string(), "guild_id": GUILD.to_string(),
                "member": member(user_id, MEMBER),
                "emoji": { "id": null, "name": emoji },
                "burst": false, "burst_colors": [], "type": 0
            }),
        );
    }

    /// The posted result message of `job` (channel, message) once recorded.
    pub(crate) async fn result_of(&self, job: JobId) -> (u64, u64) {
        assert_eq!(finished(&self.pool, job).await, JobStatus::Succeeded);
        for _ in 0..1500 {
            if let Some(found) = jobs::get_job_result(&self.pool, job).await.unwrap() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no result message for job {job}");
    }

    pub(crate) async fn job(&self, id: i64) -> jobs::Job {
        jobs::get_job(&self.pool, JobId(id)).await.unwrap().unwrap()
    }

    pub(crate) async fn job_count(&self) -> usize {
        jobs::list_recent_jobs(&self.pool, None, 100)
            .await
            .unwrap()
            .len()
    }
}

fn member(user_id: u64, permissions: &str) -> Value {
    json!({ "user": user(user_id, &format!("user{user_id}"), false), "roles": [],
            "joined_at": "2026-01-01T00:00:00.000000+00:00", "deaf": false, "mute": false,
            "flags": 0, "pending": false, "permissions": permissions })
}

/// Dispatches a command that defers its answer and returns the private refusal that follows:
/// the public "thinking…" message resolved, then an ephemeral follow-up, then that message
/// deleted, in that order (a first follow-up would replace the deferred message publicly).
pub(crate) async fn refused_after_deferral(bot: &Bot, payload: Value) -> Request_ {
    let token = payload["token"].as_str().unwrap().to_owned();
    let ack = bot.interact(payload).await;
    assert_eq!(ack.json["type"], 5, "{ack:?}");
    eventually("the deferred message deleted", || {
        bot.discord
            .log()
            .into_iter()
            .find(|r| r.method == "DELETE" && r.path.contains(&token))
    })
    .await;
    let log = bot.discord.log();
    let at = |what: &dyn Fn(&Request_) -> bool| {
        log.iter()
            .position(|r| r.path.contains(&token) && what(r))
            .unwrap_or_else(|| panic!("{log:#?}"))
    };
    let resolved = at(&|r| r.method == "PATCH");
    let private = at(&|r| r.method == "POST" && r.path.starts_with("/webhooks/"));
    let deleted = at(&|r| r.method == "DELETE");
    assert!(resolved < private && private < deleted, "{log:#?}");
    assert_eq!(log[private].json["flags"], 64, "{:?}", log[private]);
    log[private].clone()
}

pub(crate) fn custom_ids(components: &Value) -> Vec<String> {
    components
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row["components"].as_array().cloned().unwrap_or_default())
        .map(|b| b["custom_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

pub(crate) fn text(r: &Request_) -> String {
    let content = if r.json["data"].is_object() {
        &r.json["data"]["content"]
    } else {
        &r.json["content"]
    };
    content.as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buttons_and_reactions_rerun_upscale_and_vary_even_after_a_restart() {
    // The first job waits at step 4 (a preview is out at 2 and 4) until its message showed one.
    let gate = Gate::at(4);
    let (mut bot, _) = Bot::start_gated("", true, 0, Some(&gate), 10).await;

    // /imagine with the tiny model: a cancel button while it runs, then the picture with its
    // buttons.
    let opened = bot.interact(bot.imagine(77, "a red fox --steps 8")).await;
    assert_eq!(
        custom_ids(&opened.json["data"]["components"]),
        ["vq:cancel:1"]
    );
    gate.reached().await;
    eventually("a preview while the job runs", || {
        (bot.count(|r| {
            r.method == "PATCH"
                && r.path.ends_with("/@original")
                && r.files.iter().any(|(name, _)| name == "preview.jpg")
        }) >= 1)
            .then_some(())
    })
    .await;
    gate.release();
    let (channel, result) = bot.result_of(JobId(1)).await;
    let posted = eventually("the result message", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "POST" && r.path == "/channels/900/messages" && !r.files.is_empty()
        })
    })
    .await;
    assert_eq!(
        custom_ids(&posted.json["components"]),
        [
            "vq:rerun:1",
            "vq:upscale:1",
            "vq:vary:1",
            "vq:gif:1",
            "vq:subtle:1",
            "vq:strong:1",
            "vq:video:1",
            "vq:zoom:1",
            "vq:widen:1",
            "vq:panleft:1",
            "vq:panright:1",
            "vq:panup:1",
            "vq:pandown:1"
        ]
    );
    let last_edit = eventually("the stub", || {
        bot.discord.log().into_iter().rev().find(|r| {
            r.method == "PATCH" && r.path.ends_with("/@original") && text(r).contains("done ↓")
        })
    })
    .await;
    assert_eq!(last_edit.json["components"], json!([]), "no cancel button");
    let first = bot.job(1).await;
    assert_eq!((first.width, first.height), (64, 64));
    // Previews replaced the image of the progress message while it ran.
    assert!(
        bot.count(|r| r.method == "PATCH"
            && r.path.ends_with("/@original")
            && r.files.iter().any(|(name, _)| name == "preview.jpg"))
            >= 1
    );

    // 🎞️: the run's time-lapse, for anyone.
    let gif = bot
        .interact(bot.press(88, MEMBER, "vq:gif:1", result))
        .await;
    assert_eq!(gif.json["type"], 4);
    assert_eq!(gif.files.len(), 1, "{gif:?}");
    assert!(gif.files[0].0.ends_with(".gif"));

    // 🔁 by someone else is refused privately; nothing is queued.
    let refused = bot
        .interact(bot.press(88, MEMBER, "vq:rerun:1", result))
        .await;
    assert_eq!(refused.json["data"]["flags"], 64);
    assert!(text(&refused).contains("Only the person"), "{refused:?}");
    assert_eq!(bot.job_count().await, 1);

    // 🔁 by its owner: a new job with a new seed, answered in its own message.
    let rerun = bot
        .interact(bot.press(77, MEMBER, "vq:rerun:1", result))
        .await;
    assert!(text(&rerun).contains("rerun of job 1"), "{rerun:?}");
    let second = bot.job(2).await;
    assert_eq!(
        (second.kind, second.parent, second.prompt.as_str()),
        (JobKind::Rerun, Some(JobId(1)), "a red fox --steps 8")
    );
    assert_ne!(second.seed, first.seed);
    bot.result_of(JobId(2)).await;

    // ⬆️ by reaction on the result: twice the size, from job 1's final latent.
    bot.react(77, channel, result, "⬆️");
    let opening = eventually("the upscale's message", || {
        bot.discord
            .log()
            .into_iter()
            .find(|r| r.method == "POST" && text(r).contains("upscale of job 1"))
    })
    .await;
    assert_eq!(
        opening.json["message_reference"]["message_id"],
        result.to_string()
    );
    bot.result_of(JobId(3)).await;
    let upscaled = bot.job(3).await;
    assert_eq!(upscaled.kind, JobKind::Upscale);
    let png = std::fs::read(upscaled.output_path.unwrap()).unwrap();
    let picture = vqclip::engine::image::decode(&png).unwrap();
    assert_eq!(picture.dimensions(), (128, 128));

    // A restart: the old message's buttons still work (everything is in the database).
    bot.disconnect().await;
    bot.connect().await;
    let vary = bot
        .interact(bot.press(77, MEMBER, "vq:vary:1", result))
        .await;
    assert!(text(&vary).contains("variation of job 1"), "{vary:?}");
    bot.result_of(JobId(4)).await;
    let variation = bot.job(4).await;
    assert_eq!(
        (variation.kind, variation.width, variation.steps),
        (JobKind::Variation, 64, 4)
    );
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_by_button_and_by_reaction() {
    let (bot, _) = Bot::start("", false, 30).await;
    bot.interact(bot.imagine(77, "hang")).await;
    wait_running(&bot.pool, 1).await;
    let message = bot.job(1).await.message_id.unwrap();

    let refused = bot
        .interact(bot.press(88, MEMBER, "vq:cancel:1", message))
        .await;
    assert!(text(&refused).contains("Only the person"), "{refused:?}");
    let stopped = bot
        .interact(bot.press(77, MEMBER, "vq:cancel:1", message))
        .await;
    assert!(text(&stopped).contains("stops after its current step"));
    assert_eq!(finished(&bot.pool, JobId(1)).await, JobStatus::Cancelled);
    let stub = eventually("the cancelled message", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "PATCH" && r.path.ends_with("/@original") && text(r).contains("cancelled")
        })
    })
    .await;
    assert_eq!(stub.json["components"], json!([]));

    // A moderator may cancel anyone's job; ❌ on the progress message does the same.
    bot.interact(bot.imagine(77, "hang")).await;
    wait_running(&bot.pool, 2).await;
    let message = bot.job(2).await.message_id.unwrap();
    bot.react(77, 900, message, "❌");
    assert_eq!(finished(&bot.pool, JobId(2)).await, JobStatus::Cancelled);
    bot.interact(bot.imagine(77, "hang")).await;
    wait_running(&bot.pool, 3).await;
    let message = bot.job(3).await.message_id.unwrap();
    bot.interact(bot.press(99, MODERATOR, "vq:cancel:3", message))
        .await;
    assert_eq!(finished(&bot.pool, JobId(3)).await, JobStatus::Cancelled);

    // /queue lists the workers on other hosts: devices and jobs of live ones, lost ones as lost.
    use vqclip::store::workers;
    let devices = ["cuda:0".to_owned(), "cuda:1".to_owned()];
    workers::register_worker(&bot.pool, "gpu7-1-1", "gpu7", &devices)
        .await
        .unwrap();
    workers::register_worker(&bot.pool, "gpu8-1-1", "gpu8", &devices[..1])
        .await
        .unwrap();
    workers::register_worker(&bot.pool, "gpu9-1-1", "gpu9", &devices[..1])
        .await
        .unwrap();
    workers::stop_worker(&bot.pool, "gpu9-1-1").await.unwrap();
    let remote = jobs::insert_job(&bot.pool, &crate::support::sample_job(5, "remote"))
        .await
        .unwrap();
    let filter = workers::ClaimFilter {
        vqgan_models: None,
        clip_models: None,
        max_running_per_user: 1,
        prioritize_follow_ups: true,
    };
    let lease = Duration::from_secs(600);
    let claimed = workers::claim_next_job(&bot.pool, "gpu7-1-1", "cuda:1", lease, &filter)
        .await
        .unwrap();
    assert_eq!(claimed.map(|j| j.id), Some(remote));
    // gpu8 last beat two minutes ago: longer than a lease (30 s).
    let old = vqclip::store::Timestamp::now().minus(Duration::from_secs(120));
    sqlx::query("UPDATE workers SET heartbeat_at = $1 WHERE id = 'gpu8-1-1'")
        .bind(old)
        .execute(bot.pool.pool())
        .await
        .unwrap();
    let queue = text(
        &bot.interact(bot.command(77, MEMBER, "queue", json!([])))
            .await,
    );
    assert!(queue.contains("**Workers**"), "{queue}");
    assert!(
        queue.contains(&format!("gpu7: `cuda:0`, `cuda:1` — job {remote}")),
        "{queue}"
    );
    assert!(queue.contains("gpu8: lost (no heartbeat for 12"), "{queue}");
    assert!(
        !queue.contains("gpu9"),
        "stopped workers are not listed: {queue}"
    );
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_end_bot_follows_jobs_a_worker_elsewhere_runs() {
    // The remote job waits at step 4 until the bot showed its progress and a preview.
    let gate = Gate::at(4);
    let (bot, worker, elsewhere) = Bot::start_front_end(&gate).await;

    let opened = bot.interact(bot.imagine(77, "a red fox --steps 8")).await;
    assert!(text(&opened).contains("a red fox"), "{opened:?}");
    gate.reached().await;
    eventually("progress and a preview from the database", || {
        let edits = |preview: bool| {
            bot.count(|r| {
                r.method == "PATCH"
                    && r.path.ends_with("/messages/@original")
                    && text(r).contains("% on cuda:7")
                    && (!preview || r.files.iter().any(|(name, _)| name == "preview.jpg"))
            })
        };
        (edits(false) >= 1 && edits(true) >= 1).then_some(())
    })
    .await;
    gate.release();
    // The remote worker claims it; the bot learns of every step from the database.
    let posted = eventually("the result message", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "POST" && r.path == "/channels/900/messages" && !r.files.is_empty()
        })
    })
    .await;
    assert!(posted.files[0].0.ends_with(".png"), "{posted:?}");
    let job = bot.job(1).await;
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.worker.as_deref(), Some("gpu-elsewhere-1"));
    // The picture the bot posted is the one the worker made, which only the worker's disk has.
    let made = std::fs::read(elsewhere.path().join("images/1.png")).unwrap();
    assert_eq!(posted.files[0].1, made.len());
    assert!(!bot.dir.path().join("images/1.png").exists());
    let edits: Vec<String> = bot
        .discord
        .log()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/messages/@original"))
        .map(text)
        .collect();
    assert!(edits.iter().any(|e| e.contains("% on cuda:7")), "{edits:?}");
    assert!(
        bot.count(|r| r.method == "PATCH"
            && r.path.ends_with("/@original")
            && r.files.iter().any(|(name, _)| name == "preview.jpg"))
            >= 1,
        "previews travel through the database"
    );

    // 🎞️ and ⬆️ work on the remote job: the time-lapse and the latent come from the database.
    let (_, result) = bot.result_of(JobId(1)).await;
    let gif = bot
        .interact(bot.press(88, MEMBER, "vq:gif:1", result))
        .await;
    assert_eq!(gif.files.len(), 1, "{gif:?}");
    bot.interact(bot.press(77, MEMBER, "vq:upscale:1", result))
        .await;
    assert_eq!(finished(&bot.pool, JobId(2)).await, JobStatus::Succeeded);
    let upscale = bot.job(2).await;
    assert_eq!((upscale.kind, upscale.width), (JobKind::Upscale, 128));
    assert!(elsewhere.path().join("images/2.png").is_file());

    // 🎬 too: the worker fetches the picture from the database (the bot's disk has none, and
    // the worker's copy is gone) and stores the MP4 there for the bot to post.
    let picture = elsewhere.path().join("images/1.png");
    std::fs::remove_file(&picture).unwrap();
    bot.interact(bot.press(77, MEMBER, "vq:video:1", result))
        .await;
    assert_eq!(finished(&bot.pool, JobId(3)).await, JobStatus::Succeeded);
    let video = eventually("the video's result", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "POST"
                && r.path == "/channels/900/messages"
                && r.files.iter().any(|(name, _)| name == "vqclip-3.mp4")
        })
    })
    .await;
    let made = std::fs::read(elsewhere.path().join("images/3.mp4")).unwrap();
    assert_eq!(video.file_bytes[0].as_ref(), made.as_slice());
    assert!(picture.is_file(), "the picture was not fetched");
    assert!(!bot.dir.path().join("images/3.mp4").exists());

    worker.shutdown(Duration::from_secs(1)).await;
    bot.stop().await;
}

/// PostgreSQL restarts in the middle of a run of two workers and a front-end bot, as an
/// administrator's restart or a failover does: no job is lost or fails, each result is posted
/// once, and the bot goes on taking requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_run_loses_no_job_and_the_bot_carries_on() {
    crate::support::init_test_log();
    let server = crate::postgres::PrivateServer::start();
    let location = vqclip::store::Location::Postgres(server.new_database().await);
    let pool = vqclip::store::connect(&location).await.unwrap();
    vqclip::store::migrate(&pool).await.unwrap();
    // The first job to reach step 3 waits there while the server goes down and comes back.
    let gate = Gate::at(3);
    let (bot, workers) = Bot::start_front_end_on(pool, &gate, 2).await;
    let prompts = ["a red fox", "a blue heron", "a green frog", "a grey moth"];
    for (user, prompt) in (77..).zip(&prompts[..3]) {
        let opened = bot
            .interact(bot.imagine(user, &format!("{prompt} --steps 6")))
            .await;
        assert!(text(&opened).contains(prompt), "{opened:?}");
    }
    gate.reached().await;
    server.stop();
    // Long enough for every client to find its connections gone, short of a lease (10 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start_again();
    gate.release();

    let opened = bot
        .interact(bot.imagine(80, &format!("{} --steps 6", prompts[3])))
        .await;
    assert!(text(&opened).contains(prompts[3]), "{opened:?}");
    for id in 1..=4 {
        assert_eq!(
            finished(&bot.pool, JobId(id)).await,
            JobStatus::Succeeded,
            "job {id}"
        );
    }
    for id in 1..=4 {
        let job = bot.job(id).await;
        // A run whose end was being recorded at the moment the server went down runs again
        // (its lease is not renewed); none more than that.
        assert!(job.attempts <= 2, "{job:?}");
    }
    let posts = eventually("the four results", || {
        let posts: Vec<Request_> = bot
            .discord
            .log()
            .into_iter()
            .filter(|r| {
                r.method == "POST" && r.path == "/channels/900/messages" && !r.files.is_empty()
            })
            .collect();
        (posts.len() >= 4).then_some(posts)
    })
    .await;
    for prompt in prompts {
        assert_eq!(
            posts.iter().filter(|p| text(p).contains(prompt)).count(),
            1,
            "{prompt} posted once: {posts:?}"
        );
    }
    for (worker, _) in workers {
        worker.shutdown(Duration::from_secs(1)).await;
    }
    bot.stop().await;
}

async fn wait_running(pool: &Store, id: i64) {
    for _ in 0..1500 {
        let job = jobs::get_job(pool, JobId(id)).await.unwrap();
        if job.is_some_and(|j| j.status == JobStatus::Running && j.message_id.is_some()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gallery_posts_votes_rankings_and_moderation() {
    let (bot, _) = Bot::start(
        "[web]\npublic_url = \"https://art.example.org/vq\"\n",
        false,
        5,
    )
    .await;
    let admin = |user_id: u64, permissions: &str, sub: &str, options: Value| {
        bot.command(
            user_id,
            permissions,
            "admin",
            json!([{ "name": sub, "type": 1, "options": options }]),
        )
    };
    let channel_option = json!([{ "name": "channel", "type": 7, "value": GALLERY.to_string() }]);

    // Only moderators set the gallery channel.
    let refused = bot
        .interact(admin(77, MEMBER, "gallery", channel_option.clone()))
        .await;
    assert!(text(&refused).contains("Manage Server"), "{refused:?}");
    let set = bot
        .interact(admin(99, MODERATOR, "gallery", channel_option))
        .await;
    assert!(text(&set).contains(&format!("<#{GALLERY}>")), "{set:?}");
    let settings = guilds::get_guild_settings(&bot.pool, GUILD)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(settings.gallery_channel_id, Some(GALLERY));

    // A finished job is posted to the gallery with a ⭐ to vote with.
    bot.interact(bot.imagine(77, "a lighthouse")).await;
    let (result_channel, result) = bot.result_of(JobId(1)).await;
    let post = eventually("the gallery post", || {
        bot.discord
            .log()
            .into_iter()
            .find(|r| r.method == "POST" && r.path == format!("/channels/{GALLERY}/messages"))
    })
    .await;
    assert_eq!(post.files.len(), 1);
    let embed = &post.json["embeds"][0];
    assert!(
        embed["description"]
            .as_str()
            .unwrap()
            .contains("a lighthouse")
    );
    let link = format!("https://discord.com/channels/{GUILD}/{result_channel}/{result}");
    assert!(embed.to_string().contains(&link), "{embed}");
    // The picture's page on the web gallery (web.public_url, made a directory).
    assert!(
        embed
            .to_string()
            .contains("https://art.example.org/vq/i/1\""),
        "{embed}"
    );
    assert_eq!(post.json["allowed_mentions"]["parse"], json!([]));
    // Who asked, by the name the interaction showed, and the guild's name, for the web gallery.
    eventually("the member's name", || {
        let pool = bot.pool.clone();
        futures_now(async move { names::member_name(&pool, GUILD, 77).await.unwrap() })
            .filter(|n| n == "user77")
    })
    .await;
    bot.discord.dispatch(
        "GUILD_UPDATE",
        json!({ "id": GUILD.to_string(), "name": "Pixel <Club>", "icon": null, "splash": null,
                "discovery_splash": null, "owner_id": "99", "afk_channel_id": null,
                "afk_timeout": 300, "verification_level": 0,
                "default_message_notifications": 0, "explicit_content_filter": 0, "roles": [],
                "emojis": [], "features": [], "mfa_level": 0, "application_id": null,
                "system_channel_id": null, "system_channel_flags": 0, "rules_channel_id": null,
                "vanity_url_code": null, "description": null, "banner": null,
                "premium_tier": 0, "preferred_locale": "en-US",
                "public_updates_channel_id": null, "nsfw_level": 0, "stickers": [],
                "premium_progress_bar_enabled": false, "safety_alerts_channel_id": null }),
    );
    // The finished job is on the web gallery: its page unfurls with the picture this host
    // wrote, which is served as it is.
    let (address, web_scheduler, _web_dir, _stop_web) = crate::web_gallery::serve_gallery_of(
        &bot.pool,
        Some("https://art.example.org/vq/"),
        Some(&bot.settings.storage.images),
    )
    .await;
    let (status, _, page) = crate::web::request(address, "GET", "/i/1").await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains(
            "<meta property=\"og:image\" content=\"https://art.example.org/vq/images/1.png\">"
        ),
        "{page}"
    );
    assert!(
        page.contains("a lighthouse") && page.contains("user77"),
        "{page}"
    );
    let (status, head, png) = crate::web::fetch(address, "GET", "/images/1.png", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        crate::web_gallery::header(&head, "content-type"),
        Some("image/png")
    );
    assert_eq!(
        png,
        std::fs::read(bot.settings.storage.images.join("1.png")).unwrap()
    );
    web_scheduler.shutdown(Duration::from_secs(1)).await;
    eventually("the guild's name", || {
        let pool = bot.pool.clone();
        futures_now(async move {
            vqclip::store::public::gallery_name(&pool, GUILD)
                .await
                .unwrap()
        })
        .flatten()
        .filter(|n| n == "Pixel <Club>")
    })
    .await;
    let stored = eventually("the post record", || {
        let pool = bot.pool.clone();
        futures_now(async move {
            gallery::find_gallery_post_by_job(&pool, JobId(1), GUILD)
                .await
                .unwrap()
        })
    })
    .await;
    eventually("the bot's ⭐", || {
        (bot.count(|r| {
            r.method == "PUT"
                && r.path
                    == format!(
                        "/channels/{GALLERY}/messages/{}/reactions/⭐/@me",
                        stored.message_id
                    )
        }) == 1)
            .then_some(())
    })
    .await;

    // ⭐ from two people count; the bot's own does not.
    bot.react(APP_ID, GALLERY, stored.message_id, "⭐");
    bot.react(88, GALLERY, stored.message_id, "⭐");
    bot.react(89, GALLERY, stored.message_id, "⭐");
    eventually("two votes", || {
        let pool = bot.pool.clone();
        futures_now(async move {
            let n = gallery::count_votes(&pool, stored.id, gallery::STAR)
                .await
                .unwrap();
            (n == 2).then_some(())
        })
    })
    .await;

    // Older, unvoted posts make a second page.
    for i in 0..5 {
        let id = jobs::insert_job(&bot.pool, &crate::support::sample_job(70 + i, "older"))
            .await
            .unwrap();
        gallery::insert_gallery_post(&bot.pool, id, GUILD, GALLERY, 1000 + i)
            .await
            .unwrap();
    }
    let top = bot
        .interact(bot.command(
            88,
            MEMBER,
            "gallery",
            json!([{ "name": "top", "type": 1, "options":
                     [{ "name": "period", "type": 4, "value": 2 }] }]),
        ))
        .await;
    let page = &top.json["data"]["embeds"][0];
    assert_eq!(page["fields"][0]["name"], "#1 · ⭐ 2 · job 1", "{page}");
    // The title links to the same ranking on the web gallery.
    assert_eq!(
        page["url"],
        format!("https://art.example.org/vq/g/{GUILD}?sort=top&period=all"),
        "{page}"
    );
    assert_eq!(page["fields"].as_array().unwrap().len(), 5);
    assert_eq!(
        custom_ids(&top.json["data"]["components"]),
        ["vqg:0:ta", "vqg:1:ta"]
    );
    let next = bot.interact(bot.press(88, MEMBER, "vqg:1:ta", 1)).await;
    assert_eq!(next.json["type"], 7, "the listing is updated in place");
    let page = &next.json["data"]["embeds"][0];
    assert!(page["title"].as_str().unwrap().contains("page 2"), "{page}");
    assert_eq!(page["fields"].as_array().unwrap().len(), 1);

    // A moderator takes the post down: the message is deleted and its votes go.
    let removed = bot
        .interact(admin(
            99,
            MODERATOR,
            "remove",
            json!([{ "name": "job", "type": 4, "value": 1 }]),
        ))
        .await;
    assert!(text(&removed).contains("out of the gallery"), "{removed:?}");
    assert_eq!(
        bot.count(|r| r.method == "DELETE"
            && r.path == format!("/channels/{GALLERY}/messages/{}", stored.message_id)),
        1
    );
    assert!(
        gallery::find_gallery_post_by_job(&bot.pool, JobId(1), GUILD)
            .await
            .unwrap()
            .is_none()
    );

    // Pause holds the guild's queue; resume lets it run.
    bot.interact(admin(99, MODERATOR, "pause", json!([]))).await;
    bot.interact(bot.imagine(77, "held back")).await;
    let held = eventually("the held job", || {
        let pool = bot.pool.clone();
        futures_now(async move {
            jobs::list_recent_jobs(&pool, None, 1)
                .await
                .unwrap()
                .into_iter()
                .find(|j| j.prompt == "held back")
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bot.job(held.id.0).await.status, JobStatus::Queued);
    bot.interact(admin(99, MODERATOR, "resume", json!([])))
        .await;
    assert_eq!(finished(&bot.pool, held.id).await, JobStatus::Succeeded);
    bot.stop().await;
}

/// Runs a short future to completion from a synchronous `eventually` check.
fn futures_now<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_and_rate_limits_do_not_stop_a_job() {
    let (bot, _) = Bot::start("", false, 300).await;
    // Tokens die after a second here (Discord's 15 minutes); the first bot-token edit of the
    // message is rate limited for 3 s (longer than the bot's 1 s between edits).
    bot.discord.expire_tokens_after(Duration::from_secs(1));
    bot.discord.rate_limit("channels/900/messages/", 1, 3.0);
    bot.interact(bot.imagine(77, "a long night --steps 12"))
        .await;
    assert_eq!(finished(&bot.pool, JobId(1)).await, JobStatus::Succeeded);
    let message = bot.job(1).await.message_id.unwrap();
    let stub = format!("/channels/900/messages/{message}");
    eventually("the final edit by channel", || {
        bot.discord
            .log()
            .into_iter()
            .find(|r| r.method == "PATCH" && r.path == stub && text(r).contains("done ↓"))
    })
    .await;
    eventually("the result", || {
        bot.discord
            .log()
            .into_iter()
            .find(|r| r.method == "POST" && r.path == "/channels/900/messages")
    })
    .await;
    let log = bot.discord.log();
    // The expired token was refused once; no webhook edit was tried after that.
    let refused = log
        .iter()
        .position(|r| r.path.contains("/webhooks/") && r.status == 401)
        .expect("a refused token");
    assert!(
        !log[refused + 1..]
            .iter()
            .any(|r| r.path.contains("/webhooks/"))
    );
    // After the 429, nothing touched the message before Retry-After had passed.
    let limited = log
        .iter()
        .find(|r| r.path == stub && r.status == 429)
        .expect("a 429");
    let next = log
        .iter()
        .filter(|r| r.path == stub && r.at > limited.at)
        .map(|r| r.at)
        .min()
        .expect("an edit after the 429");
    assert!(
        next - limited.at >= Duration::from_secs(3),
        "{:?}",
        next - limited.at
    );
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_are_checked_and_kept_and_users_are_rate_limited() {
    let (bot, _) = Bot::start("jobs_per_hour = 2", true, 0).await;
    let with = |name: &str, id: &str| {
        bot.command(
            77,
            MEMBER,
            "imagine",
            json!([{ "name": "prompt", "type": 3, "value": "a harbour --steps 2" },
                   { "name": name, "type": 11, "value": id }]),
        )
    };
    // Attachments take time to fetch: the command is acknowledged first (type 5). Not a
    // picture, or too large: refused privately, nothing queued.
    let answer = |payload: Value| refused_after_deferral(&bot, payload);
    let bad = answer(with("init_image", "12")).await;
    assert!(
        text(&bad).contains("init_image is not a picture"),
        "{bad:?}"
    );
    let huge = answer(with("image_prompt", "13")).await;
    assert!(text(&huge).contains("the limit is 8 MiB"), "{huge:?}");
    assert_eq!(bot.job_count().await, 0);

    // A good one is stored under images/inputs and the job starts from it.
    bot.interact(with("init_image", "11")).await;
    assert_eq!(finished(&bot.pool, JobId(1)).await, JobStatus::Succeeded);
    let params: vqclip::jobs::JobParams = serde_json::from_value(bot.job(1).await.params).unwrap();
    let init = params.inputs.init_image.expect("an init image");
    assert!(init.starts_with(bot.dir.path().join("images").join("inputs")));
    assert_eq!(
        vqclip::engine::image::read(&init).unwrap().dimensions(),
        (48, 32)
    );
    bot.interact(with("image_prompt", "11")).await;
    assert_eq!(finished(&bot.pool, JobId(2)).await, JobStatus::Succeeded);

    // Typing a model name offers the matching ones (autocomplete, type 8 answer).
    let mut typing = bot.command(
        77,
        MEMBER,
        "imagine",
        json!([{ "name": "prompt", "type": 3, "value": "x" },
               { "name": "model", "type": 3, "value": "wik", "focused": true }]),
    );
    typing["type"] = json!(4);
    let offered = bot.interact(typing).await;
    assert_eq!(offered.json["type"], 8);
    assert_eq!(
        offered.json["data"]["choices"][0]["value"],
        "wikiart_f16_16384"
    );
    // Typing a flag in the prompt offers the flags it may be, each with what it expects.
    let mut typing = bot.command(
        77,
        MEMBER,
        "imagine",
        json!([{ "name": "prompt", "type": 3, "value": "a castle --op", "focused": true }]),
    );
    typing["type"] = json!(4);
    let offered = bot.interact(typing).await;
    assert_eq!(offered.json["type"], 8);
    assert_eq!(
        offered.json["data"]["choices"],
        json!([{ "name": "--optimizer adam, adamw or diffgrad", "value": "a castle --optimizer " }])
    );

    // The third job within the hour is refused.
    let limited = bot.interact(bot.imagine(77, "one more")).await;
    assert!(text(&limited).contains("allows 2"), "{limited:?}");
    assert_eq!(bot.job_count().await, 2);
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_imagines_from_50_users_runs_each_once_fairly_with_every_ack_in_time() {
    // The device holds the first job until the whole burst is in, so the order the rest run in
    // is the queue's choice alone, however fast the machine.
    // The fake runner (1 ms a step): the bot, the queue and the database are under test here,
    // not the engine.
    let gate = Gate::at(1);
    let (bot, _) = Bot::start_gated("", false, 1, Some(&gate), 250).await;
    let started = std::time::Instant::now();
    // User after user, four each: a first-come queue would serve user 1001 four times first.
    let mut interactions = Vec::new();
    for user in 1001..=1050u64 {
        for n in 1..=4 {
            let prompt = format!("lantern {user}.{n} --steps 3 --size 32x32 --cutn 1");
            let payload = bot.imagine(user, &prompt);
            interactions.push(payload["id"].as_str().unwrap().to_owned());
            bot.discord.dispatch("INTERACTION_CREATE", payload);
        }
    }
    let callbacks = |bot: &Bot| {
        bot.discord
            .log()
            .into_iter()
            .filter(|r| r.path.starts_with("/interactions/") && r.path.ends_with("/callback"))
            .collect::<Vec<_>>()
    };
    eventually("200 acknowledgements", || {
        (callbacks(&bot).len() >= 200).then_some(())
    })
    .await;
    let acks = callbacks(&bot);
    assert_eq!(acks.len(), 200, "one answer per interaction");
    assert!(
        acks.iter().all(|r| r.status == 204),
        "every interaction answered within Discord's 3 s: {:?}",
        acks.iter().filter(|r| r.status != 204).count()
    );
    let latencies = bot.discord.ack_latencies();
    let all_jobs = |pool: Store| async move {
        let mut list = jobs::list_recent_jobs(&pool, None, 1000).await.unwrap();
        list.sort_by_key(|j| j.id);
        list
    };
    let mut stored = Vec::new();
    for _ in 0..3000 {
        stored = all_jobs(bot.pool.clone()).await;
        if stored.len() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored.len(), 200, "every request became a job");
    gate.release();

    let mut done = Vec::new();
    for _ in 0..24_000 {
        done = all_jobs(bot.pool.clone()).await;
        if done.iter().all(|j| j.status.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        done.iter().all(|j| j.status == JobStatus::Succeeded),
        "{:?}",
        done.iter()
            .filter(|j| j.status != JobStatus::Succeeded)
            .map(|j| (j.id, j.status))
            .collect::<Vec<_>>()
    );
    // Exactly once: one result message per job, each job started once.
    let results = eventually("200 result messages", || {
        let posted = bot.count(|r| {
            r.method == "POST" && r.path == "/channels/900/messages" && !r.files.is_empty()
        });
        (posted >= 200).then_some(posted)
    })
    .await;
    assert_eq!(results, 200);
    // Fair: in the order jobs started, every user's k-th job comes before anyone's (k+1)-th.
    let mut by_start = done.clone();
    by_start.sort_by_key(|j| (j.started_at.map(|t| t.as_millis()), j.id));
    let mut seen: std::collections::HashMap<u64, usize> = Default::default();
    let rounds: Vec<usize> = by_start
        .iter()
        .map(|j| {
            let round = seen.entry(j.requester_id).or_default();
            *round += 1;
            *round
        })
        .collect();
    assert!(
        rounds.windows(2).all(|w| w[0] <= w[1]),
        "rounds in start order: {rounds:?}"
    );
    let snapshot = bot.scheduler.snapshot();
    assert!(snapshot.waiting.is_empty());
    let mut sorted = latencies.clone();
    sorted.sort();
    eprintln!(
        "load: 200 /imagine from 50 users in {:.1} s; acknowledgement median {:?}, max {:?}",
        started.elapsed().as_secs_f64(),
        sorted[sorted.len() / 2],
        sorted.last().unwrap()
    );
    bot.stop().await;
}
