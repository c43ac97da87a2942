//! Training state: the tensors that train (variables on candle's gradient tape), whether a
//! forward pass is a training one (dropout on) and how its layers are checkpointed. The
//! trainer owns it; the layer builder registers variables in it while the model is built, and
//! layers only read it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lmx_core::{Result, Tensor, TensorId, Var};

/// Where recomputed (checkpointed) layers leave the gradients of the trained tensors.
#[derive(Debug, Default)]
pub struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl GradSink {
    pub(crate) fn add(&self, id: TensorId, g: Tensor) -> Result<()> {
        let mut map = self.grads.lock().unwrap_or_else(|e| e.into_inner());
        let sum = match map.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        map.insert(id, sum);
        Ok(())
    }

    /// The gradient collected for `var` since the last call, if any (removed from the sink).
    pub fn take(&self, var: &Var) -> Option<Tensor> {
        self.grads.lock().unwrap_or_else(|e| e.into_inner()).remove(&var.as_tensor().id())
    }
}

/// Gradient checkpointing of the trained decoder layers.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    /// Layers from this index on are checkpointed (the ones with trained tensors).
    pub first_layer: usize,
    /// Every trained tensor.
    pub vars: Arc<Vec<Var>>,
    /// Where their gradients go.
    pub sink: Arc<GradSink>,
}

/// The training state of one model (see the module docs).
#[derive(Debug, Default)]
pub struct Training {
    vars: Mutex<Vec<(String, Var)>>,
    active: AtomicBool,
    checkpointing: Mutex<Option<Checkpointing>>,
}

impl Training {
    /// Empty: nothing registered, evaluation mode.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `t` a variable recorded under checkpoint key `key`; returns the variable's tensor.
    pub fn register(&self, key: &str, t: Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(&t.detach())?;
        let out = var.as_tensor().clone();
        self.vars.lock().unwrap_or_else(|e| e.into_inner()).push((key.to_string(), var));
        Ok(out)
    }

    /// The trained tensors, by key, sorted.
    pub fn trainables(&self) -> Vec<(String, Var)> {
        let mut v = self.vars.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Switches between training forwards (dropout, checkpointing) and evaluation.
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Relaxed);
    }

    /// True between `set_active(true)` and `set_active(false)`.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Checkpoints every decoder layer from the first one holding a trained tensor on, in
    /// training forwards; returns the settings (their sink collects the gradients).
    pub fn enable_checkpointing(&self) -> Checkpointing {
        let vars = self.trainables();
        // No trained tensor inside a layer (e.g. only `lm_head`): no layer is checkpointed.
        let first_layer = vars.iter().filter_map(|(k, _)| layer_index(k)).min().unwrap_or(usize::MAX);
        let ck = Checkpointing { first_layer, vars: Arc::new(vars.into_iter().map(|(_, v)| v).collect()), sink: Arc::new(GradSink::default()) };
        *self.checkpointing.lock().unwrap_or_else(|e| e.into_inner()) = Some(ck.clone());
        ck
    }

    /// The checkpointing settings, when enabled and in a training forward.
    pub fn checkpointing(&self) -> Option<Checkpointing> {
        if !self.is_active() {
            return None;
        }
        self.checkpointing.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The name under which expert `e`'s slice of the stacked tensor `key` trains (`key[e]`), or
/// `key` itself for a tensor of its own.
pub fn part_key(key: &str, expert: Option<(usize, usize)>) -> String {
    match expert {
        Some((e, _)) => format!("{key}[{e}]"),
        None => key.to_string(),
    }
}

/// The trained tensors as they are saved: experts' slices (`key[e]`, [`part_key`]) stacked
/// back into `key` along a leading expert dimension (every expert must be there), the others
/// as they are.
pub fn checkpoint_tensors(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut parts: HashMap<&str, Vec<(usize, Tensor)>> = HashMap::new();
    for (k, v) in vars {
        let part = k.strip_suffix(']').and_then(|s| s.rsplit_once('[')).and_then(|(base, e)| Some((base, e.parse::<usize>().ok()?)));
        match part {
            Some((base, e)) => parts.entry(base).or_default().push((e, v.as_tensor().detach())),
            None => {
                out.insert(k.clone(), v.as_tensor().detach());
            }
        }
    }
    for (base, mut slices) in parts {
        slices.sort_by_key(|(e, _)| *e);
        if slices.iter().enumerate().any(|(i, (e, _))| i != *e) {
            lmx_core::bail!("the trained slices of `{base}` do not cover every expert (an expert-parallel rank holds only some)");
        }
        let stacked = Tensor::stack(&slices.iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)?;
        out.insert(base.to_string(), stacked);
    }
    Ok(out)
}

/// The layer index of a `model.layers.<i>.` key.
pub(crate) fn layer_index(key: &str) -> Option<usize> {
    key.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}
