//! Help while typing a prompt: `/imagine`'s prompt option autocompletes the flags (`--ar`,
//! `--seed`, `--no`, `--grid`, `--tile`, …), says what each expects, and offers values where
//! there are a few to choose from.

use poise::serenity_prelude as serenity;

use super::Context;
use super::options::ASPECTS;
use crate::engine::optimize::{InitNoise, Optimizer};
use crate::models::ModelKind;
use crate::request::offered_ids;

/// Discord's limit on a choice's name and value, in characters.
const CHOICE_LIMIT: usize = 100;

/// Most choices Discord shows.
const MAX_CHOICES: usize = 25;

/// Every prompt flag: what it expects, shown beside it while typing.
const FLAGS: [(&str, &str); 16] = [
    ("--ar", "W:H — aspect ratio, e.g. 16:9"),
    ("--size", "WxH — size in pixels, e.g. 384x256"),
    (
        "--seed",
        "N — the seed: the same seed and settings, the same picture",
    ),
    ("--steps", "N — optimiser steps: more is finer and slower"),
    ("--no", "TEXT — what to keep out of the picture"),
    ("--cutn", "N — cutouts per step: more is better and slower"),
    ("--model", "NAME — the VQGAN that paints"),
    ("--clip", "NAME or A,B:0.5 — the CLIP model(s) that judge"),
    ("--grid", "1 or 4 — one picture or a 2×2 grid"),
    ("--lr", "X — the learning rate (0.1)"),
    ("--optimizer", "adam, adamw or diffgrad"),
    (
        "--ema",
        "D — show a moving average of the latent, e.g. 0.99",
    ),
    (
        "--init-noise",
        "pixels or gradient — the start instead of random tokens",
    ),
    ("--init-weight", "W — stay near the start, less and less"),
    ("--change-every", "N — steps per scene of a story (a ^ b)"),
    ("--tile", "a seamless tile (no value)"),
];

/// The values offered after a flag, for flags with a few to choose from.
fn values_of(flag: &str, allow_tiny: bool) -> Vec<&'static str> {
    match flag {
        "--ar" => ASPECTS.to_vec(),
        "--grid" => vec!["1", "4"],
        "--optimizer" => Optimizer::ALL.iter().map(|(n, _)| *n).collect(),
        "--init-noise" => InitNoise::ALL
            .iter()
            .map(|(n, _)| *n)
            .filter(|&n| n != "tokens")
            .collect(),
        "--model" => offered_ids(ModelKind::Vqgan, allow_tiny),
        "--clip" => offered_ids(ModelKind::Clip, allow_tiny),
        _ => Vec::new(),
    }
}

/// What to offer for a prompt typed so far, as (shown, value) pairs: the flags that start
/// with a `--word` being typed (each with what it expects), the values of a flag just typed,
/// or else the text as it is. Nothing when the text is too long for a choice (Discord then
/// keeps what was typed).
pub(crate) fn suggestions(typed: &str, allow_tiny: bool) -> Vec<(String, String)> {
    if typed.chars().count() > CHOICE_LIMIT {
        return Vec::new();
    }
    let fit = |shown: String, value: String| {
        let shown: String = shown.chars().take(CHOICE_LIMIT).collect();
        (value.chars().count() <= CHOICE_LIMIT).then_some((shown, value))
    };
    // Phones turn `--` into a dash; the parser reads those as flags too.
    let dashed = |word: &str| {
        word.strip_prefix("--")
            .or_else(|| word.strip_prefix('—'))
            .or_else(|| word.strip_prefix('–'))
            .map(str::to_lowercase)
    };
    let ends_in_space = typed.ends_with(char::is_whitespace);
    let last_start = typed
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map_or(0, |(i, c)| i + c.len_utf8());
    let (head, last) = typed.split_at(last_start);
    // A flag being typed: `a castle --op`.
    if !ends_in_space && let Some(partial) = dashed(last) {
        return FLAGS
            .iter()
            .filter(|(flag, _)| flag[2..].starts_with(&partial))
            .filter_map(|&(flag, expects)| {
                let space = if flag == "--tile" { "" } else { " " };
                fit(format!("{flag} {expects}"), format!("{head}{flag}{space}"))
            })
            .take(MAX_CHOICES)
            .collect();
    }
    // A flag's value being typed: `a castle --optimizer ` or `… --optimizer ad`.
    let words: Vec<&str> = typed.split_whitespace().collect();
    let (flag, partial, before) = if ends_in_space {
        (words.last().copied(), "", typed)
    } else {
        (words.iter().rev().nth(1).copied(), last, head)
    };
    if let Some(flag) = flag.and_then(dashed).map(|f| format!("--{f}")) {
        let values = values_of(&flag, allow_tiny);
        if !values.is_empty() {
            let partial = partial.to_lowercase();
            return values
                .into_iter()
                .filter(|v| v.starts_with(&partial))
                .filter_map(|v| fit(format!("{flag} {v}"), format!("{before}{v}")))
                .take(MAX_CHOICES)
                .collect();
        }
    }
    if typed.trim().is_empty() {
        return Vec::new();
    }
    fit(typed.to_owned(), typed.to_owned())
        .into_iter()
        .collect()
}

