//! Continuous batching, the cache variants and prompt cache files on the real model: a
//! sequence's greedy tokens in a batch equal its tokens alone, with growing, quantized and
//! rotating caches, also when sequences join and leave between steps; each cache kind follows
//! MLX LM; a saved cache continues as the one it saved.

use crate::default_model;

/// Prompts of different lengths; the last is one token (no prefill: the first step appends to
/// an empty cache).
const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3,",
    "Rust is a programming language that empowers everyone to build reliable and efficient software. Its main features are",
    "Hello",
];

fn alone(model: &lmx::Model, tok: &lmx::TokenizerWrapper, prompt: &[u32], max_tokens: usize, kv: lmx::KvOptions) -> Vec<u32> {
    let mut cache = lmx::PromptCache::with_options(&**model, kv).expect("kv options");
    let params = lmx::GenerateParams { max_tokens, ignore_eos: true, ..Default::default() };
    lmx::stream_generate(model, tok, prompt, &mut cache, params).map(|r| r.expect("step").token).collect()
}

#[test]
fn batched_greedy_tokens_equal_each_sequence_alone_for_every_cache_kind() {
    let (model, tok) = lmx::load(&default_model()).expect("load");
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tok.encode(p, true).expect("encode")).collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lens.iter().any(|&l| l != lens[0]) && lens.contains(&1), "prompts of different lengths, one of one token: {lens:?}");
    let kinds = [
        ("growing", lmx::KvOptions::default()),
        ("8-bit", lmx::KvOptions { kv_bits: Some(8), ..Default::default() }),
        ("4-bit from token 8", lmx::KvOptions { kv_bits: Some(4), kv_group_size: 32, quantized_kv_start: 8, ..Default::default() }),
        // Smaller than the longest prompt plus its tokens: that sequence's ring wraps.
        ("rotating 24", lmx::KvOptions { max_kv_size: Some(24), ..Default::default() }),
    ];
    let max_tokens = 12;
    for (name, kv) in kinds {
        let params = lmx::GenerateParams { max_tokens, ignore_eos: true, ..Default::default() };
        let mut steps = 0;
        let batched = lmx::batch_generate(&model, &tok, &prompts, params, 3, kv, |_| steps += 1).expect("batch");
        for (i, (p, out)) in prompts.iter().zip(&batched).enumerate() {
            assert_eq!(out.tokens, alone(&model, &tok, p, max_tokens, kv), "{name}: prompt {i} in a batch of 3 differs from alone");
            assert_eq!(out.finish_reason, Some(lmx::FinishReason::Length));
        }
        // 4 prompts, at most 3 decoding: the fourth joins when the first three finish.
        assert!(steps > max_tokens, "{name}: {steps} steps");
    }
}

/// A sequence joins a running batch, another is removed mid-way: the rest are unaffected.
#[test]
fn sequences_join_and_leave_between_steps() {
    let (model, tok) = lmx::load(&default_model()).expect("load");
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tok.encode(p, true).expect("encode")).collect();
    let params = lmx::GenerateParams { max_tokens: 10, ignore_eos: true, ..Default::default() };
    let mut gen = lmx::BatchGenerator::new(&*model, &tok, 8);
    let new_cache = || lmx::PromptCache::new(&*model);
    let a = gen.insert(&prompts[0], params.clone(), new_cache()).expect("insert");
    let b = gen.insert(&prompts[1], params.clone(), new_cache()).expect("insert");
    let mut got: std::collections::HashMap<lmx::SequenceId, Vec<u32>> = Default::default();
    let mut c = None;
    for step in 0.. {
        if step == 3 {
            c = Some(gen.insert(&prompts[2], params.clone(), new_cache()).expect("insert"));
            gen.remove(b).expect("b is running");
        }
        for (id, r) in gen.step().expect("step") {
            got.entry(id).or_default().push(r.token);
        }
        if gen.is_empty() {
            break;
        }
    }
    assert_eq!(got[&a], alone(&model, &tok, &prompts[0], 10, Default::default()));
    assert_eq!(got[&c.expect("c joined")], alone(&model, &tok, &prompts[2], 10, Default::default()));
    assert_eq!(got[&b].len(), 3, "b ran 3 steps before it was removed");
    assert!(gen.remove(b).is_err(), "b is gone");
}

