//! The bot end to end against the loopback fake Discord: the real poise/serenity client over
//! HTTP and WebSocket, the real scheduler and SQLite, a fake runner in place of the engine.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use vqclip::config::{Environment, Settings};
use vqclip::jobs::Scheduler;
use vqclip::store::jobs::{self, JobStatus};

use crate::fake_discord::{APP_ID, FakeDiscord, user};
use crate::scheduler::{FakeRunner, finished, options, slots};
use crate::support::test_pool;

/// Waits (up to 120 s: debug-built engines on a busy 2-core machine are slow) until `check`
/// finds something.
pub(crate) async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..6000 {
        if let Some(found) = check() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A `/imagine` slash command from user 77 in a DM.
fn imagine(discord: &FakeDiscord, prompt: &str) -> Value {
    command(
        discord,
        "imagine",
        json!([{ "name": "prompt", "type": 3, "value": prompt }]),
    )
}

/// A slash command `name` with `options` from user 77 in a DM.
fn command(discord: &FakeDiscord, name: &str, options: Value) -> Value {
    json!({
        "id": discord.id().to_string(),
        "application_id": APP_ID.to_string(),
        "type": 2,
        "data": { "id": "1", "name": name, "type": 1, "options": options },
        "channel_id": "900",
        "user": user(77, "artist", false),
        "token": format!("token-{}", discord.id()),
        "version": 1,
        "locale": "en-US",
        "entitlements": [],
        "app_permissions": "0",
        "authorizing_integration_owners": {},
        "context": 1,
        "attachment_size_limit": 10485760
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imagine_queues_shows_progress_and_posts_the_result() {
    let discord = FakeDiscord::start().await;
    let (dir, pool) = test_pool().await;
    let env: Environment = [("HOME", dir.path().to_str().unwrap())]
        .into_iter()
        .collect();
    let settings = Settings::from_toml(
        &format!(
            "[discord]\ntoken = \"fake.bot.token\"\napi_base = \"{}\"\n\
             banned_words = [\"gore\"]\n\
             [scheduler]\nprogress_interval_ms = 100\n\
             [models]\nallow_tiny = true\n\
             [generation]\ndefault_vqgan = \"tiny_vqgan\"\ndefault_clip = \"tiny_clip\"\n\
             [moderation]\nnsfw_threshold = 1.0\n",
            discord.url
        ),
        &env,
    )
    .unwrap();
    // Long enough (8 steps × 250 ms) for a progress edit after the first second.
    let runner = FakeRunner::new(250);
    let scheduler = Scheduler::start(pool.clone(), options(&dir), slots(&[&runner]))
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = vqclip::bot::Gateway::default();
    assert!(
        !gateway.connected().await,
        "not connected before the bot starts"
    );
    let bot = tokio::spawn(vqclip::bot::run(
        Arc::new(settings),
        pool.clone(),
        scheduler.clone(),
        gateway.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // Connected with only the intents it needs, and its commands registered.
    let identify = eventually("IDENTIFY", || discord.identified()).await;
    assert_eq!(
        identify["intents"].as_u64(),
        Some(vqclip::bot::intents().bits())
    );
    assert!(
        identify["token"]
            .as_str()
            .unwrap()
            .contains("fake.bot.token")
    );
    eventually("command registration", || {
        discord
            .log()
            .iter()
            .any(|r| r.method == "PUT" && r.path.ends_with("/commands"))
            .then_some(())
    })
    .await;
    // The readiness probe sees the gateway connection.
    for _ in 0..500 {
        if gateway.connected().await {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        gateway.connected().await,
        "the gateway connection is reported"
    );

    discord.dispatch(
        "INTERACTION_CREATE",
        imagine(&discord, "a red fox --steps 8"),
    );

    // Answered at once with a real reply: where the job stands.
    let callback = eventually("the interaction response", || {
        discord
            .log()
            .into_iter()
            .find(|r| r.path.ends_with("/callback"))
    })
    .await;
    assert_eq!(callback.json["type"], 4);
    let first = callback.json["data"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        first.contains("`a red fox --steps 8`") && first.contains("<@77>"),
        "{first}"
    );
    assert_eq!(
        callback.json["data"]["allowed_mentions"]["parse"],
        json!([])
    );

    // The result arrives as a new message with the picture and its facts.
    let result = eventually("the result message", || {
        discord
            .log()
            .into_iter()
            .find(|r| r.method == "POST" && r.path == "/channels/900/messages")
    })
    .await;
    assert_eq!(result.files.len(), 1, "{result:?}");
    assert!(result.files[0].0.ends_with(".png"));
    let embed = &result.json["embeds"][0];
    let fields: Vec<&str> = embed["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["Seed", "Steps", "Size", "Models", "Time", "Job"]);
    assert_eq!(result.json["allowed_mentions"]["users"], json!(["77"]));

    let job = jobs::list_recent_jobs(&pool, None, 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(finished(&pool, job.id).await, JobStatus::Succeeded);
    assert_eq!(job.requester_id, 77);
    assert_eq!(job.steps, 8);
    assert!(job.message_id.is_some(), "the job knows its message");

    // The progress message was edited while it ran, then left as a stub without the preview
    // (that last edit may come just after the result is posted: waited for, not raced).
    let edits = || -> Vec<String> {
        discord
            .log()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/messages/@original"))
            .map(|r| r.json["content"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let edits = eventually("the stub edit", || {
        let edits = edits();
        edits
            .last()
            .is_some_and(|e| e.contains("(done ↓)"))
            .then_some(edits)
    })
    .await;
    assert!(edits.iter().any(|e| e.contains("% on cpu#0")), "{edits:?}");

    // /job shows how to make it again; /history lists it.
    let answer = |payload: Value| {
        let id = payload["id"].as_str().unwrap().to_owned();
        discord.dispatch("INTERACTION_CREATE", payload);
        let discord = discord.clone();
        async move {
            eventually("an answer", || {
                discord
                    .log()
                    .into_iter()
                    .find(|r| r.path.starts_with(&format!("/interactions/{id}/")))
            })
            .await
        }
    };
    let shown = answer(command(
        &discord,
        "job",
        json!([{ "name": "id", "type": 4, "value": job.id.0 }]),
    ))
    .await;
    let fields = shown.json["data"]["embeds"][0]["fields"]
        .as_array()
        .unwrap()
        .clone();
    let field = |name: &str| {
        fields
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["value"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {fields:?}"))
    };
    assert_eq!(field("status"), "succeeded");
    assert_eq!(field("seed"), job.seed.to_string());
    assert!(field("again").contains("vqclip imagine"), "{fields:?}");
    let listed = answer(command(&discord, "history", json!([]))).await;
    let text = listed.json["data"]["content"].as_str().unwrap();
    assert!(
        text.contains(&format!("**{}** succeeded", job.id)) && text.contains("a red fox"),
        "{text}"
    );

    // A banned word is refused privately, and nothing is queued.
    let refused = imagine(&discord, "so much GORE");
    let refused_id = refused["id"].as_str().unwrap().to_owned();
    discord.dispatch("INTERACTION_CREATE", refused);
    let answer = eventually("the refusal", || {
        discord
            .log()
            .into_iter()
            .find(|r| r.path.starts_with(&format!("/interactions/{refused_id}/")))
    })
    .await;
    assert_eq!(answer.json["data"]["flags"], 64, "ephemeral: {answer:?}");
    let text = answer.json["data"]["content"].as_str().unwrap();
    assert!(
        text.contains("does not accept") && text.contains("gore"),
        "{text}"
    );
    assert_eq!(
        jobs::list_recent_jobs(&pool, None, 10).await.unwrap().len(),
        1
    );

    // The method's options reach the job: a seamless tile, trained by DiffGrad.
    discord.dispatch(
        "INTERACTION_CREATE",
        command(
            &discord,
            "imagine",
            json!([
                { "name": "prompt", "type": 3, "value": "a brick wall --steps 2" },
                { "name": "tile", "type": 5, "value": true },
                { "name": "optimizer", "type": 3, "value": "diffgrad" }
            ]),
        ),
    );
    let mut tiled = None;
    for _ in 0..500 {
        let recent = jobs::list_recent_jobs(&pool, None, 10).await.unwrap();
        if let Some(job) = recent.into_iter().find(|j| j.prompt.contains("brick")) {
            tiled = Some(job);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tiled = tiled.expect("the tile job was queued");
    let params: vqclip::jobs::JobParams = serde_json::from_value(tiled.params).unwrap();
    assert!(params.spec.tile);
    assert_eq!(
        params.spec.optimizer,
        vqclip::engine::optimize::Optimizer::DiffGrad
    );
    // An optimiser that does not exist is refused with the ones that do.
    let unknown = command(
        &discord,
        "imagine",
        json!([
            { "name": "prompt", "type": 3, "value": "a brick wall" },
            { "name": "optimizer", "type": 3, "value": "sgd" }
        ]),
    );
    let unknown_id = unknown["id"].as_str().unwrap().to_owned();
    discord.dispatch("INTERACTION_CREATE", unknown);
    let answer = eventually("the optimiser refusal", || {
        discord
            .log()
            .into_iter()
            .find(|r| r.path.starts_with(&format!("/interactions/{unknown_id}/")))
    })
    .await;
    let text = answer.json["data"]["content"].as_str().unwrap();
    assert!(text.contains("adam, adamw, diffgrad"), "{text}");

    let _ = stop_tx.send(());
    bot.await.unwrap().unwrap();
    scheduler.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_earlier_jobs_keep_their_messages_updating() {
    let discord = FakeDiscord::start().await;
    let (dir, pool) = test_pool().await;
    // A job from before the restart: queued, with its message in channel 900.
    let (job, _) = crate::scheduler::request(77, "hang", 4);
    let id = jobs::insert_job(&pool, &job).await.unwrap();
    jobs::set_job_message(&pool, id, 900, 555).await.unwrap();

    let env: Environment = [("HOME", dir.path().to_str().unwrap())]
        .into_iter()
        .collect();
    let settings = Settings::from_toml(
        &format!(
            "[discord]\ntoken = \"fake.bot.token\"\napi_base = \"{}\"\n\
             [scheduler]\nprogress_interval_ms = 100\n\
             [moderation]\nnsfw_action = \"off\"\n",
            discord.url
        ),
        &env,
    )
    .unwrap();
    let runner = FakeRunner::new(100);
    let scheduler = Scheduler::start(pool.clone(), options(&dir), slots(&[&runner]))
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let bot = tokio::spawn(vqclip::bot::run(
        Arc::new(settings),
        pool.clone(),
        scheduler.clone(),
        vqclip::bot::Gateway::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // No interaction token survives a restart: the bot edits its own message by channel.
    let edit = eventually("a progress edit of the old message", || {
        discord.log().into_iter().find(|r| {
            r.method == "PATCH"
                && r.path == "/channels/900/messages/555"
                && r.json["content"]
                    .as_str()
                    .unwrap_or("")
                    .contains("% on cpu#0")
        })
    })
    .await;
    assert!(edit.json["content"].as_str().unwrap().contains("<@77>"));
    runner
        .release
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(finished(&pool, id).await, JobStatus::Succeeded);
    let result = eventually("the result", || {
        discord
            .log()
            .into_iter()
            .find(|r| r.method == "POST" && r.path == "/channels/900/messages")
    })
    .await;
    assert_eq!(result.files.len(), 1);
    assert_eq!(result.json["message_reference"]["message_id"], "555");

    let _ = stop_tx.send(());
    bot.await.unwrap().unwrap();
    scheduler.shutdown(Duration::from_secs(1)).await;
}
