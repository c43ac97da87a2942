//! Samplers and logits processors with MLX LM's semantics (`mlx_lm/sample_utils.py`):
//! temperature 0 is argmax; otherwise top-k, then top-p, then min-p filter the distribution
//! and a token is drawn at the given temperature. The logits processors run first, in MLX
//! LM's order: logit bias (added), repetition penalty (divides positive, multiplies negative
//! logits of recently seen tokens), presence penalty (subtracted once per distinct recent
//! token), frequency penalty (subtracted once per recent occurrence).

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
    /// Subtracted from the logit of every distinct token among the recent ones (None or 0 = off).
    pub presence_penalty: Option<f32>,
    /// How many recent tokens the presence penalty looks at.
    pub presence_context_size: usize,
    /// Subtracted from a token's logit once per occurrence among the recent ones (None or 0 = off).
    pub frequency_penalty: Option<f32>,
    /// How many recent tokens the frequency penalty looks at.
    pub frequency_context_size: usize,
    /// Added to the logits of these tokens (OpenAI's and MLX LM's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
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
        if let Some(p) = self.repetition_penalty.filter(|p| !(p.is_finite() && *p > 0.0)) {
            return bad("repetition_penalty", p, "use a positive value; 1 turns it off");
        }
        for (key, value) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if let Some(p) = value.filter(|p| !p.is_finite()) {
                return bad(key, p, "use a finite value; 0 turns it off");
            }
        }
        match self.logit_bias.iter().find(|(_, b)| b.is_nan() || *b == f32::INFINITY) {
            Some((_, b)) => bad("logit_bias", *b, "use finite biases (or -inf to ban a token)"),
            None => Ok(()),
        }
    }
}

impl Default for SamplerParams {
    fn default() -> Self {
        Self {
            temp: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            min_tokens_to_keep: 1,
            repetition_penalty: None,
            repetition_context_size: 20,
            presence_penalty: None,
            presence_context_size: 20,
            frequency_penalty: None,
            frequency_context_size: 20,
            logit_bias: Vec::new(),
            seed: None,
        }
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

    /// Applies the logits processors for `recent` tokens (the tail of prompt + generation), in
    /// MLX LM's order: logit bias, repetition, presence, frequency. Tokens outside the
    /// vocabulary are ignored.
    pub fn penalize(&self, logits: &mut [f32], recent: &[u32]) {
        let p = &self.params;
        for &(t, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        let tail = |n: usize| &recent[recent.len().saturating_sub(n)..];
        let distinct = |n: usize| {
            let mut seen = std::collections::HashSet::new();
            tail(n).iter().copied().filter(move |t| seen.insert(*t)).collect::<Vec<u32>>()
        };
        if let Some(penalty) = p.repetition_penalty.filter(|p| *p != 1.0) {
            for t in distinct(p.repetition_context_size) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
                }
            }
        }
        if let Some(penalty) = p.presence_penalty.filter(|p| *p != 0.0) {
            for t in distinct(p.presence_context_size) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= penalty;
                }
            }
        }
        if let Some(penalty) = p.frequency_penalty.filter(|p| *p != 0.0) {
            for &t in tail(p.frequency_context_size) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= penalty;
                }
            }
        }
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temp <= 0.0 {
            return argmax(logits);
        }
        let cand = p.candidates(logits);
        // Categorical draw at temperature `temp` over the kept tokens (most likely first when
        // filtered, in vocabulary order otherwise).
        let top = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = cand.iter().map(|(_, lp)| ((lp - top) / p.temp).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for ((tok, _), w) in cand.iter().zip(&weights) {
            if r < *w {
                return *tok;
            }
            r -= w;
        }
        cand.iter().zip(&weights).rev().find(|(_, w)| **w > 0.0).map_or(cand[0].0, |((t, _), _)| *t)
    }
}

