//! The buttons on job messages and their `custom_id` codec (`vq:<action>:<job id>`), and the
//! reactions that mean the same. Knows no other file of the bot.

use poise::serenity_prelude as serenity;

use crate::engine::grid::MAX_GRID;
use crate::jobs::JobId;
use crate::jobs::follow_up::{Extension, FollowUp, Side, Strength};

/// Each extension's button name (no digits: a digit starts a grid image's number).
const EXTENSIONS: [(&str, Extension); 7] = [
    ("zoom", Extension::ZoomOut2),
    ("widen", Extension::ZoomOut1_5),
    ("panleft", Extension::Pan(Side::Left)),
    ("panright", Extension::Pan(Side::Right)),
    ("panup", Extension::Pan(Side::Up)),
    ("pandown", Extension::Pan(Side::Down)),
    ("square", Extension::Square),
];

/// What a button or reaction asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// A rerun, upscale or variation of a finished job.
    FollowUp(FollowUp, JobId),
    /// The job's time-lapse GIF.
    Timelapse(JobId),
    /// Stop a waiting or running job.
    Cancel(JobId),
}

impl Action {
    /// The `custom_id` of its button.
    pub fn custom_id(self) -> String {
        let (name, job) = match self {
            Self::FollowUp(FollowUp::Rerun, j) => ("rerun".to_owned(), j),
            Self::FollowUp(FollowUp::Upscale(None), j) => ("upscale".to_owned(), j),
            Self::FollowUp(FollowUp::Upscale(Some(k)), j) => (format!("u{k}"), j),
            Self::FollowUp(FollowUp::Variation(image, strength), j) => {
                let name = match strength {
                    Strength::Normal => "vary",
                    Strength::Subtle => "subtle",
                    Strength::Strong => "strong",
                };
                (
                    format!("{name}{}", image.map_or(String::new(), |k| k.to_string())),
                    j,
                )
            }
            Self::FollowUp(FollowUp::Extend(image, extension), j) => {
                let name = EXTENSIONS
                    .iter()
                    .find(|(_, e)| *e == extension)
                    .map_or("zoom", |(n, _)| n);
                (
                    format!("{name}{}", image.map_or(String::new(), |k| k.to_string())),
                    j,
                )
            }
            Self::FollowUp(FollowUp::Video(image), j) => (
                format!("video{}", image.map_or(String::new(), |k| k.to_string())),
                j,
            ),
            Self::Timelapse(j) => ("gif".to_owned(), j),
            Self::Cancel(j) => ("cancel".to_owned(), j),
        };
        format!("vq:{name}:{job}")
    }

    /// The action of a button's `custom_id`, if it is one of ours.
    pub fn parse(custom_id: &str) -> Option<Self> {
        let rest = custom_id.strip_prefix("vq:")?;
        let (name, job) = rest.split_once(':')?;
        let job = JobId(job.parse().ok()?);
        // A grid image's number ends the name: `u2`, `vary3`, `subtle1`.
        let split = name
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(name.len());
        let (word, number) = name.split_at(split);
        let image = match number {
            "" => None,
            n => Some(
                n.parse::<u32>()
                    .ok()
                    .filter(|k| (1..=MAX_GRID as u32).contains(k))?,
            ),
        };
        Some(match (word, image) {
            ("rerun", None) => Self::FollowUp(FollowUp::Rerun, job),
            ("upscale", None) => Self::FollowUp(FollowUp::Upscale(None), job),
            ("u", Some(_)) => Self::FollowUp(FollowUp::Upscale(image), job),
            ("vary", _) => Self::FollowUp(FollowUp::Variation(image, Strength::Normal), job),
            ("subtle", _) => Self::FollowUp(FollowUp::Variation(image, Strength::Subtle), job),
            ("strong", _) => Self::FollowUp(FollowUp::Variation(image, Strength::Strong), job),
            ("gif", None) => Self::Timelapse(job),
            ("video", _) => Self::FollowUp(FollowUp::Video(image), job),
            (word, image) if EXTENSIONS.iter().any(|(n, _)| *n == word) => {
                let (_, extension) = EXTENSIONS.iter().find(|(n, _)| *n == word)?;
                Self::FollowUp(FollowUp::Extend(image, *extension), job)
            }
            ("cancel", None) => Self::Cancel(job),
            _ => return None,
        })
    }

