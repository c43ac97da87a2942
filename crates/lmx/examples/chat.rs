//! A two-turn chat through one prompt cache; the second turn prefills only its new tokens:
//! `cargo run --release -p lmx --example chat`.

use lmx::{GenerateParams, Message, PromptCache};

fn main() -> lmx::Result<()> {
    let model_path = std::env::args().nth(1).unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let (model, tokenizer) = lmx::load(&model_path)?;
    let mut cache = PromptCache::new(&*model);
    let mut messages = Vec::new();
    for question in ["Name a planet.", "How far is it from the Sun?"] {
        messages.push(Message::new("user", question));
        let prompt = tokenizer.chat_prompt(&messages, None)?;
        let mut reply = String::new();
        let mut stats = None;
        for r in lmx::stream_generate(&model, &tokenizer, &prompt, &mut cache, GenerateParams { max_tokens: 60, ..Default::default() }) {
            let r = r?;
            reply.push_str(&r.text);
            stats = Some((r.prompt_tokens, r.cached_tokens));
        }
        if let Some((total, cached)) = stats {
            println!("> {question}\n{reply}\n[prompt {total} tokens, {cached} from the cache]\n");
        }
        messages.push(Message::new("assistant", reply));
    }
    Ok(())
}