impl SamplerParams {
    /// The tokens sampling draws from with their log-probabilities at temperature 1 (MLX LM
    /// filters before applying the temperature): the top-k / top-p / min-p survivors, most
    /// likely first, or every token in vocabulary order when no filter is set.
    fn candidates(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let log_z = lmx_core::cpu_fused::log_sum_exp(logits);
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, l)| (i as u32, l - log_z)).collect();
        if self.filters() {
            // Only the most likely tokens can pass the filters: the smallest sorted prefix that
            // decides them (sorting a 128k vocabulary every token cost more than a GPU's step).
            let mut m = 256.min(cand.len());
            loop {
                let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
                if m < cand.len() {
                    cand.select_nth_unstable_by(m - 1, by_prob);
                }
                cand[..m].sort_unstable_by(by_prob);
                if m == cand.len() || self.decided_by(&cand[..m]) {
                    break;
                }
                m = (m * 4).min(cand.len());
            }
            if self.top_k > 0 {
                cand.truncate(self.top_k.max(1));
            }
            if self.top_p > 0.0 && self.top_p < 1.0 {
                let mut mass = 0.0;
                let keep = cand.iter().take_while(|(_, lp)| {
                    let before = mass;
                    mass += lp.exp();
                    before < self.top_p
                });
                let n = keep.count().max(1);
                cand.truncate(n);
            }
            if self.min_p > 0.0 {
                let threshold = cand[0].1 + self.min_p.ln();
                let n = cand.iter().filter(|(_, lp)| *lp >= threshold).count().max(self.min_tokens_to_keep).min(cand.len());
                cand.truncate(n);
            }
        }
        cand
    }

    /// Whether top-k, top-p or min-p restrict the candidates.
    fn filters(&self) -> bool {
        self.top_k > 0 || (self.top_p > 0.0 && self.top_p < 1.0) || self.min_p > 0.0
    }

    /// Whether `prefix`, the most likely tokens sorted, holds every token the filters keep.
    fn decided_by(&self, prefix: &[(u32, f32)]) -> bool {
        if self.top_k > 0 {
            // Truncated to k first: the later filters look at those alone.
            return prefix.len() >= self.top_k;
        }
        let mut decided = true;
        if self.top_p > 0.0 && self.top_p < 1.0 {
            decided &= prefix.iter().map(|(_, lp)| lp.exp()).sum::<f32>() >= self.top_p;
        }
        if self.min_p > 0.0 {
            let threshold = prefix.first().map_or(f32::INFINITY, |c| c.1) + self.min_p.ln();
            decided &= prefix.last().is_some_and(|c| c.1 < threshold) && prefix.len() >= self.min_tokens_to_keep;
        }
        decided
    }
}