    /// The action of a reaction: 🔁 ⬆️ 🔀 on a single picture, 🔁 and 1️⃣–4️⃣ (upscale that
    /// image) on a grid, ❌ on a progress message. `grid` is the job's image count, `None` on a
    /// progress message.
    pub(crate) fn from_reaction(emoji: &str, job: JobId, grid: Option<u32>) -> Option<Self> {
        // Some clients send the arrows and keycaps without the variation selector.
        let emoji: String = emoji.chars().filter(|&c| c != '\u{fe0f}').collect();
        let keycap = |k: u32| format!("{k}\u{20e3}");
        Some(match (emoji.as_str(), grid) {
            ("❌", None) => Self::Cancel(job),
            ("🔁", Some(_)) => Self::FollowUp(FollowUp::Rerun, job),
            ("⬆", Some(1)) => Self::FollowUp(FollowUp::Upscale(None), job),
            ("🔀", Some(1)) => Self::FollowUp(FollowUp::Variation(None, Strength::Normal), job),
            (key, Some(n)) if n > 1 => {
                let k = (1..=n).find(|&k| key == keycap(k))?;
                Self::FollowUp(FollowUp::Upscale(Some(k)), job)
            }
            _ => return None,
        })
    }
}

/// The buttons under a finished picture of `grid` images. A grid: U1–U4 (upscale that image),
/// V1–V4 (vary it: a new grid) and 🔄 (new seeds), then the time-lapse. A single image: rerun,
/// upscale, variation and time-lapse; Vary (Subtle), Vary (Strong) and 🎬 Zoom video; Zoom Out
/// 2× and 1.5× and (unless it is `square`) Make Square; the four pans.
pub(crate) fn result_buttons(
    job: JobId,
    grid: u32,
    square: bool,
) -> Vec<serenity::CreateActionRow> {
    let button = |action: Action, emoji: Option<char>, label: &str| {
        let button = serenity::CreateButton::new(action.custom_id())
            .label(label)
            .style(serenity::ButtonStyle::Secondary);
        match emoji {
            Some(emoji) => button.emoji(emoji),
            None => button,
        }
    };
    let timelapse = button(Action::Timelapse(job), Some('🎞'), "Time-lapse");
    if grid > 1 {
        let images = 1..=grid.min(MAX_GRID as u32);
        let upscales = images
            .clone()
            .map(|k| {
                let action = Action::FollowUp(FollowUp::Upscale(Some(k)), job);
                button(action, None, &format!("U{k}"))
            })
            .collect();
        let mut variations: Vec<serenity::CreateButton> = images
            .map(|k| {
                let action = Action::FollowUp(FollowUp::Variation(Some(k), Strength::Normal), job);
                button(action, None, &format!("V{k}"))
            })
            .collect();
        variations.push(
            serenity::CreateButton::new(Action::FollowUp(FollowUp::Rerun, job).custom_id())
                .emoji('🔄')
                .style(serenity::ButtonStyle::Secondary),
        );
        return vec![
            serenity::CreateActionRow::Buttons(upscales),
            serenity::CreateActionRow::Buttons(variations),
            serenity::CreateActionRow::Buttons(vec![timelapse]),
        ];
    }
    let vary = |strength| Action::FollowUp(FollowUp::Variation(None, strength), job);
    let extend = |extension| Action::FollowUp(FollowUp::Extend(None, extension), job);
    vec![
        serenity::CreateActionRow::Buttons(vec![
            button(Action::FollowUp(FollowUp::Rerun, job), Some('🔁'), "Rerun"),
            button(
                Action::FollowUp(FollowUp::Upscale(None), job),
                Some('⬆'),
                "Upscale 2×",
            ),
            button(vary(Strength::Normal), Some('🔀'), "Variation"),
            timelapse,
        ]),
        serenity::CreateActionRow::Buttons(vec![
            button(vary(Strength::Subtle), None, "Vary (Subtle)"),
            button(vary(Strength::Strong), None, "Vary (Strong)"),
            button(
                Action::FollowUp(FollowUp::Video(None), job),
                Some('🎬'),
                "Zoom video",
            ),
        ]),
        serenity::CreateActionRow::Buttons(
            [
                Extension::ZoomOut2,
                Extension::ZoomOut1_5,
                Extension::Square,
            ]
            .into_iter()
            .filter(|&e| e != Extension::Square || !square)
            .map(|e| button(extend(e), Some('🔎'), e.label()))
            .collect(),
        ),
        serenity::CreateActionRow::Buttons(
            [
                (Side::Left, '⬅', "Pan left"),
                (Side::Right, '➡', "Pan right"),
                (Side::Up, '⬆', "Pan up"),
                (Side::Down, '⬇', "Pan down"),
            ]
            .into_iter()
            .map(|(side, emoji, label)| {
                serenity::CreateButton::new(extend(Extension::Pan(side)).custom_id())
                    .emoji(emoji)
                    .style(serenity::ButtonStyle::Secondary)
                    .label(label)
            })
            .collect(),
        ),
    ]
}

/// The button under a job that is waiting or running.
pub(crate) fn cancel_button(job: JobId) -> Vec<serenity::CreateActionRow> {
    vec![serenity::CreateActionRow::Buttons(vec![
        serenity::CreateButton::new(Action::Cancel(job).custom_id())
            .emoji('❌')
            .label("Cancel")
            .style(serenity::ButtonStyle::Danger),
    ])]
}

