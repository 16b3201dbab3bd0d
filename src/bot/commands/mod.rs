//! Slash commands, one file per family: `imagine`, `blend`, `describe`, `jobs` (`/queue`, `/cancel`, `/job`,
//! `/history`), `gallery`, `settings` (`/settings`, `/admin`), and `/help` here. Each doc comment
//! is the help Discord shows. Nothing else in the bot imports them.

mod blend;
mod describe;
mod gallery;
mod imagine;
mod jobs;
mod settings;

use poise::serenity_prelude as serenity;

use super::{BotError, Context};

/// Shortest time between two `/describe`s of one user.
pub(crate) const DESCRIBE_EVERY: std::time::Duration = describe::EVERY;

/// Every command the bot registers.
pub fn all() -> Vec<poise::Command<super::Data, BotError>> {
    vec![
        imagine::imagine(),
        blend::blend(),
        describe::describe(),
        jobs::queue(),
        jobs::cancel(),
        jobs::job(),
        jobs::history(),
        gallery::gallery(),
        settings::settings(),
        settings::admin(),
        help(),
    ]
}

/// What `/help` says (an embed's description: at most 4096 characters).
const HELP: &str = "\
**/imagine** `prompt` — make a picture. Several prompts: `a castle | fog:0.5` (a weight after \
the last colon; negative pushes away). Flags inside the prompt: `--ar 16:9`, `--size 384x256`, \
`--seed 7`, `--steps 300`, `--cutn 32`, `--no people`, `--model wikiart_f16_16384`, `--grid 4` \
(four at once, in a 2×2 grid). Attach an `init_image` to start from a picture, an \
`image_prompt` to aim at one.
A story: `a forest ^ a city ^ the sea --change-every 100` (a scene every 100 steps). The method: \
`--lr 0.05`, `--optimizer adamw|diffgrad`, `--ema 0.99` (keep a smoothed average), \
`--init-noise pixels|gradient`, `--init-weight 2` (stay near the start, fading). `--tile` (or \
`tile:True`): a seamless tile. `--clip vit_b32,vit_b16:0.5`: several CLIP models judge together.
Under a finished picture: 🔁 **Rerun** (new seed), ⬆️ **Upscale 2×**, 🔀 **Variation**, \
**Vary (Subtle/Strong)**, 🎞️ **Time-lapse**, 🎬 **Zoom video**, 🔎 **Zoom Out 2×/1.5×**, \
**Make Square**, ⬅️➡️⬆️⬇️ **Pan**; ❌ **Cancel** while it runs. Reacting with 🔁 ⬆️ 🔀 \
(or ❌) does the same. Under a grid: **U1–U4** upscale that image (or react 1️⃣–4️⃣), **V1–V4** \
vary it into a new grid, 🔄 new seeds.
**/blend** `image1`…`image5` — blend 2–5 pictures (words and `weights` like `1,0.5` optional).
**/describe** `image` — four prompts for a picture; press a number to make one.
**/queue** — what is waiting and running. **/cancel** `job` — stop one of yours.
**/job** `id` — everything needed to make a picture again. **/history** — recent prompts and seeds.
**/gallery** `recent|top|user|search` — this server's gallery; vote with ⭐ on its posts.
**/settings** — your defaults, a mention when done, and `remix` (edit the prompt when varying).
**/admin** (Manage Server) — gallery channel, ban/unban, pause/resume, remove a post, grid, \
`safety` (see, allow or hide what the safety check flagged). **/help** — this.
The same seed and settings give the same picture.";

/// How to use the bot.
#[poise::command(slash_command)]
async fn help(ctx: Context<'_>) -> Result<(), BotError> {
    // An embed's description holds 4096 characters; a message's content only 2000.
    let help = serenity::CreateEmbed::new()
        .title("vqclip — VQGAN+CLIP pictures")
        .description(HELP);
    let reply = poise::CreateReply::default()
        .embed(help)
        .ephemeral(true)
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    ctx.send(reply).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_fits_an_embed_and_names_every_command() {
        assert!(HELP.chars().count() <= 4096, "{}", HELP.chars().count());
        for command in all() {
            assert!(
                HELP.contains(&format!("**/{}**", command.name)),
                "/help does not mention /{}",
                command.name
            );
        }
    }
}
