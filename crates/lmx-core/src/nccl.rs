//! NCCL for CUDA tensors: candle's cudarc bindings, `libnccl` loaded at run time (only a
//! process that sums a tensor over GPUs needs it). The data never leaves the GPUs.
//!
//! candle launches on the calling thread's per-thread default stream, which NCCL does not
//! order correctly (sums overlapped the kernels around them: greedy tokens changed from run
//! to run until `CUDA_LAUNCH_BLOCKING=1`). So NCCL gets a stream of its own, made to wait
//! for candle's work before each sum, and candle's stream waits for the sum after it.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

/// A NCCL communicator between the ranks of a group, each on its own GPU.
pub struct NcclComm {
    comm: Mutex<Comm>,
    /// NCCL's stream: the device's own (see [`crate::device::cuda`]), or, for a device on the
    /// per-thread default stream, a stream of NCCL's ordered against it (see the module docs).
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    separate: bool,
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

/// A point in a GPU's stream: [`StreamMark::done`] says whether the work queued before it
/// (kernels and NCCL sums) has finished, without blocking.
pub struct StreamMark(candle_core::cuda_backend::cudarc::driver::CudaEvent);

/// Marks `device`'s stream now (None for a CPU device).
pub fn mark(device: &Device) -> Result<Option<StreamMark>> {
    let Device::Cuda(dev) = device else { return Ok(None) };
    let event = dev.cuda_stream().record_event(None).map_err(|e| candle_core::Error::Msg(format!("CUDA: recording an event: {e:?}")))?;
    Ok(Some(StreamMark(event)))
}

impl StreamMark {
    /// Whether everything queued before the mark is done.
    pub fn done(&self) -> Result<bool> {
        self.0.try_is_complete().map_err(|e| candle_core::Error::Msg(format!("CUDA: querying an event: {e:?}")))
    }
}

/// The per-thread default stream's handle (`CU_STREAM_PER_THREAD`).
const PER_THREAD_STREAM: usize = 0x2;

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
        // NCCL takes its GPU from the calling thread's current context.
        let candle = dev.cuda_stream();
        candle.context().bind_to_thread().map_err(|e| candle_core::Error::Msg(format!("NCCL: binding the GPU: {e:?}")))?;
        let separate = candle.cu_stream() as usize == PER_THREAD_STREAM;
        let stream = if separate { candle.fork().map_err(|e| candle_core::Error::Msg(format!("NCCL: making its stream: {e:?}")))? } else { candle };
        let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal)).map_err(|e| candle_core::Error::Msg(format!("NCCL: joining as rank {rank} of {size}: {e:?}")))?;
        Ok(Self { comm: Mutex::new(comm), stream, separate })
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
        // NCCL launches on the calling thread's current context: make it this rank's GPU
        // (the compute pool's threads may hold another).
        let candle = dev.cuda_stream();
        candle.context().bind_to_thread().map_err(|e| candle_core::Error::Msg(format!("NCCL: binding the GPU: {e:?}")))?;
        let order = |e| candle_core::Error::Msg(format!("NCCL: ordering its stream with candle's: {e:?}"));
        if self.0.separate {
            self.0.stream.join(&candle).map_err(order)?;
        }
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
        if self.0.separate {
            candle.join(&self.0.stream).map_err(order)?;
        }
        Ok((out, l.shape().clone()))
    }
}
