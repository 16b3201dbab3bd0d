//! 3×3, stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3) on the CPU.
//!
//! Each 2×2 block of output needs 36 multiplications per channel pair done directly, 16 in the
//! Winograd domain: the 4×4 input tile `d` and the kernel `g` are transformed (`V = Bᵀ·d·B`,
//! `U = G·g·Gᵀ`), multiplied element-wise and summed over input channels — which, for the 16
//! positions ξ of the tile, is 16 matrix products `M_ξ = U_ξ · V_ξ` (`c_out × c_in` times
//! `c_in × tiles`) — then transformed back (`Y = Aᵀ·M·A`). That is 2.25× less arithmetic than
//! the direct convolution for every 3×3 layer of the decoder and for their input gradients
//! (which are 3×3 convolutions too), for a few memory-bound passes of transforms.
//!
//! The output is computed in bands of tile rows, one band per task, each with its own buffers
//! (a few megabytes), so the transformed tiles stay in cache between the transforms and the
//! products, and the two cores work on different bands.
//!
//! F(2×2, 3×3) has small constants (0, ±1, ½), so its rounding error stays at the level of the
//! direct convolution's: the tests compare with candle at the same tolerance.

use rayon::prelude::*;

use super::cpu::{MatRef, matmul_with};

/// How a convolution reads its kernel `weight` `[a, b, k, k]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// As stored: `a` output channels, `b` input channels.
    AsStored,
    /// Flipped in space with inputs and outputs swapped (`b` outputs, `a` inputs): for stride
    /// 1, the convolution by this kernel with padding `k − 1 − p` is the input gradient of the
    /// convolution by the stored one with padding `p`. Read in place, never copied.
    Adjoint,
}

impl Kernel {
    /// `(c_out, c_in)` of the convolution this reading makes of a `[a, b, k, k]` kernel.
    pub(crate) fn channels(self, a: usize, b: usize) -> (usize, usize) {
        match self {
            Kernel::AsStored => (a, b),
            Kernel::Adjoint => (b, a),
        }
    }

    /// The index in the stored `[a, b, k, k]` data of tap `(dy, dx)` from input channel `c` to
    /// output channel `o` of the convolution this reading makes (`c_out` its output channels).
    #[inline]
    pub(crate) fn index(self, c_out: usize, c_in: usize, k: usize, at: [usize; 4]) -> usize {
        let [o, c, dy, dx] = at;
        match self {
            Kernel::AsStored => ((o * c_in + c) * k + dy) * k + dx,
            Kernel::Adjoint => ((c * c_out + o) * k + (k - 1 - dy)) * k + (k - 1 - dx),
        }
    }
}

/// Sizes of one convolution (after any ×2 upsampling of the input).
pub(crate) struct ConvShape {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Input height (upsampled).
    pub h: usize,
    /// Input width (upsampled).
    pub w: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// The input is read through a nearest ×2 upsampling.
    pub upsample: bool,
    /// How the kernel is read.
    pub kernel: Kernel,
}

impl ConvShape {
    fn out_h(&self) -> usize {
        self.h + 2 * self.padding - 2
    }

    fn out_w(&self) -> usize {
        self.w + 2 * self.padding - 2
    }
}

/// Tiles per band: enough columns for efficient products, few enough that a band's transformed
/// tiles (16·c·tiles values) stay in the caches.
const BAND_TILES: usize = 1024;

/// `U_ξ = G·g·Gᵀ` for every output/input channel pair, laid out `[c_out][16][c_in]` (so each
/// output channel's 16 × c_in values are one task's contiguous block): `U_ξ` is the
/// `c_out × c_in` matrix at offset `ξ·c_in` with row stride `16·c_in`.
fn transform_kernel(weight: &[f32], s: &ConvShape) -> Vec<f32> {
    let (c_out, c_in) = (s.c_out, s.c_in);
    let mut u = vec![0f32; 16 * c_out * c_in];
    u.par_chunks_mut(16 * c_in).enumerate().for_each(|(o, u)| {
        for c in 0..c_in {
            let g = |dy: usize, dx: usize| weight[s.kernel.index(c_out, c_in, 3, [o, c, dy, dx])];
            // G·g (4×3), G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]
            let column = |col: usize| {
                let (a, b, cc) = (g(0, col), g(1, col), g(2, col));
                [a, 0.5 * (a + b + cc), 0.5 * (a - b + cc), cc]
            };
            let (c0, c1, c2) = (column(0), column(1), column(2));
            let gg: [[f32; 3]; 4] = std::array::from_fn(|row| [c0[row], c1[row], c2[row]]);
            // (G·g)·Gᵀ (4×4)
            for (row, r) in gg.iter().enumerate() {
                let (a, b, cc) = (r[0], r[1], r[2]);
                let values = [a, 0.5 * (a + b + cc), 0.5 * (a - b + cc), cc];
                for (col, v) in values.into_iter().enumerate() {
                    u[(row * 4 + col) * c_in + c] = v;
                }
            }
        }
    });
    u
}

