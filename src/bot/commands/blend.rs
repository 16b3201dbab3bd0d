//! `/blend`: two to five pictures made into one. Their CLIP embeddings are the image prompts
//! (each with its weight), the picture starts from their average, and words (with flags) may
//! aim it too; the result is a picture (or grid) like any other, with the same buttons.

use poise::serenity_prelude as serenity;

use super::imagine::{answer_with_job, save_attachment, store_input};
use crate::bot::checks::{check_rate, check_words};
use crate::bot::options::{complete_aspect, parse_aspect};
use crate::bot::prompt_help::complete_prompt;
use crate::bot::submit::{resolve_request, submit};
use crate::bot::text::{opening_text, quote, title};
use crate::bot::{BotError, Context};
use crate::jobs::Origin;
use crate::request::ImagineOptions;

/// Blend two to five pictures into a new one (words may guide it too).
#[poise::command(slash_command)]
#[allow(clippy::too_many_arguments)] // one per slash-command option
pub(super) async fn blend(
    ctx: Context<'_>,
    #[description = "A picture to blend"] image1: serenity::Attachment,
    #[description = "Another picture to blend"] image2: serenity::Attachment,
    #[description = "A third picture"] image3: Option<serenity::Attachment>,
    #[description = "A fourth picture"] image4: Option<serenity::Attachment>,
    #[description = "A fifth picture"] image5: Option<serenity::Attachment>,
    #[description = "Words to aim for as well; flags work too (--seed 7 --steps 200)"]
    #[max_length = 1000]
    #[autocomplete = "complete_prompt"]
    prompt: Option<String>,
    #[description = "Each picture's weight in order, e.g. 1,1,0.5 (all 1 when left out)"]
    weights: Option<String>,
    #[description = "Aspect ratio, e.g. 16:9 (the server's default size otherwise)"]
    #[autocomplete = "complete_aspect"]
    aspect: Option<String>,
) -> Result<(), BotError> {
    let data = ctx.data();
    // Fetching the pictures takes longer than Discord's 3 s: acknowledge first.
    ctx.defer().await?;
    let pictures: Vec<(String, serenity::Attachment)> =
        [Some(image1), Some(image2), image3, image4, image5]
            .into_iter()
            .enumerate()
            .filter_map(|(i, a)| a.map(|a| (format!("image{}", i + 1), a)))
            .collect();
    let text = prompt.unwrap_or_default();
    let prepared = async {
        check_words(data, &text)?;
        let weights = parse_weights(weights.as_deref(), pictures.len()).map_err(BotError::User)?;
        let aspect = aspect
            .as_deref()
            .map(parse_aspect)
            .transpose()
            .map_err(BotError::User)?;
        check_rate(data, ctx.author().id.get()).await?;
        let options = ImagineOptions {
            aspect,
            text_optional: true,
            ..Default::default()
        };
        let who = (ctx.author().id.get(), ctx.guild_id().map(|g| g.get()));
        let resolved = resolve_request(data, who, &text, &options).await?;
        let images = &data.settings.storage.images;
        let mut saved = Vec::with_capacity(pictures.len());
        for (option, attachment) in &pictures {
            saved.push(save_attachment(attachment, option, images).await?);
        }
        // The start: the pictures' average at the output's size, kept as an input file too.
        let (width, height) = (resolved.spec.width, resolved.spec.height);
        let paths = saved.clone();
        let start = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
            let read = paths
                .iter()
                .map(|p| crate::engine::image::read(p))
                .collect::<Result<Vec<_>, _>>()?;
            let mixed = crate::engine::image::blend(&read, width, height);
            Ok(crate::engine::image::encode_png(&mixed)?)
        })
        .await
        .map_err(anyhow::Error::from)??;
        let start = store_input(&start, images).await?;
        let origin = Origin {
            requester: ctx.author().id.get(),
            guild: ctx.guild_id().map(|g| g.get()),
            channel: Some(ctx.channel_id().get()),
        };
        let (mut job, mut params) =
            crate::jobs::imagine_job(&text, &resolved, origin).map_err(anyhow::Error::from)?;
        params.inputs.init_image = Some(start);
        params.inputs.image_prompts = saved
            .into_iter()
            .zip(weights)
            .map(|(path, weight)| (path, weight, None))
            .collect();
        job.params = serde_json::to_value(&params).map_err(anyhow::Error::from)?;
        let (submitted, stored) = submit(data, job, params).await?;
        let text = opening_text(&title(&stored), submitted.position, &resolved.notes);
        Ok((submitted, stored, text))
    };
    answer_with_job(ctx, true, prepared.await).await
}

/// The `weights` option: one weight per picture (`count` of them), comma-separated; all 1
/// when it is left out.
fn parse_weights(text: Option<&str>, count: usize) -> Result<Vec<f64>, String> {
    let Some(text) = text else {
        return Ok(vec![1.0; count]);
    };
    let weights: Vec<f64> = text
        .split(',')
        .map(|w| {
            w.trim()
                .parse::<f64>()
                .map_err(|_| format!("weights {}: expected numbers like 1,1,0.5", quote(text, 40)))
        })
        .collect::<Result<_, _>>()?;
    if weights.len() != count {
        return Err(format!(
            "{} weights for {count} pictures: give one for each, in order",
            weights.len()
        ));
    }
    for &weight in &weights {
        crate::engine::prompt::check_weight(weight, None)?;
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_one_per_picture() {
        assert_eq!(parse_weights(None, 3).unwrap(), [1.0, 1.0, 1.0]);
        assert_eq!(parse_weights(Some("1, 0.5"), 2).unwrap(), [1.0, 0.5]);
        assert!(
            parse_weights(Some("1"), 2)
                .unwrap_err()
                .contains("1 weights for 2")
        );
        assert!(
            parse_weights(Some("1,x"), 2)
                .unwrap_err()
                .contains("numbers")
        );
        assert!(parse_weights(Some("1,1e9"), 2).is_err());
    }
}
