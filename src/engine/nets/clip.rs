//! OpenAI CLIP (Hugging Face `CLIPModel` weight names): the vision tower that scores cutouts,
//! differentiable with respect to its pixels, and the text tower that embeds prompts.
//!
//! A port of `transformers/models/clip/modeling_clip.py` with OpenAI's semantics (QuickGELU,
//! pre-LN layers, text pooled at the end-of-text token). candle-transformers has a CLIP, but its
//! fused LayerNorm and softmax have no backward, so the gradient to the pixels silently vanishes;
//! this one uses the input-gradient-only ops of [`crate::engine::ops`] and the composed softmax. Both
//! towers share the encoder layer; the text tower never needs a gradient.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::ops::{
    FrozenLayerNorm, FrozenLinear, add_constant, quick_gelu, scale_shift, self_attention,
};

/// The vision tower's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    /// Input side in pixels (the cut size).
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Transformer width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// About how many bytes of activations one cutout keeps for the backward pass in `dtype`:
    /// per layer and token, some 15 widths (the norms' outputs, q, k, v, the attention's output,
    /// the MLP's two 4-wide tensors, the residuals) and a row of attention weights per head.
    /// An estimate for sizing chunks, not an accounting.
    pub fn activation_bytes_per_cutout(&self, dtype: DType) -> u64 {
        let tokens = ((self.image_size / self.patch_size.max(1)).pow(2) + 1) as u64;
        let per_token = 15 * self.hidden_size as u64 + (self.num_heads as u64) * tokens;
        per_token * tokens * self.num_layers as u64 * dtype.size_in_bytes() as u64
    }
}

/// The text tower's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Longest token sequence (77).
    pub context_length: usize,
    /// Transformer width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// The end-of-text token, where the sequence is pooled.
    pub eos_token_id: u32,
}

/// A CLIP model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Vision tower.
    pub vision: ClipVisionConfig,
    /// Text tower.
    pub text: ClipTextConfig,
    /// Width of the shared embedding space.
    pub projection_dim: usize,
}

/// OpenAI's CLIP input normalisation, per RGB channel, on [0, 1] pixels.
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// See [`MEAN`].
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl ClipConfig {
    fn openai_text(hidden_size: usize, num_heads: usize) -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 49408,
            context_length: 77,
            hidden_size,
            intermediate_size: 4 * hidden_size,
            num_layers: 12,
            num_heads,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }

    fn vit_b(patch_size: usize) -> Self {
        Self {
            vision: ClipVisionConfig {
                image_size: 224,
                patch_size,
                hidden_size: 768,
                intermediate_size: 3072,
                num_layers: 12,
                num_heads: 12,
                layer_norm_eps: 1e-5,
            },
            text: Self::openai_text(512, 8),
            projection_dim: 512,
        }
    }

    fn vit_l(image_size: usize) -> Self {
        Self {
            vision: ClipVisionConfig {
                image_size,
                patch_size: 14,
                hidden_size: 1024,
                intermediate_size: 4096,
                num_layers: 24,
                num_heads: 16,
                layer_norm_eps: 1e-5,
            },
            text: Self::openai_text(768, 12),
            projection_dim: 768,
        }
    }

    /// ViT-B/32, the default guide.
    pub fn vit_b32() -> Self {
        Self::vit_b(32)
    }

    /// ViT-B/16.
    pub fn vit_b16() -> Self {
        Self::vit_b(16)
    }

    /// ViT-L/14.
    pub fn vit_l14() -> Self {
        Self::vit_l(224)
    }

    /// ViT-L/14 at 336 px.
    pub fn vit_l14_336() -> Self {
        Self::vit_l(336)
    }

    /// The parity fixtures' tiny random model.
    pub fn tiny() -> Self {
        Self {
            vision: ClipVisionConfig {
                image_size: 32,
                patch_size: 8,
                hidden_size: 64,
                intermediate_size: 256,
                num_layers: 2,
                num_heads: 4,
                layer_norm_eps: 1e-5,
            },
            text: ClipTextConfig {
                vocab_size: 512,
                context_length: 77,
                hidden_size: 64,
                intermediate_size: 256,
                num_layers: 2,
                num_heads: 4,
                layer_norm_eps: 1e-5,
                eos_token_id: 511,
            },
            projection_dim: 32,
        }
    }

    /// A second tiny CLIP for tests of ensembles: another input size (48 px in patches of 16)
    /// and embedding width than [`Self::tiny`], the same tokenizer.
    pub fn tiny_48() -> Self {
        let tiny = Self::tiny();
        Self {
            vision: ClipVisionConfig {
                image_size: 48,
                patch_size: 16,
                hidden_size: 48,
                intermediate_size: 192,
                ..tiny.vision
            },
            text: ClipTextConfig {
                hidden_size: 48,
                intermediate_size: 192,
                ..tiny.text
            },
            projection_dim: 24,
        }
    }

    /// The preset named like a catalogue model id (`vit_b32`, `tiny_clip`, …).
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "vit_b32" => Self::vit_b32(),
            "vit_b16" => Self::vit_b16(),
            "vit_l14" => Self::vit_l14(),
            "vit_l14_336" => Self::vit_l14_336(),
            "tiny" | "tiny_clip" => Self::tiny(),
            "tiny_clip_48" => Self::tiny_48(),
            _ => return None,
        })
    }
}

