//! The cutout augmentations of the reference's default method (kornia's `RandomAffine`,
//! `RandomPerspective`, `ColorJitter`, `RandomErasing`, then Gaussian noise), written as
//! differentiable candle operations whose random parameters are drawn on the host from the job's
//! seeded RNG, so a run is reproducible. Only those parameters (a few numbers per cutout) travel
//! to a GPU: sampling positions and masks are computed there, and the noise is drawn there by
//! the device's generator, seeded from the job's RNG.
//!
//! Geometric warps are one homography per cutout, applied by bilinear sampling as four gathers
//! (zero padding outside the source). Parameters follow the reference's settings; the exact
//! random streams of kornia are not reproduced (they differ between its versions and devices).

use candle_core::{D, DType, DeviceLocation, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use super::memo::Memo;

/// Which augmentations run, with the reference's probabilities and strengths.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Augmentations {
    /// Random affine: rotation ±15°, translation ±10 %, shear ±5°.
    pub affine: f64,
    /// Random perspective with distortion 0.7.
    pub perspective: f64,
    /// Colour jitter: brightness, contrast, saturation, hue 0.1 each.
    pub jitter: f64,
    /// Random erasing of 10–40 % of the area, the same box for every cutout of a step.
    pub erase: f64,
    /// Per-cutout noise: `fac·N(0, 1)` with `fac ~ U(0, noise_max)`; 0 turns it off.
    pub noise_max: f64,
}

impl Default for Augmentations {
    /// The reference's `-augs Af Pe Ji Er` with its noise.
    fn default() -> Self {
        Self {
            affine: 0.7,
            perspective: 0.7,
            jitter: 0.7,
            erase: 0.7,
            noise_max: 0.1,
        }
    }
}

impl Augmentations {
    /// No augmentation and no noise.
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Self {
            affine: 0.0,
            perspective: 0.0,
            jitter: 0.0,
            erase: 0.0,
            noise_max: 0.0,
        }
    }
}

/// Colour jitter factors of one cutout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Jitter {
    /// Brightness multiplier.
    pub brightness: f32,
    /// Contrast factor around the mean grey.
    pub contrast: f32,
    /// Saturation factor around the pixel's grey.
    pub saturation: f32,
    /// Hue rotation in turns (±0.1 = ±36°).
    pub hue: f32,
}

impl Jitter {
    const IDENTITY: Jitter = Jitter {
        brightness: 1.0,
        contrast: 1.0,
        saturation: 1.0,
        hue: 0.0,
    };
}

/// The random parameters of one step's augmentations, drawn up front.
#[derive(Debug, Clone)]
pub(crate) struct AugmentDraw {
    /// Per cutout: the 3×3 map from output to source pixel coordinates (row-major), `None` when
    /// no warp applies.
    pub warps: Vec<Option<[f64; 9]>>,
    /// Per cutout colour jitter.
    pub jitter: Vec<Jitter>,
    /// The erased rectangle `(x, y, w, h)` shared by every cutout, if any.
    pub erase: Option<(usize, usize, usize, usize)>,
    /// Per cutout noise scale and the seed of its noise.
    pub noise: Vec<(f32, u64)>,
    /// Off the CPU, the whole step's unit noise `[n, c, S, S]`, drawn by the device's own
    /// generator at the first chunk.
    pub device_noise: Memo<(DeviceLocation, (usize, usize, usize)), Tensor>,
}

/// 3×3 matrix product (row-major).
fn mat_mul(a: &[f64; 9], b: &[f64; 9]) -> [f64; 9] {
    let mut m = [0.0; 9];
    for r in 0..3 {
        for c in 0..3 {
            m[r * 3 + c] = (0..3).map(|k| a[r * 3 + k] * b[k * 3 + c]).sum();
        }
    }
    m
}

/// Inverse of a 3×3 matrix; `None` when singular.
fn mat_inv(m: &[f64; 9]) -> Option<[f64; 9]> {
    let [a, b, c, d, e, f, g, h, i] = *m;
    let co = [
        e * i - f * h,
        c * h - b * i,
        b * f - c * e,
        f * g - d * i,
        a * i - c * g,
        c * d - a * f,
        d * h - e * g,
        b * g - a * h,
        a * e - b * d,
    ];
    let det = a * co[0] + b * co[3] + c * co[6];
    (det.abs() > 1e-12).then(|| co.map(|v| v / det))
}

