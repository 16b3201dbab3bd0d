//! The optimisation: a latent `z` trained by Adam so that CLIP scores the decoded image's cutouts
//! close to the prompts. One call to [`Latent::step`] is one iteration of `generate.py`'s loop.
//!
//! A step runs in two stages so that memory does not grow with the number of cutouts: the image
//! is decoded once; CLIP then sees the cutouts in chunks, each chunk's graph dropped after its
//! backward, accumulating the gradient at the image; finally that gradient goes back through
//! the decoder to `z` in one backward pass.

use std::time::{Duration, Instant};

use super::cutouts::{Cutouts, passes};
use super::loss::{PromptTarget, prompt_loss};
use super::nets::clip::{ClipVision, normalize};
use super::nets::vqgan::Vqgan;
use super::ops::{clamp_with_grad, with_circular_padding};
use candle_core::{Result, Tensor, Var};

/// The frozen models and prompts that guide a run.
pub struct Guide<'a> {
    /// Decodes latents.
    pub vqgan: &'a Vqgan,
    /// Scores cutouts.
    pub clip: &'a ClipVision,
    /// What to aim for.
    pub prompts: &'a [PromptTarget],
    /// Cutouts per CLIP forward/backward: bounds memory; the result does not depend on it.
    pub chunk: usize,
    /// A pull of `z` towards its start or towards zero (off by default).
    pub init_weight: InitWeight,
}

/// The reference scripts' `init_weight`, which means different things in each (see
/// `docs/vqgan-clip.md`): a squared-error pull on `z`, added to the loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InitWeight {
    /// No pull.
    #[default]
    Off,
    /// Crowson's: `MSE(z, z_init)·w/2`, keeping the image near its start (an init image).
    ToInit {
        /// `w`.
        weight: f64,
    },
    /// `generate.py`'s: `MSE(z, 0)·(w/(2i + 1))/2` at step `i`, fading out.
    ToZeroDecaying {
        /// `w`.
        weight: f64,
    },
    /// The VQGAN-CLIP paper's pull towards the start that fades over the run:
    /// `MSE(z, z_init)·w·(1 − i/n)/2` at step `i` of `n` ([`InitWeight::at`] applies the fade;
    /// a latent given this variant directly pulls at full weight).
    ToInitDecaying {
        /// `w` at the first step.
        weight: f64,
    },
}

impl InitWeight {
    /// The pull at step `step` of `steps`: [`InitWeight::ToInitDecaying`] becomes
    /// [`InitWeight::ToInit`] at its faded weight; the others are unchanged.
    pub fn at(self, step: u32, steps: u32) -> Self {
        match self {
            Self::ToInitDecaying { weight } => Self::ToInit {
                weight: weight * (1.0 - f64::from(step) / f64::from(steps.max(1))).max(0.0),
            },
            other => other,
        }
    }

    /// The weight `w`, when there is a pull.
    pub fn weight(self) -> Option<f64> {
        match self {
            Self::Off => None,
            Self::ToInit { weight }
            | Self::ToZeroDecaying { weight }
            | Self::ToInitDecaying { weight } => Some(weight),
        }
    }
}

/// What one step measured, before its update.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Total loss.
    pub loss: f64,
    /// Each prompt's loss, in prompt order.
    pub prompt_losses: Vec<f64>,
    /// The image the step scored, `[1, 3, H, W]` in [0, 1] (detached).
    pub image: Tensor,
    /// Where the step's time went.
    pub times: StepTimes,
}

/// Wall-clock time of one step's phases (the device is synchronised at each boundary, so on a
/// GPU they are exact at the price of a little overlap).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepTimes {
    /// Quantise, decode, clamp: the image from the latent.
    pub synth_fwd: Duration,
    /// Cutouts, CLIP's image tower and the prompt losses.
    pub clip_fwd: Duration,
    /// Gradients: through CLIP to the image, then through the decoder to the latent.
    pub backward: Duration,
    /// Adam and the clamp of the latent to the codebook's range.
    pub optimiser: Duration,
    /// Of the four phases, the time the host thread spent before it waited for the device at
    /// the phase's end: making and issuing the work (tables, uploads, kernel launches). On the
    /// CPU that is all of it; on a GPU, a host time near the phases' sum means the step is
    /// bound by the host, not the device.
    pub host: Duration,
}

impl StepTimes {
    /// Time since `*mark` once the device has finished its queued work, adding the part before
    /// the wait to [`StepTimes::host`]; moves the mark.
    fn lap(&mut self, device: &candle_core::Device, mark: &mut Instant) -> Result<Duration> {
        self.host += mark.elapsed();
        device.synchronize()?;
        let now = Instant::now();
        let spent = now - *mark;
        *mark = now;
        Ok(spent)
    }
}

