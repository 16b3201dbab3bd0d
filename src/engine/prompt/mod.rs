//! The prompt language: weighted text prompts and Midjourney-style flags.
//!
//! ```text
//! a castle in fog | crowds:-1:0.8 | oil painting:0.5 --ar 16:9 --steps 300 --no text
//! a castle:: fog::0.5 crowds::-1                       (Midjourney-style weights)
//! ```
//!
//! - `|` separates prompts; each is `text[:weight[:stop]]`. Unlike the reference (which splits on
//!   the last two colons whatever they are), only trailing fields that parse as numbers are
//!   peeled, and not right after a digit, so "3:30 pm", "at 3:30" and `C:\` stay text (write
//!   "at 3:30::0.5" to weight such a prompt).
//! - `text::weight` segments (weight optional, default 1) are accepted as the same thing.
//! - `^` separates the scenes of a story (`a forest ^ a city ^ the sea`): each scene is prompts
//!   as above, and the run moves to the next every `--change-every N` steps.
//! - Flags start with `--` after whitespace: `--seed N`, `--steps N`, `--ar W:H`,
//!   `--size WxH`, `--no TEXT` (a negative prompt, weight −0.5), `--cutn N`, `--model NAME`,
//!   `--clip NAME[,NAME:WEIGHT…]` (the CLIP model, or an ensemble),
//!   `--grid N` (how many images, shown as one grid), and the method's: `--lr X`,
//!   `--optimizer adam|adamw|diffgrad`, `--ema D`, `--init-noise pixels|gradient`,
//!   `--init-weight W`, `--change-every N`, `--tile` (a seamless tile; the one flag without a
//!   value).
//!
//! Parsing only reads the text; ranges (steps, sizes) are checked against the configuration by
//! whoever builds the job. Every error carries the byte range of the offending piece.

use std::fmt;
use std::ops::Range;

use super::optimize::{InitNoise, Optimizer};

/// Weight of the negative prompt made by `--no`.
pub(crate) const NO_WEIGHT: f64 = -0.5;

/// One prompt with its weight and optional stop.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WeightedPrompt {
    /// The text (trimmed, never empty).
    pub text: String,
    /// Weight; negative pushes the image away from the text.
    pub weight: f64,
    /// Stop threshold (see [`super::loss::PromptTarget::stop`]).
    pub stop: Option<f64>,
}

/// How the latent is started and trained, as a request gives it (prompt flags or options):
/// what it leaves unset keeps the reference's method.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodFlags {
    /// `--lr X`: the learning rate.
    pub learning_rate: Option<f64>,
    /// `--optimizer NAME`.
    pub optimizer: Option<Optimizer>,
    /// `--ema D`: picture a moving average of the latent with decay `D`.
    pub ema: Option<f64>,
    /// `--init-noise NAME`: the start without an init image.
    pub init_noise: Option<InitNoise>,
    /// `--init-weight W`: a pull towards the start that fades over the run.
    pub init_weight: Option<f64>,
    /// `--change-every N`: steps per scene of a story.
    pub change_every: Option<u32>,
    /// `--tile`: a seamless tile.
    pub tile: Option<bool>,
}

impl MethodFlags {
    /// `self`, with what it leaves unset taken from `fallback`.
    pub fn or(&self, fallback: &Self) -> Self {
        Self {
            learning_rate: self.learning_rate.or(fallback.learning_rate),
            optimizer: self.optimizer.or(fallback.optimizer),
            ema: self.ema.or(fallback.ema),
            init_noise: self.init_noise.or(fallback.init_noise),
            init_weight: self.init_weight.or(fallback.init_weight),
            change_every: self.change_every.or(fallback.change_every),
            tile: self.tile.or(fallback.tile),
        }
    }
}

