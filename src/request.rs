//! From what a user typed to a generation spec: the prompt's flags and explicit options are
//! merged over the configured defaults, checked against the configured bounds, and sizes are
//! rounded to the model's grid. Problems come back as messages fit to show the user; adjustments
//! (a rounded size, a shortened prompt) come back as notes to tell them.
//!
//! Shared by the command line and the bot, so both accept exactly the same requests.

use crate::config::{GenerationSettings, GridSetting, SizeSetting};
use crate::engine::generate::{CutoutSetting, GenerationSpec, round_size};
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::engine::nets::vqgan::VqganConfig;
use crate::engine::optimize::InitWeight;
use crate::engine::prompt::{self, MethodFlags, PromptError};
use crate::engine::spec::{ClipShare, MAX_CLIPS, check_clip_weight};
use crate::models::{self, ModelInfo, ModelKind};

/// Options given outside the prompt text (command-line flags, slash-command arguments). They
/// win over the same setting written as a flag inside the prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImagineOptions {
    /// RNG seed.
    pub seed: Option<u64>,
    /// Optimiser steps.
    pub steps: Option<u32>,
    /// Exact size.
    pub size: Option<(u32, u32)>,
    /// Aspect ratio (keeps the default's pixel count).
    pub aspect: Option<(u32, u32)>,
    /// Cutouts per step.
    pub cutn: Option<u32>,
    /// VQGAN model name.
    pub vqgan: Option<String>,
    /// CLIP model name, or several with weights (`vit_b32,vit_b16:0.5`: an ensemble).
    pub clip: Option<String>,
    /// Crowson's random crops instead of the pooled default.
    pub crops: bool,
    /// How many images (1 or 4, a 2×2 grid).
    pub grid: Option<u32>,
    /// How the latent is started and trained.
    pub method: MethodFlags,
    /// Image prompts will guide the run, so the text may be empty (a `/blend` of pictures
    /// alone, `vqclip imagine --image-prompt`); flags alone are then the whole text.
    pub text_optional: bool,
}

/// A request ready to run.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// What the engine runs.
    pub spec: GenerationSpec,
    /// The VQGAN.
    pub vqgan: &'static ModelInfo,
    /// The CLIP (the first of an ensemble).
    pub clip: &'static ModelInfo,
    /// An ensemble's other CLIP models, in the order of `spec.more_clips`.
    pub more_clips: Vec<&'static ModelInfo>,
    /// How many images, one seed each from `spec.seed` up (see [`crate::engine::grid`]).
    pub grid: u32,
    /// Adjustments the user should hear about.
    pub notes: Vec<String>,
}

/// Why a request cannot run.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The prompt text could not be parsed.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// A value is outside what this server allows, or unknown.
    #[error("{0}")]
    Invalid(String),
}

/// Side used for `default_size = "auto"` when the caller knows nothing of the device: the
/// CPU's, since a too-small image is a better surprise than a run that takes hours.
pub const CPU_AUTO_SIDE: u32 = 256;

/// What "auto" settings mean on the devices that will run a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoDefaults {
    /// The side of `generation.default_size = "auto"`.
    pub side: u32,
    /// The image count of `generation.grid = "auto"`.
    pub grid: u32,
}

impl AutoDefaults {
    /// The CPU's, also used when the devices are unknown (a front end): a small image, and one
    /// image rather than four that take four times as long.
    pub const CPU: Self = Self {
        side: CPU_AUTO_SIDE,
        grid: 1,
    };

    /// A GPU's, with `free_gib` of free memory (`None`: unknown): a 2×2 grid, which a GPU makes
    /// in about the time of one image.
    pub fn gpu(free_gib: Option<f64>) -> Self {
        Self {
            side: gpu_auto_side(free_gib),
            grid: 4,
        }
    }

    /// What every one of two sets of devices can run: the smaller of each.
    pub fn min(self, other: Self) -> Self {
        Self {
            side: self.side.min(other.side),
            grid: self.grid.min(other.grid),
        }
    }
}

