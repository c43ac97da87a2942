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
    /// A setting lmx does not support.
    #[error("{what} is not supported{hint}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// What to do instead (starts with "; " when present).
        hint: String,
    },
    /// A config file that cannot be read or parsed.
    #[error("{path}: {msg}")]
    ConfigFile { path: PathBuf, msg: String },
    /// A setting with a bad value (`key` as in the YAML config).
    #[error("{key}: {msg}")]
    Setting { key: String, msg: String },
    /// Fewer examples than one batch.
    #[error("the dataset has {examples} examples, fewer than batch_size {batch_size}")]
    TooFewExamples { examples: usize, batch_size: usize },
    /// No tensor trains.
    #[error("nothing to train: no layer matched the adapter settings (check num_layers and lora_parameters.keys)")]
    NothingToTrain,
    /// A bad dataset.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The loss or a gradient became NaN or infinite.
    #[error("training stopped at iteration {it}: the loss is {loss} or a gradient is not finite; {}. Try a lower learning rate", if *.saved { format!("the adapters of the last good step are in {}", path.display()) } else { format!("the adapters themselves are no longer finite, so nothing was written over {}", path.display()) })]
    NonFinite { it: usize, loss: f64, path: PathBuf, saved: bool },
    /// Trained tensors that are NaN or infinite are never saved.
    #[error("the trained `{key}` holds NaN or infinite values; nothing was written over {}", path.display())]
    NonFiniteWeights { key: String, path: PathBuf },
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
