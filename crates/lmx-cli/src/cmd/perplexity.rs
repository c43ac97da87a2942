//! `lmx perplexity`: perplexity of a model on a local text file (`mlx_lm.perplexity`, which
//! reads a Hugging Face dataset; lmx reads a `.txt` file or a `.jsonl` file of `{"text"}`).

use std::path::PathBuf;

use anyhow::Context;

use super::ModelArgs;

/// Flags of `lmx perplexity`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to evaluate: a .txt file, or a .jsonl file whose lines hold {"text": ...}.
    #[arg(long, alias = "data-path")]
    pub data: PathBuf,
    /// Tokens per evaluated sequence.
    #[arg(long, default_value_t = 512)]
    pub sequence_length: usize,
    /// Sequences to evaluate (-1 = all).
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub num_samples: i64,
    /// Accepted for compatibility with mlx_lm.perplexity; lmx evaluates one sequence at a time.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

/// The text of `path`: the file itself, or the `text` fields of a JSONL file joined by newlines.
fn read_text(path: &PathBuf) -> anyhow::Result<String> {
    let raw = std::fs::read_to_string(path).with_context(|| format!("reading --data {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        let mut out = Vec::new();
        for (i, line) in raw.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            let text = v.get("text").and_then(|t| t.as_str()).with_context(|| format!("{}:{}: no \"text\" string", path.display(), i + 1))?;
            out.push(text.to_string());
        }
        return Ok(out.join("\n"));
    }
    Ok(raw)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Under lmx launch: rank 0's file, so other hosts need no copy.
    let text = crate::dist::from_root(|| read_text(&args.data))?;
    let (model, tokenizer) = args.model.load()?;
    let tokens = tokenizer.encode(&text, true)?;
    anyhow::ensure!(
        tokens.len() >= args.sequence_length,
        "{} has {} tokens, fewer than one sequence of --sequence-length {}; use a shorter --sequence-length or more text",
        args.data.display(),
        tokens.len(),
        args.sequence_length
    );
    let samples = (args.num_samples >= 0).then_some(args.num_samples as usize);
    eprintln!("Evaluating perplexity: {} tokens, sequence length {}", tokens.len(), args.sequence_length);
    let t = std::time::Instant::now();
    let r = lmx::perplexity(&*model, &tokens, args.sequence_length, samples, |done, total| {
        eprint!("\rProcessed {done}/{total} sequences");
    })?;
    eprintln!();
    println!("Perplexity: {:.3} ± {:.3}", r.perplexity, r.standard_error);
    eprintln!("Mean loss {:.4} over {} tokens in {} sequences, {:.1} tokens/s", r.mean_loss, r.tokens, r.sequences, r.tokens as f64 / t.elapsed().as_secs_f64());
    Ok(())
}