/// The log-probability of `token` under `logits` (log-softmax), and the `top` most likely
/// tokens with theirs, most likely first (OpenAI's `logprobs` / `top_logprobs`).
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let log_z = lmx_core::cpu_fused::log_sum_exp(logits);
    let chosen = logits.get(token as usize).map_or(f32::NEG_INFINITY, |l| l - log_z);
    if top == 0 {
        return (chosen, Vec::new());
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    for (i, &l) in logits.iter().enumerate() {
        if best.len() < top || l > best[best.len() - 1].1 {
            let at = best.partition_point(|(_, b)| *b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    (chosen, best.into_iter().map(|(i, l)| (i, l - log_z)).collect())
}

/// Index of the largest logit (the first one on ties, as MLX's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    lmx_core::ops::first_argmax(logits) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temp: f32) -> SamplerParams {
        SamplerParams { temp, seed: Some(7), ..Default::default() }
    }

    /// The normalizer equals a float64 log-sum-exp over a vocabulary-sized row.
    #[test]
    fn logprobs_normalize_like_float64() {
        let logits: Vec<f32> = (0..49_157).map(|i| ((i as f32 * 0.618).sin() * 12.0) - (i % 7) as f32).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want = logits.iter().map(|l| f64::from(l - max).exp()).sum::<f64>().ln() + f64::from(max);
        let (lp, top) = logprobs(&logits, 3, 2);
        assert!((f64::from(lp) - (f64::from(logits[3]) - want)).abs() < 1e-5, "{lp}");
        let total: f64 = logits.iter().map(|l| (f64::from(*l) - want).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9 && top.len() == 2);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]), 1);
        // As the GPU's pick: a NaN never wins, the first of equal largest values does.
        assert_eq!(argmax(&[f32::NAN, 0.5, 2.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
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

    /// The candidates from a sorted prefix equal those of sorting the whole vocabulary, for
    /// every filter alone and together, on vocabulary-sized rows peaked and flat.
    #[test]
    fn filtered_candidates_equal_a_full_sort() {
        let full = |p: &SamplerParams, logits: &[f32]| -> Vec<u32> {
            let log_z = lmx_core::cpu_fused::log_sum_exp(logits);
            let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, l)| (i as u32, l - log_z)).collect();
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if p.top_k > 0 {
                cand.truncate(p.top_k);
            }
            if p.top_p > 0.0 && p.top_p < 1.0 {
                let mut mass = 0.0;
                let n = cand
                    .iter()
                    .take_while(|(_, lp)| {
                        let before = mass;
                        mass += lp.exp();
                        before < p.top_p
                    })
                    .count()
                    .max(1);
                cand.truncate(n);
            }
            if p.min_p > 0.0 {
                let threshold = cand[0].1 + p.min_p.ln();
                let n = cand.iter().filter(|(_, lp)| *lp >= threshold).count().max(p.min_tokens_to_keep).min(cand.len());
                cand.truncate(n);
            }
            let mut ids: Vec<u32> = cand.into_iter().map(|c| c.0).collect();
            ids.sort();
            ids
        };
        for spread in [0.5f32, 4.0, 20.0] {
            let logits: Vec<f32> = (0..49_152).map(|i| ((i as f32 * 0.7548).sin() + (i as f32 * 0.0123).cos()) * spread).collect();
            for (top_k, top_p, min_p) in [(0, 0.9, 0.0), (0, 0.99, 0.0), (40, 0.0, 0.0), (1000, 0.95, 0.0), (0, 0.0, 0.05), (0, 0.95, 0.1), (50, 0.9, 0.05)] {
                let p = SamplerParams { top_k, top_p, min_p, ..params(1.0) };
                let mut got: Vec<u32> = p.candidates(&logits).into_iter().map(|c| c.0).collect();
                got.sort();
                assert_eq!(got, full(&p, &logits), "spread {spread}, top_k {top_k}, top_p {top_p}, min_p {min_p}");
            }
        }
    }

    /// MLX LM's processors in its order: bias, repetition, presence (once per distinct
    /// token), frequency (once per occurrence), each over its own window.
    #[test]
    fn logits_processors_follow_mlx_lm() {
        let p = SamplerParams {
            logit_bias: vec![(2, 1.5), (9, 7.0)],
            repetition_penalty: Some(2.0),
            repetition_context_size: 2,
            presence_penalty: Some(0.5),
            frequency_penalty: Some(0.25),
            ..params(0.0)
        };
        let s = Sampler::new(p.clone());
        let mut logits = [4.0f32, -1.0, 3.0, 0.0];
        // Recent: 0 0 1 2 2 (repetition sees the last 2: token 2 only).
        s.penalize(&mut logits, &[0, 0, 1, 2, 2]);
        // token 0: presence 0.5 + frequency 2 x 0.25 -> 3.0
        // token 1: presence 0.5 + frequency 0.25 -> -1.75
        // token 2: bias 1.5 -> 4.5, repetition / 2 -> 2.25, presence, frequency 2x -> 1.25
        assert_eq!(logits, [3.0, -1.75, 1.25, 0.0]);
        assert!(p.validate().is_ok());
        let bad = SamplerParams { logit_bias: vec![(0, f32::NAN)], ..params(0.0) };
        assert!(bad.validate().is_err());
        let bad = SamplerParams { frequency_penalty: Some(f32::INFINITY), ..params(0.0) };
        assert!(bad.validate().is_err());
    }

    /// Log-probabilities against a direct log-softmax; the top tokens sorted, most likely first.
    #[test]
    fn logprobs_are_log_softmax_with_the_top_tokens() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY, 0.5];
        let z: f32 = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        let (lp, top) = logprobs(&logits, 2, 3);
        assert!((lp - (2.0 - z)).abs() < 1e-6);
        let ids: Vec<u32> = top.iter().map(|(t, _)| *t).collect();
        assert_eq!(ids, vec![1, 2, 0]);
        assert!((top[0].1 - (3.0 - z)).abs() < 1e-6);
        assert_eq!(logprobs(&logits, 3, 0), (f32::NEG_INFINITY, vec![]));
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let s = Sampler::new(SamplerParams { repetition_penalty: Some(2.0), ..params(0.0) });
        let mut logits = [4.0f32, -1.0, 3.0];
        s.penalize(&mut logits, &[0, 1, 0]);
        assert_eq!(logits, [2.0, -2.0, 3.0]);
    }
}
