//! Stage 2 of reading the configuration: validating the loose shapes into typed settings,
//! collecting every problem (with the key and where its value came from) instead of stopping
//! at the first.

use super::moderation::{
    DEFAULT_SAFE_LABELS, DEFAULT_UNSAFE_LABELS, MAX_LABEL_CHARS, MAX_LABELS, ModerationSettings,
    NsfwAction,
};
use super::raw::{
    ListOrCsv, RawDiscord, RawGeneration, RawModelOverride, RawModels, RawModeration, RawScheduler,
    RawSettings, RawStorage, RawWeb, Scalar,
};
use super::web::WebSettings;
use super::{
    DEFAULT_DATABASE, DEVICE_EXPECTED, DeviceSpec, DiscordSettings, Environment,
    GenerationSettings, GridSetting, InvalidKey, MIN_SIDE, ModelSettings, ModelSource, Origins,
    SchedulerSettings, Settings, SizeSetting, StorageSettings,
};
use crate::engine::nets::Precision;
use crate::models::{self, ModelInfo, ModelKind};
use crate::store::Location;
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use url::Url;

/// Collects every problem instead of stopping at the first, so one run of `config check`
/// shows them all.
pub(super) struct Problems<'a> {
    list: Vec<InvalidKey>,
    origins: &'a Origins,
}

impl Problems<'_> {
    pub(super) fn add(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        expected: impl Into<String>,
    ) {
        let key = key.into();
        self.list.push(InvalidKey {
            env_var: self.origins.env_var_for(&key),
            key,
            value,
            expected: expected.into(),
        });
    }

    /// Checks `1 <= value <= bound`. When the bound is itself invalid (0) only `value >= 1` is
    /// checked, so one mistake is not reported twice.
    fn check_at_most<T>(&mut self, (key, value): (&str, T), (bound_key, bound): (&str, T))
    where
        T: Copy + PartialOrd + From<u8> + fmt::Display,
    {
        let one = T::from(1);
        if bound >= one {
            let expected = format!("expected at least 1 and at most {bound_key} ({bound})");
            self.check(value >= one && value <= bound, key, value, &expected);
        } else {
            self.check(value >= one, key, value, "expected at least 1");
        }
    }

    /// Records a problem unless `ok`; returns `ok`.
    /// Checks `low <= value <= high`, naming both bounds.
    fn check_range<T>(&mut self, key: &str, value: T, low: T, high: T)
    where
        T: Copy + PartialOrd + fmt::Display,
    {
        let expected = format!("expected {low} to {high}");
        self.check((low..=high).contains(&value), key, value, &expected);
    }

    fn check(&mut self, ok: bool, key: &str, value: impl fmt::Display, expected: &str) -> bool {
        if !ok {
            self.add(key, Some(value.to_string()), expected);
        }
        ok
    }
}

pub(super) fn validate(
    raw: RawSettings,
    env: &Environment,
    origins: &Origins,
) -> Result<Settings, Vec<InvalidKey>> {
    let mut p = Problems {
        list: Vec::new(),
        origins,
    };
    let discord = validate_discord(raw.discord, &mut p);
    let storage = validate_storage(raw.storage, &mut p);
    let scheduler = validate_scheduler(raw.scheduler, &mut p);
    let models = validate_models(raw.models, env, &mut p);
    let generation = validate_generation(raw.generation, models.allow_tiny, &mut p);
    let moderation = validate_moderation(raw.moderation, &mut p);
    let web = validate_web(raw.web, &mut p);
    if p.list.is_empty() {
        Ok(Settings {
            discord,
            storage,
            scheduler,
            generation,
            models,
            moderation,
            web,
        })
    } else {
        Err(p.list)
    }
}

