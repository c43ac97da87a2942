//! NCCL for CUDA tensors: candle's cudarc bindings, `libnccl` loaded at run time (only a
//! process that sums a tensor over GPUs needs it). The sum runs on candle's stream, so it is
//! ordered with the kernels before and after it and the data never leaves the GPUs.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

/// A NCCL communicator between the ranks of a group, each on its own GPU.
pub struct NcclComm {
    comm: Mutex<Comm>,
}

// SAFETY: the communicator is used under the mutex, one call at a time, on the stream it was
// made with; NCCL communicators may be used from any thread that way.
unsafe impl Send for NcclComm {}
// SAFETY: as above.
unsafe impl Sync for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclComm")
    }
}

/// A fresh NCCL id (rank 0 makes it, every rank passes it to [`NcclComm::new`]).
pub fn unique_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(|e| candle_core::Error::Msg(format!("NCCL: making an id: {e:?} (is libnccl.so on the library path?)")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

impl NcclComm {
    /// Joins the communicator `id` as `rank` of `size`, on `device`'s stream.
    pub fn new(device: &Device, rank: usize, size: usize, id: &[u8]) -> Result<Self> {
        let Device::Cuda(dev) = device else { candle_core::bail!("NCCL needs a CUDA device, not {device:?}") };
        let mut internal = [0 as std::ffi::c_char; 128];
        if id.len() != internal.len() {
            candle_core::bail!("NCCL: an id of {} bytes (expected 128)", id.len());
        }
        for (d, s) in internal.iter_mut().zip(id) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(dev.cuda_stream(), rank, size, Id::uninit(internal)).map_err(|e| candle_core::Error::Msg(format!("NCCL: joining as rank {rank} of {size}: {e:?}")))?;
        Ok(Self { comm: Mutex::new(comm) })
    }

    /// The element-wise sum of `x` over the ranks, on every rank (f32, bf16, f16).
    pub fn all_sum(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&AllSum(self))
    }
}

struct AllSum<'a>(&'a NcclComm);

impl CustomOp1 for AllSum<'_> {
    fn name(&self) -> &'static str {
        "lmx-nccl-all-sum"
    }

    fn cpu_fwd(&self, _s: &candle_core::CpuStorage, _l: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL sums CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let dev = s.device().clone();
        let comm = self.0.comm.lock().unwrap_or_else(|e| e.into_inner());
        macro_rules! sum {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(l.start_offset()..l.start_offset() + n);
                // SAFETY: NCCL writes every element of the output.
                let mut dst = unsafe { dev.alloc::<$t>(n) }?;
                comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(|e| candle_core::Error::Msg(format!("NCCL all_reduce: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => sum!(f32),
            DType::BF16 => sum!(half::bf16),
            DType::F16 => sum!(half::f16),
            other => candle_core::bail!("NCCL all_sum: dtype {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}
