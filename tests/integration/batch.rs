//! Several runs optimised as one batch: each ends where it would alone, a batch is
//! reproducible, and a grid's composite holds its images.

use std::sync::atomic::AtomicBool;

use candle_core::Tensor;
use vqclip::engine::{
    generate::{
        CutoutSetting, GenerationInputs, GenerationSpec, Generator, Models, Output, step_together,
    },
    grid,
    optimize::InitWeight,
    prompt::WeightedPrompt,
};

use super::pipeline::{spec, tiny_models};

/// How far a batched run's final latent may be from the same run alone: f32 rounding of values
/// about 1. Measured on this CPU, on both the CPU kernels and the composed ops a GPU runs, with
/// passes of 3 and of 8 cutouts: 0, bit for bit — a batch groups each run's cutouts into CLIP
/// passes as the run alone does (`optimize::passes`), and no product here sums a row
/// differently for having more rows.
const BATCH_TOLERANCE: f32 = 1e-5;

/// Four runs that differ in everything a batch lets them differ in: seed, prompts, init weight.
fn members() -> Vec<GenerationSpec> {
    let base = GenerationSpec {
        steps: 4,
        preview_every: 0,
        frame_every: 0,
        ..spec(40)
    };
    let other_prompt = vec![WeightedPrompt {
        text: "a green forest at night".into(),
        weight: 1.0,
        stop: Some(0.2),
    }];
    vec![
        base.clone(),
        GenerationSpec {
            seed: 41,
            prompts: other_prompt,
            ..base.clone()
        },
        GenerationSpec {
            seed: 42,
            init_weight: InitWeight::ToZeroDecaying { weight: 0.3 },
            ..base.clone()
        },
        GenerationSpec {
            seed: 43,
            cutn: 7,
            ..base
        },
    ]
}

fn alone(models: &Models, spec: GenerationSpec) -> Output {
    Generator::new(models, spec, GenerationInputs::default())
        .unwrap()
        .run(&AtomicBool::new(false), |_| {})
        .unwrap()
}

