//! Cutouts: square views of the image resized to CLIP's input size, differentiably.
//!
//! Each cutout is `P_y · crop · P_xᵀ` per channel, with constant resize matrices whose columns
//! outside the crop are zero, so cropping and resampling are two matrix products with exact,
//! cheap gradients (candle's pooling and interpolation ops have no usable backward).

use std::ops::Range;

use candle_core::{DType, DeviceLocation, Result, Tensor, TensorId};
use rand::Rng;

use super::augment::{AugmentDraw, Augmentations};
use super::memo::Memo;
use super::ops::clamp_with_grad;

/// What resize matrices were made for: the image's height and width, its device and dtype.
type MatrixKey = (usize, usize, DeviceLocation, DType);

/// The resize matrices `([n, side, h], [n, side, w])` of a list of boxes, on the device.
type BoxMatrices = Memo<MatrixKey, (Tensor, Tensor)>;

/// Makes the cutouts CLIP sees in one step, a chunk at a time.
pub trait Cutouts {
    /// How many cutouts the step uses.
    fn count(&self) -> usize;
    /// Cutouts `range` of `image` `[1, 3, H, W]` (pixels in [0, 1]), resized to CLIP's input
    /// and not yet normalised: `[range.len(), 3, S, S]`, differentiable with respect to `image`.
    fn cut(&self, image: &Tensor, range: Range<usize>) -> Result<Tensor>;
}

/// Cutouts at given boxes, resized by adaptive average pooling (the parity fixtures' and the
/// benchmark's sampler). The resize matrices are made and uploaded once, at the first cut.
#[derive(Debug, Clone)]
pub struct FixedBoxes {
    boxes: Vec<CutoutBox>,
    side: usize,
    matrices: BoxMatrices,
}

impl FixedBoxes {
    /// Cutouts at `boxes`, in order, resized to CLIP's input side `side`.
    pub fn new(boxes: Vec<CutoutBox>, side: usize) -> Self {
        Self {
            boxes,
            side,
            matrices: Memo::default(),
        }
    }

    /// The boxes, in order.
    pub fn boxes(&self) -> &[CutoutBox] {
        &self.boxes
    }
}

impl Cutouts for FixedBoxes {
    fn count(&self) -> usize {
        self.boxes.len()
    }

    fn cut(&self, image: &Tensor, range: Range<usize>) -> Result<Tensor> {
        crop_chunk(
            image,
            (&self.boxes, range),
            self.side,
            adaptive_avg_pool_matrix,
            &self.matrices,
        )
    }
}

/// How a run makes its cutouts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CutoutMethod {
    /// The reference's default (`-cutm latest`): every cutout is the whole image,
    /// `(adaptive_avg_pool + adaptive_max_pool) / 2`, then augmented per cutout.
    Pooled(Augmentations),
    /// Crowson's random square crops (`-cutm original`): sizes `⌊r^cut_pow·(max − min) + min⌋`,
    /// resampled with Lanczos + bicubic, no augmentation.
    Crops {
        /// Exponent skewing crop sizes; 1 is uniform.
        cut_pow: f64,
    },
}

impl Default for CutoutMethod {
    fn default() -> Self {
        Self::Pooled(Augmentations::default())
    }
}

impl CutoutMethod {
    /// Draws one step's cutouts (boxes or augmentation parameters) for a `width`×`height` image.
    pub fn draw<R: Rng>(
        &self,
        rng: &mut R,
        width: usize,
        height: usize,
        cutn: usize,
        side: usize,
    ) -> StepCutouts {
        match self {
            Self::Pooled(augs) => StepCutouts::Pooled {
                side,
                draw: augs.draw(rng, cutn, side),
                pooled: Memo::default(),
            },
            Self::Crops { cut_pow } => {
                let max_size = width.min(height);
                let min_size = width.min(height).min(side);
                let boxes = (0..cutn)
                    .map(|_| {
                        let r: f64 = rng.random();
                        let size = (r.powf(*cut_pow) * (max_size - min_size) as f64
                            + min_size as f64) as usize;
                        let size = size.clamp(1, max_size);
                        let x = rng.random_range(0..=width - size);
                        let y = rng.random_range(0..=height - size);
                        CutoutBox { x, y, size }
                    })
                    .collect();
                StepCutouts::Crops {
                    boxes,
                    side,
                    matrices: Memo::default(),
                }
            }
        }
    }
}

