//! The taming-transformers VQGAN: encoder, decoder and codebook quantiser.
//!
//! A port of `taming/modules/diffusionmodules/model.py` (`Encoder`, `Decoder`, `ResnetBlock`,
//! `AttnBlock`, `Upsample`, `Downsample`), `taming/modules/vqvae/quantize.py`
//! (`VectorQuantizer2`, `GumbelQuantize`) and `taming/models/vqgan.py` (`VQModel.encode/decode`).
//! Module paths mirror the checkpoint keys (`decoder.up.3.block.0.norm1.weight`,
//! `quantize.embedding.weight`, …), so released checkpoints load without renaming.
//!
//! Every weight is frozen. The decoder is differentiable with respect to its input (the latent
//! `z` is what the optimiser trains); its convolutions and norms are the input-gradient-only ops
//! of [`crate::engine::ops`], so no weight gradient is ever computed. The encoder is only used without a
//! gradient (init images, upscaling).

use candle_core::{D, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::ops::{FrozenConv2d, FrozenGroupNorm};

/// How the latent is snapped to the codebook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizerKind {
    /// `VectorQuantizer2`: nearest codebook row (`quantize.embedding.weight`).
    Nearest,
    /// `GumbelQuantize`: codebook `quantize.embed.weight` and logits `quantize.proj`. Latents are
    /// snapped to the nearest row like `Nearest`; images encode to the argmax of the logits (the
    /// reference samples Gumbel noise there; we do not, so init images are deterministic).
    Gumbel,
}

/// A VQGAN's architecture: taming's `ddconfig` plus the quantiser's.
#[derive(Debug, Clone, PartialEq)]
pub struct VqganConfig {
    /// Base channel count.
    pub ch: usize,
    /// Channel multiplier per resolution level; `len − 1` is the number of halvings.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Resolutions (of the config's `resolution`, not the runtime size) that get attention.
    pub attn_resolutions: Vec<usize>,
    /// Nominal training resolution; only decides where attention sits.
    pub resolution: usize,
    /// Image channels in (3).
    pub in_channels: usize,
    /// Image channels out (3).
    pub out_ch: usize,
    /// Channels of the encoder output / decoder input.
    pub z_channels: usize,
    /// Codebook vector length (channels of `z`).
    pub embed_dim: usize,
    /// Codebook size.
    pub n_embed: usize,
    /// Quantiser flavour.
    pub quantizer: QuantizerKind,
    /// Groups of every GroupNorm.
    pub norm_groups: usize,
    /// Epsilon of every GroupNorm.
    pub norm_eps: f64,
}

impl VqganConfig {
    /// The shared taming f16 configuration with `n_embed` codes.
    fn f16(n_embed: usize) -> Self {
        Self {
            ch: 128,
            ch_mult: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![16],
            resolution: 256,
            in_channels: 3,
            out_ch: 3,
            z_channels: 256,
            embed_dim: 256,
            n_embed,
            quantizer: QuantizerKind::Nearest,
            norm_groups: 32,
            norm_eps: 1e-6,
        }
    }

    /// `vqgan_imagenet_f16_1024`.
    pub fn imagenet_f16_1024() -> Self {
        Self::f16(1024)
    }

    /// `vqgan_imagenet_f16_16384`, the default model.
    pub fn imagenet_f16_16384() -> Self {
        Self::f16(16384)
    }

    /// The community WikiArt f16 model with 16384 codes (the ImageNet architecture).
    pub fn wikiart_f16_16384() -> Self {
        Self::f16(16384)
    }

    /// `vqgan_gumbel_f8_8192` (taming's `GumbelVQ`).
    pub fn gumbel_f8_8192() -> Self {
        Self {
            ch_mult: vec![1, 1, 2, 4],
            attn_resolutions: vec![32],
            n_embed: 8192,
            quantizer: QuantizerKind::Gumbel,
            ..Self::f16(8192)
        }
    }

    /// The parity fixtures' tiny random model.
    pub fn tiny() -> Self {
        Self {
            ch: 32,
            ch_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            attn_resolutions: vec![16],
            resolution: 64,
            in_channels: 3,
            out_ch: 3,
            z_channels: 16,
            embed_dim: 16,
            n_embed: 64,
            quantizer: QuantizerKind::Nearest,
            norm_groups: 32,
            norm_eps: 1e-6,
        }
    }

