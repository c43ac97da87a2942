//! The prompt cache: a model's keys and values plus the exact tokens they belong to.
//!
//! Each generation call gives the whole token sequence (for a chat, the full conversation as
//! the template renders it); the cache keeps the longest common prefix and only the rest is
//! prefilled. Multi-turn chat therefore processes just the new turn, and an edited history
//! recomputes from the first changed token.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use lmx_core::{Device, Tensor};
use lmx_models::CausalLm;
use lmx_nn::{KvCache, KvOptions, LayerState};

use crate::GenerateError;

/// Keys/values of processed tokens, reusable across generation calls.
pub struct PromptCache {
    pub(crate) kv: KvCache,
    pub(crate) tokens: Vec<u32>,
}

impl PromptCache {
    /// An empty growing cache for `model`.
    pub fn new(model: &dyn CausalLm) -> Self {
        Self { kv: model.new_cache(), tokens: Vec::new() }
    }

    /// An empty cache for `model` keeping keys and values as `opts` says (rotating,
    /// quantized); the options are checked here.
    pub fn with_options(model: &dyn CausalLm, opts: KvOptions) -> Result<Self, crate::GenerateError> {
        opts.validate().map_err(crate::GenerateError::KvCache)?;
        Ok(Self { kv: model.new_cache().with_options(opts), tokens: Vec::new() })
    }

    /// The tokens whose keys and values are cached.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Empties the cache (a chat's `r`).
    pub fn reset(&mut self) {
        self.kv.reset();
        self.tokens.clear();
    }

    /// Bytes held by the key/value buffers.
    pub fn nbytes(&self) -> usize {
        self.kv.nbytes()
    }

    /// Runs `tokens` through `model` after the cached ones, in chunks of `step`, and keeps
    /// their keys and values (`mlx_lm.cache_prompt`: nothing is sampled).
    pub fn extend(&mut self, model: &dyn CausalLm, tokens: &[u32], step: usize) -> Result<(), GenerateError> {
        crate::generate::check_vocab(tokens, model.vocab_size())?;
        let context = model.max_position_embeddings();
        if self.tokens.len() + tokens.len() > context {
            return Err(GenerateError::PromptTooLong { prompt: self.tokens.len() + tokens.len(), context });
        }
        for chunk in tokens.chunks(step.max(1)) {
            crate::generate::run(model, &mut self.kv, &[chunk])?;
            self.tokens.extend_from_slice(chunk);
        }
        Ok(self.kv.quantize_due()?)
    }

    /// Keeps the longest prefix shared with `prompt`, but never all of it (the last prompt
    /// token must run to produce logits). Returns how many tokens are reused.
    pub(crate) fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        let common = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let mut keep = common.min(prompt.len().saturating_sub(1));
        if keep < self.tokens.len() && !self.kv.can_truncate() {
            // A rotating cache that has wrapped no longer holds the positions to rewind to.
            keep = 0;
        }
        self.kv.truncate(keep);
        self.tokens.truncate(keep);
        keep
    }
}

/// The user metadata key where lmx keeps a cache file's token ids (MLX LM keeps none).
const TOKENS_KEY: &str = "tokens";