/// The homography taking the four `src` points to the four `dst` points.
fn homography(src: [(f64, f64); 4], dst: [(f64, f64); 4]) -> Option<[f64; 9]> {
    // Solve the 8×8 system for h00..h21 (h22 = 1) by Gaussian elimination with pivoting.
    let mut a = [[0.0f64; 9]; 8];
    for (k, ((x, y), (u, v))) in src.iter().zip(dst.iter()).enumerate() {
        a[2 * k] = [*x, *y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, *u];
        a[2 * k + 1] = [0.0, 0.0, 0.0, *x, *y, 1.0, -v * x, -v * y, *v];
    }
    for col in 0..8 {
        let pivot = (col..8).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col];
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let factor = row[col] / pivot_row[col];
                for (v, p) in row.iter_mut().zip(pivot_row).skip(col) {
                    *v -= factor * p;
                }
            }
        }
    }
    let h: Vec<f64> = (0..8).map(|r| a[r][8] / a[r][r]).collect();
    Some([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], 1.0])
}

impl Augmentations {
    /// Draws one step's parameters for `n` cutouts of side `side`, in a fixed order.
    pub fn draw<R: Rng>(&self, rng: &mut R, n: usize, side: usize) -> AugmentDraw {
        let s = side as f64;
        let centre = (s - 1.0) / 2.0;
        let mut warps = Vec::with_capacity(n);
        let mut jitter = Vec::with_capacity(n);
        for _ in 0..n {
            // Forward maps (source → output), composed affine-then-perspective, inverted at the end.
            let mut forward: Option<[f64; 9]> = None;
            if rng.random_bool(self.affine) {
                let angle = rng.random_range(-15.0f64..=15.0).to_radians();
                let shear = rng.random_range(-5.0f64..=5.0).to_radians().tan();
                let tx = rng.random_range(-0.1..=0.1) * s;
                let ty = rng.random_range(-0.1..=0.1) * s;
                let (sin, cos) = angle.sin_cos();
                let to_centre = [1.0, 0.0, -centre, 0.0, 1.0, -centre, 0.0, 0.0, 1.0];
                let shear_m = [1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
                let rotate = [cos, -sin, 0.0, sin, cos, 0.0, 0.0, 0.0, 1.0];
                let back = [1.0, 0.0, centre + tx, 0.0, 1.0, centre + ty, 0.0, 0.0, 1.0];
                forward = Some(mat_mul(
                    &back,
                    &mat_mul(&rotate, &mat_mul(&shear_m, &to_centre)),
                ));
            }
            if rng.random_bool(self.perspective) {
                let d = 0.7 * s / 2.0;
                let last = s - 1.0;
                let corners = [(0.0, 0.0), (last, 0.0), (last, last), (0.0, last)];
                let inward = [(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)];
                let mut moved = corners;
                for (m, (sx, sy)) in moved.iter_mut().zip(inward) {
                    m.0 += sx * rng.random_range(0.0..=d);
                    m.1 += sy * rng.random_range(0.0..=d);
                }
                if let Some(p) = homography(corners, moved) {
                    forward = Some(match forward {
                        Some(f) => mat_mul(&p, &f),
                        None => p,
                    });
                }
            }
            warps.push(forward.and_then(|f| mat_inv(&f)));
            jitter.push(if rng.random_bool(self.jitter) {
                Jitter {
                    brightness: rng.random_range(0.9..=1.1),
                    contrast: rng.random_range(0.9..=1.1),
                    saturation: rng.random_range(0.9..=1.1),
                    hue: rng.random_range(-0.1..=0.1),
                }
            } else {
                Jitter::IDENTITY
            });
        }
        let erase = rng.random_bool(self.erase).then(|| {
            let area = rng.random_range(0.1..=0.4) * s * s;
            let log_ratio = rng.random_range(0.3f64.ln()..=3.3f64.ln());
            let ratio = log_ratio.exp();
            let h = ((area * ratio).sqrt().round() as usize).clamp(1, side);
            let w = ((area / ratio).sqrt().round() as usize).clamp(1, side);
            let x = rng.random_range(0..=side - w);
            let y = rng.random_range(0..=side - h);
            (x, y, w, h)
        });
        let noise = (0..n)
            .map(|_| {
                let fac = if self.noise_max > 0.0 {
                    rng.random_range(0.0..self.noise_max) as f32
                } else {
                    0.0
                };
                (fac, rng.random::<u64>())
            })
            .collect();
        AugmentDraw {
            warps,
            jitter,
            erase,
            noise,
            device_noise: Memo::default(),
        }
    }
}

impl AugmentDraw {
    /// Applies cutouts `range` of this draw to `cuts` `[range.len(), 3, S, S]`.
    pub(crate) fn apply(&self, cuts: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        let mut x = warp(cuts, &self.warps[range.clone()])?;
        x = jitter(&x, &self.jitter[range.clone()])?;
        if let Some(rect) = self.erase {
            x = erase(&x, rect)?;
        }
        if self.noise[range.clone()].iter().all(|(fac, _)| *fac == 0.0) {
            return Ok(x);
        }
        let facs = per_cutout(self.noise[range.clone()].iter().map(|n| n.0).collect(), &x)?;
        let unit = if x.device().is_cpu() {
            host_noise(&x, &self.noise[range])?
        } else {
            self.step_noise(&x)?.narrow(0, range.start, range.len())?
        };
        x + unit.broadcast_mul(&facs)?
    }