/// Default side for the tiny test model (its configured resolution).
const TINY_SIDE: u32 = 64;

/// The `default_size = "auto"` side for a GPU with `free_gib` of free memory (`None`: unknown).
pub(crate) fn gpu_auto_side(free_gib: Option<f64>) -> u32 {
    match free_gib {
        Some(gib) if gib > 8.0 => 512,
        _ => 304,
    }
}

/// Whether `w`×`h` is within the server's size cap (`generation.max_side` a side,
/// `generation.max_pixels` in all): the one rule requests, size options and saved defaults follow.
pub(crate) fn within_size_cap(w: u32, h: u32, settings: &GenerationSettings) -> bool {
    w.max(h) <= settings.max_side && u64::from(w) * u64::from(h) <= settings.max_pixels
}

/// Whether a server's users may pick `model` as a `kind` model: the tiny test models only where
/// `models.allow_tiny` is set. The one rule the prompt flags, the bot's options, saved defaults
/// and autocomplete all follow.
pub fn offered(model: &ModelInfo, kind: ModelKind, allow_tiny: bool) -> bool {
    model.kind == kind && (!model.tiny || allow_tiny)
}

/// The ids of the `kind` models a server's users may pick (see [`offered`]), in catalogue order.
pub(crate) fn offered_ids(kind: ModelKind, allow_tiny: bool) -> Vec<&'static str> {
    models::ids_of(kind)
        .into_iter()
        .filter(|id| models::find(id).is_some_and(|m| offered(m, kind, allow_tiny)))
        .collect()
}

fn pick_model(
    name: Option<&str>,
    default: &'static ModelInfo,
    kind: ModelKind,
    allow_tiny: bool,
) -> Result<&'static ModelInfo, RequestError> {
    let Some(name) = name else {
        return Ok(default);
    };
    match models::find(name) {
        Some(m) if offered(m, kind, allow_tiny) => Ok(m),
        _ => Err(RequestError::Invalid(format!(
            "unknown {kind} model {name:?}; choose one of: {}",
            offered_ids(kind, allow_tiny).join(", ")
        ))),
    }
}