/// The `custom_id` prefix of `/describe`'s buttons: the suggestion's number (1–4) follows.
const DESCRIBE: &str = "vqd:";

/// The keycap emoji of suggestion `k` (1–9).
fn keycap(k: usize) -> String {
    format!("{k}\u{fe0f}\u{20e3}")
}

/// `/describe`'s answer: a heading, then one line per suggested prompt, each starting with its
/// keycap. The buttons read their prompt back from this text, so it needs no storage and
/// survives restarts.
pub(crate) fn describe_text(prompts: &[String]) -> String {
    let mut text = String::from("🔎 **Prompts for this picture** — press a number to make it:");
    for (i, prompt) in prompts.iter().enumerate() {
        text.push_str(&format!("\n{} {prompt}", keycap(i + 1)));
    }
    text
}

/// One button per suggested prompt, numbered as in [`describe_text`].
pub(crate) fn describe_buttons(count: usize) -> Vec<serenity::CreateActionRow> {
    let buttons = (1..=count)
        .map(|k| {
            serenity::CreateButton::new(format!("{DESCRIBE}{k}"))
                .label(k.to_string())
                .style(serenity::ButtonStyle::Secondary)
        })
        .collect();
    vec![serenity::CreateActionRow::Buttons(buttons)]
}

/// The suggestion a `/describe` button's `custom_id` names (1–9), if it is one.
pub(crate) fn parse_describe(custom_id: &str) -> Option<usize> {
    custom_id
        .strip_prefix(DESCRIBE)?
        .parse()
        .ok()
        .filter(|k| (1..=9).contains(k))
}