    /// N(0, 1) noise for every cutout of the step, shaped like `x`'s cutouts, drawn on `x`'s
    /// device from a seed of the job's RNG (the first cutout's noise seed): one generator call
    /// per step, nothing uploaded. The same seed gives the same noise on the same device.
    fn step_noise(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let device = x.device();
        let key = (device.location(), (c, h, w));
        self.device_noise.get_or_make(key, || {
            let seed = self.noise.first().map_or(0, |n| n.1);
            device.set_seed(seed)?;
            Tensor::randn(0f32, 1.0, (self.noise.len(), c, h, w), device)?.to_dtype(x.dtype())
        })
    }
}

/// Bilinear sampling of each cutout at `warps[k]`-mapped coordinates, zero outside.
///
/// Only the 3×3 matrices travel to the device; the sampling positions, corner indices and
/// weights are computed there, elementwise in f32 (no matrix product, which TF32 would round to
/// 10 bits). Indices stay exact: a cutout's pixel index is below 2²⁴, and the cutout's offset
/// is added in u32.
fn warp(cuts: &Tensor, warps: &[Option<[f64; 9]>]) -> Result<Tensor> {
    if warps.iter().all(Option::is_none) {
        return Ok(cuts.clone());
    }
    const IDENTITY: [f64; 9] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let (n, c, h, w) = cuts.dims4()?;
    let plane = h * w;
    if plane >= 1 << 24 {
        candle_core::bail!("a {w}x{h} cutout is too large to warp");
    }
    let device = cuts.device();
    let f32_of = |t: Tensor| t.to_dtype(DType::F32);
    let matrices: Vec<f32> = warps
        .iter()
        .flat_map(|m| m.unwrap_or(IDENTITY).map(|v| v as f32))
        .collect();
    let matrices = Tensor::from_vec(matrices, (n, 9), device)?;
    let entry = |i: usize| matrices.narrow(1, i, 1); // [n, 1]
    // Output pixel coordinates, [1, plane].
    let xs = f32_of(Tensor::arange(0u32, w as u32, device)?)?
        .unsqueeze(0)?
        .broadcast_as((h, w))?
        .reshape((1, plane))?;
    let ys = f32_of(Tensor::arange(0u32, h as u32, device)?)?
        .unsqueeze(1)?
        .broadcast_as((h, w))?
        .reshape((1, plane))?;
    let row = |a: usize| -> Result<Tensor> {
        entry(a)?
            .broadcast_mul(&xs)?
            .broadcast_add(&entry(a + 1)?.broadcast_mul(&ys)?)?
            .broadcast_add(&entry(a + 2)?)
    };
    let z = row(6)?; // [n, plane]
    let (sx, sy) = ((row(0)? / &z)?, (row(3)? / &z)?);
    let (x0, y0) = (sx.floor()?, sy.floor()?);
    let (fx, fy) = ((sx - &x0)?, (sy - &y0)?);
    let in_front = z.gt(0.0)?;
    let offsets = (Tensor::arange(0u32, n as u32, device)? * plane as f64)?.reshape((n, 1))?;
    let outside = Tensor::full((n * plane) as u32, (n, plane), device)?;
    let zero = Tensor::zeros((n, plane), DType::F32, device)?;
    // [c, n·h·w + 1]: channels first so one gather per corner serves every cutout; the extra
    // zero column is where points outside the source read.
    let flat = cuts.permute((1, 0, 2, 3))?.reshape((c, n * plane))?;
    let flat = Tensor::cat(&[&flat, &Tensor::zeros((c, 1), cuts.dtype(), device)?], 1)?;
    let mut out: Option<Tensor> = None;
    for (dx, dy) in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)] {
        let (px, py) = ((&x0 + dx)?, (&y0 + dy)?);
        let inside = px
            .ge(0.0)?
            .mul(&px.lt(w as f64)?)?
            .mul(&py.ge(0.0)?)?
            .mul(&py.lt(h as f64)?)?
            .mul(&in_front)?;
        let along = |f: &Tensor, d: f64| {
            if d == 0.0 {
                f.affine(-1.0, 1.0)
            } else {
                Ok(f.clone())
            }
        };
        let weight = (along(&fx, dx)? * along(&fy, dy)?)?;
        let pixel = (py.clamp(0.0, (h - 1) as f64)? * w as f64)?
            .add(&px.clamp(0.0, (w - 1) as f64)?)?
            .to_dtype(DType::U32)?
            .broadcast_add(&offsets)?;
        let index = inside.where_cond(&pixel, &outside)?.flatten_all()?;
        let weight = inside
            .where_cond(&weight, &zero)?
            .reshape((1, n * plane))?
            .to_dtype(cuts.dtype())?;
        let sampled = flat.index_select(&index, 1)?.broadcast_mul(&weight)?;
        out = Some(match out {
            Some(acc) => (acc + sampled)?,
            None => sampled,
        });
    }
    let out = out.ok_or_else(|| candle_core::Error::Msg("no corners".into()))?;
    out.reshape((c, n, h, w))?
        .permute((1, 0, 2, 3))?
        .contiguous()
}