/// Multi-head self-attention (`self_attn.{q,k,v,out}_proj`), the three input projections
/// fused into one `[3h, h]` product.
#[derive(Debug, Clone)]
struct Attention {
    qkv_proj: FrozenLinear,
    out_proj: FrozenLinear,
    num_heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, hidden: usize, num_heads: usize) -> Result<Self> {
        let (mut weights, mut biases) = (Vec::new(), Vec::new());
        for name in ["q_proj", "k_proj", "v_proj"] {
            weights.push(vb.pp(name).get((hidden, hidden), "weight")?);
            biases.push(vb.pp(name).get(hidden, "bias")?);
        }
        Ok(Self {
            qkv_proj: FrozenLinear::new(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?)),
            out_proj: FrozenLinear::load(vb.pp("out_proj"), hidden, hidden, true)?,
            num_heads,
        })
    }

    /// `x` `[b, n, hidden]`; `causal`: the text tower's mask (position i sees positions ≤ i).
    fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let qkv = self.qkv_proj.forward(x)?;
        self.out_proj
            .forward(&self_attention(&qkv, self.num_heads, causal)?)
    }
}

/// One pre-LN transformer layer (`encoder.layers.{l}`).
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: FrozenLayerNorm,
    self_attn: Attention,
    layer_norm2: FrozenLayerNorm,
    fc1: FrozenLinear,
    fc2: FrozenLinear,
}

impl EncoderLayer {
    fn new(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        heads: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            layer_norm1: FrozenLayerNorm::load(vb.pp("layer_norm1"), hidden, eps)?,
            self_attn: Attention::new(vb.pp("self_attn"), hidden, heads)?,
            layer_norm2: FrozenLayerNorm::load(vb.pp("layer_norm2"), hidden, eps)?,
            fc1: FrozenLinear::load(vb.pp("mlp").pp("fc1"), hidden, intermediate, true)?,
            fc2: FrozenLinear::load(vb.pp("mlp").pp("fc2"), intermediate, hidden, true)?,
        })
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let x = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, causal)?)?;
        let mlp = self.fc2.forward(&quick_gelu(
            &self.fc1.forward(&self.layer_norm2.forward(&x)?)?,
        )?)?;
        x + mlp
    }
}

fn load_layers(
    vb: VarBuilder,
    count: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    eps: f64,
) -> Result<Vec<EncoderLayer>> {
    (0..count)
        .map(|l| EncoderLayer::new(vb.pp("layers").pp(l), hidden, intermediate, heads, eps))
        .collect()
}

