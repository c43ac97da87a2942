//! `lmx convert`: GGUF to a Hugging Face/MLX model folder, or a dtype cast of a folder
//! (the flags of `mlx_lm.convert`; quantization arrives with its own issue).

use std::path::PathBuf;

use anyhow::Context;
use lmx::ModelSource;

/// Flags of `lmx convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file to convert to a model folder (tensors dequantized, tokenizer rebuilt).
    #[arg(long, conflicts_with = "hf_path")]
    pub gguf: Option<PathBuf>,
    /// A model folder or cached hub id to convert.
    #[arg(long, alias = "model")]
    pub hf_path: Option<String>,
    /// Output folder; must not exist.
    #[arg(long, default_value = "mlx_model")]
    pub mlx_path: PathBuf,
    /// Output dtype: float32, float16 or bfloat16 (default: float32 for GGUF, else the checkpoint's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize (not available yet).
    #[arg(short = 'q', long)]
    pub quantize: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(!args.quantize, "-q/--quantize is not implemented in this lmx yet; convert without it");
    let source = match (&args.gguf, &args.hf_path) {
        (Some(g), _) => ModelSource::Gguf(g.clone()),
        (None, Some(p)) => ModelSource::resolve(p)?,
        (None, None) => anyhow::bail!("give a model to convert: --gguf FILE or --hf-path DIR"),
    };
    let dtype = args.dtype.as_deref().map(lmx::core::parse_dtype).transpose()?;
    let t = std::time::Instant::now();
    eprintln!("[INFO] Loading {}", source.path().display());
    let folder = lmx::convert::read(&source, dtype).with_context(|| format!("reading {}", source.path().display()))?;
    eprintln!("[INFO] Saving {} tensors to {}", folder.tensors.len(), args.mlx_path.display());
    lmx::convert::write(&folder, &args.mlx_path)?;
    eprintln!("[INFO] Done in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}
