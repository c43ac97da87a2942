//! Rotary position embeddings: the inverse frequencies (plain, linear-scaled, Llama 3's
//! frequency-dependent scaling, LongRoPE's per-frequency factors or YaRN's ramp), and cos/sin
//! for the positions of one forward pass.

use lmx_core::{DType, Device, Result, Tensor};

use crate::error::BuildError;
use serde::Deserialize;

/// `rope_scaling` from config.json (transformers v4, MLX LM), or `rope_parameters`
/// (transformers v5, which also moves `rope_theta` inside it).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeScaling {
    /// `rope_type` (older configs call it `type`): `default`, `linear` or `llama3`.
    #[serde(alias = "type", default = "default_type")]
    pub rope_type: String,
    /// The base (transformers v5 `rope_parameters` only).
    pub rope_theta: Option<f64>,
    /// Scaling factor.
    #[serde(default = "one")]
    pub factor: f64,
    /// Llama 3: wavelengths above original/low_freq_factor are fully scaled.
    pub low_freq_factor: Option<f64>,
    /// Llama 3: wavelengths below original/high_freq_factor are not scaled.
    pub high_freq_factor: Option<f64>,
    /// Llama 3: the context length the model was trained with before scaling.
    pub original_max_position_embeddings: Option<f64>,
    /// LongRoPE (Phi-3.5/4): per-frequency divisors for contexts beyond the original one.
    pub long_factor: Option<Vec<f64>>,
    /// LongRoPE: the divisors within the original context (transformers' choice there;
    /// lmx uses `long_factor` at every length, as MLX LM does, so cached keys never change).
    pub short_factor: Option<Vec<f64>>,
    /// LongRoPE: cos and sin are multiplied by this (default from the context ratio).
    pub attention_factor: Option<f64>,
    /// The fraction of each head's features that rotate (transformers v5 keeps it here).
    pub partial_rotary_factor: Option<f64>,
    /// YaRN: frequencies turning fewer times than this over the original context are
    /// interpolated...
    pub beta_fast: Option<f64>,
    /// ... and those turning more than this are kept (a linear ramp between).
    pub beta_slow: Option<f64>,
    /// YaRN (DeepSeek): the attention factor is `mscale(factor, mscale) / mscale(factor,
    /// mscale_all_dim)` when both are given.
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// YaRN: round the ramp's ends to whole dimensions (transformers' default; gpt-oss says
    /// false. MLX LM always rounds).
    pub truncate: Option<bool>,
}

fn one() -> f64 {
    1.0
}

fn default_type() -> String {
    "default".into()
}

/// The rotary embedding keys of config.json: `rope_theta` + `rope_scaling` (transformers v4,
/// MLX LM) or `rope_parameters` (transformers v5). A model file's `Config` flattens this in.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeConfig {
    /// The base.
    pub rope_theta: Option<f64>,
    /// Scaling (v4 spelling).
    pub rope_scaling: Option<RopeScaling>,
    /// Base and scaling (v5 spelling).
    pub rope_parameters: Option<RopeScaling>,
}

/// Rotary embedding for one model: inverse frequencies of half the head dimension.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Tensor,
    dtype: DType,
    /// cos and sin are multiplied by this (1 but for LongRoPE).
    mscale: f64,
}

impl Rope {
    /// The rotary embedding a config.json describes, in either spelling. `default_theta`
    /// applies when neither names a base.
    pub fn from_config(cfg: &RopeConfig, default_theta: f64, head_dim: usize, dtype: DType, device: &Device) -> std::result::Result<Self, BuildError> {
        let rope_parameters = cfg.rope_parameters.as_ref();
        let scaling = cfg.rope_scaling.as_ref().or(rope_parameters);
        let theta = cfg.rope_theta.or(rope_parameters.and_then(|p| p.rope_theta)).unwrap_or(default_theta);
        Self::new(theta, head_dim, scaling, dtype, device)
    }

