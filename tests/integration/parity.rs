//! Parity with the PyTorch reference: every case in `tests/fixtures/parity/` (format in that
//! folder's README) is run and every tensor our code can compute is compared within the case's
//! tolerances. New `*.json` cases are picked up with no code change; a case that cannot be read or
//! run fails the test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;
use vqclip::engine::{
    self,
    ops::clamp_with_grad,
    vqgan::{QuantizerKind, VqganConfig, VqganParts},
};

const PARITY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parity");

#[derive(Debug, Deserialize)]
struct Case {
    format: String,
    format_version: u32,
    name: String,
    kind: String,
    tensors_file: String,
    weights: Weights,
    vqgan: VqganMeta,
    tensors: BTreeMap<String, TensorSpec>,
    encode: Option<EncodeMeta>,
    optimizer: Option<OptimizerMeta>,
}

#[derive(Debug, Deserialize)]
struct Weights {
    vqgan: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct VqganMeta {
    embed_dim: usize,
    n_embed: usize,
    ddconfig: DdConfig,
    group_norm: GroupNormMeta,
    downsample_factor: usize,
}

#[derive(Debug, Deserialize)]
struct DdConfig {
    double_z: bool,
    z_channels: usize,
    resolution: usize,
    in_channels: usize,
    out_ch: usize,
    ch: usize,
    ch_mult: Vec<usize>,
    num_res_blocks: usize,
    attn_resolutions: Vec<usize>,
}

#[derive(Debug, Deserialize)]
struct GroupNormMeta {
    num_groups: usize,
    eps: f64,
}

#[derive(Debug, Deserialize)]
struct TensorSpec {
    dtype: String,
    shape: Vec<usize>,
    role: String,
    #[serde(default)]
    atol: f64,
    #[serde(default)]
    rtol: f64,
}

#[derive(Debug, Deserialize)]
struct EncodeMeta {
    input: String,
}

#[derive(Debug, Deserialize)]
struct OptimizerMeta {
    z_init: String,
}

impl Case {
    fn vqgan_config(&self) -> anyhow::Result<VqganConfig> {
        let dd = &self.vqgan.ddconfig;
        ensure!(
            !dd.double_z,
            "double_z = true is not a VQGAN configuration we support"
        );
        let config = VqganConfig {
            ch: dd.ch,
            ch_mult: dd.ch_mult.clone(),
            num_res_blocks: dd.num_res_blocks,
            attn_resolutions: dd.attn_resolutions.clone(),
            resolution: dd.resolution,
            in_channels: dd.in_channels,
            out_ch: dd.out_ch,
            z_channels: dd.z_channels,
            embed_dim: self.vqgan.embed_dim,
            n_embed: self.vqgan.n_embed,
            quantizer: QuantizerKind::Nearest,
            norm_groups: self.vqgan.group_norm.num_groups,
            norm_eps: self.vqgan.group_norm.eps,
        };
        ensure!(
            config.downsample_factor() == self.vqgan.downsample_factor,
            "downsample factor {} in the case, {} from ch_mult",
            self.vqgan.downsample_factor,
            config.downsample_factor()
        );
        Ok(config)
    }
}

/// The case's tensors, and which of them have been compared.
struct Checker {
    expected: HashMap<String, Tensor>,
    specs: BTreeMap<String, TensorSpec>,
    checked: BTreeSet<String>,
    failures: Vec<String>,
}

impl Checker {
    fn input(&self, name: &str) -> anyhow::Result<Tensor> {
        let spec = self
            .specs
            .get(name)
            .with_context(|| format!("no tensor {name} in the manifest"))?;
        ensure!(spec.role == "input", "{name} is not an input");
        self.tensor(name)
    }

