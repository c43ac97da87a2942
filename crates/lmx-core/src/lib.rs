//! lmx-core: the one facade through which lmx touches tensors.
//!
//! Models, layers and loops import `Tensor`, `Device`, `DType` and every op from here, never
//! from candle directly, so that device policy and op implementations (fused kernels for
//! inference, differentiable compositions for training) live in one place.

pub mod amx;
pub mod bf16_gemm;
pub mod cpu;
pub mod cpu_fused;
pub mod cpu_step;
#[cfg(feature = "cuda")]
mod cuda_fused;
#[cfg(feature = "cuda")]
mod cuda_train;
pub mod device;
pub mod frozen;
mod fused_train;
pub mod gradcheck;
pub mod graph;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ops;
pub mod quant;
pub(crate) mod taped;

pub use candle_core::backend::{BackendDevice, BackendStorage};
#[cfg(feature = "cuda")]
pub use candle_core::CudaStorage;
pub use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Error, IndexOp, Layout, Module, Result, Shape, Tensor, TensorId, Var, D};
pub use device::{parse_device, parse_dtype, DeviceError};
