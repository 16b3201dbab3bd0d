//! Property tests on everything a stranger or an operator types: prompts (and the requests built
//! from them), configuration files and input images. Each property says what must hold for any
//! input: no panic, and whatever is accepted is within the documented limits.
//!
//! The default run is quick (proptest's 256 cases each); a longer one is
//! `PROPTEST_CASES=20000 cargo test --release --test integration fuzz::` (see the README).

use proptest::prelude::*;
use vqclip::config::{Environment, Settings};
use vqclip::engine::image;
use vqclip::engine::nets::tokenizer::ClipTokenizer;
use vqclip::engine::prompt::{self, MAX_PROMPTS, MAX_STOP, MAX_WEIGHT};
use vqclip::request::{self, ImagineOptions};

/// Pieces prompts are made of: words, separators, numbers near every limit, flags (with the
/// dashes phones make), invisible and control characters.
fn prompt_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z]{1,8}".prop_map(|s| s),
        Just(" ".to_owned()),
        Just(" | ".to_owned()),
        Just("|".to_owned()),
        Just("::".to_owned()),
        Just(":".to_owned()),
        Just(" -- ".to_owned()),
        prop::sample::select(vec![
            "--seed", "--steps", "--ar", "--size", "--no", "--cutn", "--model", "—steps", "–ar",
            "—no", "--style", "—vivid", "-steps", "--",
        ])
        .prop_map(|s| format!(" {s} ")),
        prop::sample::select(vec![
            "0",
            "1",
            "-1",
            "0.5",
            "1e308",
            "-1e308",
            "NaN",
            "inf",
            "100",
            "100.0001",
            "10",
            "-10.5",
            "18446744073709551615",
            "18446744073709551616",
            "4294967296",
            "16:9",
            "0:0",
            "512x384",
            "99999x99999",
            "1e-320",
            "+3",
            "3:30",
        ])
        .prop_map(str::to_owned),
        prop::sample::select(vec![
            "\u{200B}",
            "\u{3164}",
            "\u{2800}",
            "\u{FEFF}",
            "\u{1b}[2J",
            "\r",
            "\n",
            "\t",
            "\u{202E}",
            "猫",
            "é",
            "🦊",
            "\u{0}",
            "\u{E0041}",
        ])
        .prop_map(str::to_owned),
        any::<char>().prop_map(|c| c.to_string()),
    ]
}

fn prompt_text() -> impl Strategy<Value = String> {
    prop::collection::vec(prompt_piece(), 0..40).prop_map(|pieces| pieces.concat())
}

fn settings() -> Settings {
    let env: Environment = [("HOME", "/h")].into_iter().collect();
    Settings::from_toml("[models]\nallow_tiny = true", &env).unwrap()
}

