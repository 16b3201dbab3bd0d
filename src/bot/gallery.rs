//! The community gallery: every finished job of a guild is posted to its gallery channel (set
//! with `/admin gallery`) with a ⭐ to vote with; `/gallery` browses it page by page.
//!
//! The ◀ ▶ buttons carry the whole view in their `custom_id` (`vqg:<page>:<view>`), so an old
//! listing keeps paging after a restart.

use std::time::Duration;

use crate::store::Store;
use poise::serenity_prelude as serenity;

use super::text::quote;
use super::upload::Upload;
use super::{BotError, Data};
use crate::jobs::JobId;
use crate::store::gallery::{self as store_gallery, GalleryEntry, GalleryQuery};
use crate::store::jobs as store_jobs;
use crate::store::{Timestamp, guilds};

/// Entries per page.
const PAGE_SIZE: u32 = 5;

/// Longest search text kept in a button (a `custom_id` holds 100 characters).
const MAX_SEARCH_BYTES: usize = 80;

/// Posts a finished job to its guild's gallery channel, once, with a ⭐ to vote with. Jobs from
/// DMs, and guilds without a gallery channel, are not posted.
pub async fn post(
    (http, pool, public_url): (&serenity::Http, &Store, Option<&url::Url>),
    job: JobId,
    upload: &Upload,
    result: &serenity::Message,
) -> anyhow::Result<()> {
    let Some(job) = store_jobs::get_job(pool, job).await? else {
        return Ok(());
    };
    let Some(guild) = job.guild_id else {
        return Ok(());
    };
    // Nothing the safety check flagged (or a moderator marked unsafe) is shown there.
    if crate::store::safety::get_safety(pool, job.id)
        .await?
        .and_then(|r| r.safety)
        .is_some_and(crate::store::safety::Safety::hidden)
    {
        return Ok(());
    }
    let Some(channel) = guilds::get_guild_settings(pool, guild)
        .await?
        .and_then(|s| s.gallery_channel_id)
    else {
        return Ok(());
    };
    if store_gallery::find_gallery_post_by_job(pool, job.id, guild)
        .await?
        .is_some()
    {
        return Ok(());
    }
    let link = format!(
        "https://discord.com/channels/{guild}/{}/{}",
        result.channel_id, result.id
    );
    let mut embed = serenity::CreateEmbed::new()
        .description(quote(&job.prompt, 1000))
        .field("By", format!("<@{}>", job.requester_id), true)
        .field("Seed", job.seed.to_string(), true)
        .field("Job", format!("[{}]({link})", job.id), true);
    if let Some(page) = public_url.and_then(|u| crate::config::image_page(u, job.id)) {
        embed = embed.field("On the web", page.to_string(), false);
    }
    if let Some(name) = upload.embedded() {
        embed = embed.image(format!("attachment://{name}"));
    }
    let message = serenity::CreateMessage::new()
        .embed(embed)
        .add_files(upload.attachments())
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    let channel = serenity::ChannelId::new(channel);
    let posted = channel.send_message(http, message).await?;
    store_gallery::insert_gallery_post(pool, job.id, guild, channel.get(), posted.id.get()).await?;
    posted
        .react(
            http,
            serenity::ReactionType::Unicode(store_gallery::STAR.into()),
        )
        .await?;
    tracing::info!(job_id = job.id.0, guild_id = guild, "posted to the gallery");
    Ok(())
}

/// The web gallery's first page of the listing a view shows, under `public_url` (one artist's
/// pictures have no page there: their guild's gallery stands in).
fn web_listing(public_url: &url::Url, guild: u64, view: &View) -> Option<url::Url> {
    let mut url = crate::config::gallery_page(public_url, guild)?;
    match view {
        View::Top(period) => {
            url.query_pairs_mut()
                .append_pair("sort", "top")
                .append_pair("period", period.word());
        }
        View::Search(text) => {
            url.query_pairs_mut().append_pair("q", text);
        }
        View::Recent | View::User(_) => {}
    }
    Some(url)
}

/// Which posts a listing shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum View {
    /// Newest first.
    Recent,
    /// Most ⭐ first, over a period.
    Top(Period),
    /// One user's, newest first.
    User(u64),
    /// Prompts containing a text, newest first.
    Search(String),
}

/// The period of a `/gallery top` ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poise::ChoiceParameter)]
pub(crate) enum Period {
    /// The last 24 hours.
    #[name = "day"]
    Day,
    /// The last 7 days.
    #[name = "week"]
    Week,
    /// Since the beginning.
    #[name = "all"]
    All,
}

impl Period {
    fn code(self) -> char {
        match self {
            Self::Day => 'd',
            Self::Week => 'w',
            Self::All => 'a',
        }
    }

    /// Its name in the web gallery's addresses.
    fn word(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Week => "week",
            Self::All => "all",
        }
    }

    fn since(self) -> Option<Timestamp> {
        let hours = match self {
            Self::Day => 24,
            Self::Week => 24 * 7,
            Self::All => return None,
        };
        Some(Timestamp::now().minus(Duration::from_secs(hours * 3600)))
    }
}

/// A page of a view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Page {
    /// What is listed.
    pub view: View,
    /// From 0.
    pub number: u32,
}

impl Page {
    /// The `custom_id` of a button showing this page.
    pub fn custom_id(&self) -> String {
        let view = match &self.view {
            View::Recent => "r".to_owned(),
            View::Top(p) => format!("t{}", p.code()),
            View::User(u) => format!("u{u}"),
            View::Search(text) => format!("s{text}"),
        };
        format!("vqg:{}:{view}", self.number)
    }

