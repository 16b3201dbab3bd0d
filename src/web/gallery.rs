//! The web gallery's routes: `/` (the public galleries), `/g/{guild}` (a gallery, newest or
//! by ⭐ over a day, a week or all time, searchable, 24 pictures a page), `/i/{job}` (a picture's
//! page, with Open Graph tags), `/images/{job}.png` and `/images/{job}.thumb.jpg` (the picture
//! and its thumbnail) and `/gallery.css`.
//!
//! Only public posts are shown (see `store::public`); the picture files are checked the same way
//! on every request. Paths are parsed into numbers before anything is looked up, so no part of a
//! request ever names a file. Query parameters are read leniently but strictly bounded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::Markup;
use tokio::sync::Semaphore;

use super::WebState;
use super::pages::{self, Listing, Paths, Sort};
use crate::jobs::JobId;
use crate::store::public::{self, PublicQuery};
use crate::store::{Store, Timestamp, events};

/// Pictures per page.
pub const PAGE_SIZE: u32 = 24;
/// Highest page number served (240,000 pictures deep).
pub const MAX_PAGE: u32 = 10_000;
/// Longest search text kept, in characters.
pub const MAX_SEARCH_CHARS: usize = 100;
/// Longest query string read, in bytes; a longer one is refused.
const MAX_QUERY_BYTES: usize = 2048;
/// Longest side of a thumbnail.
const THUMBNAIL_SIDE: u32 = 512;
/// Thumbnails made at once (each decodes a picture on a blocking thread).
const THUMBNAIL_WORKERS: usize = 2;
/// How long browsers and proxies may keep a picture or a page (a moderator's removal shows
/// within this).
const PICTURE_MAX_AGE: Duration = Duration::from_secs(3600);
const PAGE_MAX_AGE: Duration = Duration::from_secs(60);
/// How long a page waits for the database.
const DATABASE_WAIT: Duration = Duration::from_secs(5);

/// What the gallery's handlers need besides the store.
#[derive(Clone)]
pub struct GallerySite {
    /// Where this host writes finished pictures (`storage.images`).
    pub images: PathBuf,
    /// Where the pages live.
    pub(crate) paths: Paths,
    /// Permits to make thumbnails.
    thumbnails: Arc<Semaphore>,
}

impl GallerySite {
    /// The gallery of pictures under `images`, reached at `public_url` (its path is the
    /// prefix a reverse proxy forwards; links and Open Graph URLs are made from it).
    pub fn new(images: PathBuf, public_url: Option<url::Url>) -> Self {
        let base = public_url
            .as_ref()
            .map_or_else(|| "/".to_owned(), |u| u.path().to_owned());
        let base = if base.ends_with('/') {
            base
        } else {
            format!("{base}/")
        };
        Self {
            images,
            paths: Paths { base, public_url },
            thumbnails: Arc::new(Semaphore::new(THUMBNAIL_WORKERS)),
        }
    }
}

/// The gallery's routes (served at the root: a proxy's prefix is stripped before them).
pub(super) fn routes() -> Router<WebState> {
    Router::new()
        .route("/", get(index))
        .route("/gallery.css", get(stylesheet))
        .route("/g/{guild}", get(gallery))
        .route("/i/{job}", get(image_page))
        .route("/images/{file}", get(picture))
}

fn site(state: &WebState) -> &GallerySite {
    state
        .gallery
        .as_ref()
        .expect("gallery routes are only mounted with a gallery")
}

fn html(status: StatusCode, max_age: Option<Duration>, markup: Markup) -> Response {
    let cache = match max_age {
        Some(age) => format!("public, max-age={}", age.as_secs()),
        None => "no-store".to_owned(),
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_owned()),
            (header::CACHE_CONTROL, cache),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; \
                 base-uri 'none'; frame-ancestors 'none'"
                    .to_owned(),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::REFERRER_POLICY, "same-origin".to_owned()),
        ],
        markup.into_string(),
    )
        .into_response()
}

fn problem(state: &WebState, status: StatusCode, title: &str, text: &str) -> Response {
    html(
        status,
        None,
        pages::problem(&site(state).paths, title, text),
    )
}

fn not_found(state: &WebState) -> Response {
    problem(
        state,
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page, or the picture is no longer in its gallery.",
    )
}

