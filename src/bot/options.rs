//! The values a user picks in a command's options: model names (with autocomplete), sizes,
//! aspects, and their saved defaults within the server's limits.

use poise::serenity_prelude as serenity;

use super::Context;
use super::text::quote;
use crate::config::GenerationSettings;
use crate::engine::optimize::Optimizer;
use crate::models::{self, ModelKind};
use crate::request::{offered, offered_ids, within_size_cap};
use crate::store::users;

/// Aspect ratios offered while typing.
pub(crate) const ASPECTS: [&str; 8] = ["1:1", "4:3", "3:2", "16:9", "21:9", "3:4", "2:3", "9:16"];

/// Autocompletes an aspect option from [`ASPECTS`].
pub(crate) async fn complete_aspect(
    _ctx: Context<'_>,
    partial: &str,
) -> serenity::CreateAutocompleteResponse {
    let choices = ASPECTS
        .iter()
        .filter(|a| a.starts_with(partial.trim()))
        .map(|&a| serenity::AutocompleteChoice::from(a))
        .collect();
    serenity::CreateAutocompleteResponse::new().set_choices(choices)
}

/// Autocompletes an optimiser option: the names starting with `partial`.
pub(crate) async fn complete_optimizer(
    _ctx: Context<'_>,
    partial: &str,
) -> serenity::CreateAutocompleteResponse {
    let partial = partial.trim().to_lowercase();
    let choices = Optimizer::ALL
        .iter()
        .filter(|(name, _)| name.starts_with(&partial))
        .map(|&(name, _)| serenity::AutocompleteChoice::from(name))
        .collect();
    serenity::CreateAutocompleteResponse::new().set_choices(choices)
}

/// An optimiser option's name (`None` when not given); an unknown one is refused with the
/// names.
pub(crate) fn parse_optimizer(text: Option<&str>) -> Result<Option<Optimizer>, String> {
    let Some(text) = text else {
        return Ok(None);
    };
    Optimizer::parse(text).map(Some).ok_or_else(|| {
        let names: Vec<&str> = Optimizer::ALL.iter().map(|(n, _)| *n).collect();
        format!("optimizer {}: choose {}", quote(text, 20), names.join(", "))
    })
}

/// The VQGAN models this server offers whose id contains `partial` (at most 25, Discord's
/// limit).
pub(crate) fn model_choices(partial: &str, allow_tiny: bool) -> Vec<&'static str> {
    let partial = partial.trim().to_lowercase();
    offered_ids(ModelKind::Vqgan, allow_tiny)
        .into_iter()
        .filter(|id| id.contains(&partial))
        .take(25)
        .collect()
}

/// Autocompletes a VQGAN model option from [`model_choices`].
pub(crate) async fn complete_model(
    ctx: Context<'_>,
    partial: &str,
) -> serenity::CreateAutocompleteResponse {
    let choices = model_choices(partial, ctx.data().settings.models.allow_tiny)
        .into_iter()
        .map(serenity::AutocompleteChoice::from)
        .collect();
    serenity::CreateAutocompleteResponse::new().set_choices(choices)
}

/// "16:9", both sides positive.
pub(crate) fn parse_aspect(text: &str) -> Result<(u32, u32), String> {
    crate::engine::prompt::ratio_pair(text)
        .filter(|&(a, b)| a > 0 && b > 0)
        .ok_or_else(|| format!("aspect {}: expected something like 16:9", quote(text, 20)))
}

/// "384x256" within the server's limits.
pub(crate) fn parse_size(
    text: &str,
    generation: &GenerationSettings,
) -> Result<(u32, u32), String> {
    let parsed = crate::engine::prompt::size_pair(text).filter(|&(w, h)| w > 0 && h > 0);
    let Some((w, h)) = parsed else {
        return Err(format!(
            "size {}: expected width x height, e.g. 384x256",
            quote(text, 20)
        ));
    };
    if !within_size_cap(w, h, generation) {
        return Err(format!(
            "{w}x{h} is larger than this server allows (sides up to {}, {} pixels in all).",
            generation.max_side, generation.max_pixels
        ));
    }
    Ok((w, h))
}

