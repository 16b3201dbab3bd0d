//! The catalogue of models vqclip knows by name: what each one is and where its weights come from.
//!
//! Names here are what users type (`--model wikiart_f16_16384`), what configuration keys use
//! (`[models.imagenet_f16_16384]`) and what job rows store, so a name, once published, never
//! changes meaning. The catalogue (this file) is plain data: it knows nothing of files, the network
//! or candle; `config` resolves each entry to a concrete source. Below it, [`weights`] finds an
//! entry's file (configured path or Hugging Face cache, `.ckpt` converted once), [`hub`]
//! downloads and checks it, and [`load`] builds the model on a device.

pub mod hub;
pub(crate) mod load;
pub mod weights;

use std::fmt;

/// Which half of VQGAN+CLIP a model plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// A taming-transformers VQGAN: the image generator whose latent is optimised.
    Vqgan,
    /// An OpenAI CLIP model: the frozen judge that scores cutouts against prompts.
    Clip,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vqgan => "VQGAN",
            Self::Clip => "CLIP",
        })
    }
}

/// One file in a Hugging Face Hub model repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    /// Repository as `owner/name`.
    pub repo: &'static str,
    /// Path of the file inside the repository.
    pub file: &'static str,
    /// Branch, tag, pull-request ref or commit to download.
    pub revision: &'static str,
    /// The file's SHA-256 where public code that uses this source publishes it (a mirror's
    /// manifest); the download is checked against it. `None`: the Hub's own LFS digest is used.
    pub sha256: Option<&'static str>,
}

/// A model vqclip can run, with where its weights are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Stable identifier: lowercase, digits and underscores.
    pub id: &'static str,
    /// Other spellings accepted on input (e.g. OpenAI's `ViT-B/32`).
    pub aliases: &'static [&'static str],
    /// VQGAN or CLIP.
    pub kind: ModelKind,
    /// One line for help text and listings.
    pub description: &'static str,
    /// Where the weights download from by default; `None` when no Hub copy is known.
    pub hub: Option<HubFile>,
    /// How to get the weights when `hub` is `None` (or the Hub is unreachable).
    pub manual_source: &'static str,
    /// A tiny random-weight model for tests; refused unless `models.allow_tiny` is set.
    pub tiny: bool,
}

