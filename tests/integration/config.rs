//! The shipped `config.toml.example` against the code's defaults.

use std::path::Path;

use vqclip::config::{Environment, Settings};

fn example_path() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example"))
}

fn test_env() -> Environment {
    [("HOME", "/home/test")].into_iter().collect()
}

#[test]
fn example_states_exactly_the_defaults() {
    let example = Settings::load(Some(example_path()), &test_env()).expect("example is valid");
    let defaults = Settings::from_toml("", &test_env()).expect("defaults are valid");
    assert_eq!(example.to_redacted_toml(), defaults.to_redacted_toml());
}

#[test]
fn example_lists_every_key() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let example: toml::Table = toml::from_str(&text).unwrap();
    let defaults: toml::Table = toml::from_str(
        &Settings::from_toml("", &test_env())
            .unwrap()
            .to_redacted_toml(),
    )
    .unwrap();
    for (section, keys) in &defaults {
        let keys = keys.as_table().expect("sections are tables");
        let in_example = example[section].as_table().expect("section in the example");
        for (key, value) in keys {
            // Per-model tables are optional overrides, documented in comments.
            if value.is_table() {
                continue;
            }
            assert!(
                in_example.contains_key(key),
                "{section}.{key} missing from the example"
            );
            let comment = format!("\n{key} = ");
            let line = text
                .find(&comment)
                .unwrap_or_else(|| panic!("{key} not at a line start"));
            assert!(
                text[..line]
                    .trim_end()
                    .lines()
                    .last()
                    .unwrap_or("")
                    .starts_with('#'),
                "{section}.{key} has no comment line above it"
            );
        }
    }
}
