//! The web gallery over real HTTP on both database backends: what is listed (only public
//! posts), in which order, 24 to a page, searched; a picture's page with its Open Graph tags;
//! the picture files with their types and caching; hostile paths and parameters.

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use vqclip::jobs::{JobId, Scheduler};
use vqclip::store::Store;
use vqclip::store::jobs::{self, JobOutput};
use vqclip::store::{events, gallery, guilds, names, safety};
use vqclip::web::{GallerySite, WebState, start};

use crate::scheduler::{FakeRunner, options, slots};
use crate::support::{on_both_backends, sample_job};
use crate::web::{fetch, request};

/// The guild whose gallery the tests fill.
pub(crate) const GUILD: u64 = 1_100_000_000_000_000_001;
const GALLERY_CHANNEL: u64 = 1_100_000_000_000_000_077;

/// A 64×64 picture that is magenta inside a 4-pixel dark frame: easy to find in a screenshot.
pub(crate) fn magenta_png() -> Vec<u8> {
    let picture = image::RgbImage::from_fn(64, 64, |x, y| {
        let edge = x < 4 || y < 4 || x >= 60 || y >= 60;
        if edge {
            image::Rgb([20, 20, 20])
        } else {
            image::Rgb([255, 0, 255])
        }
    });
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(picture.as_raw(), 64, 64, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

use image::ImageEncoder as _;

/// A finished job of `author` (shown as `name`) in `guild`, its picture stored in the database
/// as a worker on another host stores it, posted to the gallery unless `posted` is false.
pub(crate) async fn picture(
    db: &Store,
    guild: u64,
    author: (u64, &str),
    prompt: &str,
    posted: bool,
) -> JobId {
    let mut new = sample_job(author.0, prompt);
    new.guild_id = Some(guild);
    let id = jobs::insert_job(db, &new).await.unwrap();
    assert!(jobs::mark_job_running(db, id, "cpu").await.unwrap());
    let output = JobOutput {
        path: "/nonexistent/elsewhere.png".into(),
        sha256: "ab".repeat(32),
        final_loss: 0.5,
    };
    assert!(
        jobs::mark_job_succeeded(db, id, None, &output)
            .await
            .unwrap()
    );
    events::put_job_file(db, id, events::IMAGE, &magenta_png())
        .await
        .unwrap();
    names::record_member_name(db, guild, author.0, author.1)
        .await
        .unwrap();
    if posted {
        let message = 1_200_000_000_000_000_000 + u64::try_from(id.0).unwrap();
        gallery::insert_gallery_post(db, id, guild, GALLERY_CHANNEL, message)
            .await
            .unwrap();
    }
    id
}

/// A gallery for `GUILD` named "Pixel Club".
pub(crate) async fn open_gallery(db: &Store) {
    guilds::set_gallery_channel(db, GUILD, Some(GALLERY_CHANNEL))
        .await
        .unwrap();
    names::record_guild_name(db, GUILD, "Pixel Club")
        .await
        .unwrap();
}

/// What [`serve_gallery`] returns: the address, the scheduler, its folder, and the server's stop.
pub(crate) type Served = (
    SocketAddr,
    Scheduler,
    tempfile::TempDir,
    tokio::sync::oneshot::Sender<()>,
);

/// Serves the gallery (with `public_url`, the pictures of this host in `images` or else a new
/// empty folder) over `db` until the returned sender drops.
pub(crate) async fn serve_gallery_of(
    db: &Store,
    public_url: Option<&str>,
    images: Option<&std::path::Path>,
) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let runner = FakeRunner::new(5);
    let scheduler = Scheduler::start(db.clone(), options(&dir), slots(&[&runner]))
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let state = WebState {
        store: db.clone(),
        scheduler: scheduler.clone(),
        gateway: None,
        gallery: Some(GallerySite::new(
            images.map_or_else(|| dir.path().join("images"), std::path::Path::to_path_buf),
            public_url.map(|u| u.parse().unwrap()),
        )),
    };
    let (address, _task) = start("127.0.0.1:0".parse().unwrap(), state, async move {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    (address, scheduler, dir, stop_tx)
}

/// [`serve_gallery_of`] with pictures in the database only.
pub(crate) async fn serve_gallery(db: &Store, public_url: Option<&str>) -> Served {
    serve_gallery_of(db, public_url, None).await
}

/// The job ids a listing page links to, in order.
fn listed(body: &str) -> Vec<i64> {
    body.match_indices("<article class=\"card\"><a class=\"picture\" href=\"/i/")
        .map(|(at, m)| {
            let rest = &body[at + m.len()..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        })
        .collect()
}

pub(crate) fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

on_both_backends! {
    async fn only_public_posts_are_listed_newest_first_24_to_a_page(db) {
        open_gallery(&db).await;
        let mut posted = Vec::new();
        for k in 0..30 {
            posted.push(picture(&db, GUILD, (7, "Ada"), &format!("a lighthouse number {k}"), true).await);
        }
        // Never public: not posted, flagged by the safety check, marked unsafe, removed by a
        // moderator, a guild without a gallery channel, a guild whose channel was unset.
        let unposted = picture(&db, GUILD, (7, "Ada"), "a draft", false).await;
        let flagged = picture(&db, GUILD, (7, "Ada"), "flagged", true).await;
        safety::set_unsafe_score(&db, flagged, 0.9, true).await.unwrap();
        let judged = picture(&db, GUILD, (7, "Ada"), "judged", true).await;
        safety::set_verdict(&db, judged, safety::Safety::Unsafe).await.unwrap();
        let removed = picture(&db, GUILD, (7, "Ada"), "removed", true).await;
        let post = gallery::find_gallery_post_by_job(&db, removed, GUILD).await.unwrap().unwrap();
        gallery::delete_gallery_post(&db, post.id).await.unwrap();
        let elsewhere = picture(&db, 55, (8, "Bo"), "no gallery here", true).await;
        guilds::set_gallery_channel(&db, 66, Some(9)).await.unwrap();
        guilds::set_gallery_channel(&db, 66, None).await.unwrap();
        let closed = picture(&db, 66, (8, "Bo"), "gallery closed", true).await;
        // Allowed by a moderator after a flag: public again.
        let allowed = picture(&db, GUILD, (7, "Ada"), "allowed after all", true).await;
        safety::set_unsafe_score(&db, allowed, 0.9, true).await.unwrap();
        safety::set_verdict(&db, allowed, safety::Safety::Allowed).await.unwrap();

        let (address, scheduler, _dir, _stop) = serve_gallery(&db, None).await;
        let (status, head, body) = request(address, "GET", &format!("/g/{GUILD}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&head, "content-type"), Some("text/html; charset=utf-8"));
        assert!(header(&head, "content-security-policy").unwrap().contains("default-src 'none'"));
        assert!(body.contains("<h1>Pixel Club</h1>"), "{body}");
        let page1 = listed(&body);
        let mut expected: Vec<i64> = std::iter::once(allowed.0)
            .chain(posted.iter().rev().map(|j| j.0))
            .collect();
        assert_eq!(page1, expected[..24], "newest first, 24 to a page");
        assert!(body.contains("rel=\"next\" href=\"/g/1100000000000000001?page=2\""), "{body}");
        assert!(!body.contains("rel=\"prev\""));
        // Each card: the picture, prompt, author, votes, seed, size, models, the command.
        assert!(body.contains(&format!("src=\"/images/{}.thumb.jpg\"", allowed.0)));
        assert!(body.contains("by <span class=\"author\">Ada</span>"));
        assert!(body.contains("<dd>42</dd>") && body.contains("<dd>256×256</dd>"));
        assert!(body.contains("<dd>imagenet_f16_16384 + vit_b32</dd>"));
        assert!(body.contains("vqclip imagine"), "{body}");

        let (status, _, body) = request(address, "GET", &format!("/g/{GUILD}?page=2")).await;
        assert_eq!(status, 200);
        let page2 = listed(&body);
        assert_eq!(page2, expected.split_off(24));
        assert!(body.contains("rel=\"prev\" href=\"/g/1100000000000000001\""));
        assert!(!body.contains("rel=\"next\""));
        let (status, _, body) = request(address, "GET", &format!("/g/{GUILD}?page=9")).await;
        assert_eq!(status, 200);
        assert!(listed(&body).is_empty() && body.contains("No more pictures here"));

        for hidden in [unposted, flagged, judged, removed, elsewhere, closed] {
            for path in [
                format!("/i/{}", hidden.0),
                format!("/images/{}.png", hidden.0),
                format!("/images/{}.thumb.jpg", hidden.0),
            ] {
                assert_eq!(request(address, "GET", &path).await.0, 404, "{path}");
            }
        }
        assert_eq!(request(address, "GET", "/g/55").await.0, 404);
        assert_eq!(request(address, "GET", "/g/66").await.0, 404);
        let (_, _, index) = request(address, "GET", "/").await;
        assert!(index.contains("href=\"/g/1100000000000000001\">Pixel Club</a> — 31 pictures"), "{index}");
        assert!(!index.contains("/g/55") && !index.contains("/g/66"));
        scheduler.shutdown(Duration::from_secs(1)).await;
    }

    async fn top_and_search_rank_and_filter(db) {
        open_gallery(&db).await;
        let quiet = picture(&db, GUILD, (7, "Ada"), "a quiet 100% lake_side", true).await;
        let loved = picture(&db, GUILD, (7, "Ada"), "a loved Fox", true).await;
        let liked = picture(&db, GUILD, (8, "Bo"), "a liked fox", true).await;
        for (job, voters) in [(loved, 3u64), (liked, 2)] {
            let post = gallery::find_gallery_post_by_job(&db, job, GUILD).await.unwrap().unwrap();
            for voter in 0..voters {
                gallery::add_vote(&db, post.id, 500 + voter, gallery::STAR).await.unwrap();
            }
        }
        let (address, scheduler, _dir, _stop) = serve_gallery(&db, None).await;
        for period in ["day", "week", "all"] {
            let (status, _, body) =
                request(address, "GET", &format!("/g/{GUILD}?sort=top&period={period}")).await;
            assert_eq!(status, 200);
            assert_eq!(listed(&body), [loved.0, liked.0, quiet.0], "{period}");
        }
        let (_, _, body) = request(address, "GET", &format!("/g/{GUILD}?q=FOX")).await;
        assert_eq!(listed(&body), [liked.0, loved.0]);
        assert!(body.contains("value=\"FOX\""));
        // Searched literally: % and _ are not wildcards.
        let (_, _, body) = request(address, "GET", &format!("/g/{GUILD}?q=100%25%20lake_")).await;
        assert_eq!(listed(&body), [quiet.0]);
        let (_, _, body) = request(address, "GET", &format!("/g/{GUILD}?q=%25")).await;
        assert_eq!(listed(&body), [quiet.0]);
        let (_, _, body) = request(address, "GET", &format!("/g/{GUILD}?q=lake%25side")).await;
        assert!(listed(&body).is_empty());
        // The next page of a search keeps the search and the order.
        let (_, _, body) = request(address, "GET", &format!("/g/{GUILD}?sort=top&period=week&q=a")).await;
        assert!(body.contains("href=\"/g/1100000000000000001?sort=top&amp;period=day&amp;q=a\""), "{body}");
        scheduler.shutdown(Duration::from_secs(1)).await;
    }

    async fn a_pictures_page_unfurls_and_its_files_are_cached(db) {
        open_gallery(&db).await;
        let job = picture(&db, GUILD, (7, "<b>Ada</b>"), "<script>alert('x')</script> & \"friends\"", true).await;
        let (address, scheduler, _dir, _stop) =
            serve_gallery(&db, Some("https://art.example.org/vq/")).await;
        let (status, _, body) = request(address, "GET", &format!("/i/{}", job.0)).await;
        assert_eq!(status, 200, "{body}");
        // HTML in a prompt or a name is text.
        assert!(!body.contains("<script>") && !body.contains("<b>Ada"), "{body}");
        assert!(body.contains("&lt;script&gt;alert('x')&lt;/script&gt; &amp; &quot;friends&quot;"), "{body}");
        assert!(body.contains("&lt;b&gt;Ada&lt;/b&gt;"));
        // Open Graph: absolute URLs under the public address, the picture's size.
        for tag in [
            format!("<meta property=\"og:image\" content=\"https://art.example.org/vq/images/{}.png\">", job.0),
            format!("<meta property=\"og:url\" content=\"https://art.example.org/vq/i/{}\">", job.0),
            "<meta property=\"og:image:width\" content=\"256\">".to_owned(),
            "<meta property=\"og:type\" content=\"article\">".to_owned(),
            "<meta name=\"twitter:card\" content=\"summary_large_image\">".to_owned(),
        ] {
            assert!(body.contains(&tag), "{tag} in {body}");
        }
        assert!(body.contains("<meta property=\"og:title\" content=\"&lt;script&gt;"), "{body}");
        // Links follow the proxy's prefix.
        assert!(body.contains(&format!("src=\"/vq/images/{}.png\"", job.0)));
        assert!(body.contains("href=\"https://discord.com/channels/1100000000000000001/1100000000000000077/"));

        let (status, head, png) = fetch(address, "GET", &format!("/images/{}.png", job.0), "").await;
        assert_eq!(status, 200);
        assert_eq!(png, magenta_png());
        assert_eq!(header(&head, "content-type"), Some("image/png"));
        assert_eq!(header(&head, "cache-control"), Some("public, max-age=3600"));
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
        let tag = header(&head, "etag").unwrap().to_owned();
        let (status, _, body) =
            fetch(address, "GET", &format!("/images/{}.png", job.0), &format!("If-None-Match: {tag}\r\n")).await;
        assert_eq!((status, body.len()), (304, 0));

        let (status, head, jpeg) = fetch(address, "GET", &format!("/images/{}.thumb.jpg", job.0), "").await;
        assert_eq!(status, 200);
        assert_eq!(header(&head, "content-type"), Some("image/jpeg"));
        let thumb = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (64, 64));
        // Made once, then kept beside the picture.
        assert_eq!(events::get_job_file(&db, job, events::THUMBNAIL).await.unwrap(), Some(jpeg));
        assert_ne!(header(&head, "etag"), Some(tag.as_str()));

        // Picture paths name numbers, never files.
        for path in [
            "/images/../../etc/passwd",
            "/images/..%2F..%2Fetc%2Fpasswd",
            "/images/%2e%2e%2fvqclip.sqlite",
            &format!("/images/{}.png%00.jpg", job.0),
            &format!("/images/{}.PNG", job.0),
            &format!("/images/0{}.png/", job.0),
            "/images/-1.png",
            "/images/99999999999999999999.png",
            "/i/..%2F1",
            "/i/1.5",
            "/g/%2e%2e",
            "/g/-3",
        ] {
            assert_eq!(request(address, "GET", path).await.0, 404, "{path}");
        }
        assert_eq!(request(address, "POST", &format!("/i/{}", job.0)).await.0, 405);
        scheduler.shutdown(Duration::from_secs(1)).await;
    }

    async fn a_database_that_stops_answering_is_a_503_page(db) {
        open_gallery(&db).await;
        let job = picture(&db, GUILD, (7, "Ada"), "a lighthouse", true).await;
        let (address, scheduler, _dir, _stop) = serve_gallery(&db, None).await;
        assert_eq!(request(address, "GET", &format!("/i/{}", job.0)).await.0, 200);
        db.close().await;
        for path in ["/", &format!("/g/{GUILD}"), &format!("/i/{}", job.0), &format!("/images/{}.png", job.0)] {
            let (status, _, body) = request(address, "GET", path).await;
            assert_eq!(status, 503, "{path}");
            assert!(body.contains("cannot reach its database"), "{body}");
        }
        scheduler.shutdown(Duration::from_secs(1)).await;
    }
}

/// Hostile query strings: every answer is a page (200) or a clear refusal (400), never an
/// error of ours, and nothing in them comes back as markup.
#[test]
fn fuzzed_page_and_search_parameters_are_answered_or_refused() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (dir, db) = runtime.block_on(crate::support::test_pool());
    let (address, scheduler, _images, stop) = runtime.block_on(async {
        open_gallery(&db).await;
        picture(&db, GUILD, (7, "Ada"), "a lighthouse", true).await;
        serve_gallery(&db, None).await
    });
    let encode =
        |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let config = ProptestConfig {
        cases: 96,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        page in prop_oneof![Just(String::new()), "[0-9]{0,12}", "-?[0-9]{1,3}", ".{0,12}"],
        q in prop_oneof![Just("<script>alert(1)</script>".to_owned()), ".{0,300}", "[%_\\\\']{0,8}"],
        sort in prop_oneof![Just("top"), Just("new"), Just("x")],
        period in prop_oneof![Just("day"), Just("week"), Just("all"), Just("")],
    )| {
        let path = format!(
            "/g/{GUILD}?page={}&q={}&sort={sort}&period={period}",
            encode(&page),
            encode(&q),
        );
        let (status, _, body) = runtime.block_on(request(address, "GET", &path));
        prop_assert!(status == 200 || status == 400, "{path}: {status} {body}");
        prop_assert!(!body.contains("<script>"), "{path}: {body}");
        if status == 200 {
            let number: Option<u32> = page.parse().ok();
            prop_assert!(page.is_empty() || number.is_some_and(|n| (1..=vqclip::web::MAX_PAGE).contains(&n)));
        }
    });
    // A query string too long to read is refused, not read.
    let long = format!("/g/{GUILD}?q={}", "a".repeat(4000));
    assert_eq!(runtime.block_on(request(address, "GET", &long)).0, 400);
    drop(stop);
    runtime.block_on(scheduler.shutdown(Duration::from_secs(1)));
    drop(dir);
}

/// Pixels of the magenta of [`magenta_png`] (a JPEG thumbnail's too) in a screenshot.
fn magenta_pixels(shot: &image::RgbImage) -> usize {
    shot.pixels()
        .filter(|p| p[0] > 200 && p[1] < 70 && p[2] > 200)
        .count()
}

/// A real browser: the gallery page shows the pictures, "Next →" leads to page 2, a picture
/// leads to its page, which shows it whole with its Open Graph tags; a prompt's `<script>`
/// never runs.
#[tokio::test]
async fn chromium_browses_the_gallery_to_a_picture() {
    let (_dir, db) = crate::support::test_pool().await;
    open_gallery(&db).await;
    let mut posted = Vec::new();
    for k in 0..25 {
        let prompt = format!("<script>document.title='pwned'</script> lighthouse {k}");
        posted.push(picture(&db, GUILD, (7, "Ada"), &prompt, true).await);
    }
    let (address, scheduler, _images, _stop) = serve_gallery(&db, None).await;
    let mut browser = crate::browser::Browser::launch(1280, 900).await;

    let first = format!("http://{address}/g/{GUILD}");
    browser.open(&first).await;
    assert_eq!(
        browser.eval("document.title").await,
        "Pixel Club — vqclip gallery"
    );
    assert_eq!(
        browser
            .eval("document.querySelectorAll('article.card').length")
            .await,
        24
    );
    // Every thumbnail on screen decoded (a broken image has no natural size).
    let on_screen = browser
        .eval(
            "Array.from(document.images).filter(i => i.getBoundingClientRect().top < innerHeight) \
             .map(i => i.naturalWidth)",
        )
        .await;
    let widths = on_screen.as_array().unwrap();
    assert!(
        widths.len() >= 4 && widths.iter().all(|w| w == 64),
        "{on_screen}"
    );
    let shot = browser.screenshot().await;
    assert!(
        magenta_pixels(&shot) > 4 * 200 * 200,
        "the pictures are not on screen"
    );

    browser.click("a[rel=next]").await;
    browser.wait_for("page=2").await;
    assert_eq!(
        browser
            .eval("document.querySelectorAll('article.card').length")
            .await,
        1
    );
    assert_eq!(
        browser
            .eval("document.querySelector('span.page').textContent")
            .await,
        "Page 2"
    );

    browser.click("article.card a.picture").await;
    let page = format!("/i/{}", posted[0].0);
    browser.wait_for(&page).await;
    assert_eq!(
        browser
            .eval("document.querySelector('figure.full img').naturalWidth")
            .await,
        64
    );
    assert_eq!(
        browser
            .eval("document.querySelector('h1.prompt').textContent")
            .await,
        "<script>document.title='pwned'</script> lighthouse 0"
    );
    assert_ne!(browser.eval("document.title").await, "pwned");
    assert_eq!(
        browser
            .eval("document.querySelector('meta[property=\"og:title\"]').content")
            .await,
        "<script>document.title='pwned'</script> lighthouse 0"
    );
    let shot = browser.screenshot().await;
    // Shown whole at 256×256 CSS pixels (its 64×64 magenta scaled up, less the frame).
    assert!(
        magenta_pixels(&shot) > 200 * 200,
        "the picture is not on screen"
    );
    scheduler.shutdown(Duration::from_secs(1)).await;
}