pub(super) fn validate_discord(raw: RawDiscord, p: &mut Problems) -> DiscordSettings {
    // An empty token (as in the example file) means "not configured here".
    let token = raw.token.filter(|t| !t.trim().is_empty());
    if let Some(t) = &token
        && t.trim().chars().any(char::is_whitespace)
    {
        // Never echo the value: it is a secret even when malformed.
        p.add(
            "discord.token",
            None,
            "a bot token contains no spaces; copy it again from the Developer Portal",
        );
    }
    let api_base = parse_http_url(&raw.api_base, "discord.api_base", p);
    let mut guild_ids = Vec::new();
    for (i, id) in raw.guild_ids.0.iter().enumerate() {
        let parsed = match id {
            Scalar::Integer(n) => u64::try_from(*n).ok(),
            Scalar::Text(s) => s.trim().parse::<u64>().ok(),
        };
        match parsed.filter(|&n| n > 0) {
            Some(n) => guild_ids.push(n),
            None => p.add(
                format!("discord.guild_ids[{i}]"),
                Some(id.to_string()),
                "expected a guild id (a positive number; Developer Mode → right-click the server → Copy Server ID)",
            ),
        }
    }
    let mut banned_words = Vec::new();
    for (i, word) in raw.banned_words.0.iter().enumerate() {
        match word {
            Scalar::Text(w) if !w.trim().is_empty() => {
                banned_words.push(w.trim().to_lowercase());
            }
            other => p.add(
                format!("discord.banned_words[{i}]"),
                Some(other.to_string()),
                "expected a word or phrase",
            ),
        }
    }
    DiscordSettings {
        token: token.map(|t| SecretString::from(t.trim().to_owned())),
        api_base: api_base.unwrap_or_else(|| Url::parse("https://discord.com").expect("valid URL")),
        guild_ids,
        banned_words,
        jobs_per_hour: raw.jobs_per_hour,
        anyone_can_follow_up: raw.anyone_can_follow_up,
    }
}

pub(super) fn parse_http_url(raw: &str, key: &str, p: &mut Problems) -> Option<Url> {
    match Url::parse(raw.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Some(url),
        _ => {
            p.add(
                key,
                Some(format!("{raw:?}")),
                "expected an http:// or https:// URL",
            );
            None
        }
    }
}

pub(super) fn validate_storage(raw: RawStorage, p: &mut Problems) -> StorageSettings {
    let database = match Location::parse(&raw.database) {
        Ok(location) => location,
        Err(problem) => {
            // A URL may carry a password: it is not repeated in the message.
            let shown = (!raw.database.contains("://")).then(|| format!("{:?}", raw.database));
            p.add(
                "storage.database",
                shown,
                format!("an SQLite file path or a postgres:// URL; this one {problem}"),
            );
            Location::Sqlite(PathBuf::from(DEFAULT_DATABASE))
        }
    };
    p.check(
        !raw.images.trim().is_empty(),
        "storage.images",
        "\"\"",
        "expected a directory path",
    );
    StorageSettings {
        database,
        images: PathBuf::from(raw.images.trim()),
    }
}

