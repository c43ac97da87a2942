//! Fusing trained adapters into the weights (`mlx_lm.fuse`):
//!
//! - LoRA: `W' = W + (scale * lora_b^T) @ lora_a^T`; on stacked experts (MLX's
//!   `LoRASwitchLinear`, `lora_a` (experts, r, in), `lora_b` (experts, out, r)) per expert
//!   `W'_e = W_e + scale * lora_b_e @ lora_a_e`.
//! - DoRA: the same `W'`, then each row rescaled to the learned magnitude: `W' * m / ||W'||_row`.
//! - Full: the trained tensors replace the checkpoint's.
//!
//! Which modules an adapter folder covers is decided as when it is loaded for generation or
//! training (`lmx_nn::AdapterPlan`: the last `num_layers` layers, the modules in
//! `lora_parameters.keys`); adapter tensors outside that scope are an error, not applied.
//! A quantized layer is dequantized, fused (or replaced by its fully trained weight) and
//! quantized again with its own bits and group size (MLX's quantizer, so the result is what
//! `mlx_lm.fuse` writes), unless `--dequantize`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use lmx_core::quant::QuantizedMatrix;
use lmx_core::{DType, Tensor};
use lmx_io::{AdapterConfig, FineTuneType, QuantConfig, QuantSpec};
use lmx_nn::AdapterPlan;

use crate::ConvertError;

/// `lmx fuse` options.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// The adapter folder (adapter_config.json + adapters.safetensors).
    pub adapter_dir: PathBuf,
    /// Write float weights even where the base model is quantized.
    pub dequantize: bool,
}

/// The adapters of one folder, ready to apply key by key.
pub struct Fuser {
    config: AdapterConfig,
    /// Which modules the folder covers (as at load time).
    plan: AdapterPlan,
    tensors: HashMap<String, Tensor>,
    /// Adapter tensors applied so far (all must be, or the adapter belongs to another model).
    used: BTreeSet<String>,
    source: PathBuf,
}

impl Fuser {
    /// Reads the adapter folder, for a model of `n_layers` layers.
    pub fn new(dir: &Path, n_layers: usize) -> Result<Self, ConvertError> {
        let (config, tensors) = lmx_io::adapters::load_adapter_dir(dir)?;
        let config_path = dir.join(lmx_io::adapters::ADAPTER_CONFIG);
        if config.fine_tune_type != FineTuneType::Full && config.lora_parameters.is_none() {
            return Err(ConvertError::Adapter { path: config_path, msg: "`lora_parameters` is missing".into() });
        }
        let params = config.lora_parameters.clone().unwrap_or_default();
        let plan = AdapterPlan::new(config.fine_tune_type, config.num_layers, n_layers, params, 0).map_err(|e| ConvertError::Adapter { path: config_path, msg: e.to_string() })?;
        Ok(Self { config, plan, tensors, used: BTreeSet::new(), source: dir.join(lmx_io::adapters::ADAPTER_FILE) })
    }

    /// True when `module` (e.g. `model.layers.3.mlp.up_proj`) has a LoRA/DoRA adapter in the
    /// folder's scope.
    pub fn adapts(&self, module: &str) -> bool {
        self.plan.targets(module) && self.tensors.contains_key(&format!("{module}.lora_a"))
    }

    /// True when `module`'s weight is rewritten: fused with its adapter, or replaced by its
    /// fully trained value.
    pub fn rewrites(&self, module: &str) -> bool {
        self.adapts(module) || self.replaces(&format!("{module}.weight"))
    }

    fn replaces(&self, key: &str) -> bool {
        self.tensors.contains_key(key) && self.plan.full_trains(key)
    }

    /// The trained replacement of checkpoint tensor `key` (full fine-tuning), if any.
    pub fn replacement(&mut self, key: &str) -> Option<Tensor> {
        if !self.replaces(key) {
            return None;
        }
        self.used.insert(key.to_string());
        self.tensors.get(key).cloned()
    }

    /// The new float weight of a module that [`Fuser::rewrites`]: its fully trained value, or
    /// `base()` (the float base weight) fused with the adapter.
    pub fn rewrite(&mut self, module: &str, base: impl FnOnce() -> Result<Tensor, ConvertError>) -> Result<Tensor, ConvertError> {
        match self.replacement(&format!("{module}.weight")) {
            Some(t) => Ok(t.to_dtype(DType::F32)?),
            None => self.fuse(module, &base()?),
        }
    }

    fn take(&mut self, key: String) -> Result<Tensor, ConvertError> {
        let t = self.tensors.get(&key).cloned().ok_or_else(|| ConvertError::Adapter { path: self.source.clone(), msg: format!("`{key}` is missing") })?;
        self.used.insert(key);
        Ok(t.to_dtype(DType::F32)?)
    }