/// The convolution of `x` `[n, c_in, h_in, w_in]` (NCHW; `h_in = h/2` when upsampling) with
/// `weight` `[c_out, c_in, 3, 3]`, plus `bias`: `[n, c_out, h + 2p − 2, w + 2p − 2]`.
pub(crate) fn conv3x3(
    s: &ConvShape,
    n: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (ho, wo) = (s.out_h(), s.out_w());
    let (tiles_y, tiles_x) = (ho.div_ceil(2), wo.div_ceil(2));
    let u = transform_kernel(weight, s);
    let band_rows = (BAND_TILES / tiles_x.max(1)).clamp(1, tiles_y.max(1));
    let (in_h, in_w) = if s.upsample {
        (s.h / 2, s.w / 2)
    } else {
        (s.h, s.w)
    };
    let mut out = vec![0f32; n * s.c_out * ho * wo];
    for image in 0..n {
        let src = &x[image * s.c_in * in_h * in_w..][..s.c_in * in_h * in_w];
        // Each band's output, [c_out][rows of the band][wo], copied into place below.
        let bands: Vec<(usize, Vec<f32>)> = (0..tiles_y.div_ceil(band_rows))
            .into_par_iter()
            .map(|band| {
                let ty0 = band * band_rows;
                let ty1 = (ty0 + band_rows).min(tiles_y);
                (ty0, run_band_wide(s, src, &u, bias, ty0..ty1))
            })
            .collect();
        let dst = &mut out[image * s.c_out * ho * wo..][..s.c_out * ho * wo];
        dst.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(o, plane)| {
                for (ty0, data) in &bands {
                    let y0 = 2 * ty0;
                    let rows = data.len() / (s.c_out * wo);
                    plane[y0 * wo..][..rows * wo]
                        .copy_from_slice(&data[o * rows * wo..][..rows * wo]);
                }
            });
    }
    out
}

super::simd::dispatched!(
    fn run_band_wide(
        s: &ConvShape,
        src: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        tile_rows: std::ops::Range<usize>,
    ) -> Vec<f32> = run_band;
);

