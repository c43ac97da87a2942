//! Optimizers and learning-rate schedules with `mlx.optimizers` semantics, so a config written
//! for `mlx_lm.lora` trains the same way here.
//!
//! - Adam: `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`, `p -= lr m / (sqrt(v) + eps)`;
//!   MLX's default has no bias correction (`bias_correction: true` adds it).
//! - AdamW: Adam after `p *= 1 - lr * weight_decay` (default 0.01).
//! - SGD: optional weight decay, momentum, dampening and Nesterov.
//! - The learning rate of update k (from 0) is `schedule(k)`.

use std::collections::BTreeMap;

use lmx::core::{Result, Tensor, Var};
use serde_json::Value;

use crate::TuneError;

/// Which optimizer, with its settings (`optimizer_config.<name>` in MLX LM's YAML).
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerKind {
    /// `adam` / `adamw` (weight_decay > 0 for AdamW).
    Adam { betas: (f64, f64), eps: f64, weight_decay: f64, bias_correction: bool },
    /// `sgd`.
    Sgd { momentum: f64, weight_decay: f64, dampening: f64, nesterov: bool },
}

impl OptimizerKind {
    /// Builds `name` (adam, adamw, sgd) from its YAML settings; unknown settings and other
    /// optimizers are errors naming them.
    pub fn from_config(name: &str, settings: &BTreeMap<String, Value>) -> std::result::Result<Self, TuneError> {
        let num = |key: &str, default: f64| -> std::result::Result<f64, TuneError> {
            match settings.get(key) {
                None => Ok(default),
                Some(v) => crate::config::as_number(v).ok_or_else(|| TuneError::Setting { key: format!("optimizer_config.{name}.{key}"), msg: "must be a number".into() }),
            }
        };
        let flag = |key: &str| settings.get(key).and_then(Value::as_bool).unwrap_or(false);
        let allowed: &[&str] = match name {
            "adam" | "adamw" => &["betas", "eps", "weight_decay", "bias_correction"],
            "sgd" => &["momentum", "weight_decay", "dampening", "nesterov"],
            other => return Err(TuneError::Unsupported { what: format!("optimizer `{other}`"), hint: "; supported: adam, adamw, sgd".into() }),
        };
        if let Some(k) = settings.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(TuneError::Setting { key: format!("optimizer_config.{name}"), msg: format!("unknown setting `{k}` (known: {})", allowed.join(", ")) });
        }
        Ok(match name {
            "sgd" => Self::Sgd { momentum: num("momentum", 0.0)?, weight_decay: num("weight_decay", 0.0)?, dampening: num("dampening", 0.0)?, nesterov: flag("nesterov") },
            _ => {
                let betas = match settings.get("betas").and_then(Value::as_array) {
                    Some(b) if b.len() == 2 => (crate::config::as_number(&b[0]).unwrap_or(0.9), crate::config::as_number(&b[1]).unwrap_or(0.999)),
                    Some(_) => return Err(TuneError::Setting { key: format!("optimizer_config.{name}.betas"), msg: "must be a list of two numbers".into() }),
                    None => (0.9, 0.999),
                };
                let wd_default = if name == "adamw" { 0.01 } else { 0.0 };
                Self::Adam { betas, eps: num("eps", 1e-8)?, weight_decay: num("weight_decay", wd_default)?, bias_correction: flag("bias_correction") }
            }
        })
    }
}

/// An optimizer over a fixed list of variables.
pub struct Optimizer {
    kind: OptimizerKind,
    /// Per variable: Adam's moments (2, ..shape: m, then v) or SGD's velocity.
    state: Vec<Option<Tensor>>,
    step: usize,
}

impl Optimizer {
    /// A fresh optimizer for `n` variables.
    pub fn new(kind: OptimizerKind, n: usize) -> Self {
        Self { kind, state: vec![None; n], step: 0 }
    }

