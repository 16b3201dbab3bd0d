//! Time and peak memory of one VQGAN decode + backward, the image half of a generation step,
//! with a full-size random-weight model on the CPU.
//!
//! ```text
//! cargo bench --bench vqgan_decode                         # 256² and 512², default model
//! cargo bench --bench vqgan_decode -- --size 256 --reps 5  # one size, in this process
//! cargo bench --bench vqgan_decode -- --model gumbel_f8_8192
//! ```
//!
//! Peak memory is the process's high-water mark (`VmHWM`), which only grows, so without `--size`
//! every size runs in a fresh child process. Per size it reports the resident memory after loading
//! the model, the peak during decode + backward, and the median time of forward (quantise, decode,
//! clamp) and backward (to the latent, through the decoder).

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use vqclip::engine::{
    nets::{
        random::SeededWeights,
        vqgan::{Vqgan, VqganConfig, VqganParts},
    },
    ops::clamp_with_grad,
};

struct Args {
    model: String,
    size: Option<usize>,
    reps: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: "imagenet_f16_16384".into(),
        size: None,
        reps: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--model" => args.model = value("--model")?,
            "--size" => {
                args.size = Some(
                    value("--size")?
                        .parse()
                        .map_err(|e| format!("--size: {e}"))?,
                )
            }
            "--reps" => {
                args.reps = Some(
                    value("--reps")?
                        .parse()
                        .map_err(|e| format!("--reps: {e}"))?,
                )
            }
            // cargo bench passes --bench; anything else is a mistake.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// A `/proc/self/status` field in bytes (Linux).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    })
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// One size in this process.
fn run_one(model: &str, size: usize, reps: usize) -> candle_core::Result<()> {
    let device = Device::Cpu;
    let config = VqganConfig::preset(model)
        .ok_or_else(|| candle_core::Error::Msg(format!("unknown model {model}")))?;
    let started = Instant::now();
    let vb = SeededWeights::new(0).var_builder(DType::F32, &device);
    let vqgan = Vqgan::new(vb, &config, VqganParts::DecodeOnly)?;
    let load = started.elapsed();
    let rss_loaded = proc_status_bytes("VmRSS:");

    let f = config.downsample_factor();
    let toks = size / f;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    // Random codebook rows, as a generation starts; a random image gradient stands in for CLIP.
    let indices: Vec<u32> = (0..toks * toks)
        .map(|_| rng.random_range(0..config.n_embed as u32))
        .collect();
    let indices = Tensor::from_vec(indices, (1, toks, toks), &device)?;
    let z = Var::from_tensor(&vqgan.quantizer().rows(&indices)?)?;
    let grad_values: Vec<f32> = (0..3 * size * size)
        .map(|_| rng.random_range(-1e-3..1e-3))
        .collect();
    let grad_image = Tensor::from_vec(grad_values, (1, 3, size, size), &device)?;

    let (mut forward, mut backward) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t0 = Instant::now();
        let z_q = vqgan.quantizer().quantize(z.as_tensor())?.z_q;
        let image = clamp_with_grad(&((vqgan.decode(&z_q)? + 1.0)? / 2.0)?, 0.0, 1.0)?;
        let loss = (image * &grad_image)?.sum_all()?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let mut grads = loss.backward()?;
        let grad_z = grads
            .remove(z.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached z".into()))?;
        grad_z.abs()?.max_all()?.to_scalar::<f32>()?;
        backward.push(t1.elapsed());
        forward.push(t1 - t0);
    }
    println!(
        "{model} {size}x{size} (z {toks}x{toks}): load {:.1} s, RSS after load {}, peak {}; \
         forward {:.2} s, backward {:.2} s (medians of {reps})",
        load.as_secs_f64(),
        gib(rss_loaded),
        gib(proc_status_bytes("VmHWM:")),
        median(forward).as_secs_f64(),
        median(backward).as_secs_f64(),
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(size) = args.size {
        return match run_one(&args.model, size, args.reps.unwrap_or(3)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("error: cannot find this benchmark's executable");
        return ExitCode::FAILURE;
    };
    // Each size in its own process, so each peak is its own.
    for (size, reps) in [(256, args.reps.unwrap_or(3)), (512, args.reps.unwrap_or(1))] {
        let status = Command::new(&exe)
            .args([
                "--model",
                &args.model,
                "--size",
                &size.to_string(),
                "--reps",
                &reps.to_string(),
            ])
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("error: the {size}x{size} run failed");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