/// Resolves `text` and `options` against the server's `settings`. `auto` says what "auto"
/// sizes and grids are; `tokenizer` measures prompts so that over-long ones can be reported.
pub fn resolve(
    text: &str,
    options: &ImagineOptions,
    settings: &GenerationSettings,
    allow_tiny: bool,
    auto: AutoDefaults,
    tokenizer: &ClipTokenizer,
) -> Result<Resolved, RequestError> {
    let parsed = prompt::parse_with(text, options.text_optional)?;
    let flags = parsed.flags;
    let mut notes = Vec::new();

    let vqgan = pick_model(
        options.vqgan.as_deref().or(flags.model.as_deref()),
        settings.default_vqgan,
        ModelKind::Vqgan,
        allow_tiny,
    )?;
    // The tiny VQGAN only makes sense with the tiny CLIP (and is only ever chosen on purpose).
    let default_clip = match models::find("tiny_clip") {
        Some(tiny) if vqgan.tiny => tiny,
        _ => settings.default_clip,
    };
    let (clips, weights) = pick_clips(
        options.clip.as_deref().or(flags.clip.as_deref()),
        default_clip,
        allow_tiny,
    )?;
    let clip = clips[0];
    let factor = VqganConfig::preset(vqgan.id)
        .map(|c| c.downsample_factor() as u32)
        .ok_or_else(|| {
            RequestError::Invalid(format!("no architecture is known for {}", vqgan.id))
        })?;

    let (default_w, default_h) = match settings.default_size {
        // The tiny test model's attention sits at a quarter of the image size, so at the usual
        // sizes it is slow for nothing: it defaults to its own 64 px.
        _ if vqgan.tiny => (TINY_SIDE, TINY_SIDE),
        SizeSetting::Auto => (auto.side, auto.side),
        SizeSetting::Fixed { width, height } => (width, height),
    };
    let size = options.size.or(flags.size);
    let aspect = options.aspect.or(flags.aspect);
    let (w, h) = match (size, aspect) {
        (Some(size), _) => size,
        (None, Some((aw, ah))) => {
            // Keep the default's pixel count at the requested shape.
            let area = f64::from(default_w) * f64::from(default_h);
            let w = (area * f64::from(aw) / f64::from(ah)).sqrt();
            (w.round() as u32, (area / w).round() as u32)
        }
        (None, None) => (default_w, default_h),
    };
    let ((w, h), rounded) = round_size(w, h, factor);
    if rounded {
        notes.push(format!(
            "size rounded to {w}x{h} (a multiple of {factor} for {})",
            vqgan.id
        ));
    }
    if !within_size_cap(w, h, settings) {
        return Err(RequestError::Invalid(format!(
            "{w}x{h} is too large here: at most {} pixels a side and {} pixels in all",
            settings.max_side, settings.max_pixels
        )));
    }

    let steps = options
        .steps
        .or(flags.steps)
        .unwrap_or(settings.default_steps);
    if !(1..=settings.max_steps).contains(&steps) {
        return Err(RequestError::Invalid(format!(
            "steps must be from 1 to {}, not {steps}",
            settings.max_steps
        )));
    }
    let cutn = options.cutn.or(flags.cutn).unwrap_or(settings.default_cutn);
    if !(1..=settings.max_cutn).contains(&cutn) {
        return Err(RequestError::Invalid(format!(
            "cutouts must be from 1 to {}, not {cutn}",
            settings.max_cutn
        )));
    }

    let grid = match options.grid.or(flags.grid) {
        Some(n) if GridSetting::CHOICES.contains(&n) => n,
        Some(n) => {
            return Err(RequestError::Invalid(format!(
                "--grid {n}: a request makes 1 image or a grid of 4"
            )));
        }
        None => match settings.grid {
            GridSetting::Auto => auto.grid,
            GridSetting::Fixed(n) => n,
        },
    };

    let told = parsed.story.iter().flatten().chain(&parsed.prompts);
    for (i, p) in told.enumerate() {
        let dropped = tokenizer.encode(&p.text).dropped;
        if dropped > 0 {
            notes.push(format!(
                "prompt {} is longer than CLIP reads: its last {dropped} tokens were ignored",
                i + 1
            ));
        }
    }

    let seed = options.seed.or(flags.seed).unwrap_or_else(rand::random);
    let mut spec = GenerationSpec::new(parsed.prompts, w, h, seed);
    spec.steps = steps;
    spec.cutn = cutn;
    spec.preview_every = settings.preview_every;
    if options.crops {
        spec.cutouts = CutoutSetting::Crops { cut_pow: 1.0 };
    }
    let method = options.method.or(&flags.method);
    apply_method(&mut spec, &method, parsed.story, &mut notes);
    spec.clip_weight = weights[0];
    spec.more_clips = clips[1..]
        .iter()
        .zip(&weights[1..])
        .map(|(m, &weight)| ClipShare {
            model: m.id.to_owned(),
            weight,
        })
        .collect();
    spec.check().map_err(RequestError::Invalid)?;
    Ok(Resolved {
        spec,
        vqgan,
        clip,
        more_clips: clips[1..].to_vec(),
        grid,
        notes,
    })
}