/// A VQGAN model id this server offers.
pub(crate) fn check_model(name: &str, allow_tiny: bool) -> Result<String, String> {
    match models::find(name) {
        Some(m) if offered(m, ModelKind::Vqgan, allow_tiny) => Ok(m.id.to_owned()),
        _ => Err(format!(
            "Unknown model {}; choose one of: {}.",
            quote(name, 40),
            offered_ids(ModelKind::Vqgan, allow_tiny).join(", ")
        )),
    }
}

/// The generation defaults for a user: the server's, with theirs on top (clamped to the
/// server's current limits, which may have changed since they saved them).
pub(crate) fn user_defaults(
    server: &GenerationSettings,
    user: Option<&users::UserSettings>,
    allow_tiny: bool,
) -> GenerationSettings {
    let mut g = server.clone();
    let Some(u) = user else {
        return g;
    };
    if let (Some(w), Some(h)) = (u.width, u.height)
        && within_size_cap(w, h, &g)
    {
        g.default_size = crate::config::SizeSetting::Fixed {
            width: w,
            height: h,
        };
    }
    if let Some(steps) = u.steps {
        g.default_steps = steps.min(g.max_steps);
    }
    if let Some(grid) = u
        .grid
        .filter(|n| crate::config::GridSetting::CHOICES.contains(n))
    {
        g.grid = crate::config::GridSetting::Fixed(grid);
    }
    if let Some(model) = u
        .vqgan_model
        .as_deref()
        .and_then(models::find)
        .filter(|m| offered(m, ModelKind::Vqgan, allow_tiny))
    {
        g.default_vqgan = model;
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Environment, Settings};

    #[test]
    fn model_choices_follow_what_is_typed_and_what_the_server_allows() {
        assert!(model_choices("wiki", false).contains(&"wikiart_f16_16384"));
        assert!(
            model_choices("", false)
                .iter()
                .all(|id| !id.starts_with("tiny"))
        );
        assert_eq!(model_choices("tiny", true), ["tiny_vqgan"]);
        assert!(model_choices("no such model", true).is_empty());
    }

    #[test]
    fn aspects_parse_or_explain() {
        assert_eq!(parse_aspect("16:9"), Ok((16, 9)));
        assert!(parse_aspect("wide").unwrap_err().contains("16:9"));
        assert!(parse_aspect("0:1").is_err());
    }

    fn generation() -> GenerationSettings {
        let env: Environment = [("HOME", "/nonexistent")].into_iter().collect();
        Settings::from_toml("[models]\nallow_tiny = true\n", &env)
            .unwrap()
            .generation
    }

    #[test]
    fn sizes_parse_within_the_servers_limits() {
        let g = generation();
        assert_eq!(parse_size("384x256", &g), Ok((384, 256)));
        assert_eq!(parse_size(" 300 × 200 ", &g), Ok((300, 200)));
        assert!(parse_size("big", &g).unwrap_err().contains("384x256"));
        let too_big = format!("{}x16", g.max_side + 1);
        assert!(parse_size(&too_big, &g).unwrap_err().contains("larger"));
    }

    #[test]
    fn a_users_defaults_apply_within_the_servers_limits() {
        let server = generation();
        let mine = users::UserSettings {
            user_id: 1,
            width: Some(128),
            height: Some(64),
            steps: Some(server.max_steps + 100),
            vqgan_model: Some("tiny_vqgan".into()),
            clip_model: None,
            ping_on_completion: false,
            grid: Some(4),
            remix: false,
        };
        let g = user_defaults(&server, Some(&mine), true);
        assert_eq!(g.grid, crate::config::GridSetting::Fixed(4));
        assert_eq!(
            g.default_size,
            crate::config::SizeSetting::Fixed {
                width: 128,
                height: 64
            }
        );
        assert_eq!(g.default_steps, server.max_steps);
        assert_eq!(g.default_vqgan.id, "tiny_vqgan");
        // Tiny models only where the server allows them.
        let g = user_defaults(&server, Some(&mine), false);
        assert_eq!(g.default_vqgan.id, server.default_vqgan.id);
        assert_eq!(
            user_defaults(&server, None, true).default_steps,
            server.default_steps
        );
        assert!(check_model("nope", false).unwrap_err().contains("imagenet"));
    }
}
