//! Configuration: `config.toml`, then `VQCLIP_SECTION__KEY` environment overrides, then
//! `DISCORD_TOKEN`, validated once at startup into the typed [`Settings`] the rest of the
//! program reads.
//!
//! Loading happens in two stages, as ripgrep's flags do: the file and the environment are merged
//! into one TOML table and read into loose `Raw*` structs (serde catches wrong types and unknown
//! keys, naming their path), then [`mod@validate`] turns those into typed values, checking ranges and
//! cross-key rules. Every error names the key, the offending value (never a secret's) and what
//! was expected, and all bad keys are reported at once. Nothing here writes a file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use secrecy::SecretString;
use serde::{Serialize, Serializer};
use url::Url;

use crate::engine::nets::Precision;
use crate::models::ModelInfo;
use crate::store::Location;

mod moderation;
mod raw;
mod validate;
mod web;

pub use moderation::{DEFAULT_SAFE_LABELS, DEFAULT_UNSAFE_LABELS, ModerationSettings, NsfwAction};
pub use web::{WebSettings, gallery_page, image_page};

use raw::RawSettings;
use validate::validate;

/// Prefix of environment variables that override configuration keys (`VQCLIP_SCHEDULER__DEVICES`).
pub(crate) const ENV_PREFIX: &str = "VQCLIP_";

/// `storage.database` when the configuration says nothing.
const DEFAULT_DATABASE: &str = "./data/vqclip.sqlite";

/// Separator between the section and key parts of an override variable's name.
const ENV_SEPARATOR: &str = "__";

/// The conventional variable for the bot token; it wins over the file and `VQCLIP_DISCORD__TOKEN`.
pub(crate) const TOKEN_ENV: &str = "DISCORD_TOKEN";

/// Where the configuration file is looked for when `--config` is not given.
pub(crate) const DEFAULT_CONFIG_PATH: &str = "config.toml";

/// Pixel edge every model's size is a multiple of; sizes below it cannot be generated.
const MIN_SIDE: u32 = 16;

/// A snapshot of the environment variables the configuration reads.
///
/// Loading takes this rather than reading the process environment so that tests can pass their
/// own variables (changing the process environment is `unsafe` in Rust 2024 for good reason).
#[derive(Debug, Default, Clone)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// The current process environment; variables that are not valid UTF-8 are skipped.
    pub(crate) fn from_process() -> Self {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// The value of `name`, if set and not blank.
    fn non_empty(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty())
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Environment {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self {
            vars: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

/// Everything vqclip is configured with, validated.
///
/// `Debug` and [`Settings::to_redacted_toml`] never show the Discord token.
#[derive(Debug, Serialize)]
pub struct Settings {
    /// `[discord]`: how the bot reaches Discord.
    pub discord: DiscordSettings,
    /// `[storage]`: where the database and images live.
    pub storage: StorageSettings,
    /// `[scheduler]`: devices and queue limits.
    pub scheduler: SchedulerSettings,
    /// `[generation]`: defaults and bounds for jobs.
    pub generation: GenerationSettings,
    /// `[models]`: where model weights come from.
    pub models: ModelSettings,
    /// `[moderation]`: the safety check.
    pub moderation: ModerationSettings,
    /// `[web]`: the HTTP server for health checks and metrics.
    pub web: WebSettings,
}

/// `[discord]`.
#[derive(Debug, Serialize)]
pub struct DiscordSettings {
    /// Bot token; `None` until one is configured (only `serve` needs it).
    #[serde(
        serialize_with = "serialize_redacted",
        skip_serializing_if = "Option::is_none"
    )]
    pub token: Option<SecretString>,
    /// Base URL of Discord's HTTP API, e.g. a rate-limit proxy or a test double.
    pub api_base: Url,
    /// Guilds where commands are registered instantly; empty means global registration.
    pub guild_ids: Vec<u64>,
    /// Words and phrases (lower-case) that make the bot refuse a prompt.
    pub banned_words: Vec<String>,
    /// Jobs one user may start per hour (0: no limit).
    pub jobs_per_hour: u32,
    /// Whether anyone may rerun, upscale or vary a job (otherwise its requester and moderators).
    pub anyone_can_follow_up: bool,
}

/// `[storage]`.
#[derive(Debug, Serialize)]
pub struct StorageSettings {
    /// The database: an SQLite file (created with its directory when missing) or a PostgreSQL
    /// server shared by several hosts (`postgres://USER:PASSWORD@HOST/DB`).
    pub database: Location,
    /// Directory where finished images and saved latents are written.
    pub images: PathBuf,
}

/// `[scheduler]`.
#[derive(Debug, Serialize)]
pub struct SchedulerSettings {
    /// Devices that run jobs, one worker each.
    pub devices: Vec<DeviceSpec>,
    /// Most jobs waiting in the queue, all users together.
    pub queue_capacity: usize,
    /// Most jobs one user may have waiting.
    pub max_queued_per_user: usize,
    /// Most jobs of one user running at once.
    pub max_running_per_user: usize,
    /// Upscales, variations and reruns of finished jobs jump ahead of fresh requests.
    pub prioritize_follow_ups: bool,
    /// How long running jobs may finish after a shutdown signal before they are stopped and
    /// queued again.
    pub shutdown_grace_seconds: u64,
    /// A device that fails this many jobs in a row is taken out of service.
    pub device_failure_limit: u32,
    /// A job whose process died under it (an abort, an OOM kill, SIGKILL) this many times fails
    /// instead of going back to the queue; a graceful shutdown does not count.
    pub max_attempts: u32,
    /// Memory for resident models per device, in MiB; the least recently used are unloaded
    /// beyond it.
    pub model_cache_mib: u64,
    /// Least time between two progress updates of one job, in milliseconds (previews and the
    /// end always go through).
    pub progress_interval_ms: u64,
    /// How often a headless worker looks in the database for jobs submitted elsewhere, in
    /// milliseconds.
    pub poll_interval_ms: u64,
    /// How long a job a worker claimed from the shared queue stays its without a renewal, in
    /// seconds. Workers renew three times per lease; a dead worker's jobs go back to the queue
    /// this long after its last renewal.
    pub lease_seconds: u64,
    /// The floating-point type CLIP runs in; `None` ("auto"): f16 on CUDA, f32 elsewhere.
    #[serde(serialize_with = "serialize_precision")]
    pub clip_precision: Option<Precision>,
    /// Whether f32 matrix products on CUDA (the VQGAN's convolutions among them) may use TF32
    /// tensor cores, as PyTorch's cuDNN convolutions do by default.
    pub tf32: bool,
    /// Most queued jobs a device runs together in one batch (jobs whose models, size and
    /// cutout count agree); 1 runs one job at a time. `None` ("auto"): see
    /// [`SchedulerSettings::max_batch_on`].
    #[serde(serialize_with = "serialize_max_batch")]
    pub max_batch: Option<usize>,
}

fn serialize_max_batch<S: Serializer>(n: &Option<usize>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => s.serialize_u64(*n as u64),
        None => s.serialize_str("auto"),
    }
}

