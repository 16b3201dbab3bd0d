//! `vqclip selftest`: the parity cases (made with PyTorch, taming-transformers and HF CLIP;
//! format in `tests/fixtures/parity/README.md`) run on a device, every stored tensor compared
//! within the case's tolerances. What someone runs on a new GPU host before opening the bot to
//! a server; the parity test runs the same code on the CPU, on both of the engine's paths.
//!
//! It knows the engine and the case format, nothing of the bot, the scheduler or the database.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;

use crate::engine::{
    cutouts::{CutoutBox, Cutouts, FixedBoxes},
    loss::{PromptTarget, prompt_loss},
    nets::{
        self, Precision, checkpoint,
        clip::{self, Clip, ClipConfig, ClipTextConfig, ClipVisionConfig},
        vqgan::{QuantizerKind, VqganConfig, VqganParts},
    },
    ops::clamp_with_grad,
    optimize::{
        Guide, InitWeight, Latent, Member, Nets, Optimizer, Training, clip_gradient, step_batch,
    },
};

/// A case's JSON manifest larger than this is refused before it is read.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// A case's tensors or weights file larger than this is refused before it is read.
const MAX_TENSOR_FILE_BYTES: u64 = 2 << 30;

/// One tensor compared.
#[derive(Debug, Clone)]
pub struct Compared {
    /// The tensor's name in the case.
    pub tensor: String,
    /// The largest |ours − reference| over its values.
    pub worst_abs: f64,
    /// The largest |ours − reference| / (atol + rtol·|reference|): at most 1 is within the
    /// tolerance (0 for integer tensors that match exactly).
    pub worst_of_tolerance: f64,
}

/// How one case went.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// The case's file stem.
    pub name: String,
    /// Every tensor compared, by name.
    pub compared: Vec<Compared>,
    /// What was outside its tolerance, or expected and never computed; empty when the case
    /// passes.
    pub failures: Vec<String>,
    /// Tensors the case has that this precision cannot be held to (see [`run_case`]).
    pub skipped: Vec<String>,
}

impl CaseReport {
    /// The compared tensor furthest from its tolerance.
    pub fn worst(&self) -> Option<&Compared> {
        self.compared
            .iter()
            .max_by(|a, b| a.worst_of_tolerance.total_cmp(&b.worst_of_tolerance))
    }
}

/// The cases (`*.json`) in `dir`, sorted.
pub fn cases_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the parity folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    ensure!(
        !cases.is_empty(),
        "no parity cases (*.json) in {}",
        dir.display()
    );
    Ok(cases)
}

/// How much a CLIP in `precision` widens every tolerance of a case: 1 for f32; for the half
/// types, the smallest round factor over the worst share of tolerance measured on the
/// repository's cases with the composed ops on the CPU (BENCHMARKS.md, "Precision"), with
/// room for a GPU's different summation order.
pub fn tolerance_factor(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1.0,
        Precision::F16 => F16_TOLERANCE_FACTOR,
        Precision::Bf16 => BF16_TOLERANCE_FACTOR,
    }
}

/// See [`tolerance_factor`]: the worst share measured was 129 (`loss` of `tiny_multiprompt`;
/// f16 has 11 bits of mantissa to f32's 24, a factor of 8192 in rounding).
const F16_TOLERANCE_FACTOR: f64 = 200.0;
/// See [`tolerance_factor`]: the worst share measured was 512 (`grad_image` of
/// `tiny_multiprompt`; bf16 has 8 bits of mantissa).
const BF16_TOLERANCE_FACTOR: f64 = 800.0;

