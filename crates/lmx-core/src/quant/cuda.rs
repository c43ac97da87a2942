//! CUDA kernels for MLX's affine format, compiled at first use with NVRTC (the driver's
//! runtime compiler; nothing to build ahead): a matrix-vector product straight on the packed
//! words for a few rows of activations (decode), and dequantization to f32 for cuBLAS
//! (prefill, and the backward of QLoRA, which candle then differentiates). The packed words
//! and the scales and biases (as f32) are copied to the device at the first product there.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::QuantizedMatrix;

/// One warp per output (row r of W, row i of x): lanes take consecutive packed words
/// (coalesced), each word's elements share a group, and a word's products are summed as
/// `scale * sum(q x) + bias * sum(x)`; widths that cross word boundaries read the bitstream
/// element by element.
const SRC: &str = r#"
__device__ __forceinline__ unsigned int code_at(const unsigned int* row, int e, int bits) {
    unsigned int bit = (unsigned int)e * bits, wi = bit / 32, sh = bit % 32;
    unsigned long long two = row[wi];
    if (sh + bits > 32) two |= ((unsigned long long)row[wi + 1]) << 32;
    return (unsigned int)((two >> sh) & ((1u << bits) - 1));
}

// Activations as f32 or bf16 (the top half of an f32; stores round to nearest even).
__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short* p, size_t i) { return __uint_as_float(((unsigned int)p[i]) << 16); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(unsigned short* p, size_t i, float v) {
    unsigned int u = __float_as_uint(v);
    p[i] = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
__device__ void qmv(const unsigned int* __restrict__ w, const float* __restrict__ sb, const T* __restrict__ x,
                    T* __restrict__ y, int rows, int cols, int bits, int group_size, int m) {
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= (long long)rows * m) return;
    int r = (int)(warp % rows), i = (int)(warp / rows);
    int groups = cols / group_size;
    const unsigned int* row = w + (size_t)r * (cols / 32 * bits);
    const float* s = sb + (size_t)r * 2 * groups;
    const float* b = s + groups;
    size_t x0 = (size_t)i * cols;
    float acc = 0.f;
    if (bits == 4 || bits == 8 || bits == 2) {
        int per = 32 / bits, words = cols / per;
        unsigned int mask = (1u << bits) - 1;
        for (int t = lane; t < words; t += 32) {
            unsigned int word = __ldg(row + t);
            int e0 = t * per, g = e0 / group_size;
            float dot = 0.f, xs = 0.f;
            for (int k = 0; k < per; k++) {
                float xv = load(x, x0 + e0 + k);
                dot += (float)((word >> (k * bits)) & mask) * xv;
                xs += xv;
            }
            acc += s[g] * dot + b[g] * xs;
        }
    } else {
        for (int e = lane; e < cols; e += 32) {
            int g = e / group_size;
            acc += (s[g] * (float)code_at(row, e, bits) + b[g]) * load(x, x0 + e);
        }
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) store(y, (size_t)i * rows + r, acc);
}

template <typename T>
__device__ void dequant(const unsigned int* __restrict__ w, const float* __restrict__ sb, T* __restrict__ out,
                        int rows, int cols, int bits, int group_size) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * cols) return;
    int r = (int)(idx / cols), e = (int)(idx % cols);
    int groups = cols / group_size, g = e / group_size;
    const float* s = sb + (size_t)r * 2 * groups;
    store(out, (size_t)idx, s[g] * (float)code_at(w + (size_t)r * (cols / 32 * bits), e, bits) + s[groups + g]);
}

extern "C" __global__ void lmx_qmv_f32(const unsigned int* w, const float* sb, const float* x, float* y, int rows, int cols, int bits, int gs, int m) { qmv(w, sb, x, y, rows, cols, bits, gs, m); }
extern "C" __global__ void lmx_qmv_bf16(const unsigned int* w, const float* sb, const unsigned short* x, unsigned short* y, int rows, int cols, int bits, int gs, int m) { qmv(w, sb, x, y, rows, cols, bits, gs, m); }
extern "C" __global__ void lmx_dequant_f32(const unsigned int* w, const float* sb, float* out, int rows, int cols, int bits, int gs) { dequant(w, sb, out, rows, cols, bits, gs); }
extern "C" __global__ void lmx_dequant_bf16(const unsigned int* w, const float* sb, unsigned short* out, int rows, int cols, int bits, int gs) { dequant(w, sb, out, rows, cols, bits, gs); }
"#;

/// Rows of x up to which products take the matrix-vector kernel (beyond: dequantize + cuBLAS).
pub(super) const MAX_QMV_ROWS: usize = 8;

/// The kernels' PTX, compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
    crate::cuda_fused::ptx(&PTX, SRC)
}

/// The matrix on one CUDA device: packed words (rows, words) u32 and [scales | biases] per
/// row (rows, 2 * groups) f32.
#[derive(Debug, Clone)]
pub(super) struct DeviceCopy {
    packed: Tensor,
    sb: Tensor,
}

impl DeviceCopy {
    pub(super) fn new(q: &QuantizedMatrix, device: &candle_core::Device) -> Result<Self> {
        let groups = q.cols / q.group_size;
        let words = q.cols * q.bits / 32;
        let packed = Tensor::from_slice(&q.packed, (q.rows, words), device)?;
        let (mut s, mut b) = (vec![0f32; q.rows * groups], vec![0f32; q.rows * groups]);
        q.scales.fill(0, &mut s);
        q.biases.fill(0, &mut b);
        let mut sb = Vec::with_capacity(2 * s.len());
        for r in 0..q.rows {
            sb.extend_from_slice(&s[r * groups..(r + 1) * groups]);
            sb.extend_from_slice(&b[r * groups..(r + 1) * groups]);
        }
        Ok(Self { packed, sb: Tensor::from_vec(sb, (q.rows, 2 * groups), device)? })
    }

