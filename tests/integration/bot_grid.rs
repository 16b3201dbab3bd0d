//! A 2×2 grid end to end against the loopback fake Discord, on the real tiny engine: the
//! composite with U1–U4 / V1–V4 / 🔄, U2 upscaling exactly the second image, V3, 🔄, the
//! reactions 1️⃣–4️⃣ and a restart between.

use vqclip::jobs::{JobId, JobParams};
use vqclip::store::jobs::JobKind;

use crate::bot::eventually;
use crate::bot_actions::{Bot, MEMBER, custom_ids, text};
use crate::cli::vqclip;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_posts_one_composite_and_its_buttons_act_on_the_chosen_image() {
    // The job waits after its first step (which has a preview) until the bot has shown it.
    let gate = crate::support::Gate::at(1);
    let (mut bot, _) = Bot::start_gated("", true, 0, Some(&gate), 10).await;
    bot.interact(bot.imagine(77, "a red fox --steps 4 --grid 4 --cutn 4 --size 32x32"))
        .await;
    gate.reached().await;
    // Previews show the grid while it runs (a composite twice the size of one image).
    let preview = eventually("a preview of the grid", || {
        bot.discord.log().into_iter().find_map(|r| {
            let at = r.files.iter().position(|(name, _)| name == "preview.jpg")?;
            r.file_bytes.get(at).cloned()
        })
    })
    .await;
    let preview = vqclip::engine::image::decode(&preview).unwrap();
    assert_eq!(preview.dimensions(), (64, 64));
    gate.release();
    let (channel, result) = bot.result_of(JobId(1)).await;
    let posted = eventually("the grid's result", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "POST" && r.path == "/channels/900/messages" && !r.files.is_empty()
        })
    })
    .await;
    assert_eq!(
        custom_ids(&posted.json["components"]),
        [
            "vq:u1:1",
            "vq:u2:1",
            "vq:u3:1",
            "vq:u4:1",
            "vq:vary1:1",
            "vq:vary2:1",
            "vq:vary3:1",
            "vq:vary4:1",
            "vq:rerun:1",
            "vq:gif:1"
        ]
    );
    let labels: Vec<&str> = posted.json["components"][0]["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["U1", "U2", "U3", "U4"]);
    let embed = &posted.json["embeds"][0];
    let first = bot.job(1).await;
    let seeds = format!("{}–{}", first.seed, first.seed.wrapping_add(3));
    assert!(
        embed["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "Seeds" && f["value"] == seeds.as_str()),
        "{embed}"
    );
    // One picture: the four 32² images in a 2×2 composite.
    let composite = vqclip::engine::image::decode(&posted.file_bytes[0]).unwrap();
    assert_eq!(composite.dimensions(), (64, 64));
    let images = bot.settings.storage.images.clone();
    for k in 1..=4 {
        let kept = images.join(format!("1-{k}.png"));
        let picture = vqclip::engine::image::decode(&std::fs::read(&kept).unwrap()).unwrap();
        assert_eq!(picture.dimensions(), (32, 32));
        let (x, y, _, _) = vqclip::engine::grid::cell((64, 64), 4, k - 1);
        // Its quarter, away from the number in the corner.
        assert_eq!(
            composite.get_pixel(x + 20, y + 20),
            picture.get_pixel(20, 20)
        );
        assert!(images.join(format!("1-{k}.latent.safetensors")).is_file());
    }

    // U2: image 2, doubled, from its own latent and seed.
    let u2 = bot.interact(bot.press(77, MEMBER, "vq:u2:1", result)).await;
    assert!(text(&u2).contains("upscale of job 1"), "{u2:?}");
    bot.result_of(JobId(2)).await;
    let upscale = bot.job(2).await;
    assert_eq!(
        (upscale.kind, upscale.width, upscale.seed),
        (JobKind::Upscale, 64, first.seed.wrapping_add(1))
    );
    let params: JobParams = serde_json::from_value(upscale.params.clone()).unwrap();
    assert_eq!(params.grid, 1);
    let start = params.inputs.start.clone().unwrap();
    assert_eq!(start.image, Some(2));
    assert_eq!(start.latent, images.join("1-2.latent.safetensors"));
    // Exactly the second image: the command line, from the kept latent of image 2, makes the
    // same pixels; from image 3's, others.
    let dir = tempfile::tempdir().unwrap();
    let seed = upscale.seed.to_string();
    let upscale_alone = |latent: &std::path::Path, out: &str| {
        let latent = latent.to_str().unwrap();
        let args = [
            "imagine",
            "a red fox",
            "--model",
            "tiny",
            "--size",
            "64x64",
            "--steps",
            "2",
            "--cutn",
            "4",
            "--seed",
            &seed,
            "--init-latent",
            latent,
            "--upscale-latent",
            "-o",
            out,
        ];
        let cli = vqclip(dir.path(), &args, &[]);
        assert_eq!(
            cli.status.code(),
            Some(0),
            "{}",
            crate::cli::text(&cli.stderr)
        );
        vqclip::engine::image::decode(&std::fs::read(dir.path().join(out)).unwrap()).unwrap()
    };
    let job_png = std::fs::read(upscale.output_path.clone().unwrap()).unwrap();
    let from_job = vqclip::engine::image::decode(&job_png).unwrap();
    assert_eq!(
        from_job,
        upscale_alone(&start.latent, "u2.png"),
        "U2 did not continue image 2"
    );
    let from_three = upscale_alone(&images.join("1-3.latent.safetensors"), "u3.png");
    assert_ne!(
        from_job, from_three,
        "the picture does not depend on the image chosen"
    );
    // The upscaled single image keeps the single buttons, with Vary (Subtle) and (Strong).
    let upscale_result = eventually("the upscale's result", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "POST"
                && !r.files.is_empty()
                && custom_ids(&r.json["components"]).contains(&"vq:subtle:2".to_owned())
        })
    })
    .await;
    assert!(custom_ids(&upscale_result.json["components"]).contains(&"vq:strong:2".to_owned()));

    // A restart: the grid's buttons still work.
    bot.disconnect().await;
    bot.connect().await;
    let v3 = bot
        .interact(bot.press(77, MEMBER, "vq:vary3:1", result))
        .await;
    assert!(text(&v3).contains("variation of job 1"), "{v3:?}");
    bot.result_of(JobId(3)).await;
    let variation = bot.job(3).await;
    let params: JobParams = serde_json::from_value(variation.params.clone()).unwrap();
    assert_eq!((variation.kind, params.grid), (JobKind::Variation, 4));
    let start = params.inputs.start.unwrap();
    assert_eq!(
        (start.image, start.noise, start.upscale),
        (Some(3), Some(0.5), false)
    );
    assert_eq!(start.latent, images.join("1-3.latent.safetensors"));
    assert_ne!(variation.seed, first.seed);

    // 🔄: the same prompt and grid, new seeds.
    bot.interact(bot.press(77, MEMBER, "vq:rerun:1", result))
        .await;
    bot.result_of(JobId(4)).await;
    let rerun = bot.job(4).await;
    let params: JobParams = serde_json::from_value(rerun.params.clone()).unwrap();
    assert_eq!((rerun.kind, params.grid), (JobKind::Rerun, 4));
    assert_ne!(rerun.seed, first.seed);

    // 4️⃣ on the grid: upscale image 4.
    bot.react(77, channel, result, "4\u{fe0f}\u{20e3}");
    eventually("the reaction's upscale", || {
        bot.discord
            .log()
            .into_iter()
            .find(|r| r.method == "POST" && text(r).contains("upscale of job 1"))
    })
    .await;
    bot.result_of(JobId(5)).await;
    let by_reaction = bot.job(5).await;
    let params: JobParams = serde_json::from_value(by_reaction.params.clone()).unwrap();
    assert_eq!(params.inputs.start.unwrap().image, Some(4));
    assert_eq!(by_reaction.seed, first.seed.wrapping_add(3));
    // ⬆️ means nothing on a grid (which image?): no job.
    bot.react(77, channel, result, "⬆️");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(bot.job_count().await, 5);
    bot.stop().await;
}