impl SchedulerSettings {
    /// How many jobs `device` runs together: `max_batch`, or for "auto" 4 on a GPU (several
    /// times the images per hour of one at a time) and 1 on the CPU, where a batch is no faster
    /// and would only make every job in it end later.
    pub fn max_batch_on(&self, device: &candle_core::Device) -> usize {
        self.max_batch
            .unwrap_or(if device.is_cpu() { 1 } else { 4 })
    }

    /// The precision CLIP runs in on `device`.
    pub fn clip_precision_on(&self, device: &candle_core::Device) -> Precision {
        self.clip_precision
            .unwrap_or_else(|| Precision::auto_for(device))
    }
}

fn serialize_precision<S: Serializer>(p: &Option<Precision>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.collect_str(p),
        None => s.serialize_str("auto"),
    }
}

/// `[generation]`.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationSettings {
    /// Size used when a request names none.
    pub default_size: SizeSetting,
    /// Largest width or height a request may ask for.
    pub max_side: u32,
    /// Largest width × height a request may ask for.
    pub max_pixels: u64,
    /// Optimiser steps when a request names none.
    pub default_steps: u32,
    /// Most optimiser steps a request may ask for.
    pub max_steps: u32,
    /// CLIP cutouts per step when a request names none.
    pub default_cutn: u32,
    /// Most cutouts a request may ask for.
    pub max_cutn: u32,
    /// VQGAN used when a request names none.
    #[serde(serialize_with = "serialize_model_id")]
    pub default_vqgan: &'static ModelInfo,
    /// CLIP used when a request names none.
    #[serde(serialize_with = "serialize_model_id")]
    pub default_clip: &'static ModelInfo,
    /// A progress preview is rendered every this many steps.
    pub preview_every: u32,
    /// How many images a request makes when it names no `--grid`.
    pub grid: GridSetting,
}

/// `[models]`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSettings {
    /// Hugging Face Hub cache directory downloads go to and are looked up in.
    pub cache_dir: PathBuf,
    /// Hub (or mirror) base URL.
    pub hub_endpoint: Url,
    /// Never contact the Hub; only local paths and the cache are used (`HF_HUB_OFFLINE=1` too).
    pub offline: bool,
    /// Access token for private or gated repositories, from the `HF_TOKEN` environment variable
    /// only, so it never sits in a configuration file.
    #[serde(
        serialize_with = "serialize_redacted",
        skip_serializing_if = "Option::is_none"
    )]
    pub hub_token: Option<SecretString>,
    /// Whether the tiny random-weight test models may be used.
    pub allow_tiny: bool,
    /// Where each model's weights come from, by model id; models with no known source are absent.
    #[serde(flatten)]
    pub sources: BTreeMap<&'static str, ModelSource>,
}

impl ModelSettings {
    /// Where the weights of `model` come from, or `None` when they must be provided by hand.
    pub fn source(&self, model: &ModelInfo) -> Option<&ModelSource> {
        self.sources.get(model.id)
    }
}

/// Where one model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ModelSource {
    /// A file on this machine; the Hub is never asked.
    Local {
        /// Path to a `.ckpt` or `.safetensors` file.
        path: PathBuf,
    },
    /// A file in a Hugging Face Hub repository, downloaded on first use.
    Hub {
        /// Repository as `owner/name`.
        repo: String,
        /// Path of the file inside the repository.
        file: String,
        /// Branch, tag or commit.
        revision: String,
        /// Expected SHA-256 of the file (lowercase hex), pinning its exact content; without it a
        /// download is checked against the digest the Hub publishes for large files.
        #[serde(skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
}

