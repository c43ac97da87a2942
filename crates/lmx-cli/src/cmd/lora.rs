//! `lmx lora`: the flags, YAML keys and output of `mlx_lm.lora`. Precedence: flags over the
//! YAML file (`-c`) over MLX LM's defaults.

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use lmx::io::adapters::{AdapterConfig, ADAPTER_FILE};
use lmx::io::FineTuneType;
use lmx_tune::config::{ConfigFile, LoraConfig};
use lmx_tune::optim::{OptimizerKind, Schedule};
use lmx_tune::trainer::{self, Dataset, Event, TrainArgs};

use super::{gb, load_model, DEFAULT_MODEL};

/// Flags of `lmx lora` (every one also a YAML key with `-` written `_`).
#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Model folder, .gguf file, or Hugging Face id in the local cache (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<String>,
    /// Device: auto (the GPU when this binary has CUDA and one is visible, else the CPU), cpu
    /// or cuda[:N]; under `lmx launch` each rank takes its own GPU. A flag only, not a YAML key.
    #[arg(long)]
    pub device: Option<String>,
    /// Compute dtype of the frozen model (float32, bfloat16, float16; default float32, which
    /// the CPU's kernels and the golden gradients use). Adapters and optimizer state stay in
    /// float32. A flag only, not a YAML key.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Train (otherwise only --test runs).
    #[arg(long)]
    pub train: bool,
    /// Folder with train.jsonl, valid.jsonl and (for --test) test.jsonl.
    #[arg(long)]
    pub data: Option<String>,
    /// lora, dora or full.
    #[arg(long)]
    pub fine_tune_type: Option<String>,
    /// adam, adamw or sgd.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Keep the prompt (everything before the last message) out of the loss.
    #[arg(long)]
    pub mask_prompt: bool,
    /// Layers to fine-tune, counted from the last; -1 for all (default 16).
    #[arg(long, allow_negative_numbers = true)]
    pub num_layers: Option<i64>,
    /// Sequences per batch (default 4).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Training iterations (default 1000).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Validation batches per evaluation; -1 for the whole set (default 25).
    #[arg(long, allow_negative_numbers = true)]
    pub val_batches: Option<i64>,
    /// Learning rate (default 1e-5).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Steps between loss reports (default 10).
    #[arg(long)]
    pub steps_per_report: Option<usize>,
    /// Steps between validations (default 200).
    #[arg(long)]
    pub steps_per_eval: Option<usize>,
    /// Batches accumulated per optimizer update (default 1).
    #[arg(long)]
    pub grad_accumulation_steps: Option<usize>,
    /// Start from these adapter weights (adapters.safetensors of an earlier run).
    #[arg(long)]
    pub resume_adapter_file: Option<String>,
    /// Folder the adapters are saved to (default `adapters`).
    #[arg(long)]
    pub adapter_path: Option<String>,
    /// Save the adapters every N iterations (default 100).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Evaluate on test.jsonl after training (or the adapters in --adapter-path without --train).
    #[arg(long)]
    pub test: bool,
    /// Test batches; -1 for the whole set (default 500).
    #[arg(long, allow_negative_numbers = true)]
    pub test_batches: Option<i64>,
    /// Longest sequence; longer ones are truncated with a warning (default 2048).
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// YAML file with any of these settings plus lora_parameters, lr_schedule, optimizer_config.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Recompute activations in the backward pass to save memory.
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Seed for adapter initialisation, batch order and dropout (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Args {
    /// Applies the flags that were given over `c`.
    fn apply(self, c: &mut LoraConfig) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            data,
            fine_tune_type,
            optimizer,
            num_layers,
            batch_size,
            iters,
            val_batches,
            learning_rate,
            steps_per_report,
            steps_per_eval,
            grad_accumulation_steps,
            adapter_path,
            save_every,
            test_batches,
            max_seq_length,
            seed
        );
        if self.model.is_some() {
            c.model = self.model;
        }
        if self.resume_adapter_file.is_some() {
            c.resume_adapter_file = self.resume_adapter_file;
        }
        c.train |= self.train;
        c.test |= self.test;
        c.mask_prompt |= self.mask_prompt;
        c.grad_checkpoint |= self.grad_checkpoint;
    }
}

