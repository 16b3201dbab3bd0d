//! The safety check of results: each finished picture is scored by CLIP on the bot's CPU
//! ([`crate::inspect`]) against the configured labels before it is posted; above
//! `moderation.nsfw_threshold` the configured action applies (a spoiler, or withheld), except
//! in age-restricted channels when `moderation.age_restricted_allows`. Flagged pictures never
//! reach the gallery. A moderator's verdict (`/admin safety`) wins over the score.

use std::sync::Arc;

use poise::serenity_prelude as serenity;

use super::components::result_buttons;
use super::text::{quote, title};
use super::upload::Upload;
use super::{BotError, Data};
use crate::config::NsfwAction;
use crate::inspect::Inspector;
use crate::jobs::{FinishedJob, JobId};
use crate::store::Store;
use crate::store::jobs::{Job, set_job_result};
use crate::store::safety::{self as store_safety, Safety};

/// How a finished picture is shown.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Shown {
    /// As any picture.
    Plain,
    /// As a picture, but kept out of the gallery (flagged in an age-restricted channel).
    PlainHere(f32),
    /// As a spoiler (blurred until clicked), out of the gallery; its score.
    Spoiler(f32),
    /// Not posted; its score.
    Withheld(f32),
}

/// Scores `done` (each image of a grid) and decides how it is shown in `channel`, recording
/// the score. A moderator's earlier verdict wins. When the check itself fails, the picture is
/// spoilered (the failure is logged): an unchecked picture is not shown openly.
pub(crate) async fn judge(
    http: &serenity::Http,
    pool: &Store,
    inspector: &Arc<Inspector>,
    (job, grid): (JobId, u32),
    channel: serenity::ChannelId,
    done: &FinishedJob,
) -> Shown {
    let moderation = inspector.moderation();
    if moderation.nsfw_action == NsfwAction::Off {
        return Shown::Plain;
    }
    let verdict = match store_safety::get_safety(pool, job).await {
        Ok(record) => record.and_then(|r| r.safety),
        Err(e) => {
            tracing::warn!(job_id = job.0, error = %e, "cannot read a job's safety verdict");
            None
        }
    };
    if verdict == Some(Safety::Allowed) {
        return Shown::Plain;
    }
    let png = done.png.clone();
    let cells = tokio::task::spawn_blocking(move || grid_cells(&png, grid)).await;
    let score = match cells {
        Ok(Ok(cells)) => inspector
            .unsafe_score(cells)
            .await
            .map_err(anyhow::Error::from),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(e.into()),
    };
    let score = match score {
        Ok(score) => score,
        Err(e) => {
            tracing::error!(job_id = job.0, error = %e, "the safety check failed; the picture is posted as a spoiler");
            return Shown::Spoiler(f32::NAN);
        }
    };
    let flagged = score > moderation.nsfw_threshold || verdict == Some(Safety::Unsafe);
    if let Err(e) = store_safety::set_unsafe_score(pool, job, score, flagged).await {
        tracing::warn!(job_id = job.0, error = %e, "cannot record a safety score");
    }
    tracing::info!(job_id = job.0, score, flagged, "safety check");
    if !flagged {
        return Shown::Plain;
    }
    if moderation.age_restricted_allows && age_restricted(http, channel).await {
        return Shown::PlainHere(score);
    }
    match moderation.nsfw_action {
        NsfwAction::Block => Shown::Withheld(score),
        _ => Shown::Spoiler(score),
    }
}

/// Whether `channel` is marked age-restricted (NSFW); unknown means no.
async fn age_restricted(http: &serenity::Http, channel: serenity::ChannelId) -> bool {
    match channel.to_channel(http).await {
        Ok(serenity::Channel::Guild(channel)) => channel.nsfw,
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(channel = %channel, error = %e, "cannot tell whether a channel is age-restricted");
            false
        }
    }
}

/// A grid's images (or the one picture), decoded from its PNG.
fn grid_cells(png: &[u8], grid: u32) -> anyhow::Result<Vec<image::RgbImage>> {
    let picture = crate::engine::image::decode(png)?;
    let n = grid.max(1) as usize;
    if n == 1 {
        return Ok(vec![picture]);
    }
    Ok((0..n)
        .map(|k| {
            let (x, y, w, h) = crate::engine::grid::cell(picture.dimensions(), n, k);
            image::imageops::crop_imm(&picture, x, y, w, h).to_image()
        })
        .collect())
}

