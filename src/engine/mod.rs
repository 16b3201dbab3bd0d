//! The VQGAN+CLIP engine: frozen models on one candle `Device`, and the optimisation that turns
//! a prompt into an image.
//!
//! Synchronous and self-contained: it knows nothing of tokio, Discord, SQL or the network. It is
//! given weight files and a spec and reports through return values and a progress callback; the
//! scheduler runs it on a dedicated thread per device.
//!
//! Four layers, each using only those below it:
//! - the method, in this folder: [`generate`] (spec in, progress and previews out,
//!   cancellable), [`spec`] (what decides an image, and the limits), [`grid`] (several images in one batch, and their composite), `guidance` (what each CLIP model aims a run at), [`optimize`] (the latent, Adam, one step), [`loss`] (spherical-distance
//!   prompt losses with weights and stops), [`cutouts`] (crops resized to CLIP's input as matrix
//!   products), [`augment`] (seeded, differentiable augmentations), [`prompt`] (the prompt
//!   language), [`image`] (tensors ↔ images ↔ PNG/JPEG/GIF bytes);
//! - [`nets`]: the frozen networks (taming-transformers' VQGAN, OpenAI's CLIP and its
//!   tokenizer), their weight files, and seeded random weights for tests and benchmarks;
//! - `ops`: layers and pointwise ops with hand-written input gradients (frozen weights never
//!   enter the graph);
//! - `kernels`: CPU kernels (convolution, Winograd, GroupNorm, attention, and `cpu`, their
//!   shared plumbing), used when the tensors live on the CPU; elsewhere candle's own ops run.

pub(crate) mod augment;
pub mod cutouts;
pub mod generate;
pub mod grid;
pub(crate) mod guidance;
pub mod image;
pub(crate) mod kernels;
pub mod loss;
pub(crate) mod memo;
pub mod nets;
pub mod ops;
pub mod optimize;
pub mod prompt;
pub mod spec;
pub mod video;

/// Runs `f` on this thread with the CPU kernels set aside (`cpu_kernels = false`), so that the
/// CPU runs exactly the composed candle ops a CUDA or Metal device runs — as
/// `VQCLIP_CPU_KERNELS=0` does for a whole process — or with them (`true`) whatever that
/// variable says. For tests and checks of the device path on machines without a GPU.
pub fn with_cpu_kernels<R>(cpu_kernels: bool, f: impl FnOnce() -> R) -> R {
    kernels::cpu::with_kernels(cpu_kernels, f)
}

/// Whether the CPU kernels run on this thread (see [`with_cpu_kernels`]).
pub fn cpu_kernels_enabled() -> bool {
    kernels::cpu::enabled()
}

/// A GPU's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GpuMemory {
    /// Free now, for this process and every other.
    pub free: u64,
    /// The device's total.
    pub total: u64,
}

/// What the driver says of `device`'s memory: CUDA devices only (`None` elsewhere, and when
/// the driver cannot say).
pub fn gpu_memory(device: &candle_core::Device) -> Option<GpuMemory> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(cuda) => {
            let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some(GpuMemory {
                free: free as u64,
                total: total as u64,
            })
        }
        _ => None,
    }
}
