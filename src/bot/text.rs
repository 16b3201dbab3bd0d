//! What the bot's messages say, as plain functions of their data: quoted prompts, code blocks,
//! job titles, the status line (queued, running, done) and the opening text. Knows no other
//! file of the bot.

use std::time::Duration;

use crate::jobs::JobEvent;
use crate::store::jobs::{Job, JobKind};

/// The first text of a job's message: its title and where it stands.
pub(crate) fn opening_text(title: &str, position: usize, notes: &[String]) -> String {
    let mut status = queue_status(position);
    for note in notes {
        status.push_str(&format!("\n-# {note}"));
    }
    format!("{title} ({status})")
}

/// "the queue…" → "The queue…".
pub(crate) fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Quotes user text for a message: no mentions can fire, and it cannot break the layout.
pub(crate) fn quote(text: &str, max: usize) -> String {
    let cleaned: String = text.chars().filter(|c| *c != '`').collect();
    if cleaned.trim().is_empty() {
        // A blend of pictures alone has no words.
        return "*(pictures only)*".to_owned();
    }
    let cut: String = cleaned.chars().take(max).collect();
    if cut.chars().count() < cleaned.chars().count() {
        format!("`{cut}…`")
    } else {
        format!("`{cut}`")
    }
}

/// `text` as a shell code block, exactly as it is, when it fits in `max` characters and holds
/// nothing that could end the block early.
pub(crate) fn code_block(text: &str, max: usize) -> Option<String> {
    (text.chars().count() <= max && !text.contains("```")).then(|| format!("```sh\n{text}\n```"))
}

/// A job message's first line: the quoted prompt, who asked, and what a follow-up follows.
pub fn title(job: &Job) -> String {
    let base = format!("{} — <@{}>", quote(&job.prompt, 300), job.requester_id);
    match (job.kind, job.parent) {
        (JobKind::Rerun, Some(p)) => format!("🔁 {base} · rerun of job {p}"),
        (JobKind::Upscale, Some(p)) => format!("⬆️ {base} · upscale of job {p}"),
        (JobKind::Variation, Some(p)) => format!("🔀 {base} · variation of job {p}"),
        (JobKind::Extend, Some(p)) => format!("🔎 {base} · job {p} on a larger canvas"),
        (JobKind::Video, Some(p)) => format!("🎬 {base} · zoom video of job {p}"),
        _ => base,
    }
}

/// "1 h 2 min", "3 min 4 s", "5 s".
pub(crate) fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s} s"),
        (0, m, s) => format!("{m} min {s} s"),
        (h, m, _) => format!("{h} h {m} min"),
    }
}

/// Where a waiting job stands: "queued, #3 in line"; position 0 means a device took it (its
/// start is on the way).
fn queue_status(position: usize) -> String {
    if position == 0 {
        "starting".to_owned()
    } else {
        format!("queued, #{position} in line")
    }
}

/// The progress message's text for an event that is not the end.
pub(crate) fn status_text(title: &str, event: &JobEvent) -> String {
    let status = match event {
        JobEvent::Queued { position } => queue_status(*position),
        JobEvent::Started { device } => format!("starting on {device}"),
        JobEvent::Progress(p) => format!(
            "{}% on {}, loss {:.3}, about {} left",
            u64::from(p.iteration) * 100 / u64::from(p.total.max(1)),
            p.device,
            p.loss,
            human_duration(p.eta)
        ),
        JobEvent::Finished(_) => "done".to_owned(),
        JobEvent::Failed { message } => format!("failed: {message}"),
        JobEvent::Cancelled => "cancelled".to_owned(),
    };
    format!("{title} ({status})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::ProgressUpdate;

    #[test]
    fn opening_text_says_where_the_job_is() {
        assert_eq!(opening_text("`x` — <@1>", 0, &[]), "`x` — <@1> (starting)");
        assert_eq!(
            opening_text("`x` — <@1>", 3, &["steps capped at 500".into()]),
            "`x` — <@1> (queued, #3 in line\n-# steps capped at 500)"
        );
        assert_eq!(capitalise("the queue is full"), "The queue is full");
    }

    #[test]
    fn quoted_text_is_cut_and_cannot_escape_its_code_span() {
        assert_eq!(quote("a fox", 10), "`a fox`");
        assert_eq!(quote("a `sly` fox <@1>", 100), "`a sly fox <@1>`");
        assert_eq!(quote("ééééé", 3), "`ééé…`");
        assert_eq!(quote("", 10), "*(pictures only)*");
    }

    #[test]
    fn command_lines_are_shown_whole_or_not_at_all() {
        let line = "vqclip imagine -- 'a `sly` fox'";
        assert_eq!(
            code_block(line, 100).as_deref(),
            Some("```sh\nvqclip imagine -- 'a `sly` fox'\n```")
        );
        assert_eq!(code_block(line, 10), None);
        assert_eq!(code_block("vqclip imagine -- 'a ```fox'", 100), None);
    }

    #[test]
    fn status_lines_say_where_a_job_is() {
        let title = "`a fox` — <@1>";
        assert_eq!(
            status_text(title, &JobEvent::Queued { position: 3 }),
            "`a fox` — <@1> (queued, #3 in line)"
        );
        let progress = JobEvent::Progress(ProgressUpdate {
            device: "cuda:0".into(),
            iteration: 50,
            total: 200,
            loss: 0.9,
            elapsed: Duration::from_secs(30),
            eta: Duration::from_secs(95),
            preview: None,
        });
        assert_eq!(
            status_text(title, &progress),
            "`a fox` — <@1> (25% on cuda:0, loss 0.900, about 1 min 35 s left)"
        );
        assert_eq!(human_duration(Duration::from_secs(3725)), "1 h 2 min");
    }
}