/// One step's drawn cutouts.
#[derive(Debug, Clone)]
pub(crate) enum StepCutouts {
    /// Whole-image pooling with these augmentations.
    Pooled {
        /// CLIP's input side.
        side: usize,
        /// The augmentation parameters, one set per cutout.
        draw: AugmentDraw,
        /// The pooled image every cutout starts from, made at the step's first chunk (keyed
        /// by the image it was pooled from).
        pooled: Memo<TensorId, Tensor>,
    },
    /// Random crops.
    Crops {
        /// The boxes.
        boxes: Vec<CutoutBox>,
        /// CLIP's input side.
        side: usize,
        /// Every box's resize matrices, made and uploaded at the step's first chunk.
        matrices: BoxMatrices,
    },
}

impl Cutouts for StepCutouts {
    fn count(&self) -> usize {
        match self {
            Self::Pooled { draw, .. } => draw.jitter.len(),
            Self::Crops { boxes, .. } => boxes.len(),
        }
    }

    fn cut(&self, image: &Tensor, range: Range<usize>) -> Result<Tensor> {
        match self {
            Self::Pooled { side, draw, pooled } => {
                // The same pooled image for every chunk: its graph reaches `image` from each
                // chunk's backward.
                let pooled = pooled.get_or_make(image.id(), || {
                    let (_, _, h, w) = image.dims4()?;
                    let rows = upload(&[adaptive_avg_pool_matrix(h, 0, h, *side)], h, image)?;
                    let cols = upload(&[adaptive_avg_pool_matrix(w, 0, w, *side)], w, image)?;
                    let avg = resize_with_matrices(image, &rows, &cols)?;
                    (avg + adaptive_max_pool(image, *side)?)? / 2.0
                })?;
                let (_, c, s, _) = pooled.dims4()?;
                let copies = pooled.broadcast_as((range.len(), c, s, s))?.contiguous()?;
                draw.apply(&copies, range)
            }
            Self::Crops {
                boxes,
                side,
                matrices,
            } => clamp_with_grad(
                &crop_chunk(
                    image,
                    (boxes, range),
                    *side,
                    lanczos_bicubic_matrix,
                    matrices,
                )?,
                0.0,
                1.0,
            ),
        }
    }
}

/// Adaptive max pooling of `[b, c, h, w]` to `[b, c, side, side]` (PyTorch's windows), as
/// gathers and maxima so that it has a gradient. Max over a rectangle is max over rows of the
/// max over columns, so it runs one axis at a time.
pub(crate) fn adaptive_max_pool(x: &Tensor, side: usize) -> Result<Tensor> {
    let x = max_pool_axis(x, 3, side)?;
    max_pool_axis(&x, 2, side)
}

fn max_pool_axis(x: &Tensor, axis: usize, out: usize) -> Result<Tensor> {
    let len = x.dim(axis)?;
    let windows: Vec<(usize, usize)> = (0..out)
        .map(|i| (i * len / out, ((i + 1) * len).div_ceil(out)))
        .collect();
    let k = windows.iter().map(|(lo, hi)| hi - lo).max().unwrap_or(1);
    // Short windows are padded with an extra position holding a value no pixel reaches, so it is
    // never the maximum (a repeated index would double that pixel's gradient).
    let mut pad_shape = x.dims().to_vec();
    pad_shape[axis] = 1;
    let floor = (Tensor::ones(pad_shape, x.dtype(), x.device())? * -1e4)?;
    let padded = Tensor::cat(&[x, &floor], axis)?;
    let index: Vec<u32> = windows
        .iter()
        .flat_map(|&(lo, hi)| {
            (0..k).map(move |j| {
                if lo + j < hi {
                    (lo + j) as u32
                } else {
                    len as u32
                }
            })
        })
        .collect();
    let index = Tensor::from_vec(index, out * k, x.device())?;
    let gathered = padded.index_select(&index, axis)?;
    let mut shape = x.dims().to_vec();
    shape[axis] = out;
    shape.insert(axis + 1, k);
    gathered.reshape(shape)?.max(axis + 1)
}

/// A square crop: its top-left corner and side, in image pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutoutBox {
    /// Left edge (column).
    pub x: usize,
    /// Top edge (row).
    pub y: usize,
    /// Side length.
    pub size: usize,
}