/// The CLIP models `name` asks for, with their weights: one model (`vit_b32`, `default` when
/// none is named), or an ensemble (`vit_b32,vit_b16:0.5`; a weight after a colon, 1 when left
/// out), each offered here, none twice, at most [`MAX_CLIPS`].
fn pick_clips(
    name: Option<&str>,
    default: &'static ModelInfo,
    allow_tiny: bool,
) -> Result<(Vec<&'static ModelInfo>, Vec<f64>), RequestError> {
    let Some(name) = name else {
        return Ok((vec![default], vec![1.0]));
    };
    let parts: Vec<&str> = name.split(',').map(str::trim).collect();
    if parts.len() > MAX_CLIPS {
        return Err(RequestError::Invalid(format!(
            "{} CLIP models; at most {MAX_CLIPS} guide one picture",
            parts.len()
        )));
    }
    let (mut clips, mut weights) = (Vec::new(), Vec::new());
    for part in parts {
        let (id, weight) = match part.rsplit_once(':') {
            Some((id, weight)) => {
                let weight: f64 = weight.trim().parse().map_err(|_| {
                    RequestError::Invalid(format!(
                        "{part:?}: a CLIP model's weight is a number, as in vit_b16:0.5"
                    ))
                })?;
                (id.trim(), weight)
            }
            None => (part, 1.0),
        };
        check_clip_weight(weight).map_err(RequestError::Invalid)?;
        let model = pick_model(Some(id), default, ModelKind::Clip, allow_tiny)?;
        if clips.iter().any(|m: &&ModelInfo| m.id == model.id) {
            return Err(RequestError::Invalid(format!(
                "{} is named twice in --clip",
                model.id
            )));
        }
        clips.push(model);
        weights.push(weight);
    }
    Ok((clips, weights))
}

/// Puts the method's settings and the story into `spec` (whose steps are final): a story with
/// no `--change-every` gives each scene an equal share of the steps.
fn apply_method(
    spec: &mut GenerationSpec,
    method: &MethodFlags,
    story: Vec<Vec<prompt::WeightedPrompt>>,
    notes: &mut Vec<String>,
) {
    if let Some(lr) = method.learning_rate {
        spec.learning_rate = lr;
    }
    spec.optimizer = method.optimizer.unwrap_or_default();
    spec.ema = method.ema;
    spec.init_noise = method.init_noise.unwrap_or_default();
    spec.tile = method.tile.unwrap_or_default();
    if let Some(weight) = method.init_weight {
        spec.init_weight = InitWeight::ToInitDecaying { weight };
    }
    if story.is_empty() {
        if method.change_every.is_some() {
            notes.push(
                "--change-every only matters in a story (scenes separated by ^): ignored".into(),
            );
        }
        return;
    }
    let scenes = story.len() as u32;
    spec.change_every = method
        .change_every
        .unwrap_or_else(|| spec.steps.div_ceil(scenes).max(1));
    spec.story = story;
}

