//! Cutouts: square views of the image resized to CLIP's input size, differentiably.
//!
//! Each cutout is `P_y · crop · P_xᵀ` per channel, with constant resize matrices whose columns
//! outside the crop are zero, so cropping and resampling are two matrix products with exact,
//! cheap gradients (candle's pooling and interpolation ops have no usable backward).

use candle_core::{Device, Result, Tensor};

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
pub fn adaptive_avg_pool_matrix(len: usize, start: usize, size: usize, out: usize) -> Vec<f32> {
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
pub fn crop_and_pool(image: &Tensor, boxes: &[CutoutBox], side: usize) -> Result<Tensor> {
    let (one, c, h, w) = image.dims4()?;
    if one != 1 {
        candle_core::bail!("cutouts are cut from one image at a time, got a batch of {one}");
    }
    for b in boxes {
        if b.size == 0 || b.x + b.size > w || b.y + b.size > h {
            candle_core::bail!("cutout {b:?} does not fit in a {w}x{h} image");
        }
    }
    let n = boxes.len();
    let device = image.device();
    let dtype = image.dtype();
    let matrices = |len: usize, start: fn(&CutoutBox) -> usize| -> Result<Tensor> {
        let data: Vec<f32> = boxes
            .iter()
            .flat_map(|b| adaptive_avg_pool_matrix(len, start(b), b.size, side))
            .collect();
        Tensor::from_vec(data, (n, side, len), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    };
    let p_x = matrices(w, |b| b.x)?; // [n, side, w]
    let p_y = matrices(h, |b| b.y)?; // [n, side, h]
    // Columns first for every cutout at once: [c·h, w] · [w, n·side].
    let cols = image
        .reshape((c * h, w))?
        .matmul(&p_x.reshape((n * side, w))?.t()?)?
        .reshape((c, h, n, side))?
        .permute((2, 0, 1, 3))?
        .contiguous()?; // [n, c, h, side]
    // Then rows: [n, 1, side, h] · [n, c, h, side].
    p_y.unsqueeze(1)?.broadcast_matmul(&cols)
}

#[cfg(test)]
mod tests {
    use super::*;

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
