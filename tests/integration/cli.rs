//! The `vqclip` binary as a user runs it: exit codes, messages, files created.

use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;
use vqclip::store::{self, jobs};

use crate::support::sample_job;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");

/// `vqclip ARGS` in `dir` with only the environment given (plus HOME), so the developer's own
/// variables and config.toml cannot leak into a test.
fn vqclip(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("HOME", dir)
        .envs(env.iter().copied())
        .output()
        .expect("run vqclip")
}

fn text(bytes: &[u8]) -> String {
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
    let env = [("DISCORD_TOKEN", secret), ("RUST_LOG", "trace")];
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
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("DISCORD_TOKEN"),
        "{}",
        text(&out.stderr)
    );

    let out = vqclip(dir.path(), &["serve"], &[("DISCORD_TOKEN", "a.b.c")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("does not include the Discord bot"),
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
        text(&out.stdout).contains("applied migration 1"),
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

    let pool = store::connect(&db).await.unwrap();
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