    /// The fused float weight (out, in) of an adapted `module` from its base weight `w`.
    pub fn fuse(&mut self, module: &str, w: &Tensor) -> Result<Tensor, ConvertError> {
        let scale = self.config.lora_parameters.as_ref().map_or(1.0, |p| p.scale);
        let a = self.take(format!("{module}.lora_a"))?;
        let b = self.take(format!("{module}.lora_b"))?;
        let w = w.to_dtype(DType::F32)?;
        let misfit = |w: &Tensor| {
            let msg = format!("`{module}` adapters have shapes {:?} and {:?}, which do not fit a {:?} weight", a.dims(), b.dims(), w.dims());
            ConvertError::Adapter { path: self.source.clone(), msg }
        };
        if let [experts, out, inp] = *w.dims() {
            // Stacked experts (MLX's LoRASwitchLinear): lora_a (experts, r, in), lora_b
            // (experts, out, r); each expert's W_e + scale * lora_b_e @ lora_a_e.
            let r = a.dims().get(1).copied().unwrap_or(0);
            if a.dims() != [experts, r, inp] || b.dims() != [experts, out, r] {
                return Err(misfit(&w));
            }
            if self.config.fine_tune_type == FineTuneType::Dora {
                return Err(ConvertError::Adapter { path: self.source.clone(), msg: format!("`{module}` holds stacked experts, which take LoRA only, not DoRA") });
            }
            return Ok((&w + (b.matmul(&a)? * scale)?)?);
        }
        let (out, inp) = w.dims2()?;
        if a.dims() != [inp, a.dim(1)?] || b.dims() != [a.dim(1)?, out] {
            return Err(misfit(&w));
        }
        let fused = (&w + (b.t()?.matmul(&a.t()?)? * scale)?)?;
        if self.config.fine_tune_type != FineTuneType::Dora {
            return Ok(fused);
        }
        let m = self.take(format!("{module}.m"))?;
        let norms = fused.sqr()?.sum_keepdim(1)?.sqrt()?;
        Ok(fused.broadcast_mul(&(m.reshape((out, 1))? / norms)?)?)
    }

    /// Checks that every adapter tensor was applied and every `keys` entry matched a module.
    pub fn finish(&self) -> Result<(), ConvertError> {
        let mut unused: Vec<&String> = self.tensors.keys().filter(|k| !self.used.contains(*k)).collect();
        unused.sort();
        if let Some(k) = unused.first() {
            return Err(ConvertError::Adapter {
                path: self.source.clone(),
                msg: format!(
                    "{} adapter tensor(s) match no layer this adapter covers (num_layers {}, lora_parameters.keys {}), e.g. `{k}`: was it trained on another base model, or with other settings?",
                    unused.len(),
                    self.config.num_layers,
                    self.config.lora_parameters.as_ref().and_then(|p| p.keys.as_ref()).map_or("(all linear layers)".to_string(), |k| format!("{k:?}"))
                ),
            });
        }
        self.plan.finish().map_err(|e| ConvertError::Adapter { path: self.source.with_file_name(lmx_io::adapters::ADAPTER_CONFIG), msg: e.to_string() })
    }
}

/// The checkpoint tensors of a quantized module: `weight`, `scales`, `biases`.
pub fn quantized_tensors(w: &Tensor, spec: QuantSpec, dtype: DType) -> Result<[Tensor; 3], ConvertError> {
    if w.rank() == 3 {
        // Stacked experts: each expert's matrix, stacked again.
        let parts = (0..w.dims()[0]).map(|e| quantized_tensors(&w.get(e)?, spec, dtype)).collect::<Result<Vec<_>, _>>()?;
        let stack = |i: usize| Tensor::stack(&parts.iter().map(|p| &p[i]).collect::<Vec<_>>(), 0);
        return Ok([stack(0)?, stack(1)?, stack(2)?]);
    }
    let q = QuantizedMatrix::quantize(&w.to_dtype(dtype)?, spec.bits, spec.group_size)?;
    let (p, s, b) = q.to_tensors()?;
    Ok([p, s, b])
}

/// How `module` is quantized in a model with quantization block `q`, when its `scales` exist:
/// its spec, and whether it is MXFP4 (else MLX's affine format).
pub fn module_spec(q: Option<&QuantConfig>, module: &str, has_scales: bool) -> Option<(QuantSpec, bool)> {
    q.and_then(|q| q.for_module(module, has_scales)).map(|(spec, mode)| (spec, mode == "mxfp4"))
}
