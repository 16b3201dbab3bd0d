//! The optimisation: a latent `z` trained by Adam so that CLIP scores the decoded image's cutouts
//! close to the prompts. One call to [`Latent::step`] is one iteration of `generate.py`'s loop.
//!
//! A step runs in two stages so that memory does not grow with the number of cutouts: the image
//! is decoded once; CLIP then sees the cutouts in chunks, each chunk's graph dropped after its
//! backward, accumulating the gradient at the image; finally that gradient goes back through
//! the decoder to `z` in one backward pass.

use std::time::{Duration, Instant};

use super::cutouts::Cutouts;
use super::loss::{PromptTarget, prompt_loss};
use super::nets::clip::{ClipVision, normalize};
use super::nets::vqgan::Vqgan;
use super::ops::clamp_with_grad;
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

/// Adam as torch implements it (no weight decay), with its moments open so a run can be
/// checkpointed and resumed exactly.
struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    m: Tensor,
    v: Tensor,
    t: usize,
}

impl Adam {
    fn new(like: &Tensor, lr: f64) -> Result<Self> {
        Ok(Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            m: like.zeros_like()?,
            v: like.zeros_like()?,
            t: 0,
        })
    }

    /// The next parameters after a step with gradient `g`.
    fn step(&mut self, theta: &Tensor, g: &Tensor) -> Result<Tensor> {
        self.t += 1;
        let scale_m = 1.0 / (1.0 - self.beta1.powi(self.t as i32));
        let scale_v = 1.0 / (1.0 - self.beta2.powi(self.t as i32));
        self.m = ((&self.m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
        self.v = ((&self.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let m_hat = (&self.m * scale_m)?;
        let v_hat = (&self.v * scale_v)?;
        let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
        theta - (update * self.lr)?
    }
}

/// Everything that decides how a latent continues: itself and Adam's state.
#[derive(Debug, Clone)]
pub struct LatentState {
    /// The latent.
    pub z: Tensor,
    /// Adam's first moment.
    pub m: Tensor,
    /// Adam's second moment.
    pub v: Tensor,
    /// Steps taken.
    pub steps: usize,
}

/// The trained latent with its optimiser state.
pub struct Latent {
    z: Var,
    z_init: Tensor,
    adam: Adam,
    z_min: Tensor,
    z_max: Tensor,
    steps_done: usize,
}

impl Latent {
    /// Starts from `z_init` `[1, embed_dim, h, w]` with Adam at learning rate `lr` (torch
    /// defaults otherwise, no weight decay); after each step `z` is clamped to the codebook's
    /// per-channel range `z_min..z_max` (`[1, embed_dim, 1, 1]`).
    pub fn new(z_init: &Tensor, z_min: &Tensor, z_max: &Tensor, lr: f64) -> Result<Self> {
        let z = Var::from_tensor(z_init)?;
        let adam = Adam::new(z_init, lr)?;
        Ok(Self {
            z,
            z_init: z_init.detach(),
            adam,
            z_min: z_min.clone(),
            z_max: z_max.clone(),
            steps_done: 0,
        })
    }

    /// The current latent.
    pub fn z(&self) -> &Tensor {
        self.z.as_tensor()
    }

    /// The latent and optimiser state, detached, for a checkpoint.
    pub fn state(&self) -> LatentState {
        LatentState {
            z: self.z.as_tensor().detach(),
            m: self.adam.m.detach(),
            v: self.adam.v.detach(),
            steps: self.steps_done,
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
        self.z.set(&state.z.to_device(&device)?)?;
        self.adam.m = state.m.to_device(&device)?;
        self.adam.v = state.v.to_device(&device)?;
        self.adam.t = state.steps;
        self.steps_done = state.steps;
        Ok(())
    }

    /// Decodes the current latent to an image in [0, 1] without building a graph.
    pub fn image(&self, vqgan: &Vqgan) -> Result<Tensor> {
        let z_q = vqgan
            .quantizer()
            .quantize(&self.z.as_tensor().detach())?
            .z_q;
        ((vqgan.decode(&z_q)? + 1.0)? / 2.0)?.clamp(0.0, 1.0)
    }

    /// The `init_weight` term for this step, on the graph of `z`.
    fn init_term(&self, init: InitWeight) -> Result<Option<Tensor>> {
        let z = self.z.as_tensor();
        let (target, weight) = match init {
            InitWeight::Off => return Ok(None),
            InitWeight::ToInit { weight } => (self.z_init.clone(), weight / 2.0),
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
        let device = self.z.as_tensor().device().clone();
        let mut times = StepTimes::default();
        let mut mark = Instant::now();
        let z_q = guide.vqgan.quantizer().quantize(self.z.as_tensor())?.z_q;
        let decoded = guide.vqgan.decode(&z_q)?;
        let image = clamp_with_grad(&((decoded + 1.0)? / 2.0)?, 0.0, 1.0)?;
        times.synth_fwd = times.lap(&device, &mut mark)?;
        let (grad_image, prompt_losses, clip_times) =
            clip_gradient(guide, cutouts, &image.detach())?;
        times.clip_fwd = clip_times.clip_fwd;
        times.backward = clip_times.backward;
        times.host += clip_times.host;
        mark = Instant::now();
        let mut surrogate = (&image * grad_image)?.sum_all()?;
        // Every loss the report lists comes back from the device in one read at the end.
        let mut losses = prompt_losses.to_dtype(candle_core::DType::F32)?;
        if let Some(term) = self.init_term(guide.init_weight)? {
            let value = term
                .detach()
                .to_dtype(candle_core::DType::F32)?
                .reshape(1)?;
            losses = Tensor::cat(&[&losses, &value], 0)?;
            surrogate = (surrogate + term)?;
        }
        let grads = surrogate.backward()?;
        #[cfg(test)]
        audit(&surrogate, &grads);
        let Some(grad_z) = grads.get(self.z.as_tensor()) else {
            candle_core::bail!("no gradient reached the latent");
        };
        let spent = times.lap(&device, &mut mark)?;
        times.backward += spent;
        let stepped = self.adam.step(&self.z.as_tensor().detach(), grad_z)?;
        drop(grads);
        let clamped = stepped
            .broadcast_maximum(&self.z_min)?
            .broadcast_minimum(&self.z_max)?;
        self.z.set(&clamped)?;
        self.steps_done += 1;
        let prompt_losses: Vec<f64> = losses
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        times.optimiser = times.lap(&device, &mut mark)?;
        Ok(StepReport {
            loss: prompt_losses.iter().sum(),
            prompt_losses,
            image: image.detach(),
            times,
        })
    }
}

/// d loss / d image for `image` (no graph), accumulated over chunks of cutouts, with each
/// prompt's loss (`[prompts]`, on the device: nothing is read back here).
pub fn clip_gradient(
    guide: &Guide,
    cutouts: &dyn Cutouts,
    image: &Tensor,
) -> Result<(Tensor, Tensor, StepTimes)> {
    let device = image.device().clone();
    let mut times = StepTimes::default();
    let mut mark = Instant::now();
    let image = Var::from_tensor(image)?;
    let n = cutouts.count();
    let mut prompt_losses: Option<Tensor> = None;
    let mut grad_image: Option<Tensor> = None;
    for start in (0..n).step_by(guide.chunk.max(1)) {
        let range = start..(start + guide.chunk.max(1)).min(n);
        let cuts = normalize(&cutouts.cut(image.as_tensor(), range)?)?;
        let embeds = guide.clip.forward(&cuts)?;
        let mut losses = Vec::with_capacity(guide.prompts.len());
        for prompt in guide.prompts.iter() {
            losses.push(prompt_loss(&embeds, prompt, n)?.0);
        }
        if losses.is_empty() {
            candle_core::bail!("a step needs at least one prompt");
        }
        // One stack and one sum: a chain of additions would make the graph as deep as the
        // prompt list, and the backward pass walks it recursively (thousands of prompts
        // overflowed the worker's stack).
        let stacked = Tensor::stack(&losses, 0)?;
        let values = stacked.detach();
        prompt_losses = Some(match prompt_losses {
            Some(sum) => (sum + values)?,
            None => values,
        });
        let total = stacked.sum_all()?;
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
    let Some(prompt_losses) = prompt_losses else {
        candle_core::bail!("a step needs at least one cutout");
    };
    Ok((grad_image, prompt_losses, times))
}
