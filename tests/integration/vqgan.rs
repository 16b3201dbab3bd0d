//! Loading VQGAN weights: the Lightning `.ckpt` format, conversion, and errors that name the
//! offending tensor; the full-size architectures' parameter counts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use vqclip::engine::nets::{
    self,
    checkpoint::{self, LoadError, WeightFormat},
    vqgan::{Vqgan, VqganConfig, VqganParts},
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(path: &str) -> PathBuf {
    Path::new(FIXTURES).join(path)
}

fn safetensors_pair() -> Vec<PathBuf> {
    vec![
        fixture("parity/tiny_vqgan.safetensors"),
        fixture("parity/tiny_vqgan_encoder.safetensors"),
    ]
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// A small latent drawn from the tiny codebook's range.
fn tiny_latent() -> Tensor {
    let values: Vec<f32> = (0..16 * 4 * 6)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    Tensor::from_vec(values, (1, 16, 4, 6), &Device::Cpu).unwrap()
}

#[test]
fn formats_are_recognised_by_content() {
    assert_eq!(
        checkpoint::detect_format(&fixture("ckpt/tiny_vqgan.ckpt")).unwrap(),
        WeightFormat::TorchZip
    );
    assert_eq!(
        checkpoint::detect_format(&safetensors_pair()[0]).unwrap(),
        WeightFormat::Safetensors
    );
    let err = checkpoint::detect_format(&fixture("ckpt/README.md")).unwrap_err();
    assert!(matches!(err, LoadError::UnknownFormat { .. }), "{err}");
    assert!(err.to_string().contains("README.md"), "{err}");
}

#[test]
fn the_lightning_checkpoint_holds_exactly_the_autoencoder() {
    let from_ckpt = checkpoint::read_checkpoint(&fixture("ckpt/tiny_vqgan.ckpt")).unwrap();
    let mut from_safetensors = std::collections::HashMap::new();
    for path in safetensors_pair() {
        from_safetensors.extend(candle_core::safetensors::load(path, &Device::Cpu).unwrap());
    }
    let mut ckpt_keys: Vec<_> = from_ckpt.keys().cloned().collect();
    let mut st_keys: Vec<_> = from_safetensors.keys().cloned().collect();
    ckpt_keys.sort();
    st_keys.sort();
    assert_eq!(
        ckpt_keys, st_keys,
        "loss.* and integer buffers are dropped, nothing else"
    );
    for (key, t) in &from_ckpt {
        assert_eq!(max_abs_diff(t, &from_safetensors[key]), 0.0, "{key}");
    }
}

#[test]
fn a_model_loaded_from_ckpt_decodes_and_encodes_like_the_safetensors_one() {
    let cfg = VqganConfig::tiny();
    let dev = Device::Cpu;
    let ckpt = nets::vqgan_from_files(
        "tiny_vqgan",
        &[fixture("ckpt/tiny_vqgan.ckpt")],
        &cfg,
        VqganParts::Full,
        &dev,
    )
    .unwrap();
    let st = nets::vqgan_from_files(
        "tiny_vqgan",
        &safetensors_pair(),
        &cfg,
        VqganParts::Full,
        &dev,
    )
    .unwrap();
    let z = tiny_latent();
    assert_eq!(
        max_abs_diff(&ckpt.decode(&z).unwrap(), &st.decode(&z).unwrap()),
        0.0
    );
    let image = ((st.decode(&z).unwrap() + 1.0).unwrap() / 2.0)
        .unwrap()
        .clamp(0.0, 1.0)
        .unwrap();
    let (a, b) = (ckpt.encode(&image).unwrap(), st.encode(&image).unwrap());
    assert_eq!(max_abs_diff(&a.quant_conv_out, &b.quant_conv_out), 0.0);
    assert_eq!(a.quantized.z_q.dims(), [1, 16, 4, 6]);
}

#[test]
fn a_checkpoint_converts_to_safetensors_that_load_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.safetensors");
    let written = checkpoint::convert_checkpoint(&fixture("ckpt/tiny_vqgan.ckpt"), &out).unwrap();
    assert_eq!(
        written,
        checkpoint::read_checkpoint(&fixture("ckpt/tiny_vqgan.ckpt"))
            .unwrap()
            .len()
    );
    assert_eq!(
        checkpoint::detect_format(&out).unwrap(),
        WeightFormat::Safetensors
    );
    let cfg = VqganConfig::tiny();
    let converted = nets::vqgan_from_files(
        "tiny_vqgan",
        std::slice::from_ref(&out),
        &cfg,
        VqganParts::Full,
        &Device::Cpu,
    )
    .unwrap();
    let original = nets::vqgan_from_files(
        "tiny_vqgan",
        &safetensors_pair(),
        &cfg,
        VqganParts::Full,
        &Device::Cpu,
    )
    .unwrap();
    let z = tiny_latent();
    assert_eq!(
        max_abs_diff(
            &converted.decode(&z).unwrap(),
            &original.decode(&z).unwrap()
        ),
        0.0
    );
}

