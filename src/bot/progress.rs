//! One task per job owning its Discord message: it reads the job's latest event, edits the
//! message at most every interval and only when something changed, and at the end posts the
//! result as a new message (which pings the requester) and turns the progress message into a
//! stub.
//!
//! Interaction tokens die after 15 minutes: edits use the token while it is fresh, then (or at
//! the first 401 / 50027) the bot token on the channel message, which works for jobs of any
//! length.

use std::sync::Arc;
use std::time::Duration;

use poise::serenity_prelude as serenity;
use serenity::Builder as _;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::Store;

use super::components;
use super::safety::Shown;
use super::text::quote;
use super::text::{human_duration, status_text, title};
use super::upload::Upload;
use crate::config::Settings;
use crate::inspect::Inspector;
use crate::jobs::{FinishedJob, JobEvent, JobId, Preview};
use crate::store::jobs::{Job, set_job_result};
use crate::store::users;

/// Edit with the interaction token only while it is younger than this (it lasts 15 minutes).
const TOKEN_FRESH: Duration = Duration::from_secs(13 * 60);

/// Discord's upload limit when an interaction does not say.
const DEFAULT_SIZE_LIMIT: usize = 10 * 1024 * 1024;

/// Where a job is shown and what to say about it.
#[derive(Debug, Clone)]
pub struct JobMessage {
    /// The job.
    pub job: JobId,
    /// Who asked (pinged by the result).
    pub requester: serenity::UserId,
    /// The first line: the quoted prompt and the requester's mention.
    pub title: String,
    /// The prompt as typed.
    pub prompt: String,
    /// The channel of the progress message.
    pub channel: serenity::ChannelId,
    /// The progress message.
    pub message: serenity::MessageId,
    /// The interaction token, while it may be used.
    pub token: Option<String>,
    /// When the interaction was received.
    pub issued: Instant,
    /// Largest upload the channel accepts, in bytes.
    pub size_limit: usize,
    /// Seed, for the result's embed.
    pub seed: u64,
    /// Steps.
    pub steps: u32,
    /// Width and height.
    pub size: (u32, u32),
    /// "vqgan + clip".
    pub models: String,
    /// Mention the requester when the result is posted.
    pub ping: bool,
    /// How many images the job makes (a grid's result has U/V buttons).
    pub grid: u32,
    /// A zoom video's motion: its result is the MP4, with no buttons.
    pub video: Option<crate::engine::video::ZoomVideo>,
}

impl JobMessage {
    /// The message `message` in `channel` showing stored job `job`; `token` is the interaction's
    /// while it is fresh.
    pub(crate) fn for_job(
        job: &Job,
        channel: serenity::ChannelId,
        message: serenity::MessageId,
        token: Option<String>,
        size_limit: usize,
        ping: bool,
    ) -> Self {
        let params = serde_json::from_value::<crate::jobs::JobParams>(job.params.clone()).ok();
        Self {
            job: job.id,
            requester: serenity::UserId::new(job.requester_id.max(1)),
            title: title(job),
            prompt: job.prompt.clone(),
            channel,
            message,
            token,
            issued: Instant::now(),
            size_limit,
            seed: job.seed,
            steps: job.steps,
            size: (job.width, job.height),
            models: format!(
                "{} + {}",
                job.vqgan_model,
                params.as_ref().map_or_else(
                    || job.clip_model.clone(),
                    |p| p.spec.clip_list(&job.clip_model)
                )
            ),
            ping,
            grid: crate::jobs::grid_of(job),
            video: params.and_then(|p| p.video).map(|v| v.motion),
        }
    }
}

/// Whether a user wants to be mentioned when their job is done (yes unless they said no).
pub(crate) async fn wants_ping(pool: &Store, user: u64) -> bool {
    match users::get_user_settings(pool, user).await {
        Ok(Some(s)) => s.ping_on_completion,
        Ok(None) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read user settings");
            true
        }
    }
}