/// A database failure as the visitor sees it (logged and counted for the operator).
fn unavailable(state: &WebState, error: &str) -> Response {
    crate::metrics::global().database_errors.inc();
    tracing::warn!(error, "web gallery: database error");
    problem(
        state,
        StatusCode::SERVICE_UNAVAILABLE,
        "The gallery is unavailable",
        "It cannot reach its database just now. Try again in a minute.",
    )
}

/// `query` within [`DATABASE_WAIT`].
async fn bounded<T>(query: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, String> {
    match tokio::time::timeout(DATABASE_WAIT, query).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", DATABASE_WAIT.as_secs())),
    }
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        pages::STYLESHEET,
    )
        .into_response()
}

async fn index(State(state): State<WebState>) -> Response {
    match bounded(public::list_galleries(&state.store, 1000)).await {
        Ok(galleries) => html(
            StatusCode::OK,
            Some(PAGE_MAX_AGE),
            pages::index(&site(&state).paths, &galleries),
        ),
        Err(e) => unavailable(&state, &e),
    }
}

/// A listing's parameters, as the query string gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListingQuery {
    /// The order.
    pub sort: Sort,
    /// The search text, cleaned and cut.
    pub search: Option<String>,
    /// From 1.
    pub page: u32,
}

/// Reads `sort` (`new`, `top`), `period` (`day`, `week`, `all`), `q` and `page` (1 to
/// [`MAX_PAGE`]); other parameters are ignored. What cannot be read is an error in words.
pub(crate) fn parse_listing(query: Option<&str>) -> Result<ListingQuery, String> {
    let query = query.unwrap_or_default();
    if query.len() > MAX_QUERY_BYTES {
        return Err("That address is too long.".to_owned());
    }
    let (mut top, mut period, mut search, mut page) = (false, "all".to_owned(), None, 1);
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "sort" => match &*value {
                "new" | "" => top = false,
                "top" => top = true,
                _ => return Err("The order is either “new” or “top”.".to_owned()),
            },
            "period" => match &*value {
                "day" | "week" | "all" => period = value.into_owned(),
                "" => period = "all".to_owned(),
                _ => return Err("The period is “day”, “week” or “all”.".to_owned()),
            },
            "q" => search = crate::store::names::one_line(&value, MAX_SEARCH_CHARS),
            "page" if value.is_empty() => page = 1,
            "page" => {
                page = value
                    .parse::<u32>()
                    .ok()
                    .filter(|p| (1..=MAX_PAGE).contains(p))
                    .ok_or_else(|| format!("Pages are numbered from 1 to {MAX_PAGE}."))?;
            }
            _ => {}
        }
    }
    let sort = match (top, period.as_str()) {
        (false, _) => Sort::New,
        (true, "day") => Sort::TopDay,
        (true, "week") => Sort::TopWeek,
        (true, _) => Sort::TopAll,
    };
    Ok(ListingQuery { sort, search, page })
}

/// An id from a path segment: decimal digits only, in range, else `None`.
fn parse_id(text: &str) -> Option<i64> {
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<i64>().ok().filter(|&id| id > 0)
}

async fn gallery(
    State(state): State<WebState>,
    Path(guild): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(guild) = parse_id(&guild).and_then(|g| u64::try_from(g).ok()) else {
        return not_found(&state);
    };
    let wanted = match parse_listing(query.as_deref()) {
        Ok(wanted) => wanted,
        Err(text) => {
            return problem(
                &state,
                StatusCode::BAD_REQUEST,
                "Cannot show that page",
                &text,
            );
        }
    };
    let name = match bounded(public::gallery_name(&state.store, guild)).await {
        Ok(Some(name)) => name,
        Ok(None) => return not_found(&state),
        Err(e) => return unavailable(&state, &e),
    };
    let since = |hours: u64| Some(Timestamp::now().minus(Duration::from_secs(hours * 3600)));
    let (by_votes, since) = match wanted.sort {
        Sort::New => (false, None),
        Sort::TopDay => (true, since(24)),
        Sort::TopWeek => (true, since(24 * 7)),
        Sort::TopAll => (true, None),
    };
    let query = PublicQuery {
        guild_id: guild,
        by_votes,
        since,
        text: wanted.search.clone(),
    };
    // One more than a page: whether there is a next one.
    let offset = (wanted.page - 1) * PAGE_SIZE;
    let mut entries = match bounded(public::list(&state.store, &query, PAGE_SIZE + 1, offset)).await
    {
        Ok(entries) => entries,
        Err(e) => return unavailable(&state, &e),
    };
    let has_next = entries.len() > PAGE_SIZE as usize;
    entries.truncate(PAGE_SIZE as usize);
    let listing = Listing {
        guild_id: guild,
        guild_name: name.as_deref(),
        sort: wanted.sort,
        search: wanted.search.as_deref(),
        page: wanted.page,
        entries: &entries,
        has_next,
    };
    html(
        StatusCode::OK,
        Some(PAGE_MAX_AGE),
        pages::listing(&site(&state).paths, &listing),
    )
}

