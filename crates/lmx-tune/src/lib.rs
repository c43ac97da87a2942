//! lmx-tune: fine-tuning. So far the data layer: MLX LM's dataset formats read from
//! `train.jsonl` / `valid.jsonl` / `test.jsonl`, validated line by line, and tokenized with the
//! model's chat template (with the prompt offset `--mask-prompt` needs). Training itself
//! (LoRA, DoRA, full) is the next step of issue 4.

pub mod data;

pub use data::{load_split, tokenize, DataError, Example, Record};
