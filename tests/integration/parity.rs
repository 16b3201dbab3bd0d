//! Parity with the PyTorch reference: every case in `tests/fixtures/parity/` (format in that
//! folder's README) is run by `vqclip::selftest` and every tensor our code can compute is
//! compared within the case's tolerances, on both of the engine's paths. New `*.json` cases are
//! picked up with no code change; a case that cannot be read or run fails the test.

use std::path::Path;

use candle_core::Device;
use vqclip::engine::nets::Precision;

const PARITY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parity");

/// Every case, on both of the engine's paths.
#[test]
fn parity_with_the_pytorch_reference_on_every_case() {
    // Both paths the engine has: the CPU kernels, and the composed candle ops a CUDA or Metal
    // device runs (`VQCLIP_CPU_KERNELS=0`), held to the same tolerances.
    run_every_case(Precision::F32);
}

/// Every case with CLIP in f16 and in bf16, as on a GPU, within the case's tolerances widened
/// by the fixed factor `vqclip::selftest::tolerance_factor` states for each.
#[test]
fn parity_with_clip_in_half_precision_on_every_case() {
    run_every_case(Precision::F16);
    run_every_case(Precision::Bf16);
}

fn run_every_case(precision: Precision) {
    let cases = vqclip::selftest::cases_in(Path::new(PARITY_DIR)).unwrap();
    let mut failures = Vec::new();
    for (path, cpu_kernels) in [("CPU kernels", true), ("composed ops", false)] {
        for json in &cases {
            let name = json.file_stem().unwrap_or_default().to_string_lossy();
            let name = format!("{name} ({path}, CLIP in {precision})");
            let run = vqclip::engine::with_cpu_kernels(cpu_kernels, || {
                vqclip::selftest::run_case(json, &Device::Cpu, precision)
            });
            match run {
                Ok(report) => {
                    let names: Vec<&str> =
                        report.compared.iter().map(|c| c.tensor.as_str()).collect();
                    println!("{name}: matched {}", names.join(", "));
                    failures.extend(report.failures.iter().map(|f| format!("{name}: {f}")));
                }
                Err(e) => failures.push(format!("{name}: {e:#}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n  {}",
        failures.join("\n  ")
    );
}