    /// The preset named like a catalogue model id (`imagenet_f16_16384`, `tiny_vqgan`, …).
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "imagenet_f16_1024" => Self::imagenet_f16_1024(),
            "imagenet_f16_16384" => Self::imagenet_f16_16384(),
            "wikiart_f16_16384" => Self::wikiart_f16_16384(),
            "gumbel_f8_8192" => Self::gumbel_f8_8192(),
            "tiny" | "tiny_vqgan" => Self::tiny(),
            _ => return None,
        })
    }

    /// Pixels per latent cell along each axis: `2^(levels − 1)`.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.ch_mult.len().saturating_sub(1))
    }

    /// Whether encoder/decoder level `level` has attention blocks (by the config resolution).
    fn has_attention(&self, level: usize) -> bool {
        self.attn_resolutions.contains(&(self.resolution >> level))
    }
}

/// taming's `ResnetBlock` without a timestep embedding (dropout is 0 in every released model).
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: FrozenGroupNorm,
    conv1: FrozenConv2d,
    norm2: FrozenGroupNorm,
    conv2: FrozenConv2d,
    nin_shortcut: Option<FrozenConv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cfg: &VqganConfig, in_c: usize, out_c: usize) -> Result<Self> {
        let norm = |vb, c| FrozenGroupNorm::load(vb, cfg.norm_groups, c, cfg.norm_eps);
        Ok(Self {
            norm1: norm(vb.pp("norm1"), in_c)?,
            conv1: FrozenConv2d::load(vb.pp("conv1"), in_c, out_c, 3, 1, 1)?,
            norm2: norm(vb.pp("norm2"), out_c)?,
            conv2: FrozenConv2d::load(vb.pp("conv2"), out_c, out_c, 3, 1, 1)?,
            nin_shortcut: (in_c != out_c)
                .then(|| FrozenConv2d::load(vb.pp("nin_shortcut"), in_c, out_c, 1, 0, 1))
                .transpose()?,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_swish(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_swish(&h)?)?;
        match &self.nin_shortcut {
            Some(shortcut) => shortcut.forward(x)? + h,
            None => x + h,
        }
    }
}

/// taming's single-head spatial `AttnBlock`.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: FrozenGroupNorm,
    q: FrozenConv2d,
    k: FrozenConv2d,
    v: FrozenConv2d,
    proj_out: FrozenConv2d,
}

impl AttnBlock {
    fn new(vb: VarBuilder, cfg: &VqganConfig, c: usize) -> Result<Self> {
        let conv = |name| FrozenConv2d::load(vb.pp(name), c, c, 1, 0, 1);
        Ok(Self {
            norm: FrozenGroupNorm::load(vb.pp("norm"), cfg.norm_groups, c, cfg.norm_eps)?,
            q: conv("q")?,
            k: conv("k")?,
            v: conv("v")?,
            proj_out: conv("proj_out")?,
        })
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let q = self.q.forward(&normed)?.reshape((b, c, h * w))?;
        let k = self.k.forward(&normed)?.reshape((b, c, h * w))?;
        let v = self.v.forward(&normed)?.reshape((b, c, h * w))?;
        // scores[i, j] = Σ_c q[c, i]·k[c, j] / √c, softmax over j (the composed softmax: the
        // fused one has no backward).
        let scores = (q.transpose(1, 2)?.matmul(&k)? * (c as f64).powf(-0.5))?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        // out[c, i] = Σ_j v[c, j]·weights[i, j]
        let attended = v.matmul(&weights.transpose(1, 2)?)?.reshape((b, c, h, w))?;
        x + self.proj_out.forward(&attended)?
    }
}

/// The `mid` stage shared by encoder and decoder: block, attention, block at one width.
#[derive(Debug, Clone)]
struct MidBlock {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, cfg: &VqganConfig, c: usize) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(vb.pp("block_1"), cfg, c, c)?,
            attn_1: AttnBlock::new(vb.pp("attn_1"), cfg, c)?,
            block_2: ResnetBlock::new(vb.pp("block_2"), cfg, c, c)?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.block_2
            .forward(&self.attn_1.forward(&self.block_1.forward(x)?)?)
    }
}

/// The residual blocks of one level, each followed by attention where the level has it
/// (`{up,down}.{level}.block.{j}` and `.attn.{j}`). The first block changes the width.
#[derive(Debug, Clone)]
struct BlockStack {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
}

