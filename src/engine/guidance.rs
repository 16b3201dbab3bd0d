//! What one CLIP model aims a run at: its embeddings of the text prompts (each scene's of a
//! story, and those that guide every step), of the image prompts and the noise prompts. A run
//! has one per CLIP model guiding it — the job's own, then the others of an ensemble — each
//! with the weight of its loss.

use candle_core::{Device, Result as CandleResult, Tensor};
use image::RgbImage;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

use super::cutouts::{CutoutMethod, Cutouts};
use super::image as img;
use super::loss::PromptTarget;
use super::nets::clip::{Clip, normalize};
use super::nets::tokenizer::ClipTokenizer;
use super::prompt::WeightedPrompt;
use super::spec::GenerationSpec;

/// One CLIP model's targets for a run.
pub(crate) struct Guidance<'m> {
    /// The model.
    pub clip: &'m Clip,
    /// Its loss is multiplied by this.
    pub weight: f64,
    /// The prompts guiding this step: the story's current scene, then `shared`.
    targets: Vec<PromptTarget>,
    /// The story's scenes (empty without one).
    scenes: Vec<Vec<PromptTarget>>,
    /// The scene `targets` holds.
    scene: usize,
    /// Prompts that guide every step: text (or, in a story, `--no`), image and noise prompts.
    shared: Vec<PromptTarget>,
}

impl<'m> Guidance<'m> {
    /// Embeds `spec`'s prompts and `image_prompts` with `clip`, drawing the image prompts'
    /// cutouts and the noise prompts' targets from `rng`, in that order.
    pub fn new(
        (clip, weight): (&'m Clip, f64),
        tokenizer: &ClipTokenizer,
        spec: &GenerationSpec,
        image_prompts: &[(RgbImage, f64, Option<f64>)],
        (method, rng): (&CutoutMethod, &mut ChaCha20Rng),
        device: &Device,
    ) -> CandleResult<Self> {
        let text_targets = |prompts: &[WeightedPrompt]| -> CandleResult<Vec<PromptTarget>> {
            prompts
                .iter()
                .map(|p| {
                    Ok(PromptTarget {
                        embed: embed_text(clip, tokenizer, &p.text)?,
                        weight: p.weight,
                        stop: p.stop,
                    })
                })
                .collect()
        };
        let scenes = spec
            .story
            .iter()
            .map(|scene| text_targets(scene))
            .collect::<CandleResult<Vec<_>>>()?;
        let mut shared = text_targets(&spec.prompts)?;
        for (image, weight, stop) in image_prompts {
            shared.push(PromptTarget {
                embed: image_prompt_embedding(clip, (method, &mut *rng), image, spec, device)?,
                weight: *weight,
                stop: *stop,
            });
        }
        let dim = clip.text.projection_dim();
        for &weight in &spec.noise_prompts {
            let values: Vec<f32> = (0..dim).map(|_| StandardNormal.sample(&mut *rng)).collect();
            let embed = Tensor::from_vec(values, (1, dim), &Device::Cpu)?.to_device(device)?;
            shared.push(PromptTarget {
                embed,
                weight,
                stop: None,
            });
        }
        let mut targets = scenes.first().cloned().unwrap_or_default();
        targets.extend(shared.iter().cloned());
        Ok(Self {
            clip,
            weight,
            targets,
            scenes,
            scene: 0,
            shared,
        })
    }

    /// The prompts guiding a step now.
    pub fn targets(&self) -> &[PromptTarget] {
        &self.targets
    }

    /// Aims at the story's scene `scene` (and the shared prompts).
    pub fn show_scene(&mut self, scene: usize) {
        if scene != self.scene
            && let Some(prompts) = self.scenes.get(scene)
        {
            self.targets = prompts.iter().chain(&self.shared).cloned().collect();
            self.scene = scene;
        }
    }

    /// The side of the model's input: its cutouts' size.
    pub fn side(&self) -> usize {
        self.clip.vision.config().image_size
    }
}

/// CLIP's embedding `[1, projection_dim]` of a text, tokenized as prompts are (cut to the
/// context length, fitted to the model's vocabulary).
pub(crate) fn embed_text(
    clip: &Clip,
    tokenizer: &ClipTokenizer,
    text: &str,
) -> CandleResult<Tensor> {
    let tokens = tokenizer.encode(text);
    let ids = fit_vocabulary(&tokens.ids, clip.text.config().eos_token_id);
    clip.text.forward(&ids)
}

/// CLIP's embeddings `[texts, projection_dim]` of several texts, each as [`embed_text`] makes
/// it, in batches of at most `batch` (padding costs what the longest text in a batch costs).
pub(crate) fn embed_texts(
    clip: &Clip,
    tokenizer: &ClipTokenizer,
    texts: &[&str],
    batch: usize,
) -> CandleResult<Tensor> {
    let eos = clip.text.config().eos_token_id;
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|text| fit_vocabulary(&tokenizer.encode(text).ids, eos))
        .collect();
    // Texts of like length batch together: less padding.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut rows = vec![None; ids.len()];
    for chunk in order.chunks(batch.max(1)) {
        let sequences: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
        let embedded = clip.text.forward_batch(&sequences)?;
        for (row, &i) in chunk.iter().enumerate() {
            rows[i] = Some(embedded.get(row)?);
        }
    }
    let rows: Vec<Tensor> = rows.into_iter().flatten().collect();
    Tensor::stack(&rows, 0)
}

/// Token ids for a text tower whose vocabulary may be smaller than OpenAI's (the tiny test
/// model): ids fold into the vocabulary, start and end tokens map to its own. For the released
/// models this is the identity.
fn fit_vocabulary(ids: &[u32], eos: u32) -> Vec<u32> {
    const OPENAI_EOS: u32 = 49407;
    let bos = eos - 1;
    ids.iter()
        .map(|&id| match id {
            OPENAI_EOS => eos,
            id if id == OPENAI_EOS - 1 => bos,
            id => id % bos,
        })
        .collect()
}

/// Embeds an image prompt: resized (aspect kept) to at most the output's area, cut once with the
/// run's sampler, encoded: one target row per cutout.
fn image_prompt_embedding(
    clip: &Clip,
    (method, rng): (&CutoutMethod, &mut ChaCha20Rng),
    image: &RgbImage,
    spec: &GenerationSpec,
    device: &Device,
) -> CandleResult<Tensor> {
    let (iw, ih) = image.dimensions();
    let target_area = f64::from(spec.width) * f64::from(spec.height);
    let area = f64::from(iw) * f64::from(ih);
    let scale = (target_area.min(area) / area).sqrt();
    let (w, h) = (
        ((f64::from(iw) * scale) as u32).max(1),
        ((f64::from(ih) * scale) as u32).max(1),
    );
    let resized = img::resize_exact(image, w, h);
    let pixels = img::rgb_to_tensor(&resized, device)?;
    let side = clip.vision.config().image_size;
    let cuts = method.draw(rng, w as usize, h as usize, spec.cutn as usize, side);
    let cut = cuts.cut(&pixels, 0..cuts.count())?;
    clip.vision.forward(&normalize(&cut)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_ids_are_unchanged_and_fold_into_a_tiny_vocabulary() {
        let ids = [49406, 320, 1125, 49407];
        assert_eq!(fit_vocabulary(&ids, 49407), ids);
        let tiny = fit_vocabulary(&ids, 511);
        assert_eq!(tiny[0], 510);
        assert_eq!(tiny[3], 511);
        assert!(tiny.iter().all(|&id| id < 512));
    }
}