    /// `x @ W^T` for x (.., cols) on the device: bf16 and f32 activations as they are, others
    /// through f32.
    pub(super) fn matmul(&self, q: &QuantizedMatrix, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let mut dims = x.dims().to_vec();
        let m = x.elem_count() / q.cols;
        let work = if dtype == DType::BF16 { DType::BF16 } else { DType::F32 };
        let xw = x.to_dtype(work)?.contiguous()?.reshape((m, q.cols))?;
        let y = if m <= MAX_QMV_ROWS && !x.track_op() {
            xw.apply_op3_no_bwd(&self.packed, &self.sb, &Qmv { rows: q.rows, cols: q.cols, bits: q.bits, group_size: q.group_size })?
        } else {
            let w = self.packed.apply_op2_no_bwd(&self.sb, &Dequant { cols: q.cols, bits: q.bits, group_size: q.group_size, dtype: work })?;
            xw.matmul(&w.t()?)?
        };
        if let Some(last) = dims.last_mut() {
            *last = q.rows;
        }
        y.reshape(dims)?.to_dtype(dtype)
    }
}

fn launch_cfg(threads: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (threads.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// x (m, cols) f32 @ W^T -> (m, rows) f32.
struct Qmv {
    rows: usize,
    cols: usize,
    bits: usize,
    group_size: usize,
}

impl CustomOp3 for Qmv {
    fn name(&self) -> &'static str {
        "lmx-cuda-qmv"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("lmx-cuda-qmv runs on CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout, ss: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        let m = xl.shape().elem_count() / self.cols;
        if !xl.is_contiguous() || !wl.is_contiguous() || !sl.is_contiguous() {
            candle_core::bail!("lmx-cuda-qmv needs contiguous inputs");
        }
        let dev = xs.device().clone();
        let w = ws.as_cuda_slice::<u32>()?.slice(wl.start_offset()..);
        let sb = ss.as_cuda_slice::<f32>()?.slice(sl.start_offset()..);
        let (rows, cols, bits, gs, mm) = (self.rows as i32, self.cols as i32, self.bits as i32, self.group_size as i32, m as i32);
        let cfg = launch_cfg(32 * self.rows * m);
        let storage = match xs.dtype() {
            DType::BF16 => {
                let x = xs.as_cuda_slice::<half::bf16>()?.slice(xl.start_offset()..);
                let func = dev.get_or_load_custom_func("lmx_qmv_bf16", "lmx_quant", ptx()?)?;
                // SAFETY: every element is written by the kernel.
                let y = unsafe { dev.alloc::<half::bf16>(m * self.rows)? };
                let mut b = func.builder();
                b.arg(&w).arg(&sb).arg(&x).arg(&y).arg(&rows).arg(&cols).arg(&bits).arg(&gs).arg(&mm);
                // SAFETY: the buffers hold what the kernel reads (shapes checked by the caller).
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev)
            }
            DType::F32 => {
                let x = xs.as_cuda_slice::<f32>()?.slice(xl.start_offset()..);
                let func = dev.get_or_load_custom_func("lmx_qmv_f32", "lmx_quant", ptx()?)?;
                // SAFETY: every element is written by the kernel.
                let y = unsafe { dev.alloc::<f32>(m * self.rows)? };
                let mut b = func.builder();
                b.arg(&w).arg(&sb).arg(&x).arg(&y).arg(&rows).arg(&cols).arg(&bits).arg(&gs).arg(&mm);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev)
            }
            other => candle_core::bail!("lmx-cuda-qmv: activations of dtype {other:?}"),
        };
        Ok((storage, Shape::from((m, self.rows))))
    }
}

/// Packed (rows, words) u32 and [scales | biases] -> W (rows, cols) in `dtype` (f32 or bf16).
struct Dequant {
    cols: usize,
    bits: usize,
    group_size: usize,
    dtype: DType,
}

impl CustomOp2 for Dequant {
    fn name(&self) -> &'static str {
        "lmx-cuda-dequant"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("lmx-cuda-dequant runs on CUDA only")
    }

    fn cuda_fwd(&self, ws: &CudaStorage, wl: &Layout, ss: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        let rows = wl.dims()[0];
        let dev = ws.device().clone();
        let w = ws.as_cuda_slice::<u32>()?.slice(wl.start_offset()..);
        let sb = ss.as_cuda_slice::<f32>()?.slice(sl.start_offset()..);
        let (r, c, bits, gs) = (rows as i32, self.cols as i32, self.bits as i32, self.group_size as i32);
        let cfg = launch_cfg(rows * self.cols);
        let storage = if self.dtype == DType::BF16 {
            let func = dev.get_or_load_custom_func("lmx_dequant_bf16", "lmx_quant", ptx()?)?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<half::bf16>(rows * self.cols)? };
            let mut b = func.builder();
            b.arg(&w).arg(&sb).arg(&out).arg(&r).arg(&c).arg(&bits).arg(&gs);
            // SAFETY: the buffers hold what the kernel reads.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev)
        } else {
            let func = dev.get_or_load_custom_func("lmx_dequant_f32", "lmx_quant", ptx()?)?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<f32>(rows * self.cols)? };
            let mut b = func.builder();
            b.arg(&w).arg(&sb).arg(&out).arg(&r).arg(&c).arg(&bits).arg(&gs);
            // SAFETY: as above.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev)
        };
        Ok((storage, Shape::from((rows, self.cols))))
    }
}