/// Picks up the messages of jobs that were waiting or running when the bot last stopped: their
/// interaction tokens are gone, so these edit with the bot token. Returns how many.
pub(crate) async fn resume_all(
    handles: &Handles,
    scheduler: &crate::jobs::Scheduler,
    interval: Duration,
) -> Result<usize, sqlx::Error> {
    let pool = &handles.pool;
    use crate::store::jobs::{JobStatus, list_recent_jobs};
    let mut resumed = 0;
    let mut jobs = list_recent_jobs(pool, Some(JobStatus::Running), 10_000).await?;
    jobs.extend(list_recent_jobs(pool, Some(JobStatus::Queued), 10_000).await?);
    // Jobs failed at startup (their process kept dying under them): their requesters are told.
    for &id in scheduler.failed_at_start() {
        jobs.extend(crate::store::jobs::get_job(pool, id).await?);
    }
    for job in jobs {
        let (Some(channel), Some(message)) = (job.channel_id, job.message_id) else {
            continue;
        };
        let Some(events) = scheduler.subscribe(job.id) else {
            continue;
        };
        let target = JobMessage::for_job(
            &job,
            serenity::ChannelId::new(channel.max(1)),
            serenity::MessageId::new(message.max(1)),
            None,
            DEFAULT_SIZE_LIMIT,
            wants_ping(pool, job.requester_id).await,
        );
        tokio::spawn(follow(handles.clone(), target, events, interval));
        resumed += 1;
    }
    Ok(resumed)
}

/// The upload limit an interaction reports, or Discord's default when it reports none.
pub(crate) fn size_limit(reported: u32) -> usize {
    if reported == 0 {
        DEFAULT_SIZE_LIMIT
    } else {
        reported as usize
    }
}

/// Least time between two edits of one message.
pub(crate) fn edit_interval(settings: &Settings) -> Duration {
    Duration::from_millis(settings.scheduler.progress_interval_ms.max(1000))
}

/// What following a job's message uses.
#[derive(Clone)]
pub struct Handles {
    /// Discord's REST API.
    pub http: Arc<serenity::Http>,
    /// The database.
    pub pool: Store,
    /// The safety check of results.
    pub inspector: Arc<Inspector>,
    /// The web gallery's address (`web.public_url`), for the gallery post's link.
    pub public_url: Option<url::Url>,
}

impl Handles {
    /// The handles of the bot with `http`.
    pub(crate) fn of(http: Arc<serenity::Http>, data: &super::Data) -> Self {
        Self {
            http,
            pool: data.store.clone(),
            inspector: data.inspector.clone(),
            public_url: data.settings.web.public_url.clone(),
        }
    }
}

/// Follows a job to its end; see the module documentation.
pub async fn follow(
    handles: Handles,
    target: JobMessage,
    mut events: watch::Receiver<JobEvent>,
    interval: Duration,
) {
    let Handles {
        http,
        pool,
        inspector,
        public_url,
    } = handles;
    let mut editor = Editor {
        http,
        pool,
        inspector,
        public_url,
        target,
        token_ok: true,
        backoff: Duration::ZERO,
        not_before: Instant::now(),
    };
    let mut shown_text = String::new();
    let mut shown_preview: Option<Arc<Preview>> = None;
    loop {
        let event = events.borrow_and_update().clone();
        if event.is_final() {
            editor.finish(event).await;
            return;
        }
        let text = status_text(&editor.target.title, &event);
        let preview = match &event {
            JobEvent::Progress(p) => p.preview.clone(),
            _ => None,
        };
        let new_preview = match (&preview, &shown_preview) {
            (Some(new), Some(old)) => !Arc::ptr_eq(new, old),
            (Some(_), None) => true,
            _ => false,
        };
        if (text != shown_text || new_preview)
            && editor
                .edit(&text, new_preview.then(|| preview.clone()).flatten(), false)
                .await
        {
            shown_text = text;
            if new_preview {
                shown_preview = preview;
            }
        }
        tokio::time::sleep(interval).await;
        if events.changed().await.is_err() {
            // The scheduler let go of the job: its last event is the end.
            let last = events.borrow().clone();
            if last.is_final() {
                editor.finish(last).await;
            }
            return;
        }
    }
}

struct Editor {
    http: Arc<serenity::Http>,
    pool: Store,
    /// The safety check of the result.
    inspector: Arc<Inspector>,
    /// The web gallery's address (`web.public_url`), for the gallery post's link.
    public_url: Option<url::Url>,
    target: JobMessage,
    /// Cleared at the first refusal of the interaction token.
    token_ok: bool,
    /// Wait before the next request after a 429 (doubles while they go on).
    backoff: Duration,
    /// No request before this.
    not_before: Instant,
}

/// First wait after a 429. serenity keeps no `Retry-After` when requests go through
/// `discord.api_base` (its own limiter, which reads the header, is off then), so the wait is
/// at least this, doubling up to [`MAX_BACKOFF`]; Discord's per-message limits are a few
/// seconds.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);

/// Longest wait after repeated 429s.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Whether Discord answered 429 Too Many Requests.
fn rate_limited(error: &serenity::Error) -> bool {
    matches!(
        error,
        serenity::Error::Http(serenity::HttpError::UnsuccessfulRequest(r))
            if r.status_code.as_u16() == 429
    )
}

