//! Shared plumbing of the CPU kernels: reading a tensor's f32 data in place, a value computed on
//! the host, and a bounds-checked front end to the `gemm` crate's matrix product.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};

/// Whether the CPU kernels handle `t`: f32 data on the CPU, with the kernels on.
pub(crate) fn is_host_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && enabled()
}

/// The environment variable that, set to `0`, turns the CPU kernels off for the process.
pub(crate) const KERNELS_ENV: &str = "VQCLIP_CPU_KERNELS";

thread_local! {
    /// This thread's choice, over the process's ([`with_kernels`]).
    static THIS_THREAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether the CPU kernels may run on this thread. Off (`VQCLIP_CPU_KERNELS=0`, or
/// [`with_kernels`]), the CPU runs the composed candle ops a CUDA or Metal device runs, so
/// that path is tested, and compared with the reference, without a GPU.
///
/// Every choice between a kernel and the composed ops is made on the thread that builds the
/// graph or runs its backward pass, so a per-thread setting covers a whole step.
pub(crate) fn enabled() -> bool {
    static PROCESS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    THIS_THREAD.with(std::cell::Cell::get).unwrap_or_else(|| {
        *PROCESS.get_or_init(|| std::env::var(KERNELS_ENV).map_or(true, |v| v.trim() != "0"))
    })
}

/// Runs `f` with the CPU kernels on or off on this thread, whatever the process's setting.
pub(crate) fn with_kernels<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THIS_THREAD.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(THIS_THREAD.with(|t| t.replace(Some(on))));
    f()
}

/// The contiguous f32 data of a CPU tensor laid out as `layout`, from its first element.
pub(crate) fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(data)) = storage else {
        candle_core::bail!("expected f32 data on the CPU");
    };
    if !layout.is_contiguous() {
        candle_core::bail!("expected contiguous data");
    }
    let start = layout.start_offset();
    Ok(&data[start..start + layout.shape().elem_count()])
}

/// Runs `f` on the f32 data of `t` (made contiguous first if it is not), without copying a
/// contiguous tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    Ok(f(f32_slice(&storage, layout)?))
}

/// A value computed on the host: data in row-major order and its shape.
pub(crate) struct HostValue {
    /// The elements, row-major.
    pub data: Vec<f32>,
    /// The shape they fill.
    pub shape: Shape,
}

impl HostValue {
    /// As a CPU tensor (no copy).
    pub(crate) fn into_tensor(self) -> Result<Tensor> {
        Tensor::from_vec(self.data, self.shape, &Device::Cpu)
    }
}

/// The thread setting for `gemm`: candle's thread count (`RAYON_NUM_THREADS` or the cores).
pub(crate) fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// A read-only strided matrix view: element `(r, c)` is `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    /// The backing data.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Whether every element of the view lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), `dst` row-major
/// `lhs.rows × rhs.cols`, through the `gemm` crate (the kernel candle's CPU matmul uses).
///
/// # Panics
/// When the shapes disagree or a view reaches past its data: callers build the views from
/// shapes they have checked, so this is a bug, never bad input.
pub(crate) fn matmul(dst: &mut [f32], accumulate: bool, lhs: MatRef, rhs: MatRef) {
    matmul_with(parallelism(), dst, accumulate, lhs, rhs);
}

