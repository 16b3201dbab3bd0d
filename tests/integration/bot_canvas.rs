//! Zoom out, pan, make square and zoom videos end to end against the loopback fake Discord, on
//! the real tiny engine: the buttons under a picture, the larger canvas that holds the picture
//! in place, the server's size cap, the video Discord plays, and the command line that makes
//! the same pixels.

use vqclip::jobs::{JobId, JobParams};
use vqclip::store::jobs::JobKind;

use crate::bot::eventually;
use crate::bot_actions::{Bot, MEMBER, custom_ids, text};
use crate::cli::vqclip;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zoom_out_pan_and_make_square_grow_the_picture_from_its_buttons() {
    let (bot, _) = Bot::start("[generation]\nmax_pixels = 9000", true, 0).await;
    bot.interact(bot.imagine(77, "a lighthouse --steps 2 --cutn 2 --size 48x32 --seed 4"))
        .await;
    let (_, result) = bot.result_of(JobId(1)).await;
    let posted = eventually("the picture's result", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "POST" && r.path == "/channels/900/messages" && !r.files.is_empty()
        })
    })
    .await;
    let ids = custom_ids(&posted.json["components"]);
    for id in [
        "vq:zoom:1",
        "vq:widen:1",
        "vq:square:1",
        "vq:panleft:1",
        "vq:panright:1",
        "vq:panup:1",
        "vq:pandown:1",
    ] {
        assert!(ids.iter().any(|i| i == id), "{id} not in {ids:?}");
    }

    // Make Square: 48×32 (12×8 tokens of 4 px) on a 48×48 canvas, the picture in the middle.
    let square = bot
        .interact(bot.press(77, MEMBER, "vq:square:1", result))
        .await;
    assert!(text(&square).contains("larger canvas"), "{square:?}");
    bot.result_of(JobId(2)).await;
    let job = bot.job(2).await;
    assert_eq!(
        (job.kind, job.parent, job.width, job.height),
        (JobKind::Extend, Some(JobId(1)), 48, 48)
    );
    let params: JobParams = serde_json::from_value(job.params.clone()).unwrap();
    let start = params.inputs.start.clone().unwrap();
    let canvas = start.canvas.unwrap();
    assert_eq!(
        (canvas.width, canvas.height, canvas.x, canvas.y),
        (12, 12, 0, 2)
    );
    // The parent's pixels stay where they were, past the blended band at the new edges.
    let images = bot.settings.storage.images.clone();
    let read = |name: &str| {
        vqclip::engine::image::decode(&std::fs::read(images.join(name)).unwrap()).unwrap()
    };
    let (parent, grown) = (read("1.png"), read("2.png"));
    assert_eq!(grown.dimensions(), (48, 48));
    let inner = image::imageops::crop_imm(&parent, 0, 2, 48, 28).to_image();
    let placed = image::imageops::crop_imm(&grown, 0, 10, 48, 28).to_image();
    assert_eq!(inner, placed, "the square's middle is not the picture");
    // Square pictures are not offered Make Square again.
    let squared = eventually("the square's result", || {
        bot.discord.log().into_iter().rev().find(|r| {
            r.method == "POST"
                && r.path == "/channels/900/messages"
                && r.json["content"]
                    .as_str()
                    .is_some_and(|c| c.contains("larger canvas"))
        })
    })
    .await;
    let ids = custom_ids(&squared.json["components"]);
    assert!(ids.iter().any(|i| i == "vq:zoom:2"), "{ids:?}");
    assert!(!ids.iter().any(|i| i == "vq:square:2"), "{ids:?}");

    // Pan left: half a picture more on the left.
    bot.interact(bot.press(77, MEMBER, "vq:panleft:1", result))
        .await;
    bot.result_of(JobId(3)).await;
    let pan = bot.job(3).await;
    assert_eq!((pan.width, pan.height), (72, 32));

    // Zoom out 2× of the pan would be 144×64 = 9216 pixels, over this server's 9000: refused,
    // and nothing is queued.
    let (_, pan_result) = bot.result_of(JobId(3)).await;
    let refused = bot
        .interact(bot.press(77, MEMBER, "vq:zoom:3", pan_result))
        .await;
    assert!(
        text(&refused).contains("over this server's limit"),
        "{refused:?}"
    );
    assert_eq!(bot.job_count().await, 3);

    // The command line makes the same picture from the parent's latent and the canvas.
    let dir = tempfile::tempdir().unwrap();
    let latent = images.join("1.latent.safetensors");
    let seed = job.seed.to_string();
    let cli = vqclip(
        dir.path(),
        &[
            "imagine",
            "a lighthouse",
            "--model",
            "tiny",
            "--size",
            "48x48",
            "--steps",
            "2",
            "--cutn",
            "2",
            "--seed",
            &seed,
            "--init-latent",
            latent.to_str().unwrap(),
            "--canvas",
            "12x12+0+2",
            "-o",
            "square.png",
        ],
        &[],
    );
    assert_eq!(cli.status.code(), Some(0), "{}", text_of(&cli.stderr));
    let again =
        vqclip::engine::image::decode(&std::fs::read(dir.path().join("square.png")).unwrap())
            .unwrap();
    assert!(again == grown, "the command line made another picture");
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zoom_video_button_posts_an_mp4_that_plays_and_the_command_line_makes_it_again() {
    // 20 steps at most: the video's 10 steps a frame make 2 frames after the picture.
    let (bot, _) = Bot::start("[generation]\nmax_steps = 20\ndefault_steps = 20", true, 0).await;
    bot.interact(bot.imagine(77, "a lighthouse --steps 2 --cutn 2 --size 48x32 --seed 4"))
        .await;
    let (_, result) = bot.result_of(JobId(1)).await;
    let asked = bot
        .interact(bot.press(77, MEMBER, "vq:video:1", result))
        .await;
    assert!(text(&asked).contains("zoom video of job 1"), "{asked:?}");
    let (_, video_result) = bot.result_of(JobId(2)).await;
    let job = bot.job(2).await;
    assert_eq!(
        (job.kind, job.parent, job.width, job.height, job.steps),
        (JobKind::Video, Some(JobId(1)), 48, 32, 20)
    );
    let posted = eventually("the video's result", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "POST"
                && r.path == "/channels/900/messages"
                && r.files.iter().any(|(name, _)| name.ends_with(".mp4"))
        })
    })
    .await;
    assert_eq!(posted.files.len(), 1, "{:?}", posted.files);
    assert_eq!(posted.files[0].0, "vqclip-2.mp4");
    assert!(custom_ids(&posted.json["components"]).is_empty());
    let mp4 = posted.file_bytes[0].to_vec();
    let (info, frames) = vqclip::engine::video::decode_mp4(&mp4).unwrap();
    assert_eq!((info.width, info.height, info.frames), (48, 32, 3));
    assert!((info.seconds - 3.0 / 12.0).abs() < 1e-3, "{info:?}");
    assert_eq!(frames.len(), 3);
    // The first frame is the picture (through H.264's loss, large on the tiny models' noisy
    // pictures), the last one further from it; the job's own picture is its last frame.
    let images = bot.settings.storage.images.clone();
    let read = |name: &str| {
        vqclip::engine::image::decode(&std::fs::read(images.join(name)).unwrap()).unwrap()
    };
    let (picture, last) = (read("1.png"), read("2.png"));
    let diff = |a: &image::RgbImage, b: &image::RgbImage| {
        a.as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / a.as_raw().len() as f64
    };
    let (first_off, last_off) = (diff(&picture, &frames[0]), diff(&picture, &frames[2]));
    assert!(first_off < last_off, "first {first_off}, last {last_off}");
    assert!(diff(&last, &frames[2]) < diff(&last, &frames[0]));
    assert!(images.join("2.mp4").is_file());

    // A video has no follow-ups of its own, even from a crafted button.
    let refused = bot
        .interact(bot.press(77, MEMBER, "vq:rerun:2", video_result))
        .await;
    assert!(text(&refused).contains("is a zoom video"), "{refused:?}");
    assert_eq!(bot.job_count().await, 2);

    // Its command makes the picture, then the same video.
    let again = vqclip::jobs::describe(&job)
        .into_iter()
        .find(|(label, _)| *label == "again")
        .unwrap()
        .1;
    for flag in [
        "--seed 4",
        "--steps 2",
        "--size 48x32",
        "--zoom-frames=2",
        "--zoom-steps=10",
    ] {
        assert!(again.contains(flag), "{flag} not in {again}");
    }
    let dir = tempfile::tempdir().unwrap();
    let cli = vqclip(
        dir.path(),
        &[
            "imagine",
            "a lighthouse",
            "--model",
            "tiny",
            "--size",
            "48x32",
            "--steps",
            "2",
            "--cutn",
            "2",
            "--seed",
            "4",
            "--zoom-video",
            "again.mp4",
            "--zoom-frames",
            "2",
            "--zoom-steps",
            "10",
            "-o",
            "again.png",
        ],
        &[],
    );
    assert_eq!(cli.status.code(), Some(0), "{}", text_of(&cli.stderr));
    let made = std::fs::read(dir.path().join("again.mp4")).unwrap();
    let (_, made_frames) = vqclip::engine::video::decode_mp4(&made).unwrap();
    assert!(made_frames == frames, "the command line made another video");
    bot.stop().await;
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
