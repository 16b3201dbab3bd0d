//! The buttons on job messages and their `custom_id` codec (`vq:<action>:<job id>`), and the
//! reactions that mean the same. Knows no other file of the bot.

use poise::serenity_prelude as serenity;

use crate::jobs::{FollowUp, JobId};

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
            Self::FollowUp(FollowUp::Rerun, j) => ("rerun", j),
            Self::FollowUp(FollowUp::Upscale, j) => ("upscale", j),
            Self::FollowUp(FollowUp::Variation, j) => ("vary", j),
            Self::Timelapse(j) => ("gif", j),
            Self::Cancel(j) => ("cancel", j),
        };
        format!("vq:{name}:{job}")
    }

    /// The action of a button's `custom_id`, if it is one of ours.
    pub fn parse(custom_id: &str) -> Option<Self> {
        let rest = custom_id.strip_prefix("vq:")?;
        let (name, job) = rest.split_once(':')?;
        let job = JobId(job.parse().ok()?);
        Some(match name {
            "rerun" => Self::FollowUp(FollowUp::Rerun, job),
            "upscale" => Self::FollowUp(FollowUp::Upscale, job),
            "vary" => Self::FollowUp(FollowUp::Variation, job),
            "gif" => Self::Timelapse(job),
            "cancel" => Self::Cancel(job),
            _ => return None,
        })
    }

    /// The action of a reaction: 🔁 ⬆️ 🔀 on a result message, ❌ on a progress message.
    pub(crate) fn from_reaction(emoji: &str, job: JobId, on_result: bool) -> Option<Self> {
        // Some clients send the arrows without the variation selector.
        let emoji = emoji.trim_end_matches('\u{fe0f}');
        Some(match (emoji, on_result) {
            ("🔁", true) => Self::FollowUp(FollowUp::Rerun, job),
            ("⬆", true) => Self::FollowUp(FollowUp::Upscale, job),
            ("🔀", true) => Self::FollowUp(FollowUp::Variation, job),
            ("❌", false) => Self::Cancel(job),
            _ => return None,
        })
    }
}

/// The buttons under a finished picture.
pub(crate) fn result_buttons(job: JobId) -> Vec<serenity::CreateActionRow> {
    let button = |action: Action, emoji: char, label: &str| {
        serenity::CreateButton::new(action.custom_id())
            .emoji(emoji)
            .label(label)
            .style(serenity::ButtonStyle::Secondary)
    };
    vec![serenity::CreateActionRow::Buttons(vec![
        button(Action::FollowUp(FollowUp::Rerun, job), '🔁', "Rerun"),
        button(Action::FollowUp(FollowUp::Upscale, job), '⬆', "Upscale 2×"),
        button(
            Action::FollowUp(FollowUp::Variation, job),
            '🔀',
            "Variation",
        ),
        button(Action::Timelapse(job), '🎞', "Time-lapse"),
    ])]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ids_round_trip_and_foreign_ones_are_ignored() {
        for action in [
            Action::FollowUp(FollowUp::Rerun, JobId(1)),
            Action::FollowUp(FollowUp::Upscale, JobId(22)),
            Action::FollowUp(FollowUp::Variation, JobId(333)),
            Action::Timelapse(JobId(4)),
            Action::Cancel(JobId(i64::MAX)),
        ] {
            let id = action.custom_id();
            assert!(id.len() <= 100, "{id}");
            assert_eq!(Action::parse(&id), Some(action));
        }
        assert_eq!(Action::parse("vq:explode:1"), None);
        assert_eq!(Action::parse("vq:rerun:x"), None);
        assert_eq!(Action::parse("other:rerun:1"), None);
    }

    #[test]
    fn reactions_act_only_where_they_belong() {
        let j = JobId(5);
        assert_eq!(
            Action::from_reaction("⬆️", j, true),
            Some(Action::FollowUp(FollowUp::Upscale, j))
        );
        assert_eq!(
            Action::from_reaction("⬆", j, true),
            Some(Action::FollowUp(FollowUp::Upscale, j))
        );
        assert_eq!(
            Action::from_reaction("🔁", j, true),
            Some(Action::FollowUp(FollowUp::Rerun, j))
        );
        assert_eq!(
            Action::from_reaction("❌", j, false),
            Some(Action::Cancel(j))
        );
        // A rerun on a progress message, a cancel on a finished picture: nothing.
        assert_eq!(Action::from_reaction("🔁", j, false), None);
        assert_eq!(Action::from_reaction("❌", j, true), None);
        assert_eq!(Action::from_reaction("🎉", j, true), None);
    }
}