/// The first banned word or phrase the prompt contains as whole words, in any case.
pub(crate) fn banned_word<'a>(prompt: &str, banned: &'a [String]) -> Option<&'a str> {
    let words: Vec<String> = prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    banned
        .iter()
        .find(|phrase| {
            let parts: Vec<String> = phrase
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(str::to_lowercase)
                .collect();
            !parts.is_empty() && words.windows(parts.len()).any(|w| w == parts.as_slice())
        })
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_words_match_whole_words_in_any_case() {
        let banned = vec!["gore".to_owned(), "red fox".to_owned()];
        assert_eq!(banned_word("Lots of GORE!", &banned), Some("gore"));
        assert_eq!(banned_word("a gorey story", &banned), None);
        assert_eq!(banned_word("a Red  Fox at dawn", &banned), Some("red fox"));
        assert_eq!(banned_word("a red dawn fox", &banned), None);
        assert_eq!(banned_word("anything", &[]), None);
    }
    use crate::config::{Environment, Settings};

    fn settings() -> Settings {
        Settings::from_toml(
            "[models]\nallow_tiny = true",
            &[("HOME", "/h")].into_iter().collect::<Environment>(),
        )
        .unwrap()
    }

    fn resolve_with(text: &str, options: &ImagineOptions) -> Result<Resolved, RequestError> {
        let s = settings();
        resolve(
            text,
            options,
            &s.generation,
            true,
            AutoDefaults::CPU,
            &ClipTokenizer::new(),
        )
    }

    #[test]
    fn defaults_come_from_the_configuration() {
        let r = resolve_with("a castle", &ImagineOptions::default()).unwrap();
        assert_eq!(
            (r.spec.width, r.spec.height, r.spec.steps, r.spec.cutn),
            (256, 256, 500, 32)
        );
        assert_eq!((r.vqgan.id, r.clip.id), ("imagenet_f16_16384", "vit_b32"));
        assert!(r.notes.is_empty());
    }

    #[test]
    fn options_win_over_prompt_flags() {
        let opts = ImagineOptions {
            steps: Some(20),
            seed: Some(5),
            ..Default::default()
        };
        let r = resolve_with(
            "a castle --steps 300 --seed 9 --cutn 8 --model wikiart",
            &opts,
        )
        .unwrap();
        assert_eq!((r.spec.steps, r.spec.seed, r.spec.cutn), (20, 5, 8));
        assert_eq!(r.vqgan.id, "wikiart_f16_16384");
    }

    #[test]
    fn an_ensemble_of_clip_models_is_named_with_weights() {
        let r = resolve_with(
            "a castle --clip vit_b32,ViT-B/16:0.5",
            &ImagineOptions::default(),
        )
        .unwrap();
        assert_eq!(r.clip.id, "vit_b32");
        assert_eq!(
            r.more_clips.iter().map(|m| m.id).collect::<Vec<_>>(),
            ["vit_b16"]
        );
        assert_eq!(r.spec.clip_weight, 1.0);
        assert_eq!(
            r.spec.more_clips,
            [ClipShare {
                model: "vit_b16".into(),
                weight: 0.5
            }]
        );
        assert_eq!(r.spec.clip_list(r.clip.id), "vit_b32,vit_b16:0.5");
        // The option wins over the flag; one model alone is the reference's run.
        let opts = ImagineOptions {
            clip: Some("vit_l14:2".into()),
            ..Default::default()
        };
        let r = resolve_with("a castle --clip vit_b32,vit_b16", &opts).unwrap();
        assert_eq!((r.clip.id, r.spec.clip_weight), ("vit_l14", 2.0));
        assert!(r.more_clips.is_empty() && r.spec.more_clips.is_empty());
        for (clip, says) in [
            ("vit_b32,vit_b32", "named twice"),
            ("vit_b32,vit_b16:0", "above 0"),
            ("vit_b32,vit_b16:lots", "is a number"),
            ("vit_b32,vit_b16:inf", "above 0"),
            ("vit_b32,vit_b16,vit_l14,vit_l14_336,tiny_clip", "at most 4"),
            ("vit_b32,imagenet", "unknown CLIP model"),
        ] {
            let err = resolve_with(&format!("x --clip {clip}"), &ImagineOptions::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{clip}: {err}");
        }
    }

    #[test]
    fn aspect_ratios_keep_the_area_and_sizes_round_to_the_grid() {
        let r = resolve_with("x --ar 16:9", &ImagineOptions::default()).unwrap();
        assert_eq!((r.spec.width, r.spec.height), (336, 192));
        assert!(
            r.notes.iter().any(|n| n.contains("rounded")),
            "{:?}",
            r.notes
        );
        let r = resolve_with(
            "x --size 300x200 --model gumbel",
            &ImagineOptions::default(),
        )
        .unwrap();
        assert_eq!((r.spec.width, r.spec.height), (296, 200));
    }

    #[test]
    fn bounds_and_unknown_models_are_refused_clearly() {
        let too_big = resolve_with("x --size 1024x1024", &ImagineOptions::default()).unwrap_err();
        assert!(too_big.to_string().contains("too large"), "{too_big}");
        let steps = resolve_with("x --steps 5000", &ImagineOptions::default()).unwrap_err();
        assert!(steps.to_string().contains("from 1 to 1000"), "{steps}");
        let model = resolve_with("x --model dalle", &ImagineOptions::default()).unwrap_err();
        assert!(model.to_string().contains("imagenet_f16_16384"), "{model}");
        let prompt = resolve_with("x --steps lots", &ImagineOptions::default()).unwrap_err();
        assert!(prompt.to_string().contains("--steps"), "{prompt}");
    }

    #[test]
    fn long_prompts_are_reported() {
        let r = resolve_with(&"castle ".repeat(90), &ImagineOptions::default()).unwrap();
        assert!(
            r.notes.iter().any(|n| n.contains("15 tokens were ignored")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn the_tiny_model_defaults_to_its_own_size_and_clip() {
        let r = resolve_with("x --model tiny", &ImagineOptions::default()).unwrap();
        assert_eq!((r.spec.width, r.spec.height), (64, 64));
        assert_eq!((r.vqgan.id, r.clip.id), ("tiny_vqgan", "tiny_clip"));
    }

    #[test]
    fn grids_come_from_the_request_the_server_or_the_device() {
        let none = ImagineOptions::default();
        assert_eq!(resolve_with("x", &none).unwrap().grid, 1, "auto on the CPU");
        assert_eq!(resolve_with("x --grid 4", &none).unwrap().grid, 4);
        let one = ImagineOptions {
            grid: Some(1),
            ..Default::default()
        };
        assert_eq!(resolve_with("x --grid 4", &one).unwrap().grid, 1);
        let three = resolve_with("x --grid 3", &none).unwrap_err().to_string();
        assert!(three.contains("1 image or a grid of 4"), "{three}");
        let mut s = settings();
        let gpu = AutoDefaults::gpu(Some(70.0));
        let tokenizer = ClipTokenizer::new();
        let on_gpu = resolve("x", &none, &s.generation, true, gpu, &tokenizer).unwrap();
        assert_eq!((on_gpu.grid, on_gpu.spec.width), (4, 512));
        s.generation.grid = GridSetting::Fixed(1);
        let fixed = resolve("x", &none, &s.generation, true, gpu, &tokenizer).unwrap();
        assert_eq!(fixed.grid, 1);
        assert_eq!(gpu.min(AutoDefaults::CPU), AutoDefaults::CPU);
    }

    #[test]
    fn stories_share_the_steps_and_method_flags_reach_the_spec() {
        let r = resolve_with("a ^ b ^ c --steps 300", &ImagineOptions::default()).unwrap();
        assert_eq!((r.spec.story.len(), r.spec.change_every), (3, 100));
        assert!(r.spec.prompts.is_empty());
        let r = resolve_with(
            "a ^ b --steps 7 --change-every 2",
            &ImagineOptions::default(),
        )
        .unwrap();
        assert_eq!(r.spec.change_every, 2);
        let r = resolve_with("a --change-every 2", &ImagineOptions::default()).unwrap();
        assert!(r.spec.story.is_empty());
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("only matters in a story")),
            "{:?}",
            r.notes
        );

        let options = ImagineOptions {
            method: MethodFlags {
                optimizer: Some(crate::engine::optimize::Optimizer::AdamW),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = resolve_with(
            "a --optimizer diffgrad --lr 0.2 --ema 0.95 --init-weight 3 --init-noise pixels",
            &options,
        )
        .unwrap();
        assert_eq!(r.spec.optimizer, crate::engine::optimize::Optimizer::AdamW);
        assert_eq!((r.spec.learning_rate, r.spec.ema), (0.2, Some(0.95)));
        assert_eq!(
            r.spec.init_weight,
            InitWeight::ToInitDecaying { weight: 3.0 }
        );
        assert!(r.spec.needs_encoder());
        let plain = resolve_with("a", &ImagineOptions::default()).unwrap().spec;
        assert_eq!(
            (
                plain.optimizer,
                plain.ema,
                plain.init_weight,
                plain.learning_rate
            ),
            (Default::default(), None, InitWeight::Off, 0.1),
            "the reference's method by default"
        );

        for (text, says) in [
            ("a --lr 0", "learning rate"),
            ("a --lr 1000", "learning rate"),
            ("a --ema 1", "moving average"),
            ("a --init-weight -1", "init weight"),
        ] {
            let e = resolve_with(text, &ImagineOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn auto_size_follows_free_gpu_memory() {
        assert_eq!(gpu_auto_side(None), 304, "a GPU whose memory is unknown");
        assert_eq!(gpu_auto_side(Some(70.0)), 512);
        assert_eq!(gpu_auto_side(Some(8.0)), 304);
    }
}
