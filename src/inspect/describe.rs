//! `/describe`'s ranking: CLIP's embedding of a picture against every phrase of the
//! vocabularies, the best combined into four prompts, those ordered by how well CLIP thinks
//! each fits the picture. Synchronous and on whatever device the model is on.

use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor};
use image::RgbImage;
use sha2::Digest as _;

use super::vocab::{self, Kind};
use crate::engine::guidance::embed_texts;
use crate::engine::image as img;
use crate::engine::nets::clip::{Clip, normalize};
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::request::banned_word;

/// How many prompts `/describe` suggests.
pub const SUGGESTIONS: usize = 4;

/// Texts embedded together: enough for the matrix products to be efficient, little padding.
const TEXT_BATCH: usize = 64;

/// The vocabularies' embeddings under one CLIP model: a row per phrase, unit length.
pub(crate) struct Vocabulary {
    phrases: Vec<(Kind, &'static str)>,
    embeddings: Tensor,
}

impl Vocabulary {
    /// Embeds every phrase with `clip`, or reads them from `cache` (a file per model and
    /// vocabulary, written after embedding); a cache that does not fit is embedded again.
    pub(crate) fn load(
        clip: &Clip,
        tokenizer: &ClipTokenizer,
        cache: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let phrases = vocab::phrases();
        let width = clip.text.projection_dim();
        let device = clip.text.device().clone();
        if let Some(path) = cache {
            match read_cache(path, phrases.len(), width, &device) {
                Ok(embeddings) => {
                    return Ok(Self {
                        phrases,
                        embeddings,
                    });
                }
                Err(e) if path.exists() => {
                    tracing::warn!(path = %path.display(), error = %e, "embedding the vocabularies again");
                }
                Err(_) => {}
            }
        }
        let started = std::time::Instant::now();
        let texts: Vec<&str> = phrases.iter().map(|(_, p)| *p).collect();
        let embeddings = unit_rows(&embed_texts(clip, tokenizer, &texts, TEXT_BATCH)?)?;
        tracing::info!(
            phrases = texts.len(),
            seconds = started.elapsed().as_secs_f32(),
            "embedded the /describe vocabularies"
        );
        if let Some(path) = cache
            && let Err(e) = write_cache(path, &embeddings)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache the vocabularies' embeddings");
        }
        Ok(Self {
            phrases,
            embeddings,
        })
    }
}

/// The cache file of the vocabularies' embeddings for the model `model` whose weights are
/// `weights` (`None`: seeded test weights): named by what they depend on, so a changed list
/// or model is embedded again rather than read stale.
pub(crate) fn cache_path(cache_dir: &Path, model: &str, weights: Option<&Path>) -> PathBuf {
    let mut hash = sha2::Sha256::new();
    hash.update(model.as_bytes());
    if let Some(path) = weights {
        hash.update(path.to_string_lossy().as_bytes());
        if let Ok(meta) = std::fs::metadata(path) {
            hash.update(meta.len().to_le_bytes());
            if let Ok(modified) = meta.modified()
                && let Ok(since) = modified.duration_since(std::time::UNIX_EPOCH)
            {
                hash.update(since.as_nanos().to_le_bytes());
            }
        }
    }
    for text in vocab::fingerprint_text() {
        hash.update(text.as_bytes());
    }
    let digest: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    cache_dir
        .join("vqclip-describe")
        .join(format!("{model}-{digest}.safetensors"))
}

const CACHE_TENSOR: &str = "embeddings";

fn read_cache(path: &Path, rows: usize, width: usize, device: &Device) -> anyhow::Result<Tensor> {
    // The file is ours, but a partial write or another version's must not be trusted blindly:
    // its shape is checked before use (and its size before reading it whole).
    let expected = (rows * width * 4) as u64;
    let size = std::fs::metadata(path)?.len();
    anyhow::ensure!(
        size < expected + (1 << 20),
        "{size} bytes for {rows}×{width} embeddings"
    );
    let mut tensors = candle_core::safetensors::load(path, device)?;
    let embeddings = tensors
        .remove(CACHE_TENSOR)
        .ok_or_else(|| anyhow::anyhow!("no {CACHE_TENSOR} tensor"))?;
    anyhow::ensure!(
        embeddings.dims() == [rows, width],
        "shape {:?}, expected [{rows}, {width}]",
        embeddings.dims()
    );
    Ok(embeddings.to_dtype(candle_core::DType::F32)?)
}

