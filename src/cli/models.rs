//! `vqclip models list | download | verify`: where each model's weights come from, fetching
//! them, and checking them against the Hub.

use super::{ModelSelection, settings_for};
use crate::config::{Environment, Settings};
use crate::models::ModelInfo;
use crate::models::hub::{BarProgress, Hub, HubError};
use crate::models::weights;
use anyhow::Context as _;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use std::path::Path;

pub(super) fn models_list(config: Option<&Path>, env: &Environment) -> anyhow::Result<()> {
    let settings = settings_for(config, env, "list models")?;
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(["model", "kind", "source", "here", "about"]);
    for model in crate::models::CATALOGUE {
        let source = match settings.models.source(model) {
            Some(crate::config::ModelSource::Local { path }) => path.display().to_string(),
            Some(crate::config::ModelSource::Hub {
                repo,
                file,
                revision,
                sha256,
            }) => {
                let pinned = if sha256.is_some() {
                    ", sha256 pinned"
                } else {
                    ""
                };
                format!("{repo} {file} @ {revision}{pinned}")
            }
            None if model.tiny => "seeded random weights".to_owned(),
            None => "none configured".to_owned(),
        };
        let here = match weights::resolve(&settings.models, model) {
            Ok(_) => "yes",
            Err(_) if model.tiny => "built in",
            Err(weights::WeightsError::NotCached { .. }) => "not downloaded",
            Err(_) => "no",
        };
        table.add_row([
            model.id,
            &model.kind.to_string(),
            &source,
            here,
            model.description,
        ]);
    }
    println!("{table}");
    println!("cache: {}", settings.models.cache_dir.display());
    Ok(())
}

/// The models a `download`/`verify` selection names: those given, every one for `--all`, or the
/// configured defaults.
pub(super) fn select_models(
    settings: &Settings,
    selection: &ModelSelection,
) -> anyhow::Result<Vec<&'static ModelInfo>> {
    if selection.all {
        return Ok(crate::models::CATALOGUE.iter().collect());
    }
    if selection.models.is_empty() {
        return Ok(vec![
            settings.generation.default_vqgan,
            settings.generation.default_clip,
        ]);
    }
    selection
        .models
        .iter()
        .map(|name| {
            crate::models::find(name).with_context(|| {
                let ids: Vec<&str> = crate::models::CATALOGUE.iter().map(|m| m.id).collect();
                format!("unknown model {name:?}; known: {}", ids.join(", "))
            })
        })
        .collect()
}

pub(super) async fn models_download(
    config: Option<&Path>,
    env: &Environment,
    selection: &ModelSelection,
) -> anyhow::Result<()> {
    let settings = settings_for(config, env, "download")?;
    let hub = Hub::new(&settings.models)?;
    let mut failed = 0;
    for model in select_models(&settings, selection)? {
        let downloadable = matches!(
            settings.models.source(model),
            Some(crate::config::ModelSource::Hub { .. })
        );
        if selection.all && !downloadable {
            // `--all` means every model that has somewhere to come from.
            continue;
        }
        match hub.fetch(model, BarProgress::new(model.id)).await {
            Ok(path) => println!("{}: {}", model.id, path.display()),
            Err(HubError::Weights(weights::WeightsError::NoSource { .. })) if model.tiny => {
                println!("{}: seeded random weights, nothing to download", model.id);
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {}: {e}", model.id);
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} model(s) could not be downloaded");
    }
    Ok(())
}

pub(super) fn models_verify(
    config: Option<&Path>,
    env: &Environment,
    selection: &ModelSelection,
) -> anyhow::Result<()> {
    let settings = settings_for(config, env, "verify")?;
    let explicit = !selection.all && !selection.models.is_empty();
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(["model", "result", "sha256", "file"]);
    let (mut bad, mut missing) = (0, 0);
    for model in select_models(&settings, selection)? {
        let path = match weights::resolve(&settings.models, model) {
            Ok(path) => path,
            Err(e) => {
                // Only a model asked for by name must be present.
                if explicit {
                    missing += 1;
                    eprintln!("error: {}: {e}", model.id);
                }
                continue;
            }
        };
        let pinned = match settings.models.source(model) {
            Some(crate::config::ModelSource::Hub { sha256, .. }) => sha256.clone(),
            _ => None,
        };
        let v = crate::models::hub::verify_file(&path, pinned)?;
        let result = match &v.expected {
            None => "ok (nothing to compare with)".to_owned(),
            Some((_, origin)) if v.matches() => format!("ok (matches {origin})"),
            Some((expected, origin)) => {
                bad += 1;
                format!("DIFFERS from {origin}: {expected}")
            }
        };
        table.add_row([model.id, &result, &v.sha256, &path.display().to_string()]);
    }
    println!("{table}");
    if bad > 0 {
        anyhow::bail!(
            "{bad} file(s) differ from their published digest: delete them and run `vqclip models \
             download` again"
        );
    }
    if missing > 0 {
        anyhow::bail!("{missing} model(s) are not on this machine");
    }
    Ok(())
}
