//! Data-parallel LoRA: 2 and 3 in-process ranks, each training on its share of every batch
//! (uneven shares and uneven token counts included), follow the loss curve of one process on
//! the same global batches within 1e-4, end with the same adapters, and only rank 0 writes.

use std::path::PathBuf;
use std::sync::Arc;

use lmx::core::{DType, Device};
use lmx::dist::{Group, InProcess};
use lmx_io::Weights;
use lmx_nn::{AdapterPlan, Builder, Training};
use lmx_tune::optim::{OptimizerKind, Schedule};
use lmx_tune::trainer::{train, Event, TrainArgs};

/// Trains the llama fixture's LoRA for 6 steps (batches of 4, Adam) as one rank of `group`;
/// returns the train and validation losses and the final adapters.
fn run(group: Option<Arc<dyn Group>>, dir: PathBuf) -> (Vec<f64>, Vec<f64>, Vec<Vec<f32>>) {
    let model_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let config = lmx_io::config::read_json(&model_dir.join("config.json")).expect("config");
    let params = lmx_io::LoraParameters { rank: 4, scale: 10.0, dropout: 0.0, keys: None };
    let plan = AdapterPlan::new(lmx_io::FineTuneType::Lora, -1, 2, params, 0).expect("plan");
    let training = Arc::new(Training::new());
    let weights = Weights::from_safetensors(&[model_dir.join("model.safetensors")]).expect("weights");
    let vb = Builder::new(weights, DType::F32, &Device::Cpu).with_adapters(Arc::new(plan)).with_training(training.clone());
    let model = lmx_models::load_model("llama", &config, &vb).expect("model");
    // Sequences of different lengths (so ranks train different token counts), some with a
    // masked prompt.
    let data: Vec<(Vec<u32>, usize)> = (0..12).map(|i| ((0..6 + 3 * (i % 5)).map(|t| ((t * 7 + i * 13) % 150) as u32).collect(), (i % 3) as usize)).collect();
    let valid: Vec<(Vec<u32>, usize)> = data.iter().take(8).cloned().collect();
    let args = TrainArgs {
        batch_size: 4,
        iters: 6,
        val_batches: None,
        steps_per_report: 1,
        steps_per_eval: 3,
        save_every: 0,
        max_seq_length: 64,
        grad_accumulation_steps: 1,
        seed: 3,
        schedule: Schedule::constant(2e-3),
        optimizer: OptimizerKind::from_config("adam", &Default::default()).expect("adam"),
        adapter_dir: dir,
        grad_checkpoint: false,
        config: None,
        data_parallel: group,
    };
    let (mut train_losses, mut val_losses) = (Vec::new(), Vec::new());
    train(&*model, &training, &data, Some(&valid), &args, &mut |e| match e {
        Event::Train { loss, .. } => train_losses.push(loss),
        Event::Val { loss, .. } => val_losses.push(loss),
        _ => {}
    })
    .expect("training");
    let adapters = training.trainables().iter().map(|(_, v)| v.as_tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("weights")).collect();
    (train_losses, val_losses, adapters)
}

struct AbortOnPanic(InProcess);

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[test]
fn data_parallel_training_follows_one_process() {
    // In-process ranks share this process's compute pool, and a rank's step runs on one of
    // its threads while it waits for the others: one thread per rank, or the third waits for
    // a thread the first two hold. (Real ranks are processes with pools of their own.)
    std::env::set_var("RAYON_NUM_THREADS", "3");
    let base = std::env::temp_dir().join(format!("lmx-dp-{}", std::process::id()));
    let (want_train, want_val, want_adapters) = run(None, base.join("alone"));
    assert_eq!(want_train.len(), 6);
    assert!(want_train[5] < want_train[0], "the loss did not fall: {want_train:?}");
    for size in [2, 3] {
        let dirs: Vec<PathBuf> = (0..size).map(|r| base.join(format!("world{size}-rank{r}"))).collect();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = InProcess::world(size)
                .into_iter()
                .zip(&dirs)
                .map(|(g, dir)| {
                    s.spawn(move || {
                        // A rank that fails aborts the group, so the others fail instead of waiting.
                        let guard = AbortOnPanic(g.clone());
                        let out = run(Some(Arc::new(g)), dir.clone());
                        std::mem::forget(guard);
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank")).collect()
        });
        for (rank, (train_losses, val_losses, adapters)) in results.iter().enumerate() {
            for (what, got, want) in [("train", train_losses, &want_train), ("validation", val_losses, &want_val)] {
                assert_eq!(got.len(), want.len());
                let d = got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                println!("world {size} rank {rank}: {what} losses within {d:.2e} of one process");
                assert!(d < 1e-4, "world {size} rank {rank}: {what} losses {got:?} vs one process {want:?}");
            }
            let d = adapters.iter().flatten().zip(want_adapters.iter().flatten()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d < 1e-4, "world {size} rank {rank}: adapters differ from one process's by {d}");
            // Rank 0 alone writes the adapters.
            assert_eq!(dirs[rank].join("adapters.safetensors").exists(), rank == 0, "rank {rank} of {size}");
        }
    }
    let _ = std::fs::remove_dir_all(base);
}