    /// Inverse frequencies as transformers computes them for `rope_theta`, `head_dim` and the
    /// optional scaling. An unknown `rope_type` is an error naming it.
    pub fn new(theta: f64, head_dim: usize, scaling: Option<&RopeScaling>, dtype: DType, device: &Device) -> std::result::Result<Self, BuildError> {
        let mut inv: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)).collect();
        match scaling.map(|s| s.rope_type.as_str()) {
            None | Some("default") => {}
            Some("linear") => {
                let f = scaling.map_or(1.0, |s| s.factor);
                inv.iter_mut().for_each(|x| *x /= f);
            }
            Some("llama3") => {
                let Some(s) = scaling else { return Err(BuildError::unsupported("llama3 rope scaling without parameters")) };
                let low = s.low_freq_factor.unwrap_or(1.0);
                let high = s.high_freq_factor.unwrap_or(4.0);
                let orig = s.original_max_position_embeddings.unwrap_or(8192.0);
                let (low_wavelen, high_wavelen) = (orig / low, orig / high);
                for x in inv.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *x;
                    if wavelen > low_wavelen {
                        *x /= s.factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (orig / wavelen - low) / (high - low);
                        *x = (1.0 - smooth) * *x / s.factor + smooth * *x;
                    }
                }
            }
            Some("longrope" | "su") => {
                let long = scaling.and_then(|s| s.long_factor.as_ref());
                match long {
                    Some(f) if f.len() == inv.len() && f.iter().all(|x| x.is_finite() && *x > 0.0) => inv.iter_mut().zip(f).for_each(|(x, f)| *x /= f),
                    _ => {
                        return Err(BuildError::ConfigValue {
                            key: "rope_scaling.long_factor",
                            value: format!("{long:?}"),
                            allowed: "one positive factor per rotated frequency (head_dim * partial_rotary_factor / 2)",
                        })
                    }
                }
            }
            Some("yarn") => {
                let Some(s) = scaling else { return Err(BuildError::unsupported("yarn rope scaling without parameters")) };
                let Some(orig) = s.original_max_position_embeddings else {
                    return Err(BuildError::ConfigValue { key: "rope_scaling.original_max_position_embeddings", value: "none".into(), allowed: "the context length before YaRN scaling" });
                };
                let mscale = yarn(&mut inv, theta, head_dim, orig, s);
                return Self::from_inv(inv, dtype, device).map(|r| r.with_mscale(mscale));
            }
            Some(other) => return Err(BuildError::unsupported_with(format!("rope_scaling type `{other}`"), "supported: default, linear, llama3, longrope, yarn")),
        }
        Self::from_inv(inv, dtype, device)
    }

    fn from_inv(inv: Vec<f64>, dtype: DType, device: &Device) -> std::result::Result<Self, BuildError> {
        let inv: Vec<f32> = inv.into_iter().map(|x| x as f32).collect();
        let n = inv.len();
        Ok(Self { inv_freq: Tensor::from_vec(inv, (1, n), device)?, dtype, mscale: 1.0 })
    }

    /// The same rotation with cos and sin multiplied by `mscale` (LongRoPE's attention factor).
    pub fn with_mscale(mut self, mscale: f64) -> Self {
        self.mscale = mscale;
        self
    }

    /// cos and sin, each (seq_len, head_dim / 2), for positions `offset..offset + seq_len`,
    /// computed in f32 and cast to the model dtype as transformers does.
    pub fn cos_sin(&self, offset: usize, seq_len: usize) -> Result<(Tensor, Tensor)> {
        self.angles(&Tensor::arange(offset as u32, (offset + seq_len) as u32, self.inv_freq.device())?)
    }

    /// cos and sin, each (1, head_dim / 2), for the one position the u32 tensor `pos` (1,)
    /// holds on the device (a captured decode step replays at every position).
    pub fn cos_sin_at(&self, pos: &Tensor) -> Result<(Tensor, Tensor)> {
        self.angles(pos)
    }

    /// cos and sin for the positions `pos` (n,) u32.
    fn angles(&self, pos: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = pos.elem_count();
        let freqs = pos.to_dtype(DType::F32)?.reshape((n, 1))?.broadcast_mul(&self.inv_freq)?;
        let (cos, sin) = if self.mscale == 1.0 { (freqs.cos()?, freqs.sin()?) } else { ((freqs.cos()? * self.mscale)?, (freqs.sin()? * self.mscale)?) };
        Ok((cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?))
    }
}

