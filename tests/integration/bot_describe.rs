//! `/describe` and the safety check end to end against the loopback fake Discord: four
//! prompts whose buttons make them (read back from the message alone, as after a restart),
//! refusals answered privately; results the check flags (a threshold of 0 forces it on the
//! tiny models) posted as spoilers or withheld, kept from the gallery, shown plainly in an
//! age-restricted channel, and judged by moderators with `/admin safety`.

use serde_json::{Value, json};
use vqclip::jobs::JobId;
use vqclip::store::safety::{self, Safety};

use crate::bot::eventually;
use crate::bot_actions::{
    Bot, GALLERY, MEMBER, MODERATOR, custom_ids, refused_after_deferral, text,
};
use crate::fake_discord::Request_;

fn describe(bot: &Bot, image: &str) -> Value {
    bot.command(
        77,
        MEMBER,
        "describe",
        json!([{ "name": "image", "type": 11, "value": image }]),
    )
}

/// The request that answered a deferred interaction with `token`: the edited original, or a
/// private follow-up.
async fn answered(bot: &Bot, token: &str, how: &str) -> Request_ {
    eventually(how, || {
        bot.discord.log().into_iter().find(|r| {
            r.path.contains(token)
                && match how {
                    "edit" => r.method == "PATCH" && r.path.ends_with("/@original"),
                    _ => r.method == "POST" && r.path.starts_with("/webhooks/"),
                }
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_suggests_four_prompts_whose_buttons_make_them() {
    let (bot, _) = Bot::start("banned_words = [\"gore\"]", false, 1).await;

    // Refused privately (the public "thinking…" goes): a file that is not a picture, one over
    // the size limit; nothing queued.
    for (image, says) in [
        ("12", "image is not a picture"),
        ("13", "the limit is 8 MiB"),
    ] {
        let private = refused_after_deferral(&bot, describe(&bot, image)).await;
        assert!(text(&private).contains(says), "{private:?}");
    }
    let missing = bot
        .interact(bot.command(77, MEMBER, "describe", json!([])))
        .await;
    assert_eq!(missing.json["data"]["flags"], 64, "{missing:?}");

    // The 48×32 picture: four different prompts, each with the picture's shape, one button each.
    let payload = describe(&bot, "11");
    let token = payload["token"].as_str().unwrap().to_owned();
    bot.interact(payload).await;
    let shown = answered(&bot, &token, "edit").await;
    let content = text(&shown);
    let prompts: Vec<String> = (1..=4)
        .map(|k| {
            let mark = format!("{k}\u{fe0f}\u{20e3} ");
            content
                .lines()
                .find_map(|line| line.strip_prefix(mark.as_str()))
                .unwrap_or_else(|| panic!("no suggestion {k} in {content}"))
                .to_owned()
        })
        .collect();
    let mut distinct = prompts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{prompts:?}");
    for prompt in &prompts {
        assert!(prompt.ends_with(" --ar 3:2"), "{prompt}");
        assert!(prompt.contains(" of "), "{prompt}");
        assert!(!prompt.to_lowercase().contains("gore"), "{prompt}");
    }
    assert_eq!(
        custom_ids(&shown.json["components"]),
        ["vqd:1", "vqd:2", "vqd:3", "vqd:4"]
    );
    assert!(
        shown.json["embeds"][0]["thumbnail"]["url"]
            .as_str()
            .is_some_and(|u| u.ends_with("/attachments/start.png")),
        "{shown:?}"
    );
    assert_eq!(bot.job_count().await, 0);
    // One /describe per user every 10 s: CLIP runs on the bot's own CPU.
    let wait = refused_after_deferral(&bot, describe(&bot, "14")).await;
    assert!(text(&wait).contains("One /describe every 10 s"), "{wait:?}");

    // Another member presses 2: an /imagine of theirs with that prompt, answered with its
    // opening message. The button reads the prompt from the message it is on: nothing else
    // is stored, so it works for any message the bot ever posted.
    let mut press = bot.press(88, MEMBER, "vqd:2", 5);
    press["message"]["content"] = json!(content);
    let opened = bot.interact(press).await;
    assert_eq!(opened.json["type"], 4, "{opened:?}");
    assert!(text(&opened).contains("<@88>"), "{opened:?}");
    let job = bot.job(1).await;
    assert_eq!(job.prompt, prompts[1]);
    assert_eq!(job.requester_id, 88);
    let ratio = f64::from(job.width) / f64::from(job.height);
    assert!((ratio - 1.5).abs() < 0.1, "{}×{}", job.width, job.height);
    bot.result_of(JobId(1)).await;

    // A button whose suggestion is not on its message, and a prompt the server bans (a
    // message edited by hand cannot be: only the bot writes its messages, but the prompt is
    // checked as any), are refused privately.
    let mut press = bot.press(88, MEMBER, "vqd:3", 6);
    press["message"]["content"] = json!("1\u{fe0f}\u{20e3} a castle");
    let refused = bot.interact(press).await;
    assert_eq!(refused.json["data"]["flags"], 64, "{refused:?}");
    assert!(text(&refused).contains("Suggestion 3"), "{refused:?}");
    let mut press = bot.press(88, MEMBER, "vqd:1", 6);
    press["message"]["content"] = json!("1\u{fe0f}\u{20e3} lots of gore");
    let refused = bot.interact(press).await;
    assert!(text(&refused).contains("does not accept"), "{refused:?}");
    assert_eq!(bot.job_count().await, 1);
    bot.stop().await;
}

fn admin(bot: &Bot, options: Value) -> Value {
    bot.command(
        99,
        MODERATOR,
        "admin",
        json!([{ "name": "safety", "type": 1, "options": options }]),
    )
}

/// Result messages posted in channel 900 (with files).
fn results(bot: &Bot) -> Vec<Request_> {
    bot.discord
        .log()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/channels/900/messages" && !r.files.is_empty())
        .collect()
}

fn gallery_posts(bot: &Bot) -> usize {
    bot.count(|r| r.method == "POST" && r.path == format!("/channels/{GALLERY}/messages"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_results_are_spoilered_kept_from_the_gallery_and_judged_by_moderators() {
    // A threshold of 0 flags every picture: the mechanics, whatever the tiny CLIP thinks.
    let (bot, _) = Bot::start("[moderation]\nnsfw_threshold = 0.0\n", false, 1).await;
    let set = bot.command(
        99,
        MODERATOR,
        "admin",
        json!([{ "name": "gallery", "type": 1, "options":
            [{ "name": "channel", "type": 7, "value": GALLERY.to_string() }] }]),
    );
    bot.interact(set).await;

    bot.interact(bot.imagine(77, "a lighthouse")).await;
    bot.result_of(JobId(1)).await;
    let posted = eventually("the result", || results(&bot).pop()).await;
    assert_eq!(posted.files[0].0, "SPOILER_vqclip-1.png", "{posted:?}");
    assert!(posted.json["embeds"][0]["image"].is_null(), "{posted:?}");
    assert!(text(&posted).contains("Marked sensitive"), "{posted:?}");
    let record = safety::get_safety(&bot.pool, JobId(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.safety, Some(Safety::Flagged));
    assert!(
        record.score.is_some_and(|s| (0.0..=1.0).contains(&s)),
        "{record:?}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(gallery_posts(&bot), 0);

    // Moderators list it and see it privately; members cannot.
    let refused = bot
        .interact(bot.command(
            77,
            MEMBER,
            "admin",
            json!([{ "name": "safety", "type": 1, "options": [] }]),
        ))
        .await;
    assert!(text(&refused).contains("Manage Server"), "{refused:?}");
    let listed = bot.interact(admin(&bot, json!([]))).await;
    assert!(
        text(&listed).contains("job 1 — flagged — score"),
        "{listed:?}"
    );
    let seen = bot
        .interact(admin(
            &bot,
            json!([{ "name": "job", "type": 4, "value": 1 }]),
        ))
        .await;
    assert_eq!(seen.json["data"]["flags"], 64, "{seen:?}");
    assert_eq!(seen.files[0].0, "SPOILER_vqclip-1.png", "{seen:?}");
    let other = bot
        .interact(admin(
            &bot,
            json!([{ "name": "job", "type": 4, "value": 42 }]),
        ))
        .await;
    assert!(text(&other).contains("no job 42"), "{other:?}");

    // Allowed: posted again as any picture, with its buttons, and to the gallery. (A choice
    // arrives as its index: 0 allow, 1 unsafe.)
    let allow = json!([{ "name": "job", "type": 4, "value": 1 },
                       { "name": "verdict", "type": 4, "value": 0 }]);
    let allowed = bot.interact(admin(&bot, allow)).await;
    assert!(text(&allowed).contains("is allowed"), "{allowed:?}");
    let released = eventually("the released picture", || {
        results(&bot)
            .into_iter()
            .find(|r| r.files[0].0 == "vqclip-1.png")
    })
    .await;
    assert!(
        text(&released).contains("released by a moderator"),
        "{released:?}"
    );
    assert!(custom_ids(&released.json["components"]).contains(&"vq:upscale:1".to_owned()));
    eventually("the gallery post", || {
        (gallery_posts(&bot) == 1).then_some(())
    })
    .await;

    // Marked unsafe: out of the gallery again.
    let hide = json!([{ "name": "job", "type": 4, "value": 1 },
                      { "name": "verdict", "type": 4, "value": 1 }]);
    let hidden = bot.interact(admin(&bot, hide)).await;
    assert!(text(&hidden).contains("out of the gallery"), "{hidden:?}");
    let record = safety::get_safety(&bot.pool, JobId(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.safety, Some(Safety::Unsafe));
    assert!(
        bot.count(|r| r.method == "DELETE" && r.path.starts_with(&format!("/channels/{GALLERY}/")))
            == 1
    );
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_results_are_withheld_except_in_age_restricted_channels() {
    let (bot, _) = Bot::start(
        "[moderation]\nnsfw_threshold = 0.0\nnsfw_action = \"block\"\n",
        false,
        1,
    )
    .await;
    // Withheld: no picture anywhere; the progress message says so, the requester is told
    // privately with the interaction's token.
    let payload = bot.imagine(77, "a lighthouse");
    let token = payload["token"].as_str().unwrap().to_owned();
    bot.interact(payload).await;
    let told = answered(&bot, &token, "follow-up").await;
    assert_eq!(told.json["flags"], 64, "{told:?}");
    assert!(text(&told).contains("was withheld"), "{told:?}");
    let edited = eventually("the withheld note", || {
        bot.discord.log().into_iter().find(|r| {
            r.method == "PATCH" && text(r).contains("withheld by this server's safety check")
        })
    })
    .await;
    assert!(edited.files.is_empty(), "{edited:?}");
    assert!(results(&bot).is_empty());
    let record = safety::get_safety(&bot.pool, JobId(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.safety, Some(Safety::Flagged));

    // In an age-restricted channel the same picture is posted as it is.
    bot.discord.age_restrict("900");
    bot.interact(bot.imagine(77, "a lighthouse")).await;
    bot.result_of(JobId(2)).await;
    let posted = eventually("the result", || results(&bot).pop()).await;
    assert_eq!(posted.files[0].0, "vqclip-2.png", "{posted:?}");
    assert!(!text(&posted).contains("Marked sensitive"), "{posted:?}");
    bot.stop().await;
}