/// Runs the case `json` on `device` with CLIP in `precision` (the case's tolerances widened by
/// [`tolerance_factor`]); an error when the case cannot be read or run at all.
///
/// In half precision the steps run but the Adam trajectory after them is not compared: Adam's
/// first update is about `lr·sign(g)`, so every gradient component within rounding of zero
/// lands `2·lr` from the reference's, and the steps after it start from another latent.
pub fn run_case(json: &Path, device: &Device, precision: Precision) -> anyhow::Result<CaseReport> {
    let name = json
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let (case, mut checker) = load_case(json, device)?;
    checker.precision = precision;
    match case.kind.as_str() {
        "step" => run_step(&case, &mut checker)?,
        "encode" => run_encode(&case, &mut checker)?,
        other => bail!("unknown kind {other:?}"),
    }
    ensure!(
        !checker.compared.is_empty(),
        "no tensor of this case could be checked"
    );
    // Every expected tensor must be computed and compared: a case that grows a tensor we
    // ignore fails rather than passing unnoticed.
    let unchecked: Vec<String> = checker
        .specs
        .iter()
        .filter(|(name, spec)| {
            spec.role != "input"
                && !checker.compared.iter().any(|c| &c.tensor == *name)
                && !checker.skipped.contains(name)
        })
        .map(|(name, _)| name.clone())
        .collect();
    if !unchecked.is_empty() {
        checker
            .failures
            .push(format!("not compared: {}", unchecked.join(", ")));
    }
    Ok(CaseReport {
        name,
        compared: checker.compared,
        failures: checker.failures,
        skipped: checker.skipped,
    })
}