impl BlockStack {
    fn new(
        vb: VarBuilder,
        cfg: &VqganConfig,
        level: usize,
        count: usize,
        c_in: usize,
        c_out: usize,
    ) -> Result<Self> {
        let mut blocks = Vec::with_capacity(count);
        let mut attns = Vec::new();
        for j in 0..count {
            let c = if j == 0 { c_in } else { c_out };
            blocks.push(ResnetBlock::new(vb.pp("block").pp(j), cfg, c, c_out)?);
            if cfg.has_attention(level) {
                attns.push(AttnBlock::new(vb.pp("attn").pp(j), cfg, c_out)?);
            }
        }
        Ok(Self { blocks, attns })
    }
}

impl Module for BlockStack {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if let Some(attn) = self.attns.get(j) {
                h = attn.forward(&h)?;
            }
        }
        Ok(h)
    }
}

/// One decoder level: blocks, optional upsampling.
#[derive(Debug, Clone)]
struct UpLevel {
    stack: BlockStack,
    upsample: Option<FrozenConv2d>,
}

/// The last layers of the encoder and the decoder: `norm_out`, swish, `conv_out` (3×3).
#[derive(Debug, Clone)]
struct OutHead {
    norm: FrozenGroupNorm,
    conv: FrozenConv2d,
}

impl OutHead {
    /// Loads `norm_out.*` and `conv_out.*` under `vb`, from `channels` to `out` channels.
    fn new(vb: VarBuilder, cfg: &VqganConfig, channels: usize, out: usize) -> Result<Self> {
        Ok(Self {
            norm: FrozenGroupNorm::load(
                vb.pp("norm_out"),
                cfg.norm_groups,
                channels,
                cfg.norm_eps,
            )?,
            conv: FrozenConv2d::load(vb.pp("conv_out"), channels, out, 3, 1, 1)?,
        })
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.conv.forward(&self.norm.forward_swish(h)?)
    }
}

/// taming's `Decoder`: latent `[b, z_channels, h, w]` → image `[b, out_ch, h·f, w·f]` in about
/// [−1, 1].
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    conv_in: FrozenConv2d,
    mid: MidBlock,
    /// Indexed by level like the checkpoint (`up.0` is the highest resolution and runs last).
    up: Vec<UpLevel>,
    out: OutHead,
}