/// Settings given as flags inside the prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptFlags {
    /// `--seed N`.
    pub seed: Option<u64>,
    /// `--steps N`.
    pub steps: Option<u32>,
    /// `--ar W:H`: aspect ratio.
    pub aspect: Option<(u32, u32)>,
    /// `--size WxH`: exact size in pixels.
    pub size: Option<(u32, u32)>,
    /// `--cutn N`.
    pub cutn: Option<u32>,
    /// `--model NAME`.
    pub model: Option<String>,
    /// `--clip NAME` or `--clip A,B:0.5` (an ensemble).
    pub clip: Option<String>,
    /// `--grid N`: how many images (the caller checks which counts it makes).
    pub grid: Option<u32>,
    /// The method's flags.
    pub method: MethodFlags,
}

/// A parsed prompt: what to aim for and the settings the user typed.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedPrompt {
    /// Prompts that guide every step, in order; `--no` prompts come last. In a story, only the
    /// `--no` prompts.
    pub prompts: Vec<WeightedPrompt>,
    /// The scenes of a story (`a ^ b`), each its prompts; empty when the text has no `^`.
    pub story: Vec<Vec<WeightedPrompt>>,
    /// Flags.
    pub flags: PromptFlags,
}

/// Why a prompt could not be read, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptError {
    /// What is wrong, in users' words.
    pub message: String,
    /// Byte range of the offending piece in the input.
    pub span: Range<usize>,
    /// The offending piece itself.
    pub piece: String,
}

impl fmt::Display for PromptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.piece.trim().is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{} (at `{}`)", self.message, self.piece.trim())
        }
    }
}

impl std::error::Error for PromptError {}

fn error(input: &str, span: Range<usize>, message: impl Into<String>) -> PromptError {
    PromptError {
        message: message.into(),
        piece: input.get(span.clone()).unwrap_or_default().to_owned(),
        span,
    }
}

const FLAGS: &str = "--seed, --steps, --ar, --size, --no, --cutn, --model, --clip, --grid, \
                     --lr, --optimizer, --ema, --init-noise, --init-weight, --change-every, \
                     --tile";

/// The flags' names without their dashes.
pub(crate) const FLAG_NAMES: [&str; 16] = [
    "seed",
    "steps",
    "ar",
    "size",
    "no",
    "cutn",
    "model",
    "clip",
    "grid",
    "lr",
    "optimizer",
    "ema",
    "init-noise",
    "init-weight",
    "change-every",
    "tile",
];

/// Most scenes in a story.
pub const MAX_SCENES: usize = 16;

/// Longest prompt accepted, in bytes (Discord allows 6,000 characters in an option; the text
/// encoder reads 77 tokens of each piece).
pub(crate) const MAX_PROMPT_BYTES: usize = 8192;

/// Most prompts in one request, `--no` prompts included. Each is a CLIP text pass and a term
/// of the loss.
pub const MAX_PROMPTS: usize = 64;

/// Largest prompt weight, either sign (the reference's examples stay within ±10).
pub const MAX_WEIGHT: f64 = 100.0;

/// Largest stop, either sign: distances are half a squared angle, at most π²/2 ≈ 4.93.
pub const MAX_STOP: f64 = 10.0;

/// Parses `input`.
pub fn parse(input: &str) -> Result<ParsedPrompt, PromptError> {
    parse_with(input, false)
}