/// One band of tile rows: transform the input tiles, 16 products, transform back (+ bias).
/// Returns `[c_out][output rows of the band][wo]`.
#[inline(always)]
fn run_band(
    s: &ConvShape,
    src: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    tile_rows: std::ops::Range<usize>,
) -> Vec<f32> {
    let (ho, wo) = (s.out_h(), s.out_w());
    let tiles_x = wo.div_ceil(2);
    let tiles = tile_rows.len() * tiles_x;
    let (in_h, in_w) = if s.upsample {
        (s.h / 2, s.w / 2)
    } else {
        (s.h, s.w)
    };
    // V: [16][c_in][tiles]. Per channel and tile row: the 4 input rows the tiles read, zero-
    // padded to 2·tiles_x + 2 columns; the column transform (Bᵀ·d) on whole rows at once, into
    // even and odd columns, so that the row transform (·B) of all the row's tiles is four
    // contiguous, vectorisable loops.
    let width = 2 * tiles_x + 2;
    let mut v = vec![0f32; 16 * s.c_in * tiles];
    let mut rows = [
        vec![0f32; width],
        vec![0f32; width],
        vec![0f32; width],
        vec![0f32; width],
    ];
    let half = tiles_x + 1;
    let mut even = [
        vec![0f32; half],
        vec![0f32; half],
        vec![0f32; half],
        vec![0f32; half],
    ];
    let mut odd = [
        vec![0f32; half],
        vec![0f32; half],
        vec![0f32; half],
        vec![0f32; half],
    ];
    for c in 0..s.c_in {
        let plane = &src[c * in_h * in_w..][..in_h * in_w];
        for (ti, ty) in tile_rows.clone().enumerate() {
            for (dy, row) in rows.iter_mut().enumerate() {
                row.fill(0.0);
                let y = (2 * ty + dy) as isize - s.padding as isize;
                if y < 0 || y >= s.h as isize {
                    continue;
                }
                let sy = if s.upsample {
                    y as usize / 2
                } else {
                    y as usize
                };
                let from = &plane[sy * in_w..][..in_w];
                let to = &mut row[s.padding..(s.padding + s.w).min(width)];
                if s.upsample {
                    for (pair, &value) in to.chunks_mut(2).zip(from) {
                        pair.fill(value);
                    }
                } else {
                    to.copy_from_slice(&from[..to.len()]);
                }
            }
            for j in 0..half {
                for (parity, out) in [(0, &mut even), (1, &mut odd)] {
                    let x = 2 * j + parity;
                    let (d0, d1, d2, d3) = (rows[0][x], rows[1][x], rows[2][x], rows[3][x]);
                    out[0][j] = d0 - d2;
                    out[1][j] = d1 + d2;
                    out[2][j] = d2 - d1;
                    out[3][j] = d1 - d3;
                }
            }
            let base = ti * tiles_x;
            for r in 0..4 {
                let (e, o) = (&even[r][..half], &odd[r][..half]);
                // The tile at tx reads columns 2tx..2tx+4: e[tx], o[tx], e[tx+1], o[tx+1].
                let (e0, e1, o0, o1) = (&e[..tiles_x], &e[1..], &o[..tiles_x], &o[1..]);
                let at = |k: usize| ((r * 4 + k) * s.c_in + c) * tiles + base;
                let dst = &mut v[at(0)..][..tiles_x];
                for ((d, &a), &b) in dst.iter_mut().zip(e0).zip(e1) {
                    *d = a - b;
                }
                let dst = &mut v[at(1)..][..tiles_x];
                for ((d, &a), &b) in dst.iter_mut().zip(o0).zip(e1) {
                    *d = a + b;
                }
                let dst = &mut v[at(2)..][..tiles_x];
                for ((d, &a), &b) in dst.iter_mut().zip(e1).zip(o0) {
                    *d = a - b;
                }
                let dst = &mut v[at(3)..][..tiles_x];
                for ((d, &a), &b) in dst.iter_mut().zip(o0).zip(o1) {
                    *d = a - b;
                }
            }
        }
    }
    // M_ξ = U_ξ · V_ξ: [16][c_out][tiles]
    let mut m = vec![0f32; 16 * s.c_out * tiles];
    for xi in 0..16 {
        matmul_with(
            gemm::Parallelism::None,
            &mut m[xi * s.c_out * tiles..][..s.c_out * tiles],
            false,
            MatRef {
                data: &u[xi * s.c_in..],
                rows: s.c_out,
                cols: s.c_in,
                row_stride: 16 * s.c_in,
                col_stride: 1,
            },
            MatRef::row_major(&v[xi * s.c_in * tiles..][..s.c_in * tiles], s.c_in, tiles),
        );
    }
    let y0 = 2 * tile_rows.start;
    let rows = (2 * tile_rows.end).min(ho) - y0;
    let mut out = vec![0f32; s.c_out * rows * wo];
    // Aᵀ·M·A per tile, for a whole tile row at once: the 16 values of tile tx are element tx of
    // 16 contiguous slices, so each step below is one vectorisable loop.
    let mut t = [
        vec![0f32; tiles_x],
        vec![0f32; tiles_x],
        vec![0f32; tiles_x],
        vec![0f32; tiles_x],
    ];
    let (mut y_left, mut y_right) = (vec![0f32; tiles_x], vec![0f32; tiles_x]);
    for o in 0..s.c_out {
        let b = bias.map_or(0.0, |b| b[o]);
        let plane = &mut out[o * rows * wo..][..rows * wo];
        for ti in 0..tile_rows.len() {
            let at = |xi: usize| &m[(xi * s.c_out + o) * tiles + ti * tiles_x..][..tiles_x];
            for out_row in 0..2 {
                let ry = 2 * ti + out_row;
                if ry >= rows {
                    break;
                }
                // Row `out_row` of Aᵀ·M: m0 + m4 + m8 or m4 − m8 − m12, per column.
                for (col, tc) in t.iter_mut().enumerate() {
                    let (m0, m1, m2, m3) = (at(col), at(4 + col), at(8 + col), at(12 + col));
                    if out_row == 0 {
                        for (((d, &a), &b1), &c1) in tc.iter_mut().zip(m0).zip(m1).zip(m2) {
                            *d = a + b1 + c1;
                        }
                    } else {
                        for (((d, &a), &b1), &c1) in tc.iter_mut().zip(m1).zip(m2).zip(m3) {
                            *d = a - b1 - c1;
                        }
                    }
                }
                // ·A: columns t0 + t1 + t2 and t1 − t2 − t3.
                for (((((y0v, y1v), &a), &b1), &c1), &d1) in y_left
                    .iter_mut()
                    .zip(y_right.iter_mut())
                    .zip(&t[0])
                    .zip(&t[1])
                    .zip(&t[2])
                    .zip(&t[3])
                {
                    *y0v = a + b1 + c1 + b;
                    *y1v = b1 - c1 - d1 + b;
                }
                let row = &mut plane[ry * wo..][..wo];
                for (pair, (&a, &c1)) in row.chunks_mut(2).zip(y_left.iter().zip(&y_right)) {
                    pair[0] = a;
                    if let Some(second) = pair.get_mut(1) {
                        *second = c1;
                    }
                }
            }
        }
    }
    out
}
