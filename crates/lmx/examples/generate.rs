//! Load the default model and stream one answer: `cargo run --release -p lmx --example generate`.

fn main() -> lmx::Result<()> {
    let model_path = std::env::args().nth(1).unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let (model, tokenizer) = lmx::load(&model_path)?;
    let prompt = tokenizer.chat_prompt(&[lmx::Message::new("user", "What is the capital of France?")], None)?;
    let mut cache = lmx::PromptCache::new(&*model);
    let params = lmx::GenerateParams { max_tokens: 64, ..Default::default() };
    for response in lmx::stream_generate(&model, &tokenizer, &prompt, &mut cache, params) {
        let response = response?;
        print!("{}", response.text);
        if let Some(reason) = response.finish_reason {
            println!("\n[{} tokens, {:.1} tokens/s, finish: {}]", response.generation_tokens, response.generation_tps, reason.as_str());
        }
    }
    Ok(())
}