    fn tensor(&self, name: &str) -> anyhow::Result<Tensor> {
        let t = self
            .expected
            .get(name)
            .with_context(|| format!("{name} is missing from the tensors file"))?;
        let spec = &self.specs[name];
        ensure!(
            t.dims() == spec.shape.as_slice(),
            "{name}: stored shape {:?}, manifest {:?}",
            t.dims(),
            spec.shape
        );
        ensure!(
            format!("{:?}", t.dtype()).eq_ignore_ascii_case(&spec.dtype),
            "{name}: stored dtype {:?}, manifest {}",
            t.dtype(),
            spec.dtype
        );
        Ok(t.clone())
    }

    /// Whether the case provides `name` to compare against.
    fn has(&self, name: &str) -> bool {
        self.specs.get(name).is_some_and(|s| s.role != "input")
    }

    /// Compares `actual` with the case's `name` if the case has it.
    fn check(&mut self, name: &str, actual: &Tensor) -> anyhow::Result<()> {
        if !self.has(name) {
            return Ok(());
        }
        let expected = self.tensor(name)?;
        let spec = &self.specs[name];
        if actual.dims() != expected.dims() {
            self.failures.push(format!(
                "{name}: shape {:?}, expected {:?}",
                actual.dims(),
                expected.dims()
            ));
        } else if expected.dtype() == DType::I64 {
            let a: Vec<i64> = actual.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
            let e: Vec<i64> = expected.flatten_all()?.to_vec1()?;
            let wrong = a.iter().zip(&e).filter(|(a, e)| a != e).count();
            if wrong > 0 {
                self.failures
                    .push(format!("{name}: {wrong} of {} values differ", e.len()));
            }
        } else {
            let a: Vec<f64> = actual.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let e: Vec<f64> = expected.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let mut worst: Option<(usize, f64)> = None;
            let mut bad = 0;
            for (i, (a, e)) in a.iter().zip(&e).enumerate() {
                let err = (a - e).abs();
                // NaN fails too: it is never within tolerance.
                let within = err <= spec.atol + spec.rtol * e.abs();
                if !within {
                    bad += 1;
                }
                if worst.is_none_or(|(_, w)| err > w || err.is_nan()) {
                    worst = Some((i, err));
                }
            }
            if bad > 0 {
                let (i, err) = worst.unwrap_or_default();
                self.failures.push(format!(
                    "{name}: {bad} of {} values outside atol {} rtol {}; worst |Δ| = {err:.3e} at {i} (got {}, expected {})",
                    e.len(), spec.atol, spec.rtol, a[i], e[i]
                ));
            }
        }
        self.checked.insert(name.to_owned());
        Ok(())
    }
}

fn load_case(json: &Path) -> anyhow::Result<(Case, Checker)> {
    let text = std::fs::read_to_string(json)?;
    let mut case: Case = serde_json::from_str(&text).context("not a parity case")?;
    ensure!(
        case.format == "vqgan-clip-parity",
        "format {:?}",
        case.format
    );
    ensure!(
        case.format_version == 1,
        "unknown format_version {}",
        case.format_version
    );
    let expected = candle_core::safetensors::load(
        Path::new(PARITY_DIR).join(&case.tensors_file),
        &Device::Cpu,
    )
    .with_context(|| format!("reading {}", case.tensors_file))?;
    let specs = std::mem::take(&mut case.tensors);
    Ok((
        case,
        Checker {
            expected,
            specs,
            checked: BTreeSet::new(),
            failures: Vec::new(),
        },
    ))
}

fn weight_paths(files: &[String]) -> Vec<PathBuf> {
    files
        .iter()
        .map(|f| Path::new(PARITY_DIR).join(f))
        .collect()
}

/// The generation step through the VQGAN: quantise, decode, clamp; then `grad_z` by chaining the
/// stored gradient at the image (CLIP's part of the chain is the engine issue's).
fn run_step(case: &Case, c: &mut Checker) -> anyhow::Result<()> {
    let cfg = case.vqgan_config()?;
    let device = Device::Cpu;
    let vqgan = engine::load_vqgan(
        &case.name,
        &weight_paths(&case.weights.vqgan),
        &cfg,
        VqganParts::DecodeOnly,
        &device,
    )?;
    c.check("z_min", vqgan.z_min())?;
    c.check("z_max", vqgan.z_max())?;

    let z_init_name = case
        .optimizer
        .as_ref()
        .map_or("z_init", |o| o.z_init.as_str());
    let z = Var::from_tensor(&c.input(z_init_name)?)?;
    let quantized = vqgan.quantizer().quantize(z.as_tensor())?;
    c.check("vq_indices", &quantized.indices)?;
    c.check("z_q", &quantized.z_q)?;
    let decoder_out = vqgan.decode(&quantized.z_q)?;
    c.check("decoder_out", &decoder_out)?;
    let image = clamp_with_grad(&((decoder_out + 1.0)? / 2.0)?, 0.0, 1.0)?;
    c.check("image", &image)?;

    if c.has("grad_image") {
        let grad_image = c.tensor("grad_image")?;
        let grads = (image * grad_image)?.sum_all()?.backward()?;
        let grad_z = grads.get(z.as_tensor()).context("no gradient reached z")?;
        let largest = grad_z.abs()?.max_all()?.to_scalar::<f32>()?;
        ensure!(largest > 0.0, "the gradient reaching z is zero everywhere");
        c.check("grad_z", grad_z)?;
        c.check("grad_z_f64", grad_z)?;
    }
    Ok(())
}

/// The init-image path: encoder, quant_conv, quantisation.
fn run_encode(case: &Case, c: &mut Checker) -> anyhow::Result<()> {
    let cfg = case.vqgan_config()?;
    let meta = case
        .encode
        .as_ref()
        .context("an encode case needs an `encode` object")?;
    let vqgan = engine::load_vqgan(
        &case.name,
        &weight_paths(&case.weights.vqgan),
        &cfg,
        VqganParts::Full,
        &Device::Cpu,
    )?;
    let encoded = vqgan.encode(&c.input(&meta.input)?)?;
    c.check("encoder_out", &encoded.encoder_out)?;
    c.check("quant_conv_out", &encoded.quant_conv_out)?;
    c.check("z_q", &encoded.quantized.z_q)?;
    c.check("vq_indices", &encoded.quantized.indices)?;
    Ok(())
}

/// Runs one case; returns the tensors compared and those left for later issues.
fn run_case(json: &Path) -> anyhow::Result<(BTreeSet<String>, Vec<String>)> {
    let (case, mut checker) = load_case(json)?;
    match case.kind.as_str() {
        "step" => run_step(&case, &mut checker)?,
        "encode" => run_encode(&case, &mut checker)?,
        other => bail!("unknown kind {other:?}"),
    }
    if !checker.failures.is_empty() {
        bail!("{}", checker.failures.join("\n    "));
    }
    ensure!(
        !checker.checked.is_empty(),
        "no tensor of this case could be checked"
    );
    let unchecked = checker
        .specs
        .iter()
        .filter(|(name, spec)| spec.role != "input" && !checker.checked.contains(*name))
        .map(|(name, _)| name.clone())
        .collect();
    Ok((checker.checked, unchecked))
}

#[test]
fn parity_with_the_pytorch_reference_on_every_case() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(PARITY_DIR)
        .expect("the parity folder exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no parity cases in {PARITY_DIR}");

    let mut failures = Vec::new();
    for json in &cases {
        let name = json.file_stem().unwrap_or_default().to_string_lossy();
        match run_case(json) {
            Ok((checked, unchecked)) => {
                println!(
                    "{name}: matched {}",
                    checked.into_iter().collect::<Vec<_>>().join(", ")
                );
                if !unchecked.is_empty() {
                    // CLIP, cutouts, prompt losses and Adam come with the engine issue.
                    println!("{name}: not computed yet: {}", unchecked.join(", "));
                }
            }
            Err(e) => failures.push(format!("{name}: {e:#}")),
        }
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n  {}",
        failures.join("\n  ")
    );
}