/// A device that runs jobs, as written in `scheduler.devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// Every CUDA device when built with CUDA support, else the CPU.
    Auto,
    /// The CPU (may be listed more than once for several CPU workers).
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
    /// The Metal device with this ordinal.
    Metal(usize),
}

const DEVICE_EXPECTED: &str = r#"expected "auto", "cpu", "cuda:N" or "metal:N""#;

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let ordinal = |n: &str| n.parse::<usize>().map_err(|_| DEVICE_EXPECTED.to_owned());
        match s.split_once(':') {
            None if s == "auto" => Ok(Self::Auto),
            None if s == "cpu" => Ok(Self::Cpu),
            Some(("cuda", n)) => ordinal(n).map(Self::Cuda),
            Some(("metal", n)) => ordinal(n).map(Self::Metal),
            _ => Err(DEVICE_EXPECTED.to_owned()),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How many images a request makes by default: a fixed count, or chosen per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GridSetting {
    /// Four (a 2×2 grid) where every device is a GPU, one on the CPU, where four images cost
    /// four times as long (see [`crate::request::AutoDefaults`]).
    Auto,
    /// Always this many: 1 or 4.
    Fixed(u32),
}

impl GridSetting {
    /// The grid sizes a request may ask for.
    pub const CHOICES: [u32; 2] = [1, 4];
}

impl FromStr for GridSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        if s == "auto" {
            return Ok(Self::Auto);
        }
        match s.parse::<u32>() {
            Ok(n) if Self::CHOICES.contains(&n) => Ok(Self::Fixed(n)),
            _ => Err(r#"expected "auto", 1 or 4"#.to_owned()),
        }
    }
}

impl fmt::Display for GridSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for GridSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The default image size: fixed, or chosen per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSetting {
    /// 512² on GPUs with more than 8 GiB free at startup, 304² on other GPUs, 256² on the
    /// CPU (see [`crate::jobs::devices::auto_defaults`]).
    Auto,
    /// Always this size.
    Fixed {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

const SIZE_EXPECTED: &str = r#"expected "auto" or WIDTHxHEIGHT, e.g. "512x512""#;

impl FromStr for SizeSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        if s == "auto" {
            return Ok(Self::Auto);
        }
        let (width, height) =
            crate::engine::prompt::size_pair(&s).ok_or_else(|| SIZE_EXPECTED.to_owned())?;
        Ok(Self::Fixed { width, height })
    }
}

impl fmt::Display for SizeSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed { width, height } => write!(f, "{width}x{height}"),
        }
    }
}

impl Serialize for SizeSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn serialize_redacted<S: Serializer>(
    token: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match token {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

fn serialize_model_id<S: Serializer>(model: &&'static ModelInfo, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(model.id)
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists (or was named explicitly) but could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// One or more keys have bad values; each is listed on its own line.
    #[error("{}", display_lines(.0))]
    Invalid(Vec<InvalidKey>),
}

fn display_lines(problems: &[InvalidKey]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// One bad configuration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidKey {
    /// Dotted path of the key, e.g. `scheduler.devices[1]`.
    pub key: String,
    /// The offending value as written, quoted; `None` for secrets and missing values.
    pub value: Option<String>,
    /// What was expected instead.
    pub expected: String,
    /// The environment variable that set the key, when one did.
    pub env_var: Option<String>,
}

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)?;
        if let Some(value) = &self.value {
            write!(f, " = {value}")?;
        }
        write!(f, ": {}", self.expected)?;
        if let Some(var) = &self.env_var {
            write!(f, " (set by the environment variable {var})")?;
        }
        Ok(())
    }
}

impl Settings {
    /// Loads `path` (or `./config.toml` when `None`), applies overrides from `env`, validates.
    ///
    /// A missing default file means all defaults; a missing file that was named explicitly is an
    /// error, since it is most likely a typo.
    pub fn load(path: Option<&Path>, env: &Environment) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.clone(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Self::from_table(table, env)
    }

    /// Validates configuration given as TOML text, with overrides from `env`.
    pub fn from_toml(text: &str, env: &Environment) -> Result<Self, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<text>"),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Self::from_table(table, env)
    }

    fn from_table(mut table: toml::Table, env: &Environment) -> Result<Self, ConfigError> {
        let origins = apply_env_overrides(&mut table, env).map_err(ConfigError::Invalid)?;
        let raw: RawSettings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let expected = e.inner().message().to_owned();
                ConfigError::Invalid(vec![InvalidKey {
                    env_var: origins.env_var_for(&key),
                    key,
                    value: None,
                    expected,
                }])
            })?;
        validate(raw, env, &origins).map_err(ConfigError::Invalid)
    }

    /// The effective configuration as TOML, with the token shown as `[redacted]`.
    pub fn to_redacted_toml(&self) -> String {
        // Serializing plain data to TOML only fails for shapes we never build (e.g. a map with
        // non-string keys), so an error here is a programming mistake worth a clear message.
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# the configuration could not be printed: {e}\n"))
    }

    /// The token, or an error saying how to provide one.
    pub(crate) fn require_token(&self) -> Result<&SecretString, InvalidKey> {
        self.discord.token.as_ref().ok_or_else(|| InvalidKey {
            key: "discord.token".into(),
            value: None,
            expected: format!(
                "a bot token is required to connect; set the {TOKEN_ENV} environment variable \
                 (or discord.token in the configuration file)"
            ),
            env_var: None,
        })
    }
}