fn together(models: &Models, specs: &[GenerationSpec]) -> Vec<Output> {
    let runs = specs
        .iter()
        .map(|s| Generator::new(models, s.clone(), GenerationInputs::default()).unwrap())
        .collect();
    grid::run_together(runs, &AtomicBool::new(false), |_, _| {}).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn worst_difference(a: &Tensor, b: &Tensor) -> f32 {
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn batch_equals_alone(settings: &[(CutoutSetting, u32)]) {
    let models = tiny_models();
    for &(cutouts, chunk) in settings {
        let specs: Vec<GenerationSpec> = members()
            .into_iter()
            .map(|s| GenerationSpec {
                cutouts,
                chunk,
                ..s
            })
            .collect();
        let batched = together(&models, &specs);
        for (spec, batched) in specs.iter().zip(&batched) {
            let single = alone(&models, spec.clone());
            let worst = worst_difference(&single.latent, &batched.latent);
            eprintln!(
                "seed {} {cutouts:?} chunk {chunk}: worst |Δz| {worst:e}",
                spec.seed
            );
            assert!(
                worst <= BATCH_TOLERANCE,
                "seed {} {cutouts:?}: the batched latent is {worst} from the run alone",
                spec.seed
            );
            assert_eq!(single.latent.dims(), batched.latent.dims());
        }
        // The members did not all become the same picture.
        assert_ne!(values(&batched[0].latent), values(&batched[1].latent));
        // Twice the same batch: the same bytes.
        let again = together(&models, &specs);
        for (a, b) in batched.iter().zip(&again) {
            assert_eq!(values(&a.latent), values(&b.latent));
            assert!(a.png == b.png, "two batched runs gave different images");
        }
    }
}

#[test]
fn each_run_of_a_batch_ends_where_it_would_alone_and_batches_repeat_exactly() {
    batch_equals_alone(&[
        (CutoutSetting::Pooled, 3),
        (CutoutSetting::Crops { cut_pow: 1.0 }, 3),
    ]);
}

/// The composed ops a GPU runs, on the CPU.
#[test]
fn on_the_device_path_a_batch_also_ends_where_each_run_would_alone() {
    vqclip::engine::with_cpu_kernels(false, || {
        batch_equals_alone(&[
            (CutoutSetting::Pooled, 3),
            // Passes of 8: the first two runs' cutouts share one.
            (CutoutSetting::Pooled, 8),
        ])
    });
}

#[test]
fn runs_of_different_sizes_or_lengths_are_not_batched() {
    let models = tiny_models();
    let base = members().remove(0);
    let mut a = Generator::new(&models, base.clone(), GenerationInputs::default()).unwrap();
    let mut b = Generator::new(
        &models,
        GenerationSpec {
            width: 16,
            height: 16,
            ..base.clone()
        },
        GenerationInputs::default(),
    )
    .unwrap();
    let err = step_together(&mut [&mut a, &mut b])
        .unwrap_err()
        .to_string();
    assert!(err.contains("same models and size"), "{err}");
    // Nothing ran: the first run is still at its start.
    assert_eq!(a.iteration(), 0);
    let longer = Generator::new(
        &models,
        GenerationSpec {
            steps: 9,
            ..base.clone()
        },
        GenerationInputs::default(),
    )
    .unwrap();
    let first = Generator::new(&models, base, GenerationInputs::default()).unwrap();
    let err = grid::run_together(vec![first, longer], &AtomicBool::new(false), |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("differ in steps"), "{err}");
}

#[test]
fn a_batch_reports_each_runs_own_progress() {
    let models = tiny_models();
    let specs: Vec<GenerationSpec> = members()
        .into_iter()
        .map(|s| GenerationSpec {
            preview_every: 2,
            ..s
        })
        .collect();
    let runs: Vec<Generator> = specs
        .iter()
        .map(|s| Generator::new(&models, s.clone(), GenerationInputs::default()).unwrap())
        .collect();
    let mut seen = Vec::new();
    grid::run_together(runs, &AtomicBool::new(false), |progress, runs| {
        assert_eq!(progress.len(), 4);
        let previews = runs.iter().filter(|r| r.preview_image().is_some()).count();
        seen.push((
            progress[0].iteration,
            progress.iter().map(|p| p.loss).collect::<Vec<_>>(),
            progress.iter().filter(|p| p.preview.is_some()).count(),
            previews,
        ));
    })
    .unwrap();
    assert_eq!(seen.len(), 4);
    for (i, (iteration, losses, previews, kept)) in seen.iter().enumerate() {
        assert_eq!(*iteration as usize, i + 1);
        // Different prompts and seeds: different losses.
        assert!(losses.iter().all(|l| l.is_finite()));
        assert_ne!(losses[0], losses[1]);
        assert_eq!(*previews, if i % 2 == 0 { 4 } else { 0 }, "step {i}");
        assert_eq!(*kept, 4);
    }
}

/// `vqclip imagine --grid 4`: a composite whose quarters are four runs alone, the four images
/// beside it, the same bytes twice.
#[test]
fn imagine_writes_a_grid_whose_quarters_are_the_runs_alone() {
    use super::cli::{text, vqclip};
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], out: &str| {
        let mut args = vec![
            "imagine",
            "a red apple:1 | green:-0.5",
            "--model",
            "tiny",
            "--steps",
            "3",
            "--size",
            "32x32",
            "--cutn",
            "3",
            "-o",
            out,
        ];
        args.extend_from_slice(extra);
        if !extra.contains(&"--seed") {
            args.extend(["--seed", "70"]);
        }
        let output = vqclip(dir.path(), &args, &[]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        text(&output.stdout)
    };
    let said = run(&["--grid", "4"], "grid.png");
    assert!(
        said.contains("grid.png (a 2×2 grid of 32x32, seed 70"),
        "{said}"
    );
    run(&["--grid", "4"], "again.png");
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    assert!(
        read("grid.png") == read("again.png"),
        "two grids, different bytes"
    );
    let grid_image = vqclip::engine::image::decode(&read("grid.png")).unwrap();
    assert_eq!(grid_image.dimensions(), (64, 64));
    let record: serde_json::Value = serde_json::from_slice(&read("grid.json")).unwrap();
    assert_eq!(record["grid"]["seeds"], serde_json::json!([70, 71, 72, 73]));
    for k in 1..=4usize {
        let member = format!("grid-{k}.png");
        assert!(said.contains(&member), "{said}");
        // Image k alone: seed 70 + k − 1, as its PNG says.
        let seed = (69 + k).to_string();
        let alone_name = format!("alone-{k}.png");
        run(&["--seed", &seed], &alone_name);
        let alone = vqclip::engine::image::decode(&read(&alone_name)).unwrap();
        let kept = vqclip::engine::image::decode(&read(&member)).unwrap();
        // Bit for bit on this CPU (see BATCH_TOLERANCE), so the 8-bit pixels agree exactly.
        assert_eq!(
            kept, alone,
            "image {k} of the grid differs from seed {seed} alone"
        );
        let chunks = vqclip::engine::image::png_text(&read(&member)).unwrap();
        assert!(chunks.iter().any(|(key, v)| key == "seed" && *v == seed));
        // Its quarter of the composite, outside the number's corner.
        let (x, y, w, h) = grid::cell(grid_image.dimensions(), 4, k - 1);
        for (px, py) in (0..w).flat_map(|px| (0..h).map(move |py| (px, py))) {
            if px < 12 && py < 14 {
                continue;
            }
            assert_eq!(
                grid_image.get_pixel(x + px, y + py),
                alone.get_pixel(px, py),
                "quarter {k} at ({px}, {py})"
            );
        }
    }
}
