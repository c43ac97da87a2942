//! Samplers and logits processors with MLX LM's semantics (`mlx_lm/sample_utils.py`):
//! temperature 0 is argmax; otherwise top-k, then top-p, then min-p filter the distribution
//! and a token is drawn at the given temperature. The repetition penalty divides positive
//! (multiplies negative) logits of recently seen tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings (the flags of `mlx_lm.generate`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerParams {
    /// Temperature; 0 means greedy (argmax).
    pub temp: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than min_p times the most likely one (0 = off).
    pub min_p: f32,
    /// Tokens min-p always keeps.
    pub min_tokens_to_keep: usize,
    /// Penalty for recently seen tokens (1 or None = off).
    pub repetition_penalty: Option<f32>,
    /// How many recent tokens the repetition penalty looks at.
    pub repetition_context_size: usize,
    /// Seed for reproducible sampling; None seeds from the OS.
    pub seed: Option<u64>,
}

impl SamplerParams {
    /// Checks every setting's range before any work: NaN or out-of-range values would
    /// otherwise sample silently wrong (NaN temperature picks the least likely token, a zero
    /// repetition penalty makes infinite logits).
    pub fn validate(&self) -> Result<(), crate::GenerateError> {
        let bad = |key, value, allowed| Err(crate::GenerateError::Sampling { key, value, allowed });
        if !(self.temp.is_finite() && self.temp >= 0.0) {
            return bad("temp", self.temp, "use 0 (greedy) or a positive temperature");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "use a value in (0, 1]; 1 turns it off");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "use a value in [0, 1]; 0 turns it off");
        }
        match self.repetition_penalty {
            Some(p) if !(p.is_finite() && p > 0.0) => bad("repetition_penalty", p, "use a positive value; 1 turns it off"),
            _ => Ok(()),
        }
    }
}

impl Default for SamplerParams {
    fn default() -> Self {
        Self { temp: 0.0, top_p: 1.0, top_k: 0, min_p: 0.0, min_tokens_to_keep: 1, repetition_penalty: None, repetition_context_size: 20, seed: None }
    }
}

/// A sampler with its random state.
pub struct Sampler {
    params: SamplerParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplerParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Applies the repetition penalty for `recent` tokens (the tail of prompt + generation).
    pub fn penalize(&self, logits: &mut [f32], recent: &[u32]) {
        let Some(penalty) = self.params.repetition_penalty.filter(|p| *p != 1.0) else { return };
        let start = recent.len().saturating_sub(self.params.repetition_context_size);
        let mut seen = std::collections::HashSet::new();
        for &t in &recent[start..] {
            if let (true, Some(l)) = (seen.insert(t), logits.get_mut(t as usize)) {
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temp <= 0.0 {
            return argmax(logits);
        }
        // Log-probabilities at temperature 1 (MLX LM filters before applying the temperature).
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, l)| (i as u32, l - log_z)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cand.truncate(p.top_k.max(1));
        }
        if p.top_p > 0.0 && p.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = cand.iter().take_while(|(_, lp)| {
                let before = mass;
                mass += lp.exp();
                before < p.top_p
            });
            let n = keep.count().max(1);
            cand.truncate(n);
        }
        if p.min_p > 0.0 {
            let threshold = cand[0].1 + p.min_p.ln();
            let n = cand.iter().filter(|(_, lp)| *lp >= threshold).count().max(p.min_tokens_to_keep).min(cand.len());
            cand.truncate(n);
        }
        // Categorical draw at temperature `temp` over the kept tokens.
        let top = cand[0].1;
        let weights: Vec<f32> = cand.iter().map(|(_, lp)| ((lp - top) / p.temp).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for ((tok, _), w) in cand.iter().zip(&weights) {
            if r < *w {
                return *tok;
            }
            r -= w;
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest logit (the first one on ties, as MLX's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temp: f32) -> SamplerParams {
        SamplerParams { temp, seed: Some(7), ..Default::default() }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_probabilities() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let draw = |seed| {
            let mut s = Sampler::new(SamplerParams { seed: Some(seed), ..params(1.0) });
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        let ones = draw(1).iter().filter(|t| **t == 1).count() as f32 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "P(token 1) = {ones}, expected 0.75");
        assert!(!draw(2).contains(&2));
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_candidates() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let seen = |p: SamplerParams| {
            let mut s = Sampler::new(p);
            let mut set: Vec<u32> = (0..2000).map(|_| s.sample(&logits)).collect();
            set.sort();
            set.dedup();
            set
        };
        assert_eq!(seen(SamplerParams { top_k: 2, ..params(5.0) }), vec![0, 1]);
        // Probabilities ~ 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two.
        assert_eq!(seen(SamplerParams { top_p: 0.8, ..params(5.0) }), vec![0, 1]);
        // min_p 0.3 keeps tokens with p >= 0.3 * 0.64.
        assert_eq!(seen(SamplerParams { min_p: 0.3, ..params(5.0) }), vec![0, 1]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let s = Sampler::new(SamplerParams { repetition_penalty: Some(2.0), ..params(0.0) });
        let mut logits = [4.0f32, -1.0, 3.0];
        s.penalize(&mut logits, &[0, 1, 0]);
        assert_eq!(logits, [2.0, -2.0, 3.0]);
    }
}