    /// The page of a button's `custom_id`, if it is one of ours.
    pub fn parse(custom_id: &str) -> Option<Self> {
        let rest = custom_id.strip_prefix("vqg:")?;
        let (number, view) = rest.split_once(':')?;
        let number = number.parse().ok()?;
        let mut chars = view.chars();
        let view = match chars.next()? {
            'r' => View::Recent,
            't' => View::Top(match chars.next()? {
                'd' => Period::Day,
                'w' => Period::Week,
                'a' => Period::All,
                _ => return None,
            }),
            'u' => View::User(chars.as_str().parse().ok()?),
            's' => View::Search(chars.as_str().to_owned()),
            _ => return None,
        };
        Some(Self { view, number })
    }

    fn title(&self) -> String {
        let what = match &self.view {
            View::Recent => "newest".to_owned(),
            View::Top(Period::Day) => "top of the day".to_owned(),
            View::Top(Period::Week) => "top of the week".to_owned(),
            View::Top(Period::All) => "top of all time".to_owned(),
            View::User(_) => "by one artist".to_owned(),
            View::Search(text) => format!("prompts with “{}”", text.replace('`', "")),
        };
        format!("Gallery — {what} (page {})", self.number + 1)
    }
}

/// The search text as a button can carry it: cut to [`MAX_SEARCH_BYTES`] on a character
/// boundary.
pub(crate) fn search_text(text: &str) -> String {
    let mut cut = text.trim().to_owned();
    while cut.len() > MAX_SEARCH_BYTES {
        cut.pop();
    }
    cut
}

/// The embed and ◀ ▶ buttons of a page of `guild`'s gallery.
pub(crate) async fn render(
    (pool, public_url): (&Store, Option<&url::Url>),
    guild: u64,
    page: &Page,
) -> Result<(serenity::CreateEmbed, Vec<serenity::CreateActionRow>), sqlx::Error> {
    let query = GalleryQuery {
        guild_id: guild,
        by_votes: matches!(page.view, View::Top(_)),
        since: match page.view {
            View::Top(p) => p.since(),
            _ => None,
        },
        author: match page.view {
            View::User(u) => Some(u),
            _ => None,
        },
        text: match &page.view {
            View::Search(t) => Some(t.clone()),
            _ => None,
        },
    };
    let mut entries =
        store_gallery::list_gallery(pool, &query, PAGE_SIZE + 1, page.number * PAGE_SIZE).await?;
    let more = entries.len() > PAGE_SIZE as usize;
    entries.truncate(PAGE_SIZE as usize);
    let mut embed = serenity::CreateEmbed::new().title(page.title());
    if let Some(url) = public_url.and_then(|u| web_listing(u, guild, &page.view)) {
        embed = embed.url(url);
    }
    if entries.is_empty() {
        embed = embed.description(if page.number == 0 {
            "Nothing here yet."
        } else {
            "No more pictures."
        });
    }
    for (i, entry) in entries.iter().enumerate() {
        let rank = page.number * PAGE_SIZE + i as u32 + 1;
        let (name, value) = entry_field(rank, entry);
        embed = embed.field(name, value, false);
    }
    let turn = |number: u32, emoji: char, enabled: bool| {
        let target = Page {
            view: page.view.clone(),
            number,
        };
        serenity::CreateButton::new(target.custom_id())
            .emoji(emoji)
            .style(serenity::ButtonStyle::Secondary)
            .disabled(!enabled)
    };
    let buttons = vec![serenity::CreateActionRow::Buttons(vec![
        turn(page.number.saturating_sub(1), '◀', page.number > 0),
        turn(page.number + 1, '▶', more),
    ])];
    Ok((embed, buttons))
}

/// One listing line: rank, votes, job; prompt, artist, seed and a link to the post.
pub(crate) fn entry_field(rank: u32, entry: &GalleryEntry) -> (String, String) {
    let p = &entry.post;
    (
        format!("#{rank} · ⭐ {} · job {}", entry.votes, p.job_id),
        format!(
            "{} by <@{}> · seed {} · [view](https://discord.com/channels/{}/{}/{})",
            quote(&entry.prompt, 150),
            entry.author,
            entry.seed,
            p.guild_id,
            p.channel_id,
            p.message_id
        ),
    )
}

/// Shows another page of a listing in place (a ◀ ▶ press).
pub(crate) async fn turn_page(
    ctx: &serenity::Context,
    data: &Data,
    press: &serenity::ComponentInteraction,
    page: Page,
) -> Result<(), BotError> {
    let Some(guild) = press.guild_id else {
        return Ok(());
    };
    let public_url = data.settings.web.public_url.as_ref();
    let (embed, buttons) = render((&data.store, public_url), guild.get(), &page).await?;
    let update = serenity::CreateInteractionResponseMessage::new()
        .embed(embed)
        .components(buttons)
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    press
        .create_response(
            &ctx.http,
            serenity::CreateInteractionResponse::UpdateMessage(update),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_buttons_carry_their_view_and_fit_a_custom_id() {
        let long = search_text(&"é".repeat(200));
        assert!(long.len() <= MAX_SEARCH_BYTES);
        for view in [
            View::Recent,
            View::Top(Period::Day),
            View::Top(Period::All),
            View::User(u64::MAX),
            View::Search("red fox: at dawn".into()),
            View::Search(long),
        ] {
            let page = Page {
                view,
                number: 12_345,
            };
            let id = page.custom_id();
            assert!(id.len() <= 100, "{id}");
            assert_eq!(Page::parse(&id), Some(page));
        }
        assert_eq!(Page::parse("vqg:1:x"), None);
        assert_eq!(Page::parse("vq:rerun:1"), None);
    }
}
