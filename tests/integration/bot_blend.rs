//! `/blend` end to end against the loopback fake Discord, on the real tiny engine: pictures
//! checked and kept, their average as the start and each as an image prompt with its weight,
//! refusals answered privately with nothing queued, and the command line making the same
//! picture from the job's files.

use serde_json::{Value, json};
use vqclip::jobs::{JobId, JobParams};

use crate::bot::eventually;
use crate::bot_actions::{Bot, MEMBER, custom_ids, refused_after_deferral, text};
use crate::cli::vqclip;
use crate::fake_discord::Request_;

/// The answer that replaced a deferred command's acknowledgement.
async fn answer(bot: &Bot, payload: Value) -> Request_ {
    let token = payload["token"].as_str().unwrap().to_owned();
    let ack = bot.interact(payload).await;
    assert_eq!(ack.json["type"], 5, "{ack:?}");
    eventually("the answer", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "PATCH" && r.path.contains(&token) && r.path.ends_with("/@original")
        })
    })
    .await
}

fn blend(bot: &Bot, options: Value) -> Value {
    bot.command(77, MEMBER, "blend", options)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blend_mixes_pictures_into_one_and_refuses_bad_ones_privately() {
    let (bot, _) = Bot::start("", true, 0).await;
    let pictures = |a: &str, b: &str| {
        json!([{ "name": "image1", "type": 11, "value": a },
               { "name": "image2", "type": 11, "value": b },
               { "name": "prompt", "type": 3, "value": "--steps 2 --cutn 2 --size 32x32 --seed 3" },
               { "name": "weights", "type": 3, "value": "1,0.5" }])
    };

    // Refused privately, nothing queued: a file that is not a picture, one over the size
    // limit, weights that do not match the pictures.
    let bad = refused_after_deferral(&bot, blend(&bot, pictures("11", "12"))).await;
    assert!(text(&bad).contains("image2 is not a picture"), "{bad:?}");
    let huge = refused_after_deferral(&bot, blend(&bot, pictures("13", "11"))).await;
    assert!(text(&huge).contains("the limit is 8 MiB"), "{huge:?}");
    let mut mismatched = pictures("11", "14");
    mismatched[3]["value"] = json!("1");
    let weights = refused_after_deferral(&bot, blend(&bot, mismatched)).await;
    assert!(
        text(&weights).contains("1 weights for 2 pictures"),
        "{weights:?}"
    );
    // A hostile client leaving out a required picture is told privately too.
    let missing = bot
        .interact(blend(
            &bot,
            json!([{ "name": "image1", "type": 11, "value": "11" }]),
        ))
        .await;
    assert_eq!(missing.json["data"]["flags"], 64, "{missing:?}");
    assert!(
        text(&missing).contains("/blend did not get the options"),
        "{missing:?}"
    );
    assert_eq!(bot.job_count().await, 0);

    // Two pictures, the second at half weight, words only flags.
    let opened = answer(&bot, blend(&bot, pictures("11", "14"))).await;
    assert!(text(&opened).contains("--seed 3` — <@77>"), "{opened:?}");
    let (_, _) = bot.result_of(JobId(1)).await;
    let job = bot.job(1).await;
    assert_eq!((job.width, job.height, job.steps, job.seed), (32, 32, 2, 3));
    let params: JobParams = serde_json::from_value(job.params.clone()).unwrap();
    let weights: Vec<f64> = params.inputs.image_prompts.iter().map(|p| p.1).collect();
    assert_eq!(weights, [1.0, 0.5]);
    assert!(params.spec.prompts.is_empty());
    // The start is the pictures' average at the picture's size.
    let read = |path: &std::path::Path| vqclip::engine::image::read(path).unwrap();
    let inputs: Vec<image::RgbImage> = params
        .inputs
        .image_prompts
        .iter()
        .map(|p| read(&p.0))
        .collect();
    assert_eq!(inputs[0].dimensions(), (48, 32));
    assert_eq!(inputs[1].dimensions(), (40, 40));
    let start = read(params.inputs.init_image.as_deref().unwrap());
    assert!(start == vqclip::engine::image::blend(&inputs, 32, 32));
    // Posted like any picture, with its buttons.
    let posted = eventually("the result", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "POST" && r.path == "/channels/900/messages" && !r.files.is_empty()
        })
    })
    .await;
    assert!(custom_ids(&posted.json["components"]).contains(&"vq:upscale:1".to_owned()));

    // The job's command makes the same picture from its files.
    let again = vqclip::jobs::describe(&job)
        .into_iter()
        .find(|(label, _)| *label == "again")
        .unwrap()
        .1;
    assert!(again.contains("--image-weight=0.5"), "{again}");
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let args: Vec<String> = [
        "imagine",
        "",
        "--model",
        "tiny",
        "--size",
        "32x32",
        "--steps",
        "2",
        "--cutn",
        "2",
        "--seed",
        "3",
        "-o",
        "again.png",
        "--init-image",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([path(params.inputs.init_image.as_deref().unwrap())])
    .chain(
        params
            .inputs
            .image_prompts
            .iter()
            .flat_map(|p| ["--image-prompt".to_owned(), path(&p.0)]),
    )
    .chain([
        "--image-weight=1".to_owned(),
        "--image-weight=0.5".to_owned(),
    ])
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cli = vqclip(dir.path(), &args, &[]);
    assert_eq!(
        cli.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let made = read(&dir.path().join("again.png"));
    let posted = read(&bot.settings.storage.images.join("1.png"));
    assert!(made == posted, "the command line made another picture");
    bot.stop().await;
}