impl Decoder {
    /// Loads `decoder.*` (pass `vb.pp("decoder")`).
    pub fn new(vb: VarBuilder, cfg: &VqganConfig) -> Result<Self> {
        let levels = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[levels - 1];
        let conv_in = FrozenConv2d::load(vb.pp("conv_in"), cfg.z_channels, block_in, 3, 1, 1)?;
        let mid = MidBlock::new(vb.pp("mid"), cfg, block_in)?;
        // Built in execution order (deepest level first), then stored by level index.
        let mut up = Vec::with_capacity(levels);
        for level in (0..levels).rev() {
            let vb_level = vb.pp("up").pp(level);
            let block_out = cfg.ch * cfg.ch_mult[level];
            let stack = BlockStack::new(
                vb_level.clone(),
                cfg,
                level,
                cfg.num_res_blocks + 1,
                block_in,
                block_out,
            )?;
            block_in = block_out;
            let upsample = (level != 0)
                .then(|| {
                    FrozenConv2d::load(
                        vb_level.pp("upsample").pp("conv"),
                        block_in,
                        block_in,
                        3,
                        1,
                        1,
                    )
                })
                .transpose()?;
            up.push(UpLevel { stack, upsample });
        }
        up.reverse();
        Ok(Self {
            conv_in,
            mid,
            up,
            out: OutHead::new(vb, cfg, block_in, cfg.out_ch)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid.forward(&h)?;
        for level in self.up.iter().rev() {
            h = level.stack.forward(&h)?;
            if let Some(conv) = &level.upsample {
                h = conv.forward_upsampled(&h)?;
            }
        }
        self.out.forward(&h)
    }
}

/// One encoder level: blocks, optional downsampling.
#[derive(Debug, Clone)]
struct DownLevel {
    stack: BlockStack,
    downsample: Option<FrozenConv2d>,
}

/// taming's `Encoder` (with `double_z = false`): image `[b, in_channels, H, W]` in [−1, 1] →
/// `[b, z_channels, H/f, W/f]`. Used without a gradient.
#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    conv_in: FrozenConv2d,
    down: Vec<DownLevel>,
    mid: MidBlock,
    out: OutHead,
}

impl Encoder {
    /// Loads `encoder.*` (pass `vb.pp("encoder")`).
    pub fn new(vb: VarBuilder, cfg: &VqganConfig) -> Result<Self> {
        let levels = cfg.ch_mult.len();
        let conv_in = FrozenConv2d::load(vb.pp("conv_in"), cfg.in_channels, cfg.ch, 3, 1, 1)?;
        let mut block_in = cfg.ch;
        let mut down = Vec::with_capacity(levels);
        for level in 0..levels {
            let vb_level = vb.pp("down").pp(level);
            let block_out = cfg.ch * cfg.ch_mult[level];
            let stack = BlockStack::new(
                vb_level.clone(),
                cfg,
                level,
                cfg.num_res_blocks,
                block_in,
                block_out,
            )?;
            if cfg.num_res_blocks > 0 {
                block_in = block_out;
            }
            // taming pads right/bottom by one, then convolves with stride 2 and no padding.
            let downsample = (level != levels - 1)
                .then(|| {
                    FrozenConv2d::load(
                        vb_level.pp("downsample").pp("conv"),
                        block_in,
                        block_in,
                        3,
                        0,
                        2,
                    )
                })
                .transpose()?;
            down.push(DownLevel { stack, downsample });
        }
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(vb.pp("mid"), cfg, block_in)?,
            out: OutHead::new(vb, cfg, block_in, cfg.z_channels)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            h = level.stack.forward(&h)?;
            if let Some(conv) = &level.downsample {
                h = conv.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        h = self.mid.forward(&h)?;
        self.out.forward(&h)
    }
}

/// A latent snapped to the codebook.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// Codebook rows `[b, embed_dim, h, w]`; its gradient passes straight through to the input.
    pub z_q: Tensor,
    /// Index of the chosen row per cell, `[b, h, w]`, `u32`.
    pub indices: Tensor,
}

/// The codebook (and, for Gumbel models, the logits used to encode images).
#[derive(Debug, Clone)]
pub struct Quantizer {
    codebook: Tensor,
    /// `quantize.proj` of Gumbel models: logits over the codebook from the encoder output.
    gumbel_proj: Option<FrozenConv2d>,
}

impl Quantizer {
    /// Loads `quantize.*` (pass `vb.pp("quantize")`).
    pub fn new(vb: VarBuilder, cfg: &VqganConfig) -> Result<Self> {
        Ok(match cfg.quantizer {
            QuantizerKind::Nearest => Self {
                codebook: vb.get((cfg.n_embed, cfg.embed_dim), "embedding.weight")?,
                gumbel_proj: None,
            },
            QuantizerKind::Gumbel => Self {
                codebook: vb.get((cfg.n_embed, cfg.embed_dim), "embed.weight")?,
                gumbel_proj: Some(FrozenConv2d::load(
                    vb.pp("proj"),
                    cfg.z_channels,
                    cfg.n_embed,
                    1,
                    0,
                    1,
                )?),
            },
        })
    }

    /// The codebook, `[n_embed, embed_dim]`.
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    /// Index of the nearest codebook row (squared Euclidean distance) for each cell of
    /// `z` `[b, d, h, w]`: `[b, h, w]`, `u32`.
    pub(crate) fn nearest_indices(&self, z: &Tensor) -> Result<Tensor> {
        let (b, d, h, w) = z.dims4()?;
        let rows = z.detach().permute((0, 2, 3, 1))?.reshape((b * h * w, d))?;
        // ‖z‖² + ‖e‖² − 2·z·eᵀ, as taming computes it.
        let z_sq = rows.sqr()?.sum_keepdim(1)?;
        let e_sq = self.codebook.sqr()?.sum_keepdim(1)?.t()?;
        let cross = rows.matmul(&self.codebook.t()?)?;
        let dist = z_sq.broadcast_add(&e_sq)?.sub(&(cross * 2.0)?)?;
        dist.argmin(1)?.reshape((b, h, w))
    }