/// Autocompletes `/imagine`'s prompt from [`suggestions`].
pub(crate) async fn complete_prompt(
    ctx: Context<'_>,
    partial: &str,
) -> serenity::CreateAutocompleteResponse {
    let choices = suggestions(partial, ctx.data().settings.models.allow_tiny)
        .into_iter()
        .map(|(shown, value)| serenity::AutocompleteChoice::new(shown, value))
        .collect();
    serenity::CreateAutocompleteResponse::new().set_choices(choices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(typed: &str) -> Vec<String> {
        suggestions(typed, false)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    #[test]
    fn every_flag_the_parser_knows_is_offered_and_no_other() {
        let offered: Vec<&str> = FLAGS.iter().map(|(f, _)| &f[2..]).collect();
        let mut known = crate::engine::prompt::FLAG_NAMES.to_vec();
        let mut mine = offered.clone();
        known.sort_unstable();
        mine.sort_unstable();
        assert_eq!(mine, known);
    }

    #[test]
    fn flags_complete_with_what_they_expect() {
        let offered = suggestions("a castle --op", false);
        assert_eq!(
            offered,
            [(
                "--optimizer adam, adamw or diffgrad".to_owned(),
                "a castle --optimizer ".to_owned()
            )]
        );
        assert_eq!(values("a castle --ti"), ["a castle --tile"]);
        // `--` alone lists every flag; a phone's dash counts.
        assert_eq!(values("fog --").len(), FLAGS.len());
        assert_eq!(values("fog —se"), ["fog --seed "]);
        assert!(values("fog --zz").is_empty());
    }

    #[test]
    fn a_flags_values_are_offered_after_it() {
        assert_eq!(
            values("a castle --optimizer "),
            [
                "a castle --optimizer adam",
                "a castle --optimizer adamw",
                "a castle --optimizer diffgrad"
            ]
        );
        assert_eq!(
            values("a castle --optimizer ad"),
            ["a castle --optimizer adam", "a castle --optimizer adamw"]
        );
        assert_eq!(values("x --grid "), ["x --grid 1", "x --grid 4"]);
        assert!(values("x --model ").contains(&"x --model wikiart_f16_16384".to_owned()));
        // The tiny test models only where the server allows them.
        assert!(!values("x --clip ").iter().any(|v| v.contains("tiny")));
        assert!(
            suggestions("x --clip t", true)
                .iter()
                .any(|(_, v)| v == "x --clip tiny_clip")
        );
    }

    #[test]
    fn plain_text_is_kept_and_long_text_left_alone() {
        assert_eq!(values("a castle in fog"), ["a castle in fog"]);
        assert_eq!(values("a castle --seed 7"), ["a castle --seed 7"]);
        assert!(values("").is_empty());
        let long = "a ".repeat(60) + "--ar";
        assert!(suggestions(&long, false).is_empty());
        // A choice is never longer than Discord takes.
        let edge = "x".repeat(95) + " --";
        assert!(
            values(&edge)
                .iter()
                .all(|v| v.chars().count() <= CHOICE_LIMIT)
        );
    }
}