    /// Updates completed so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Applies one update with learning rate `lr`; `grads[i]` belongs to `vars[i]` (None: the
    /// variable got no gradient and is left alone).
    pub fn update(&mut self, vars: &[&Var], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = grad else { continue };
            let p = var.as_tensor().detach();
            let new_p = match self.kind {
                OptimizerKind::Adam { betas: (b1, b2), eps, weight_decay, bias_correction } => {
                    let moments = match self.state[i].take() {
                        Some(s) => s,
                        None => Tensor::zeros([&[2], p.dims()].concat(), p.dtype(), p.device())?,
                    };
                    let keep = if weight_decay > 0.0 { 1.0 - lr * weight_decay } else { 1.0 };
                    let (step, c2) = if bias_correction { (lr / (1.0 - b1.powi(t)), 1.0 / (1.0 - b2.powi(t)).sqrt()) } else { (lr, 1.0) };
                    let (new_p, moments) = lmx::core::ops::adam_step(&p, g, &moments, [keep, b1, b2, step, c2, eps])?;
                    self.state[i] = Some(moments);
                    new_p
                }
                OptimizerKind::Sgd { momentum, weight_decay, dampening, nesterov } => {
                    let g = if weight_decay != 0.0 { (g + (&p * weight_decay)?)? } else { g.clone() };
                    if momentum <= 0.0 {
                        (p - (g * lr)?)?
                    } else {
                        let v0 = match self.state[i].take() {
                            Some(v) => v,
                            None => p.zeros_like()?,
                        };
                        let v = ((v0 * momentum)? + (&g * (1.0 - dampening))?)?;
                        let upd = if nesterov { (g + (&v * momentum)?)? } else { v.clone() };
                        self.state[i] = Some(v);
                        (p - (upd * lr)?)?
                    }
                }
            };
            var.set(&new_p)?;
        }
        Ok(())
    }
}

/// A learning-rate schedule: a constant, or `mlx.optimizers.schedulers` by name with optional
/// linear warmup (MLX LM's `lr_schedule: {name, arguments, warmup, warmup_init}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    kind: ScheduleKind,
    warmup: usize,
    warmup_init: f64,
}

#[derive(Debug, Clone, PartialEq)]
enum ScheduleKind {
    Constant(f64),
    CosineDecay { init: f64, decay_steps: usize, end: f64 },
    Linear { init: f64, end: f64, steps: usize },
    Exponential { init: f64, rate: f64 },
    Step { init: f64, rate: f64, step_size: usize },
}

impl Schedule {
    /// A constant learning rate.
    pub fn constant(lr: f64) -> Self {
        Self { kind: ScheduleKind::Constant(lr), warmup: 0, warmup_init: 0.0 }
    }

    /// Builds MLX LM's `lr_schedule` mapping.
    pub fn from_config(v: &Value) -> std::result::Result<Self, TuneError> {
        let err = |m: &str| TuneError::Setting { key: "lr_schedule".into(), msg: m.to_string() };
        let name = v.get("name").and_then(Value::as_str).ok_or_else(|| err("needs a `name` (cosine_decay, linear_schedule, exponential_decay, step_decay)"))?;
        let args: Vec<f64> = v
            .get("arguments")
            .and_then(Value::as_array)
            .ok_or_else(|| err("needs `arguments`, a list"))?
            .iter()
            .map(|a| crate::config::as_number(a).filter(|x| x.is_finite()).ok_or_else(|| err("arguments must be finite numbers")))
            .collect::<std::result::Result<_, _>>()?;
        let arg = |i: usize, what: &str| args.get(i).copied().ok_or_else(|| err(&format!("`{name}` needs argument {} ({what})", i + 1)));
        let steps = |x: f64, what: &str| -> std::result::Result<usize, TuneError> {
            if x < 1.0 {
                Err(err(&format!("{what} must be at least 1")))
            } else {
                Ok(x as usize)
            }
        };
        let kind = match name {
            "cosine_decay" => ScheduleKind::CosineDecay { init: arg(0, "init")?, decay_steps: steps(arg(1, "decay_steps")?, "decay_steps")?, end: args.get(2).copied().unwrap_or(0.0) },
            "linear_schedule" => ScheduleKind::Linear { init: arg(0, "init")?, end: arg(1, "end")?, steps: steps(arg(2, "steps")?, "steps")? },
            "exponential_decay" => ScheduleKind::Exponential { init: arg(0, "init")?, rate: arg(1, "decay_rate")? },
            "step_decay" => ScheduleKind::Step { init: arg(0, "init")?, rate: arg(1, "decay_rate")?, step_size: steps(arg(2, "step_size")?, "step_size")? },
            other => return Err(err(&format!("unknown schedule `{other}` (supported: cosine_decay, linear_schedule, exponential_decay, step_decay)"))),
        };
        let warmup = v.get("warmup").and_then(Value::as_u64).unwrap_or(0) as usize;
        let warmup_init = v.get("warmup_init").and_then(crate::config::as_number).unwrap_or(0.0);
        if !warmup_init.is_finite() {
            return Err(err("warmup_init must be a finite number"));
        }
        Ok(Self { kind, warmup, warmup_init })
    }