/// The vision tower and `visual_projection`: normalised cutouts → image embeddings.
#[derive(Debug, Clone)]
pub struct ClipVision {
    config: ClipVisionConfig,
    patch_embedding: FrozenLinear,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: FrozenLayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: FrozenLayerNorm,
    visual_projection: FrozenLinear,
}

impl ClipVision {
    /// Loads `vision_model.*` and `visual_projection.weight` (pass the root builder).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let v = &cfg.vision;
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let patch_inputs = 3 * v.patch_size * v.patch_size;
        // The stride-p, kernel-p convolution is a matrix product on flattened patches
        // (exact, and several times faster than candle's conv).
        let kernel = emb
            .get(
                (v.hidden_size, 3, v.patch_size, v.patch_size),
                "patch_embedding.weight",
            )?
            .reshape((v.hidden_size, patch_inputs))?;
        let positions = (v.image_size / v.patch_size).pow(2) + 1;
        Ok(Self {
            config: v.clone(),
            patch_embedding: FrozenLinear::new(kernel, None),
            class_embedding: emb.get(v.hidden_size, "class_embedding")?,
            position_embedding: emb.get((positions, v.hidden_size), "position_embedding.weight")?,
            pre_layrnorm: FrozenLayerNorm::load(
                vm.pp("pre_layrnorm"),
                v.hidden_size,
                v.layer_norm_eps,
            )?,
            layers: load_layers(
                vm.pp("encoder"),
                v.num_layers,
                v.hidden_size,
                v.intermediate_size,
                v.num_heads,
                v.layer_norm_eps,
            )?,
            post_layernorm: FrozenLayerNorm::load(
                vm.pp("post_layernorm"),
                v.hidden_size,
                v.layer_norm_eps,
            )?,
            visual_projection: FrozenLinear::load(
                vb.pp("visual_projection"),
                v.hidden_size,
                cfg.projection_dim,
                false,
            )?,
        })
    }

    /// The shape this tower was built with.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The floating-point type the tower's weights are in (see [`super::Precision`]).
    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    /// Embeds normalised pixels `[b, 3, S, S]` (S = `image_size`) into `[b, projection_dim]`
    /// f32 embeddings, whatever the tower's own dtype (the cast back carries the gradient).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = &pixels.to_dtype(self.dtype())?;
        let (b, c, h, w) = pixels.dims4()?;
        let (s, p) = (self.config.image_size, self.config.patch_size);
        if (c, h, w) != (3, s, s) {
            candle_core::bail!("CLIP vision expects [b, 3, {s}, {s}], got [{b}, {c}, {h}, {w}]");
        }
        let grid = s / p;
        // [b, 3, gy, p, gx, p] → [b, gy, gx, 3, p, p]: row-major patches, as the conv's output.
        let patches = pixels
            .reshape((b, 3, grid, p, grid, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, grid * grid, 3 * p * p))?;
        let tokens = self.patch_embedding.forward(&patches)?;
        let hidden = self.config.hidden_size;
        let class = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let x = Tensor::cat(&[&class.contiguous()?, &tokens], 1)?;
        let x = add_constant(&x, &self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, false)?;
        }
        let pooled = self
            .post_layernorm
            .forward(&x.i((.., 0, ..))?.contiguous()?)?;
        self.visual_projection
            .forward(&pooled)?
            .to_dtype(DType::F32)
    }
}

/// The text tower and `text_projection`: token ids → text embeddings. No gradient is needed.
#[derive(Debug, Clone)]
pub struct ClipText {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: FrozenLayerNorm,
    text_projection: FrozenLinear,
}

