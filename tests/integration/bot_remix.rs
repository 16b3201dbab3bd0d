//! Remix end to end against the loopback fake Discord, on the real tiny engine: with
//! `/settings remix:True`, a variation's button opens a form holding the prompt's words; what the
//! user sends back becomes the new job's prompt, checked like any prompt; the form needs nothing
//! but the database, so it is answered after a restart too.

use serde_json::{Value, json};
use vqclip::jobs::{JobId, JobParams};
use vqclip::store::jobs::JobKind;

use crate::bot_actions::{Bot, MEMBER, text};

/// A submitted remix form (interaction type 5) with `prompt` as its text.
fn send_form(bot: &Bot, custom_id: &str, prompt: &str) -> Value {
    let data = json!({
        "custom_id": custom_id,
        "components": [{ "type": 1, "components": [
            { "type": 4, "custom_id": "prompt", "value": prompt }
        ] }]
    });
    bot.interaction(5, data, 77, MEMBER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remix_opens_a_form_and_its_words_make_the_variation() {
    let (bot, _) = Bot::start("banned_words = [\"gore\"]", true, 0).await;
    let remix = |on: bool| {
        bot.command(
            77,
            MEMBER,
            "settings",
            json!([{ "name": "remix", "type": 5, "value": on }]),
        )
    };
    let said = bot.interact(remix(true)).await;
    assert!(text(&said).contains("remix: on"), "{said:?}");
    bot.interact(bot.imagine(
        77,
        "a lighthouse --steps 2 --cutn 2 --size 32x32 --seed 4 --no fog",
    ))
    .await;
    let (_, result) = bot.result_of(JobId(1)).await;

    // The button opens the form (a modal, type 9) with the words and `--no`, nothing queued.
    let form = bot
        .interact(bot.press(77, MEMBER, "vq:vary:1", result))
        .await;
    assert_eq!(form.json["type"], 9, "{form:?}");
    let data = &form.json["data"];
    assert_eq!(data["custom_id"], "vqr:vq:vary:1");
    assert_eq!(data["title"], "Remix job 1");
    let input = &data["components"][0]["components"][0];
    assert_eq!(input["custom_id"], "prompt");
    assert_eq!(input["value"], "a lighthouse --no fog");
    assert_eq!(bot.job_count().await, 1);

    // Other settings than the words are refused, as are banned words: privately, nothing queued.
    let flags = bot
        .interact(send_form(&bot, "vqr:vq:vary:1", "a castle --ar 16:9"))
        .await;
    assert_eq!(flags.json["data"]["flags"], 64, "{flags:?}");
    assert!(
        text(&flags).contains("remix changes the words"),
        "{flags:?}"
    );
    let banned = bot
        .interact(send_form(&bot, "vqr:vq:vary:1", "a gore castle"))
        .await;
    assert!(text(&banned).contains("does not accept"), "{banned:?}");
    assert_eq!(bot.job_count().await, 1);

    // The edited words make the variation: the parent's latent, size and seed's grid, new words.
    let opened = bot
        .interact(send_form(
            &bot,
            "vqr:vq:vary:1",
            "a red lighthouse at dawn --no fog",
        ))
        .await;
    assert!(text(&opened).contains("variation of job 1"), "{opened:?}");
    bot.result_of(JobId(2)).await;
    let job = bot.job(2).await;
    assert_eq!(job.kind, JobKind::Variation);
    assert_eq!(job.prompt, "a red lighthouse at dawn --no fog");
    assert_eq!((job.width, job.height), (32, 32));
    let params: JobParams = serde_json::from_value(job.params.clone()).unwrap();
    let words: Vec<(&str, f64)> = params
        .spec
        .prompts
        .iter()
        .map(|p| (p.text.as_str(), p.weight))
        .collect();
    assert_eq!(words, [("a red lighthouse at dawn", 1.0), ("fog", -0.5)]);
    assert!(
        params.inputs.start.is_some(),
        "a variation starts from the latent"
    );

    // The form is answered from its id and the database alone: one this process never opened
    // (as after a restart) makes a rerun with its words.
    bot.interact(send_form(&bot, "vqr:vq:rerun:1", "a lighthouse in snow"))
        .await;
    bot.result_of(JobId(3)).await;
    let rerun = bot.job(3).await;
    assert_eq!(
        (rerun.kind, rerun.prompt.as_str()),
        (JobKind::Rerun, "a lighthouse in snow")
    );

    // With remix off, the button queues at once.
    bot.interact(remix(false)).await;
    let queued = bot
        .interact(bot.press(77, MEMBER, "vq:vary:1", result))
        .await;
    assert_eq!(queued.json["type"], 4, "{queued:?}");
    assert_eq!(bot.job_count().await, 4);
    bot.stop().await;
}
