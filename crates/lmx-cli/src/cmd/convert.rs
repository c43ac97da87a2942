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
    /// Quantize to MLX's affine format.
    #[arg(short = 'q', long, conflicts_with = "dequantize")]
    pub quantize: bool,
    /// Bits per weight: 2, 3, 4, 5, 6 or 8 (default 4).
    #[arg(long)]
    pub q_bits: Option<usize>,
    /// Elements per scale/bias group: 32, 64 or 128 (default 64).
    #[arg(long)]
    pub q_group_size: Option<usize>,
    /// Quantization mode (only `affine` so far).
    #[arg(long, default_value = "affine")]
    pub q_mode: String,
    /// Mixed-precision recipe: mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6.
    #[arg(long)]
    pub quant_predicate: Option<String>,
    /// Per-layer bits from a rules file: lines of `PATTERN BITS [GROUP_SIZE]` or `PATTERN skip`
    /// (`*` matches anything; the first match wins), e.g. `model.embed_tokens 6`.
    #[arg(long)]
    pub quant_rules: Option<PathBuf>,
    /// Dequantize a quantized model.
    #[arg(short = 'd', long)]
    pub dequantize: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let quantizing = args.quantize || args.quant_predicate.is_some() || args.quant_rules.is_some();
    anyhow::ensure!(args.q_mode == "affine", "--q-mode `{}` is not supported yet; lmx quantizes in MLX's `affine` mode", args.q_mode);
    anyhow::ensure!(quantizing || (args.q_bits.is_none() && args.q_group_size.is_none()), "--q-bits and --q-group-size need -q");
    anyhow::ensure!(!(quantizing && args.dequantize), "-q and --dequantize exclude each other");
    let source = match (&args.gguf, &args.hf_path) {
        (Some(g), _) => ModelSource::Gguf(g.clone()),
        (None, Some(p)) => ModelSource::resolve(p)?,
        (None, None) => anyhow::bail!("give a model to convert: --gguf FILE or --hf-path DIR"),
    };
    let dtype = args.dtype.as_deref().map(lmx::core::parse_dtype).transpose()?;
    let t = std::time::Instant::now();
    let transform = if quantizing {
        let rules = match &args.quant_rules {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading --quant-rules {}", p.display()))?;
                lmx::convert::quantize::parse_rules(&text, p)?
            }
            None => Vec::new(),
        };
        lmx::convert::Transform::Quantize(lmx::convert::quantize::QuantizeOptions {
            bits: args.q_bits.unwrap_or(4),
            group_size: args.q_group_size.unwrap_or(64),
            recipe: args.quant_predicate.as_deref().map(lmx::convert::quantize::MixedRecipe::parse).transpose()?,
            rules,
        })
    } else if args.dequantize {
        lmx::convert::Transform::Dequantize
    } else {
        lmx::convert::Transform::Cast
    };
    eprintln!("[INFO] Converting into {} (one tensor at a time, shards of up to 5 GB)", args.mlx_path.display());
    let stats = lmx::convert::convert(&source, dtype, &transform, &args.mlx_path, lmx::convert::MAX_SHARD_BYTES).with_context(|| format!("converting {}", source.path().display()))?;
    if let Some(stats) = stats {
        let skipped = stats.unquantized();
        if let Some((module, cols)) = skipped.first() {
            let group = args.q_group_size.unwrap_or(64);
            eprintln!(
                "[INFO] {} matri{} stay in float because the group size {group} does not divide their rows (as in MLX LM), e.g. `{module}` with rows of {cols}; a group size that divides them (32, 64 or 128) quantizes them too",
                skipped.len(),
                if skipped.len() == 1 { "x" } else { "ces" }
            );
        }
        eprintln!("[INFO] Quantized model with {:.3} bits per weight.", stats.bits_per_weight());
    }
    eprintln!("[INFO] Done in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}