/// Per-cutout constants shaped `[n, 1, 1, 1]`.
fn per_cutout(values: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    let n = values.len();
    Tensor::from_vec(values, (n, 1, 1, 1), like.device())?.to_dtype(like.dtype())
}

/// `reference + factor · (x − reference)` per cutout, clamped to [0, 1]: how contrast and
/// saturation move a picture away from (or toward) its mean or its grey.
fn blend(x: &Tensor, reference: &Tensor, factor: &Tensor) -> Result<Tensor> {
    x.broadcast_sub(reference)?
        .broadcast_mul(factor)?
        .broadcast_add(reference)?
        .clamp(0.0, 1.0)
}

/// Brightness, contrast, saturation and hue, each clamped to [0, 1] like torchvision.
fn jitter(x: &Tensor, params: &[Jitter]) -> Result<Tensor> {
    if params.iter().all(|j| *j == Jitter::IDENTITY) {
        return Ok(x.clone());
    }
    let n = params.len();
    let grey = |x: &Tensor| -> Result<Tensor> {
        let coeffs = Tensor::new(&[0.299f32, 0.587, 0.114], x.device())?
            .to_dtype(x.dtype())?
            .reshape((1, 3, 1, 1))?;
        x.broadcast_mul(&coeffs)?.sum_keepdim(1)
    };
    let x = x
        .broadcast_mul(&per_cutout(
            params.iter().map(|j| j.brightness).collect(),
            x,
        )?)?
        .clamp(0.0, 1.0)?;
    let mean = grey(&x)?.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
    let contrast = per_cutout(params.iter().map(|j| j.contrast).collect(), &x)?;
    let x = blend(&x, &mean, &contrast)?;
    let saturation = per_cutout(params.iter().map(|j| j.saturation).collect(), &x)?;
    let x = blend(&x, &grey(&x)?, &saturation)?;
    // Hue: rotate the chroma plane of YIQ by the hue angle (a linear map per cutout).
    let rgb_to_yiq = [
        0.299f64, 0.587, 0.114, 0.596, -0.274, -0.322, 0.211, -0.523, 0.312,
    ];
    let yiq_to_rgb = mat_inv(&rgb_to_yiq).ok_or_else(|| candle_core::Error::Msg("YIQ".into()))?;
    let mut mats = Vec::with_capacity(n * 9);
    for j in params {
        let (sin, cos) = (f64::from(j.hue) * std::f64::consts::TAU).sin_cos();
        let rot = [1.0, 0.0, 0.0, 0.0, cos, -sin, 0.0, sin, cos];
        mats.extend(mat_mul(&yiq_to_rgb, &mat_mul(&rot, &rgb_to_yiq)).map(|v| v as f32));
    }
    let (_, c, h, w) = x.dims4()?;
    let mats = Tensor::from_vec(mats, (n, 3, 3), x.device())?.to_dtype(x.dtype())?;
    mats.matmul(&x.reshape((n, c, h * w))?)?
        .reshape((n, c, h, w))?
        .clamp(0.0, 1.0)
}

