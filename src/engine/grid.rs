//! Grids: several images of one prompt made in one batch (Midjourney's 2×2), shown as one
//! composite with each image's number in its corner.
//!
//! Image `k` (from 1) of a grid with seed `s` is the run with seed `s + k − 1` (wrapping), so
//! any one of them can be made again alone; the batch only shares the work.

use std::sync::atomic::{AtomicBool, Ordering};

use image::{Rgb, RgbImage};

use super::generate::{
    GenerateError, Generator, Output, PREVIEW_QUALITY, Preview, Progress, step_together,
};

/// Most images in a grid.
pub const MAX_GRID: usize = 4;

/// The seed of image `k` (from 0) of a grid whose seed is `seed`.
pub fn member_seed(seed: u64, k: usize) -> u64 {
    seed.wrapping_add(k as u64)
}

/// Columns and rows of a grid of `n`: 2×2 for four, one row otherwise.
pub fn layout(n: usize) -> (u32, u32) {
    match n {
        4 => (2, 2),
        n => (n.max(1) as u32, 1),
    }
}

/// The images side by side in [`layout`] order (left to right, then down), each numbered from
/// 1 in its top-left corner; a single image is returned as it is. The images must share a size.
pub fn composite(images: &[RgbImage]) -> Result<RgbImage, GenerateError> {
    let Some(first) = images.first() else {
        return Err(GenerateError::InvalidSpec("a grid of no images".into()));
    };
    if images.len() == 1 {
        return Ok(first.clone());
    }
    let (w, h) = first.dimensions();
    if images.iter().any(|i| i.dimensions() != (w, h)) {
        return Err(GenerateError::InvalidSpec(
            "the images of a grid differ in size".into(),
        ));
    }
    let (cols, rows) = layout(images.len());
    let mut out = RgbImage::new(w * cols, h * rows);
    for (k, picture) in images.iter().enumerate() {
        let (x, y) = ((k as u32 % cols) * w, (k as u32 / cols) * h);
        image::imageops::replace(&mut out, picture, i64::from(x), i64::from(y));
        label(&mut out, (x, y), (w, h), k + 1);
    }
    Ok(out)
}

/// The quarter of a [`composite`] that holds image `k` (from 0): `(x, y, width, height)`.
pub fn cell(composite: (u32, u32), n: usize, k: usize) -> (u32, u32, u32, u32) {
    let (cols, rows) = layout(n);
    let (w, h) = (composite.0 / cols, composite.1 / rows);
    ((k as u32 % cols) * w, (k as u32 / cols) * h, w, h)
}

/// 5×7 glyphs of the digits 1–9, one row per byte (bit 4 is the left column).
const DIGITS: [[u8; 7]; 9] = [
    [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E], // 1
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F], // 2
    [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E], // 3
    [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02], // 4
    [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E], // 5
    [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E], // 6
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08], // 7
    [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E], // 8
    [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C], // 9
];

/// Draws `number` (1–9) white on a dark square in the top-left corner of the cell at `origin`
/// of size `cell`, scaled to about a twelfth of the cell's short side.
fn label(out: &mut RgbImage, origin: (u32, u32), cell: (u32, u32), number: usize) {
    let Some(glyph) = number.checked_sub(1).and_then(|i| DIGITS.get(i)) else {
        return;
    };
    let scale = (cell.0.min(cell.1) / 96).max(1);
    let pad = scale * 2;
    let (bw, bh) = (5 * scale + 2 * pad, 7 * scale + 2 * pad);
    if bw > cell.0 || bh > cell.1 {
        return;
    }
    let margin = scale.min(cell.0 - bw).min(cell.1 - bh);
    let (x0, y0) = (origin.0 + margin, origin.1 + margin);
    for y in 0..bh {
        for x in 0..bw {
            let (gx, gy) = (x.wrapping_sub(pad) / scale, y.wrapping_sub(pad) / scale);
            let ink =
                x >= pad && y >= pad && gx < 5 && gy < 7 && glyph[gy as usize] >> (4 - gx) & 1 == 1;
            let colour = if ink {
                Rgb([255, 255, 255])
            } else {
                Rgb([24, 24, 24])
            };
            out.put_pixel(x0 + x, y0 + y, colour);
        }
    }
}

