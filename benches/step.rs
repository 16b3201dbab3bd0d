//! Time and peak memory of whole generation steps (decode, cutouts, CLIP, loss, backward, Adam)
//! with full-size random-weight models: `imagenet_f16_16384` and CLIP ViT-B/32 by default.
//!
//! ```text
//! cargo bench --bench step                                   # 256², cutn 8 and 32
//! cargo bench --bench step -- --size 256 --cutn 32 --steps 3 --chunk 8
//! cargo bench --bench step -- --clip vit_b16 --crops
//! ```
//!
//! Each configuration runs in its own process (the peak, `VmHWM`, only grows). The first step
//! is reported apart from the median of the rest, since it also embeds the prompt.

use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::{DType, Device};
use vqclip::engine::generate::{
    CutoutSetting, GenerationInputs, GenerationSpec, Generator, Models,
};
use vqclip::engine::nets::clip::{Clip, ClipConfig};
use vqclip::engine::nets::random::SeededWeights;
use vqclip::engine::nets::tokenizer::ClipTokenizer;
use vqclip::engine::nets::vqgan::{Vqgan, VqganConfig, VqganParts};
use vqclip::engine::prompt::WeightedPrompt;

#[derive(Debug, Clone)]
struct Args {
    vqgan: String,
    clip: String,
    size: Option<u32>,
    cutn: Option<u32>,
    steps: u32,
    chunk: u32,
    crops: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        vqgan: "imagenet_f16_16384".into(),
        clip: "vit_b32".into(),
        size: None,
        cutn: None,
        steps: 3,
        chunk: 8,
        crops: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let number = |v: String, name: &str| v.parse::<u32>().map_err(|e| format!("{name}: {e}"));
        match arg.as_str() {
            "--model" => args.vqgan = value("--model")?,
            "--clip" => args.clip = value("--clip")?,
            "--size" => args.size = Some(number(value("--size")?, "--size")?),
            "--cutn" => args.cutn = Some(number(value("--cutn")?, "--cutn")?),
            "--steps" => args.steps = number(value("--steps")?, "--steps")?.max(2),
            "--chunk" => args.chunk = number(value("--chunk")?, "--chunk")?.max(1),
            "--crops" => args.crops = true,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn peak_gib() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or("n/a".into(), |kib| {
            format!("{:.2} GiB", kib / (1024.0 * 1024.0))
        })
}

fn run_one(args: &Args, size: u32, cutn: u32) -> Result<(), String> {
    let device = Device::Cpu;
    let err = |e: candle_core::Error| e.to_string();
    let vqgan_cfg = VqganConfig::preset(&args.vqgan).ok_or("unknown VQGAN")?;
    let clip_cfg = ClipConfig::preset(&args.clip).ok_or("unknown CLIP")?;
    let vqgan = Vqgan::new(
        SeededWeights::new(0).var_builder(DType::F32, &device),
        &vqgan_cfg,
        VqganParts::DecodeOnly,
    )
    .map_err(err)?;
    let clip = Clip::new(
        SeededWeights::new(1).var_builder(DType::F32, &device),
        &clip_cfg,
    )
    .map_err(err)?;
    let models = Models {
        vqgan,
        clip,
        tokenizer: ClipTokenizer::new(),
        more_clips: Vec::new(),
    };
    let prompts = vec![WeightedPrompt {
        text: "a watercolour lighthouse in a storm".into(),
        weight: 1.0,
        stop: None,
    }];
    let spec = GenerationSpec {
        steps: args.steps,
        cutn,
        chunk: args.chunk,
        preview_every: 0,
        cutouts: if args.crops {
            CutoutSetting::Crops { cut_pow: 1.0 }
        } else {
            CutoutSetting::Pooled
        },
        ..GenerationSpec::new(prompts, size, size, 42)
    };
    let started = Instant::now();
    let mut generator =
        Generator::new(&models, spec, GenerationInputs::default()).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    let mut last = Instant::now();
    while !generator.is_done() {
        generator.step().map_err(|e| e.to_string())?;
        times.push(last.elapsed().as_secs_f64());
        last = Instant::now();
    }
    let first = times[0];
    let mut rest = times[1..].to_vec();
    rest.sort_by(f64::total_cmp);
    println!(
        "{} + {}, {size}x{size}, cutn {cutn} (chunk {}){}: first step {first:.2} s, then {:.2} s/step (median of {}), peak {}, total {:.1} s",
        args.vqgan,
        args.clip,
        args.chunk,
        if args.crops { ", crops" } else { ", pooled" },
        rest[rest.len() / 2],
        rest.len(),
        peak_gib(),
        started.elapsed().as_secs_f64(),
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
    if let (Some(size), Some(cutn)) = (args.size, args.cutn) {
        return match run_one(&args, size, cutn) {
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
    let sizes = args.size.map_or(vec![256], |s| vec![s]);
    let cutns = args.cutn.map_or(vec![8, 32], |c| vec![c]);
    for &size in &sizes {
        for &cutn in &cutns {
            let mut child = Command::new(&exe);
            child.args([
                "--model",
                &args.vqgan,
                "--clip",
                &args.clip,
                "--size",
                &size.to_string(),
                "--cutn",
                &cutn.to_string(),
            ]);
            child.args([
                "--steps",
                &args.steps.to_string(),
                "--chunk",
                &args.chunk.to_string(),
            ]);
            if args.crops {
                child.arg("--crops");
            }
            if !child.status().is_ok_and(|s| s.success()) {
                eprintln!("error: the {size}x{size} cutn {cutn} run failed");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