impl PromptCache {
    /// Saves the cache as MLX LM's `save_prompt_cache` does (mlx-lm 0.32): tensors
    /// `{layer}.{i}` (`{layer}.{i}.{j}` for quantized parts) with each layer's integers as
    /// int32 scalars, and string metadata `0.{key}` (the user's `metadata`, plus the token ids
    /// under `0.tokens`), `1.{layer}` (the cache class), `2.{n}.0` / `2.{n}.1` (which tensors
    /// are scalars). Written to a temporary file and renamed.
    pub fn save(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<(), GenerateError> {
        let states = self.kv.states()?;
        let mut tensors = HashMap::new();
        let mut meta: BTreeMap<String, String> = metadata.iter().map(|(k, v)| (format!("0.{k}"), v.clone())).collect();
        meta.insert(format!("0.{TOKENS_KEY}"), format!("{:?}", self.tokens));
        meta.insert("2.0".into(), String::new());
        let mut scalars = 0;
        let mut scalar = |tensors: &mut HashMap<String, Tensor>, meta: &mut BTreeMap<String, String>, name: String, v: usize| -> Result<(), GenerateError> {
            tensors.insert(name.clone(), Tensor::new(v as i32, &Device::Cpu)?);
            scalars += 1;
            meta.insert(format!("2.{scalars}.0"), name);
            meta.insert(format!("2.{scalars}.1"), "scalar".into());
            Ok(())
        };
        for (l, s) in states.into_iter().enumerate() {
            let class = match s {
                LayerState::Growing { keys, values, offset } => {
                    tensors.insert(format!("{l}.0"), keys);
                    tensors.insert(format!("{l}.1"), values);
                    scalar(&mut tensors, &mut meta, format!("{l}.2"), offset)?;
                    "KVCache"
                }
                LayerState::Rotating { keys, values, offset, keep, max_size, idx } => {
                    tensors.insert(format!("{l}.0"), keys);
                    tensors.insert(format!("{l}.1"), values);
                    for (i, v) in [offset, keep, max_size, idx].into_iter().enumerate() {
                        scalar(&mut tensors, &mut meta, format!("{l}.{}", i + 2), v)?;
                    }
                    "RotatingKVCache"
                }
                LayerState::Quantized { keys, values, offset, group_size, bits } => {
                    for (i, parts) in [keys, values].into_iter().enumerate() {
                        for (j, t) in parts.into_iter().enumerate() {
                            tensors.insert(format!("{l}.{i}.{j}"), t);
                        }
                    }
                    for (i, v) in [offset, group_size, bits].into_iter().enumerate() {
                        scalar(&mut tensors, &mut meta, format!("{l}.{}", i + 2), v)?;
                    }
                    "QuantizedKVCache"
                }
            };
            meta.insert(format!("1.{l}"), class.into());
        }
        let tensors = tensors.into_iter().map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?))).collect::<Result<HashMap<_, _>, GenerateError>>()?;
        lmx_io::safetensors_io::save_safetensors_with_metadata(&tensors, &meta, path)?;
        Ok(())
    }

    /// Loads a cache file written by [`PromptCache::save`] or MLX LM's `save_prompt_cache`
    /// for `model`; returns it and the file's user metadata (`model`, `tokenizer_config`, ...).
    /// `opts` apply where the file does not fix them (quantizing a growing cache later).
    /// A file from MLX LM has no token ids: its positions count as tokens the next prompt
    /// must start with ([`PromptCache::tokens`] holds placeholders, id 0).
    pub fn load(model: &dyn CausalLm, path: &Path, opts: KvOptions) -> Result<(Self, BTreeMap<String, String>), GenerateError> {
        let (mut tensors, meta) = lmx_io::safetensors_io::read_safetensors_with_metadata(path)?;
        let bad = |msg: String| GenerateError::PromptCacheFile { path: path.to_path_buf(), msg };
        let user: BTreeMap<String, String> = meta.iter().filter_map(|(k, v)| Some((k.strip_prefix("0.")?.to_string(), v.clone()))).collect();
        let n_layers = meta.keys().filter(|k| k.strip_prefix("1.").is_some_and(|l| l.parse::<usize>().is_ok())).count();
        let expected = model.new_cache().layers();
        if n_layers == 0 {
            return Err(bad("not a prompt cache file (its metadata names no cache layers); make one with `lmx cache-prompt` or mlx_lm.cache_prompt".into()));
        }
        if n_layers != expected {
            return Err(bad(format!("it holds {n_layers} layers' caches but the model has {expected} layers: was it made for another model?")));
        }
        let mut take = |name: String| tensors.remove(&name).ok_or_else(|| bad(format!("tensor `{name}` is missing")));
        let mut states = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let mut int = |i: usize| -> Result<usize, GenerateError> {
                let t = take(format!("{l}.{i}"))?;
                let v = t.to_dtype(lmx_core::DType::I64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<i64>()).map_err(|e| bad(format!("`{l}.{i}`: {e}")))?;
                match v[..] {
                    [x] if x >= 0 => Ok(x as usize),
                    _ => Err(bad(format!("`{l}.{i}` must be one non-negative integer"))),
                }
            };
            let state = match meta.get(&format!("1.{l}")).map(String::as_str) {
                Some("KVCache") => LayerState::Growing { offset: int(2)?, keys: take(format!("{l}.0"))?, values: take(format!("{l}.1"))? },
                Some("RotatingKVCache") => LayerState::Rotating { offset: int(2)?, keep: int(3)?, max_size: int(4)?, idx: int(5)?, keys: take(format!("{l}.0"))?, values: take(format!("{l}.1"))? },
                Some("QuantizedKVCache") => {
                    let (offset, group_size, bits) = (int(2)?, int(3)?, int(4)?);
                    let mut parts = |i: usize| -> Result<[Tensor; 3], GenerateError> { Ok([take(format!("{l}.{i}.0"))?, take(format!("{l}.{i}.1"))?, take(format!("{l}.{i}.2"))?]) };
                    LayerState::Quantized { keys: parts(0)?, values: parts(1)?, offset, group_size, bits }
                }
                other => return Err(bad(format!("layer {l}: cache class {other:?} is not one lmx reads (KVCache, RotatingKVCache, QuantizedKVCache)"))),
            };
            states.push(state);
        }
        let kv = KvCache::from_states(states, opts, model.device()).map_err(|e| bad(e.to_string()))?;
        let tokens = match user.get(TOKENS_KEY) {
            Some(t) => serde_json::from_str::<Vec<u32>>(t).map_err(|e| bad(format!("0.{TOKENS_KEY}: {e}")))?,
            None => vec![0; kv.offset()],
        };
        if tokens.len() != kv.offset() {
            return Err(bad(format!("{} token ids for {} cached positions", tokens.len(), kv.offset())));
        }
        Ok((Self { kv, tokens }, user))
    }
}

