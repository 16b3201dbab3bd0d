//! The web gallery's HTML, with maud: the templates are Rust expressions checked by the
//! compiler against the data they show, every inserted string is HTML-escaped unless it is
//! wrapped in `PreEscaped` (nothing user-written ever is), and there is no template file to
//! ship or load at run time.

use maud::{DOCTYPE, Markup, html};

use crate::store::Timestamp;
use crate::store::public::{PublicEntry, PublicGallery};

/// Longest prompt shown in a card or a title, in characters (the page shows it whole).
const SHORT_PROMPT_CHARS: usize = 140;

/// Where the pages live under the server's address (`/`, or `/art/` behind a proxy's prefix).
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// The base path, ending in `/`.
    pub base: String,
    /// The absolute address (`web.public_url`), for Open Graph's absolute URLs.
    pub public_url: Option<url::Url>,
}

impl Paths {
    /// The list of galleries.
    pub fn home(&self) -> String {
        self.base.clone()
    }

    /// A guild's gallery.
    pub fn gallery(&self, guild: u64) -> String {
        format!("{}g/{guild}", self.base)
    }

    /// A picture's page.
    pub fn image_page(&self, job: i64) -> String {
        format!("{}i/{job}", self.base)
    }

    /// A picture's file, as made.
    pub fn picture(&self, job: i64) -> String {
        format!("{}images/{job}.png", self.base)
    }

    /// A picture's thumbnail.
    pub fn thumbnail(&self, job: i64) -> String {
        format!("{}images/{job}.thumb.jpg", self.base)
    }

    fn stylesheet(&self) -> String {
        format!("{}gallery.css", self.base)
    }

    /// `path` (one of the above) as an absolute URL, when the public address is known.
    fn absolute(&self, path: &str) -> Option<String> {
        let url = self.public_url.as_ref()?;
        let relative = path.strip_prefix(&self.base).unwrap_or(path);
        url.join(relative).ok().map(String::from)
    }
}

/// A listing's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sort {
    /// Newest first.
    New,
    /// Most ⭐ over the last day.
    TopDay,
    /// Most ⭐ over the last week.
    TopWeek,
    /// Most ⭐ of all time.
    TopAll,
}

impl Sort {
    /// Every order, as the page's tabs list them.
    pub const ALL: [Sort; 4] = [Sort::New, Sort::TopDay, Sort::TopWeek, Sort::TopAll];

    /// Its query parameters (`sort=top&period=week`), empty for the default.
    pub fn query(self) -> &'static str {
        match self {
            Sort::New => "",
            Sort::TopDay => "sort=top&period=day",
            Sort::TopWeek => "sort=top&period=week",
            Sort::TopAll => "sort=top&period=all",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Sort::New => "Newest",
            Sort::TopDay => "Top today",
            Sort::TopWeek => "Top this week",
            Sort::TopAll => "Top of all time",
        }
    }
}

/// What a listing page shows.
pub(crate) struct Listing<'a> {
    /// Whose gallery.
    pub guild_id: u64,
    /// Its name, if known.
    pub guild_name: Option<&'a str>,
    /// In which order.
    pub sort: Sort,
    /// Only prompts containing this.
    pub search: Option<&'a str>,
    /// From 1.
    pub page: u32,
    /// The page's pictures.
    pub entries: &'a [PublicEntry],
    /// Whether a next page has any.
    pub has_next: bool,
}

impl Listing<'_> {
    /// The address of page `page` of this listing.
    fn href(&self, paths: &Paths, sort: Sort, page: u32) -> String {
        let mut query: Vec<String> = Vec::new();
        if !sort.query().is_empty() {
            query.push(sort.query().to_owned());
        }
        if let Some(text) = self.search {
            let encoded: String = url::form_urlencoded::byte_serialize(text.as_bytes()).collect();
            query.push(format!("q={encoded}"));
        }
        if page > 1 {
            query.push(format!("page={page}"));
        }
        let base = paths.gallery(self.guild_id);
        if query.is_empty() {
            base
        } else {
            format!("{base}?{}", query.join("&"))
        }
    }
}

fn gallery_title(name: Option<&str>, guild: u64) -> String {
    match name {
        Some(name) => format!("{name} — vqclip gallery"),
        None => format!("Server {guild} — vqclip gallery"),
    }
}

/// `text` cut to `chars` characters, with an ellipsis when cut.
fn short(text: &str, chars: usize) -> String {
    let mut cut: String = text.chars().take(chars).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

/// A time as `2026-12-07 11:30 UTC`.
fn date(at: Timestamp) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at.as_millis()) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

fn author(entry: &PublicEntry) -> String {
    entry
        .author_name
        .clone()
        .unwrap_or_else(|| "a member".to_owned())
}