impl ClipText {
    /// Loads `text_model.*` and `text_projection.weight` (pass the root builder).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let t = &cfg.text;
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        Ok(Self {
            config: t.clone(),
            token_embedding: emb.get((t.vocab_size, t.hidden_size), "token_embedding.weight")?,
            position_embedding: emb.get(
                (t.context_length, t.hidden_size),
                "position_embedding.weight",
            )?,
            layers: load_layers(
                tm.pp("encoder"),
                t.num_layers,
                t.hidden_size,
                t.intermediate_size,
                t.num_heads,
                t.layer_norm_eps,
            )?,
            final_layer_norm: FrozenLayerNorm::load(
                tm.pp("final_layer_norm"),
                t.hidden_size,
                t.layer_norm_eps,
            )?,
            text_projection: FrozenLinear::load(
                vb.pp("text_projection"),
                t.hidden_size,
                cfg.projection_dim,
                false,
            )?,
        })
    }

    /// The shape this tower was built with.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Width of the embeddings this tower produces.
    pub fn projection_dim(&self) -> usize {
        self.text_projection.out_dim()
    }

    /// The device its weights are on (the vision tower's too).
    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    /// Embeds one token sequence (start and end tokens included, at most `context_length`, any
    /// padding after the end token) into `[1, projection_dim]`, in f32.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        self.forward_batch(&[ids])
    }

    /// Embeds several token sequences, each as [`ClipText::forward`] takes one, into
    /// `[sequences, projection_dim]` in one pass: shorter ones are padded after their end
    /// token, which the causal mask keeps from changing their pooled row.
    pub fn forward_batch(&self, sequences: &[&[u32]]) -> Result<Tensor> {
        if sequences.is_empty() {
            candle_core::bail!("no token sequence to embed");
        }
        let longest = sequences.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let mut padded = Vec::with_capacity(sequences.len() * longest);
        let mut ends = Vec::with_capacity(sequences.len());
        for ids in sequences {
            let n = ids.len();
            if n == 0 || n > self.config.context_length {
                candle_core::bail!(
                    "CLIP text takes 1 to {} tokens, got {n}",
                    self.config.context_length
                );
            }
            let Some(eos) = ids.iter().position(|&id| id == self.config.eos_token_id) else {
                candle_core::bail!(
                    "the token sequence has no end-of-text token {}",
                    self.config.eos_token_id
                );
            };
            ends.push(eos);
            padded.extend_from_slice(ids);
            padded.extend(std::iter::repeat_n(self.config.eos_token_id, longest - n));
        }
        let device = self.token_embedding.device();
        let ids_t = Tensor::new(padded.as_slice(), device)?;
        let mut x = self
            .token_embedding
            .index_select(&ids_t, 0)?
            .reshape((sequences.len(), longest, self.config.hidden_size))?
            .broadcast_add(&self.position_embedding.i(..longest)?)?;
        for layer in &self.layers {
            x = layer.forward(&x, true)?;
        }
        let pooled = ends
            .iter()
            .enumerate()
            .map(|(b, &eos)| x.i((b, eos..=eos, ..)))
            .collect::<Result<Vec<_>>>()?;
        let pooled = self
            .final_layer_norm
            .forward(&Tensor::cat(&pooled, 0)?.contiguous()?)?;
        self.text_projection.forward(&pooled)?.to_dtype(DType::F32)
    }
}

/// Both towers of a CLIP model.
#[derive(Debug, Clone)]
pub struct Clip {
    /// Scores cutouts.
    pub vision: ClipVision,
    /// Embeds prompts.
    pub text: ClipText,
}

impl Clip {
    /// Loads both towers from `CLIPModel` weights.
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        Ok(Self {
            vision: ClipVision::new(vb.clone(), cfg)?,
            text: ClipText::new(vb, cfg)?,
        })
    }
}

/// `(pixels − MEAN) / STD` per channel, for `[b, 3, h, w]` pixels in [0, 1].
pub fn normalize(pixels: &Tensor) -> Result<Tensor> {
    let device = pixels.device();
    let scale: Vec<f32> = STD.iter().map(|s| 1.0 / s).collect();
    let shift: Vec<f32> = MEAN.iter().zip(&STD).map(|(m, s)| -m / s).collect();
    let as_channels =
        |v: Vec<f32>| Tensor::from_vec(v, (1, 3, 1, 1), device)?.to_dtype(pixels.dtype());
    scale_shift(pixels, &as_channels(scale)?, &as_channels(shift)?)
}