/// Which environment variable set each overridden key.
#[derive(Debug, Default)]
struct Origins(BTreeMap<String, String>);

impl Origins {
    /// The variable that set `key` or the table or list containing it.
    fn env_var_for(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .filter(|(path, _)| {
                key == path.as_str()
                    || key
                        .strip_prefix(path.as_str())
                        .is_some_and(|rest| rest.starts_with(['.', '[']))
            })
            .max_by_key(|(path, _)| path.len())
            .map(|(_, var)| var.clone())
    }
}

/// Writes `VQCLIP_A__B=v` as `a.b = v` into `table`, then `DISCORD_TOKEN` as `discord.token`.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: &Environment,
) -> Result<Origins, Vec<InvalidKey>> {
    let mut origins = Origins::default();
    let mut errors = Vec::new();
    let overrides = env.vars.iter().filter_map(|(name, value)| {
        let rest = name.strip_prefix(ENV_PREFIX)?;
        // Variables without the separator (VQCLIP_CONFIG, VQCLIP_LOG_FORMAT) are CLI options.
        rest.contains(ENV_SEPARATOR).then_some((name, rest, value))
    });
    for (name, rest, value) in overrides {
        let parts: Vec<String> = rest
            .split(ENV_SEPARATOR)
            .map(str::to_ascii_lowercase)
            .collect();
        if parts.iter().any(String::is_empty) {
            errors.push(InvalidKey {
                key: name.clone(),
                value: None,
                expected: format!(
                    "expected {ENV_PREFIX}SECTION__KEY, e.g. VQCLIP_SCHEDULER__DEVICES"
                ),
                env_var: None,
            });
            continue;
        }
        let is_secret = parts == ["discord", "token"];
        match insert_path(table, &parts, parse_env_value(value, is_secret)) {
            Ok(()) => {
                origins.0.insert(parts.join("."), name.clone());
            }
            Err(expected) => errors.push(InvalidKey {
                key: parts.join("."),
                value: None,
                expected,
                env_var: Some(name.clone()),
            }),
        }
    }
    if let Some(token) = env.get(TOKEN_ENV) {
        let parts = ["discord".to_owned(), "token".to_owned()];
        if insert_path(table, &parts, toml::Value::String(token.to_owned())).is_ok() {
            origins.0.insert("discord.token".into(), TOKEN_ENV.into());
        }
    }
    if errors.is_empty() {
        Ok(origins)
    } else {
        Err(errors)
    }
}