/// Prompt caches kept across requests (MLX LM's server `LRUPromptCache`): a new request starts
/// from a copy of the cache that shares the longest prefix with its prompt, and a finished
/// one is kept for the next. Bounded in entries and bytes; the least recently used go first,
/// and a cache that extends a kept one replaces it.
pub struct PrefixCache {
    entries: Vec<Entry>,
    max_entries: usize,
    max_bytes: usize,
    clock: u64,
}

struct Entry {
    cache: PromptCache,
    last_used: u64,
}

impl PrefixCache {
    /// At most `max_entries` caches and `max_bytes` bytes of keys and values.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self { entries: Vec::new(), max_entries, max_bytes, clock: 0 }
    }

    /// Caches kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of keys and values kept.
    pub fn nbytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.nbytes()).sum()
    }

    /// A copy of the kept cache sharing the longest prefix with `prompt`, cut back to what
    /// `prompt` can reuse (never its last token), or None when no kept cache shares a token.
    /// The kept cache is not changed.
    pub fn fetch(&mut self, prompt: &[u32]) -> Result<Option<PromptCache>, GenerateError> {
        let common = |e: &Entry| e.cache.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let best = self.entries.iter().enumerate().map(|(i, e)| (common(e), e.last_used, i)).filter(|&(n, _, _)| n > 0).max();
        let Some((_, _, best)) = best else { return Ok(None) };
        self.clock += 1;
        self.entries[best].last_used = self.clock;
        let kept = &self.entries[best].cache;
        let mut copy = PromptCache { kv: kept.kv.deep_clone()?, tokens: kept.tokens.clone() };
        if copy.reuse_prefix(prompt) == 0 {
            return Ok(None);
        }
        Ok(Some(copy))
    }

    /// Keeps `cache` (a finished request's), dropping kept caches it extends, then the least
    /// recently used while over the bounds (the new one included, if it alone is too big).
    /// Returns how many it dropped for the bounds.
    pub fn insert(&mut self, cache: PromptCache) -> usize {
        self.keep(cache, None)
    }

    /// [`PrefixCache::insert`] that drops exactly `evict` least recently used caches for the
    /// bounds, whatever their bytes: a rank holding a shard of each cache keeps the same
    /// caches as the rank that decided (its bytes differ when heads split unevenly).
    pub fn insert_evicting(&mut self, cache: PromptCache, evict: usize) {
        self.keep(cache, Some(evict));
    }

    fn keep(&mut self, cache: PromptCache, evict: Option<usize>) -> usize {
        if cache.tokens.is_empty() {
            return 0;
        }
        if cache.kv.can_truncate() {
            // The kept prefixes can be cut from the new cache when needed.
            self.entries.retain(|e| !cache.tokens.starts_with(&e.cache.tokens));
        }
        self.clock += 1;
        self.entries.push(Entry { cache, last_used: self.clock });
        let mut evicted = 0;
        while !self.entries.is_empty() && evict.map_or(self.entries.len() > self.max_entries || self.nbytes() > self.max_bytes, |n| evicted < n) {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used).unwrap_or(0);
            self.entries.remove(oldest);
            evicted += 1;
        }
        evicted
    }
}
