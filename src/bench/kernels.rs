//! `vqclip bench --kernels`: the speed of the CPU kernels a step spends its time in — the
//! decoder's largest 3×3 convolution by each of our paths and by candle's, and an f32 matrix
//! product — in GFLOP/s, with the vector extensions this CPU offers. A figure to compare
//! machines and builds with, beside the step's time; never a test.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::engine::kernels::conv::{Kernel, conv2d_host_with};

/// What to time.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Side of the convolution's square input (the decoder's last levels run at the output
    /// size).
    pub side: usize,
    /// Input and output channels of the convolution (128 in the decoder's last level).
    pub channels: usize,
    /// Side of the square matrices multiplied.
    pub matmul: usize,
    /// Timed runs of each kernel (the median is reported).
    pub iters: u32,
    /// Untimed runs first.
    pub warmup: u32,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            side: 256,
            channels: 128,
            matmul: 4096,
            iters: 3,
            warmup: 1,
        }
    }
}

/// One kernel's speed.
#[derive(Debug, Clone, Serialize)]
pub struct KernelSpeed {
    /// What ran.
    pub name: &'static str,
    /// Median seconds per run.
    pub median_s: f64,
    /// Floating-point operations per second, in billions, counting a convolution as the direct
    /// method's multiply-adds (so a faster algorithm shows as more GFLOP/s).
    pub gflops: f64,
}

/// The CPU kernels' speed on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    /// The x86 vector extensions this CPU offers (`avx2`, `fma`, `avx512f`, …).
    pub cpu_flags: Vec<&'static str>,
    /// Threads the kernels use.
    pub threads: usize,
    /// The choices made for this CPU, `part: choice`.
    pub chosen: Vec<String>,
    /// Each kernel, in the order timed.
    pub kernels: Vec<KernelSpeed>,
}

impl KernelReport {
    /// One line per kernel, for people.
    pub(crate) fn summary(&self) -> String {
        let mut out = format!(
            "CPU flags: {}; {} threads; {}\n",
            if self.cpu_flags.is_empty() {
                "none of avx2/fma/avx512".to_owned()
            } else {
                self.cpu_flags.join(" ")
            },
            self.threads,
            self.chosen.join(", ")
        );
        for k in &self.kernels {
            out.push_str(&format!(
                "{:<34} {:>8.4} s  {:>8.1} GFLOP/s\n",
                k.name, k.median_s, k.gflops
            ));
        }
        out
    }
}

/// The vector extensions the kernels (ours, `gemm`'s) can use on this CPU.
pub(super) fn cpu_flags() -> Vec<&'static str> {
    let mut flags = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let known: [(&'static str, bool); 5] = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
            ("avx512vl", std::arch::is_x86_feature_detected!("avx512vl")),
        ];
        flags.extend(
            known
                .into_iter()
                .filter(|(_, on)| *on)
                .map(|(name, _)| name),
        );
    }
    flags
}

/// Times each kernel on seeded random inputs (the CPU kernels on, whatever
/// `VQCLIP_CPU_KERNELS` says: they are what is measured).
pub fn kernels(options: &KernelOptions) -> anyhow::Result<KernelReport> {
    crate::engine::kernels::cpu::with_kernels(true, || time_kernels(options))
}

fn time_kernels(options: &KernelOptions) -> anyhow::Result<KernelReport> {
    anyhow::ensure!(
        (1..=1024).contains(&options.side)
            && (1..=1024).contains(&options.channels)
            && (1..=8192).contains(&options.matmul),
        "kernel sizes out of range (side ≤ 1024, channels ≤ 1024, matmul ≤ 8192)"
    );
    let c = options.channels;
    let side = options.side;
    let x = Tensor::randn(0f32, 1.0, (1, c, side, side), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 0.05, (c, c, 3, 3), &Device::Cpu)?;
    let conv_flop = 2.0 * 9.0 * (c * c) as f64 * (side * side) as f64;
    let n = options.matmul;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let matmul_flop = 2.0 * (n as f64).powi(3);

    let ours = |winograd: bool| -> anyhow::Result<Tensor> {
        conv2d_host_with(&x, &w, None, 1, false, winograd, Kernel::AsStored)?
            .ok_or_else(|| anyhow::anyhow!("the CPU convolution kernel does not apply"))?
            .into_tensor()
            .map_err(Into::into)
    };
    type Run<'a> = Box<dyn Fn() -> anyhow::Result<Tensor> + 'a>;
    let runs: [(&'static str, f64, Run); 4] = [
        (
            "conv 3x3, Winograd F(2x2,3x3)",
            conv_flop,
            Box::new(|| ours(true)),
        ),
        (
            "conv 3x3, shift-and-GEMM",
            conv_flop,
            Box::new(|| ours(false)),
        ),
        (
            "conv 3x3, candle",
            conv_flop,
            Box::new(|| Ok(x.conv2d(&w, 1, 1, 1, 1)?)),
        ),
        (
            "matmul f32 (gemm)",
            matmul_flop,
            Box::new(|| Ok(a.matmul(&a)?)),
        ),
    ];
    let mut kernels = Vec::new();
    for (name, flop, run) in runs {
        for _ in 0..options.warmup {
            run()?;
        }
        let mut times = Vec::new();
        for _ in 0..options.iters.max(1) {
            let started = Instant::now();
            run()?;
            times.push(started.elapsed().as_secs_f64());
        }
        let median_s = super::median(&times);
        kernels.push(KernelSpeed {
            name,
            median_s,
            gflops: flop / median_s.max(f64::MIN_POSITIVE) / 1e9,
        });
    }
    Ok(KernelReport {
        cpu_flags: cpu_flags(),
        threads: candle_core::utils::get_num_threads(),
        chosen: crate::engine::kernels::chosen()
            .into_iter()
            .map(|(part, choice)| format!("{part}: {choice}"))
            .collect(),
        kernels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_timed_and_reported() {
        let options = KernelOptions {
            side: 8,
            channels: 4,
            matmul: 16,
            iters: 2,
            warmup: 0,
        };
        let report = kernels(&options).unwrap();
        let names: Vec<&str> = report.kernels.iter().map(|k| k.name).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(names.iter().any(|n| n.contains("Winograd")));
        assert!(names.iter().any(|n| n.contains("matmul")));
        for k in &report.kernels {
            assert!(
                k.median_s >= 0.0 && k.gflops.is_finite() && k.gflops > 0.0,
                "{k:?}"
            );
        }
        let summary = report.summary();
        assert!(summary.starts_with("CPU flags: "), "{summary}");
        assert_eq!(summary.lines().count(), 5, "{summary}");
        let too_big = KernelOptions {
            matmul: 100_000,
            ..options
        };
        assert!(kernels(&too_big).is_err());
    }
}