#[test]
fn a_wrong_shape_names_the_tensor_and_both_shapes() {
    let cfg = VqganConfig {
        n_embed: 65,
        ..VqganConfig::tiny()
    };
    let err = nets::vqgan_from_files(
        "tiny_vqgan",
        &safetensors_pair(),
        &cfg,
        VqganParts::DecodeOnly,
        &Device::Cpu,
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("quantize.embedding.weight"), "{message}");
    assert!(
        message.contains("[65, 16]") && message.contains("[64, 16]"),
        "{message}"
    );
    assert!(message.contains("tiny_vqgan.safetensors"), "{message}");
}

#[test]
fn a_missing_tensor_is_named() {
    let decoder_only = [fixture("parity/tiny_vqgan.safetensors")];
    let cfg = VqganConfig::tiny();
    assert!(
        nets::vqgan_from_files(
            "tiny_vqgan",
            &decoder_only,
            &cfg,
            VqganParts::DecodeOnly,
            &Device::Cpu
        )
        .is_ok()
    );
    let err = nets::vqgan_from_files(
        "tiny_vqgan",
        &decoder_only,
        &cfg,
        VqganParts::Full,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(err.to_string().contains("encoder.conv_in.weight"), "{err}");
}

#[test]
fn encoding_needs_the_encoder_and_a_multiple_of_the_factor() {
    let cfg = VqganConfig::tiny();
    let decode_only = nets::vqgan_from_files(
        "tiny_vqgan",
        &safetensors_pair(),
        &cfg,
        VqganParts::DecodeOnly,
        &Device::Cpu,
    )
    .unwrap();
    let image = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(decode_only.encode(&image).is_err());
    let full = nets::vqgan_from_files(
        "tiny_vqgan",
        &safetensors_pair(),
        &cfg,
        VqganParts::Full,
        &Device::Cpu,
    )
    .unwrap();
    let odd = Tensor::zeros((1, 3, 18, 16), DType::F32, &Device::Cpu).unwrap();
    let err = full.encode(&odd).unwrap_err().to_string();
    assert!(err.contains("multiple of 4"), "{err}");
}

/// Counts the elements of every tensor a model asks for; hands out zeros.
struct Counting(Arc<AtomicUsize>);

impl SimpleBackend for Counting {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.fetch_add(s.elem_count(), Ordering::Relaxed);
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Millions of parameters the model loads.
fn parameters(cfg: &VqganConfig, parts: VqganParts) -> f64 {
    let total = Arc::new(AtomicUsize::new(0));
    let vb = VarBuilder::from_backend(Box::new(Counting(total.clone())), DType::F32, Device::Cpu);
    Vqgan::new(vb, cfg, parts).unwrap();
    total.load(Ordering::Relaxed) as f64 / 1e6
}

#[test]
fn full_size_architectures_have_the_published_parameter_counts() {
    // Millions of parameters of the autoencoders (taming's model cards / our spec).
    let cases = [
        (VqganConfig::imagenet_f16_16384(), VqganParts::Full, 76.1),
        (
            VqganConfig::imagenet_f16_16384(),
            VqganParts::DecodeOnly,
            46.7,
        ),
        (VqganConfig::imagenet_f16_1024(), VqganParts::Full, 72.1),
        (VqganConfig::gumbel_f8_8192(), VqganParts::Full, 69.0),
    ];
    for (cfg, parts, expected) in cases {
        let got = parameters(&cfg, parts);
        assert!(
            (got - expected).abs() < 0.1,
            "{cfg:?} {parts:?}: {got:.2} M parameters, expected {expected} M"
        );
    }
}

#[test]
fn clip_presets_have_the_published_parameter_counts() {
    use vqclip::engine::nets::clip::{Clip, ClipConfig};
    // Millions of parameters of Hugging Face's CLIPModel for each OpenAI checkpoint (less the
    // unused logit_scale), which also sets the download size: 4 bytes each in f32.
    let cases = [
        (ClipConfig::vit_b32(), 151.3),
        (ClipConfig::vit_b16(), 149.6),
        (ClipConfig::vit_l14(), 427.6),
        (ClipConfig::vit_l14_336(), 427.9),
    ];
    for (cfg, expected) in cases {
        let total = Arc::new(AtomicUsize::new(0));
        let vb =
            VarBuilder::from_backend(Box::new(Counting(total.clone())), DType::F32, Device::Cpu);
        Clip::new(vb, &cfg).unwrap();
        let got = total.load(Ordering::Relaxed) as f64 / 1e6;
        assert!(
            (got - expected).abs() < 0.1,
            "{:?}: {got:.2} M parameters, expected {expected} M",
            cfg.vision.patch_size
        );
    }
}