fn models(entry: &PublicEntry) -> String {
    format!("{} + {}", entry.job.vqgan_model, entry.job.clip_model)
}

/// The frame of every page.
fn layout(paths: &Paths, title: &str, head: Markup, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                link rel="stylesheet" href=(paths.stylesheet());
                (head)
            }
            body {
                header.site { a href=(paths.home()) { "vqclip gallery" } }
                main { (body) }
                footer { "Made with VQGAN+CLIP by a Discord community. Pictures are shown as their \
                          server's gallery channel posted them." }
            }
        }
    }
}

/// The list of public galleries.
pub(crate) fn index(paths: &Paths, galleries: &[PublicGallery]) -> Markup {
    let body = html! {
        h1 { "Galleries" }
        @if galleries.is_empty() {
            p.empty { "Nothing has been posted to a gallery yet." }
        } @else {
            ul.galleries {
                @for g in galleries {
                    li {
                        a href=(paths.gallery(g.guild_id)) {
                            (g.name.clone().unwrap_or_else(|| format!("Server {}", g.guild_id)))
                        }
                        " — " (g.posts) @if g.posts == 1 { " picture" } @else { " pictures" }
                        ", latest " (date(g.latest))
                    }
                }
            }
        }
    };
    layout(paths, "vqclip gallery", html! {}, body)
}

/// One page of a gallery.
pub(crate) fn listing(paths: &Paths, listing: &Listing<'_>) -> Markup {
    let title = gallery_title(listing.guild_name, listing.guild_id);
    let head = html! {
        meta property="og:type" content="website";
        meta property="og:title" content=(title);
        meta property="og:site_name" content="vqclip gallery";
    };
    let body = html! {
        h1 { (listing.guild_name.map_or_else(|| format!("Server {}", listing.guild_id), str::to_owned)) }
        nav.sorts {
            @for sort in Sort::ALL {
                @if sort == listing.sort {
                    strong aria-current="page" { (sort.label()) }
                } @else {
                    a href=(listing.href(paths, sort, 1)) { (sort.label()) }
                }
            }
        }
        form.search method="get" action=(paths.gallery(listing.guild_id)) role="search" {
            @if !listing.sort.query().is_empty() {
                input type="hidden" name="sort" value="top";
                input type="hidden" name="period" value=(match listing.sort {
                    Sort::TopDay => "day", Sort::TopWeek => "week", _ => "all" });
            }
            input type="search" name="q" maxlength="100" placeholder="Search prompts"
                value=(listing.search.unwrap_or_default()) aria-label="Search prompts";
            button type="submit" { "Search" }
        }
        @if let Some(text) = listing.search {
            p.searching { "Prompts containing “" (text) "”" }
        }
        @if listing.entries.is_empty() {
            p.empty {
                @if listing.page > 1 { "No more pictures here. " a href=(listing.href(paths, listing.sort, 1)) { "Back to the first page" } }
                @else { "No pictures here yet." }
            }
        }
        section.grid {
            @for e in listing.entries { (card(paths, e)) }
        }
        nav.pages aria-label="Pages" {
            @if listing.page > 1 {
                a rel="prev" href=(listing.href(paths, listing.sort, listing.page - 1)) { "← Previous" }
            }
            span.page { "Page " (listing.page) }
            @if listing.has_next {
                a rel="next" href=(listing.href(paths, listing.sort, listing.page + 1)) { "Next →" }
            }
        }
    };
    layout(paths, &title, head, body)
}

/// A picture in a listing.
fn card(paths: &Paths, e: &PublicEntry) -> Markup {
    let job = &e.job;
    let again = crate::jobs::reproduce_command_to_share(job);
    html! {
        article.card {
            a.picture href=(paths.image_page(job.id.0)) {
                img src=(paths.thumbnail(job.id.0)) alt=(short(&job.prompt, SHORT_PROMPT_CHARS))
                    width=(job.width) height=(job.height) loading="lazy";
            }
            p.prompt { a href=(paths.image_page(job.id.0)) { (short(&job.prompt, SHORT_PROMPT_CHARS)) } }
            p.meta { "by " span.author { (author(e)) } " · ⭐ " span.votes { (e.votes) } }
            dl {
                dt { "Seed" } dd { (job.seed) }
                dt { "Size" } dd { (job.width) "×" (job.height) }
                dt { "Models" } dd { (models(e)) }
            }
            details { summary { "Again" } code.again { (again) } }
        }
    }
}