    /// Codebook rows for `indices` `[b, h, w]`, as a latent `[b, embed_dim, h, w]`.
    pub fn rows(&self, indices: &Tensor) -> Result<Tensor> {
        let (b, h, w) = indices.dims3()?;
        let d = self.codebook.dim(1)?;
        self.codebook
            .index_select(&indices.flatten_all()?, 0)?
            .reshape((b, h, w, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// Snaps each cell of `z` to its nearest codebook row. The value is exactly the codebook
    /// rows; the gradient is the identity (straight-through), as in `generate.py`.
    pub fn quantize(&self, z: &Tensor) -> Result<Quantized> {
        let indices = self.nearest_indices(z)?;
        let rows = self.rows(&indices)?;
        let z_q = if z.track_op() {
            (z + (rows - z)?.detach())?
        } else {
            rows
        };
        Ok(Quantized { z_q, indices })
    }

    /// The indices an encoder output `h` (after `quant_conv`) encodes to: the nearest rows, or
    /// for Gumbel models the argmax of `quantize.proj`'s logits.
    pub(crate) fn encode_indices(&self, h: &Tensor) -> Result<Tensor> {
        match &self.gumbel_proj {
            None => self.nearest_indices(h),
            Some(proj) => proj.forward(h)?.argmax(1),
        }
    }
}

/// Which halves of the VQGAN to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VqganParts {
    /// Decoder, codebook and `post_quant_conv`: enough to generate.
    DecodeOnly,
    /// Also the encoder and `quant_conv`, for init images and upscaling.
    Full,
}

/// An image encoded to the latent space.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `encoder(2·image − 1)`.
    pub encoder_out: Tensor,
    /// `quant_conv(encoder_out)`.
    pub quant_conv_out: Tensor,
    /// The quantised latent (exact codebook rows) and its indices.
    pub quantized: Quantized,
}

/// A frozen VQGAN (`VQModel` / `GumbelVQ`): decode latents to images, snap latents to the
/// codebook, and encode images.
#[derive(Debug, Clone)]
pub struct Vqgan {
    config: VqganConfig,
    encoder: Option<(Encoder, FrozenConv2d)>,
    quantizer: Quantizer,
    post_quant_conv: FrozenConv2d,
    decoder: Decoder,
    z_min: Tensor,
    z_max: Tensor,
}

impl Vqgan {
    /// Builds the model from weights named as in taming's `state_dict`.
    pub fn new(vb: VarBuilder, cfg: &VqganConfig, parts: VqganParts) -> Result<Self> {
        let encoder = match parts {
            VqganParts::DecodeOnly => None,
            VqganParts::Full => Some((
                Encoder::new(vb.pp("encoder"), cfg)?,
                FrozenConv2d::load(vb.pp("quant_conv"), cfg.z_channels, cfg.embed_dim, 1, 0, 1)?,
            )),
        };
        let quantizer = Quantizer::new(vb.pp("quantize"), cfg)?;
        let codebook = quantizer.codebook();
        let bounds = |t: Tensor| t.reshape((1, cfg.embed_dim, 1, 1));
        let z_min = bounds(codebook.min(0)?)?;
        let z_max = bounds(codebook.max(0)?)?;
        Ok(Self {
            config: cfg.clone(),
            encoder,
            post_quant_conv: FrozenConv2d::load(
                vb.pp("post_quant_conv"),
                cfg.embed_dim,
                cfg.z_channels,
                1,
                0,
                1,
            )?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quantizer,
            z_min,
            z_max,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VqganConfig {
        &self.config
    }

    /// The codebook quantiser.
    pub fn quantizer(&self) -> &Quantizer {
        &self.quantizer
    }

    /// Per-channel minimum of the codebook, `[1, embed_dim, 1, 1]`: the optimiser keeps `z` above it.
    pub fn z_min(&self) -> &Tensor {
        &self.z_min
    }

    /// Per-channel maximum of the codebook, `[1, embed_dim, 1, 1]`.
    pub fn z_max(&self) -> &Tensor {
        &self.z_max
    }

    /// `decoder(post_quant_conv(z_q))`: the raw decoder output, about [−1, 1], differentiable
    /// with respect to `z_q`.
    pub fn decode(&self, z_q: &Tensor) -> Result<Tensor> {
        self.decoder.forward(&self.post_quant_conv.forward(z_q)?)
    }

    /// Encodes an RGB image `[b, 3, H, W]` in [0, 1] (H and W multiples of the downsampling
    /// factor) to its quantised latent. Needs [`VqganParts::Full`].
    pub fn encode(&self, image: &Tensor) -> Result<Encoded> {
        let Some((encoder, quant_conv)) = &self.encoder else {
            candle_core::bail!(
                "this VQGAN was loaded without its encoder (VqganParts::DecodeOnly)"
            );
        };
        let f = self.config.downsample_factor();
        let (_, _, h, w) = image.dims4()?;
        if !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            candle_core::bail!("image size {w}x{h} is not a multiple of {f}");
        }
        let image = image.detach();
        let encoder_out = encoder.forward(&((image * 2.0)? - 1.0)?)?;
        let quant_conv_out = quant_conv.forward(&encoder_out)?;
        let indices = self.quantizer.encode_indices(&quant_conv_out)?;
        let z_q = self.quantizer.rows(&indices)?;
        Ok(Encoded {
            encoder_out,
            quant_conv_out,
            quantized: Quantized { z_q, indices },
        })
    }
}