/// YaRN (transformers' `_compute_yarn_parameters`): each inverse frequency of `inv` (for
/// `dim` rotated features) blends its interpolated (divided by the factor) and original
/// values by a linear ramp over the dimensions whose rotations over the original context lie
/// between `beta_slow` and `beta_fast`. Returns the attention factor cos and sin are scaled by.
fn yarn(inv: &mut [f64], base: f64, dim: usize, orig: f64, s: &RopeScaling) -> f64 {
    let factor = s.factor;
    let get_mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
    let attention = s.attention_factor.unwrap_or_else(|| match (s.mscale, s.mscale_all_dim) {
        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => get_mscale(m) / get_mscale(all),
        _ => get_mscale(1.0),
    });
    let d = dim as f64;
    let correction = |rotations: f64| d * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
    let (mut low, mut high) = (correction(s.beta_fast.unwrap_or(32.0)), correction(s.beta_slow.unwrap_or(1.0)));
    if s.truncate.unwrap_or(true) {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    for (i, x) in inv.iter_mut().enumerate() {
        // The share of the original frequency (1 below `low`, 0 above `high`).
        let keep = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
        *x = *x / factor * (1.0 - keep) + *x * keep;
    }
    attention
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inverse frequencies and attention factors transformers 5.24 computes for gpt-oss's YaRN
    /// (unrounded ramp) and DeepSeek-V3's (rounded, with mscale / mscale_all_dim).
    #[test]
    fn yarn_matches_transformers() -> std::result::Result<(), BuildError> {
        let gpt_oss = RopeScaling {
            rope_type: "yarn".into(),
            factor: 32.0,
            beta_fast: Some(32.0),
            beta_slow: Some(1.0),
            truncate: Some(false),
            original_max_position_embeddings: Some(4096.0),
            ..Default::default()
        };
        let deepseek = RopeScaling { rope_type: "yarn".into(), factor: 40.0, mscale: Some(1.0), mscale_all_dim: Some(0.707), original_max_position_embeddings: Some(4096.0), ..Default::default() };
        let cases = [
            (150_000.0, &gpt_oss, 1.3465735902799727, [1.0, 0.15532298386096954, 0.019334999844431877, 0.0004564839182421565, 1.818833698052913e-05, 3.023511396804679e-07]),
            (10_000.0, &deepseek, 1.0857263992561355, [1.0, 0.23713736236095428, 0.05623412877321243, 0.005500000435858965, 0.0007905694073997438, 3.3338035336782923e-06]),
        ];
        for (theta, s, attention, want) in cases {
            let rope = Rope::new(theta, 64, Some(s), DType::F32, &Device::Cpu)?;
            assert!((rope.mscale - attention).abs() < 1e-12, "{} vs {attention}", rope.mscale);
            let inv = rope.inv_freq.flatten_all()?.to_vec1::<f32>()?;
            for (i, w) in [0, 5, 10, 16, 20, 31].into_iter().zip(want) {
                assert!((f64::from(inv[i]) - w).abs() <= 1e-6 * w, "inv_freq[{i}] {} vs {w}", inv[i]);
            }
        }
        Ok(())
    }

    #[test]
    fn llama3_scaling_matches_transformers_formula() -> std::result::Result<(), BuildError> {
        // Llama 3.1 8B: theta 500000, head_dim 128, factor 8, low 1, high 4, original 8192.
        let s = RopeScaling {
            rope_type: "llama3".into(),
            rope_theta: None,
            factor: 8.0,
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192.0),
            ..Default::default()
        };
        let rope = Rope::new(500_000.0, 128, Some(&s), DType::F32, &Device::Cpu)?;
        let inv = rope.inv_freq.flatten_all()?.to_vec1::<f32>()?;
        // High frequencies are untouched, the lowest are divided by the factor.
        assert_eq!(inv[0], 1.0);
        let plain_last = 1.0 / 500_000f64.powf(126.0 / 128.0);
        assert!((inv[63] as f64 - plain_last / 8.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn cos_sin_at_offset() -> std::result::Result<(), BuildError> {
        let rope = Rope::new(10_000.0, 4, None, DType::F32, &Device::Cpu)?;
        let (cos, sin) = rope.cos_sin(3, 2)?;
        let cos = cos.to_vec2::<f32>()?;
        let sin = sin.to_vec2::<f32>()?;
        assert!((cos[0][0] - 3f32.cos()).abs() < 1e-6 && (sin[1][0] - 4f32.sin()).abs() < 1e-6);
        assert!((cos[1][1] - (4.0f32 / 100.0).cos()).abs() < 1e-6);
        Ok(())
    }
}