/// Parses `input`, which may hold no prompt (only flags, or nothing) when `allow_empty` is
/// set: for requests that image prompts guide.
pub fn parse_with(input: &str, allow_empty: bool) -> Result<ParsedPrompt, PromptError> {
    if input.len() > MAX_PROMPT_BYTES {
        return Err(error(
            input,
            0..0,
            format!(
                "the prompt is {} bytes long; the limit is {MAX_PROMPT_BYTES}",
                input.len()
            ),
        ));
    }
    // Control characters (terminal escapes) and bidirectional overrides have no place in a
    // description, and would make a stored prompt display as something it is not.
    if let Some((at, c)) = input.char_indices().find(|&(_, c)| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    }) {
        return Err(error(
            input,
            0..0,
            format!(
                "the prompt holds the control character U+{:04X} (at byte {at}); remove it",
                u32::from(c)
            ),
        ));
    }
    let (text_end, flag_spans) = split_flags(input);
    let mut flags = PromptFlags::default();
    let mut negatives = Vec::new();
    for span in flag_spans {
        apply_flag(input, span, &mut flags, &mut negatives)?;
    }
    let mut scenes = Vec::new();
    let mut start = 0;
    for piece in input[..text_end].split('^') {
        let span = start..start + piece.len();
        start = span.end + 1;
        scenes.push((span.clone(), parse_prompts(input, span)?));
    }
    if scenes.len() > MAX_SCENES {
        return Err(error(
            input,
            0..0,
            format!(
                "the story has {} scenes (separated by ^); the limit is {MAX_SCENES}",
                scenes.len()
            ),
        ));
    }
    let nothing = scenes.len() == 1 && scenes[0].1.is_empty();
    if allow_empty && nothing {
        scenes.clear();
    } else if let Some((span, _)) = scenes.iter().find(|(_, prompts)| prompts.is_empty()) {
        let message = if scenes.len() == 1 {
            "the prompt is empty: describe what to draw"
        } else {
            "a scene of this story is empty: describe each one between the ^"
        };
        let span = if scenes.len() == 1 {
            0..input.len()
        } else {
            span.clone()
        };
        return Err(error(input, span, message));
    }
    let told = scenes.iter().map(|(_, p)| p.len()).sum::<usize>() + negatives.len();
    if told > MAX_PROMPTS {
        return Err(error(
            input,
            0..0,
            format!(
                "the prompt has {told} parts (separated by | or ::, and --no); the limit is {MAX_PROMPTS}"
            ),
        ));
    }
    let (mut prompts, story) = if scenes.len() <= 1 {
        (scenes.pop().map(|(_, p)| p).unwrap_or_default(), Vec::new())
    } else {
        (Vec::new(), scenes.into_iter().map(|(_, p)| p).collect())
    };
    prompts.extend(negatives);
    Ok(ParsedPrompt {
        prompts,
        story,
        flags,
    })
}

/// Whether `c` shows nothing: whitespace, control and format characters, and the blank
/// letters people paste to get past "empty" checks (Hangul fillers, braille blank, …).
fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFF8}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
        )
}

/// Whether `text` has at least one character that shows.
pub fn has_visible_text(text: &str) -> bool {
    !text.chars().all(is_invisible)
}

/// Checks a prompt's weight and stop against [`MAX_WEIGHT`] and [`MAX_STOP`]; the message
/// names which is wrong.
pub(crate) fn check_weight(weight: f64, stop: Option<f64>) -> Result<(), String> {
    if !weight.is_finite() || weight.abs() > MAX_WEIGHT {
        return Err(format!(
            "a weight must be from -{MAX_WEIGHT} to {MAX_WEIGHT}, not {weight}"
        ));
    }
    match stop {
        Some(stop) if !stop.is_finite() || stop.abs() > MAX_STOP => Err(format!(
            "a stop must be from -{MAX_STOP} to {MAX_STOP}, not {stop}"
        )),
        _ => Ok(()),
    }
}

/// Checks one parsed prompt: visible text, sane weight and stop.
fn check_prompt(
    input: &str,
    span: Range<usize>,
    prompt: WeightedPrompt,
) -> Result<WeightedPrompt, PromptError> {
    if !has_visible_text(&prompt.text) {
        return Err(error(
            input,
            span,
            "this part has no visible character: describe what to draw",
        ));
    }
    check_weight(prompt.weight, prompt.stop).map_err(|m| error(input, span, m))?;
    Ok(prompt)
}

/// Where a flag's name (`--steps`) and value (` 300 `) sit in the input, and how many bytes of
/// the name are its dash (`--`, or one `—`/`–` that a phone made of `--`).
struct FlagSpan {
    name: Range<usize>,
    dash: usize,
    value: Range<usize>,
}

