//! Turning `scheduler.devices` into candle devices, each with an engine runner.

use anyhow::Context as _;
use candle_core::Device;

use super::engine::EngineRunner;
use super::scheduler::DeviceSlot;
use crate::config::{DeviceSpec, Settings};
use crate::models::hub::{Fetcher, Hub};
use crate::request::AutoDefaults;

/// The devices `specs` name, with their labels (`cpu`, `cpu#1`, `cuda:0`). `auto` is every CUDA
/// device in a CUDA build (the first Metal device in a Metal build), else the CPU.
pub fn open(specs: &[DeviceSpec]) -> anyhow::Result<Vec<(String, Device)>> {
    let cpus = specs.iter().filter(|d| **d == DeviceSpec::Cpu).count();
    let mut cpu_index = 0;
    let mut devices = Vec::new();
    for spec in specs {
        match *spec {
            DeviceSpec::Auto => devices.extend(auto()),
            DeviceSpec::Cpu => {
                let label = if cpus > 1 {
                    format!("cpu#{cpu_index}")
                } else {
                    "cpu".to_owned()
                };
                cpu_index += 1;
                devices.push((label, Device::Cpu));
            }
            DeviceSpec::Cuda(n) => devices.push((format!("cuda:{n}"), gpu("cuda", n)?)),
            DeviceSpec::Metal(n) => devices.push((format!("metal:{n}"), gpu("metal", n)?)),
        }
    }
    Ok(devices)
}

fn auto() -> Vec<(String, Device)> {
    let mut found = Vec::new();
    #[cfg(feature = "cuda")]
    for n in 0..64 {
        match Device::new_cuda(n) {
            Ok(device) => found.push((format!("cuda:{n}"), device)),
            Err(_) => break,
        }
    }
    #[cfg(feature = "metal")]
    if let Ok(device) = Device::new_metal(0) {
        found.push(("metal:0".to_owned(), device));
    }
    if found.is_empty() {
        found.push(("cpu".to_owned(), Device::Cpu));
    }
    found
}

/// GPU `n` of `backend` (`cuda` or `metal`), or why this build cannot open it.
fn gpu(backend: &str, n: usize) -> anyhow::Result<Device> {
    let opened: Option<candle_core::Result<Device>> = match backend {
        #[cfg(feature = "cuda")]
        "cuda" => Some(Device::new_cuda(n)),
        #[cfg(feature = "metal")]
        "metal" => Some(Device::new_metal(n)),
        _ => None,
    };
    let Some(opened) = opened else {
        let name = match backend {
            "cuda" => "CUDA",
            "metal" => "Metal",
            other => other,
        };
        anyhow::bail!(
            "{backend}:{n} needs a build with {name} support (cargo build --release \
             --features {backend}; see the README)"
        )
    };
    opened.with_context(|| format!("{backend}:{n} is not available"))
}

/// What "auto" settings mean on `device`. The size: 256 on the CPU; on a GPU 512 with more
/// than 8 GiB free, else 304 (also when the free memory is unknown). The grid: 1 on the CPU, 4
/// on a GPU.
pub fn auto_defaults(device: &Device) -> AutoDefaults {
    if device.is_cpu() {
        return AutoDefaults::CPU;
    }
    AutoDefaults::gpu(crate::engine::gpu_memory(device).map(|m| m.free as f64 / GIB))
}

const GIB: f64 = (1u64 << 30) as f64;

/// The one device a command-line `--device` names, as `(label, device)`.
pub(crate) fn open_flag(spec: &DeviceSpec) -> anyhow::Result<(String, Device)> {
    open(std::slice::from_ref(spec))
        .map_err(|e| anyhow::anyhow!("--device: {e:#}"))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("--device: no device found"))
}

/// One engine runner per configured device, fetching weights through one Hub client on
/// `runtime`.
pub(crate) fn engine_slots(
    settings: &Settings,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<EngineSlots> {
    let weights = Fetcher::new(Hub::new(&settings.models)?, runtime);
    let scheduler = &settings.scheduler;
    // Process-wide in candle (and a no-op without CUDA).
    candle_core::cuda::set_gemm_reduced_precision_f32(scheduler.tf32);
    let mut auto = None::<AutoDefaults>;
    let mut slots = Vec::new();
    for (label, device) in
        open(&scheduler.devices).map_err(|e| anyhow::anyhow!("scheduler.devices: {e:#}"))?
    {
        let precision = scheduler.clip_precision_on(&device);
        let defaults = auto_defaults(&device);
        let max_batch = scheduler.max_batch_on(&device);
        tracing::info!(
            device = %label,
            clip_precision = %precision,
            tf32 = scheduler.tf32 && device.is_cuda(),
            memory = ?crate::engine::gpu_memory(&device),
            auto_side = defaults.side,
            auto_grid = defaults.grid,
            max_batch,
            "device"
        );
        auto = Some(auto.map_or(defaults, |a| a.min(defaults)));
        slots.push(DeviceSlot {
            label,
            runner: Box::new(
                EngineRunner::new(
                    device,
                    weights.clone(),
                    scheduler.model_cache_mib,
                    settings.storage.images.clone(),
                )
                .with_clip_precision(precision)
                .with_max_batch(max_batch),
            ),
        });
    }
    Ok(EngineSlots {
        slots,
        auto: auto.unwrap_or(AutoDefaults::CPU),
    })
}

/// This host's devices as scheduler slots.
pub(crate) struct EngineSlots {
    /// One per device.
    pub slots: Vec<DeviceSlot>,
    /// The "auto" settings every device here can run: the smallest side and grid of theirs
    /// (the CPU's when there are none, as on a front end, whose workers' devices it cannot see).
    pub auto: AutoDefaults,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_may_repeat_and_get_numbered_labels() {
        let labels = |specs: &[DeviceSpec]| -> Vec<String> {
            open(specs).unwrap().into_iter().map(|(l, _)| l).collect()
        };
        assert_eq!(labels(&[DeviceSpec::Cpu]), ["cpu"]);
        assert_eq!(
            labels(&[DeviceSpec::Cpu, DeviceSpec::Cpu]),
            ["cpu#0", "cpu#1"]
        );
        #[cfg(not(any(feature = "cuda", feature = "metal")))]
        {
            assert_eq!(labels(&[DeviceSpec::Auto]), ["cpu"]);
            let err = open(&[DeviceSpec::Cuda(0)]).unwrap_err().to_string();
            assert!(
                err.contains("cuda:0") && err.contains("--features cuda"),
                "{err}"
            );
        }
    }
}