/// The grid a request makes when it names none: `/admin grid` for a server, `/settings grid`
/// for a user over it, `--grid` in the prompt over both; the configuration's "auto" is 1 on the
/// CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_grid_comes_from_the_server_then_the_user_then_the_prompt() {
    use crate::bot_actions::MODERATOR;
    use serde_json::json;
    let (bot, _) = Bot::start("", false, 1).await;
    let grid_of = |id: i64| {
        let bot = &bot;
        async move {
            let job = bot.job(id).await;
            serde_json::from_value::<JobParams>(job.params)
                .unwrap()
                .grid
        }
    };
    bot.interact(bot.imagine(77, "a lighthouse")).await;
    assert_eq!(grid_of(1).await, 1, "auto on the CPU");

    let admin = |user: u64, permissions: &str, images: Option<u32>| {
        let options = match images {
            Some(n) => json!([{ "name": "images", "type": 4, "value": n }]),
            None => json!([]),
        };
        bot.command(
            user,
            permissions,
            "admin",
            json!([{ "name": "grid", "type": 1, "options": options }]),
        )
    };
    let refused = bot.interact(admin(77, MEMBER, Some(4))).await;
    assert!(text(&refused).contains("Manage Server"), "{refused:?}");
    let three = bot.interact(admin(99, MODERATOR, Some(3))).await;
    assert!(text(&three).contains("1 image or a grid of 4"), "{three:?}");
    let set = bot.interact(admin(99, MODERATOR, Some(4))).await;
    assert!(text(&set).contains("a grid of 4"), "{set:?}");
    bot.interact(bot.imagine(77, "a lighthouse")).await;
    assert_eq!(grid_of(2).await, 4, "the server's grid");

    let settings = |grid: u32| {
        bot.command(
            77,
            MEMBER,
            "settings",
            json!([{ "name": "grid", "type": 4, "value": grid }]),
        )
    };
    let mine = bot.interact(settings(1)).await;
    assert!(text(&mine).contains("images: 1"), "{mine:?}");
    bot.interact(bot.imagine(77, "a lighthouse")).await;
    assert_eq!(grid_of(3).await, 1, "the user's own default");
    bot.interact(bot.imagine(77, "a lighthouse --grid 4")).await;
    assert_eq!(grid_of(4).await, 4, "the prompt's flag");
    // Someone else in the server gets the server's.
    bot.interact(bot.imagine(78, "a lighthouse")).await;
    assert_eq!(grid_of(5).await, 4);
    // Cleared, the server is back to the configuration's.
    let cleared = bot.interact(admin(99, MODERATOR, None)).await;
    assert!(text(&cleared).contains("default (auto)"), "{cleared:?}");
    bot.interact(bot.imagine(78, "a lighthouse")).await;
    assert_eq!(grid_of(6).await, 1);
    bot.stop().await;
}