/// Zeroes the rectangle `(x, y, w, h)` in every cutout (the mask is made on the device).
fn erase(x: &Tensor, (ex, ey, ew, eh): (usize, usize, usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let device = x.device();
    // 1 inside `start..start + len` of an axis of `size`, as u8.
    let within = |size: usize, start: usize, len: usize| -> Result<Tensor> {
        let i = Tensor::arange(0u32, size as u32, device)?;
        i.ge(start as u32)?.mul(&i.lt((start + len) as u32)?)
    };
    let rows = within(h, ey, eh)?.reshape((h, 1))?;
    let cols = within(w, ex, ew)?.reshape((1, w))?;
    let hole = rows.broadcast_mul(&cols)?; // [h, w], 1 in the rectangle
    let keep = hole
        .where_cond(
            &Tensor::zeros((h, w), x.dtype(), device)?,
            &Tensor::ones((h, w), x.dtype(), device)?,
        )?
        .reshape((1, 1, h, w))?;
    x.broadcast_mul(&keep)
}

/// N(0, 1) noise shaped like `x`, each cutout's drawn on the host from its own seed.
fn host_noise(x: &Tensor, noise: &[(f32, u64)]) -> Result<Tensor> {
    use rand::SeedableRng;
    let (n, c, h, w) = x.dims4()?;
    let per = c * h * w;
    let mut values = Vec::with_capacity(n * per);
    for (_, seed) in noise {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(*seed);
        values.extend((0..per).map(|_| -> f32 { StandardNormal.sample(&mut rng) }));
    }
    Tensor::from_vec(values, (n, c, h, w), x.device())?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_core::Var;
    use rand::SeedableRng;

    fn image(n: usize, side: usize) -> Tensor {
        let v: Vec<f32> = (0..n * 3 * side * side)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        Tensor::from_vec(v, (n, 3, side, side), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn no_augmentation_is_the_identity() {
        let x = image(2, 8);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let draw = Augmentations::none().draw(&mut rng, 2, 8);
        assert_eq!(values(&draw.apply(&x, 0..2).unwrap()), values(&x));
    }

    #[test]
    fn an_identity_warp_samples_every_pixel_exactly() {
        let x = image(1, 6);
        let identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        assert_eq!(values(&warp(&x, &[Some(identity)]).unwrap()), values(&x));
        // A shift by one pixel moves the content and zero-fills the edge.
        let shift = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let shifted = warp(&x, &[Some(shift)]).unwrap();
        let (a, b) = (values(&shifted), values(&x));
        assert_eq!(a[0], b[1]);
        assert_eq!(a[5], 0.0, "the last column samples outside");
    }

    #[test]
    fn a_rotation_samples_where_the_matrix_points_bilinearly() {
        let x = image(2, 9);
        let (sin, cos) = 0.3f64.sin_cos();
        // Output (ox, oy) reads source (cos·ox − sin·oy + 1.5, sin·ox + cos·oy − 0.5).
        let m = [cos, -sin, 1.5, sin, cos, -0.5, 0.0, 0.0, 1.0];
        let got = values(&warp(&x, &[None, Some(m)]).unwrap());
        let src = values(&x);
        let plane = 81;
        assert_eq!(
            got[..3 * plane],
            src[..3 * plane],
            "no warp: the cutout as it was"
        );
        let pixel = |ch: usize, px: f64, py: f64| -> f64 {
            let inside = (0.0..9.0).contains(&px) && (0.0..9.0).contains(&py);
            if inside {
                f64::from(src[3 * plane + ch * plane + py as usize * 9 + px as usize])
            } else {
                0.0
            }
        };
        for ch in 0..3 {
            for (ox, oy) in [(0, 0), (4, 4), (8, 2), (3, 7)] {
                let (ox, oy) = (f64::from(ox), f64::from(oy));
                let (sx, sy) = (cos * ox - sin * oy + 1.5, sin * ox + cos * oy - 0.5);
                let (x0, y0) = (sx.floor(), sy.floor());
                let (fx, fy) = (sx - x0, sy - y0);
                let want = pixel(ch, x0, y0) * (1.0 - fx) * (1.0 - fy)
                    + pixel(ch, x0 + 1.0, y0) * fx * (1.0 - fy)
                    + pixel(ch, x0, y0 + 1.0) * (1.0 - fx) * fy
                    + pixel(ch, x0 + 1.0, y0 + 1.0) * fx * fy;
                let at = 3 * plane + ch * plane + oy as usize * 9 + ox as usize;
                assert!(
                    (f64::from(got[at]) - want).abs() < 1e-5,
                    "channel {ch} at ({ox}, {oy}): {} vs {want}",
                    got[at]
                );
            }
        }
    }

    #[test]
    fn erasing_zeroes_exactly_the_rectangle() {
        let x = image(2, 6);
        let erased = values(&erase(&x, (1, 2, 3, 2)).unwrap());
        for (i, (e, v)) in erased.iter().zip(values(&x)).enumerate() {
            let (py, px) = ((i % 36) / 6, i % 6);
            let hole = (1..4).contains(&px) && (2..4).contains(&py);
            assert_eq!(*e, if hole { 0.0 } else { v }, "pixel {i}");
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_augmentations() {
        let x = image(3, 16);
        let draw = |seed| {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            values(
                &Augmentations::default()
                    .draw(&mut rng, 3, 16)
                    .apply(&x, 0..3)
                    .unwrap(),
            )
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn gradients_flow_through_every_augmentation() {
        let x = Var::from_tensor(&image(4, 16)).unwrap();
        let always = Augmentations {
            affine: 1.0,
            perspective: 1.0,
            jitter: 1.0,
            erase: 1.0,
            noise_max: 0.1,
        };
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let draw = always.draw(&mut rng, 4, 16);
        assert!(draw.warps.iter().all(Option::is_some) && draw.erase.is_some());
        let out = draw.apply(x.as_tensor(), 0..4).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let g = grads.get(&x).expect("gradient reaches the cutouts");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn homographies_map_the_corners() {
        let src = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)];
        let dst = [(1.0, 2.0), (9.0, 1.0), (8.0, 9.0), (2.0, 8.0)];
        let h = homography(src, dst).unwrap();
        for ((x, y), (u, v)) in src.into_iter().zip(dst) {
            let z = h[6] * x + h[7] * y + h[8];
            assert!(((h[0] * x + h[1] * y + h[2]) / z - u).abs() < 1e-9);
            assert!(((h[3] * x + h[4] * y + h[5]) / z - v).abs() < 1e-9);
        }
    }
}
