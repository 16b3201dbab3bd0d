//! Several CLIP models guiding one picture (pytti's ensemble), on the tiny models: each model
//! scores its own cutouts at its own input size, the losses and the gradient are the weighted
//! sums, a run of one CLIP is untouched, and the command line runs one.

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use vqclip::engine::generate::{
    GenerationInputs, GenerationSpec, Generator, Models, step_together,
};
use vqclip::engine::nets::clip::{Clip, ClipConfig};
use vqclip::engine::nets::random::SeededWeights;
use vqclip::engine::spec::ClipShare;

use crate::pipeline::{spec, tiny_models};

/// The tiny models with a second, different tiny CLIP (48 px input, 24-wide embeddings).
fn two_clips() -> Models {
    let mut models = tiny_models();
    let other = Clip::new(
        SeededWeights::new(5).var_builder(DType::F32, &Device::Cpu),
        &ClipConfig::tiny_48(),
    )
    .unwrap();
    models.more_clips.push(("tiny_clip_48".into(), other));
    models
}

fn ensemble(own: f64, other: f64) -> GenerationSpec {
    GenerationSpec {
        clip_weight: own,
        more_clips: vec![ClipShare {
            model: "tiny_clip_48".into(),
            weight: other,
        }],
        ..base()
    }
}

fn base() -> GenerationSpec {
    GenerationSpec {
        steps: 3,
        preview_every: 0,
        frame_every: 0,
        ..spec(21)
    }
}