/// A picture's own page, with the Open Graph tags that make a shared link unfurl with it.
pub(crate) fn image(paths: &Paths, e: &PublicEntry, guild_name: Option<&str>) -> Markup {
    let job = &e.job;
    let title = short(&job.prompt, SHORT_PROMPT_CHARS);
    let description = format!(
        "By {} · ⭐ {} · seed {} · {}×{} · {}",
        author(e),
        e.votes,
        job.seed,
        job.width,
        job.height,
        models(e)
    );
    let page_url = paths.absolute(&paths.image_page(job.id.0));
    let picture_url = paths.absolute(&paths.picture(job.id.0));
    let head = html! {
        meta name="description" content=(description);
        meta property="og:type" content="article";
        meta property="og:site_name" content=(gallery_title(guild_name, e.guild_id));
        meta property="og:title" content=(title);
        meta property="og:description" content=(description);
        @if let Some(url) = &page_url { meta property="og:url" content=(url); link rel="canonical" href=(url); }
        @if let Some(url) = &picture_url {
            meta property="og:image" content=(url);
            meta property="og:image:type" content="image/png";
            meta property="og:image:width" content=(job.width);
            meta property="og:image:height" content=(job.height);
            meta property="og:image:alt" content=(title);
            meta name="twitter:card" content="summary_large_image";
            meta name="twitter:image" content=(url);
        }
        meta name="twitter:title" content=(title);
    };
    let discord = format!(
        "https://discord.com/channels/{}/{}/{}",
        e.guild_id, e.channel_id, e.message_id
    );
    let body = html! {
        p.back { a href=(paths.gallery(e.guild_id)) { "← " (guild_name.map_or_else(|| format!("Server {}", e.guild_id), str::to_owned)) } }
        figure.full {
            img src=(paths.picture(job.id.0)) alt=(title) width=(job.width) height=(job.height);
            figcaption { h1.prompt { (job.prompt) } }
        }
        dl.details {
            dt { "By" } dd.author { (author(e)) }
            dt { "Votes" } dd { "⭐ " (e.votes) }
            dt { "Seed" } dd { (job.seed) }
            dt { "Size" } dd { (job.width) "×" (job.height) }
            dt { "Steps" } dd { (job.steps) }
            dt { "Models" } dd { (models(e)) }
            dt { "Posted" } dd { (date(e.posted_at)) }
            dt { "Job" } dd { (job.id.0) " (" (job.kind.as_str()) ")" }
        }
        h2 { "Make it again" }
        pre.again { code { (crate::jobs::reproduce_command_to_share(job)) } }
        p { a href=(discord) { "Open in Discord" } }
    };
    layout(paths, &format!("{title} — vqclip gallery"), head, body)
}

/// A page that says what went wrong, for 400, 404 and 503.
pub(crate) fn problem(paths: &Paths, title: &str, text: &str) -> Markup {
    let body = html! {
        h1 { (title) }
        p { (text) }
        p { a href=(paths.home()) { "Back to the galleries" } }
    };
    layout(paths, title, html! {}, body)
}

/// The stylesheet: small, no fonts or scripts to fetch.
pub(crate) const STYLESHEET: &str = r#"
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #fafafa; --card: #fff; --muted: #666; --accent: #5865f2; }
@media (prefers-color-scheme: dark) { :root { --fg: #eee; --bg: #16171a; --card: #23252a; --muted: #aaa; --accent: #8891f7; } }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header.site, main, footer { max-width: 1280px; margin: 0 auto; padding: 0.75rem 1rem; }
header.site a { font-weight: 700; color: var(--fg); text-decoration: none; }
footer { color: var(--muted); font-size: 0.85rem; }
a { color: var(--accent); }
h1 { font-size: 1.6rem; margin: 0.5rem 0; overflow-wrap: anywhere; }
nav.sorts { display: flex; gap: 1rem; flex-wrap: wrap; margin: 0.5rem 0; }
form.search { display: flex; gap: 0.5rem; margin: 0.5rem 0 1rem; }
form.search input { flex: 1; max-width: 28rem; padding: 0.4rem; }
section.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1rem; }
article.card { background: var(--card); border-radius: 8px; padding: 0.6rem; overflow: hidden; }
article.card img { width: 100%; height: auto; display: block; border-radius: 4px; background: #888; }
article.card p { margin: 0.4rem 0; overflow-wrap: anywhere; }
p.meta, dl { color: var(--muted); font-size: 0.9rem; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 0 0.6rem; margin: 0.3rem 0; }
dd { margin: 0; overflow-wrap: anywhere; }
code.again, pre.again { display: block; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.8rem; }
nav.pages { display: flex; gap: 1.5rem; justify-content: center; margin: 1.5rem 0; }
figure.full { margin: 0; }
figure.full img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
h1.prompt { font-size: 1.3rem; font-weight: 500; }
"#;