/// Suggestion `k`'s prompt in a `/describe` message's text ([`describe_text`]).
pub(crate) fn described_prompt(content: &str, k: usize) -> Option<&str> {
    let mark = keycap(k);
    content
        .lines()
        .find_map(|line| line.strip_prefix(mark.as_str()))
        .map(str::trim)
        .filter(|prompt| !prompt.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_prompts_are_read_back_from_their_message() {
        let prompts = vec![
            "a charcoal drawing of a cat, art nouveau".to_owned(),
            "a 3D render of a cat --ar 3:2".to_owned(),
        ];
        let text = describe_text(&prompts);
        assert_eq!(described_prompt(&text, 1), Some(prompts[0].as_str()));
        assert_eq!(described_prompt(&text, 2), Some(prompts[1].as_str()));
        assert_eq!(described_prompt(&text, 3), None);
        assert_eq!(parse_describe("vqd:2"), Some(2));
        for foreign in ["vqd:0", "vqd:10", "vqd:x", "vq:rerun:1", "vqd:"] {
            assert_eq!(parse_describe(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn custom_ids_round_trip_and_foreign_ones_are_ignored() {
        let mut actions = vec![
            Action::FollowUp(FollowUp::Rerun, JobId(1)),
            Action::FollowUp(FollowUp::Upscale(None), JobId(22)),
            Action::Timelapse(JobId(4)),
            Action::Cancel(JobId(i64::MAX)),
        ];
        for image in [None, Some(1), Some(4)] {
            for strength in [Strength::Subtle, Strength::Normal, Strength::Strong] {
                actions.push(Action::FollowUp(
                    FollowUp::Variation(image, strength),
                    JobId(333),
                ));
            }
            actions.push(Action::FollowUp(FollowUp::Video(image), JobId(12)));
        }
        for k in 1..=4 {
            actions.push(Action::FollowUp(FollowUp::Upscale(Some(k)), JobId(7)));
        }
        for action in actions {
            let id = action.custom_id();
            assert!(id.len() <= 100, "{id}");
            assert_eq!(Action::parse(&id), Some(action), "{id}");
        }
        // The ids of messages posted before grids mean what they meant.
        assert_eq!(
            Action::parse("vq:vary:9"),
            Some(Action::FollowUp(
                FollowUp::Variation(None, Strength::Normal),
                JobId(9)
            ))
        );
        assert_eq!(
            Action::parse("vq:upscale:9"),
            Some(Action::FollowUp(FollowUp::Upscale(None), JobId(9)))
        );
        for foreign in [
            "vq:explode:1",
            "vq:rerun:x",
            "other:rerun:1",
            "vq:u:1",
            "vq:u5:1",
            "vq:u0:1",
            "vq:rerun2:1",
            "vq:vary99999999999:1",
        ] {
            assert_eq!(Action::parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn reactions_act_only_where_they_belong() {
        let j = JobId(5);
        let single = Some(1);
        assert_eq!(
            Action::from_reaction("⬆️", j, single),
            Some(Action::FollowUp(FollowUp::Upscale(None), j))
        );
        assert_eq!(
            Action::from_reaction("⬆", j, single),
            Some(Action::FollowUp(FollowUp::Upscale(None), j))
        );
        assert_eq!(
            Action::from_reaction("🔁", j, single),
            Some(Action::FollowUp(FollowUp::Rerun, j))
        );
        assert_eq!(
            Action::from_reaction("❌", j, None),
            Some(Action::Cancel(j))
        );
        // A rerun on a progress message, a cancel on a finished picture: nothing.
        assert_eq!(Action::from_reaction("🔁", j, None), None);
        assert_eq!(Action::from_reaction("❌", j, single), None);
        assert_eq!(Action::from_reaction("🎉", j, single), None);
        // On a grid the keycaps pick an image to upscale, with or without the selector.
        let grid = Some(4);
        assert_eq!(
            Action::from_reaction("2\u{fe0f}\u{20e3}", j, grid),
            Some(Action::FollowUp(FollowUp::Upscale(Some(2)), j))
        );
        assert_eq!(
            Action::from_reaction("4\u{20e3}", j, grid),
            Some(Action::FollowUp(FollowUp::Upscale(Some(4)), j))
        );
        assert_eq!(Action::from_reaction("5\u{fe0f}\u{20e3}", j, grid), None);
        assert_eq!(Action::from_reaction("1\u{fe0f}\u{20e3}", j, single), None);
        // ⬆️ on a grid would not say which image.
        assert_eq!(Action::from_reaction("⬆️", j, grid), None);
    }

    #[test]
    fn a_grid_gets_u_and_v_rows_and_a_single_image_the_subtle_and_strong_variations() {
        let ids = |rows: Vec<serenity::CreateActionRow>| -> Vec<Vec<String>> {
            let json = serde_json::to_value(&rows).unwrap();
            json.as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row["components"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| b["custom_id"].as_str().unwrap().to_owned())
                        .collect()
                })
                .collect()
        };
        assert_eq!(
            ids(result_buttons(JobId(3), 4, true)),
            [
                vec!["vq:u1:3", "vq:u2:3", "vq:u3:3", "vq:u4:3"],
                vec![
                    "vq:vary1:3",
                    "vq:vary2:3",
                    "vq:vary3:3",
                    "vq:vary4:3",
                    "vq:rerun:3"
                ],
                vec!["vq:gif:3"],
            ]
        );
        assert_eq!(
            ids(result_buttons(JobId(3), 1, false)),
            [
                vec!["vq:rerun:3", "vq:upscale:3", "vq:vary:3", "vq:gif:3"],
                vec!["vq:subtle:3", "vq:strong:3", "vq:video:3"],
                vec!["vq:zoom:3", "vq:widen:3", "vq:square:3"],
                vec![
                    "vq:panleft:3",
                    "vq:panright:3",
                    "vq:panup:3",
                    "vq:pandown:3"
                ],
            ]
        );
        // A square picture is not offered Make Square; every id reads back as its action.
        let square = ids(result_buttons(JobId(3), 1, true));
        assert_eq!(square[2], ["vq:zoom:3", "vq:widen:3"]);
        for id in square.iter().flatten() {
            let action = Action::parse(id).unwrap_or_else(|| panic!("{id}"));
            assert_eq!(&action.custom_id(), id);
        }
        assert_eq!(
            Action::parse("vq:panleft:3"),
            Some(Action::FollowUp(
                FollowUp::Extend(None, Extension::Pan(Side::Left)),
                JobId(3)
            ))
        );
    }

    #[test]
    fn extensions_grow_the_canvas_around_the_picture() {
        let c = |e: Extension, w, h| e.canvas(w, h).map(|c| (c.width, c.height, c.x, c.y));
        assert_eq!(c(Extension::ZoomOut2, 16, 12), Some((32, 24, 8, 6)));
        assert_eq!(c(Extension::ZoomOut1_5, 16, 12), Some((24, 18, 4, 3)));
        assert_eq!(c(Extension::Pan(Side::Left), 16, 12), Some((24, 12, 8, 0)));
        assert_eq!(c(Extension::Pan(Side::Right), 16, 12), Some((24, 12, 0, 0)));
        assert_eq!(c(Extension::Pan(Side::Up), 16, 12), Some((16, 18, 0, 6)));
        assert_eq!(c(Extension::Pan(Side::Down), 16, 12), Some((16, 18, 0, 0)));
        assert_eq!(c(Extension::Square, 16, 12), Some((16, 16, 0, 2)));
        assert_eq!(c(Extension::Square, 8, 8), None);
        // A one-token picture still grows.
        assert_eq!(c(Extension::ZoomOut1_5, 1, 1), Some((2, 2, 0, 0)));
        assert_eq!(c(Extension::Pan(Side::Left), 1, 1), Some((2, 1, 1, 0)));
    }
}
