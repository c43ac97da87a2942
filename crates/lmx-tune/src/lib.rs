//! lmx-tune: fine-tuning as `mlx_lm.lora` does it — LoRA, DoRA and full fine-tuning, also on
//! quantized models (QLoRA).
//!
//! - [`data`]: MLX LM's dataset formats (`train.jsonl` / `valid.jsonl` / `test.jsonl`),
//!   validated line by line and tokenized with the model's chat template.
//! - [`trainer`]: batching, the masked loss, the training loop, evaluation, checkpoints.
//! - [`optim`]: Adam, AdamW, SGD and learning-rate schedules with `mlx.optimizers` semantics.
//! - [`config`]: the YAML config (`-c`) and its defaults.
//!
//! The adapters themselves live in the layers (`lmx_nn::Adapter`, attached while a model is
//! built from an `lmx_io::AdapterSetup`), and fusing them into a model folder in lmx-convert.

pub mod config;
pub mod data;
pub mod optim;
pub mod trainer;

pub use data::{load_split, tokenize, DataError, Example, Record};

use std::path::PathBuf;

/// What can go wrong fine-tuning.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    /// A bad option or config value.
    #[error("{0}")]
    Config(String),
    /// A bad dataset.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The loss or a gradient became NaN or infinite.
    #[error("training stopped at iteration {it}: the loss is {loss} or a gradient is not finite; the adapters of the last good step are in {path}. Try a lower --learning-rate")]
    NonFinite { it: usize, loss: f64, path: PathBuf },
    /// Loading the model or writing files.
    #[error(transparent)]
    Lmx(#[from] lmx::Error),
    /// Reading or writing files.
    #[error(transparent)]
    Io(#[from] lmx_io::IoError),
    /// A tensor operation.
    #[error(transparent)]
    Tensor(#[from] lmx::core::Error),
}
