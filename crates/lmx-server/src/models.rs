//! The models a server answers for: the one it started with, and those `--allowed-models`
//! lets a request load by name (MLX LM's server loads any model a request names; lmx only
//! the listed ones, so a request cannot make the server read an arbitrary path). Each loaded
//! model has its own engine thread; at most `--max-loaded-models` stay loaded, the least
//! recently used leaving first (its requests in flight finish on it).

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use lmx::{Model, TokenizerWrapper};

use crate::engine::{Draft, Engine, EngineOptions};
use crate::grammar::Grammars;
use crate::ApiError;

/// Loads a model by the name a request gave (from `--allowed-models`).
pub type Loader = Arc<dyn Fn(&str) -> Result<(Model, TokenizerWrapper), String> + Send + Sync>;

/// A loaded model with its engine.
pub(crate) struct Served {
    /// The name it was loaded by (`--model`, or the allowed name a request used).
    pub id: String,
    /// Other names it answers to.
    pub aliases: Vec<String>,
    pub model: Arc<Model>,
    pub tokenizer: Arc<TokenizerWrapper>,
    pub engine: Engine,
    /// Grammars for constrained decoding over its vocabulary (or why there are none).
    pub grammars: Result<Grammars, String>,
}

impl Served {
    pub(crate) fn new(id: String, aliases: Vec<String>, model: Model, tokenizer: TokenizerWrapper, opts: &EngineOptions, draft: Option<Draft>) -> Self {
        let model = Arc::new(model);
        let tokenizer = Arc::new(tokenizer);
        let engine = Engine::start(model.clone(), tokenizer.clone(), opts.clone(), draft);
        let grammars = Grammars::new(tokenizer.clone(), model.vocab_size(), tokenizer.eos_token_ids());
        if let Err(e) = &grammars {
            eprintln!("[WARNING] {id}: structured output and required tool calls are unavailable: {e}");
        }
        Self { id, aliases, model, tokenizer, engine, grammars }
    }

    fn answers_to(&self, name: &str) -> bool {
        self.id == name || self.aliases.iter().any(|a| a == name)
    }
}

/// The loaded models and how to load more.
pub(crate) struct Models {
    /// Most recently used last.
    loaded: Mutex<Vec<Arc<Served>>>,
    default_id: String,
    default_aliases: Vec<String>,
    allowed: Vec<String>,
    max_loaded: usize,
    loader: Option<Loader>,
    /// One load at a time (a second request for the same model waits and finds it).
    loading: tokio::sync::Mutex<()>,
    engine: EngineOptions,
    /// The first model's draft model (a draft shares its model's tokenizer).
    draft: Option<Draft>,
}

impl Models {
    pub(crate) fn new(first: Served, allowed: Vec<String>, max_loaded: usize, loader: Option<Loader>, engine: EngineOptions, draft: Option<Draft>) -> Self {
        Self {
            default_id: first.id.clone(),
            default_aliases: first.aliases.clone(),
            loaded: Mutex::new(vec![Arc::new(first)]),
            allowed,
            max_loaded: max_loaded.max(1),
            loader,
            loading: tokio::sync::Mutex::new(()),
            // Models loaded later run on this rank alone.
            engine: EngineOptions { lockstep: None, ..engine },
            draft,
        }
    }

    /// The model a request names (`default_model`, nothing or `--model` for the first one),
    /// loaded now if it is allowed and not loaded.
    pub(crate) async fn get(&self, requested: Option<&str>) -> Result<Arc<Served>, ApiError> {
        let name = match requested {
            None | Some("") | Some("default_model") => self.default_id.as_str(),
            Some(n) if self.default_aliases.iter().any(|a| a == n) => self.default_id.as_str(),
            Some(n) => n,
        };
        if let Some(s) = self.find(name) {
            return Ok(s);
        }
        if name != self.default_id && !self.allowed.iter().any(|a| a == name) {
            let mut names = self.names();
            names.dedup();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model `{name}` is not served here: this server serves {} (GET /v1/models lists them; lmx serve --allowed-models lets requests load others)",
                    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                ),
            )
            .param("model")
            .code("model_not_found"));
        }
        let Some(loader) = self.loader.clone() else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("model `{name}` is not loaded and this server cannot load models")).param("model").code("model_not_found"));
        };
        let _one_at_a_time = self.loading.lock().await;
        if let Some(s) = self.find(name) {
            return Ok(s);
        }
        eprintln!("[INFO] loading {name}");
        let owned = name.to_string();
        let (model, tokenizer) = tokio::task::spawn_blocking(move || loader(&owned))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("loading `{name}` stopped: {e}")))?
            .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, format!("model `{name}` cannot be loaded: {e}")).param("model").code("model_not_found"))?;
        let aliases = if name == self.default_id { self.default_aliases.clone() } else { Vec::new() };
        let draft = if name == self.default_id { self.draft.clone() } else { None };
        let served = Arc::new(Served::new(name.to_string(), aliases, model, tokenizer, &self.engine, draft));
        let mut loaded = self.loaded.lock().map_err(|_| poisoned())?;
        loaded.push(served.clone());
        while loaded.len() > self.max_loaded {
            let gone = loaded.remove(0);
            eprintln!("[INFO] unloading {} (--max-loaded-models {})", gone.id, self.max_loaded);
        }
        Ok(served)
    }

    fn find(&self, name: &str) -> Option<Arc<Served>> {
        let mut loaded = self.loaded.lock().ok()?;
        let i = loaded.iter().position(|s| s.answers_to(name))?;
        let s = loaded.remove(i);
        loaded.push(s.clone());
        Some(s)
    }

    /// The loaded models.
    pub(crate) fn loaded(&self) -> Vec<Arc<Served>> {
        self.loaded.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Every name a request may use: the first model's, then the allowed ones.
    pub(crate) fn names(&self) -> Vec<String> {
        std::iter::once(self.default_id.clone()).chain(self.allowed.iter().cloned()).collect()
    }
}

fn poisoned() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the model list is unusable after a failed request")
}
