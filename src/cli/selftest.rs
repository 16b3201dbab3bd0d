//! `vqclip selftest`: the parity cases on each device, one line per case, exit status 1 when
//! any case fails.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;

use super::settings_for;
use crate::config::{DeviceSpec, Environment};
use crate::engine::nets::Precision;

/// Where the repository keeps its parity cases (the default for `--fixtures`).
const REPOSITORY_CASES: &str = "tests/fixtures/parity";

/// Options of `vqclip selftest`.
#[derive(Debug, Args)]
pub(crate) struct SelftestArgs {
    /// Device to test (repeat for several): cpu, cuda:N, metal:N [default: scheduler.devices].
    #[arg(long)]
    pub device: Vec<DeviceSpec>,
    /// Folder of parity cases (`*.json` with their tensors and weights) [default:
    /// tests/fixtures/parity, the repository's].
    #[arg(long, value_name = "DIR")]
    pub fixtures: Option<PathBuf>,
    /// CLIP's precision: f32, f16 or bf16; the half types widen every tolerance by a fixed
    /// factor (printed) [default: f32, the strictest check].
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Let f32 matrix products on CUDA use TF32 tensor cores (as `scheduler.tf32` does for jobs);
    /// off by default, since TF32 keeps only 10 bits of mantissa.
    #[arg(long)]
    pub tf32: bool,
    /// Print every tensor's worst error, not only each case's worst.
    #[arg(long, short)]
    pub verbose: bool,
}

pub(super) fn selftest(
    config: Option<&Path>,
    env: &Environment,
    args: &SelftestArgs,
) -> anyhow::Result<()> {
    let specs = if args.device.is_empty() {
        settings_for(config, env, "choose the devices to test")?
            .scheduler
            .devices
    } else {
        args.device.clone()
    };
    let devices = crate::jobs::devices::open(&specs)?;
    let dir = args
        .fixtures
        .clone()
        .unwrap_or_else(|| PathBuf::from(REPOSITORY_CASES));
    let cases = crate::selftest::cases_in(&dir)?;
    candle_core::cuda::set_gemm_reduced_precision_f32(args.tf32);
    let widen = crate::selftest::tolerance_factor(args.precision);
    println!(
        "CLIP in {}{}{}",
        args.precision,
        if widen == 1.0 {
            String::new()
        } else {
            format!(", tolerances ×{widen}")
        },
        if args.tf32 { ", TF32 on" } else { "" }
    );
    let mut failed = 0;
    for (label, device) in &devices {
        for json in &cases {
            let name = json.file_stem().unwrap_or_default().to_string_lossy();
            let mut line = format!("{label:<8} {name:<20} ");
            match crate::selftest::run_case(json, device, args.precision) {
                Ok(report) => {
                    let verdict = if report.failures.is_empty() {
                        "ok"
                    } else {
                        failed += 1;
                        "FAILED"
                    };
                    let _ = write!(line, "{verdict:<6} {} tensors", report.compared.len());
                    if let Some(worst) = report.worst() {
                        let _ = write!(
                            line,
                            "; worst {} at {:.2} of its tolerance (|Δ| {:.2e})",
                            worst.tensor, worst.worst_of_tolerance, worst.worst_abs
                        );
                    }
                    if args.verbose {
                        for c in &report.compared {
                            let _ = write!(
                                line,
                                "\n    {:<20} {:>8.3} of its tolerance (|Δ| {:.2e})",
                                c.tensor, c.worst_of_tolerance, c.worst_abs
                            );
                        }
                    }
                    if !report.skipped.is_empty() {
                        let _ = write!(
                            line,
                            "\n    not compared in {}: {}",
                            args.precision,
                            report.skipped.join(", ")
                        );
                    }
                    for failure in &report.failures {
                        let _ = write!(line, "\n    {failure}");
                    }
                }
                Err(e) => {
                    failed += 1;
                    let _ = write!(line, "FAILED {e:#}");
                }
            }
            println!("{line}");
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} runs failed: this build does not compute what the reference computes \
         on the device(s) marked FAILED",
        cases.len() * devices.len()
    );
    Ok(())
}