/// Two users' jobs waiting for a busy device run as one batch on the real engine, each ending
/// with its own result, equal to the same request made alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_two_users_share_one_batch_and_each_ends_as_it_would_alone() {
    let gate = crate::support::Gate::at(1);
    let (bot, _) = Bot::start_with("", Some(4), 0, Some(&gate), 10).await;
    // The device is busy with the first job while two more arrive.
    bot.interact(bot.imagine(77, "a red fox --steps 3 --size 32x32"))
        .await;
    gate.reached().await;
    bot.interact(bot.imagine(78, "a blue lake --steps 4 --seed 5 --size 32x32"))
        .await;
    bot.interact(bot.imagine(79, "a green hill --steps 4 --seed 6 --size 32x32"))
        .await;
    gate.release();
    bot.result_of(JobId(2)).await;
    bot.result_of(JobId(3)).await;
    let (first, two, three) = (bot.job(1).await, bot.job(2).await, bot.job(3).await);
    let (Some(ended_first), Some(started_two), Some(started_three), Some(ended_two)) = (
        first.finished_at,
        two.started_at,
        three.started_at,
        two.finished_at,
    ) else {
        panic!("{two:?} {three:?}");
    };
    // They waited for the first job, then ran together: the third started before the second
    // ended (one at a time it could not have).
    assert!(started_two >= ended_first && started_three >= ended_first);
    assert!(started_three < ended_two, "{three:?} {two:?}");
    // Each picture is its own request's, made alone on the command line.
    let dir = tempfile::tempdir().unwrap();
    for (job, text_prompt) in [(&two, "a blue lake"), (&three, "a green hill")] {
        let seed = job.seed.to_string();
        let out = format!("{}.png", job.id);
        let cli = vqclip(
            dir.path(),
            &[
                "imagine",
                text_prompt,
                "--model",
                "tiny",
                "--size",
                "32x32",
                "--steps",
                "4",
                "--seed",
                &seed,
                "-o",
                &out,
            ],
            &[],
        );
        assert_eq!(
            cli.status.code(),
            Some(0),
            "{}",
            crate::cli::text(&cli.stderr)
        );
        let alone =
            vqclip::engine::image::decode(&std::fs::read(dir.path().join(&out)).unwrap()).unwrap();
        let png = std::fs::read(job.output_path.clone().unwrap()).unwrap();
        let batched = vqclip::engine::image::decode(&png).unwrap();
        assert_eq!(
            batched, alone,
            "job {} differs from its request alone",
            job.id
        );
    }
    bot.stop().await;
}

/// A grid made by a worker on another host: its images and their latents are kept in the
/// database, so a follow-up of one image runs on any worker (here the same one, whose own copy
/// of the chosen latent is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_made_elsewhere_keeps_each_image_for_follow_ups_anywhere() {
    use vqclip::store::events;
    let gate = crate::support::Gate::at(u32::MAX);
    let (bot, worker, elsewhere) = Bot::start_front_end(&gate).await;
    bot.interact(bot.imagine(77, "a red fox --steps 2 --grid 4 --cutn 4 --size 32x32"))
        .await;
    let (_, result) = bot.result_of(JobId(1)).await;
    assert_eq!(bot.job(1).await.worker.as_deref(), Some("gpu-elsewhere-1"));
    for k in 1..=4 {
        for name in [format!("image-{k}.png"), format!("latent-{k}.safetensors")] {
            assert!(
                events::has_job_file(&bot.pool, JobId(1), &name)
                    .await
                    .unwrap(),
                "{name} is not in the database"
            );
        }
    }
    // Another host would not have image 3's latent on its disk: it comes from the database.
    let local = elsewhere.path().join("images/1-3.latent.safetensors");
    std::fs::remove_file(&local).unwrap();
    bot.interact(bot.press(77, MEMBER, "vq:u3:1", result)).await;
    assert_eq!(
        crate::scheduler::finished(&bot.pool, JobId(2)).await,
        vqclip::store::jobs::JobStatus::Succeeded
    );
    let upscale = bot.job(2).await;
    assert_eq!(
        (upscale.width, upscale.seed),
        (64, bot.job(1).await.seed.wrapping_add(2))
    );
    assert!(
        local.is_file(),
        "the latent was not fetched from the database"
    );
    worker.shutdown(std::time::Duration::from_secs(1)).await;
    bot.stop().await;
}