/// Whether Discord refused an interaction token as expired or invalid.
fn token_refused(error: &serenity::Error) -> bool {
    match error {
        serenity::Error::Http(serenity::HttpError::UnsuccessfulRequest(response)) => {
            response.status_code.as_u16() == 401 || response.error.code == 50027
        }
        _ => false,
    }
}

impl Editor {
    /// Edits the progress message: new text, and a new preview (replacing the old) or, with
    /// `last`, no image and no buttons. Returns whether it was done: a progress edit is skipped
    /// while rate limited (the next carries newer news), the last one waits its turn.
    async fn edit(&mut self, text: &str, preview: Option<Arc<Preview>>, last: bool) -> bool {
        let tries = if last { 5 } else { 1 };
        for _ in 0..tries {
            if !self.wait_turn(last).await {
                return false;
            }
            match self.try_edit(text, preview.as_deref(), last).await {
                Ok(()) => {
                    self.backoff = Duration::ZERO;
                    return true;
                }
                Err(e) if rate_limited(&e) => self.slow_down(),
                Err(e) => {
                    tracing::warn!(job_id = self.target.job.0, error = %e, "cannot edit the progress message");
                    return false;
                }
            }
        }
        false
    }

    /// Waits out a rate limit; `false` (without waiting) when `must` is not set.
    async fn wait_turn(&self, must: bool) -> bool {
        if Instant::now() >= self.not_before {
            true
        } else if must {
            tokio::time::sleep_until(self.not_before).await;
            true
        } else {
            false
        }
    }