fn write_cache(path: &Path, embeddings: &Tensor) -> anyhow::Result<()> {
    let dir = path.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    std::fs::create_dir_all(dir)?;
    // Written aside and renamed: a reader never sees half a file.
    let partial = path.with_extension("partial");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(CACHE_TENSOR.to_owned(), embeddings.clone())]),
        &partial,
    )?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// Rows scaled to unit length (cosine similarity becomes a dot product).
pub(crate) fn unit_rows(rows: &Tensor) -> candle_core::Result<Tensor> {
    let norms = rows.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    rows.broadcast_div(&(norms + 1e-12)?)
}

/// CLIP's embedding `[1, projection_dim]` of a whole picture, unit length: scaled so its
/// shorter side fills the model's input and cut to the centre square, as CLIP's own
/// preprocessing does.
pub(crate) fn image_embedding(clip: &Clip, picture: &RgbImage) -> candle_core::Result<Tensor> {
    image_embeddings(clip, std::slice::from_ref(picture))
}

/// [`image_embedding`] of several pictures in one pass: `[pictures, projection_dim]`.
pub(crate) fn image_embeddings(clip: &Clip, pictures: &[RgbImage]) -> candle_core::Result<Tensor> {
    let side = clip.vision.config().image_size as u32;
    let pixels = pictures
        .iter()
        .map(|picture| img::rgb_to_tensor(&img::cover(picture, side, side), clip.text.device()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let pixels = Tensor::cat(&pixels, 0)?.to_dtype(clip.vision.dtype())?;
    unit_rows(
        &clip
            .vision
            .forward(&normalize(&pixels)?)?
            .to_dtype(candle_core::DType::F32)?,
    )
}

/// `/describe`'s answer: prompts, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    /// Suggested prompts, the one CLIP finds closest to the picture first.
    pub prompts: Vec<String>,
}

/// Suggests [`SUGGESTIONS`] prompts for `picture`: each a subject with a medium, a style (an
/// artist or a movement), two descriptors, a light and a colour, the four taking the best
/// phrases of each list in turn, then ordered by CLIP's similarity of the whole prompt to the
/// picture. A picture that is not square gets the nearest common `--ar`. No phrase containing
/// one of `banned` (`discord.banned_words`, matched as prompts are) is used.
pub(crate) fn describe(
    clip: &Clip,
    tokenizer: &ClipTokenizer,
    (vocabulary, banned): (&Vocabulary, &[String]),
    picture: &RgbImage,
) -> anyhow::Result<Description> {
    let image = image_embedding(clip, picture)?;
    let scores: Vec<f32> = vocabulary
        .embeddings
        .matmul(&image.t()?)?
        .flatten_all()?
        .to_vec1()?;
    let best = |kind: Kind, k: usize| -> Vec<&'static str> {
        let mut ranked: Vec<(f32, &'static str)> = vocabulary
            .phrases
            .iter()
            .zip(&scores)
            .filter(|((k, p), _)| *k == kind && banned_word(p, banned).is_none())
            .map(|((_, p), &s)| (s, *p))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranked.into_iter().take(k).map(|(_, p)| p).collect()
    };
    let subjects = best(Kind::Subject, SUGGESTIONS);
    let mediums = best(Kind::Medium, 2);
    let artists = best(Kind::Artist, 2);
    let movements = best(Kind::Movement, 2);
    let flavors = best(Kind::Flavor, 2 * SUGGESTIONS);
    let lights = best(Kind::Lighting, 2);
    let colours = best(Kind::Colour, 2);
    let pick = |list: &[&'static str], i: usize| {
        list.get(i.min(list.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let aspect = aspect_flag(picture.width(), picture.height());
    let mut prompts: Vec<String> = Vec::with_capacity(SUGGESTIONS);
    for i in 0..SUGGESTIONS {
        let (medium, subject) = (pick(&mediums, i / 2), pick(&subjects, i));
        let style = if i % 2 == 0 {
            match pick(&artists, i / 2) {
                "" => String::new(),
                artist => format!("in the style of {artist}"),
            }
        } else {
            pick(&movements, i / 2).to_owned()
        };
        // A list every phrase of which is banned leaves its place out.
        let head = match (medium.is_empty(), subject.is_empty()) {
            (false, false) => format!("{medium} of {subject}"),
            _ => format!("{medium}{subject}"),
        };
        let parts = [
            head.as_str(),
            style.as_str(),
            pick(&flavors, 2 * i),
            pick(&flavors, 2 * i + 1),
            pick(&lights, i % 2),
            pick(&colours, i % 2),
        ];
        let mut text = parts
            .iter()
            .filter(|part| !part.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(flag) = &aspect {
            text.push(' ');
            text.push_str(flag);
        }
        if !text.trim().is_empty() && !prompts.contains(&text) {
            prompts.push(text);
        }
    }
    anyhow::ensure!(!prompts.is_empty(), "every phrase is banned");
    let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let fits: Vec<f32> = unit_rows(&embed_texts(clip, tokenizer, &texts, TEXT_BATCH)?)?
        .matmul(&image.t()?)?
        .flatten_all()?
        .to_vec1()?;
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by(|&a, &b| fits[b].total_cmp(&fits[a]));
    Ok(Description {
        prompts: order.into_iter().map(|i| prompts[i].clone()).collect(),
    })
}

/// The common aspect ratios `/describe` names, as `--ar` takes them.
const ASPECTS: [(u32, u32); 8] = [
    (4, 3),
    (3, 2),
    (16, 9),
    (2, 1),
    (3, 4),
    (2, 3),
    (9, 16),
    (1, 2),
];

/// `--ar w:h` for the common ratio nearest a `width`×`height` picture; `None` when square is
/// nearest.
pub(crate) fn aspect_flag(width: u32, height: u32) -> Option<String> {
    let ratio = (f64::from(width.max(1)) / f64::from(height.max(1))).ln();
    let distance = |(w, h): (u32, u32)| (ratio - (f64::from(w) / f64::from(h)).ln()).abs();
    let (w, h) = ASPECTS
        .into_iter()
        .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))?;
    (distance((w, h)) < ratio.abs()).then(|| format!("--ar {w}:{h}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn tiny() -> Clip {
        let info = crate::models::find("tiny_clip").unwrap();
        crate::models::load::load_clip(
            info,
            None,
            &Device::Cpu,
            crate::engine::nets::Precision::F32,
        )
        .unwrap()
    }

    fn picture() -> RgbImage {
        RgbImage::from_fn(60, 40, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 6) as u8, ((x + y) * 2) as u8])
        })
    }

    #[test]
    fn batched_text_embeddings_equal_one_at_a_time() {
        let clip = tiny();
        let tokenizer = ClipTokenizer::new();
        let texts = ["a cat", "a charcoal drawing of a castle on a hill", "fog"];
        let batched = embed_texts(&clip, &tokenizer, &texts, 2).unwrap();
        for (i, text) in texts.iter().enumerate() {
            let alone = crate::engine::guidance::embed_text(&clip, &tokenizer, text).unwrap();
            let diff = (batched.get(i).unwrap() - alone.squeeze(0).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{text}: {diff}");
        }
    }

    #[test]
    fn four_prompts_from_the_best_phrases_ordered_by_fit_and_none_banned() {
        let clip = tiny();
        let tokenizer = ClipTokenizer::new();
        let vocabulary = Vocabulary::load(&clip, &tokenizer, None).unwrap();
        let described = describe(&clip, &tokenizer, (&vocabulary, &[]), &picture()).unwrap();
        assert_eq!(described.prompts.len(), SUGGESTIONS);
        let again = describe(&clip, &tokenizer, (&vocabulary, &[]), &picture()).unwrap();
        assert_eq!(described, again, "the same picture, the same prompts");
        // Best fit first: CLIP's similarity of each whole prompt to the picture falls.
        let image = image_embedding(&clip, &picture()).unwrap();
        let texts: Vec<&str> = described.prompts.iter().map(String::as_str).collect();
        let fits: Vec<f32> = unit_rows(&embed_texts(&clip, &tokenizer, &texts, 4).unwrap())
            .unwrap()
            .matmul(&image.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(fits.windows(2).all(|w| w[0] >= w[1]), "{fits:?}");
        // Each is a medium of a subject, in the picture's shape, and a prompt /imagine takes.
        let mediums: Vec<&str> = vocab::phrases()
            .into_iter()
            .filter(|(k, _)| *k == Kind::Medium)
            .map(|(_, p)| p)
            .collect();
        for prompt in &described.prompts {
            assert!(prompt.ends_with(" --ar 3:2"), "{prompt}");
            assert!(
                mediums
                    .iter()
                    .any(|m| prompt.starts_with(&format!("{m} of "))),
                "{prompt}"
            );
            let parsed = crate::engine::prompt::parse(prompt).unwrap();
            assert_eq!(parsed.flags.aspect, Some((3, 2)));
            assert_eq!(parsed.prompts.len(), 1, "{prompt}");
            assert!(tokenizer.encode(&parsed.prompts[0].text).ids.len() <= 77);
        }
        // Banning the words of the first prompt's subject changes every prompt's subject.
        let first = described.prompts[0].clone();
        let subject = vocab::phrases()
            .into_iter()
            .filter(|(k, p)| *k == Kind::Subject && first.contains(&format!(" of {p},")))
            .map(|(_, p)| p)
            .next()
            .unwrap();
        let banned: Vec<String> = vec![subject.to_owned()];
        let without = describe(&clip, &tokenizer, (&vocabulary, &banned), &picture()).unwrap();
        for prompt in &without.prompts {
            assert!(!prompt.contains(&format!(" of {subject},")), "{prompt}");
        }
        // Every subject banned: the prompts go on without one.
        let subjects: Vec<String> = vocab::phrases()
            .into_iter()
            .filter(|(k, _)| *k == Kind::Subject)
            .map(|(_, p)| p.to_owned())
            .collect();
        let bare = describe(&clip, &tokenizer, (&vocabulary, &subjects), &picture()).unwrap();
        for prompt in &bare.prompts {
            let head = prompt.split(", ").next().unwrap();
            assert!(mediums.contains(&head), "{prompt}");
            assert!(!prompt.contains(", ,"), "{prompt}");
        }
    }

    #[test]
    fn the_embedding_cache_is_read_back_and_a_broken_one_is_rebuilt() {
        let clip = tiny();
        let tokenizer = ClipTokenizer::new();
        let dir = tempfile::tempdir().unwrap();
        let path = cache_path(dir.path(), "tiny_clip", None);
        assert_eq!(path, cache_path(dir.path(), "tiny_clip", None));
        assert_ne!(path, cache_path(dir.path(), "vit_b32", None));
        let made = Vocabulary::load(&clip, &tokenizer, Some(&path)).unwrap();
        assert!(path.is_file());
        let read = read_cache(
            &path,
            made.phrases.len(),
            clip.text.projection_dim(),
            &Device::Cpu,
        )
        .unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            a.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert!(same(&read, &made.embeddings));
        // Half a file, or another shape: embedded again and written anew.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(
            read_cache(
                &path,
                made.phrases.len(),
                clip.text.projection_dim(),
                &Device::Cpu
            )
            .is_err()
        );
        let rebuilt = Vocabulary::load(&clip, &tokenizer, Some(&path)).unwrap();
        assert!(same(&rebuilt.embeddings, &made.embeddings));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert!(read_cache(&path, 3, clip.text.projection_dim(), &Device::Cpu).is_err());
    }

    #[test]
    fn aspect_flags_name_the_nearest_common_ratio() {
        assert_eq!(aspect_flag(512, 512), None);
        assert_eq!(aspect_flag(520, 500), None);
        assert_eq!(aspect_flag(1920, 1080).as_deref(), Some("--ar 16:9"));
        assert_eq!(aspect_flag(600, 400).as_deref(), Some("--ar 3:2"));
        assert_eq!(aspect_flag(400, 600).as_deref(), Some("--ar 2:3"));
        assert_eq!(aspect_flag(3000, 100).as_deref(), Some("--ar 2:1"));
        assert_eq!(aspect_flag(1, 3000).as_deref(), Some("--ar 1:2"));
        assert_eq!(aspect_flag(0, 0), None);
    }
}
