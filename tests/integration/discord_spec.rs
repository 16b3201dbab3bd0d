//! Discord's own OpenAPI description (`tests/fixtures/discord-api/openapi.json`, MIT) as the judge of
//! every request body the bot sends to the fake Discord: each JSON body (or multipart
//! `payload_json`) is validated against its operation's request schema, with the quirks Discord's
//! spec repository and docs list (int-parseable strings accepted where integers are; integer ids
//! of new-attachment placeholders; `content` at most 2000 characters, as the docs say).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Value, json};

/// Where the spec lives: the workspace's shared copy, or one named by `DISCORD_OPENAPI`.
fn spec_path() -> std::path::PathBuf {
    std::env::var_os("DISCORD_OPENAPI").map_or_else(
        || {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/discord-api/openapi.json")
        },
        Into::into,
    )
}

/// The spec, with the documented quirks folded into its schemas.
fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = spec_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("Discord's OpenAPI spec at {}: {e}", path.display()));
        let mut spec: Value = serde_json::from_str(&text).expect("the spec is JSON");
        relax(&mut spec);
        let snowflake = &mut spec["components"]["schemas"]["SnowflakeType"];
        *snowflake = json!({ "anyOf": [snowflake.take(), { "type": "integer", "minimum": 0 }] });
        spec
    })
}

/// Lets every integer schema accept an int-parseable string too, as Discord does.
fn relax(node: &mut Value) {
    match node {
        Value::Object(map) => {
            for value in map.values_mut() {
                relax(value);
            }
            let integer = match map.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(types)) => types.iter().any(|t| t == "integer"),
                _ => false,
            };
            if integer {
                let original = Value::Object(std::mem::take(map));
                map.insert(
                    "anyOf".into(),
                    json!([original, { "type": "string", "pattern": "^-?[0-9]+$" }]),
                );
            }
        }
        Value::Array(items) => items.iter_mut().for_each(relax),
        _ => {}
    }
}

/// Whether `template` (`/channels/{channel_id}/messages`) matches the request's path segments.
fn matches(template: &str, parts: &[&str]) -> bool {
    let segments: Vec<&str> = template.trim_start_matches('/').split('/').collect();
    segments.len() == parts.len()
        && segments
            .iter()
            .zip(parts)
            .all(|(s, p)| (s.starts_with('{') && s.ends_with('}')) || s == p)
}

type Validators = HashMap<(String, String), Option<Arc<jsonschema::Validator>>>;

/// The request-body validator of `method` on the operation matching `parts`; `Err` when the spec
/// has no such operation, `Ok(None)` when it takes no body.
fn validator(method: &str, parts: &[&str]) -> Result<Option<Arc<jsonschema::Validator>>, String> {
    static CACHE: OnceLock<Mutex<Validators>> = OnceLock::new();
    let spec = spec();
    let method = method.to_ascii_lowercase();
    let Some((template, operation)) = spec["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(t, _)| matches(t, parts))
        // A literal segment beats a parameter (`@original` over `{message_id}`).
        .min_by_key(|(t, _)| t.matches('{').count())
        .map(|(t, item)| (t.clone(), item[&method].clone()))
        .filter(|(_, op)| op.is_object())
    else {
        return Err(format!(
            "Discord's spec has no {} /{}",
            method.to_uppercase(),
            parts.join("/")
        ));
    };
    let key = (method, template);
    let mut cache = CACHE.get_or_init(Mutex::default).lock().unwrap();
    if let Some(found) = cache.get(&key) {
        return Ok(found.clone());
    }
    let compiled = operation["requestBody"]["content"]["application/json"]["schema"]
        .as_object()
        .map(|schema| {
            // The operation's schema with the spec's components beside it, so its
            // `#/components/...` references resolve within one document.
            let document = json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "components": spec["components"],
                "allOf": [Value::Object(schema.clone())],
            });
            Arc::new(jsonschema::draft202012::new(&document).expect("the spec's schemas compile"))
        });
    cache.insert(key, compiled.clone());
    Ok(compiled)
}

/// Discord's documented limit on message content (the spec says 4000).
const CONTENT_LIMIT: usize = 2000;

/// Every way `body`, sent as `method` to the path `parts`, breaks Discord's spec (empty: none).
pub fn violations(method: &str, parts: &[&str], body: &Value) -> Vec<String> {
    let validator = match validator(method, parts) {
        Ok(v) => v,
        // The fake's own helper routes (attachment downloads) are not Discord's API.
        Err(_) if parts.first() == Some(&"attachments") => return Vec::new(),
        Err(e) => return vec![e],
    };
    let mut found = Vec::new();
    match (&validator, body) {
        (Some(validator), body) if !body.is_null() => {
            for error in validator.iter_errors(body) {
                found.push(format!("{} at {}", error, error.instance_path()));
            }
        }
        (Some(_), _) if method != "DELETE" => {
            found.push("a body is expected".to_owned());
        }
        _ => {}
    }
    for content in [&body["content"], &body["data"]["content"]] {
        if let Some(text) = content.as_str()
            && text.chars().count() > CONTENT_LIMIT
        {
            found.push(format!(
                "content has {} characters; Discord allows {CONTENT_LIMIT}",
                text.chars().count()
            ));
        }
    }
    found
}

#[test]
fn the_validator_knows_good_from_bad_bodies() {
    let ok = json!({ "content": "hello", "allowed_mentions": { "parse": [] } });
    assert_eq!(
        violations("POST", &["channels", "900", "messages"], &ok),
        Vec::<String>::new()
    );
    let bad = json!({ "content": 5, "embeds": "nope" });
    assert!(!violations("POST", &["channels", "900", "messages"], &bad).is_empty());
    let long = json!({ "content": "x".repeat(2001) });
    assert!(
        violations(
            "PATCH",
            &["webhooks", "1", "tok", "messages", "@original"],
            &long
        )
        .iter()
        .any(|v| v.contains("2000"))
    );
    // Quirks: an integer placeholder id for a new attachment; a number as a digit string.
    let upload = json!({ "attachments": [{ "id": 0, "filename": "a.png" }], "flags": "64" });
    assert_eq!(
        violations("PATCH", &["channels", "900", "messages", "5"], &upload),
        Vec::<String>::new()
    );
    let callback = json!({ "type": 4, "data": { "content": "hi", "flags": 64 } });
    assert_eq!(
        violations("POST", &["interactions", "1", "tok", "callback"], &callback),
        Vec::<String>::new()
    );
    assert!(
        !violations(
            "POST",
            &["interactions", "1", "tok", "callback"],
            &json!({ "type": "x" })
        )
        .is_empty()
    );
    assert!(!violations("POST", &["no", "such", "route"], &json!({})).is_empty());
}