/// The size of `path`, refused above `limit` bytes.
fn bounded(path: &Path, limit: u64) -> anyhow::Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    ensure!(
        len <= limit,
        "{} is {len} bytes, more than the {limit} a parity file may have",
        path.display()
    );
    Ok(())
}

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
    clip: Option<ClipMeta>,
    cutouts: Option<CutoutsMeta>,
    normalize: Option<NormalizeMeta>,
    #[serde(default)]
    prompts: Vec<PromptMeta>,
    steps: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct Weights {
    vqgan: Vec<String>,
    #[serde(default)]
    clip: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ClipMeta {
    projection_dim: usize,
    vision: ClipTowerMeta,
    text: ClipTowerMeta,
}

#[derive(Debug, Deserialize)]
struct ClipTowerMeta {
    #[serde(default)]
    image_size: usize,
    #[serde(default)]
    patch_size: usize,
    #[serde(default)]
    vocab_size: usize,
    #[serde(default)]
    context_length: usize,
    embed_dim: usize,
    intermediate_size: usize,
    num_layers: usize,
    num_attention_heads: usize,
    activation: String,
    layer_norm_eps: f64,
    #[serde(default)]
    eos_token_id: u32,
}

#[derive(Debug, Deserialize)]
struct CutoutsMeta {
    cutn: usize,
    cut_size: usize,
    boxes: String,
    box_columns: Vec<String>,
    resample: String,
}

#[derive(Debug, Deserialize)]
struct NormalizeMeta {
    mean: [f32; 3],
    std: [f32; 3],
}

#[derive(Debug, Deserialize)]
struct PromptMeta {
    token_ids: String,
    weight: f64,
    stop: Option<f64>,
    text_embed: String,
    dists: String,
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
    #[serde(rename = "type")]
    kind: String,
    z_init: String,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
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

impl Case {
    fn clip_config(&self) -> anyhow::Result<ClipConfig> {
        let meta = self
            .clip
            .as_ref()
            .context("a step case needs a `clip` object")?;
        for tower in [&meta.vision, &meta.text] {
            ensure!(
                tower.activation == "quick_gelu",
                "activation {:?} is not OpenAI CLIP's",
                tower.activation
            );
        }
        let (v, t) = (&meta.vision, &meta.text);
        Ok(ClipConfig {
            vision: ClipVisionConfig {
                image_size: v.image_size,
                patch_size: v.patch_size,
                hidden_size: v.embed_dim,
                intermediate_size: v.intermediate_size,
                num_layers: v.num_layers,
                num_heads: v.num_attention_heads,
                layer_norm_eps: v.layer_norm_eps,
            },
            text: ClipTextConfig {
                vocab_size: t.vocab_size,
                context_length: t.context_length,
                hidden_size: t.embed_dim,
                intermediate_size: t.intermediate_size,
                num_layers: t.num_layers,
                num_heads: t.num_attention_heads,
                layer_norm_eps: t.layer_norm_eps,
                eos_token_id: t.eos_token_id,
            },
            projection_dim: meta.projection_dim,
        })
    }
}

/// The case's tensors, and which of them have been compared.
struct Checker {
    /// The reference's tensors, on the CPU.
    expected: HashMap<String, Tensor>,
    specs: BTreeMap<String, TensorSpec>,
    compared: Vec<Compared>,
    failures: Vec<String>,
    /// Where the case runs.
    device: Device,
    /// The case's folder: its files are named relative to it.
    dir: PathBuf,
    /// CLIP's precision, which widens the tolerances.
    precision: Precision,
    /// Tensors of the case left uncompared on purpose.
    skipped: Vec<String>,
}

impl Checker {
    /// An input tensor on the case's device.
    fn input_on_device(&self, name: &str) -> anyhow::Result<Tensor> {
        Ok(self.input(name)?.to_device(&self.device)?)
    }

    /// An input tensor, on the CPU (integer inputs are read back as numbers).
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

    /// Compares a tensor of the Adam trajectory, in f32 only (see [`run_case`]).
    fn check_trajectory(&mut self, name: &str, actual: &Tensor) -> anyhow::Result<()> {
        self.check_trajectory_as(name, name, actual)
    }

    /// [`Checker::check_trajectory`], reported as `label`.
    fn check_trajectory_as(
        &mut self,
        name: &str,
        label: &str,
        actual: &Tensor,
    ) -> anyhow::Result<()> {
        if self.precision == Precision::F32 {
            return self.check_as(name, label, actual);
        }
        self.skip_trajectory(name);
        Ok(())
    }

    /// Notes a trajectory tensor as not compared (half precision).
    fn skip_trajectory(&mut self, name: &str) {
        if self.has(name) && !self.skipped.iter().any(|s| s == name) {
            self.skipped.push(name.to_owned());
        }
    }

    /// Compares `actual` with the case's `name` if the case has it.
    fn check(&mut self, name: &str, actual: &Tensor) -> anyhow::Result<()> {
        self.check_as(name, name, actual)
    }

    /// Compares `actual` with the case's `name` if the case has it, reported as `label`.
    fn check_as(&mut self, name: &str, label: &str, actual: &Tensor) -> anyhow::Result<()> {
        if !self.has(name) {
            return Ok(());
        }
        let expected = self.tensor(name)?;
        let spec = &self.specs[name];
        // Compared on the CPU, in f64 (which some devices lack).
        let actual = actual.to_device(&Device::Cpu)?;
        let mut worst_abs = 0.0f64;
        let mut worst_of_tolerance = 0.0f64;
        if actual.dims() != expected.dims() {
            self.failures.push(format!(
                "{label}: shape {:?}, expected {:?}",
                actual.dims(),
                expected.dims()
            ));
            worst_of_tolerance = f64::INFINITY;
        } else if expected.dtype() == DType::I64 {
            let a: Vec<i64> = actual.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
            let e: Vec<i64> = expected.flatten_all()?.to_vec1()?;
            let wrong = a.iter().zip(&e).filter(|(a, e)| a != e).count();
            if wrong > 0 {
                self.failures
                    .push(format!("{label}: {wrong} of {} values differ", e.len()));
                worst_of_tolerance = f64::INFINITY;
            }
        } else {
            let a: Vec<f64> = actual.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let e: Vec<f64> = expected.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let mut worst: Option<(usize, f64)> = None;
            let mut bad = 0;
            let widen = tolerance_factor(self.precision);
            for (i, (a, e)) in a.iter().zip(&e).enumerate() {
                let err = (a - e).abs();
                let allowed = (spec.atol + spec.rtol * e.abs()) * widen;
                // NaN fails too: it is never within tolerance.
                let within = err <= allowed;
                if !within {
                    bad += 1;
                }
                let share = if err.is_nan() {
                    f64::INFINITY
                } else if allowed > 0.0 {
                    err / allowed
                } else if err == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                };
                worst_of_tolerance = worst_of_tolerance.max(share);
                if worst.is_none_or(|(_, w)| err > w || err.is_nan()) {
                    worst = Some((i, err));
                }
            }
            let (i, err) = worst.unwrap_or_default();
            worst_abs = err;
            if bad > 0 {
                self.failures.push(format!(
                    "{label}: {bad} of {} values outside atol {} rtol {}; worst |Δ| = {err:.3e} at {i} (got {}, expected {})",
                    e.len(), spec.atol * widen, spec.rtol * widen, a[i], e[i]
                ));
            }
        }
        self.compared.retain(|c| c.tensor != label);
        self.compared.push(Compared {
            tensor: label.to_owned(),
            worst_abs,
            worst_of_tolerance,
        });
        Ok(())
    }
}

fn load_case(json: &Path, device: &Device) -> anyhow::Result<(Case, Checker)> {
    bounded(json, MAX_MANIFEST_BYTES)?;
    let text =
        std::fs::read_to_string(json).with_context(|| format!("cannot read {}", json.display()))?;
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
    let dir = json.parent().unwrap_or(Path::new(".")).to_path_buf();
    let tensors = case_file(&dir, &case.tensors_file)?;
    let expected = candle_core::safetensors::load(&tensors, &Device::Cpu)
        .with_context(|| format!("reading {}", case.tensors_file))?;
    let specs = std::mem::take(&mut case.tensors);
    Ok((
        case,
        Checker {
            expected,
            specs,
            compared: Vec::new(),
            failures: Vec::new(),
            device: device.clone(),
            dir,
            precision: Precision::F32,
            skipped: Vec::new(),
        },
    ))
}

/// A file a case names, inside the case's folder and within the size limit.
fn case_file(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let relative = Path::new(name);
    ensure!(
        relative
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_))),
        "the case names {name:?}: files must be inside the case's folder"
    );
    let path = dir.join(relative);
    bounded(&path, MAX_TENSOR_FILE_BYTES)?;
    Ok(path)
}

