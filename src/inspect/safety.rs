//! The safety check: CLIP's zero-shot guess whether a picture shows what a server does not want
//! shown openly. Each picture's embedding is compared with the embeddings of short label texts,
//! unsafe and safe ones; the score is the share of the softmax (at CLIP's logit scale) that
//! falls on the unsafe labels. A heuristic, documented as one: CLIP misjudges art, and the
//! labels and threshold are the server operator's to tune.

use candle_core::Tensor;
use image::RgbImage;

use super::describe::{image_embeddings, unit_rows};
use crate::engine::guidance::embed_texts;
use crate::engine::nets::clip::Clip;
use crate::engine::nets::tokenizer::ClipTokenizer;

/// CLIP's logit scale (its learned temperature, at the clamp OpenAI's models reach).
const LOGIT_SCALE: f64 = 100.0;

/// The labels' embeddings under one model: unsafe ones first.
pub(crate) struct SafetyLabels {
    embeddings: Tensor,
    unsafe_count: usize,
}

impl SafetyLabels {
    /// Embeds the labels (a few dozen short texts: milliseconds).
    pub(crate) fn new(
        clip: &Clip,
        tokenizer: &ClipTokenizer,
        unsafe_labels: &[String],
        safe_labels: &[String],
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !unsafe_labels.is_empty() && !safe_labels.is_empty(),
            "the safety check needs unsafe and safe labels"
        );
        let texts: Vec<&str> = unsafe_labels
            .iter()
            .chain(safe_labels)
            .map(String::as_str)
            .collect();
        Ok(Self {
            embeddings: unit_rows(&embed_texts(clip, tokenizer, &texts, 64)?)?,
            unsafe_count: unsafe_labels.len(),
        })
    }

    /// The unsafe score of `picture`, in [0, 1].
    pub(crate) fn score(&self, clip: &Clip, picture: &RgbImage) -> anyhow::Result<f32> {
        Ok(self.scores(clip, std::slice::from_ref(picture))?[0])
    }

    /// The unsafe score of each of `pictures` (embedded in one pass), in [0, 1].
    pub(crate) fn scores(&self, clip: &Clip, pictures: &[RgbImage]) -> anyhow::Result<Vec<f32>> {
        if pictures.is_empty() {
            return Ok(Vec::new());
        }
        let images = image_embeddings(clip, pictures)?;
        // [pictures, labels]: each row a picture's similarity to every label.
        let logits = (images.matmul(&self.embeddings.t()?)? * LOGIT_SCALE)?;
        let shares: Vec<Vec<f32>> = candle_nn::ops::softmax(&logits, 1)?.to_vec2()?;
        Ok(shares
            .iter()
            .map(|row| row[..self.unsafe_count].iter().sum::<f32>().clamp(0.0, 1.0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_is_the_unsafe_labels_share_of_the_softmax() {
        let info = crate::models::find("tiny_clip").unwrap();
        let clip = crate::models::load::load_clip(
            info,
            None,
            &candle_core::Device::Cpu,
            crate::engine::nets::Precision::F32,
        )
        .unwrap();
        let tokenizer = ClipTokenizer::new();
        let picture = RgbImage::from_fn(40, 40, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 6) as u8, 90])
        });
        let labels = |unsafe_: &[&str], safe: &[&str]| {
            let owned = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
            SafetyLabels::new(&clip, &tokenizer, &owned(unsafe_), &owned(safe)).unwrap()
        };
        // The same text on both sides splits the softmax evenly; one of three, a third.
        let even = labels(&["a red apple"], &["a red apple"])
            .score(&clip, &picture)
            .unwrap();
        assert!((even - 0.5).abs() < 1e-5, "{even}");
        let third = labels(&["fog"], &["fog", "fog"])
            .score(&clip, &picture)
            .unwrap();
        assert!((third - 1.0 / 3.0).abs() < 1e-5, "{third}");
        // Swapping the sides turns s into 1 − s.
        let a = labels(&["gore"], &["a landscape"])
            .score(&clip, &picture)
            .unwrap();
        let b = labels(&["a landscape"], &["gore"])
            .score(&clip, &picture)
            .unwrap();
        assert!((a + b - 1.0).abs() < 1e-5, "{a} + {b}");
        assert!(SafetyLabels::new(&clip, &tokenizer, &[], &["x".to_owned()]).is_err());
        // Several pictures in one pass score as each alone.
        let other = RgbImage::from_fn(50, 30, |x, _| image::Rgb([200, (x * 5) as u8, 10]));
        let both = labels(&["gore"], &["a landscape"]);
        let together = both
            .scores(&clip, &[picture.clone(), other.clone()])
            .unwrap();
        assert!((together[0] - a).abs() < 1e-5, "{together:?} {a}");
        let alone = both.score(&clip, &other).unwrap();
        assert!((together[1] - alone).abs() < 1e-5, "{together:?} {alone}");
    }
}
