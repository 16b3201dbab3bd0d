//! `vqclip bench --describe`: what CLIP on the bot's CPU costs — embedding `/describe`'s
//! vocabularies once per model (then cached), one `/describe`, and the safety check of one
//! picture — on the named CLIP's architecture with seeded random weights (the same work as the
//! released weights). A figure for the README's claims, never a test.

use std::time::Instant;

use candle_core::{DType, Device};
use serde::Serialize;

use crate::config::{DEFAULT_SAFE_LABELS, DEFAULT_UNSAFE_LABELS};
use crate::engine::nets::clip::{Clip, ClipConfig};
use crate::engine::nets::random::SeededWeights;
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::inspect::describe::{self, Vocabulary};
use crate::inspect::safety::SafetyLabels;

/// The times, in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct DescribeReport {
    /// The CLIP preset.
    pub clip: String,
    /// The x86 vector extensions this CPU offers.
    pub cpu_flags: Vec<&'static str>,
    /// Threads candle's CPU kernels use.
    pub threads: usize,
    /// Phrases in the vocabularies.
    pub phrases: usize,
    /// Embedding every phrase (once per model; cached on disk after).
    pub vocabulary_s: f64,
    /// Median of one `/describe` of a 640×480 picture.
    pub describe_s: f64,
    /// Median of the safety check of one picture.
    pub safety_s: f64,
}

impl DescribeReport {
    /// One line for people.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} on the CPU ({}; {} threads): {} phrases embedded in {:.2} s; /describe {:.3} s; \
             safety check {:.3} s per picture",
            self.clip,
            if self.cpu_flags.is_empty() {
                "none of avx2/fma/avx512".to_owned()
            } else {
                self.cpu_flags.join(" ")
            },
            self.threads,
            self.phrases,
            self.vocabulary_s,
            self.describe_s,
            self.safety_s
        )
    }
}

/// Times the vocabularies' embedding once, then `iters` describes and safety checks (after
/// `warmup` untimed ones), on the CPU.
pub fn describe_bench(clip: &str, iters: u32, warmup: u32) -> anyhow::Result<DescribeReport> {
    let config =
        ClipConfig::preset(clip).ok_or_else(|| anyhow::anyhow!("no CLIP preset named {clip}"))?;
    let device = Device::Cpu;
    let model = Clip::new(
        SeededWeights::new(1).var_builder(DType::F32, &device),
        &config,
    )?;
    let tokenizer = ClipTokenizer::new();
    let started = Instant::now();
    let vocabulary = Vocabulary::load(&model, &tokenizer, None)?;
    let vocabulary_s = started.elapsed().as_secs_f64();
    let picture = image::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let owned = |labels: &[&str]| labels.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    let labels = SafetyLabels::new(
        &model,
        &tokenizer,
        &owned(DEFAULT_UNSAFE_LABELS),
        &owned(DEFAULT_SAFE_LABELS),
    )?;
    let (mut describes, mut checks) = (Vec::new(), Vec::new());
    for i in 0..warmup + iters {
        let t = Instant::now();
        describe::describe(&model, &tokenizer, (&vocabulary, &[]), &picture)?;
        let described = t.elapsed().as_secs_f64();
        let t = Instant::now();
        labels.score(&model, &picture)?;
        let checked = t.elapsed().as_secs_f64();
        if i >= warmup {
            describes.push(described);
            checks.push(checked);
        }
    }
    Ok(DescribeReport {
        clip: clip.to_owned(),
        cpu_flags: super::kernels::cpu_flags(),
        threads: candle_core::utils::get_num_threads(),
        phrases: crate::inspect::vocab::phrases().len(),
        vocabulary_s,
        describe_s: super::median(&describes),
        safety_s: super::median(&checks),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_is_timed_on_the_tiny_model() {
        let report = describe_bench("tiny_clip", 1, 0).unwrap();
        assert_eq!(report.phrases, crate::inspect::vocab::phrases().len());
        for t in [report.vocabulary_s, report.describe_s, report.safety_s] {
            assert!(t.is_finite() && t >= 0.0, "{report:?}");
        }
        assert!(report.summary().contains("phrases embedded"));
        assert!(describe_bench("no_such_clip", 1, 0).is_err());
    }
}