/// Row `i` of the `[out, len]` matrix that adaptive-average-pools the window
/// `start..start + size` of an axis of length `len` down to `out` samples, as PyTorch's
/// `adaptive_avg_pool2d` does: output `i` averages inputs `⌊i·size/out⌋ .. ⌈(i+1)·size/out⌉`.
pub(crate) fn adaptive_avg_pool_matrix(
    len: usize,
    start: usize,
    size: usize,
    out: usize,
) -> Vec<f32> {
    let mut m = vec![0.0f32; out * len];
    for i in 0..out {
        let lo = i * size / out;
        let hi = ((i + 1) * size).div_ceil(out);
        let weight = 1.0 / (hi - lo) as f32;
        for j in lo..hi {
            m[i * len + start + j] = weight;
        }
    }
    m
}

/// Crops `boxes` out of `image` `[1, c, h, w]` and resizes each to `side`×`side` by adaptive
/// average pooling: `[boxes, c, side, side]`, differentiable with respect to `image`.
#[cfg(test)]
pub(crate) fn crop_and_pool(image: &Tensor, boxes: &[CutoutBox], side: usize) -> Result<Tensor> {
    crop_chunk(
        image,
        (boxes, 0..boxes.len()),
        side,
        adaptive_avg_pool_matrix,
        &Memo::default(),
    )
}

/// Cutouts `range` of `boxes` out of `image`, each resized to `side`×`side` with the
/// separable resampling `matrix` makes for one axis (its arguments: the axis length, the box's
/// start and size on it, `side`). Every box's matrices are made and uploaded together, once,
/// and kept in `memo` for the other chunks.
fn crop_chunk(
    image: &Tensor,
    (boxes, range): (&[CutoutBox], Range<usize>),
    side: usize,
    matrix: fn(usize, usize, usize, usize) -> Vec<f32>,
    memo: &BoxMatrices,
) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    if range.end > boxes.len() || range.is_empty() {
        candle_core::bail!("cutouts {range:?} of {}", boxes.len());
    }
    let key = (h, w, image.device().location(), image.dtype());
    let (rows, cols) = memo.get_or_make(key, || {
        check_boxes(boxes, w, h)?;
        let rows: Vec<Vec<f32>> = boxes.iter().map(|b| matrix(h, b.y, b.size, side)).collect();
        let cols: Vec<Vec<f32>> = boxes.iter().map(|b| matrix(w, b.x, b.size, side)).collect();
        Ok((upload(&rows, h, image)?, upload(&cols, w, image)?))
    })?;
    let pick = |m: &Tensor| m.narrow(0, range.start, range.len());
    resize_with_matrices(image, &pick(&rows)?, &pick(&cols)?)
}

fn check_boxes(boxes: &[CutoutBox], w: usize, h: usize) -> Result<()> {
    for b in boxes {
        if b.size == 0 || b.x + b.size > w || b.y + b.size > h {
            candle_core::bail!("cutout {b:?} does not fit in a {w}x{h} image");
        }
    }
    Ok(())
}

/// Row-major `[side, len]` matrices as one `[n, side, len]` tensor on `like`'s device, in its
/// dtype: one transfer.
fn upload(matrices: &[Vec<f32>], len: usize, like: &Tensor) -> Result<Tensor> {
    let n = matrices.len();
    let side = matrices.first().map_or(0, |m| m.len() / len.max(1));
    if matrices.iter().any(|m| m.len() != side * len) {
        candle_core::bail!("resize matrices of different shapes");
    }
    Tensor::from_vec(matrices.concat(), (n, side, len), like.device())?.to_dtype(like.dtype())
}

/// Resizes `image` `[1, c, h, w]` to `[n, c, side, side]` with one pair of matrices per output:
/// `rows` `[n, side, h]` and `cols` `[n, side, w]`, so output `k` is `rows[k] · image ·
/// cols[k]ᵀ` per channel. Cropping is folded into the matrices as zero columns.
/// Differentiable with respect to `image`.
pub(crate) fn resize_with_matrices(image: &Tensor, rows: &Tensor, cols: &Tensor) -> Result<Tensor> {
    let (one, c, h, w) = image.dims4()?;
    if one != 1 {
        candle_core::bail!("cutouts are cut from one image at a time, got a batch of {one}");
    }
    let (n, side, rows_len) = rows.dims3()?;
    if cols.dims3()? != (n, side, w) || rows_len != h {
        candle_core::bail!("resize matrices do not match a {w}x{h} image");
    }
    // Columns first for every cutout at once: [c·h, w] · [w, n·side].
    let resized_cols = image
        .reshape((c * h, w))?
        .matmul(&cols.reshape((n * side, w))?.t()?)?
        .reshape((c, h, n, side))?
        .permute((2, 0, 1, 3))?
        .contiguous()?; // [n, c, h, side]
    // Then rows: [n, 1, side, h] · [n, c, h, side].
    rows.unsqueeze(1)?.broadcast_matmul(&resized_cols)
}