/// A job's picture: on this host, or in the database when a worker elsewhere ran it.
pub(crate) async fn stored_picture(data: &Data, job: JobId) -> Result<Option<Vec<u8>>, BotError> {
    let path = crate::jobs::image_path(&data.settings.storage.images, job);
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(_) => {
            Ok(
                crate::store::events::get_job_file(&data.store, job, crate::store::events::IMAGE)
                    .await?,
            )
        }
    }
}

/// Upload limit of a released picture (Discord's smallest for bots).
const RELEASE_SIZE_LIMIT: usize = 8 * 1024 * 1024;

/// Posts a picture a moderator allowed as any result (replying to its job's message, with its
/// buttons, and to the gallery); whether it could be posted.
pub(crate) async fn release(
    ctx: &serenity::Context,
    data: &Data,
    job: &Job,
) -> Result<bool, BotError> {
    let (Some(png), Some(channel)) = (stored_picture(data, job.id).await?, job.channel_id) else {
        return Ok(false);
    };
    let upload = Upload::of_png(&png, job.id, RELEASE_SIZE_LIMIT)?;
    let channel = serenity::ChannelId::new(channel.max(1));
    let (bytes, name) = upload.picture.clone();
    let mut message = serenity::CreateMessage::new()
        .content(format!("{} — released by a moderator", title(job)))
        .embed(
            serenity::CreateEmbed::new()
                .description(quote(&job.prompt, 1000))
                .image(format!("attachment://{name}")),
        )
        .components(result_buttons(
            job.id,
            crate::jobs::grid_of(job),
            job.width == job.height,
        ))
        .add_file(serenity::CreateAttachment::bytes(bytes, name))
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    if let Some(progress) = job.message_id {
        message = message.reference_message((channel, serenity::MessageId::new(progress.max(1))));
    }
    let posted = channel.send_message(&ctx.http, message).await?;
    set_job_result(
        &data.store,
        job.id,
        posted.channel_id.get(),
        posted.id.get(),
    )
    .await?;
    if let Err(e) = super::gallery::post(
        (
            &ctx.http,
            &data.store,
            data.settings.web.public_url.as_ref(),
        ),
        job.id,
        &upload,
        &posted,
    )
    .await
    {
        tracing::error!(job_id = job.id.0, error = %e, "cannot post to the gallery");
    }
    Ok(true)
}

/// `upload` as spoilers: Discord blurs an attachment whose name starts with `SPOILER_`.
pub(crate) fn spoilered(upload: &Upload) -> Upload {
    let mark = |(bytes, name): &(Vec<u8>, String)| (bytes.clone(), format!("SPOILER_{name}"));
    Upload {
        picture: mark(&upload.picture),
        video: upload.video.as_ref().map(mark),
    }
}

/// The line a flagged result carries.
pub(crate) fn note(score: f32) -> String {
    if score.is_nan() {
        "⚠️ The safety check could not run: shown as a spoiler.".to_owned()
    } else {
        format!("⚠️ Marked sensitive by the safety check (score {score:.2}): shown as a spoiler.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_is_judged_image_by_image() {
        let picture =
            image::RgbImage::from_fn(8, 4, |x, y| image::Rgb([(x * 30) as u8, (y * 60) as u8, 0]));
        let png = crate::engine::image::encode_png(&picture).unwrap();
        assert_eq!(grid_cells(&png, 1).unwrap().len(), 1);
        let cells = grid_cells(&png, 4).unwrap();
        assert_eq!(cells.len(), 4);
        assert!(cells.iter().all(|c| c.dimensions() == (4, 2)));
        assert_eq!(cells[3].get_pixel(0, 0), picture.get_pixel(4, 2));
        let upload = Upload {
            picture: (vec![1], "vqclip-3.png".into()),
            video: Some((vec![2], "vqclip-3.mp4".into())),
        };
        let hidden = spoilered(&upload);
        assert_eq!(hidden.picture.1, "SPOILER_vqclip-3.png");
        assert_eq!(hidden.video.unwrap().1, "SPOILER_vqclip-3.mp4");
    }
}