pub(super) fn validate_scheduler(raw: RawScheduler, p: &mut Problems) -> SchedulerSettings {
    let mut devices = Vec::new();
    for (i, item) in raw.devices.0.iter().enumerate() {
        let key = format!("scheduler.devices[{i}]");
        let parsed = match item {
            Scalar::Text(s) => s.parse::<DeviceSpec>(),
            Scalar::Integer(_) => Err(DEVICE_EXPECTED.to_owned()),
        };
        match parsed {
            Ok(d @ (DeviceSpec::Cuda(_) | DeviceSpec::Metal(_))) if devices.contains(&d) => {
                p.add(
                    key,
                    Some(item.to_string()),
                    "listed twice; only \"cpu\" may repeat",
                );
            }
            Ok(d) => devices.push(d),
            Err(expected) => p.add(key, Some(item.to_string()), expected),
        }
    }
    if devices.contains(&DeviceSpec::Auto) && raw.devices.0.len() > 1 {
        p.add(
            "scheduler.devices",
            None,
            "\"auto\" already means every device; list it alone or list devices explicitly",
        );
    }
    // Every number has an upper bound too: a huge one (a typo, a pasted u64) must not pass
    // `config check` and then overflow a clock or an allocation at run time.
    p.check_range(
        "scheduler.queue_capacity",
        raw.queue_capacity,
        1,
        MAX_QUEUE_CAPACITY,
    );
    p.check_at_most(
        ("scheduler.max_queued_per_user", raw.max_queued_per_user),
        ("scheduler.queue_capacity", raw.queue_capacity),
    );
    p.check_range(
        "scheduler.max_running_per_user",
        raw.max_running_per_user,
        1,
        1000,
    );
    p.check_range(
        "scheduler.shutdown_grace_seconds",
        raw.shutdown_grace_seconds,
        0,
        86_400,
    );
    p.check_range(
        "scheduler.device_failure_limit",
        raw.device_failure_limit,
        1,
        1000,
    );
    p.check_range("scheduler.max_attempts", raw.max_attempts, 1, 100);
    p.check_range(
        "scheduler.model_cache_mib",
        raw.model_cache_mib,
        1,
        16 * 1024 * 1024,
    );
    p.check_range(
        "scheduler.progress_interval_ms",
        raw.progress_interval_ms,
        100,
        3_600_000,
    );
    p.check_range(
        "scheduler.poll_interval_ms",
        raw.poll_interval_ms,
        50,
        3_600_000,
    );
    p.check_range("scheduler.lease_seconds", raw.lease_seconds, 1, 3600);
    let max_batch = match &raw.max_batch {
        Scalar::Text(t) if t.trim().eq_ignore_ascii_case("auto") => None,
        Scalar::Integer(n) if (1..=MAX_BATCH as i64).contains(n) => Some(*n as usize),
        Scalar::Text(t)
            if t.trim()
                .parse::<usize>()
                .is_ok_and(|n| (1..=MAX_BATCH).contains(&n)) =>
        {
            t.trim().parse().ok()
        }
        other => {
            p.add(
                "scheduler.max_batch",
                Some(other.to_string()),
                format!(r#"expected "auto" or 1 to {MAX_BATCH}"#),
            );
            None
        }
    };
    let clip_precision = match raw.clip_precision.trim() {
        s if s.eq_ignore_ascii_case("auto") => None,
        s => match s.parse::<Precision>() {
            Ok(precision) => Some(precision),
            Err(_) => {
                p.add(
                    "scheduler.clip_precision",
                    Some(format!("{:?}", raw.clip_precision)),
                    r#"expected "auto", "f32", "f16" or "bf16""#,
                );
                None
            }
        },
    };
    SchedulerSettings {
        devices,
        queue_capacity: raw.queue_capacity,
        max_queued_per_user: raw.max_queued_per_user,
        max_running_per_user: raw.max_running_per_user,
        prioritize_follow_ups: raw.prioritize_follow_ups,
        shutdown_grace_seconds: raw.shutdown_grace_seconds,
        device_failure_limit: raw.device_failure_limit,
        max_attempts: raw.max_attempts,
        model_cache_mib: raw.model_cache_mib,
        progress_interval_ms: raw.progress_interval_ms,
        poll_interval_ms: raw.poll_interval_ms,
        lease_seconds: raw.lease_seconds,
        clip_precision,
        tf32: raw.tf32,
        max_batch,
    }
}

/// Largest `scheduler.max_batch`: each job may bring a grid of four latents, all decoded and
/// kept on the device together.
pub(super) const MAX_BATCH: usize = 16;

pub(super) fn validate_generation(
    raw: RawGeneration,
    allow_tiny: bool,
    p: &mut Problems,
) -> GenerationSettings {
    use crate::engine::generate::limits;
    let min_pixels = u64::from(MIN_SIDE * MIN_SIDE);
    p.check_range(
        "generation.max_side",
        raw.max_side,
        MIN_SIDE,
        limits::MAX_SIDE,
    );
    p.check_range(
        "generation.max_pixels",
        raw.max_pixels,
        min_pixels,
        limits::MAX_PIXELS,
    );
    let default_size = match raw.default_size.parse::<SizeSetting>() {
        Ok(size) => {
            if let SizeSetting::Fixed { width, height } = size {
                let sides_ok = [width, height]
                    .iter()
                    .all(|s| (MIN_SIDE..=raw.max_side).contains(s));
                let area_ok = u64::from(width) * u64::from(height) <= raw.max_pixels;
                p.check(
                    sides_ok && area_ok,
                    "generation.default_size",
                    format!("{:?}", raw.default_size),
                    &format!(
                        "expected sides from {MIN_SIDE} to generation.max_side ({}) and at most \
                         generation.max_pixels ({}) pixels",
                        raw.max_side, raw.max_pixels
                    ),
                );
            }
            size
        }
        Err(expected) => {
            p.add(
                "generation.default_size",
                Some(format!("{:?}", raw.default_size)),
                expected,
            );
            SizeSetting::Auto
        }
    };
    p.check_range("generation.max_steps", raw.max_steps, 1, limits::MAX_STEPS);
    p.check_at_most(
        ("generation.default_steps", raw.default_steps),
        ("generation.max_steps", raw.max_steps),
    );
    p.check_range("generation.max_cutn", raw.max_cutn, 1, limits::MAX_CUTN);
    p.check_at_most(
        ("generation.default_cutn", raw.default_cutn),
        ("generation.max_cutn", raw.max_cutn),
    );
    p.check_range(
        "generation.preview_every",
        raw.preview_every,
        1,
        limits::MAX_STEPS,
    );
    let default_vqgan = validate_model_name(
        &raw.default_vqgan,
        ModelKind::Vqgan,
        allow_tiny,
        "generation.default_vqgan",
        p,
    );
    let default_clip = validate_model_name(
        &raw.default_clip,
        ModelKind::Clip,
        allow_tiny,
        "generation.default_clip",
        p,
    );
    let grid_text = match &raw.grid {
        Scalar::Integer(n) => n.to_string(),
        Scalar::Text(t) => t.clone(),
    };
    let grid = grid_text.parse::<GridSetting>().unwrap_or_else(|expected| {
        p.add("generation.grid", Some(raw.grid.to_string()), expected);
        GridSetting::Auto
    });
    GenerationSettings {
        default_size,
        max_side: raw.max_side,
        max_pixels: raw.max_pixels,
        default_steps: raw.default_steps,
        max_steps: raw.max_steps,
        default_cutn: raw.default_cutn,
        max_cutn: raw.max_cutn,
        default_vqgan,
        default_clip,
        preview_every: raw.preview_every,
        grid,
    }
}

/// Largest `scheduler.queue_capacity`: the waiting line is held in memory.
pub(super) const MAX_QUEUE_CAPACITY: usize = 100_000;

pub(super) fn validate_model_name(
    name: &str,
    kind: ModelKind,
    allow_tiny: bool,
    key: &str,
    p: &mut Problems,
) -> &'static ModelInfo {
    let fallback = models::CATALOGUE
        .iter()
        .find(|m| m.kind == kind)
        .expect("the catalogue has a model of each kind");
    let value = Some(format!("{name:?}"));
    match models::find(name) {
        Some(m) if m.kind != kind => {
            p.add(
                key,
                value,
                format!(
                    "{} is a {} model; expected a {kind} model: {}",
                    m.id,
                    m.kind,
                    models::ids_of(kind).join(", ")
                ),
            );
            fallback
        }
        Some(m) if m.tiny && !allow_tiny => {
            p.add(
                key,
                value,
                "tiny test models are refused unless models.allow_tiny = true",
            );
            fallback
        }
        Some(m) => m,
        None => {
            p.add(
                key,
                value,
                format!(
                    "expected a {kind} model: {}",
                    models::ids_of(kind).join(", ")
                ),
            );
            fallback
        }
    }
}

