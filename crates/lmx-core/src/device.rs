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
        "auto" => Ok(if cfg!(feature = "cuda") { Device::new_cuda(0).unwrap_or(Device::Cpu) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| DeviceError::UnknownDevice(name.to_string()))?,
                None => 0,
            };
            Device::new_cuda(ordinal).map_err(|e| DeviceError::Unavailable(name.to_string(), e))
        }
        _ => Err(DeviceError::UnknownDevice(name.to_string())),
    }
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