/// [`matmul`] with the given thread setting (`None` inside tasks that already run in parallel).
pub(crate) fn matmul_with(
    parallelism: gemm::Parallelism,
    dst: &mut [f32],
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    assert_eq!(dst.len(), m * n, "matmul: destination size");
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matmul: view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // SAFETY: `dst` is m × n row-major (length checked above) and exclusively borrowed; every
    // element the kernel reads through `lhs` and `rhs` is inside their slices (in_bounds), which
    // are shared borrows and so cannot overlap `dst`.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `x · Wᵀ + b` for `x` `[rows, k]` and `weight` `[n, k]` (PyTorch's `nn.Linear`): the bias is
/// written first and the product accumulated onto it, so there is no separate bias pass.
pub(crate) fn linear(
    x: &[f32],
    rows: usize,
    weight: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let k = weight.len().checked_div(n).unwrap_or(0);
    let mut out = match bias {
        Some(b) => {
            let mut out = Vec::with_capacity(rows * n);
            for _ in 0..rows {
                out.extend_from_slice(b);
            }
            out
        }
        None => vec![0.0; rows * n],
    };
    matmul(
        &mut out,
        bias.is_some(),
        MatRef::row_major(x, rows, k),
        MatRef::row_major(weight, n, k).t(),
    );
    out
}

/// The logistic function `1 / (1 + e^−v)`.
#[inline(always)]
pub(crate) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp(-v))
}

/// `e^x` within 2 ulp of the C library's for `x` in [−87.3, 88.3] (outside, the value at the
/// nearer end: below it `e^x` is under 1.3·10⁻³⁸, above it over 2·10³⁸), NaN for NaN. Unlike
/// the C library's `expf` it has no branches and no call, so a loop over it vectorises at the
/// width [`super::simd`] compiled the loop for; the C library's call made the swish, QuickGELU
/// and softmax loops scalar.
///
/// Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ½ ln 2` (ln 2 in two parts, so `r` is exact), a
/// degree-6 polynomial for `e^r`, and `2^n` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding then subtracting 1.5·2²³ rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.3);
    let t = clamped * LOG2E + ROUND;
    let n = t - ROUND;
    let r = clamped - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let poly = p * z + r + 1.0;
    // n is in [−126, 127]: 2ⁿ is a normal float, exponent field n + 127.
    let scale = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    let value = poly * scale;
    if x.is_nan() { x } else { value }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_can_be_set_aside_on_one_thread_and_come_back() {
        let x = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let process = enabled();
        assert_eq!(is_host_f32(&x), process);
        with_kernels(false, || {
            assert!(!is_host_f32(&x));
            with_kernels(true, || assert!(is_host_f32(&x)));
            assert!(!is_host_f32(&x));
            // Another thread keeps the process's setting.
            std::thread::scope(|s| {
                s.spawn(|| assert_eq!(enabled(), process));
            });
        });
        assert_eq!(is_host_f32(&x), process);
        // f64 data never goes to the kernels.
        let x = x.to_dtype(DType::F64).unwrap();
        with_kernels(true, || assert!(!is_host_f32(&x)));
    }

    #[test]
    fn matmul_matches_a_naive_product_for_transposed_and_accumulated_views() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        // b is stored n × k and used transposed.
        let mut dst = vec![1.0; m * n];
        matmul(
            &mut dst,
            true,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, n, k).t(),
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|r| a[i * k + r] * b[j * k + r]).sum::<f32>();
                assert!((dst[i * n + j] - want).abs() < 1e-5, "({i}, {j})");
            }
        }
    }

    #[test]
    fn linear_adds_the_bias_once() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let w = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let out = linear(&x, 2, &w, 3, Some(&[10.0, 20.0, 30.0]));
        assert_eq!(out, vec![11.0, 22.0, 33.0, 13.0, 24.0, 37.0]);
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_c_library() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.3 + (88.3 + 87.3) * i as f32 / 2_000_000.0;
            let (ours, libm) = (exp(x), x.exp());
            let ulp = f64::from(libm) * f64::from(f32::EPSILON);
            worst = worst.max((f64::from(ours) - f64::from(libm)).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) < 1.3e-38 && exp(-1000.0) > 0.0);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 2e38);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert!(sigmoid(-1000.0) < 1e-37);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn views_past_their_data_are_refused() {
        let a = [0f32; 4];
        let mut dst = [0f32; 4];
        let wide = MatRef {
            data: &a,
            rows: 2,
            cols: 2,
            row_stride: 3,
            col_stride: 1,
        };
        matmul(&mut dst, false, wide, MatRef::row_major(&a, 2, 2));
    }
}