/// How `huggingface_hub` reads boolean environment variables such as `HF_HUB_OFFLINE`.
pub(super) fn truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "on" | "yes" | "true"
    )
}

pub(super) fn validate_models(
    raw: RawModels,
    env: &Environment,
    p: &mut Problems,
) -> ModelSettings {
    // Same precedence as the huggingface_hub library, so an existing cache is found.
    let cache_dir = if !raw.cache_dir.trim().is_empty() {
        PathBuf::from(raw.cache_dir.trim())
    } else if let Some(dir) = env.non_empty("HF_HUB_CACHE") {
        PathBuf::from(dir)
    } else if let Some(home) = env.non_empty("HF_HOME") {
        Path::new(home).join("hub")
    } else if let Some(home) = env.non_empty("HOME") {
        Path::new(home).join(".cache/huggingface/hub")
    } else {
        p.add(
            "models.cache_dir",
            None,
            "cannot find a default (HF_HUB_CACHE, HF_HOME and HOME are unset); set a directory",
        );
        PathBuf::new()
    };
    let endpoint_text = if raw.hub_endpoint.trim().is_empty() {
        env.non_empty("HF_ENDPOINT")
            .unwrap_or("https://huggingface.co")
            .to_owned()
    } else {
        raw.hub_endpoint.clone()
    };
    let hub_endpoint = parse_http_url(&endpoint_text, "models.hub_endpoint", p)
        .unwrap_or_else(|| Url::parse("https://huggingface.co").expect("valid URL"));

    let mut overrides = BTreeMap::new();
    for (name, value) in raw.per_model {
        let key = format!("models.{name}");
        let Some(model) = models::CATALOGUE.iter().find(|m| m.id == name) else {
            let ids: Vec<&str> = models::CATALOGUE.iter().map(|m| m.id).collect();
            p.add(
                key,
                None,
                format!(
                    "unknown key; expected cache_dir, hub_endpoint, offline, allow_tiny or a model id ({})",
                    ids.join(", ")
                ),
            );
            continue;
        };
        match serde_path_to_error::deserialize::<_, RawModelOverride>(value) {
            Ok(o) => {
                overrides.insert(model.id, o);
            }
            Err(e) => {
                let path = e.path().to_string();
                let key = if path == "." || path.is_empty() {
                    key
                } else {
                    format!("{key}.{path}")
                };
                p.add(key, None, e.inner().message().to_owned());
            }
        }
    }

    let mut sources = BTreeMap::new();
    for model in models::CATALOGUE {
        let o = overrides.remove(model.id).unwrap_or_default();
        if let Some(source) = resolve_source(model, o, p) {
            sources.insert(model.id, source);
        }
    }
    ModelSettings {
        cache_dir,
        hub_endpoint,
        offline: raw.offline || env.non_empty("HF_HUB_OFFLINE").is_some_and(truthy),
        hub_token: env
            .non_empty("HF_TOKEN")
            .map(|t| SecretString::from(t.trim().to_owned())),
        allow_tiny: raw.allow_tiny,
        sources,
    }
}

