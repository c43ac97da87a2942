//! `lmx fuse`: the flags of `mlx_lm.fuse`. Writes a standalone model folder with the adapters
//! folded into the weights; a quantized base stays quantized unless `--dequantize`.

use std::path::PathBuf;

use anyhow::Context;
use lmx::convert::fuse::FuseOptions;
use lmx::convert::{convert, Transform, MAX_SHARD_BYTES};

use super::{resolve_model, DEFAULT_MODEL};

/// Flags of `lmx fuse`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model the adapters were trained on (folder, .gguf file or cached hub id).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Where the fused model folder goes (must not exist).
    #[arg(long, default_value = "fused_model")]
    pub save_path: PathBuf,
    /// The adapter folder (adapter_config.json + adapters.safetensors).
    #[arg(long, default_value = "adapters")]
    pub adapter_path: PathBuf,
    /// Write float weights even if the base model is quantized.
    #[arg(long)]
    pub dequantize: bool,
}

/// Runs `lmx fuse`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let model = resolve_model(&args.model)?;
    let source = lmx::ModelSource::resolve(&model).with_context(|| format!("--model {model}"))?;
    eprintln!("Loading pretrained model {model}");
    let transform = Transform::Fuse(FuseOptions { adapter_dir: args.adapter_path.clone(), dequantize: args.dequantize });
    convert(&source, None, &transform, &args.save_path, MAX_SHARD_BYTES).with_context(|| format!("fusing {} into {model}", args.adapter_path.display()))?;
    eprintln!("Saved fused model to {}", args.save_path.display());
    Ok(())
}