/// The dash a flag starts with at byte `i` of `input`, if a flag starts there: `--` and a letter
/// (any name: unknown ones are reported), or an em or en dash and a known flag's name (phones
/// turn `--` into `—`; "a storm —dramatic" stays text).
fn flag_dash(input: &str, i: usize) -> Option<usize> {
    let rest = &input[i..];
    let before_ok = input[..i]
        .chars()
        .next_back()
        .is_none_or(char::is_whitespace);
    if !before_ok {
        return None;
    }
    if let Some(after) = rest.strip_prefix("--") {
        return after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            .then_some(2);
    }
    let dash = rest.chars().next().filter(|c| matches!(c, '—' | '–'))?;
    let after = &rest[dash.len_utf8()..];
    let word = after.split(char::is_whitespace).next().unwrap_or_default();
    FLAG_NAMES
        .iter()
        .any(|name| word.eq_ignore_ascii_case(name))
        .then_some(dash.len_utf8())
}

/// `input`'s words and its `--no` flags, without the other flags: what a remix lets one edit
/// (`a castle | fog:0.5 --seed 7 --no people` → `a castle | fog:0.5 --no people`).
pub fn words_of(input: &str) -> String {
    let (text_end, flags) = split_flags(input);
    let mut words = input[..text_end].trim().to_owned();
    for flag in flags {
        let name = input[flag.name.start + flag.dash..flag.name.end].to_ascii_lowercase();
        if name == "no" {
            words.push_str(" --no ");
            words.push_str(input[flag.value].trim());
        }
    }
    words
}

/// Finds the flags: returns where the prompt text ends and each flag's spans.
fn split_flags(input: &str) -> (usize, Vec<FlagSpan>) {
    let starts: Vec<(usize, usize)> = input
        .char_indices()
        .filter(|(_, c)| matches!(c, '-' | '—' | '–'))
        .filter_map(|(i, _)| Some((i, flag_dash(input, i)?)))
        .collect();
    let text_end = starts.first().map_or(input.len(), |&(i, _)| i);
    let mut flags = Vec::new();
    for (k, &(start, dash)) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map_or(input.len(), |&(i, _)| i);
        let name_end = input[start..end]
            .find(char::is_whitespace)
            .map_or(end, |i| start + i);
        flags.push(FlagSpan {
            name: start..name_end,
            dash,
            value: name_end..end,
        });
    }
    (text_end, flags)
}

fn trimmed(input: &str, span: Range<usize>) -> Range<usize> {
    let s = &input[span.clone()];
    let start = span.start + (s.len() - s.trim_start().len());
    let end = span.end - (s.len() - s.trim_end().len());
    start..end.max(start)
}