/// Greedy tokens with each cache kind equal MLX LM's `generate_step` with the same settings
/// (tests/fixtures/smollm2/kv_cache_reference.json, written by
/// scripts/fixtures/kv_cache_reference.py with mlx 0.32.4 / mlx-lm 0.32.2 on the default model
/// dequantized to float32), alone and in one batch. Where MLX's chosen token leads the runner-up by less
/// than [`NEAR_TIE`] in log-probability, last-bit differences may pick the runner-up (a
/// quantized cache turns them into rounding flips): a sequence may part from MLX's there, and
/// only there.
#[test]
fn cache_kinds_follow_mlx_lm() {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2/kv_cache_reference.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json");
    // MLX ran the float32 weights: the GGUF dequantized.
    let opts = lmx::LoadOptions { dequantize_gguf: true, ..Default::default() };
    let (model, tok) = lmx::load_with(&default_model(), &opts).expect("load");
    let prompts: Vec<Vec<u32>> = fixture["prompts"].as_array().expect("prompts").iter().map(|p| serde_json::from_value(p["ids"].clone()).expect("ids")).collect();
    for (p, want) in PROMPTS.iter().zip(&prompts) {
        assert_eq!(&tok.encode(p, true).expect("encode"), want, "MLX LM's token ids for {p:?}");
    }
    let max_tokens = fixture["max_tokens"].as_u64().expect("max_tokens") as usize;
    for (name, setting) in fixture["settings"].as_object().expect("settings") {
        let o = &setting["options"];
        let n = |k: &str| o.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let kv = lmx::KvOptions { max_kv_size: n("max_kv_size"), kv_bits: n("kv_bits"), kv_group_size: n("kv_group_size").unwrap_or(64), quantized_kv_start: n("quantized_kv_start").unwrap_or(0) };
        let want: Vec<Vec<u32>> = serde_json::from_value(setting["tokens"].clone()).expect("tokens");
        let params = lmx::GenerateParams { max_tokens, ignore_eos: true, ..Default::default() };
        let batched = lmx::batch_generate(&model, &tok, &prompts, params, 4, kv, |_| {}).expect("batch");
        let margins: Vec<Vec<f32>> = serde_json::from_value(setting["margins"].clone()).expect("margins");
        let mut agreed = 0;
        for (i, (prompt, want)) in prompts.iter().zip(&want).enumerate() {
            let got = alone(&model, &tok, prompt, max_tokens, kv);
            assert_eq!(batched[i].tokens, got, "{name}: prompt {i} in a batch differs from alone");
            agreed += agreement(&got, want, &margins[i]).unwrap_or_else(|t| panic!("{name}: prompt {i} token {t}: lmx {got:?}, MLX LM {want:?}, MLX's margin there {}", margins[i][t]));
        }
        assert!(agreed >= prompts.len() * max_tokens * 3 / 4, "{name}: only {agreed} tokens agree with MLX LM");
    }
}

/// MLX's margin below which either of the top two tokens is a right greedy choice.
const NEAR_TIE: f32 = 0.05;

/// Tokens equal to MLX's up to the end or to a near-tie where they part; Err(step) where they
/// part elsewhere.
fn agreement(got: &[u32], want: &[u32], margins: &[f32]) -> Result<usize, usize> {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(want.len()),
        Some(t) if margins[t] < NEAR_TIE => Ok(t),
        Some(t) => Err(t),
    }
}

