//! Decode speed of a model's CPU decode step on plain buffers (`lmx_core::cpu_step`) against
//! its layers op by op, paired inside one process: separate runs of one binary on a shared
//! VM swing by 30%, more than the effect, so the two paths alternate here, each round timing
//! both on the same prompt, and the tokens of both are checked equal.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p lmx --example decode_ab -- models/smollm2-4bit [rounds] [tokens]`

use std::time::Instant;

use lmx::core::Tensor;
use lmx::Logits;

fn main() -> lmx::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(6);
    let tokens: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    let (model, tokenizer) = lmx::load(&path)?;
    let prompt = tokenizer.chat_prompt(&[lmx::Message::new("user", "Write a short story about a robot who learns to paint.")], None)?;
    let device = model.device().clone();
    // One greedy decode of `tokens` tokens after the prompt: (token ids, seconds decoding).
    let decode = |on: bool| -> lmx::core::Result<(Vec<u32>, f64)> {
        lmx::core::cpu_step::set_enabled(on);
        let mut cache = model.new_cache();
        let ids = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
        let mut next = model.forward(&ids, &mut cache, Logits::Last)?.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        let (mut out, start) = (vec![next], Instant::now());
        for _ in 1..tokens {
            let ids = Tensor::new(&[next], &device)?.unsqueeze(0)?;
            next = model.forward(&ids, &mut cache, Logits::Last)?.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
            out.push(next);
        }
        Ok((out, start.elapsed().as_secs_f64()))
    };
    let taken = lmx::core::cpu_step::steps_taken();
    decode(true)?;
    if lmx::core::cpu_step::steps_taken() == taken {
        println!("{path}: the decode step on plain buffers does not apply to this model; nothing to compare");
        return Ok(());
    }
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // The order alternates, so neither path always runs first.
        for first in [round % 2 == 0, round % 2 == 1] {
            let (ids, secs) = decode(first)?;
            if first {
                on.push((ids, secs));
            } else {
                off.push((ids, secs));
            }
        }
        let (a, b) = (&on[round], &off[round]);
        assert_eq!(a.0, b.0, "round {round}: the two paths decoded different tokens");
        println!("round {round}: plain buffers {:.1} tok/s, op by op {:.1} tok/s ({:.3}x)", tokens as f64 / a.1, tokens as f64 / b.1, b.1 / a.1);
    }
    let median = |v: &[(Vec<u32>, f64)]| {
        let mut s: Vec<f64> = v.iter().map(|(_, t)| tokens as f64 / t).collect();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let mut ratios: Vec<f64> = on.iter().zip(&off).map(|(a, b)| b.1 / a.1).collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "{path}: medians plain buffers {:.1} tok/s, op by op {:.1} tok/s; paired ratio median {:.3}x (range {:.3}-{:.3}); tokens equal",
        median(&on),
        median(&off),
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
    Ok(())
}