    fn initial(&self) -> f64 {
        match self.kind {
            ScheduleKind::Constant(lr) => lr,
            ScheduleKind::CosineDecay { init, .. } | ScheduleKind::Linear { init, .. } | ScheduleKind::Exponential { init, .. } | ScheduleKind::Step { init, .. } => init,
        }
    }

    fn base(&self, step: usize) -> f64 {
        match self.kind {
            ScheduleKind::Constant(lr) => lr,
            ScheduleKind::CosineDecay { init, decay_steps, end } => {
                let s = step.min(decay_steps) as f64;
                let decay = 0.5 * (1.0 + (std::f64::consts::PI * s / decay_steps as f64).cos());
                end + decay * (init - end)
            }
            ScheduleKind::Linear { init, end, steps } => step.min(steps) as f64 * ((end - init) / steps as f64) + init,
            ScheduleKind::Exponential { init, rate } => init * rate.powi(step as i32),
            ScheduleKind::Step { init, rate, step_size } => init * rate.powi((step / step_size) as i32),
        }
    }

    /// The learning rate of update `step` (0-based). With warmup, MLX LM joins
    /// `linear_schedule(warmup_init, init, warmup)` and the schedule at step `warmup + 1`.
    pub fn at(&self, step: usize) -> f64 {
        if self.warmup == 0 {
            return self.base(step);
        }
        let boundary = self.warmup + 1;
        if step < boundary {
            let s = step.min(self.warmup) as f64;
            s * ((self.initial() - self.warmup_init) / self.warmup as f64) + self.warmup_init
        } else {
            self.base(step - boundary)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmx::core::{Device, Tensor};

    /// Values printed by mlx 0.32.4: `join_schedules([linear_schedule(1e-7, 1e-4, 3),
    /// cosine_decay(1e-4, 10, 1e-6)], [4])` at steps 0..8, and Adam/AdamW/SGD updates.
    #[test]
    fn schedules_match_mlx() -> std::result::Result<(), TuneError> {
        let s = Schedule::from_config(&serde_json::json!({"name": "cosine_decay", "arguments": [1e-4, 10, 1e-6], "warmup": 3, "warmup_init": 1e-7}))?;
        let want = [1e-7, 3.34e-5, 6.67e-5, 1e-4, 1e-4, 9.7577e-5, 9.0546e-5, 7.9595e-5, 6.5796e-5];
        for (i, w) in want.iter().enumerate() {
            assert!((s.at(i) - w).abs() < 1e-8 + 1e-3 * w, "step {i}: {} vs {w}", s.at(i));
        }
        assert!(Schedule::from_config(&serde_json::json!({"name": "cosine", "arguments": [1.0]})).is_err());
        Ok(())
    }

    #[test]
    fn optimizers_follow_mlx_update_rules() -> Result<()> {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev)?)?;
        let g = Tensor::new(&[0.5f32, 0.25], &dev)?;
        let mut adam = Optimizer::new(OptimizerKind::from_config("adam", &BTreeMap::new()).map_err(|e| lmx::core::Error::Msg(e.to_string()))?, 1);
        adam.update(&[&p], &[Some(g.clone())], 0.1)?;
        // m = 0.1 g, v = 0.001 g^2: update = lr * 0.1 g / (sqrt(0.001) |g| + eps) = 0.316 sign(g).
        let got = p.as_tensor().to_vec1::<f32>()?;
        assert!((got[0] - (1.0 - 0.316_227_7)).abs() < 1e-5 && (got[1] - (-2.0 - 0.316_227_7)).abs() < 1e-5, "{got:?}");
        let q = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev)?)?;
        let mut sgd = Optimizer::new(OptimizerKind::from_config("sgd", &BTreeMap::from([("momentum".to_string(), Value::from(0.9))])).map_err(|e| lmx::core::Error::Msg(e.to_string()))?, 1);
        sgd.update(&[&q], &[Some(g.clone())], 0.1)?;
        sgd.update(&[&q], &[Some(g)], 0.1)?;
        // v1 = g, v2 = 0.9 g + g = 1.9 g: p = p - 0.1 * 2.9 g.
        let got = q.as_tensor().to_vec1::<f32>()?;
        assert!((got[0] - (1.0 - 0.145)).abs() < 1e-6 && (got[1] - (-2.0 - 0.0725)).abs() < 1e-6, "{got:?}");
        assert!(OptimizerKind::from_config("adafactor", &BTreeMap::new()).is_err());
        assert!(OptimizerKind::from_config("adam", &BTreeMap::from([("lr".to_string(), Value::from(1))])).is_err());
        Ok(())
    }
}