/// The composite of the runs' latest previews, as a JPEG preview (what a grid shows while it
/// runs).
pub fn preview(runs: &[Generator<'_>]) -> Result<Preview, GenerateError> {
    let pictures: Vec<RgbImage> = runs
        .iter()
        .filter_map(|r| r.preview_image().cloned())
        .collect();
    let shown = composite(&pictures)?;
    Ok(Preview {
        jpeg: super::image::encode_jpeg(&shown, PREVIEW_QUALITY)?,
        width: shown.width(),
        height: shown.height(),
    })
}

/// The time-lapse of finished runs: a single run's frames, or for a grid the composite of
/// every image's frame `i` for each `i`.
pub fn frames(outputs: &[Output]) -> Result<Vec<RgbImage>, GenerateError> {
    let Some(first) = outputs.first() else {
        return Ok(Vec::new());
    };
    if outputs.len() == 1 {
        return Ok(first.frames.clone());
    }
    (0..first.frames.len())
        .map(|i| {
            let frames: Vec<RgbImage> = outputs
                .iter()
                .filter_map(|o| o.frames.get(i).cloned())
                .collect();
            composite(&frames)
        })
        .collect()
}

/// Runs several generations to the end as one batch (see [`step_together`]), calling
/// `on_progress` with every run's progress after each iteration and stopping with
/// [`GenerateError::Cancelled`] when `cancel` is set (checked between iterations). The runs must
/// have the same number of steps.
pub fn run_together(
    mut runs: Vec<Generator<'_>>,
    cancel: &AtomicBool,
    mut on_progress: impl FnMut(&[Progress], &[Generator<'_>]),
) -> Result<Vec<Output>, GenerateError> {
    let steps = runs.first().map(|r| r.spec().steps);
    if runs.iter().any(|r| Some(r.spec().steps) != steps) {
        return Err(GenerateError::InvalidSpec(
            "the runs of a grid differ in steps".into(),
        ));
    }
    while runs.first().is_some_and(|r| !r.is_done()) {
        if cancel.load(Ordering::Relaxed) {
            return Err(GenerateError::Cancelled);
        }
        let progress = {
            let mut all: Vec<&mut Generator> = runs.iter_mut().collect();
            step_together(&mut all)?
        };
        on_progress(&progress, &runs);
    }
    runs.into_iter().map(Generator::finish).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb([v, v, v]))
    }

    #[test]
    fn four_images_make_a_numbered_two_by_two() {
        let images: Vec<RgbImage> = (0..4).map(|k| solid(192, 128, 60 * k as u8 + 40)).collect();
        let grid = composite(&images).unwrap();
        assert_eq!(grid.dimensions(), (384, 256));
        for (k, picture) in images.iter().enumerate() {
            let (x, y, w, h) = cell(grid.dimensions(), 4, k);
            assert_eq!((w, h), (192, 128));
            // Away from the label, each quarter is its image.
            let inner = image::imageops::crop_imm(&grid, x + 40, y + 40, w - 40, h - 40).to_image();
            assert!(inner.pixels().all(|p| p == picture.get_pixel(0, 0)));
            // The label is there: white ink on a dark square in the corner.
            let corner = image::imageops::crop_imm(&grid, x, y, 20, 20).to_image();
            assert!(corner.pixels().any(|p| *p == Rgb([255, 255, 255])));
            assert!(corner.pixels().any(|p| *p == Rgb([24, 24, 24])));
        }
        // The four labels differ (the digits).
        let labels: Vec<RgbImage> = (0..4)
            .map(|k| {
                let (x, y, _, _) = cell(grid.dimensions(), 4, k);
                image::imageops::crop_imm(&grid, x, y, 16, 20).to_image()
            })
            .collect();
        for a in 0..4 {
            for b in a + 1..4 {
                assert_ne!(labels[a], labels[b], "labels {a} and {b}");
            }
        }
    }

    #[test]
    fn a_single_image_is_its_own_grid_and_sizes_must_agree() {
        let one = solid(16, 16, 9);
        assert_eq!(composite(std::slice::from_ref(&one)).unwrap(), one);
        assert!(composite(&[]).is_err());
        assert!(composite(&[solid(16, 16, 0), solid(32, 16, 0)]).is_err());
        // A cell too small for a label is left as it is.
        let tiny: Vec<RgbImage> = (0..4).map(|_| solid(4, 4, 100)).collect();
        assert!(composite(&tiny).unwrap().pixels().all(|p| p.0 == [100; 3]));
    }

    #[test]
    fn member_seeds_count_up_and_wrap() {
        assert_eq!(member_seed(7, 0), 7);
        assert_eq!(member_seed(7, 3), 10);
        assert_eq!(member_seed(u64::MAX, 1), 0);
        assert_eq!(layout(4), (2, 2));
        assert_eq!(layout(1), (1, 1));
        assert_eq!(layout(2), (2, 1));
    }
}