/// What [`audited`] is shown: a graph and its gradients.
#[cfg(test)]
type Audit = Box<dyn FnMut(&Tensor, &candle_core::backprop::GradStore)>;

#[cfg(test)]
thread_local! {
    /// See [`audited`].
    static AUDIT: std::cell::RefCell<Option<Audit>> = std::cell::RefCell::new(None);
}

/// Runs `f` with `audit` shown every graph a step differentiates on this thread — each chunk's
/// CLIP loss and the latent's surrogate — with its gradients, right after the backward pass.
#[cfg(test)]
pub(crate) fn audited<R>(
    audit: impl FnMut(&Tensor, &candle_core::backprop::GradStore) + 'static,
    f: impl FnOnce() -> R,
) -> R {
    AUDIT.with(|a| *a.borrow_mut() = Some(Box::new(audit)));
    let result = f();
    AUDIT.with(|a| *a.borrow_mut() = None);
    result
}

#[cfg(test)]
fn audit(graph: &Tensor, grads: &candle_core::backprop::GradStore) {
    AUDIT.with(|a| {
        if let Some(audit) = a.borrow_mut().as_mut() {
            audit(graph, grads);
        }
    });
}

/// Which optimiser trains the latent: the reference's Adam, or two of the others its
/// `--optimiser` offers, each with the hyper-parameters the reference gives it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Optimizer {
    /// `torch.optim.Adam`: β (0.9, 0.999), eps 1e-8, no weight decay (the default).
    #[default]
    #[serde(rename = "adam")]
    Adam,
    /// `torch.optim.AdamW` with torch's defaults: Adam plus a decoupled weight decay of 0.01
    /// (`z ← z·(1 − lr·0.01)` before each update), a slow pull of the latent towards zero.
    #[serde(rename = "adamw")]
    AdamW,
    /// `torch_optimizer.DiffGrad` as the reference builds it (eps 1e-9, L2 weight decay 1e-9):
    /// Adam whose momentum is damped by `sigmoid(|g − g_prev|)`, so a component whose gradient
    /// stops changing moves at half speed.
    #[serde(rename = "diffgrad")]
    DiffGrad,
}

impl Optimizer {
    /// Every optimiser, by the name users type.
    pub const ALL: [(&'static str, Self); 3] = [
        ("adam", Self::Adam),
        ("adamw", Self::AdamW),
        ("diffgrad", Self::DiffGrad),
    ];

    /// The optimiser named `name` (any case), if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        by_name(&Self::ALL, name)
    }

    /// The name users type.
    pub fn name(self) -> &'static str {
        name_of(&Self::ALL, self)
    }

    /// `eps` added to the root of the second moment.
    pub fn eps(self) -> f64 {
        match self {
            Self::Adam | Self::AdamW => 1e-8,
            Self::DiffGrad => 1e-9,
        }
    }

    /// The weight decay: decoupled for AdamW, added to the gradient for DiffGrad.
    pub fn weight_decay(self) -> f64 {
        match self {
            Self::Adam => 0.0,
            Self::AdamW => 0.01,
            Self::DiffGrad => 1e-9,
        }
    }
}

/// What the latent starts from when the run is given no image or latent (the reference's
/// `--init_noise`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitNoise {
    /// A uniformly random codebook entry at every position (the default).
    #[default]
    Tokens,
    /// An image of uniformly random pixels from the job's RNG, encoded by the VQGAN.
    Pixels,
    /// The reference's random gradient image (red left to right, green and blue top to
    /// bottom, random ends), encoded by the VQGAN.
    Gradient,
}

impl InitNoise {
    /// Every start, by the name users type.
    pub const ALL: [(&'static str, Self); 3] = [
        ("tokens", Self::Tokens),
        ("pixels", Self::Pixels),
        ("gradient", Self::Gradient),
    ];

    /// The start named `name` (any case), if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        by_name(&Self::ALL, name)
    }

    /// The name users type.
    pub fn name(self) -> &'static str {
        name_of(&Self::ALL, self)
    }
}