fn apply_flag(
    input: &str,
    FlagSpan { name, dash, value }: FlagSpan,
    flags: &mut PromptFlags,
    negatives: &mut Vec<WeightedPrompt>,
) -> Result<(), PromptError> {
    let value = trimmed(input, value);
    let whole = name.start..value.end.max(name.end);
    let text = &input[value.clone()];
    let flag = format!(
        "--{}",
        input[name.start + dash..name.end].to_ascii_lowercase()
    );
    let missing = || error(input, whole.clone(), format!("{flag} needs a value"));
    if flag == "--tile" {
        if !text.is_empty() {
            return Err(error(
                input,
                whole,
                "--tile takes no value: put the flags after the prompt",
            ));
        }
        if flags.method.tile.replace(true).is_some() {
            return Err(error(input, whole, "--tile is given twice"));
        }
        return Ok(());
    }
    if text.is_empty() {
        return Err(missing());
    }
    let number = |what: &str| -> Result<u64, PromptError> {
        text.parse::<u64>()
            .map_err(|_| error(input, whole.clone(), format!("{flag} takes {what}")))
    };
    let duplicate = || error(input, whole.clone(), format!("{flag} is given twice"));
    let decimal = |what: &str| -> Result<f64, PromptError> {
        field_number(text)
            .ok_or_else(|| error(input, whole.clone(), format!("{flag} takes {what}")))
    };
    let method = &mut flags.method;
    match flag.as_str() {
        "--lr" | "--ema" | "--init-weight" => {
            let value = decimal("a number like 0.1")?;
            let slot = match flag.as_str() {
                "--lr" => &mut method.learning_rate,
                "--ema" => &mut method.ema,
                _ => &mut method.init_weight,
            };
            if slot.replace(value).is_some() {
                return Err(duplicate());
            }
        }
        "--change-every" => {
            let n = u32::try_from(number("a whole number of steps")?)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    error(
                        input,
                        whole.clone(),
                        "--change-every takes a number of steps from 1",
                    )
                })?;
            if method.change_every.replace(n).is_some() {
                return Err(duplicate());
            }
        }
        "--optimizer" => {
            let names: Vec<&str> = Optimizer::ALL.iter().map(|(n, _)| *n).collect();
            let chosen = Optimizer::parse(text).ok_or_else(|| {
                error(
                    input,
                    whole.clone(),
                    format!("--optimizer takes one of {}", names.join(", ")),
                )
            })?;
            if method.optimizer.replace(chosen).is_some() {
                return Err(duplicate());
            }
        }
        "--init-noise" => {
            let names: Vec<&str> = InitNoise::ALL.iter().map(|(n, _)| *n).collect();
            let chosen = InitNoise::parse(text).ok_or_else(|| {
                error(
                    input,
                    whole.clone(),
                    format!("--init-noise takes one of {}", names.join(", ")),
                )
            })?;
            if method.init_noise.replace(chosen).is_some() {
                return Err(duplicate());
            }
        }
        "--seed" => {
            if flags.seed.is_some() {
                return Err(duplicate());
            }
            flags.seed = Some(number("a whole number from 0 to 18446744073709551615")?);
        }
        "--steps" | "--cutn" | "--grid" => {
            let n = u32::try_from(number("a whole number")?)
                .map_err(|_| error(input, whole.clone(), format!("{flag} is far too large")))?;
            let slot = match flag.as_str() {
                "--steps" => &mut flags.steps,
                "--cutn" => &mut flags.cutn,
                _ => &mut flags.grid,
            };
            if slot.replace(n).is_some() {
                return Err(duplicate());
            }
        }
        "--ar" | "--size" => {
            let (separators, what): (&[char], _) = if flag == "--ar" {
                (&[':'], "a ratio like 16:9")
            } else {
                (&['x', 'X', '×'], "a size like 512x384")
            };
            let pair = split_pair(text, separators);
            let Some(pair) = pair.filter(|&(a, b)| a > 0 && b > 0) else {
                return Err(error(input, whole.clone(), format!("{flag} takes {what}")));
            };
            if flags.aspect.is_some() || flags.size.is_some() {
                return Err(error(
                    input,
                    whole.clone(),
                    "give either --ar or --size, once",
                ));
            }
            if flag == "--ar" {
                flags.aspect = Some(pair);
            } else {
                flags.size = Some(pair);
            }
        }
        "--model" => {
            if flags.model.replace(text.to_owned()).is_some() {
                return Err(duplicate());
            }
        }
        "--clip" => {
            if flags.clip.replace(text.to_owned()).is_some() {
                return Err(duplicate());
            }
        }
        "--no" => negatives.push(check_prompt(
            input,
            whole.clone(),
            WeightedPrompt {
                text: text.to_owned(),
                weight: NO_WEIGHT,
                stop: None,
            },
        )?),
        _ => {
            return Err(error(
                input,
                name,
                format!("unknown flag {flag}; the flags are {FLAGS}"),
            ));
        }
    }
    Ok(())
}

/// `W×H` as everyone writes it (`x`, `X` or `×` between two integers, spaces allowed): the one
/// reading of a size, for prompt flags, command options, the command line and the
/// configuration. Zero is read; callers that need a positive size check it.
pub(crate) fn size_pair(text: &str) -> Option<(u32, u32)> {
    split_pair(text, &['x', 'X', '×'])
}

/// `W:H`, two integers: the one reading of an aspect ratio (see [`size_pair`]).
pub(crate) fn ratio_pair(text: &str) -> Option<(u32, u32)> {
    split_pair(text, &[':'])
}