pub(super) fn resolve_source(
    model: &'static ModelInfo,
    o: RawModelOverride,
    p: &mut Problems,
) -> Option<ModelSource> {
    let key = |field: &str| format!("models.{}.{field}", model.id);
    if let Some(path) = o.path {
        if o.repo.is_some() || o.file.is_some() || o.revision.is_some() || o.sha256.is_some() {
            p.add(
                key("path"),
                None,
                "give either path or repo/file/revision/sha256, not both",
            );
        }
        let path = PathBuf::from(path.trim());
        if !path.is_file() {
            p.add(
                key("path"),
                Some(format!("{:?}", path.display().to_string())),
                format!(
                    "no such file; download the weights ({}) or remove this key",
                    model.manual_source
                ),
            );
        }
        return Some(ModelSource::Local { path });
    }
    let default = model.hub.as_ref();
    let repo = o.repo.or_else(|| default.map(|h| h.repo.to_owned()))?;
    let custom_repo = default.is_none_or(|h| h.repo != repo);
    let file = match (o.file, default) {
        (Some(f), _) => f,
        (None, Some(h)) if !custom_repo => h.file.to_owned(),
        (None, _) => {
            p.add(
                key("file"),
                None,
                format!("a file name in {repo} is required when the repository is not the default"),
            );
            String::new()
        }
    };
    let revision = o
        .revision
        .or_else(|| {
            default
                .filter(|_| !custom_repo)
                .map(|h| h.revision.to_owned())
        })
        .unwrap_or_else(|| "main".to_owned());
    let repo_ok = repo
        .split_once('/')
        .is_some_and(|(owner, name)| !owner.is_empty() && !name.is_empty() && !name.contains('/'));
    p.check(
        repo_ok,
        &key("repo"),
        format!("{repo:?}"),
        "expected a Hugging Face repository as \"owner/name\"",
    );
    p.check(
        !revision.trim().is_empty(),
        &key("revision"),
        "\"\"",
        "expected a branch, tag or commit",
    );
    // The catalogue's digest holds for exactly the catalogue's file at its revision.
    let catalogue_digest = default
        .filter(|h| h.repo == repo && h.file == file && h.revision == revision)
        .and_then(|h| h.sha256)
        .map(str::to_owned);
    let sha256 = o
        .sha256
        .map(|d| d.trim().to_ascii_lowercase())
        .or(catalogue_digest);
    if let Some(digest) = &sha256 {
        p.check(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            &key("sha256"),
            format!("{digest:?}"),
            "expected 64 hexadecimal digits",
        );
    }
    Some(ModelSource::Hub {
        repo,
        file,
        revision,
        sha256,
    })
}

