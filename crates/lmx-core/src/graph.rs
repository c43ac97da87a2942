//! CUDA graphs: a decode step's hundreds of kernel launches recorded once and replayed with
//! one launch. At batch 1 a step of a Llama-3-8B-shaped model on an H200 is ~680 kernels, and
//! the host's ~9 us to queue each one (candle's bookkeeping, allocation, the driver call) made
//! the step host-bound (docs/cuda/2026-11-30-qmv.txt).
//!
//! A captured step must not depend on anything the host changes between replays: inputs live
//! in fixed device buffers (the token id, its position), kernels read the position from the
//! device ([`crate::ops::kv_write`], [`crate::ops::Mask::Upto`]), and every tensor the step
//! allocates is freed before capture ends (its memory belongs to the graph and is reused by
//! every replay). candle's own kernels upload small parameter vectors (shapes, strides) from
//! the host; [`warm`] runs a step with candle's graph cache on, so a capture of the same step
//! finds them on the device.
//!
//! A graph needs every op on one stream without cross-stream event tracking:
//! [`capturable`] says whether a device is set up so ([`crate::device::cuda`] does that by
//! default).

use candle_core::{Device, Result};

/// A recorded sequence of GPU work, replayed by [`Graph::launch`].
pub struct Graph {
    #[cfg(feature = "cuda")]
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
}

// SAFETY: CUDA graph objects are not internally synchronized but may be used from any
// thread when calls are serialized (CUDA's "graph thread safety"); `Graph` is Send but not
// Sync, so one thread at a time owns it.
#[cfg(feature = "cuda")]
unsafe impl Send for Graph {}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

/// Whether `LMX_CUDA_GRAPH=0` turned graphs off.
pub fn disabled() -> bool {
    std::env::var("LMX_CUDA_GRAPH").is_ok_and(|v| v == "0")
}

/// True when work on `device` can be captured: a GPU whose ops all go to one stream, without
/// cross-stream event tracking, and graphs not turned off.
pub fn capturable(device: &Device) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => !d.is_event_tracking() && !disabled(),
        _ => false,
    }
}

/// Whether the work `device`'s stream receives now is being recorded (inside [`capture`]):
/// host-side waits on it (events, copies to the host) must wait for the replay instead.
pub fn capturing(device: &Device) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
            d.cuda_stream().capture_status().is_ok_and(|s| s == CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
        }
        _ => false,
    }
}

/// Runs `f` (on this thread) with candle's graph parameter cache on: the small host-to-device
/// uploads its kernels make are kept, so that a later [`capture`] of the same work finds them.
pub fn warm<R>(device: &Device, f: impl FnOnce() -> Result<R>) -> Result<R> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let _guard = d.enable_cuda_graph_htod_cache();
            f()
        }
        _ => f(),
    }
}

/// Records the GPU work `f` queues on `device` (run on this thread, after a [`warm`] run of the
/// same work) into a graph, without running it. On an error the capture is ended and the
/// stream left usable.
pub fn capture(device: &Device, f: impl FnOnce() -> Result<()>) -> Result<Graph> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::sys;
            use candle_core::cuda_backend::WrapErr;
            let _guard = d.enable_cuda_graph_htod_cache();
            let stream = d.cuda_stream();
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).w()?;
            let run = f();
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            run?;
            match ended.w()? {
                Some(graph) => Ok(Graph { graph }),
                None => candle_core::bail!("CUDA graph capture recorded nothing"),
            }
        }
        _ => {
            let _ = f;
            candle_core::bail!("CUDA graphs need a CUDA device, not {device:?}")
        }
    }
}

impl Graph {
    /// Queues one replay of the recorded work on its stream.
    pub fn launch(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::WrapErr;
            self.graph.launch().w()
        }
        #[cfg(not(feature = "cuda"))]
        candle_core::bail!("CUDA graphs need the cuda feature")
    }
}