fn weight_paths(dir: &Path, files: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    files.iter().map(|f| case_file(dir, f)).collect()
}

/// The generation step, link by link as the fixtures' README describes, then the Adam
/// trajectory through the engine's own step.
fn run_step(case: &Case, c: &mut Checker) -> anyhow::Result<()> {
    let device = c.device.clone();
    let vqgan = nets::vqgan_from_files(
        &case.name,
        &weight_paths(&c.dir, &case.weights.vqgan)?,
        &case.vqgan_config()?,
        VqganParts::DecodeOnly,
        &device,
    )?;
    let clip_cfg = case.clip_config()?;
    let clip_vb = checkpoint::var_builder(
        &weight_paths(&c.dir, &case.weights.clip)?,
        c.precision.dtype(),
        &device,
    )?;
    let clip = Clip::new(clip_vb, &clip_cfg).context("loading CLIP")?;
    let optimizer = case
        .optimizer
        .as_ref()
        .context("a step case needs an `optimizer` object")?;
    let kind = Optimizer::parse(&optimizer.kind)
        .with_context(|| format!("the optimizer {:?} is not one of ours", optimizer.kind))?;
    ensure!(
        (optimizer.beta1, optimizer.beta2) == (0.9, 0.999)
            && optimizer.eps == kind.eps()
            && optimizer.weight_decay == kind.weight_decay(),
        "{} with other hyper-parameters than the reference gives it",
        optimizer.kind
    );
    let training = Training {
        learning_rate: optimizer.lr,
        optimizer: kind,
        ema: None,
    };
    let meta = case
        .cutouts
        .as_ref()
        .context("a step case needs a `cutouts` object")?;
    ensure!(
        meta.resample == "adaptive_avg_pool2d",
        "resample {:?} is not implemented here",
        meta.resample
    );
    ensure!(
        meta.box_columns == ["offset_x", "offset_y", "size"],
        "box columns {:?}",
        meta.box_columns
    );
    ensure!(
        meta.cut_size == clip_cfg.vision.image_size,
        "cut size {} differs from CLIP's input",
        meta.cut_size
    );
    if let Some(n) = &case.normalize {
        ensure!(
            n.mean == clip::MEAN && n.std == clip::STD,
            "normalisation constants differ from OpenAI CLIP's"
        );
    }

    let boxes: Vec<Vec<i64>> = c.input(&meta.boxes)?.to_vec2()?;
    ensure!(
        boxes.len() == meta.cutn,
        "{} boxes for cutn {}",
        boxes.len(),
        meta.cutn
    );
    let boxes = FixedBoxes::new(
        boxes
            .iter()
            .map(|b| CutoutBox {
                x: b[0] as usize,
                y: b[1] as usize,
                size: b[2] as usize,
            })
            .collect(),
        meta.cut_size,
    );

    // Prompts: text embeddings from the stored token ids.
    let mut prompts = Vec::new();
    for p in &case.prompts {
        let ids: Vec<i64> = c.input(&p.token_ids)?.flatten_all()?.to_vec1()?;
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| u32::try_from(i))
            .collect::<Result<_, _>>()?;
        let embed = clip.text.forward(&ids)?;
        c.check(&p.text_embed, &embed)?;
        prompts.push(PromptTarget {
            embed,
            weight: p.weight,
            stop: p.stop,
        });
    }
    ensure!(!prompts.is_empty(), "a step case needs prompts");

    // VQGAN half of step 1.
    c.check("z_min", vqgan.z_min())?;
    c.check("z_max", vqgan.z_max())?;
    let z = Var::from_tensor(&c.input_on_device(&optimizer.z_init)?)?;
    let quantized = vqgan.quantizer().quantize(z.as_tensor())?;
    c.check("vq_indices", &quantized.indices)?;
    c.check("z_q", &quantized.z_q)?;
    let decoder_out = vqgan.decode(&quantized.z_q)?;
    c.check("decoder_out", &decoder_out)?;
    let image = clamp_with_grad(&((decoder_out + 1.0)? / 2.0)?, 0.0, 1.0)?;
    c.check("image", &image)?;

    // CLIP half of step 1, forward.
    let cutn = boxes.count();
    let cutouts = clip::normalize(&boxes.cut(&image.detach(), 0..cutn)?)?;
    c.check("cutouts", &cutouts)?;
    let embeds = clip.vision.forward(&cutouts)?;
    c.check("image_embeds", &embeds)?;
    let losses_of = |embeds: &Tensor| -> anyhow::Result<(Tensor, Vec<Tensor>, Vec<Tensor>)> {
        let mut total: Option<Tensor> = None;
        let (mut each, mut dists) = (Vec::new(), Vec::new());
        for p in &prompts {
            let (loss, d) = prompt_loss(embeds, p, cutn)?;
            total = Some(match total {
                Some(t) => (t + &loss)?,
                None => loss.clone(),
            });
            each.push(loss);
            dists.push(d.squeeze(1)?);
        }
        Ok((total.context("no prompts")?, each, dists))
    };
    let (loss, each, dists) = losses_of(&embeds)?;
    for (p, d) in case.prompts.iter().zip(&dists) {
        c.check(&p.dists, d)?;
    }
    c.check("prompt_losses", &Tensor::stack(&each, 0)?)?;
    c.check("loss", &loss.reshape(1)?)?;
    c.check("loss_f64", &loss.reshape(1)?)?;

    // Backward, link by link.
    let embeds_v = Var::from_tensor(&embeds.detach())?;
    let grads = losses_of(embeds_v.as_tensor())?.0.backward()?;
    c.check(
        "grad_image_embeds",
        grads
            .get(embeds_v.as_tensor())
            .context("no gradient at the embeddings")?,
    )?;
    let cutouts_v = Var::from_tensor(&cutouts.detach())?;
    let grads = losses_of(&clip.vision.forward(cutouts_v.as_tensor())?)?
        .0
        .backward()?;
    c.check(
        "grad_cutouts",
        grads
            .get(cutouts_v.as_tensor())
            .context("no gradient at the cutouts")?,
    )?;
    // The engine's chunked gradient at the image (two cutouts per chunk, to exercise the sum).
    let guide = Guide {
        vqgan: &vqgan,
        clip: &clip.vision,
        prompts: &prompts,
        chunk: 2,
        init_weight: InitWeight::Off,
    };
    let (grad_image, _, _) = clip_gradient(&guide, &boxes, &image.detach())?;
    c.check("grad_image", &grad_image)?;
    // When the case stores the image gradient, chain exactly that one (it isolates the VQGAN);
    // otherwise ours.
    let chained = if c.has("grad_image") {
        c.tensor("grad_image")?.to_device(&device)?
    } else {
        grad_image
    };
    let grads = (image * chained)?.sum_all()?.backward()?;
    let grad_z = grads.get(z.as_tensor()).context("no gradient reached z")?;
    ensure!(
        grad_z.abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
        "the gradient reaching z is zero everywhere"
    );
    c.check("grad_z", grad_z)?;
    c.check("grad_z_f64", grad_z)?;

    // The trajectory: the engine's step, `steps` times. In half precision it is not compared
    // (see `run_case`); Adam's cases still run it, so the half-precision step is exercised, and
    // the other optimisers' cases, whose step is the same but for the update, skip it.
    let steps = case.steps.context("a step case needs `steps`")?;
    if kind != Optimizer::Adam && c.precision != Precision::F32 {
        for name in (1..=steps)
            .map(|k| format!("z_after_step{k}"))
            .chain(["losses".into()])
        {
            c.skip_trajectory(&name);
        }
        return Ok(());
    }
    let mut latent = Latent::trained(
        &c.input_on_device(&optimizer.z_init)?,
        vqgan.z_min(),
        vqgan.z_max(),
        training,
    )?;
    let mut losses = Vec::new();
    for k in 1..=steps {
        let report = latent.step(&guide, &boxes)?;
        losses.push(report.loss as f32);
        c.check_trajectory(&format!("z_after_step{k}"), latent.z())?;
    }
    c.check_trajectory("losses", &Tensor::new(losses, &device)?)?;

    // The same trajectory for each latent of a batch of copies (as a grid or several jobs run).
    // Each latent steps its own optimiser whatever its kind, so Adam's cases show it for all.
    if kind != Optimizer::Adam {
        return Ok(());
    }
    let mut copies = (0..BATCH_COPIES)
        .map(|_| {
            Latent::trained(
                &c.input_on_device(&optimizer.z_init)?,
                vqgan.z_min(),
                vqgan.z_max(),
                training,
            )
            .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nets = Nets {
        vqgan: &vqgan,
        clip: &clip.vision,
        chunk: guide.chunk,
    };
    let mut losses = vec![Vec::new(); BATCH_COPIES];
    for k in 1..=steps {
        let mut members: Vec<Member> = copies
            .iter_mut()
            .map(|latent| Member {
                latent,
                prompts: &prompts,
                init_weight: InitWeight::Off,
                cutouts: &boxes,
                tile: None,
            })
            .collect();
        let reports = step_batch(&nets, &mut members)?;
        for (j, (latent, report)) in copies.iter().zip(reports).enumerate() {
            losses[j].push(report.loss as f32);
            let label = format!("z_after_step{k} (batch copy {})", j + 1);
            c.check_trajectory_as(&format!("z_after_step{k}"), &label, latent.z())?;
        }
    }
    for (j, losses) in losses.into_iter().enumerate() {
        let label = format!("losses (batch copy {})", j + 1);
        c.check_trajectory_as("losses", &label, &Tensor::new(losses, &device)?)?;
    }
    Ok(())
}

/// Latents in the batch a step case also runs as.
const BATCH_COPIES: usize = 2;

/// The init-image path: encoder, quant_conv, quantisation.
fn run_encode(case: &Case, c: &mut Checker) -> anyhow::Result<()> {
    let cfg = case.vqgan_config()?;
    let meta = case
        .encode
        .as_ref()
        .context("an encode case needs an `encode` object")?;
    let vqgan = nets::vqgan_from_files(
        &case.name,
        &weight_paths(&c.dir, &case.weights.vqgan)?,
        &cfg,
        VqganParts::Full,
        &c.device,
    )?;
    let encoded = vqgan.encode(&c.input_on_device(&meta.input)?)?;
    c.check("encoder_out", &encoded.encoder_out)?;
    c.check("quant_conv_out", &encoded.quant_conv_out)?;
    c.check("z_q", &encoded.quantized.z_q)?;
    c.check("vq_indices", &encoded.quantized.indices)?;
    Ok(())
}