    fn slow_down(&mut self) {
        self.backoff = (self.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
        tracing::warn!(
            job_id = self.target.job.0,
            wait_s = self.backoff.as_secs(),
            "Discord is rate limiting this message; slowing down"
        );
        // A progress edit skipped now is retried after the wait by the next event.
        self.not_before = Instant::now() + self.backoff;
    }

    async fn try_edit(
        &mut self,
        text: &str,
        preview: Option<&Preview>,
        last: bool,
    ) -> Result<(), serenity::Error> {
        let attachments = match (preview, last) {
            (Some(p), _) => Some(serenity::EditAttachments::new().add(
                serenity::CreateAttachment::bytes(p.jpeg.clone(), "preview.jpg"),
            )),
            (None, true) => Some(serenity::EditAttachments::new()),
            (None, false) => None,
        };
        let token = self.fresh_token();
        if let Some(token) = token {
            let mut edit = serenity::EditInteractionResponse::new()
                .content(text)
                .allowed_mentions(serenity::CreateAllowedMentions::new());
            if let Some(a) = attachments.clone() {
                edit = edit.attachments(a);
            }
            if last {
                edit = edit.components(Vec::new());
            }
            match edit.execute(&self.http, &token).await {
                Ok(_) => return Ok(()),
                Err(e) if token_refused(&e) => {
                    tracing::info!(
                        job_id = self.target.job.0,
                        "interaction token refused; editing with the bot token"
                    );
                    self.token_ok = false;
                }
                Err(e) => return Err(e),
            }
        }
        let mut edit = serenity::EditMessage::new()
            .content(text)
            .allowed_mentions(serenity::CreateAllowedMentions::new());
        if let Some(a) = attachments {
            edit = edit.attachments(a);
        }
        if last {
            edit = edit.components(Vec::new());
        }
        self.target
            .channel
            .edit_message(&self.http, self.target.message, edit)
            .await
            .map(|_| ())
    }

    /// The end: the result as a new message (then the gallery), or the failure in the progress
    /// message.
    async fn finish(&mut self, event: JobEvent) {
        let text = status_text(&self.target.title, &event);
        let JobEvent::Finished(done) = &event else {
            self.edit(&text, None, true).await;
            return;
        };
        let job = self.target.job;
        let shown = super::safety::judge(
            &self.http,
            &self.pool,
            &self.inspector,
            (job, self.target.grid),
            self.target.channel,
            done,
        )
        .await;
        if let Shown::Withheld(score) = shown {
            self.withhold(score).await;
            return;
        }
        let posted = match Upload::of(done, job, self.target.size_limit) {
            Ok(upload) => {
                let files = match shown {
                    Shown::Spoiler(_) => super::safety::spoilered(&upload),
                    _ => upload.clone(),
                };
                self.post_result(done, &files, shown)
                    .await
                    .map(|m| (m, upload))
            }
            Err(e) => Err(e),
        };
        match posted {
            Ok((message, upload)) => {
                let title = format!("{} (done ↓)", self.target.title);
                self.edit(&title, None, true).await;
                if let Err(e) =
                    set_job_result(&self.pool, job, message.channel_id.get(), message.id.get())
                        .await
                {
                    tracing::error!(job_id = job.0, error = %e, "cannot record the result message");
                }
                // Only what the safety check passed goes to the gallery.
                if shown == Shown::Plain
                    && let Err(e) = super::gallery::post(
                        (&self.http, &self.pool, self.public_url.as_ref()),
                        job,
                        &upload,
                        &message,
                    )
                    .await
                {
                    tracing::error!(job_id = job.0, error = %e, "cannot post to the gallery");
                }
            }
            Err(e) => {
                tracing::error!(job_id = job.0, error = %e, "cannot post the result");
                let note = format!(
                    "{} (done, but the picture could not be posted: {e})",
                    self.target.title
                );
                self.edit(&note, None, true).await;
            }
        }
    }

    /// The interaction token while it may still be used.
    fn fresh_token(&self) -> Option<String> {
        self.target
            .token
            .clone()
            .filter(|_| self.token_ok && self.target.issued.elapsed() < TOKEN_FRESH)
    }

    /// A result the safety check withheld: the progress message says so (without the
    /// picture) and, while the interaction token lasts, the requester is told privately.
    async fn withhold(&mut self, score: f32) {
        let text = format!(
            "{} (done, but withheld by this server's safety check; a moderator can review it \
             with /admin safety job:{})",
            self.target.title, self.target.job
        );
        self.edit(&text, None, true).await;
        let token = self.fresh_token();
        if let Some(token) = token {
            let notice = serenity::CreateInteractionResponseFollowup::new()
                .content(format!(
                    "Your picture (job {}) was withheld: the safety check scored it {score:.2}, \
                     above this server's threshold. A moderator can review it.",
                    self.target.job
                ))
                .ephemeral(true)
                .allowed_mentions(serenity::CreateAllowedMentions::new());
            if let Err(e) = notice.execute(&self.http, (None, &token)).await {
                tracing::warn!(job_id = self.target.job.0, error = %e, "cannot tell the requester privately");
            }
        }
    }

    async fn post_result(
        &mut self,
        done: &FinishedJob,
        upload: &Upload,
        shown: Shown,
    ) -> anyhow::Result<serenity::Message> {
        let t = &self.target;
        let mut embed = serenity::CreateEmbed::new()
            .description(quote(&t.prompt, 1000))
            .field(
                if t.grid > 1 { "Seeds" } else { "Seed" },
                if t.grid > 1 {
                    let last = crate::engine::grid::member_seed(t.seed, t.grid as usize - 1);
                    format!("{}–{last}", t.seed)
                } else {
                    t.seed.to_string()
                },
                true,
            )
            .field(
                if t.video.is_some() { "Video" } else { "Steps" },
                match &t.video {
                    Some(v) => format!(
                        "{} frames × {} steps, {:.1} s",
                        v.frames + 1,
                        v.steps_per_frame,
                        v.seconds()
                    ),
                    None => t.steps.to_string(),
                },
                true,
            )
            .field("Size", format!("{}×{}", t.size.0, t.size.1), true)
            .field("Models", t.models.clone(), true)
            .field(
                "Time",
                human_duration(Duration::from_secs_f64(done.seconds)),
                true,
            )
            .field("Job", t.job.to_string(), true);
        // An embed's image is never blurred: a spoiler is shown as the attachment alone.
        let spoiler = match shown {
            Shown::Spoiler(score) => Some(super::safety::note(score)),
            _ => None,
        };
        if spoiler.is_none()
            && let Some(name) = upload.embedded()
        {
            embed = embed.image(format!("attachment://{name}"));
        }
        let mentions = if t.ping {
            serenity::CreateAllowedMentions::new().users([t.requester])
        } else {
            serenity::CreateAllowedMentions::new()
        };
        let mut message = serenity::CreateMessage::new()
            .content(match &spoiler {
                Some(note) => format!("{} — done\n{note}", t.title),
                None => format!("{} — done", t.title),
            })
            .embed(embed)
            .reference_message((t.channel, t.message))
            .allowed_mentions(mentions);
        // A video's follow-ups are its picture's buttons; the video has none.
        if t.video.is_none() {
            message = message.components(components::result_buttons(
                t.job,
                t.grid,
                t.size.0 == t.size.1,
            ));
        }
        for file in upload.attachments() {
            message = message.add_file(file);
        }
        let mut tries = 0;
        loop {
            self.wait_turn(true).await;
            match self
                .target
                .channel
                .send_message(&self.http, message.clone())
                .await
            {
                Ok(posted) => return Ok(posted),
                Err(e) if rate_limited(&e) && tries < 4 => {
                    tries += 1;
                    self.slow_down();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