proptest! {
    #[test]
    fn any_prompt_parses_or_is_refused_within_the_limits(text in prompt_text()) {
        match prompt::parse(&text) {
            Ok(parsed) => {
                prop_assert!(!parsed.prompts.is_empty());
                prop_assert!(parsed.prompts.len() <= MAX_PROMPTS);
                for p in &parsed.prompts {
                    prop_assert!(prompt::has_visible_text(&p.text), "{:?}", p.text);
                    prop_assert!(p.weight.is_finite() && p.weight.abs() <= MAX_WEIGHT);
                    prop_assert!(p.stop.is_none_or(|s| s.is_finite() && s.abs() <= MAX_STOP));
                    prop_assert!(!p.text.chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
                }
            }
            Err(e) => {
                // The span points into the input, on character boundaries.
                prop_assert!(text.get(e.span.clone()).is_some(), "{:?} {:?}", e.span, text);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn any_prompt_resolves_to_a_spec_the_engine_accepts_or_is_refused(
        text in prompt_text(),
        steps in prop::option::of(any::<u32>()),
        size in prop::option::of((any::<u32>(), any::<u32>())),
        cutn in prop::option::of(any::<u32>()),
        seed in prop::option::of(any::<u64>()),
    ) {
        let s = settings();
        let options = ImagineOptions { steps, size, cutn, seed, ..Default::default() };
        if let Ok(resolved) = request::resolve(
            &text, &options, &s.generation, true, request::AutoDefaults::CPU, &ClipTokenizer::new(),
        ) {
            prop_assert!(resolved.spec.check().is_ok(), "{:?}", resolved.spec.check());
            let spec = &resolved.spec;
            prop_assert!(spec.width <= s.generation.max_side && spec.height <= s.generation.max_side);
            prop_assert!(spec.steps <= s.generation.max_steps && spec.cutn <= s.generation.max_cutn);
        }
    }

    #[test]
    fn any_prompt_of_any_bytes_never_panics(text in ".{0,300}") {
        let _ = prompt::parse(&text);
    }
}

/// Configuration keys with values around and beyond their limits, and of the wrong types.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "scheduler.queue_capacity",
        "scheduler.max_queued_per_user",
        "scheduler.max_running_per_user",
        "scheduler.shutdown_grace_seconds",
        "scheduler.device_failure_limit",
        "scheduler.max_attempts",
        "scheduler.model_cache_mib",
        "scheduler.progress_interval_ms",
        "scheduler.poll_interval_ms",
        "scheduler.lease_seconds",
        "scheduler.devices",
        "generation.max_side",
        "generation.max_pixels",
        "generation.default_size",
        "generation.default_steps",
        "generation.max_steps",
        "generation.default_cutn",
        "generation.max_cutn",
        "generation.preview_every",
        "generation.default_vqgan",
        "generation.default_clip",
        "discord.jobs_per_hour",
        "storage.database",
        "models.allow_tiny",
        "unknown.key",
    ]);
    let value = prop::sample::select(vec![
        "0",
        "1",
        "-1",
        "3",
        "50",
        "100",
        "1024",
        "8192",
        "8193",
        "16777216",
        "16777217",
        "100000",
        "100001",
        "86400",
        "86401",
        "3600000",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "-9223372036854775808",
        "1.5",
        "nan",
        "inf",
        "true",
        "\"\"",
        "\"auto\"",
        "\"512x512\"",
        "\"0x0\"",
        "\"99999x99999\"",
        "\"cpu\"",
        "[\"cpu\", \"cpu\"]",
        "[\"cuda:0\", \"cuda:0\"]",
        "[]",
        "\"postgres://u:p@h/db\"",
        "\"tiny_vqgan\"",
        "{}",
    ]);
    prop::collection::vec((key, value), 0..8).prop_map(|pairs| {
        let mut sections: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for (key, value) in pairs {
            let (section, name) = key.split_once('.').unwrap();
            sections
                .entry(section)
                .or_default()
                .push(format!("{name} = {value}"));
        }
        sections
            .into_iter()
            .map(|(section, lines)| format!("[{section}]\n{}\n", lines.join("\n")))
            .collect()
    })
}

proptest! {
    #[test]
    fn any_configuration_is_accepted_within_bounds_or_refused_by_key(text in config_text()) {
        let env: Environment = [("HOME", "/h")].into_iter().collect();
        match Settings::from_toml(&text, &env) {
            Ok(s) => {
                let sch = &s.scheduler;
                prop_assert!(sch.shutdown_grace_seconds <= 86_400);
                prop_assert!((1..=3600).contains(&sch.lease_seconds));
                prop_assert!((1..=100).contains(&sch.max_attempts));
                prop_assert!(sch.poll_interval_ms <= 3_600_000 && sch.progress_interval_ms <= 3_600_000);
                prop_assert!(sch.max_queued_per_user <= sch.queue_capacity);
                let g = &s.generation;
                prop_assert!(g.max_side <= vqclip::engine::generate::limits::MAX_SIDE);
                prop_assert!(g.max_pixels <= vqclip::engine::generate::limits::MAX_PIXELS);
                prop_assert!(g.default_steps <= g.max_steps && g.default_cutn <= g.max_cutn);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

/// Valid images of every format the bot reads, to damage.
fn seed_images() -> Vec<Vec<u8>> {
    let picture = ::image::RgbImage::from_fn(19, 11, |x, y| {
        ::image::Rgb([x as u8 * 13, y as u8 * 23, 77])
    });
    let mut out = vec![
        image::encode_png(&picture).unwrap(),
        image::encode_jpeg(&picture, 80).unwrap(),
        image::encode_gif(std::slice::from_ref(&picture), 100).unwrap(),
    ];
    let mut webp = Vec::new();
    ::image::DynamicImage::ImageRgb8(picture)
        .write_to(
            &mut std::io::Cursor::new(&mut webp),
            ::image::ImageFormat::WebP,
        )
        .unwrap();
    out.push(webp);
    out
}

proptest! {
    #[test]
    fn any_damaged_image_decodes_within_the_limits_or_is_refused(
        which in 0usize..4,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        dims in prop::option::of((any::<u32>(), any::<u32>())),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = seed_images().swap_remove(which);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let (Some((w, h)), 0) = (dims, which) {
            // A PNG header claiming any size (its CRC left wrong or right alike).
            bytes[16..20].copy_from_slice(&w.to_be_bytes());
            bytes[20..24].copy_from_slice(&h.to_be_bytes());
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(decoded) = image::decode(&bytes) {
            let (w, h) = decoded.dimensions();
            prop_assert!(image::input_size_ok(w, h), "{w}x{h}");
        }
    }
}