/// `sin(πx)/(πx)`, 1 at 0.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x)
    }
}

/// Crowson's Lanczos-2 low-pass kernel for shrinking by `ratio` (< 1), normalised to sum 1.
fn lanczos_kernel(ratio: f64) -> Vec<f64> {
    // ramp(ratio, 2): 0, ±ratio, ±2·ratio, … with the outermost pair dropped.
    let n = (2.0 / ratio + 1.0).ceil() as usize;
    let half: Vec<f64> = (0..n).map(|i| i as f64 * ratio).collect();
    let mut x: Vec<f64> = half[1..]
        .iter()
        .rev()
        .map(|v| -v)
        .chain(half.iter().copied())
        .collect();
    x.remove(0);
    x.pop();
    let k: Vec<f64> = x
        .iter()
        .map(|&v| {
            if v > -2.0 && v < 2.0 {
                sinc(v) * sinc(v / 2.0)
            } else {
                0.0
            }
        })
        .collect();
    let sum: f64 = k.iter().sum();
    k.into_iter().map(|v| v / sum).collect()
}

/// PyTorch's cubic convolution weight (A = −0.75) at distance `t`.
fn cubic(t: f64) -> f64 {
    const A: f64 = -0.75;
    let t = t.abs();
    if t <= 1.0 {
        ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
    } else if t < 2.0 {
        ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A
    } else {
        0.0
    }
}

/// `[out, len]` matrix resampling the window `start..start + size` of an axis of length `len`
/// to `out` samples the way Crowson's `resample` does: when shrinking, a Lanczos-2 low-pass with
/// reflect padding; then bicubic interpolation with `align_corners = true`.
pub(crate) fn lanczos_bicubic_matrix(
    len: usize,
    start: usize,
    size: usize,
    out: usize,
) -> Vec<f32> {
    // Low-pass as a [size, size] matrix (identity when not shrinking).
    let mut low = vec![0.0f64; size * size];
    if out < size {
        let kernel = lanczos_kernel(out as f64 / size as f64);
        let pad = (kernel.len() as isize - 1) / 2;
        let reflect = |i: isize| -> usize {
            let last = size as isize - 1;
            let mut i = i;
            // Reflect without repeating the edge (PyTorch's 'reflect'), as often as needed.
            while i < 0 || i > last {
                i = if i < 0 { -i } else { 2 * last - i };
            }
            i as usize
        };
        for o in 0..size {
            for (t, &kv) in kernel.iter().enumerate() {
                let src = reflect(o as isize + t as isize - pad);
                low[o * size + src] += kv;
            }
        }
    } else {
        for i in 0..size {
            low[i * size + i] = 1.0;
        }
    }
    // Bicubic [out, size], align_corners: output i samples input position i·(size−1)/(out−1).
    let mut m = vec![0.0f32; out * len];
    let scale = if out > 1 {
        (size - 1) as f64 / (out - 1) as f64
    } else {
        0.0
    };
    for i in 0..out {
        let pos = i as f64 * scale;
        let base = pos.floor() as isize;
        let frac = pos - base as f64;
        for tap in -1..=2isize {
            let weight = cubic(frac - tap as f64);
            if weight == 0.0 {
                continue;
            }
            let src = (base + tap).clamp(0, size as isize - 1) as usize;
            for j in 0..size {
                m[i * len + start + j] += (weight * low[src * size + j]) as f32;
            }
        }
    }
    m
}