async fn image_page(State(state): State<WebState>, Path(job): Path<String>) -> Response {
    let Some(job) = parse_id(&job) else {
        return not_found(&state);
    };
    let entry = match bounded(public::get(&state.store, JobId(job))).await {
        Ok(Some(entry)) => entry,
        Ok(None) => return not_found(&state),
        Err(e) => return unavailable(&state, &e),
    };
    let name = match bounded(public::gallery_name(&state.store, entry.guild_id)).await {
        Ok(name) => name.flatten(),
        Err(e) => return unavailable(&state, &e),
    };
    html(
        StatusCode::OK,
        Some(PAGE_MAX_AGE),
        pages::image(&site(&state).paths, &entry, name.as_deref()),
    )
}

/// Which file of a picture a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PictureFile {
    /// `{job}.png`: the picture as made.
    Full(i64),
    /// `{job}.thumb.jpg`: a JPEG at most [`THUMBNAIL_SIDE`] a side.
    Thumbnail(i64),
}

/// Reads `{job}.png` or `{job}.thumb.jpg`; anything else (`..`, slashes, other names) is
/// `None`.
pub(crate) fn parse_picture(name: &str) -> Option<PictureFile> {
    if let Some(id) = name.strip_suffix(".thumb.jpg") {
        return parse_id(id).map(PictureFile::Thumbnail);
    }
    name.strip_suffix(".png")
        .and_then(parse_id)
        .map(PictureFile::Full)
}

async fn picture(
    State(state): State<WebState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(file) = parse_picture(&name) else {
        return not_found(&state);
    };
    let (PictureFile::Full(id) | PictureFile::Thumbnail(id)) = file;
    let job = JobId(id);
    let recorded = match bounded(public::public_picture(&state.store, job)).await {
        Ok(Some(sha256)) => sha256,
        Ok(None) => return not_found(&state),
        Err(e) => return unavailable(&state, &e),
    };
    // The picture of a job never changes: its hash is its version, so a cache's copy is
    // confirmed without reading the picture.
    let tag_of = |version: &str| {
        let suffix = if matches!(file, PictureFile::Thumbnail(_)) {
            "-t"
        } else {
            ""
        };
        format!("\"{id}-{}{suffix}\"", &version[..version.len().min(16)])
    };
    let cached = |tag: &str| {
        headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"))
    };
    let known = (!recorded.is_empty()).then(|| tag_of(&recorded));
    if let Some(tag) = &known
        && cached(tag)
    {
        return (StatusCode::NOT_MODIFIED, picture_headers("", tag)).into_response();
    }
    let site = site(&state);
    let (content_type, bytes) = match file {
        PictureFile::Full(_) => (
            "image/png",
            stored_picture(&state.store, &site.images, job).await,
        ),
        PictureFile::Thumbnail(_) => ("image/jpeg", thumbnail(&state.store, site, job).await),
    };
    let bytes = match bytes {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return not_found(&state),
        Err(PictureError::Database(e)) => return unavailable(&state, &e),
        Err(PictureError::Unreadable(e)) => {
            tracing::warn!(job_id = id, error = %e, "web gallery: cannot make a thumbnail");
            return problem(
                &state,
                StatusCode::INTERNAL_SERVER_ERROR,
                "Cannot show that picture",
                "Its file could not be read.",
            );
        }
    };
    // A job that recorded no hash (none should) is versioned by what is sent.
    let tag = known.unwrap_or_else(|| tag_of(&hex_sha256(&bytes)));
    if cached(&tag) {
        return (StatusCode::NOT_MODIFIED, picture_headers("", &tag)).into_response();
    }
    (picture_headers(content_type, &tag), bytes).into_response()
}

/// Why a picture's bytes could not be had.
enum PictureError {
    /// The database did not answer.
    Database(String),
    /// The picture could not be decoded or its thumbnail made.
    Unreadable(anyhow::Error),
}

