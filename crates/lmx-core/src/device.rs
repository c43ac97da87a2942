//! Device and dtype selection from user-facing names (`--device cpu|cuda`, `--dtype bfloat16`).

use candle_core::{DType, Device};

/// A device or dtype name the user gave that lmx cannot honour.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The name is not one lmx knows.
    #[error("unknown device `{0}`: use `auto`, `cpu` or `cuda` (or `cuda:N`)")]
    UnknownDevice(String),
    /// The device exists but this binary was built without its backend.
    #[error("device `{0}` is not available: this lmx was built without CUDA support (rebuild with `--features cuda`) or no GPU is visible")]
    Unavailable(String, #[source] candle_core::Error),
    /// The dtype name is not one lmx knows.
    #[error("unknown dtype `{0}`: use float32, float16 or bfloat16")]
    UnknownDtype(String),
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N` into a candle device. `auto` is the first GPU
/// when this binary has the CUDA backend and one is visible, else the CPU.
pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    match name {
        "auto" => Ok(if cfg!(feature = "cuda") { cuda(0).unwrap_or(Device::Cpu) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| DeviceError::UnknownDevice(name.to_string()))?,
                None => 0,
            };
            cuda(ordinal).map_err(|e| DeviceError::Unavailable(name.to_string(), e))
        }
        _ => Err(DeviceError::UnknownDevice(name.to_string())),
    }
}

/// GPU `ordinal`: candle's device on a stream of its own, cross-stream event tracking off, so
/// that decode steps can be captured as CUDA graphs ([`crate::graph`]). Every kernel, copy and
/// library call of the device goes to that one stream, so nothing needs tracking.
/// `LMX_CUDA_STREAM=per-thread` gives candle's default instead (each thread's default stream,
/// ordered across threads by cudarc's events; no graphs).
#[cfg(feature = "cuda")]
pub fn cuda(ordinal: usize) -> candle_core::Result<Device> {
    if std::env::var("LMX_CUDA_STREAM").is_ok_and(|v| v == "per-thread") {
        return Device::new_cuda(ordinal);
    }
    let dev = candle_core::CudaDevice::new_with_stream(ordinal)?;
    // `own-tracked` (an A/B of the tracking's cost only) keeps it on.
    if !std::env::var("LMX_CUDA_STREAM").is_ok_and(|v| v == "own-tracked") {
        // SAFETY: every kernel, copy and library call of this device goes to its one stream
        // (lmx's own kernels and cuBLAS take the device's stream), so no cross-stream ordering
        // needs tracking.
        unsafe { dev.disable_event_tracking() };
    }
    keep_freed_memory(&dev);
    Ok(Device::Cuda(dev))
}

/// The default memory pools (their handles as integers) of the GPUs this process opened, for
/// [`gpu_peak_memory_bytes`].
#[cfg(feature = "cuda")]
static POOLS: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// Lets the device's memory pool keep what is freed instead of handing it back to the driver
/// at each synchronization (its default release threshold is 0): a prefill allocates and frees
/// the same large buffers every layer, and mapping them again each time is slow.
/// `LMX_CUDA_POOL=release` keeps the driver's default. The pool is remembered for
/// [`gpu_peak_memory_bytes`] either way.
#[cfg(feature = "cuda")]
fn keep_freed_memory(dev: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    if ctx.bind_to_thread().is_err() {
        return;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on the device's own context; the pool handle is the device's
    // default pool and the attribute takes a u64.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) != sys::CUresult::CUDA_SUCCESS {
            return;
        }
        if !std::env::var("LMX_CUDA_POOL").is_ok_and(|v| v == "release") {
            let _ = sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut threshold as *mut u64).cast());
        }
    }
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if !pools.contains(&(pool as usize)) {
        pools.push(pool as usize);
    }
}

/// The most GPU memory this process's tensors have held at once, summed over the GPUs it
/// opened (each default memory pool's high-water mark: weights, activations, caches; not
/// cuBLAS's or NCCL's own buffers), or None when it opened none.
pub fn gpu_peak_memory_bytes() -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        if pools.is_empty() {
            return None;
        }
        let mut total = 0u64;
        for &p in pools.iter() {
            let mut used = 0u64;
            // SAFETY: a pool handle the driver gave; the attribute is a u64.
            let ok = unsafe { sys::cuMemPoolGetAttribute(p as sys::CUmemoryPool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut used as *mut u64).cast()) };
            if ok == sys::CUresult::CUDA_SUCCESS {
                total += used;
            }
        }
        Some(total)
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// Without the CUDA backend: the error `Device::new_cuda` gives.
#[cfg(not(feature = "cuda"))]
pub fn cuda(ordinal: usize) -> candle_core::Result<Device> {
    Device::new_cuda(ordinal)
}

/// Parses MLX LM / torch dtype names (`float32`, `float16`, `bfloat16`, and the short forms).
pub fn parse_dtype(name: &str) -> Result<DType, DeviceError> {
    match name {
        "float32" | "f32" | "fp32" => Ok(DType::F32),
        "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        _ => Err(DeviceError::UnknownDtype(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(parse_device("auto").is_ok());
        assert!(matches!(parse_device("tpu"), Err(DeviceError::UnknownDevice(_))));
        assert_eq!(parse_dtype("bfloat16").ok(), Some(DType::BF16));
        assert!(parse_dtype("int4").is_err());
    }
}