fn validate_moderation(raw: RawModeration, p: &mut Problems) -> ModerationSettings {
    let nsfw_action = NsfwAction::parse(&raw.nsfw_action).unwrap_or_else(|| {
        p.add(
            "moderation.nsfw_action",
            Some(format!("{:?}", raw.nsfw_action)),
            "expected spoiler, block or off",
        );
        NsfwAction::Spoiler
    });
    let threshold = raw.nsfw_threshold;
    if !(0.0..=1.0).contains(&threshold) {
        p.add(
            "moderation.nsfw_threshold",
            Some(threshold.to_string()),
            "expected a score from 0 to 1 (0.5 by default; lower flags more)",
        );
    }
    let labels = |list: Option<ListOrCsv>, key: &str, defaults: &[&str], p: &mut Problems| {
        let Some(list) = list else {
            return defaults.iter().map(|&l| l.to_owned()).collect();
        };
        if list.0.is_empty() || list.0.len() > MAX_LABELS {
            p.add(
                format!("moderation.{key}"),
                Some(format!("{} labels", list.0.len())),
                format!("expected 1 to {MAX_LABELS} labels"),
            );
        }
        let mut kept = Vec::new();
        for (i, label) in list.0.iter().enumerate() {
            match label {
                Scalar::Text(text)
                    if !text.trim().is_empty() && text.chars().count() <= MAX_LABEL_CHARS =>
                {
                    kept.push(text.trim().to_owned());
                }
                other => p.add(
                    format!("moderation.{key}[{i}]"),
                    Some(other.to_string()),
                    format!("expected a short text (1 to {MAX_LABEL_CHARS} characters)"),
                ),
            }
        }
        kept
    };
    ModerationSettings {
        nsfw_action,
        nsfw_threshold: threshold.clamp(0.0, 1.0) as f32,
        unsafe_labels: labels(raw.unsafe_labels, "unsafe_labels", DEFAULT_UNSAFE_LABELS, p),
        safe_labels: labels(raw.safe_labels, "safe_labels", DEFAULT_SAFE_LABELS, p),
        age_restricted_allows: raw.age_restricted_allows,
    }
}

fn validate_web(raw: RawWeb, p: &mut Problems) -> WebSettings {
    let listen = match raw.listen.trim() {
        "" => None,
        text => match text.parse::<std::net::SocketAddr>() {
            Ok(address) => Some(address),
            Err(_) => {
                p.add(
                    "web.listen",
                    Some(format!("{:?}", raw.listen)),
                    "expected an IP address and port, e.g. 127.0.0.1:8080 (empty: no web server)",
                );
                None
            }
        },
    };
    let public_url = match raw.public_url.trim() {
        "" => None,
        text => parse_http_url(text, "web.public_url", p).map(|mut url| {
            // Links are joined onto it: make it a directory.
            if !url.path().ends_with('/') {
                url.set_path(&format!("{}/", url.path()));
            }
            url
        }),
    };
    WebSettings {
        listen,
        public_url,
        gallery: raw.gallery,
    }
}