/// With a noise prompt: each model draws its own target, as wide as its embeddings.
fn noisy(spec: GenerationSpec) -> GenerationSpec {
    GenerationSpec {
        noise_prompts: vec![0.5],
        ..spec
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn first_losses(models: &Models, spec: GenerationSpec) -> Vec<f64> {
    let mut run = Generator::new(models, spec, GenerationInputs::default()).unwrap();
    run.step().unwrap().prompt_losses
}

fn end(models: &Models, spec: GenerationSpec) -> Vec<f32> {
    let out = Generator::new(models, spec, GenerationInputs::default())
        .unwrap()
        .run(&AtomicBool::new(false), |_| {})
        .unwrap();
    values(&out.latent)
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The first step's losses list the job's own model's prompts (as alone: its cutouts are drawn
/// first), then the other model's, each times its weight; the gradient follows the weights.
/// (The other models draw their image and noise prompts' randomness after the own model's, so
/// with those the own model's cutouts come later in the stream than alone.)
#[test]
fn an_ensemble_sums_each_models_weighted_losses() {
    let models = two_clips();
    let alone = first_losses(&models, base());
    // Two text prompts.
    assert_eq!(alone.len(), 2);
    let both = first_losses(&models, ensemble(1.0, 1.0));
    assert_eq!(both.len(), 4);
    assert_eq!(both[..2], alone[..], "the own model's losses changed");
    let doubled = first_losses(&models, ensemble(1.0, 2.0));
    let halved = first_losses(&models, ensemble(0.5, 1.0));
    for i in 0..2 {
        assert!((doubled[2 + i] - 2.0 * both[2 + i]).abs() < 1e-6 * both[2 + i].abs().max(1.0));
        assert!((halved[i] - 0.5 * alone[i]).abs() < 1e-6 * alone[i].abs().max(1.0));
        assert_eq!(halved[2 + i], both[2 + i]);
    }
    assert_eq!(first_losses(&models, noisy(ensemble(1.0, 1.0))).len(), 6);
    // The weights steer the gradient: doubling the other model's weight moves the latent, unless
    // that weight is near 0; doubling both changes nothing but the scale, which Adam ignores.
    let end_of = |own, other| end(&models, ensemble(own, other));
    let base = end_of(1.0, 1.0);
    let full = distance(&end_of(1.0, 2.0), &base);
    let faint = distance(&end_of(1.0, 2e-6), &end_of(1.0, 1e-6));
    let scaled = distance(&end_of(2.0, 2.0), &base);
    println!(
        "doubling the other model's weight moved the latent {full:.4}; near 0 {faint:.2e}; doubling both {scaled:.2e}"
    );
    assert!(full > 1e-2, "{full}");
    assert!(faint < full / 100.0, "{faint} vs {full}");
    assert!(scaled < full / 100.0, "{scaled} vs {full}");
}

/// Ensemble runs batched together end as each alone (up to the order of sums), and a run
/// naming a model that is not loaded is refused before any work.
#[test]
fn ensemble_runs_batch_and_unknown_models_are_refused() {
    let models = two_clips();
    let specs = [
        ensemble(1.0, 0.5),
        GenerationSpec {
            seed: 22,
            ..ensemble(2.0, 1.0)
        },
    ];
    let alone: Vec<Vec<f32>> = specs.iter().map(|s| end(&models, s.clone())).collect();
    let mut runs: Vec<Generator> = specs
        .iter()
        .map(|s| Generator::new(&models, s.clone(), GenerationInputs::default()).unwrap())
        .collect();
    while !runs[0].is_done() {
        let mut all: Vec<&mut Generator> = runs.iter_mut().collect();
        step_together(&mut all).unwrap();
    }
    for (run, alone) in runs.into_iter().zip(&alone) {
        let together = values(&run.finish().unwrap().latent);
        let d = distance(&together, alone);
        assert!(d < 1e-4, "a batched ensemble run differs by {d}");
    }
    // A run of one CLIP cannot share a batch with an ensemble.
    let mut one = Generator::new(&models, base(), GenerationInputs::default()).unwrap();
    let mut two = Generator::new(&models, ensemble(1.0, 1.0), GenerationInputs::default()).unwrap();
    let err = step_together(&mut [&mut one, &mut two])
        .unwrap_err()
        .to_string();
    assert!(err.contains("same CLIP models"), "{err}");
    let missing = GenerationSpec {
        more_clips: vec![ClipShare {
            model: "vit_b16".into(),
            weight: 1.0,
        }],
        ..base()
    };
    let err = Generator::new(&models, missing, GenerationInputs::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vit_b16 is not loaded"), "{err}");
}

/// `vqclip imagine --clip tiny_clip,tiny_clip_48:0.5` runs both models, records them in the
/// PNG and the JSON record, and refuses a model named twice or a weight of 0.
#[test]
fn the_command_line_runs_a_two_clip_ensemble() {
    use crate::cli::vqclip;
    let dir = tempfile::tempdir().unwrap();
    let args = |clip: &str| -> Vec<String> {
        [
            "imagine",
            "a lighthouse",
            "--model",
            "tiny",
            "--clip",
            clip,
            "--steps",
            "2",
            "--size",
            "32x32",
            "--cutn",
            "2",
            "--seed",
            "5",
            "-o",
            "a.png",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let run = |clip: &str| {
        let args = args(clip);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        vqclip(dir.path(), &args, &[])
    };
    let out = run("tiny_clip,tiny_clip_48:0.5");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("a.json")).unwrap()).unwrap();
    assert_eq!(
        record["spec"]["more_clips"],
        serde_json::json!([{ "model": "tiny_clip_48", "weight": 0.5 }])
    );
    let chunks =
        vqclip::engine::image::png_text(&std::fs::read(dir.path().join("a.png")).unwrap()).unwrap();
    let models = chunks
        .iter()
        .find(|(k, _)| k == "models")
        .map(|(_, v)| v.clone());
    assert_eq!(
        models.as_deref(),
        Some("tiny_vqgan + tiny_clip,tiny_clip_48:0.5")
    );
    for (clip, says) in [
        ("tiny_clip,tiny_clip", "named twice"),
        ("tiny_clip,tiny_clip_48:0", "weight must be above 0"),
        ("tiny_clip,vit_b99", "unknown CLIP model"),
    ] {
        let out = run(clip);
        assert_ne!(out.status.code(), Some(0), "{clip}");
        assert!(
            text(&out.stderr).contains(says),
            "{clip}: {}",
            text(&out.stderr)
        );
    }
}

/// A device runs an ensemble job with every model resident at once, and refuses one whose
/// weights together are over its model budget (`scheduler.model_cache_mib`) before loading it;
/// one model alone still runs over the budget, as ever.
#[test]
fn a_device_runs_an_ensemble_within_its_model_budget() {
    use std::sync::Arc;
    use vqclip::jobs::engine::EngineRunner;
    use vqclip::jobs::worker::{Assignment, RunError, Runner, StopFlags};
    use vqclip::jobs::{JobId, JobParams};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let dir = tempfile::tempdir().unwrap();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let env: vqclip::config::Environment = [("HOME", dir.path().to_str().unwrap())]
        .into_iter()
        .collect();
    // The tiny CLIP from its file, so that it weighs something.
    let settings = vqclip::config::Settings::from_toml(
        &format!(
            "[models]\nallow_tiny = true\n\
             [models.tiny_clip]\npath = \"{fixtures}/parity/tiny_clip.safetensors\"\n"
        ),
        &env,
    )
    .unwrap();
    let job = |spec: GenerationSpec| Assignment {
        id: JobId(1),
        user: 1,
        prompt: "a red lighthouse".into(),
        params: JobParams {
            spec,
            inputs: Default::default(),
            grid: 1,
            video: None,
        },
        vqgan: "tiny_vqgan".into(),
        clip: "tiny_clip".into(),
        stop: Arc::default(),
    };
    let small = |spec: GenerationSpec| GenerationSpec {
        steps: 2,
        cutn: 2,
        ..spec
    };
    let runner = |budget_mib| {
        EngineRunner::new(
            Device::Cpu,
            crate::support::fetcher(&settings),
            budget_mib,
            dir.path().join("images"),
        )
    };
    let mut roomy = runner(64);
    let out = roomy
        .run(
            &job(small(ensemble(1.0, 0.5))),
            &StopFlags::default(),
            &mut |_| {},
        )
        .unwrap();
    assert!(out.png.starts_with(b"\x89PNG"));
    let mut resident = roomy.resident();
    resident.sort();
    assert_eq!(resident, ["tiny_clip", "tiny_clip_48", "tiny_vqgan"]);

    let mut tight = runner(0);
    let refused = tight
        .run(
            &job(small(ensemble(1.0, 0.5))),
            &StopFlags::default(),
            &mut |_| {},
        )
        .unwrap_err();
    let RunError::Failed(message) = refused else {
        panic!("{refused:?}");
    };
    assert!(
        message.contains("tiny_clip + tiny_clip_48 with tiny_vqgan need")
            && message.contains("scheduler.model_cache_mib"),
        "{message}"
    );
    assert!(tight.resident().is_empty(), "{:?}", tight.resident());
    tight
        .run(&job(small(base())), &StopFlags::default(), &mut |_| {})
        .unwrap();
}
