//! Perplexity of a model on a token stream, computed as `mlx_lm.perplexity` does: the tokens
//! are cut into sequences of `sequence_length`, each sequence predicts its own next tokens
//! (logits for positions 0..n-1 against targets 1..n), and the perplexity is exp(mean loss)
//! over all predicted tokens, with the standard error of that mean carried through.

use lmx_core::Tensor;
use lmx_models::{CausalLm, Logits};

use crate::Result;

/// The result of [`perplexity`].
#[derive(Debug, Clone, Copy)]
pub struct Perplexity {
    /// exp(mean cross-entropy).
    pub perplexity: f64,
    /// Standard error of the perplexity (delta method, as MLX LM reports it).
    pub standard_error: f64,
    /// Mean cross-entropy in nats.
    pub mean_loss: f64,
    /// Tokens predicted.
    pub tokens: usize,
    /// Sequences evaluated.
    pub sequences: usize,
}

/// Evaluates `model` on `tokens`: at most `num_samples` sequences (all when None) of
/// `sequence_length` tokens; a shorter tail is dropped. `on_sequence` is called after each.
pub fn perplexity(model: &dyn CausalLm, tokens: &[u32], sequence_length: usize, num_samples: Option<usize>, mut on_sequence: impl FnMut(usize, usize)) -> Result<Perplexity> {
    let seq_len = sequence_length.max(2);
    let total = tokens.len() / seq_len;
    let n = num_samples.map_or(total, |s| s.min(total));
    if n == 0 {
        return Err(crate::Error::TextTooShort { tokens: tokens.len(), sequence_length: seq_len });
    }
    // Checked before any work: one forward over seq_len - 1 positions, and every id indexes
    // the embedding and the logits.
    let context = model.max_position_embeddings();
    if seq_len - 1 > context {
        return Err(crate::Error::SequenceTooLong { sequence_length: seq_len, context });
    }
    lmx_generate::check_vocab(&tokens[..n * seq_len], model.vocab_size())?;
    let mut losses = Vec::with_capacity(n * (seq_len - 1));
    for (i, seq) in tokens.chunks_exact(seq_len).take(n).enumerate() {
        let input = Tensor::new(&seq[..seq_len - 1], model.device())?.unsqueeze(0)?;
        let logits = model.forward(&input, &mut model.new_cache(), Logits::All)?.squeeze(0)?.to_vec2::<f32>()?;
        for (row, &target) in logits.iter().zip(&seq[1..]) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_z = row.iter().map(|v| f64::from(v - max).exp()).sum::<f64>().ln() + f64::from(max);
            losses.push(log_z - f64::from(row[target as usize]));
        }
        on_sequence(i + 1, n);
    }
    let count = losses.len() as f64;
    let mean = losses.iter().sum::<f64>() / count;
    let var = losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (count - 1.0).max(1.0);
    let ppl = mean.exp();
    Ok(Perplexity { perplexity: ppl, standard_error: ppl * (var / count).sqrt(), mean_loss: mean, tokens: losses.len(), sequences: n })
}