/// Batch counts: -1 means all.
fn batches_arg(n: i64) -> Option<usize> {
    usize::try_from(n).ok()
}

/// Reads and tokenizes one split of the data folder.
fn load_split(dir: &Path, name: &str, tokenizer: &lmx::TokenizerWrapper, mask_prompt: bool) -> anyhow::Result<Dataset> {
    let path = dir.join(format!("{name}.jsonl"));
    if !path.exists() {
        anyhow::bail!("{}: not found; --data must be a folder with train.jsonl and valid.jsonl (and test.jsonl for --test)", path.display());
    }
    let eos = *tokenizer.eos_token_ids().first().context("the tokenizer has no EOS token")?;
    let mut out = Vec::new();
    for ex in lmx_tune::load_split(&path)? {
        if mask_prompt && matches!(ex.record, lmx_tune::Record::Text(_)) {
            anyhow::bail!("{}:{}: --mask-prompt needs prompt/completion or chat records; a text record has no prompt", ex.path.display(), ex.line);
        }
        out.push(lmx_tune::tokenize(&ex, tokenizer, tokenizer.chat_template(), eos, mask_prompt)?);
    }
    Ok(out)
}

/// Runs `lmx lora`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let device_spec = args.device.clone().unwrap_or_else(|| "auto".into());
    let device = crate::dist::rank_device(lmx::core::parse_device(&device_spec).context("--device")?, &device_spec)?;
    let dtype = args.dtype.as_deref().map(lmx::core::parse_dtype).transpose().context("--dtype")?.unwrap_or(lmx::DType::F32);
    let mut c = LoraConfig::default();
    if let Some(path) = &args.config {
        eprintln!("Loading configuration file {}", path.display());
        let file = ConfigFile::read(path)?;
        let ignored = file.ignored_keys();
        if !ignored.is_empty() {
            eprintln!("[WARNING] {}: lmx ignores {}", path.display(), ignored.join(", "));
        }
        file.apply(&mut c)?;
    }
    args.apply(&mut c);
    c.validate()?;
    anyhow::ensure!(c.train || c.test, "nothing to do: pass --train and/or --test");
    let kind = FineTuneType::parse(&c.fine_tune_type).with_context(|| format!("--fine-tune-type `{}` is not one of lora, dora, full", c.fine_tune_type))?;
    let optimizer = OptimizerKind::from_config(&c.optimizer, c.optimizer_config.get(&c.optimizer).unwrap_or(&Default::default()))?;
    let schedule = match &c.lr_schedule {
        Some(s) if !s.is_null() => Schedule::from_config(s)?,
        _ => Schedule::constant(c.learning_rate),
    };
    let adapter_dir = PathBuf::from(&c.adapter_path);
    let data_dir = PathBuf::from(&c.data);
    anyhow::ensure!(data_dir.is_dir(), "--data {}: not a folder (expected train.jsonl, valid.jsonl, test.jsonl)", data_dir.display());

    eprintln!("Loading pretrained model");
    let model_arg = c.model.clone().unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let adapters = if c.train {
        Some(lmx::AdapterOptions { kind, num_layers: c.num_layers, params: c.lora_parameters.clone(), trainable: true, seed: c.seed, weights_file: c.resume_adapter_file.as_ref().map(PathBuf::from) })
    } else {
        Some(lmx::AdapterOptions::from_dir(&adapter_dir).with_context(|| format!("--test without --train evaluates the adapters in --adapter-path {}", adapter_dir.display()))?)
    };
    if let Some(f) = &c.resume_adapter_file {
        eprintln!("Loading fine-tuned weights from {f}");
    }
    // Training computes in f32 unless --dtype says otherwise (quantized weights stay packed).
    let options = lmx::LoadOptions { dtype: Some(dtype), device, adapters, ..Default::default() };
    let (model, tokenizer) = load_model(&model_arg, &options)?;

    eprintln!("Loading datasets");
    let test = if c.test { Some(load_split(&data_dir, "test", &tokenizer, c.mask_prompt)?) } else { None };
    if c.train {
        let train = load_split(&data_dir, "train", &tokenizer, c.mask_prompt)?;
        let valid = load_split(&data_dir, "valid", &tokenizer, c.mask_prompt)?;
        let training = model.training().context("the model was loaded without trainable tensors")?.clone();
        let trainable: usize = training.trainables().iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
        eprintln!(
            "Training: {} on `{model_arg}`, last {} of {} layers, {:.3}M trainable parameters",
            c.fine_tune_type,
            if c.num_layers < 0 { model.num_layers() } else { c.num_layers as usize },
            model.num_layers(),
            trainable as f64 / 1e6
        );
        let config = AdapterConfig { fine_tune_type: kind, num_layers: c.num_layers, lora_parameters: (kind != FineTuneType::Full).then(|| c.lora_parameters.clone()), extra: c.to_json() };
        let targs = TrainArgs {
            batch_size: c.batch_size,
            iters: c.iters,
            val_batches: batches_arg(c.val_batches),
            steps_per_report: c.steps_per_report,
            steps_per_eval: c.steps_per_eval,
            save_every: c.save_every,
            max_seq_length: c.max_seq_length,
            grad_accumulation_steps: c.grad_accumulation_steps,
            seed: c.seed,
            schedule,
            optimizer,
            adapter_dir: adapter_dir.clone(),
            grad_checkpoint: c.grad_checkpoint,
            config: Some(config),
            data_parallel: crate::dist::group(),
        };
        let bar = ProgressBar::new(c.iters as u64);
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} iters [{elapsed} < {eta}]").unwrap_or_else(|_| ProgressStyle::default_bar()));
        // Report lines go above the bar, or straight to stderr when it is not a terminal.
        let say = |line: String| if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) };
        let mut on_event = |e: Event| match e {
            Event::Step { .. } => bar.inc(1),
            Event::Val { it, loss, seconds } => say(format!("Iter {it}: Val loss {loss:.3}, Val took {seconds:.3}s")),
            Event::Train { it, loss, lr, it_per_sec, tokens_per_sec, trained_tokens, peak_memory } => say(format!(
                "Iter {it}: Train loss {loss:.3}, Learning Rate {lr:.3e}, It/sec {it_per_sec:.3}, Tokens/sec {tokens_per_sec:.3}, Trained Tokens {trained_tokens}, Peak mem {}",
                gb(peak_memory)
            )),
            Event::Saved { it, path } => say(format!("Iter {it}: Saved adapter weights to {}", path.display())),
            Event::Truncated { longest, max } => {
                say(format!("[WARNING] Some sequences are longer than {max} tokens. The longest sentence {longest} will be truncated to {max}. Consider pre-splitting your data to save memory."))
            }
        };
        let result = trainer::train(&*model, &training, &train, Some(&valid), &targs, &mut on_event);
        bar.finish_and_clear();
        result.map_err(|e| match e {
            lmx_tune::TuneError::NonFinite { .. } => anyhow::anyhow!("{e} (--learning-rate)"),
            e => e.into(),
        })?;
        eprintln!("Saved final weights to {}", adapter_dir.join(ADAPTER_FILE).display());
    }
    if let Some(test) = test {
        eprintln!("Testing");
        let loss = trainer::evaluate_in(&*model, &test, c.batch_size, batches_arg(c.test_batches), c.max_seq_length, crate::dist::group().as_deref())?;
        println!("Test loss {loss:.3}, Test ppl {:.3}.", loss.exp());
    }
    Ok(())
}