fn picture_headers(content_type: &'static str, tag: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("public, max-age={}", PICTURE_MAX_AGE.as_secs()))
            .expect("ASCII"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(tag) = HeaderValue::from_str(tag) {
        headers.insert(header::ETAG, tag);
    }
    if !content_type.is_empty() {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    headers
}

/// `bytes`' SHA-256, in hex.
fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A job's picture: written on this host, or stored in the database by a worker elsewhere.
async fn stored_picture(
    store: &Store,
    images: &std::path::Path,
    job: JobId,
) -> Result<Option<Vec<u8>>, PictureError> {
    let path = crate::jobs::image_path(images, job);
    let limit = crate::engine::image::MAX_INPUT_FILE_BYTES;
    let local =
        tokio::task::spawn_blocking(move || crate::engine::image::read_bounded(&path, limit))
            .await
            .map_err(|e| PictureError::Unreadable(e.into()))?;
    if let Ok(bytes) = local {
        return Ok(Some(bytes));
    }
    bounded(events::get_job_file(store, job, events::IMAGE))
        .await
        .map_err(PictureError::Database)
}

/// A picture's thumbnail: stored beside it once made, made at most [`THUMBNAIL_WORKERS`] at a
/// time on blocking threads.
async fn thumbnail(
    store: &Store,
    site: &GallerySite,
    job: JobId,
) -> Result<Option<Vec<u8>>, PictureError> {
    let stored = || async {
        bounded(events::get_job_file(store, job, events::THUMBNAIL))
            .await
            .map_err(PictureError::Database)
    };
    if let Some(jpeg) = stored().await? {
        return Ok(Some(jpeg));
    }
    let _permit = site
        .thumbnails
        .acquire()
        .await
        .map_err(|e| PictureError::Unreadable(e.into()))?;
    // Another request for it may have made it while this one waited.
    if let Some(jpeg) = stored().await? {
        return Ok(Some(jpeg));
    }
    let Some(png) = stored_picture(store, &site.images, job).await? else {
        return Ok(None);
    };
    let jpeg = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let picture = crate::engine::image::decode(&png)?;
        let small = crate::engine::image::downscale(&picture, THUMBNAIL_SIDE);
        Ok(crate::engine::image::encode_jpeg(&small, 85)?)
    })
    .await
    .map_err(|e| PictureError::Unreadable(e.into()))?
    .map_err(PictureError::Unreadable)?;
    if let Err(e) = bounded(events::put_job_file(store, job, events::THUMBNAIL, &jpeg)).await {
        tracing::warn!(job_id = job.0, error = %e, "web gallery: cannot store a thumbnail");
    }
    Ok(Some(jpeg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_parameters_are_read_or_refused_in_words() {
        let q = parse_listing(None).unwrap();
        assert_eq!((q.sort, q.search, q.page), (Sort::New, None, 1));
        let q = parse_listing(Some("sort=top&period=week&page=3&q=+red%20fox+&x=1")).unwrap();
        assert_eq!(q.sort, Sort::TopWeek);
        assert_eq!(q.search.as_deref(), Some("red fox"));
        assert_eq!(q.page, 3);
        assert_eq!(parse_listing(Some("sort=top")).unwrap().sort, Sort::TopAll);
        for bad in [
            "page=0",
            "page=-1",
            "page=10001",
            "page=1e3",
            "page=%FF",
            "sort=best",
            "period=year",
        ] {
            assert!(parse_listing(Some(bad)).is_err(), "{bad}");
        }
        assert!(parse_listing(Some(&"q=a".repeat(1000))).is_err());
        let long = format!("q={}", "é".repeat(300));
        assert_eq!(
            parse_listing(Some(&long))
                .unwrap()
                .search
                .unwrap()
                .chars()
                .count(),
            MAX_SEARCH_CHARS
        );
    }

    #[test]
    fn picture_names_are_numbers_with_one_of_two_endings() {
        assert_eq!(parse_picture("12.png"), Some(PictureFile::Full(12)));
        assert_eq!(
            parse_picture("12.thumb.jpg"),
            Some(PictureFile::Thumbnail(12))
        );
        for bad in [
            "../12.png",
            "..%2F12.png",
            "12.PNG",
            "12.jpg",
            "0.png",
            "-1.png",
            "+1.png",
            ".png",
            "12.png.png",
            "1/2.png",
            "99999999999999999999.png",
            "12 .png",
            "１２.png",
        ] {
            assert_eq!(parse_picture(bad), None, "{bad}");
        }
    }
}