/// A prompt cache saved to a file and loaded back continues exactly as the whole prompt run
/// from scratch, for each cache kind; a cache file for another model is refused.
#[test]
fn prompt_cache_files_round_trip() {
    let (model, tok) = lmx::load(&default_model()).expect("load");
    let head = tok.encode(PROMPTS[3], true).expect("encode");
    let tail = tok.encode(" Also, its mascot is", false).expect("encode");
    let whole: Vec<u32> = head.iter().chain(&tail).copied().collect();
    let dir = std::env::temp_dir().join(format!("lmx-it-prompt-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for (name, kv) in
        [("growing", lmx::KvOptions::default()), ("8-bit", lmx::KvOptions { kv_bits: Some(8), ..Default::default() }), ("rotating 16", lmx::KvOptions { max_kv_size: Some(16), ..Default::default() })]
    {
        let mut cache = lmx::PromptCache::with_options(&*model, kv).expect("options");
        cache.extend(&*model, &head, 2048).expect("extend");
        let file = dir.join(format!("{}.safetensors", name.replace(' ', "-")));
        cache.save(&file, &[("model".to_string(), "smollm2".to_string())].into()).expect("save");
        let (mut loaded, meta) = lmx::PromptCache::load(&*model, &file, Default::default()).expect("load");
        assert_eq!(meta["model"], "smollm2");
        assert_eq!(loaded.tokens(), &head[..], "{name}: the file keeps the token ids");
        assert!(loaded.nbytes() > 0);
        let params = lmx::GenerateParams { max_tokens: 8, ignore_eos: true, ..Default::default() };
        let from_file: Vec<u32> = lmx::stream_generate(&model, &tok, &whole, &mut loaded, params.clone()).map(|r| r.expect("step").token).collect();
        let mut fresh = lmx::PromptCache::with_options(&*model, kv).expect("options");
        fresh.extend(&*model, &head, 2048).expect("extend");
        let want: Vec<u32> = lmx::stream_generate(&model, &tok, &whole, &mut fresh, params).map(|r| r.expect("step").token).collect();
        assert_eq!(from_file, want, "{name}: generation after loading differs from the cache it saved");
    }
    // A truncated file is refused with its name and the reason.
    let file = dir.join("growing.safetensors");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = lmx::PromptCache::load(&*model, &file, Default::default()).err().expect("refused").to_string();
    assert!(err.contains("growing.safetensors") && err.contains("do not hold"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The cross-request prefix cache: a request extending a kept conversation reuses its
/// tokens and generates what it would from scratch; the kept cache is copied, never changed;
/// the bounds evict the least recently used; an extension replaces its prefix.
#[test]
fn prefix_cache_reuses_copies_and_evicts() {
    let (model, tok) = lmx::load(&default_model()).expect("load");
    let params = lmx::GenerateParams { max_tokens: 8, ignore_eos: true, ..Default::default() };
    let run = |prompt: &[u32], cache: &mut lmx::PromptCache| -> (Vec<u32>, usize) {
        let rs: Vec<lmx::GenerationResponse> = lmx::stream_generate(&model, &tok, prompt, cache, params.clone()).map(|r| r.expect("step")).collect();
        (rs.iter().map(|r| r.token).collect(), rs[0].cached_tokens)
    };
    let first = tok.encode(PROMPTS[3], true).expect("encode");
    let mut prefix = lmx::PrefixCache::new(2, usize::MAX);
    let mut cache = lmx::PromptCache::new(&*model);
    let (answer, _) = run(&first, &mut cache);
    prefix.insert(cache);
    for follow_up in [" What about safety?", " And speed?"] {
        let mut prompt = first.clone();
        prompt.extend(&answer);
        prompt.extend(tok.encode(follow_up, false).expect("encode"));
        let mut reused = prefix.fetch(&prompt).expect("fetch").expect("a kept prefix");
        let (got, cached) = run(&prompt, &mut reused);
        let (want, _) = run(&prompt, &mut lmx::PromptCache::new(&*model));
        assert!(cached >= first.len(), "{follow_up}: {cached} cached tokens");
        assert_eq!(got, want, "{follow_up}: from the kept cache vs from scratch");
    }
    assert_eq!(prefix.len(), 1);
    // Two unrelated prompts: the bound of 2 evicts the least recently used (the first).
    for p in [PROMPTS[0], PROMPTS[1]] {
        let mut c = lmx::PromptCache::new(&*model);
        run(&tok.encode(p, true).expect("encode"), &mut c);
        prefix.insert(c);
    }
    assert_eq!(prefix.len(), 2);
    assert!(prefix.fetch(&first).expect("fetch").is_none(), "the oldest entry was evicted");
    // A cache extending a kept one replaces it.
    let p0 = tok.encode(PROMPTS[0], true).expect("encode");
    let mut longer = prefix.fetch(&[p0.clone(), vec![13, 13]].concat()).expect("fetch").expect("kept");
    run(&[p0, vec![13, 13]].concat(), &mut longer);
    prefix.insert(longer);
    assert_eq!(prefix.len(), 2, "the extension replaced its prefix");
}