/// Every model vqclip knows, VQGANs first.
pub(crate) const CATALOGUE: &[ModelInfo] = &[
    ModelInfo {
        id: "imagenet_f16_16384",
        aliases: &["vqgan_imagenet_f16_16384", "imagenet"],
        kind: ModelKind::Vqgan,
        description: "taming-transformers ImageNet VQGAN, f16, 16384 codes (the default)",
        hub: Some(HubFile {
            repo: "Somnai/pytti-vqgan-checkpoints",
            file: "imagenet/imagenet.ckpt",
            revision: "debc22c8f285c7734980c464ff992d335dde6e9a",
            sha256: Some("845a68805098cb666420d5db93df53f3a3b6dd443e6dd85c05759c5b998cd663"),
        }),
        manual_source: "the taming-transformers release vqgan_imagenet_f16_16384 (ckpts/last.ckpt)",
        tiny: false,
    },
    ModelInfo {
        id: "imagenet_f16_1024",
        aliases: &["vqgan_imagenet_f16_1024"],
        kind: ModelKind::Vqgan,
        description: "taming-transformers ImageNet VQGAN, f16, 1024 codes",
        hub: None,
        manual_source: "the taming-transformers release vqgan_imagenet_f16_1024 (ckpts/last.ckpt)",
        tiny: false,
    },
    ModelInfo {
        id: "wikiart_f16_16384",
        aliases: &["vqgan_wikiart_f16_16384", "wikiart"],
        kind: ModelKind::Vqgan,
        description: "community WikiArt VQGAN, f16, 16384 codes",
        hub: Some(HubFile {
            repo: "Somnai/pytti-vqgan-checkpoints",
            file: "wikiart/wikiart.ckpt",
            revision: "debc22c8f285c7734980c464ff992d335dde6e9a",
            sha256: Some("bd08bb46301f98be1712bb2be9f8868cea30b53137cd985d4d6e8da8b3e02c36"),
        }),
        manual_source: "pixray release v1.7.1, vqgan_wikiart_16384.ckpt",
        tiny: false,
    },
    ModelInfo {
        id: "gumbel_f8_8192",
        aliases: &["vqgan_gumbel_f8_8192", "gumbel"],
        kind: ModelKind::Vqgan,
        description: "taming-transformers Gumbel VQGAN, f8, 8192 codes",
        hub: Some(HubFile {
            repo: "Somnai/pytti-vqgan-checkpoints",
            file: "openimages/openimages.ckpt",
            revision: "debc22c8f285c7734980c464ff992d335dde6e9a",
            sha256: Some("5cd6c74810ab97e00e942c25403f73afc081e8b19987b31ec0d9ff5b68e7ab14"),
        }),
        manual_source: "the taming-transformers release vqgan_gumbel_f8_8192 (ckpts/last.ckpt)",
        tiny: false,
    },
    ModelInfo {
        id: "tiny_vqgan",
        aliases: &["tiny"],
        kind: ModelKind::Vqgan,
        description: "tiny VQGAN for tests (the parity fixtures' config); seeded random weights unless a path is set",
        hub: None,
        manual_source: "tests/fixtures/parity/tiny_vqgan.safetensors in the vqclip repository",
        tiny: true,
    },
    ModelInfo {
        id: "vit_b32",
        aliases: &["ViT-B/32", "clip-vit-base-patch32"],
        kind: ModelKind::Clip,
        description: "OpenAI CLIP ViT-B/32, 224 px (the default)",
        hub: Some(HubFile {
            repo: "openai/clip-vit-base-patch32",
            file: "model.safetensors",
            // The main branch has no safetensors file; this pull request adds it.
            revision: "refs/pr/15",
            sha256: None,
        }),
        manual_source: "model.safetensors of openai/clip-vit-base-patch32 on the Hugging Face Hub",
        tiny: false,
    },
    ModelInfo {
        id: "vit_b16",
        aliases: &["ViT-B/16", "clip-vit-base-patch16"],
        kind: ModelKind::Clip,
        description: "OpenAI CLIP ViT-B/16, 224 px",
        hub: Some(HubFile {
            repo: "openai/clip-vit-base-patch16",
            file: "pytorch_model.bin",
            revision: "main",
            sha256: None,
        }),
        manual_source: "pytorch_model.bin of openai/clip-vit-base-patch16 on the Hugging Face Hub",
        tiny: false,
    },
    ModelInfo {
        id: "vit_l14",
        aliases: &["ViT-L/14", "clip-vit-large-patch14"],
        kind: ModelKind::Clip,
        description: "OpenAI CLIP ViT-L/14, 224 px",
        hub: Some(HubFile {
            repo: "openai/clip-vit-large-patch14",
            file: "model.safetensors",
            revision: "main",
            sha256: None,
        }),
        manual_source: "model.safetensors of openai/clip-vit-large-patch14 on the Hugging Face Hub",
        tiny: false,
    },
    ModelInfo {
        id: "vit_l14_336",
        aliases: &[
            "ViT-L/14@336px",
            "ViT-L/14@336",
            "clip-vit-large-patch14-336",
        ],
        kind: ModelKind::Clip,
        description: "OpenAI CLIP ViT-L/14, 336 px",
        hub: Some(HubFile {
            repo: "openai/clip-vit-large-patch14-336",
            file: "pytorch_model.bin",
            revision: "main",
            sha256: None,
        }),
        manual_source: "pytorch_model.bin of openai/clip-vit-large-patch14-336 on the Hugging Face Hub",
        tiny: false,
    },
    ModelInfo {
        id: "tiny_clip",
        aliases: &[],
        kind: ModelKind::Clip,
        description: "tiny CLIP for tests (the parity fixtures' config); seeded random weights unless a path is set",
        hub: None,
        manual_source: "tests/fixtures/parity/tiny_clip.safetensors in the vqclip repository",
        tiny: true,
    },
    ModelInfo {
        id: "tiny_clip_48",
        aliases: &[],
        kind: ModelKind::Clip,
        description: "a second tiny CLIP for tests of ensembles (48 px input); seeded random weights",
        hub: None,
        manual_source: "none: seeded random weights",
        tiny: true,
    },
];

/// Looks a model up by id or alias, ignoring ASCII case.
pub fn find(name: &str) -> Option<&'static ModelInfo> {
    let name = name.trim();
    CATALOGUE.iter().find(|m| {
        m.id.eq_ignore_ascii_case(name) || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    })
}

/// The ids of every model of `kind`, for "expected one of …" messages.
pub(crate) fn ids_of(kind: ModelKind) -> Vec<&'static str> {
    CATALOGUE
        .iter()
        .filter(|m| m.kind == kind)
        .map(|m| m.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_and_aliases_are_unique_across_the_catalogue() {
        let mut seen = HashSet::new();
        for m in CATALOGUE {
            for name in std::iter::once(&m.id).chain(m.aliases) {
                assert!(
                    seen.insert(name.to_ascii_lowercase()),
                    "{name} names two models"
                );
            }
        }
    }

    #[test]
    fn ids_are_valid_config_keys() {
        for m in CATALOGUE {
            assert!(
                m.id.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{} is not a bare TOML key",
                m.id
            );
        }
    }

    #[test]
    fn find_accepts_ids_and_openai_names_in_any_case() {
        assert_eq!(find("vit_b32").map(|m| m.id), Some("vit_b32"));
        assert_eq!(find("vit-b/32").map(|m| m.id), Some("vit_b32"));
        assert_eq!(find(" WIKIART ").map(|m| m.id), Some("wikiart_f16_16384"));
        assert_eq!(find("dall-e"), None);
    }

    #[test]
    fn only_tiny_models_lack_a_way_to_get_them() {
        for m in CATALOGUE {
            assert!(!m.manual_source.is_empty(), "{} has no source", m.id);
            if m.tiny {
                assert!(m.hub.is_none(), "{} is tiny but downloadable", m.id);
            }
        }
    }
}
