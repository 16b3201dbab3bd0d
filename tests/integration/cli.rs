//! The `vqclip` binary as a user runs it: exit codes, messages, files created.

use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;
use vqclip::store::{self, jobs};

use crate::support::sample_job;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");

/// `vqclip ARGS` in `dir` with only the environment given (plus HOME), so the developer's own
/// variables and config.toml cannot leak into a test.
pub(crate) fn vqclip(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("HOME", dir)
        .envs(env.iter().copied())
        .output()
        .expect("run vqclip")
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_config(dir: &TempDir, body: &str) -> String {
    let path = dir.path().join("vqclip.toml");
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[test]
fn config_check_accepts_the_example() {
    let dir = tempfile::tempdir().unwrap();
    let out = vqclip(dir.path(), &["config", "check", EXAMPLE], &[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("[scheduler]") && stdout.contains("devices = [\"auto\"]"),
        "{stdout}"
    );
    toml::from_str::<toml::Table>(&stdout).expect("the effective configuration is TOML");
}

#[test]
fn config_check_names_the_bad_key_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "[scheduler]\ndevices = [\"cpu\", \"cuda:x\"]\n");
    let out = vqclip(dir.path(), &["config", "check", &path], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            r#"scheduler.devices[1] = "cuda:x": expected "auto", "cpu", "cuda:N" or "metal:N""#
        ),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing printed as if it were valid");
}

#[test]
fn config_check_reports_env_overrides_by_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = vqclip(
        dir.path(),
        &["config", "check", EXAMPLE],
        &[("VQCLIP_GENERATION__MAX_STEPS", "0")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("generation.max_steps = 0"), "{stderr}");
    assert!(stderr.contains("VQCLIP_GENERATION__MAX_STEPS"), "{stderr}");
}

#[test]
fn config_check_uses_config_flag_and_fails_on_a_missing_named_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "[generation]\ndefault_steps = 123\n");
    let out = vqclip(dir.path(), &["--config", &path, "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("default_steps = 123"));

    let out = vqclip(dir.path(), &["config", "check", "no-such.toml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no-such.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn config_check_without_a_file_prints_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = vqclip(dir.path(), &["config", "check"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("default_steps = 500"));
}

#[test]
fn the_token_never_appears_in_output() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "MTA5ODc2NTQzMjE.GsEcRt.ThisIsNotARealTokenButLooksLikeOne";
    // A loopback address nothing listens on: `serve` fails fast without the network.
    let env = [
        ("DISCORD_TOKEN", secret),
        ("RUST_LOG", "trace"),
        ("VQCLIP_DISCORD__API_BASE", "http://127.0.0.1:9"),
        ("VQCLIP_STORAGE__DATABASE", "db.sqlite"),
        ("VQCLIP_SCHEDULER__DEVICES", "cpu"),
    ];
    for args in [&["config", "check", EXAMPLE][..], &["serve"][..]] {
        let out = vqclip(dir.path(), args, &env);
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(!all.contains("GsEcRt"), "{args:?} leaked the token: {all}");
    }
    let out = vqclip(dir.path(), &["config", "check", EXAMPLE], &env);
    assert!(text(&out.stdout).contains("token = \"[redacted]\""));
}

#[test]
fn serve_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = vqclip(dir.path(), &["serve"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("DISCORD_TOKEN") && text(&out.stderr).contains("discord.token"),
        "{}",
        text(&out.stderr)
    );

    let out = vqclip(
        dir.path(),
        &["serve"],
        &[
            ("DISCORD_TOKEN", "a.b.c"),
            ("VQCLIP_DISCORD__API_BASE", "http://127.0.0.1:9"),
            ("VQCLIP_STORAGE__DATABASE", "db.sqlite"),
            ("VQCLIP_SCHEDULER__DEVICES", "cpu"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Discord"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn db_migrate_creates_the_database_from_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/deep/vqclip.sqlite");
    let db_text = db.display().to_string();
    let env = [("VQCLIP_STORAGE__DATABASE", db_text.as_str())];

    let out = vqclip(dir.path(), &["db", "migrate"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(db.is_file());
    assert!(
        text(&out.stdout)
            .contains("applied migrations 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 (schema version 10)"),
        "{}",
        text(&out.stdout)
    );

    let out = vqclip(dir.path(), &["db", "migrate"], &env);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("already up to date"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn jobs_list_shows_recent_jobs_as_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.sqlite");
    let db_text = db.display().to_string();
    let env = [("VQCLIP_STORAGE__DATABASE", db_text.as_str())];

    let out = vqclip(dir.path(), &["jobs", "list"], &env);
    assert_eq!(out.status.code(), Some(1), "no database yet");
    assert!(
        text(&out.stderr).contains("vqclip db migrate"),
        "{}",
        text(&out.stderr)
    );
    assert!(!db.exists(), "listing does not create a database");

    let pool = store::connect(&store::Location::Sqlite(db.clone()))
        .await
        .unwrap();
    store::migrate(&pool).await.unwrap();
    let mut job = sample_job(321, "a watercolour lighthouse in a storm");
    job.seed = u64::MAX;
    let first = jobs::insert_job(&pool, &job).await.unwrap();
    let second = jobs::insert_job(&pool, &sample_job(321, "second"))
        .await
        .unwrap();
    jobs::mark_job_running(&pool, second, "cpu").await.unwrap();
    pool.close().await;

    let out = vqclip(dir.path(), &["jobs", "list"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("a watercolour lighthouse in a storm"),
        "{table}"
    );
    assert!(table.contains(&u64::MAX.to_string()), "{table}");
    assert!(table.contains("running 0/300"), "{table}");
    let second_row = table.find("second").unwrap();
    let first_row = table.find("watercolour").unwrap();
    assert!(second_row < first_row, "newest first:\n{table}");
    assert!(table.contains(&first.to_string()));

    let out = vqclip(dir.path(), &["jobs", "list", "--status", "running"], &env);
    assert!(!text(&out.stdout).contains("watercolour"));
    let out = vqclip(dir.path(), &["jobs", "list", "--status", "bogus"], &env);
    assert_eq!(out.status.code(), Some(2), "clap rejects the value");
    assert!(
        text(&out.stderr).contains("expected one of"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_lists_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = vqclip(dir.path(), &["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for command in ["serve", "config", "db", "jobs"] {
        assert!(
            help.contains(command),
            "{command} missing from --help:\n{help}"
        );
    }
}

#[test]
fn json_logs_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("j.sqlite").display().to_string();
    let out = vqclip(
        dir.path(),
        &["--log-format", "json", "db", "migrate"],
        &[
            ("RUST_LOG", "sqlx=info,vqclip=debug"),
            ("VQCLIP_STORAGE__DATABASE", &db),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "expected some log lines");
    for line in lines {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

/// A configuration that runs on the tiny fixture models.
fn tiny_config(dir: &TempDir) -> String {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    write_config(
        dir,
        &format!(
            "[generation]\ndefault_vqgan = \"tiny_vqgan\"\ndefault_clip = \"tiny_clip\"\n\
             [models]\nallow_tiny = true\n\
             [models.tiny_vqgan]\npath = \"{fixtures}/ckpt/tiny_vqgan.ckpt\"\n\
             [models.tiny_clip]\npath = \"{fixtures}/parity/tiny_clip.safetensors\"\n"
        ),
    )
}

#[test]
fn imagine_writes_a_reproducible_png_with_its_record_and_time_lapse() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(&dir);
    let run = |out: &str| {
        vqclip(
            dir.path(),
            &[
                "--config",
                &config,
                "imagine",
                "a red fox:1 | snow:-0.5 --steps 3 --size 32x24 --cutn 3 --seed 11",
                "--out",
                out,
                "--gif",
                "fox.gif",
                "--previews",
                "previews",
                "--preview-every",
                "1",
            ],
            &[],
        )
    };
    let first = run("fox.png");
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    assert!(
        text(&first.stdout).contains("seed 11"),
        "{}",
        text(&first.stdout)
    );
    let png = std::fs::read(dir.path().join("fox.png")).unwrap();
    assert_eq!(
        image::load_from_memory(&png)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (32, 24)
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("fox.json")).unwrap())
            .unwrap();
    assert_eq!(record["spec"]["seed"], 11);
    assert_eq!(record["spec"]["prompts"][1]["weight"], -0.5);
    assert_eq!(record["vqgan"], "tiny_vqgan");
    assert!(
        std::fs::read(dir.path().join("fox.gif"))
            .unwrap()
            .starts_with(b"GIF89a")
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("previews"))
            .unwrap()
            .count(),
        3
    );

    let second = run("again.png");
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    assert_eq!(
        std::fs::read(dir.path().join("again.png")).unwrap(),
        png,
        "same job, same bytes, across processes"
    );
}

#[test]
fn imagine_explains_bad_requests_and_missing_models() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(&dir);
    let out = vqclip(
        dir.path(),
        &["--config", &config, "imagine", "a fox --steps many"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--steps takes a whole number"),
        "{}",
        text(&out.stderr)
    );

    let out = vqclip(
        dir.path(),
        &[
            "--config",
            &config,
            "imagine",
            "a fox",
            "--init-image",
            "missing.png",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("missing.png"),
        "{}",
        text(&out.stderr)
    );

    // The default models are not downloaded on this machine, and offline nothing fetches them.
    let out = vqclip(
        dir.path(),
        &["imagine", "a fox"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not downloaded")
            && stderr.contains("Somnai/pytti-vqgan-checkpoints")
            && stderr.contains("vqclip models download imagenet_f16_16384"),
        "{stderr}"
    );
}

/// A real 1×1 PNG whose header claims `width`×`height` (a few dozen bytes, any claimed size).
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = vqclip::engine::image::encode_png(&image::RgbImage::new(1, 1)).unwrap();
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[test]
fn hostile_inputs_get_clear_errors_and_never_abort_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(&dir);
    let run = |args: &[&str]| {
        let mut all = vec!["--config", config.as_str(), "imagine"];
        all.extend_from_slice(args);
        let out = vqclip(dir.path(), &all, &[]);
        (out.status.code(), text(&out.stderr))
    };
    // 64 Mi pixels in one row: once a 64 GiB allocation and an abort (exit 134).
    let strip = dir.path().join("strip.png");
    std::fs::write(&strip, png_claiming(67_108_864, 1)).unwrap();
    let small = ["--model", "tiny", "--steps", "1", "--size", "32x32"];
    for flag in ["--init-image", "--image-prompt"] {
        let mut args = vec!["a fox", flag, strip.to_str().unwrap()];
        args.extend_from_slice(&small);
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains("67108864x1") && stderr.contains("8192 pixels a side"),
            "{stderr}"
        );
    }
    // Endless and blocking files are refused, not read.
    for path in ["/dev/zero", dir.path().to_str().unwrap()] {
        let mut args = vec!["a fox", "--init-image", path];
        args.extend_from_slice(&small);
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("not a regular file"), "{stderr}");
    }
    // 12,000 prompt pieces: refused by length, no stack overflow.
    let pieces = "a|".repeat(12_000);
    let mut args = vec![pieces.as_str()];
    args.extend_from_slice(&small);
    let (code, stderr) = run(&args);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("the limit is 8192"), "{stderr}");
    // 64 pieces, the most allowed, run (the loss is one sum, not a 64-deep chain).
    let most = vec!["a fox"; 64].join(" | ");
    let out_png = dir.path().join("most.png");
    let mut args = vec![most.as_str(), "-o", out_png.to_str().unwrap()];
    args.extend_from_slice(&small);
    let (code, stderr) = run(&args);
    assert_eq!(code, Some(0), "{stderr}");
    // Em and en dashes from phones are flags, not prompt text.
    let dashed = dir.path().join("dashed.png");
    let (code, stderr) = run(&[
        "a fox —steps 1 –size 32x32 —model tiny",
        "-o",
        dashed.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("32x32, 1 steps"), "{stderr}");
    // Outputs that cannot be written are refused before any work.
    let (code, stderr) = run(&["a fox", "-o", "x.json", "--model", "tiny"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("overwritten by its own JSON record"),
        "{stderr}"
    );
    let (code, stderr) = run(&["a fox", "-o", "/missing/dir/x.png", "--model", "tiny"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("does not exist") && !stderr.contains("loading"),
        "{stderr}"
    );
}

#[test]
fn a_damaged_or_unreadable_database_is_named_not_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broken.sqlite");
    std::fs::write(&db, vec![0x5a; 8192]).unwrap();
    let db_text = db.display().to_string();
    let out = vqclip(
        dir.path(),
        &["jobs", "list"],
        &[("VQCLIP_STORAGE__DATABASE", db_text.as_str())],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("broken.sqlite") && stderr.contains("not a database"),
        "{stderr}"
    );
    assert!(!stderr.contains("timed out"), "{stderr}");
}

#[test]
fn imagine_runs_the_tiny_models_on_seeded_weights_with_no_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let run = |seed: &str, out: &str| {
        let prompt = format!("a red apple:1 | green:-0.5 --seed {seed}");
        vqclip(
            dir.path(),
            &[
                "imagine", &prompt, "--model", "tiny", "--steps", "3", "--size", "32x32", "--cutn",
                "2", "-o", out,
            ],
            &[],
        )
    };
    let a = run("7", "a.png");
    assert_eq!(a.status.code(), Some(0), "{}", text(&a.stderr));
    let b = run("7", "b.png");
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
    let c = run("8", "c.png");
    assert_eq!(c.status.code(), Some(0), "{}", text(&c.stderr));
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    assert!(read("a.png") == read("b.png"), "same seed, different bytes");
    assert!(read("a.png") != read("c.png"), "another seed, same bytes");
    let chunks = vqclip::engine::image::png_text(&read("a.png")).unwrap();
    let get = |key: &str| {
        chunks
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        get("prompt").as_deref(),
        Some("a red apple:1 | green:-0.5 --seed 7")
    );
    assert_eq!(get("seed").as_deref(), Some("7"));
    assert_eq!(get("models").as_deref(), Some("tiny_vqgan + tiny_clip"));
    assert_eq!(get("device").as_deref(), Some("cpu, CLIP in f32"));
    assert!(get("software").is_some_and(|s| s.starts_with("vqclip ")));
}

#[test]
fn imagine_refuses_prompts_with_nothing_to_aim_for_and_unknown_devices() {
    let dir = tempfile::tempdir().unwrap();
    let out = vqclip(
        dir.path(),
        &["imagine", "a:0 | b:0", "--model", "tiny", "--size", "32x32"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("weight 0"),
        "{}",
        text(&out.stderr)
    );
    let out = vqclip(
        dir.path(),
        &["imagine", "a fox", "--model", "tiny", "--device", "cuda:0"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--device: cuda:0 needs a build with CUDA support"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn models_list_shows_sources_and_what_is_here() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(&dir);
    let out = vqclip(dir.path(), &["--config", &config, "models", "list"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    let line = |id: &str| {
        listing
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} missing:\n{listing}"))
            .to_owned()
    };
    assert!(
        line("imagenet_f16_16384").contains("not downloaded"),
        "{listing}"
    );
    assert!(
        line("imagenet_f16_16384").contains("Somnai/pytti-vqgan-checkpoints"),
        "{listing}"
    );
    assert!(
        line("gumbel_f8_8192").contains(
            "openimages/openimages.ckpt @ debc22c8f285c7734980c464ff992d335dde6e9a, sha256 pinned"
        ),
        "{listing}"
    );
    assert!(
        line("imagenet_f16_1024").contains("none configured"),
        "{listing}"
    );
    assert!(
        line("tiny_vqgan").contains("yes") && line("tiny_vqgan").contains("tiny_vqgan.ckpt"),
        "{listing}"
    );
}

/// `vqclip ARGS` on a blocking thread, so a fake server in this test's runtime keeps serving.
async fn vqclip_async(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        vqclip(&dir, &args, &env)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_download_verify_and_imagine_fetch_from_the_hub() {
    let hub = crate::fake_hub::FakeHub::start().await;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let clip = std::fs::read(format!("{fixtures}/parity/tiny_clip.safetensors")).unwrap();
    hub.publish(
        "vqclip-test/tiny-clip",
        "main",
        "model.safetensors",
        clip.clone(),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &format!(
            "[models]\ncache_dir = \"cache\"\nhub_endpoint = \"{}\"\n\
             [models.tiny_clip]\nrepo = \"vqclip-test/tiny-clip\"\nfile = \"model.safetensors\"\n",
            hub.url
        ),
    );

    // First use: imagine downloads the CLIP it needs, then runs.
    let out = vqclip_async(
        dir.path(),
        &[
            "--config", &config, "imagine", "a fox", "--model", "tiny", "--steps", "1", "--size",
            "32x32", "--cutn", "1", "-o", "fox.png",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(dir.path().join("fox.png").is_file());
    let fetched = hub.answered();
    assert!(fetched > 0);

    // Already here: download has nothing to fetch and prints where the file is.
    let out = vqclip_async(
        dir.path(),
        &["--config", &config, "models", "download", "tiny_clip"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("tiny_clip: "),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(hub.answered(), fetched);

    let out = vqclip_async(
        dir.path(),
        &["--config", &config, "models", "verify", "tiny_clip"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("matches the Hub") && stdout.contains(&crate::fake_hub::sha256_hex(&clip)),
        "{stdout}"
    );

    // A blob changed on disk no longer verifies.
    let blob = dir
        .path()
        .join("cache/models--vqclip-test--tiny-clip/blobs")
        .join(crate::fake_hub::sha256_hex(&clip));
    let mut damaged = clip.clone();
    damaged[100] ^= 0xff;
    std::fs::write(&blob, damaged).unwrap();
    let out = vqclip_async(
        dir.path(),
        &["--config", &config, "models", "verify", "tiny_clip"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("DIFFERS"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("models download"),
        "{}",
        text(&out.stderr)
    );

    // Unknown names and missing files are errors that say so.
    let out = vqclip_async(
        dir.path(),
        &["--config", &config, "models", "download", "vit_b99"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unknown model \"vit_b99\""),
        "{}",
        text(&out.stderr)
    );
    let out = vqclip_async(
        dir.path(),
        &["--config", &config, "models", "download", "vit_b16"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("HTTP 404"),
        "{}",
        text(&out.stderr)
    );
}

/// OpenAI's CLIP ViT-B/16 and ViT-L/14@336 repositories publish only `pytorch_model.bin` (torch's
/// zip format, with int64 `position_ids` buffers beside the weights): such a file downloads and
/// draws exactly what the same weights as safetensors draw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clip_published_only_as_pytorch_model_bin_draws_as_its_safetensors_do() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let safetensors = format!("{fixtures}/parity/tiny_clip.safetensors");
    let mut tensors: Vec<_> =
        candle_core::safetensors::load(&safetensors, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, positions) in [
        ("text_model.embeddings.position_ids", 77),
        ("vision_model.embeddings.position_ids", 17),
    ] {
        let ids = candle_core::Tensor::arange(0i64, positions, &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        tensors.push((key.to_owned(), ids));
    }
    let bin = crate::torch_zip::state_dict_bin(&tensors);
    assert_eq!(&bin[..4], b"PK\x03\x04");
    let hub = crate::fake_hub::FakeHub::start().await;
    hub.publish(
        "vqclip-test/tiny-clip-bin",
        "main",
        "pytorch_model.bin",
        bin,
    );

    let dir = tempfile::tempdir().unwrap();
    let draw = |config: String, out: &'static str| {
        let dir = dir.path().to_path_buf();
        async move {
            let out = vqclip_async(
                &dir,
                &[
                    "--config", &config, "imagine", "a fox", "--model", "tiny", "--steps", "2",
                    "--size", "32x32", "--cutn", "2", "--seed", "7", "-o", out,
                ],
                &[],
            )
            .await;
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        }
    };
    let from_hub = write_config(
        &dir,
        &format!(
            "[models]\ncache_dir = \"cache\"\nhub_endpoint = \"{}\"\n\
             [models.tiny_clip]\nrepo = \"vqclip-test/tiny-clip-bin\"\nfile = \"pytorch_model.bin\"\n",
            hub.url
        ),
    );
    draw(from_hub, "bin.png").await;
    assert!(
        hub.log()
            .iter()
            .any(|seen| seen.file == "pytorch_model.bin"),
        "{:?}",
        hub.log()
    );
    let local = write_config(
        &dir,
        &format!("[models.tiny_clip]\npath = \"{safetensors}\"\n"),
    );
    draw(local, "safetensors.png").await;
    let bin_png = std::fs::read(dir.path().join("bin.png")).unwrap();
    let safetensors_png = std::fs::read(dir.path().join("safetensors.png")).unwrap();
    assert!(
        bin_png == safetensors_png,
        "the pytorch_model.bin CLIP drew another picture"
    );
}

/// `vqclip ARGS` started in the background, with the same clean environment as [`vqclip`]. Its
/// log goes to a file in `dir` (see [`background_logs`]): a pipe nobody reads fills up and blocks
/// the process at its next log line, heartbeat and all.
fn spawn_vqclip(dir: &Path, args: &[&str]) -> std::process::Child {
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let log = std::fs::File::create(dir.join(format!("background-{n}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("HOME", dir)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start vqclip")
}

/// The logs of every process [`spawn_vqclip`] started in `dir`, for a failing assertion's message.
fn background_logs(dir: &Path) -> String {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("background-") && n.ends_with(".log"))
        })
        .collect();
    logs.sort();
    logs.iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            format!("--- {} ---\n{text}", p.display())
        })
        .collect()
}

/// A configuration for `vqclip worker` tests: one CPU device, the tiny models from the fixtures,
/// quick polls, short leases.
fn worker_config(dir: &TempDir, database: &str, lease_seconds: u64) -> String {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    write_config(
        dir,
        &format!(
            "[storage]\ndatabase = \"{database}\"\nimages = \"images\"\n\
             [scheduler]\ndevices = [\"cpu\"]\npoll_interval_ms = 100\nshutdown_grace_seconds = 1\n\
             max_queued_per_user = 20\n\
             lease_seconds = {lease_seconds}\n\
             [generation]\ndefault_vqgan = \"tiny_vqgan\"\ndefault_clip = \"tiny_clip\"\n\
             [models]\nallow_tiny = true\n\
             [models.tiny_vqgan]\npath = \"{fixtures}/ckpt/tiny_vqgan.ckpt\"\n\
             [models.tiny_clip]\npath = \"{fixtures}/parity/tiny_clip.safetensors\"\n"
        ),
    )
}

/// `vqclip jobs submit PROMPT --user USER`, which must succeed; returns what it printed.
async fn submit_as(dir: &TempDir, config: &str, prompt: &str, user: u64) -> String {
    let user = user.to_string();
    let out = vqclip_async(
        dir.path(),
        &[
            "--config", config, "jobs", "submit", prompt, "--user", &user,
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Statuses of all jobs, by id.
async fn statuses(db: &Path) -> Vec<(i64, jobs::JobStatus)> {
    let pool = store::connect(&store::Location::Sqlite(db.to_path_buf()))
        .await
        .unwrap();
    let list = jobs::list_recent_jobs(&pool, None, 100).await.unwrap();
    pool.close().await;
    let mut out: Vec<_> = list.iter().map(|j| (j.id.0, j.status)).collect();
    out.sort_by_key(|(id, _)| *id);
    out
}

async fn wait_for_statuses(
    db: &Path,
    what: &str,
    done: impl Fn(&[(i64, jobs::JobStatus)]) -> bool,
) -> Vec<(i64, jobs::JobStatus)> {
    // Generous: on a loaded 2-core machine a debug-built worker takes seconds per tiny job (one
    // CI run timed out at 60 s with two jobs left).
    for _ in 0..4800 {
        let now = statuses(db).await;
        if done(&now) {
            return now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}: {:?}", statuses(db).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_finishes_everything_after_a_restart() {
    use jobs::JobStatus::{Running, Succeeded};
    let dir = tempfile::tempdir().unwrap();
    let config = worker_config(&dir, "db/jobs.sqlite", 2);
    for user in 1..=5 {
        let prompt = format!("a lantern number {user} --steps 20 --size 32x32 --cutn 2");
        let out = submit_as(&dir, &config, &prompt, user).await;
        assert!(out.contains("queued"), "{out}");
    }
    let db = dir.path().join("db/jobs.sqlite");

    let mut first = spawn_vqclip(dir.path(), &["--config", &config, "worker"]);
    wait_for_statuses(&db, "one job done and one running", |s| {
        s.iter().any(|(_, st)| *st == Succeeded) && s.iter().any(|(_, st)| *st == Running)
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no chance to clean up
    first.wait().unwrap();
    let after_kill = statuses(&db).await;
    assert!(
        after_kill.iter().any(|(_, st)| *st == Running),
        "a job was left running: {after_kill:?}"
    );

    let mut second = spawn_vqclip(dir.path(), &["--config", &config, "worker"]);
    let all = wait_for_statuses(&db, "all five succeeded", |s| {
        s.len() == 5 && s.iter().all(|(_, st)| *st == Succeeded)
    })
    .await;
    for (id, _) in &all {
        let image = dir.path().join(format!("images/{id}.png"));
        let bytes = std::fs::read(&image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
        let chunks = vqclip::engine::image::png_text(&bytes).unwrap();
        assert!(
            chunks
                .iter()
                .any(|(k, v)| k == "prompt" && v.starts_with("a lantern number")),
            "{chunks:?}"
        );
    }
    // A polite stop ends the worker cleanly.
    let pid = second.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = second.wait().unwrap();
    assert_eq!(status.code(), Some(0));

    let out = vqclip_async(dir.path(), &["--config", &config, "jobs", "show", "1"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("succeeded") && shown.contains("vqclip imagine") && shown.contains("cpu"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cancel_and_show_explain_what_they_did() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        "[storage]\ndatabase = \"jobs.sqlite\"\n[models]\nallow_tiny = true\n",
    );
    let out = vqclip_async(
        dir.path(),
        &["--config", &config, "jobs", "submit", "a fox --model tiny"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = vqclip_async(
        dir.path(),
        &["--config", &config, "jobs", "cancel", "1"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("job 1 cancelled"));
    let out = vqclip_async(
        dir.path(),
        &["--config", &config, "jobs", "cancel", "1"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already cancelled"),
        "{}",
        text(&out.stderr)
    );
    let out = vqclip_async(dir.path(), &["--config", &config, "jobs", "show", "7"], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no job 7"),
        "{}",
        text(&out.stderr)
    );
    // Without allow_tiny, the test models are refused.
    let strict = write_config(&dir, "[storage]\ndatabase = \"jobs.sqlite\"\n");
    let out = vqclip_async(
        dir.path(),
        &["--config", &strict, "jobs", "submit", "a fox --model tiny"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
}

/// Every job in a PostgreSQL database, oldest first.
async fn all_jobs(db: &store::Store) -> Vec<jobs::Job> {
    let mut list = jobs::list_recent_jobs(db, None, 1000).await.unwrap();
    list.reverse();
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_postgres_run_thirty_jobs_exactly_once_across_a_sigkill() {
    use jobs::JobStatus::{Running, Succeeded};
    let url = crate::postgres::new_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = worker_config(&dir, url.as_str(), 4);
    // Three users queue ten jobs each, one user after the other: fairness has to interleave them.
    for user in 1..=3 {
        for n in 0..10 {
            let prompt = format!("lantern {user}.{n} --steps 6 --size 32x32 --cutn 2");
            submit_as(&dir, &config, &prompt, user).await;
        }
    }
    let db = store::connect(&store::Location::Postgres(url.clone()))
        .await
        .unwrap();
    assert_eq!(all_jobs(&db).await.len(), 30);

    let mut workers: Vec<_> = (0..3)
        .map(|_| spawn_vqclip(dir.path(), &["--config", &config, "worker"]))
        .collect();
    // Kill the second worker (SIGKILL: no goodbye, its lease just stops being renewed) while it
    // runs a job, once some jobs are done.
    let victim = workers[1].id();
    let marker = format!("-{victim}-");
    let mut killed_job = None;
    for _ in 0..4800 {
        let list = all_jobs(&db).await;
        let done = list.iter().filter(|j| j.status == Succeeded).count();
        if let Some(job) = list.iter().find(|j| {
            j.status == Running && j.worker.as_deref().is_some_and(|w| w.contains(&marker))
        }) && done >= 3
        {
            killed_job = Some(job.id);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let killed_at = store::Timestamp::now();
    workers[1].kill().unwrap();
    workers[1].wait().unwrap();
    let killed_job = killed_job.expect("the second worker ran a job");
    let victim_id = jobs::get_job(&db, killed_job)
        .await
        .unwrap()
        .unwrap()
        .worker
        .unwrap();

    let mut finished = Vec::new();
    for _ in 0..4800 {
        finished = all_jobs(&db).await;
        if finished.iter().all(|j| j.status == Succeeded) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let unfinished: Vec<_> = finished
        .iter()
        .filter(|j| j.status != Succeeded)
        .map(|j| (j.id.0, j.status, j.attempts, j.lost_runs, j.error.clone()))
        .collect();
    assert!(
        unfinished.is_empty(),
        "not all succeeded: {unfinished:?}\n{}",
        background_logs(dir.path())
    );
    for job in &finished {
        assert!(dir.path().join(format!("images/{}.png", job.id)).is_file());
        if job.id == killed_job {
            assert_ne!(job.worker.as_deref(), Some(victim_id.as_str()));
            assert_eq!(
                job.attempts, 2,
                "the killed worker's job ran again elsewhere"
            );
        } else {
            assert_eq!(job.attempts, 1, "job {} ran once", job.id);
        }
    }
    // Fairness, as a claim defines it: until the kill, each job went to the user served longest
    // ago among those with jobs waiting and none running (the cap is one running job each).
    // Users take turns only while none is at the cap: a worker that frees up while the others
    // still run their users' jobs rightly serves the same user again, so how far one user gets
    // ahead depends on how fast each worker is, and is not checked. The killed job's owner is
    // left out as a rival: its first run's start is overwritten by the second.
    let mut order: Vec<_> = finished.iter().filter(|j| j.id != killed_job).collect();
    order.sort_by_key(|j| j.started_at);
    let killed_owner = finished
        .iter()
        .find(|j| j.id == killed_job)
        .unwrap()
        .requester_id;
    let before: Vec<_> = order
        .iter()
        .filter(|j| j.started_at.unwrap() <= killed_at)
        .collect();
    for (i, job) in before.iter().enumerate() {
        let at = job.started_at.unwrap();
        let last_served = |user: u64| {
            before[..i]
                .iter()
                .filter(|j| j.requester_id == user)
                .map(|j| j.started_at.unwrap())
                .max()
        };
        for rival in (1..=3).filter(|&u| u != job.requester_id && u != killed_owner) {
            let waiting = order
                .iter()
                .any(|j| j.requester_id == rival && j.started_at.unwrap() > at);
            let running = order.iter().any(|j| {
                j.requester_id == rival
                    && j.started_at.unwrap() <= at
                    && j.finished_at.is_some_and(|end| end >= at)
            });
            if waiting && !running {
                assert!(
                    last_served(rival) >= last_served(job.requester_id),
                    "job {} of user {} went ahead of user {rival}, who waited and was served \
                     longer ago",
                    job.id,
                    job.requester_id
                );
            }
        }
    }
    // And every user's jobs ran in the order they were queued.
    for user in 1..=3 {
        let ids: Vec<i64> = order
            .iter()
            .filter(|j| j.requester_id == user)
            .map(|j| j.id.0)
            .collect();
        assert!(ids.is_sorted(), "user {user}'s jobs out of order: {ids:?}");
    }

    // The killed worker shows as lost (its last heartbeat is older than a lease), the others as
    // live; a polite stop shows as stopped.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let out = vqclip_async(dir.path(), &["--config", &config, "workers"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    let line_of = |id: &str| {
        listing
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} missing from {listing}"))
            .to_owned()
    };
    assert!(line_of(&victim_id).starts_with("LOST"), "{listing}");
    assert_eq!(
        listing.lines().filter(|l| l.starts_with("live")).count(),
        2,
        "{listing}"
    );
    for (i, worker) in workers.iter_mut().enumerate() {
        if i == 1 {
            continue;
        }
        Command::new("kill")
            .args(["-TERM", &worker.id().to_string()])
            .status()
            .unwrap();
        assert_eq!(worker.wait().unwrap().code(), Some(0));
    }
    let out = vqclip_async(dir.path(), &["--config", &config, "workers"], &[]).await;
    let listing = text(&out.stdout);
    assert_eq!(
        listing.lines().filter(|l| l.starts_with("stopped")).count(),
        2,
        "{listing}"
    );
    db.close().await;
}

/// Waits until job 1 is as `done` says.
async fn wait_for_job(db: &Path, what: &str, done: impl Fn(&jobs::Job) -> bool) {
    for _ in 0..4800 {
        let pool = store::connect(&store::Location::Sqlite(db.to_path_buf()))
            .await
            .unwrap();
        let job = jobs::get_job(&pool, store::JobId(1)).await.unwrap();
        pool.close().await;
        if job.as_ref().is_some_and(&done) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The arguments a command line gives `vqclip`, as a stub `vqclip` first on `PATH` records them
/// when `sh` runs the line.
fn arguments_through_sh(dir: &Path, line: &str) -> Vec<String> {
    let bin = dir.join("stub-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let stub = bin.join("vqclip");
    std::fs::write(
        &stub,
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done > \"$STUB_OUT\"\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&stub).status().unwrap();
    let out = dir.join("stub-args");
    let status = Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(dir)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("STUB_OUT", &out)
        .status()
        .unwrap();
    assert!(status.success(), "sh -c {line:?}: {status}");
    let bytes = std::fs::read(&out).unwrap();
    let mut args: Vec<String> = bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8(a.to_vec()).unwrap())
        .collect();
    assert_eq!(args.pop().as_deref(), Some(""), "NUL-terminated");
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_again_line_is_shell_safe_and_makes_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let config = worker_config(&dir, "jobs.sqlite", 5);
    // Everything a stranger could put in a prompt to run code in a shell that pastes it.
    let prompt = "-rf $(touch PWNED1) `touch PWNED2` it's \"quoted\" \\ ; & && ~ * !! $HOME \
                  | > PWNED3 --steps 6 --size 32x32 --cutn 2";
    let settings = vqclip::config::Settings::load(
        Some(Path::new(&config)),
        &[("HOME", dir.path().to_str().unwrap())]
            .into_iter()
            .collect(),
    )
    .unwrap();
    let options = vqclip::request::ImagineOptions {
        seed: Some(5),
        crops: true,
        method: vqclip::engine::prompt::MethodFlags {
            learning_rate: Some(0.05),
            optimizer: Some(vqclip::engine::optimize::Optimizer::DiffGrad),
            ema: Some(0.9),
            init_weight: Some(2.0),
            ..Default::default()
        },
        ..Default::default()
    };
    let resolved = vqclip::request::resolve(
        prompt,
        &options,
        &settings.generation,
        true,
        vqclip::request::AutoDefaults::CPU,
        &vqclip::engine::nets::tokenizer::ClipTokenizer::new(),
    )
    .unwrap();
    let origin = vqclip::jobs::Origin {
        requester: 1,
        guild: None,
        channel: None,
    };
    let (mut job, mut params) = vqclip::jobs::imagine_job(prompt, &resolved, origin).unwrap();
    // Inputs as the bot stores them: an init image and an image prompt, both with awkward
    // names, and noise prompts.
    let inputs = dir.path().join("in puts");
    std::fs::create_dir_all(&inputs).unwrap();
    let init = inputs.join("it's $(init).png");
    let aim = inputs.join("aim.png");
    let picture = |seed: u8| {
        image::RgbImage::from_fn(40, 24, |x, y| {
            image::Rgb([x as u8 * 6, y as u8 * 10, seed.wrapping_mul(40)])
        })
    };
    picture(1).save(&init).unwrap();
    picture(2).save(&aim).unwrap();
    params.inputs.init_image = Some(init.clone());
    params.inputs.image_prompts = vec![(aim.clone(), 1.0, None)];
    params.spec.noise_prompts = vec![0.5, -0.25];
    job.params = serde_json::to_value(&params).unwrap();
    let pool = store::connect(&store::Location::Sqlite(dir.path().join("jobs.sqlite")))
        .await
        .unwrap();
    store::migrate(&pool).await.unwrap();
    let id = jobs::insert_job(&pool, &job).await.unwrap();
    pool.close().await;

    let db = dir.path().join("jobs.sqlite");
    let mut worker = spawn_vqclip(dir.path(), &["--config", &config, "worker"]);
    wait_for_statuses(&db, "the job done", |s| {
        s.iter().all(|(_, st)| st.is_finished())
    })
    .await;
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    worker.wait().unwrap();
    assert_eq!(statuses(&db).await, [(id.0, jobs::JobStatus::Succeeded)]);

    let out = vqclip_async(
        dir.path(),
        &["--config", &config, "jobs", "show", &id.to_string()],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let again = shown
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("again"))
        .unwrap_or_else(|| panic!("{shown}"))
        .trim();
    let args = arguments_through_sh(dir.path(), again);
    for name in ["PWNED1", "PWNED2", "PWNED3"] {
        assert!(
            !dir.path().join(name).exists(),
            "{name} was created by {again}"
        );
    }
    let expected: Vec<String> = [
        "imagine",
        "--seed",
        "5",
        "--steps",
        "6",
        "--size",
        "32x32",
        "--cutn",
        "2",
        "--model",
        "tiny_vqgan",
        "--clip",
        "tiny_clip",
        "--crops",
        "--noise-prompt=0.5",
        "--noise-prompt=-0.25",
        "--lr=0.05",
        "--optimizer=diffgrad",
        "--ema=0.9",
        "--init-weight=2",
        "--init-image",
        init.to_str().unwrap(),
        "--image-prompt",
        aim.to_str().unwrap(),
        "--",
        prompt,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(args, expected, "{again}");

    // The same line with the real vqclip first on PATH makes the same picture.
    let real = dir.path().join("real-bin");
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vqclip"), real.join("vqclip")).unwrap();
    let run = Command::new("sh")
        .arg("-c")
        .arg(again)
        .current_dir(dir.path())
        .env_clear()
        .env("HOME", dir.path())
        .env("VQCLIP_CONFIG", &config)
        .env("PATH", format!("{}:/usr/bin:/bin", real.display()))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run.stderr));
    let made = image::open(dir.path().join("vqclip-5.png"))
        .unwrap()
        .to_rgb8();
    let original = image::open(dir.path().join(format!("images/{id}.png")))
        .unwrap()
        .to_rgb8();
    assert_eq!(made.dimensions(), (32, 32));
    assert!(made == original, "the again line made a different picture");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_is_killed_three_times_fails_and_the_queue_moves_on() {
    use jobs::JobStatus::{Failed, Running, Succeeded};
    let dir = tempfile::tempdir().unwrap();
    let config = worker_config(&dir, "jobs.sqlite", 1);
    // One long job, then a short one of the same user (served in order behind it).
    submit_as(
        &dir,
        &config,
        "a poison pill --steps 1000 --size 64x64 --cutn 4",
        1,
    )
    .await;
    submit_as(
        &dir,
        &config,
        "a fine job --steps 4 --size 32x32 --cutn 2",
        1,
    )
    .await;
    let db = dir.path().join("jobs.sqlite");
    for kill in 1..=3 {
        let mut worker = spawn_vqclip(dir.path(), &["--config", &config, "worker"]);
        // Claimed by this worker (its `kill`th claim: the row of a killed worker stays running
        // until its lease runs out) and past its first step.
        wait_for_job(&db, &format!("job 1 running (run {kill})"), |job| {
            job.status == Running && job.attempts == kill && job.iteration >= 1
        })
        .await;
        // As an abort or the OOM killer would: no chance to clean up.
        worker.kill().unwrap();
        worker.wait().unwrap();
    }
    let mut worker = spawn_vqclip(dir.path(), &["--config", &config, "worker"]);
    let all = wait_for_statuses(&db, "job 1 failed and job 2 done", |s| {
        s.iter().all(|(_, st)| st.is_finished())
    })
    .await;
    assert_eq!(all, [(1, Failed), (2, Succeeded)]);
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    let pool = store::connect(&store::Location::Sqlite(db.clone()))
        .await
        .unwrap();
    let poisoned = jobs::get_job(&pool, store::JobId(1))
        .await
        .unwrap()
        .unwrap();
    pool.close().await;
    assert_eq!((poisoned.lost_runs, poisoned.attempts), (3, 3));
    let error = poisoned.error.unwrap();
    assert!(error.contains("the worker stopped 3 times"), "{error}");
}

/// SIGTERM while a worker is still starting (opening its database, claiming its first job)
/// stops it gracefully: the handler is in place before the process touches the database, so
/// the default action never kills it half-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_asked_to_stop_while_it_starts_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = worker_config(&dir, "jobs.sqlite", 5);
    submit_as(
        &dir,
        &config,
        "a short walk --steps 1000 --size 32x32 --cutn 2",
        1,
    )
    .await;
    for attempt in 0..3 {
        let before = std::fs::metadata(dir.path().join("jobs.sqlite-wal"))
            .and_then(|m| m.modified())
            .ok();
        let mut worker = spawn_vqclip(dir.path(), &["--config", &config, "worker"]);
        // The first sign of the worker opening the database: its write-ahead log changes.
        let mut touched = false;
        for _ in 0..60_000 {
            let now = std::fs::metadata(dir.path().join("jobs.sqlite-wal"))
                .and_then(|m| m.modified())
                .ok();
            if now.is_some() && now != before {
                touched = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            touched,
            "attempt {attempt}: {}",
            background_logs(dir.path())
        );
        Command::new("kill")
            .args(["-TERM", &worker.id().to_string()])
            .status()
            .unwrap();
        let status = worker.wait().unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "attempt {attempt}: {status:?}\n{}",
            background_logs(dir.path())
        );
    }
}

/// PostgreSQL goes away under a worker that is running a job: the worker's log names the cause
/// and the database, SIGTERM still ends it promptly (it does not queue its polls and writes
/// behind the pool's acquire timeout), and when the server is back the job is recovered and
/// claimed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_database_went_away_says_why_and_stops_on_sigterm() {
    let server = crate::postgres::PrivateServer::start();
    let url = server.new_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = worker_config(&dir, url.as_str(), 4);
    submit_as(
        &dir,
        &config,
        "a long walk --steps 1000 --size 32x32 --cutn 2",
        1,
    )
    .await;
    let db = store::connect(&store::Location::Postgres(url.clone()))
        .await
        .unwrap();
    let mut worker = spawn_vqclip(dir.path(), &["--config", &config, "worker"]);
    let running = |job: &jobs::Job| job.status == jobs::JobStatus::Running && job.iteration > 0;
    let mut started = false;
    for _ in 0..4800 {
        if jobs::get_job(&db, store::JobId(1))
            .await
            .unwrap()
            .is_some_and(|job| running(&job))
        {
            started = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(started, "{}", background_logs(dir.path()));
    db.close().await;

    server.stop();
    // The worker's next database calls time out in the pool; the log says why, with the
    // database's address.
    let cause = format!(
        "cannot reach the PostgreSQL database {}",
        store::Location::Postgres(url.clone())
    );
    let mut said = false;
    for _ in 0..1200 {
        let logs = background_logs(dir.path());
        if logs.contains(&cause) && logs.contains("Connection refused") {
            said = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(said, "{}", background_logs(dir.path()));
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    // Generous for a loaded machine; before, the process took minutes, one acquire timeout
    // after another.
    let mut code = None;
    for _ in 0..600 {
        if let Some(status) = worker.try_wait().unwrap() {
            code = Some(status.code());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if code.is_none() {
        worker.kill().unwrap();
    }
    assert_eq!(code, Some(Some(0)), "{}", background_logs(dir.path()));

    // The server is back: the run the stopped worker could not hand back is recovered when its
    // lease is found expired, and another worker takes the job.
    server.start_again();
    let db = store::connect(&store::Location::Postgres(url.clone()))
        .await
        .unwrap();
    let mut worker = spawn_vqclip(dir.path(), &["--config", &config, "worker"]);
    let mut again = None;
    for _ in 0..4800 {
        let job = jobs::get_job(&db, store::JobId(1)).await.unwrap().unwrap();
        if job.attempts == 2 && job.status == jobs::JobStatus::Running {
            again = Some(job);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let again = again.unwrap_or_else(|| panic!("{}", background_logs(dir.path())));
    assert_eq!(again.lost_runs, 1);
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    db.close().await;
}

/// `vqclip selftest` passes on the repository's parity cases, one line per case with its worst
/// error against the tolerance, and fails — naming the tensor — on a copy whose reference
/// gradient was changed.
#[test]
fn selftest_passes_on_the_parity_cases_and_fails_on_a_corrupted_one() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parity");
    let dir = tempfile::tempdir().unwrap();
    let out = vqclip(
        dir.path(),
        &["selftest", "--device", "cpu", "--fixtures", fixtures],
        &[],
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for case in [
        "tiny_adamw",
        "tiny_diffgrad",
        "tiny_encode",
        "tiny_multiprompt",
        "tiny_step",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(case))
            .unwrap_or_else(|| panic!("no line for {case}: {stdout}"));
        assert!(
            line.contains(" ok ") && line.contains("of its tolerance"),
            "{line}"
        );
    }

    // A copy of one case with one value of the reference's gradient at z changed.
    let copy = dir.path().join("cases");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(fixtures).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors")
            && !name.starts_with("tiny_step")
            && !["tiny_vqgan.safetensors", "tiny_clip.safetensors"].contains(&name.as_str())
            || name.ends_with(".json") && name != "tiny_step.json"
        {
            continue;
        }
        std::fs::copy(&path, copy.join(&name)).unwrap();
    }
    let tensors = copy.join("tiny_step.safetensors");
    let mut bytes = std::fs::read(&tensors).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header["grad_z"]["dtype"], "F32");
    let start = 8 + header_len + header["grad_z"]["data_offsets"][0].as_u64().unwrap() as usize;
    let value = f32::from_le_bytes(bytes[start..start + 4].try_into().unwrap());
    bytes[start..start + 4].copy_from_slice(&(value + 1.0).to_le_bytes());
    std::fs::write(&tensors, bytes).unwrap();
    let out = vqclip(
        dir.path(),
        &[
            "selftest",
            "--device",
            "cpu",
            "--fixtures",
            copy.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let line = stdout.lines().find(|l| l.contains("tiny_step")).unwrap();
    assert!(line.contains("FAILED"), "{stdout}");
    assert!(stdout.contains("grad_z: 1 of"), "{stdout}");
    assert!(
        text(&out.stderr).contains("1 of 1 runs failed"),
        "{}",
        text(&out.stderr)
    );
}