fn split_pair(text: &str, separators: &[char]) -> Option<(u32, u32)> {
    let (a, b) = text.trim().split_once(separators)?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// Parses the prompt part (before any flag) into weighted prompts.
fn parse_prompts(input: &str, span: Range<usize>) -> Result<Vec<WeightedPrompt>, PromptError> {
    let mut prompts = Vec::new();
    let mut start = span.start;
    for piece in input[span.clone()].split('|') {
        let piece_span = start..start + piece.len();
        start = piece_span.end + 1;
        if piece.contains("::") {
            for p in parse_double_colon(input, piece_span.clone())? {
                prompts.push(check_prompt(input, piece_span.clone(), p)?);
            }
        } else if let Some(p) = parse_single(input, piece_span.clone())? {
            prompts.push(check_prompt(input, piece_span, p)?);
        }
    }
    Ok(prompts)
}

/// Parses a number that is a whole field: finite, nothing else around it.
fn field_number(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
    {
        return None;
    }
    s.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// `text[:weight[:stop]]`; `None` for an empty piece between two `|`.
///
/// The trailing fields are peeled only when they are numbers and the text before them does not
/// end in a digit, so "at 3:30" is text while "crowds:-1:0.8" has a weight and a stop.
fn parse_single(input: &str, span: Range<usize>) -> Result<Option<WeightedPrompt>, PromptError> {
    let piece = &input[span.clone()];
    // Byte offsets (within the piece) of the last two colons.
    let colons: Vec<usize> = piece.rmatch_indices(':').map(|(i, _)| i).take(2).collect();
    let ends_in_digit = |end: usize| {
        piece[..end]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_digit())
    };
    let field = |from: usize, to: usize| field_number(&piece[from + 1..to]);
    let (text_end, weight, stop) = match colons[..] {
        [last, prev, ..]
            if field(prev, last).is_some()
                && field(last, piece.len()).is_some()
                && !ends_in_digit(prev) =>
        {
            (prev, field(prev, last), field(last, piece.len()))
        }
        [last, ..] if field(last, piece.len()).is_some() && !ends_in_digit(last) => {
            (last, field(last, piece.len()), None)
        }
        _ => (piece.len(), None, None),
    };
    let text_span = trimmed(input, span.start..span.start + text_end);
    let text = &input[text_span];
    if text.is_empty() {
        if weight.is_none() && piece.trim().is_empty() {
            return Ok(None);
        }
        return Err(error(input, span, "a weight needs some text before it"));
    }
    Ok(Some(WeightedPrompt {
        text: text.to_owned(),
        weight: weight.unwrap_or(1.0),
        stop,
    }))
}

/// `a:: b::2 c::-0.5`: each `::` ends a prompt; a number right after it is that prompt's weight.
fn parse_double_colon(input: &str, span: Range<usize>) -> Result<Vec<WeightedPrompt>, PromptError> {
    let mut prompts = Vec::new();
    let mut parts = Vec::new();
    let mut start = span.start;
    for part in input[span.clone()].split("::") {
        parts.push(start..start + part.len());
        start += part.len() + 2;
    }
    let mut text = trimmed(input, parts[0].clone());
    for part in &parts[1..] {
        let body = trimmed(input, part.clone());
        let s = &input[body.clone()];
        let (weight, rest_start) = match s.split_once(char::is_whitespace) {
            Some((first, _)) if field_number(first).is_some() => {
                (field_number(first), body.start + first.len())
            }
            None if field_number(s).is_some() => (field_number(s), body.end),
            _ => (None, body.start),
        };
        if input[text.clone()].trim().is_empty() {
            return Err(error(
                input,
                text.start..rest_start,
                "a weight needs some text before it",
            ));
        }
        prompts.push(WeightedPrompt {
            text: input[text.clone()].to_owned(),
            weight: weight.unwrap_or(1.0),
            stop: None,
        });
        text = trimmed(input, rest_start..body.end);
    }
    if !input[text.clone()].is_empty() {
        prompts.push(WeightedPrompt {
            text: input[text].to_owned(),
            weight: 1.0,
            stop: None,
        });
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests;