fn insert_path(
    table: &mut toml::Table,
    parts: &[String],
    value: toml::Value,
) -> Result<(), String> {
    let (last, parents) = parts
        .split_last()
        .expect("override paths have at least one part");
    let mut current = table;
    for (depth, part) in parents.iter().enumerate() {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| {
            format!(
                "cannot override inside {}: it is a value, not a section",
                parts[..=depth].join(".")
            )
        })?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

/// Reads an override's text as the TOML value it most plausibly means.
///
/// Booleans, integers, floats and `[…]` arrays are parsed; anything else is a string, so paths
/// and URLs need no quoting. Secrets are always strings so they never surface in a type error.
fn parse_env_value(raw: &str, is_secret: bool) -> toml::Value {
    let text = raw.trim();
    if is_secret {
        return toml::Value::String(text.to_owned());
    }
    match text {
        "true" => return toml::Value::Boolean(true),
        "false" => return toml::Value::Boolean(false),
        _ => {}
    }
    if let Ok(n) = text.parse::<i64>() {
        return toml::Value::Integer(n);
    }
    if text.contains('.')
        && let Ok(x) = text.parse::<f64>()
    {
        return toml::Value::Float(x);
    }
    if text.starts_with('[')
        && let Ok(mut t) = toml::from_str::<toml::Table>(&format!("v = {text}"))
        && let Some(v) = t.remove("v")
    {
        return v;
    }
    toml::Value::String(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models;
    use secrecy::ExposeSecret;

    fn env(vars: &[(&str, &str)]) -> Environment {
        vars.iter()
            .copied()
            .chain([("HOME", "/home/test")])
            .collect()
    }

    fn problems(text: &str, vars: &[(&str, &str)]) -> Vec<InvalidKey> {
        match Settings::from_toml(text, &env(vars)) {
            Err(ConfigError::Invalid(list)) => list,
            other => panic!("expected invalid keys, got {other:?}"),
        }
    }

    fn single_problem(text: &str) -> InvalidKey {
        let mut list = problems(text, &[]);
        assert_eq!(list.len(), 1, "expected one problem, got {list:?}");
        list.remove(0)
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let s = Settings::from_toml("", &env(&[])).unwrap();
        assert!(s.discord.token.is_none());
        assert_eq!(s.discord.api_base.as_str(), "https://discord.com/");
        assert_eq!(
            s.storage.database,
            Location::Sqlite(PathBuf::from("./data/vqclip.sqlite"))
        );
        assert_eq!(s.scheduler.devices, vec![DeviceSpec::Auto]);
        assert_eq!(s.generation.default_size, SizeSetting::Auto);
        assert_eq!(s.generation.default_steps, 500);
        assert_eq!(s.generation.default_vqgan.id, "imagenet_f16_16384");
        assert_eq!(s.generation.default_clip.id, "vit_b32");
        assert_eq!(
            s.models.cache_dir,
            PathBuf::from("/home/test/.cache/huggingface/hub")
        );
        assert_eq!(s.models.hub_endpoint.as_str(), "https://huggingface.co/");
        assert_eq!(
            s.models.source(models::find("vit_b32").unwrap()),
            Some(&ModelSource::Hub {
                repo: "openai/clip-vit-base-patch32".into(),
                file: "model.safetensors".into(),
                revision: "refs/pr/15".into(),
                sha256: None,
            })
        );
        assert_eq!(
            s.models.source(models::find("imagenet_f16_1024").unwrap()),
            None
        );
    }

    #[test]
    fn bad_device_names_its_index_value_and_the_choices() {
        let p = single_problem("[scheduler]\ndevices = [\"cpu\", \"cuda:x\"]");
        assert_eq!(
            p.to_string(),
            r#"scheduler.devices[1] = "cuda:x": expected "auto", "cpu", "cuda:N" or "metal:N""#
        );
    }

    #[test]
    fn devices_parse_and_only_cpu_may_repeat() {
        let s = Settings::from_toml(
            "[scheduler]\ndevices = [\"cpu\", \"CPU\", \"cuda:1\", \"metal:0\"]",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(
            s.scheduler.devices,
            vec![
                DeviceSpec::Cpu,
                DeviceSpec::Cpu,
                DeviceSpec::Cuda(1),
                DeviceSpec::Metal(0)
            ]
        );
        assert_eq!(
            single_problem("[scheduler]\ndevices = [\"cuda:0\", \"cuda:0\"]").key,
            "scheduler.devices[1]"
        );
        assert_eq!(
            single_problem("[scheduler]\ndevices = [\"auto\", \"cpu\"]").key,
            "scheduler.devices"
        );
        // No devices: a front end that leaves the jobs to `vqclip worker` processes.
        let none = Settings::from_toml("[scheduler]\ndevices = []", &env(&[])).unwrap();
        assert!(none.scheduler.devices.is_empty());
    }

    #[test]
    fn clip_precision_is_auto_unless_named_and_tf32_is_on() {
        let cpu = candle_core::Device::Cpu;
        let s = Settings::from_toml("", &env(&[])).unwrap();
        assert_eq!(s.scheduler.clip_precision, None);
        assert_eq!(s.scheduler.clip_precision_on(&cpu), Precision::F32);
        assert!(s.scheduler.tf32);
        let s = Settings::from_toml(
            "[scheduler]\nclip_precision = \"BF16\"\ntf32 = false",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(s.scheduler.clip_precision_on(&cpu), Precision::Bf16);
        assert!(!s.scheduler.tf32);
        let from_env =
            Settings::from_toml("", &env(&[("VQCLIP_SCHEDULER__CLIP_PRECISION", "f16")])).unwrap();
        assert_eq!(from_env.scheduler.clip_precision, Some(Precision::F16));
        let p = single_problem("[scheduler]\nclip_precision = \"f8\"");
        assert_eq!(
            p.to_string(),
            r#"scheduler.clip_precision = "f8": expected "auto", "f32", "f16" or "bf16""#
        );
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases = [
            ("[discord]\napi_base = \"ftp://x\"", "discord.api_base"),
            ("[discord]\nguild_ids = [0]", "discord.guild_ids[0]"),
            ("[discord]\nguild_ids = [\"12a\"]", "discord.guild_ids[0]"),
            ("[storage]\ndatabase = \" \"", "storage.database"),
            ("[storage]\ndatabase = \"mysql://h/db\"", "storage.database"),
            (
                "[storage]\ndatabase = \"postgres://u:pw@/db\"",
                "storage.database",
            ),
            ("[storage]\nimages = \"\"", "storage.images"),
            (
                "[scheduler]\nqueue_capacity = 0",
                "scheduler.queue_capacity",
            ),
            (
                "[scheduler]\nqueue_capacity = -3",
                "scheduler.queue_capacity",
            ),
            (
                "[scheduler]\nmax_queued_per_user = 0",
                "scheduler.max_queued_per_user",
            ),
            (
                "[scheduler]\nmax_running_per_user = 0",
                "scheduler.max_running_per_user",
            ),
            (
                "[generation]\ndefault_size = \"big\"",
                "generation.default_size",
            ),
            (
                "[generation]\ndefault_size = \"4096x4096\"",
                "generation.default_size",
            ),
            (
                "[generation]\ndefault_size = \"8x8\"",
                "generation.default_size",
            ),
            ("[generation]\nmax_side = 8", "generation.max_side"),
            ("[generation]\nmax_pixels = 10", "generation.max_pixels"),
            (
                "[generation]\ndefault_steps = 2000",
                "generation.default_steps",
            ),
            ("[generation]\nmax_steps = \"many\"", "generation.max_steps"),
            ("[generation]\ndefault_cutn = 0", "generation.default_cutn"),
            ("[generation]\nmax_cutn = 0", "generation.max_cutn"),
            (
                "[generation]\npreview_every = 0",
                "generation.preview_every",
            ),
            (
                "[generation]\ndefault_vqgan = \"vit_b32\"",
                "generation.default_vqgan",
            ),
            (
                "[generation]\ndefault_clip = \"clip-9000\"",
                "generation.default_clip",
            ),
            (
                "[generation]\ndefault_clip = \"tiny_clip\"",
                "generation.default_clip",
            ),
            (
                "[models]\nhub_endpoint = \"not a url\"",
                "models.hub_endpoint",
            ),
            ("[models]\noffline = \"yes\"", "models.offline"),
            ("[models]\nofline = true", "models.ofline"),
            (
                "[models.vit_b32]\npath = \"/nonexistent/clip.safetensors\"",
                "models.vit_b32.path",
            ),
            (
                "[models.vit_b32]\nrepo = \"no-slash\"\nfile = \"m.safetensors\"",
                "models.vit_b32.repo",
            ),
            (
                "[models.vit_b32]\nrepo = \"me/clip\"",
                "models.vit_b32.file",
            ),
            (
                "[models.vit_b32]\nrevison = \"main\"",
                "models.vit_b32.revison",
            ),
            ("[scheduler]\ndevice = [\"cpu\"]", "scheduler.device"),
            ("[shceduler]\ndevices = [\"cpu\"]", "shceduler"),
            (
                "[moderation]\nnsfw_action = \"hide\"",
                "moderation.nsfw_action",
            ),
            (
                "[moderation]\nnsfw_threshold = 1.5",
                "moderation.nsfw_threshold",
            ),
            (
                "[moderation]\nunsafe_labels = []",
                "moderation.unsafe_labels",
            ),
            (
                "[moderation]\nsafe_labels = [\"\"]",
                "moderation.safe_labels[0]",
            ),
            (
                "[moderation]\nnsfw_treshold = 0.2",
                "moderation.nsfw_treshold",
            ),
        ];
        for (text, key) in cases {
            let p = problems(text, &[]);
            assert_eq!(p.len(), 1, "{text:?} gave {p:?}");
            assert_eq!(p[0].key, key, "{text:?} gave {}", p[0]);
        }
    }

    #[test]
    fn moderation_defaults_and_overrides() {
        let s = Settings::from_toml("", &env(&[])).unwrap();
        assert_eq!(s.moderation.nsfw_action, NsfwAction::Spoiler);
        assert_eq!(s.moderation.nsfw_threshold, 0.5);
        assert_eq!(
            s.moderation.unsafe_labels.len(),
            DEFAULT_UNSAFE_LABELS.len()
        );
        assert!(s.moderation.age_restricted_allows);
        let s = Settings::from_toml(
            "[moderation]\nnsfw_action = \"Block\"\nsafe_labels = [\"a lake\"]",
            &env(&[
                ("VQCLIP_MODERATION__NSFW_THRESHOLD", "0.25"),
                ("VQCLIP_MODERATION__UNSAFE_LABELS", "gore, nudity"),
            ]),
        )
        .unwrap();
        assert_eq!(s.moderation.nsfw_action, NsfwAction::Block);
        assert_eq!(s.moderation.nsfw_threshold, 0.25);
        assert_eq!(s.moderation.unsafe_labels, ["gore", "nudity"]);
        assert_eq!(s.moderation.safe_labels, ["a lake"]);
        let long = format!("[moderation]\nunsafe_labels = [\"{}\"]", "x".repeat(201));
        assert_eq!(problems(&long, &[])[0].key, "moderation.unsafe_labels[0]");
        let many = format!(
            "[moderation]\nunsafe_labels = [{}]",
            vec!["\"x\""; 65].join(",")
        );
        assert_eq!(problems(&many, &[])[0].key, "moderation.unsafe_labels");
    }

    #[test]
    fn the_web_server_is_off_until_an_address_is_given() {
        let s = Settings::from_toml("", &env(&[])).unwrap();
        assert_eq!(s.web.listen, None);
        assert_eq!(s.web.public_url, None);
        assert!(s.web.gallery, "the gallery is on wherever the server is");
        let s = Settings::from_toml("[web]\ngallery = false", &env(&[])).unwrap();
        assert!(!s.web.gallery);
        let s = Settings::from_toml(
            "[web]\npublic_url = \"https://art.example.org/vqclip\"",
            &env(&[("VQCLIP_WEB__LISTEN", "[::1]:9090")]),
        )
        .unwrap();
        assert_eq!(s.web.listen, Some("[::1]:9090".parse().unwrap()));
        assert_eq!(
            s.web.public_url.unwrap().as_str(),
            "https://art.example.org/vqclip/"
        );
        for (text, key) in [
            ("[web]\nlisten = \"localhost\"", "web.listen"),
            ("[web]\nlisten = \"0.0.0.0:99999\"", "web.listen"),
            ("[web]\npublic_url = \"ftp://x/\"", "web.public_url"),
            ("[web]\nport = 80", "web.port"),
            ("[web]\ngallery = \"yes\"", "web.gallery"),
        ] {
            let p = problems(text, &[]);
            assert_eq!(p.len(), 1, "{text:?} gave {p:?}");
            assert_eq!(p[0].key, key, "{text:?} gave {}", p[0]);
        }
    }

    #[test]
    fn unknown_keys_are_named_in_the_message() {
        let p = single_problem("[scheduler]\ndevice = [\"cpu\"]");
        assert!(p.to_string().contains("unknown field `device`"), "{p}");
        let p = single_problem("[shceduler]\ndevices = [\"cpu\"]");
        assert!(p.to_string().contains("unknown field `shceduler`"), "{p}");
    }

    #[test]
    fn all_problems_are_reported_together() {
        let list = problems(
            "[scheduler]\nqueue_capacity = 0\n[generation]\npreview_every = 0",
            &[],
        );
        let keys: Vec<_> = list.iter().map(|p| p.key.as_str()).collect();
        assert!(
            keys.contains(&"scheduler.queue_capacity")
                && keys.contains(&"generation.preview_every"),
            "{keys:?}"
        );
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let file = "[scheduler]\nqueue_capacity = 10\ndevices = [\"cpu\"]\n[generation]\ndefault_size = \"256x256\"";
        let s = Settings::from_toml(
            file,
            &env(&[
                ("VQCLIP_SCHEDULER__QUEUE_CAPACITY", "20"),
                ("VQCLIP_SCHEDULER__DEVICES", "cuda:0, cuda:1"),
                ("VQCLIP_GENERATION__DEFAULT_SIZE", "320x240"),
                ("VQCLIP_MODELS__OFFLINE", "true"),
                ("VQCLIP_DISCORD__GUILD_IDS", "[1, \"2\"]"),
                ("VQCLIP_STORAGE__DATABASE", "/var/lib/vqclip/db.sqlite"),
                ("VQCLIP_MODELS__VIT_B16__REVISION", "abc123"),
                // CLI options share the prefix but have no section separator.
                ("VQCLIP_CONFIG", "elsewhere.toml"),
            ]),
        )
        .unwrap();
        assert_eq!(s.scheduler.queue_capacity, 20);
        assert_eq!(
            s.scheduler.devices,
            vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]
        );
        assert_eq!(
            s.generation.default_size,
            SizeSetting::Fixed {
                width: 320,
                height: 240
            }
        );
        assert!(s.models.offline);
        assert_eq!(s.discord.guild_ids, vec![1, 2]);
        assert_eq!(
            s.storage.database,
            Location::Sqlite(PathBuf::from("/var/lib/vqclip/db.sqlite"))
        );
        match s.models.source(models::find("vit_b16").unwrap()) {
            Some(ModelSource::Hub { revision, .. }) => assert_eq!(revision, "abc123"),
            other => panic!("unexpected source {other:?}"),
        }
    }

    #[test]
    fn a_bad_env_override_names_key_and_variable() {
        let p = problems("", &[("VQCLIP_SCHEDULER__QUEUE_CAPACITY", "lots")]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "scheduler.queue_capacity");
        assert_eq!(
            p[0].env_var.as_deref(),
            Some("VQCLIP_SCHEDULER__QUEUE_CAPACITY")
        );
        assert!(
            p[0].to_string()
                .ends_with("(set by the environment variable VQCLIP_SCHEDULER__QUEUE_CAPACITY)")
        );

        let p = problems("", &[("VQCLIP_SCHEDULER__DEVICES", "cpu,gpu")]);
        assert_eq!(p[0].key, "scheduler.devices[1]");
        assert_eq!(p[0].env_var.as_deref(), Some("VQCLIP_SCHEDULER__DEVICES"));

        let p = problems("", &[("VQCLIP_SCHEDULER____X", "1")]);
        assert_eq!(p[0].key, "VQCLIP_SCHEDULER____X");
    }

    #[test]
    fn discord_token_env_wins_and_is_never_shown() {
        let secret = "MTIzNDU2.abcdef.SECRET-token-value";
        let s = Settings::from_toml(
            "[discord]\ntoken = \"from-file\"",
            &env(&[
                ("VQCLIP_DISCORD__TOKEN", "from-vqclip-env"),
                (TOKEN_ENV, secret),
            ]),
        )
        .unwrap();
        assert_eq!(s.require_token().unwrap().expose_secret(), secret);
        let debug = format!("{s:?}");
        let printed = s.to_redacted_toml();
        for shown in [&debug, &printed] {
            assert!(!shown.contains("SECRET"), "token leaked: {shown}");
        }
        assert!(printed.contains("token = \"[redacted]\""), "{printed}");
    }

    #[test]
    fn a_malformed_token_is_reported_without_its_value() {
        let p = problems("", &[(TOKEN_ENV, "abc SECRET def")]);
        assert_eq!(p[0].key, "discord.token");
        assert_eq!(p[0].value, None);
        assert!(!p[0].to_string().contains("SECRET"));
    }

    #[test]
    fn missing_token_says_how_to_set_one() {
        let s = Settings::from_toml("[discord]\ntoken = \"\"", &env(&[])).unwrap();
        let err = s.require_token().unwrap_err().to_string();
        assert!(err.contains(TOKEN_ENV), "{err}");
    }

    #[test]
    fn hub_settings_follow_huggingface_environment_variables() {
        let s = Settings::from_toml(
            "",
            &env(&[
                ("HF_HOME", "/hf"),
                ("HF_ENDPOINT", "https://mirror.example/"),
            ]),
        )
        .unwrap();
        assert_eq!(s.models.cache_dir, PathBuf::from("/hf/hub"));
        assert_eq!(s.models.hub_endpoint.as_str(), "https://mirror.example/");
        let s = Settings::from_toml(
            "[models]\ncache_dir = \"/mine\"\nhub_endpoint = \"http://127.0.0.1:9\"",
            &env(&[
                ("HF_HUB_CACHE", "/c"),
                ("HF_ENDPOINT", "https://mirror.example/"),
            ]),
        )
        .unwrap();
        assert_eq!(s.models.cache_dir, PathBuf::from("/mine"));
        assert_eq!(s.models.hub_endpoint.as_str(), "http://127.0.0.1:9/");
        assert!(!s.models.offline);
        assert!(s.models.hub_token.is_none());

        let s = Settings::from_toml(
            "",
            &env(&[("HF_HUB_OFFLINE", "1"), ("HF_TOKEN", "hf_secretvalue")]),
        )
        .unwrap();
        assert!(s.models.offline);
        assert_eq!(
            s.models.hub_token.as_ref().map(|t| t.expose_secret()),
            Some("hf_secretvalue")
        );
        let printed = s.to_redacted_toml();
        assert!(!printed.contains("hf_secretvalue"), "{printed}");
        assert!(!format!("{s:?}").contains("hf_secretvalue"));
        let s = Settings::from_toml("", &env(&[("HF_HUB_OFFLINE", "0")])).unwrap();
        assert!(!s.models.offline);
    }

    #[test]
    fn banned_words_are_lower_cased_and_blank_ones_refused() {
        let s = Settings::from_toml(
            "[discord]\nbanned_words = [\"Gore\", \"Red Fox\"]",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(s.discord.banned_words, ["gore", "red fox"]);
        let s = Settings::from_toml("", &env(&[("VQCLIP_DISCORD__BANNED_WORDS", "a,b")])).unwrap();
        assert_eq!(s.discord.banned_words, ["a", "b"]);
        let p = single_problem("[discord]\nbanned_words = [\"ok\", \" \"]");
        assert_eq!(p.key, "discord.banned_words[1]");
    }

    #[test]
    fn the_mirror_is_pinned_to_a_revision_and_digest_that_overrides_drop() {
        let s = Settings::from_toml("", &env(&[])).unwrap();
        match s.models.source(models::find("gumbel").unwrap()) {
            Some(ModelSource::Hub {
                repo,
                file,
                revision,
                sha256,
            }) => {
                assert_eq!(repo, "Somnai/pytti-vqgan-checkpoints");
                assert_eq!(file, "openimages/openimages.ckpt");
                assert_eq!(revision, "debc22c8f285c7734980c464ff992d335dde6e9a");
                assert_eq!(
                    sha256.as_deref(),
                    Some("5cd6c74810ab97e00e942c25403f73afc081e8b19987b31ec0d9ff5b68e7ab14")
                );
            }
            other => panic!("{other:?}"),
        }
        let moved = Settings::from_toml(
            "[models.imagenet_f16_16384]\nrevision = \"main\"",
            &env(&[]),
        )
        .unwrap();
        match moved.models.source(models::find("imagenet").unwrap()) {
            Some(ModelSource::Hub { sha256, .. }) => assert_eq!(*sha256, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scheduler_numbers_have_upper_bounds() {
        for (key, value, expected) in [
            (
                "shutdown_grace_seconds",
                "9223372036854775807",
                "expected 0 to 86400",
            ),
            ("max_attempts", "0", "expected 1 to 100"),
            (
                "poll_interval_ms",
                "9223372036854775807",
                "expected 50 to 3600000",
            ),
            ("queue_capacity", "100000000", "expected 1 to 100000"),
        ] {
            let p = single_problem(&format!("[scheduler]\n{key} = {value}"));
            assert_eq!(p.key, format!("scheduler.{key}"));
            assert!(p.to_string().contains(expected), "{p}");
        }
        let p = single_problem("[generation]\nmax_pixels = 1099511627776");
        assert!(p.to_string().contains("expected 256 to 16777216"), "{p}");
    }

    #[test]
    fn a_pinned_sha256_must_be_a_hex_digest() {
        let digest = "AB".repeat(32);
        let s = Settings::from_toml(
            &format!("[models.vit_b32]\nsha256 = \"{digest}\""),
            &env(&[]),
        )
        .unwrap();
        match s.models.source(models::find("vit_b32").unwrap()) {
            Some(ModelSource::Hub { sha256, .. }) => {
                assert_eq!(sha256.as_deref(), Some("ab".repeat(32).as_str()));
            }
            other => panic!("{other:?}"),
        }
        let p = single_problem("[models.vit_b32]\nsha256 = \"abc\"");
        assert_eq!(p.key, "models.vit_b32.sha256");
    }

    #[test]
    fn a_local_model_path_replaces_the_hub_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vqgan.ckpt");
        std::fs::write(&file, b"weights").unwrap();
        let text = format!(
            "[models.imagenet_f16_1024]\npath = {:?}",
            file.display().to_string()
        );
        let s = Settings::from_toml(&text, &env(&[])).unwrap();
        assert_eq!(
            s.models.source(models::find("imagenet_f16_1024").unwrap()),
            Some(&ModelSource::Local { path: file })
        );
    }

    #[test]
    fn tiny_models_need_allow_tiny() {
        let text = "[generation]\ndefault_vqgan = \"tiny_vqgan\"\n[models]\nallow_tiny = true";
        let s = Settings::from_toml(text, &env(&[])).unwrap();
        assert!(s.generation.default_vqgan.tiny);
    }

    #[test]
    fn printed_configuration_loads_back_to_the_same_settings() {
        let text = "[scheduler]\ndevices = [\"cpu\", \"cpu\"]\n[generation]\ndefault_size = \"320x192\"\n[discord]\nguild_ids = [42]";
        let s = Settings::from_toml(text, &env(&[])).unwrap();
        let printed = s.to_redacted_toml();
        let again = Settings::from_toml(&printed, &env(&[])).unwrap();
        assert_eq!(printed, again.to_redacted_toml());
    }
}