/// The entry of `all` named `name` (any case, spaces around ignored).
fn by_name<T: Copy>(all: &[(&'static str, T)], name: &str) -> Option<T> {
    all.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
        .map(|&(_, value)| value)
}

/// The name of `value` in `all` (which lists every value).
fn name_of<T: PartialEq>(all: &[(&'static str, T)], value: T) -> &'static str {
    all.iter().find(|(_, v)| *v == value).map_or("", |(n, _)| n)
}

/// How a latent is trained, beyond its start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Training {
    /// The learning rate.
    pub learning_rate: f64,
    /// The optimiser.
    pub optimizer: Optimizer,
    /// Keep an exponential moving average of the latent with this decay (pytti's `ema_val`),
    /// bias-corrected as Adam's moments are, and picture it instead of the latent itself.
    pub ema: Option<f64>,
}

impl Training {
    /// The reference's: Adam at learning rate `lr`, no average.
    pub fn adam(learning_rate: f64) -> Self {
        Self {
            learning_rate,
            optimizer: Optimizer::Adam,
            ema: None,
        }
    }
}

/// The optimiser's state, open so a run can be checkpointed and resumed exactly. Each update
/// follows its torch implementation's formula.
struct Moments {
    kind: Optimizer,
    lr: f64,
    beta1: f64,
    beta2: f64,
    m: Tensor,
    v: Tensor,
    /// DiffGrad's previous gradient (zeros before the first step, as in torch_optimizer).
    prev: Option<Tensor>,
    t: usize,
}

impl Moments {
    fn new(like: &Tensor, lr: f64, kind: Optimizer) -> Result<Self> {
        Ok(Self {
            kind,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            m: like.zeros_like()?,
            v: like.zeros_like()?,
            prev: match kind {
                Optimizer::DiffGrad => Some(like.zeros_like()?),
                _ => None,
            },
            t: 0,
        })
    }

    /// The next parameters after a step with gradient `g`.
    fn step(&mut self, theta: &Tensor, g: &Tensor) -> Result<Tensor> {
        self.t += 1;
        let (eps, decay) = (self.kind.eps(), self.kind.weight_decay());
        let bias1 = 1.0 - self.beta1.powi(self.t as i32);
        let bias2 = 1.0 - self.beta2.powi(self.t as i32);
        let g = match self.kind {
            Optimizer::DiffGrad => (g + (theta * decay)?)?,
            _ => g.clone(),
        };
        self.m = ((&self.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
        self.v = ((&self.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        match self.kind {
            Optimizer::Adam | Optimizer::AdamW => {
                let theta = match self.kind {
                    Optimizer::AdamW => (theta * (1.0 - self.lr * decay))?,
                    _ => theta.clone(),
                };
                let m_hat = (&self.m * (1.0 / bias1))?;
                let v_hat = (&self.v * (1.0 / bias2))?;
                let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
                theta - (update * self.lr)?
            }
            Optimizer::DiffGrad => {
                let prev = self.prev.replace(g.clone());
                let prev = match prev {
                    Some(p) => p,
                    None => g.zeros_like()?,
                };
                // dfc = 1 / (1 + e^−|g_prev − g|), in [0.5, 1).
                let friction = ((prev - &g)?.abs()?.neg()?.exp()? + 1.0)?.recip()?;
                let denom = (self.v.sqrt()? + eps)?;
                let step = self.lr * bias2.sqrt() / bias1;
                theta - (((&self.m * friction)? / denom)? * step)?
            }
        }
    }
}

/// An exponential moving average of the latent, bias-corrected: `biased ← d·biased + (1−d)·z`,
/// pictured as `biased / (1 − dᵗ)`.
struct Average {
    decay: f64,
    biased: Tensor,
}

impl Average {
    fn value(&self, steps: usize) -> Result<Tensor> {
        if steps == 0 {
            return Ok(self.biased.clone());
        }
        &self.biased * (1.0 / (1.0 - self.decay.powi(steps as i32)))
    }
}

/// Everything that decides how a latent continues: itself and the optimiser's state.
#[derive(Debug, Clone)]
pub struct LatentState {
    /// The latent.
    pub z: Tensor,
    /// The first moment.
    pub m: Tensor,
    /// The second moment.
    pub v: Tensor,
    /// Steps taken.
    pub steps: usize,
    /// DiffGrad's previous gradient.
    pub prev_grad: Option<Tensor>,
    /// The moving average's biased sum.
    pub average: Option<Tensor>,
}

/// The trained latent with its optimiser state.
pub struct Latent {
    z: Var,
    z_init: Tensor,
    /// `[1, 1, h, w]`: 1 where the latent trains, 0 where it is held (see [`Latent::hold`]).
    trainable: Option<Tensor>,
    optimizer: Moments,
    average: Option<Average>,
    z_min: Tensor,
    z_max: Tensor,
    steps_done: usize,
}

impl Latent {
    /// Starts from `z_init` `[1, embed_dim, h, w]` with Adam at learning rate `lr` (torch
    /// defaults otherwise, no weight decay); after each step `z` is clamped to the codebook's
    /// per-channel range `z_min..z_max` (`[1, embed_dim, 1, 1]`).
    pub fn new(z_init: &Tensor, z_min: &Tensor, z_max: &Tensor, lr: f64) -> Result<Self> {
        Self::trained(z_init, z_min, z_max, Training::adam(lr))
    }

    /// [`Latent::new`] with another optimiser, or a moving average (see [`Training`]).
    pub fn trained(
        z_init: &Tensor,
        z_min: &Tensor,
        z_max: &Tensor,
        training: Training,
    ) -> Result<Self> {
        let z = Var::from_tensor(z_init)?;
        let optimizer = Moments::new(z_init, training.learning_rate, training.optimizer)?;
        let average = match training.ema {
            Some(decay) => Some(Average {
                decay,
                biased: z_init.zeros_like()?,
            }),
            None => None,
        };
        Ok(Self {
            z,
            z_init: z_init.detach(),
            trainable: None,
            optimizer,
            average,
            z_min: z_min.clone(),
            z_max: z_max.clone(),
            steps_done: 0,
        })
    }

    /// Holds part of the latent where it is: `trainable` `[1, 1, h, w]` is 1 where it trains and
    /// 0 where its gradient is masked out (and the optimiser's update with it, so no weight
    /// decay creeps in either) — a zoom-out or pan keeps the picture the user chose.
    pub fn hold(&mut self, trainable: &Tensor) -> Result<()> {
        let (_, _, h, w) = self.z.as_tensor().dims4()?;
        if trainable.dims() != [1, 1, h, w] {
            candle_core::bail!(
                "a mask of {:?} for a latent of {h}x{w} tokens",
                trainable.dims()
            );
        }
        self.trainable = Some(trainable.to_dtype(self.z.as_tensor().dtype())?);
        Ok(())
    }

    /// The current latent.
    pub fn z(&self) -> &Tensor {
        self.z.as_tensor()
    }

    /// The latent to picture and keep: the moving average when there is one (the start before
    /// the first step), otherwise the latent itself.
    pub fn pictured(&self) -> Result<Tensor> {
        match &self.average {
            Some(_) if self.steps_done == 0 => Ok(self.z_init.clone()),
            Some(average) => average.value(self.steps_done),
            None => Ok(self.z.as_tensor().detach()),
        }
    }

    /// The latent and optimiser state, detached, for a checkpoint.
    pub fn state(&self) -> LatentState {
        LatentState {
            z: self.z.as_tensor().detach(),
            m: self.optimizer.m.detach(),
            v: self.optimizer.v.detach(),
            steps: self.steps_done,
            prev_grad: self.optimizer.prev.as_ref().map(Tensor::detach),
            average: self.average.as_ref().map(|a| a.biased.detach()),
        }
    }

    /// Continues from a checkpointed state of a latent of the same shape.
    pub(crate) fn restore(&mut self, state: &LatentState) -> Result<()> {
        let shape = self.z.as_tensor().shape().clone();
        for (name, t) in [("latent", &state.z), ("m", &state.m), ("v", &state.v)] {
            if t.shape() != &shape {
                candle_core::bail!(
                    "the saved {name} is {:?}, this run's latent {:?}",
                    t.shape(),
                    shape
                );
            }
        }
        let device = self.z.as_tensor().device().clone();
        // A checkpoint of another optimiser or without the average cannot continue this run.
        let restored = |name: &str, mine: bool, saved: &Option<Tensor>| -> Result<Option<Tensor>> {
            match (mine, saved) {
                (false, _) => Ok(None),
                (true, Some(t)) if t.shape() == &shape => Ok(Some(t.to_device(&device)?)),
                (true, _) => candle_core::bail!("the checkpoint lacks this run's {name}"),
            }
        };
        let prev = restored(
            "previous gradient",
            self.optimizer.prev.is_some(),
            &state.prev_grad,
        )?;
        let average = restored("moving average", self.average.is_some(), &state.average)?;
        self.z.set(&state.z.to_device(&device)?)?;
        self.optimizer.m = state.m.to_device(&device)?;
        self.optimizer.v = state.v.to_device(&device)?;
        if let Some(prev) = prev {
            self.optimizer.prev = Some(prev);
        }
        if let (Some(average), Some(biased)) = (self.average.as_mut(), average) {
            average.biased = biased;
        }
        self.optimizer.t = state.steps;
        self.steps_done = state.steps;
        Ok(())
    }

    /// Back to the start: the initial latent, Adam's state cleared.
    pub(crate) fn restart(&mut self) -> Result<()> {
        self.z.set(&self.z_init)?;
        self.optimizer.m = self.optimizer.m.zeros_like()?;
        self.optimizer.v = self.optimizer.v.zeros_like()?;
        if let Some(prev) = self.optimizer.prev.as_mut() {
            *prev = prev.zeros_like()?;
        }
        if let Some(average) = self.average.as_mut() {
            average.biased = average.biased.zeros_like()?;
        }
        self.optimizer.t = 0;
        self.steps_done = 0;
        Ok(())
    }

    /// Decodes the pictured latent ([`Latent::pictured`]) to an image in [0, 1] without
    /// building a graph.
    pub fn image(&self, vqgan: &Vqgan) -> Result<Tensor> {
        let z_q = vqgan.quantizer().quantize(&self.pictured()?)?.z_q;
        ((vqgan.decode(&z_q)? + 1.0)? / 2.0)?.clamp(0.0, 1.0)
    }

    /// The `init_weight` term for this step, on the graph of `z`.
    fn init_term(&self, init: InitWeight) -> Result<Option<Tensor>> {
        let z = self.z.as_tensor();
        let (target, weight) = match init {
            InitWeight::Off => return Ok(None),
            InitWeight::ToInit { weight } | InitWeight::ToInitDecaying { weight } => {
                (self.z_init.clone(), weight / 2.0)
            }
            InitWeight::ToZeroDecaying { weight } => (
                z.zeros_like()?,
                weight / (2.0 * self.steps_done as f64 + 1.0) / 2.0,
            ),
        };
        Ok(Some(((z - target)?.sqr()?.mean_all()? * weight)?))
    }

    /// One iteration: quantise → decode → cutouts → CLIP → loss (+ init term) → backward →
    /// Adam → clamp. The report's losses list the prompts, then the init term when it is on.
    pub fn step(&mut self, guide: &Guide, cutouts: &dyn Cutouts) -> Result<StepReport> {
        let nets = Nets {
            vqgan: guide.vqgan,
            clip: guide.clip,
            chunk: guide.chunk,
        };
        let mut member = [Member {
            latent: self,
            prompts: guide.prompts,
            init_weight: guide.init_weight,
            cutouts,
            tile: None,
        }];
        let mut reports = step_batch(&nets, &mut member)?;
        reports
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("a batch of one made no report".into()))
    }
}

/// The frozen networks a batched step runs through, shared by every latent in it.
pub struct Nets<'a> {
    /// Decodes latents.
    pub vqgan: &'a Vqgan,
    /// Scores cutouts.
    pub clip: &'a ClipVision,
    /// Cutouts per CLIP forward/backward, counted over the whole batch: bounds memory; the
    /// result does not depend on it beyond the order of floating-point sums.
    pub chunk: usize,
}

/// One latent of a batched step, with what guides it alone.
pub struct Member<'a, 'l> {
    /// The latent, stepped in place.
    pub latent: &'l mut Latent,
    /// Its prompts.
    pub prompts: &'a [PromptTarget],
    /// Its pull towards its start or zero.
    pub init_weight: InitWeight,
    /// Its cutouts for this step (drawn from its own random stream).
    pub cutouts: &'a dyn Cutouts,
    /// A seamless tile: decoded with circular padding, and seen by CLIP rolled by `shift`
    /// (pixels right, down) so that the cutouts wrap around its edges.
    pub tile: Option<(usize, usize)>,
}

/// The other CLIP models of an ensemble in a batched step: `clips[j]` is model `j`, and
/// `members[k][j]` what member `k` shows it. `own_weights[k]` weighs member `k`'s loss from
/// [`Nets::clip`].
pub struct Ensemble<'a> {
    /// The other models' vision towers.
    pub clips: Vec<&'a ClipVision>,
    /// Each member's weight of the batch's own model.
    pub own_weights: Vec<f64>,
    /// Each member's prompts, cutouts and weight for each other model.
    pub members: Vec<Vec<Scoring<'a>>>,
}

/// What one CLIP model of an ensemble scores for one member.
pub struct Scoring<'a> {
    /// The member's prompts, embedded by this model.
    pub prompts: &'a [PromptTarget],
    /// Its cutouts at this model's input size.
    pub cutouts: &'a dyn Cutouts,
    /// This model's loss is multiplied by this.
    pub weight: f64,
}

/// One iteration for several latents of the same shape at once: one decode of the stacked
/// latents, one sequence of CLIP passes over every member's cutouts (chunked across members),
/// one backward to all the latents. Each member's loss involves only its own image, and no
/// layer mixes the images of a batch, so each latent's gradient and Adam update are the ones it
/// would get alone, up to the order of floating-point sums; a batch of one is exactly
/// [`Latent::step`]. Reports come in member order; they share the step's [`StepTimes`].
pub fn step_batch(nets: &Nets, members: &mut [Member]) -> Result<Vec<StepReport>> {
    step_batch_guided(nets, members, None)
}

/// [`step_batch`] with an ensemble of CLIP models: each member's loss is its weighted losses
/// from [`Nets::clip`] and from every model of `ensemble`, and so is the gradient. The
/// reports list the losses model by model.
pub fn step_batch_guided(
    nets: &Nets,
    members: &mut [Member],
    ensemble: Option<&Ensemble>,
) -> Result<Vec<StepReport>> {
    let Some(first) = members.first() else {
        candle_core::bail!("a batched step needs at least one latent");
    };
    let device = first.latent.z().device().clone();
    let shape = first.latent.z().shape().clone();
    if let Some(other) = members.iter().find(|m| m.latent.z().shape() != &shape) {
        candle_core::bail!(
            "latents of a batch must have one shape: {:?} and {:?}",
            shape,
            other.latent.z().shape()
        );
    }
    let mut times = StepTimes::default();
    let mut mark = Instant::now();
    let decode = |zs: &[&Tensor], tile: bool| -> Result<Tensor> {
        let z = Tensor::cat(zs, 0)?;
        let z_q = nets.vqgan.quantizer().quantize(&z)?.z_q;
        with_circular_padding(tile, || nets.vqgan.decode(&z_q))
    };
    let zs: Vec<&Tensor> = members.iter().map(|m| m.latent.z.as_tensor()).collect();
    let tiles: Vec<bool> = members.iter().map(|m| m.tile.is_some()).collect();
    let decoded = if tiles.iter().all(|&t| t == tiles[0]) {
        decode(&zs, tiles[0])?
    } else {
        // Tiles and pictures in one batch (jobs from a shared queue): each decoded with its
        // own padding.
        let each = zs
            .iter()
            .zip(&tiles)
            .map(|(z, &tile)| decode(&[*z], tile))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&each, 0)?
    };
    let image = clamp_with_grad(&((decoded + 1.0)? / 2.0)?, 0.0, 1.0)?;
    times.synth_fwd = times.lap(&device, &mut mark)?;
    let scored: Vec<Scored> = members
        .iter()
        .map(|m| Scored {
            prompts: m.prompts,
            cutouts: m.cutouts,
            shift: m.tile.unwrap_or_default(),
        })
        .collect();
    let (mut grad_image, mut prompt_losses, clip_times) =
        clip_gradient_batch(nets, &scored, &image.detach())?;
    times.clip_fwd = clip_times.clip_fwd;
    times.backward = clip_times.backward;
    times.host += clip_times.host;
    if let Some(ensemble) = ensemble {
        let shifts: Vec<(usize, usize)> = scored.iter().map(|s| s.shift).collect();
        (grad_image, prompt_losses) = ensemble_gradient(
            nets,
            ensemble,
            &shifts,
            &image,
            (grad_image, prompt_losses),
            &mut times,
        )?;
    }
    mark = Instant::now();
    let mut surrogate = (&image * grad_image)?.sum_all()?;
    // Every loss the reports list comes back from the device in one read at the end.
    let mut losses = Vec::with_capacity(members.len());
    for (member, prompt_losses) in members.iter().zip(prompt_losses) {
        let mut own = prompt_losses.to_dtype(candle_core::DType::F32)?;
        if let Some(term) = member.latent.init_term(member.init_weight)? {
            let value = term
                .detach()
                .to_dtype(candle_core::DType::F32)?
                .reshape(1)?;
            own = Tensor::cat(&[&own, &value], 0)?;
            surrogate = (surrogate + term)?;
        }
        losses.push(own);
    }
    let grads = surrogate.backward()?;
    #[cfg(test)]
    audit(&surrogate, &grads);
    let mut stepped = Vec::with_capacity(members.len());
    for member in members.iter() {
        let latent = &member.latent;
        let Some(grad_z) = grads.get(latent.z.as_tensor()) else {
            candle_core::bail!("no gradient reached the latent");
        };
        stepped.push(grad_z.clone());
    }
    let spent = times.lap(&device, &mut mark)?;
    times.backward += spent;
    drop(grads);
    for (member, grad_z) in members.iter_mut().zip(stepped) {
        let latent = &mut *member.latent;
        let z = latent.z.as_tensor().detach();
        let next = match &latent.trainable {
            None => latent.optimizer.step(&z, &grad_z)?,
            Some(mask) => {
                let next = latent.optimizer.step(&z, &grad_z.broadcast_mul(mask)?)?;
                (&z + (next - &z)?.broadcast_mul(mask)?)?
            }
        };
        let clamped = next
            .broadcast_maximum(&latent.z_min)?
            .broadcast_minimum(&latent.z_max)?;
        if let Some(average) = latent.average.as_mut() {
            average.biased =
                ((&average.biased * average.decay)? + (&clamped * (1.0 - average.decay))?)?;
        }
        latent.z.set(&clamped)?;
        latent.steps_done += 1;
    }
    let counts: Vec<usize> = losses.iter().map(|l| l.elem_count()).collect();
    let all: Vec<f64> = Tensor::cat(&losses, 0)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    times.optimiser = times.lap(&device, &mut mark)?;
    let mut values = all.into_iter();
    let mut reports = Vec::with_capacity(members.len());
    for (k, count) in counts.into_iter().enumerate() {
        let prompt_losses: Vec<f64> = values.by_ref().take(count).collect();
        reports.push(StepReport {
            loss: prompt_losses.iter().sum(),
            prompt_losses,
            image: image.narrow(0, k, 1)?.detach(),
            times,
        });
    }
    Ok(reports)
}

/// Adds the ensemble's other models to the gradient at `image` and the losses of its own
/// model (`own`): each member's weighted by its weights, each model's losses after the last.
fn ensemble_gradient(
    nets: &Nets,
    ensemble: &Ensemble,
    shifts: &[(usize, usize)],
    image: &Tensor,
    (grad, losses): (Tensor, Vec<Tensor>),
    times: &mut StepTimes,
) -> Result<(Tensor, Vec<Tensor>)> {
    let n = shifts.len();
    if ensemble.own_weights.len() != n
        || ensemble.members.len() != n
        || ensemble
            .members
            .iter()
            .any(|m| m.len() != ensemble.clips.len())
    {
        candle_core::bail!("an ensemble must score every member with every model");
    }
    let device = image.device();
    // Per member weights as a `[n, 1, 1, 1]` factor of the batch's gradient.
    let factor = |weights: &[f64]| -> Result<Tensor> {
        let values: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        Tensor::from_vec(values, (n, 1, 1, 1), device)?.to_dtype(grad.dtype())
    };
    let weigh = |losses: Tensor, weight: f64| -> Result<Tensor> {
        losses.to_dtype(candle_core::DType::F32)? * weight
    };
    let mut grad = grad.broadcast_mul(&factor(&ensemble.own_weights)?)?;
    let mut losses = losses
        .into_iter()
        .zip(&ensemble.own_weights)
        .map(|(l, &w)| weigh(l, w))
        .collect::<Result<Vec<_>>>()?;
    for (j, &clip) in ensemble.clips.iter().enumerate() {
        let scored: Vec<Scored> = ensemble
            .members
            .iter()
            .zip(shifts)
            .map(|(member, &shift)| Scored {
                prompts: member[j].prompts,
                cutouts: member[j].cutouts,
                shift,
            })
            .collect();
        let other = Nets { clip, ..*nets };
        let (g, own, spent) = clip_gradient_batch(&other, &scored, &image.detach())?;
        times.clip_fwd += spent.clip_fwd;
        times.backward += spent.backward;
        times.host += spent.host;
        let weights: Vec<f64> = ensemble.members.iter().map(|m| m[j].weight).collect();
        grad = (grad + g.broadcast_mul(&factor(&weights)?)?)?;
        for ((all, l), &w) in losses.iter_mut().zip(own).zip(&weights) {
            *all = Tensor::cat(&[&*all, &weigh(l, w)?], 0)?;
        }
    }
    Ok((grad, losses))
}

/// What scores one image of a batch: its prompts and its cutouts, cut from the image rolled
/// by `shift` (pixels right, down).
struct Scored<'a> {
    prompts: &'a [PromptTarget],
    cutouts: &'a dyn Cutouts,
    shift: (usize, usize),
}

/// `image` `[1, c, h, w]` rolled `dx` pixels right and `dy` down, wrapping around (candle's own
/// narrow and cat, so the gradient rolls back).
fn roll(image: &Tensor, (dx, dy): (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    let (dx, dy) = (dx % w, dy % h);
    let mut out = image.clone();
    if dx > 0 {
        out = Tensor::cat(
            &[&out.narrow(3, w - dx, dx)?, &out.narrow(3, 0, w - dx)?],
            3,
        )?;
    }
    if dy > 0 {
        out = Tensor::cat(
            &[&out.narrow(2, h - dy, dy)?, &out.narrow(2, 0, h - dy)?],
            2,
        )?;
    }
    Ok(out)
}

/// d loss / d image for `image` (no graph), accumulated over chunks of cutouts, with each
/// prompt's loss (`[prompts]`, on the device: nothing is read back here).
pub fn clip_gradient(
    guide: &Guide,
    cutouts: &dyn Cutouts,
    image: &Tensor,
) -> Result<(Tensor, Tensor, StepTimes)> {
    let nets = Nets {
        vqgan: guide.vqgan,
        clip: guide.clip,
        chunk: guide.chunk,
    };
    let scored = [Scored {
        prompts: guide.prompts,
        cutouts,
        shift: (0, 0),
    }];
    let (grad, mut losses, times) = clip_gradient_batch(&nets, &scored, image)?;
    let losses = losses
        .pop()
        .ok_or_else(|| candle_core::Error::Msg("one image made no losses".into()))?;
    Ok((grad, losses, times))
}

/// [`clip_gradient`] for a batch `image` `[n, 3, H, W]` whose image `k` is scored by
/// `scored[k]`, CLIP seeing the cutouts in the [`passes`] of `nets.chunk`. Returns the
/// gradient at the whole batch and each image's prompt losses.
fn clip_gradient_batch(
    nets: &Nets,
    scored: &[Scored],
    image: &Tensor,
) -> Result<(Tensor, Vec<Tensor>, StepTimes)> {
    let device = image.device().clone();
    let mut times = StepTimes::default();
    let mut mark = Instant::now();
    if image.dim(0)? != scored.len() {
        candle_core::bail!(
            "{} images scored by {} sets of prompts",
            image.dim(0)?,
            scored.len()
        );
    }
    let image = Var::from_tensor(image)?;
    // One view per image, made once: cutouts memoise their work by the view's identity.
    let views = (0..scored.len())
        .map(|k| roll(&image.as_tensor().narrow(0, k, 1)?, scored[k].shift))
        .collect::<Result<Vec<_>>>()?;
    let counts: Vec<usize> = scored.iter().map(|s| s.cutouts.count()).collect();
    let mut prompt_losses: Vec<Option<Tensor>> = vec![None; scored.len()];
    let mut grad_image: Option<Tensor> = None;
    for shares in passes(&counts, nets.chunk.max(1)) {
        let pieces = shares
            .iter()
            .map(|(k, range)| scored[*k].cutouts.cut(&views[*k], range.clone()))
            .collect::<Result<Vec<_>>>()?;
        let cuts = normalize(&Tensor::cat(&pieces, 0)?)?;
        let embeds = nets.clip.forward(&cuts)?;
        let mut stacks = Vec::with_capacity(shares.len());
        let mut row = 0;
        for (k, range) in &shares {
            let own = embeds.narrow(0, row, range.len())?;
            row += range.len();
            let mut losses = Vec::with_capacity(scored[*k].prompts.len());
            for prompt in scored[*k].prompts {
                losses.push(prompt_loss(&own, prompt, counts[*k])?.0);
            }
            if losses.is_empty() {
                candle_core::bail!("a step needs at least one prompt");
            }
            // One stack and one sum: a chain of additions would make the graph as deep as the
            // prompt list, and the backward pass walks it recursively (thousands of prompts
            // overflowed the worker's stack).
            let stacked = Tensor::stack(&losses, 0)?;
            let values = stacked.detach();
            prompt_losses[*k] = Some(match prompt_losses[*k].take() {
                Some(sum) => (sum + values)?,
                None => values,
            });
            stacks.push(stacked);
        }
        let total = Tensor::cat(&stacks, 0)?.sum_all()?;
        let spent = times.lap(&device, &mut mark)?;
        times.clip_fwd += spent;
        let mut grads = total.backward()?;
        #[cfg(test)]
        audit(&total, &grads);
        let g = grads
            .remove(image.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the image".into()))?;
        grad_image = Some(match grad_image {
            Some(acc) => (acc + g)?,
            None => g,
        });
        let spent = times.lap(&device, &mut mark)?;
        times.backward += spent;
    }
    let grad_image = match grad_image {
        Some(g) => g,
        None => candle_core::bail!("a step needs at least one cutout"),
    };
    let Some(prompt_losses) = prompt_losses.into_iter().collect::<Option<Vec<_>>>() else {
        candle_core::bail!("every image of a step needs at least one cutout");
    };
    Ok((grad_image, prompt_losses, times))
}