/// How CLIP sees a batch's cutouts, `counts[k]` of image `k`, at most `chunk` a pass: each pass
/// a list of (image, range of its cutouts). Images whose cutouts fit in a pass are packed whole
/// into one while room remains; a larger image is split into passes of `chunk` as it would be
/// alone (its remainder then shares a pass with the next images). So every image's cutouts are
/// grouped into passes exactly as they would be alone, and its gradient sums in the same order;
/// a batch of one is cut as `chunk` always cut it.
pub(crate) fn passes(counts: &[usize], chunk: usize) -> Vec<Vec<(usize, Range<usize>)>> {
    let chunk = chunk.max(1);
    let mut passes = Vec::new();
    let mut current: Vec<(usize, Range<usize>)> = Vec::new();
    let mut filled = 0;
    for (k, &count) in counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        if count <= chunk {
            if filled + count > chunk {
                passes.push(std::mem::take(&mut current));
                filled = 0;
            }
            current.push((k, 0..count));
            filled += count;
            continue;
        }
        if !current.is_empty() {
            passes.push(std::mem::take(&mut current));
        }
        let whole = count / chunk * chunk;
        for start in (0..whole).step_by(chunk) {
            passes.push(vec![(k, start..start + chunk)]);
        }
        filled = count - whole;
        if filled > 0 {
            current.push((k, whole..count));
        }
    }
    if !current.is_empty() {
        passes.push(current);
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn passes_pack_whole_images_and_split_large_ones_as_alone() {
        // A batch of one: chunks of `chunk`, as always.
        assert_eq!(
            passes(&[5], 2),
            [vec![(0, 0..2)], vec![(0, 2..4)], vec![(0, 4..5)]]
        );
        assert_eq!(passes(&[4], 8), [vec![(0, 0..4)]]);
        // Four images of 32 and a GPU's chunk of 128: one pass.
        assert_eq!(
            passes(&[32; 4], 128),
            [vec![(0, 0..32), (1, 0..32), (2, 0..32), (3, 0..32)]]
        );
        // Whole images while they fit; never one image's cutouts split where alone they are not.
        assert_eq!(
            passes(&[4, 4, 7], 9),
            [vec![(0, 0..4), (1, 0..4)], vec![(2, 0..7)]]
        );
        // A large image is cut as alone; its remainder shares a pass with the next.
        assert_eq!(
            passes(&[3, 5, 1], 2),
            [
                vec![(0, 0..2)],
                vec![(0, 2..3)],
                vec![(1, 0..2)],
                vec![(1, 2..4)],
                vec![(1, 4..5), (2, 0..1)],
            ]
        );
        assert!(passes(&[0, 0], 4).is_empty());
    }

    #[test]
    fn pooling_windows_follow_pytorch_and_overlap_when_needed() {
        // 5 → 3: windows [0,2), [1,4), [3,5) — the middle one overlaps both neighbours.
        let m = adaptive_avg_pool_matrix(7, 1, 5, 3);
        let row = |i: usize| m[i * 7..(i + 1) * 7].to_vec();
        assert_eq!(row(0), [0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]);
        let third = 1.0 / 3.0;
        assert_eq!(row(1), [0.0, 0.0, third, third, third, 0.0, 0.0]);
        assert_eq!(row(2), [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0]);
        for i in 0..3 {
            assert!(
                (row(i).iter().sum::<f32>() - 1.0).abs() < 1e-6,
                "rows average"
            );
        }
    }

    #[test]
    fn a_full_size_box_at_the_same_size_is_the_identity_crop() {
        let image = Tensor::arange(0f32, 2.0 * 4.0 * 4.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 4, 4))
            .unwrap();
        let boxes = [
            CutoutBox {
                x: 0,
                y: 0,
                size: 4,
            },
            CutoutBox {
                x: 1,
                y: 2,
                size: 2,
            },
        ];
        let cuts = crop_and_pool(&image, &boxes, 2).unwrap();
        assert_eq!(cuts.dims(), [2, 2, 2, 2]);
        // Box 1 resized to its own size is exactly the crop.
        let crop = image
            .narrow(2, 2, 2)
            .unwrap()
            .narrow(3, 1, 2)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let got = cuts.get(1).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            crop.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Box 0 pooled 4 → 2 averages 2×2 blocks: the first is (0 + 1 + 4 + 5) / 4.
        assert_eq!(
            cuts.get(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0],
            2.5
        );
    }

    #[test]
    fn lanczos_bicubic_is_the_identity_at_the_same_size_and_averages_to_one() {
        let same = lanczos_bicubic_matrix(6, 1, 4, 4);
        for i in 0..4 {
            for j in 0..6 {
                let expected = if j == i + 1 { 1.0 } else { 0.0 };
                assert!(
                    (same[i * 6 + j] - expected).abs() < 1e-6,
                    "({i},{j}) = {}",
                    same[i * 6 + j]
                );
            }
        }
        // Shrinking 9 → 4: every row still sums to 1 (a constant image stays constant).
        let shrink = lanczos_bicubic_matrix(9, 0, 9, 4);
        for i in 0..4 {
            let sum: f32 = shrink[i * 9..(i + 1) * 9].iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "row {i} sums to {sum}");
        }
        let k = lanczos_kernel(0.5);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(k.len() % 2, 1, "symmetric around the centre tap");
    }

    #[test]
    fn adaptive_max_pool_matches_a_direct_computation_and_routes_gradient_to_the_maxima() {
        let (h, w, side) = (7usize, 5usize, 3usize);
        let values: Vec<f32> = (0..h * w).map(|i| ((i * 37) % 23) as f32).collect();
        let x = candle_core::Var::from_tensor(
            &Tensor::from_vec(values.clone(), (1, 1, h, w), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let pooled = adaptive_max_pool(x.as_tensor(), side).unwrap();
        let got = pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..side {
            for j in 0..side {
                let (r0, r1) = (i * h / side, ((i + 1) * h).div_ceil(side));
                let (c0, c1) = (j * w / side, ((j + 1) * w).div_ceil(side));
                let expected = (r0..r1)
                    .flat_map(|r| (c0..c1).map(move |c| (r, c)))
                    .map(|(r, c)| values[r * w + c])
                    .fold(f32::MIN, f32::max);
                assert_eq!(got[i * side + j], expected, "({i},{j})");
            }
        }
        let grads = pooled.sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Each of the 9 windows sends 1 to its maximum; overlapping windows may share one.
        assert_eq!(g.iter().sum::<f32>(), 9.0);
        for (p, &gp) in g.iter().enumerate() {
            assert!(
                gp == 0.0 || got.contains(&values[p]),
                "gradient at {p}, which is no window's maximum"
            );
        }
    }

    #[test]
    fn random_crops_fit_the_image_and_respect_the_size_range() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let StepCutouts::Crops { boxes, .. } =
            CutoutMethod::Crops { cut_pow: 1.0 }.draw(&mut rng, 96, 64, 50, 32)
        else {
            panic!("crops expected");
        };
        assert_eq!(boxes.len(), 50);
        for b in boxes {
            assert!((32..=64).contains(&b.size), "{b:?}");
            assert!(b.x + b.size <= 96 && b.y + b.size <= 64, "{b:?}");
        }
    }

    #[test]
    fn both_methods_cut_the_requested_chunk_in_range() {
        use rand::SeedableRng;
        let image = Tensor::rand(0f32, 1.0, (1, 3, 40, 48), &Device::Cpu).unwrap();
        for method in [
            CutoutMethod::default(),
            CutoutMethod::Crops { cut_pow: 1.0 },
        ] {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
            let cuts = method.draw(&mut rng, 48, 40, 6, 16);
            assert_eq!(cuts.count(), 6);
            let chunk = cuts.cut(&image, 2..5).unwrap();
            assert_eq!(chunk.dims(), [3, 3, 16, 16]);
        }
    }

    #[test]
    fn chunks_cut_what_the_whole_step_cuts() {
        use rand::SeedableRng;
        // What each step makes once (the pooled image, the matrices, the noise) serves every
        // chunk: cut in two chunks or all at once, the cutouts are the same.
        let image = Tensor::rand(0f32, 1.0, (1, 3, 40, 48), &Device::Cpu).unwrap();
        let values = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for method in [
            CutoutMethod::default(),
            CutoutMethod::Crops { cut_pow: 1.0 },
        ] {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
            let cuts = method.draw(&mut rng, 48, 40, 5, 16);
            let whole = values(cuts.cut(&image, 0..5).unwrap());
            let mut chunked = values(cuts.cut(&image, 0..2).unwrap());
            chunked.extend(values(cuts.cut(&image, 2..5).unwrap()));
            assert_eq!(whole, chunked, "{method:?}");
        }
        let boxes = FixedBoxes::new(
            vec![
                CutoutBox {
                    x: 0,
                    y: 0,
                    size: 40,
                },
                CutoutBox {
                    x: 8,
                    y: 4,
                    size: 20,
                },
            ],
            16,
        );
        let whole = values(boxes.cut(&image, 0..2).unwrap());
        let second = values(boxes.cut(&image, 1..2).unwrap());
        assert_eq!(whole[3 * 256..], second[..]);
        // A different image size is served too (its matrices are made, not the kept ones).
        let small = Tensor::rand(0f32, 1.0, (1, 3, 40, 40), &Device::Cpu).unwrap();
        assert_eq!(boxes.cut(&small, 0..2).unwrap().dims(), [2, 3, 16, 16]);
    }

    #[test]
    fn boxes_outside_the_image_are_refused() {
        let image = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(
            crop_and_pool(
                &image,
                &[CutoutBox {
                    x: 4,
                    y: 0,
                    size: 5
                }],
                4
            )
            .is_err()
        );
    }
}
