//! `lmx convert`, `lmx fuse` and `lmx lora` killed with SIGKILL at many points leave either
//! the previous state or a complete, loadable result, and the next run works (resume
//! included): outputs are written under temporary names and renamed when complete, stale
//! temporary outputs of killed runs are removed by the next run, and an adapter folder gets
//! its config together with its first weights.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{default_model, lmx, path_str, temp_dir, tiny_model};

/// Starts `lmx args`, kills it with SIGKILL after `ms` milliseconds unless it finished, and
/// returns whether it was killed.
fn kill_after(args: &[&str], ms: u64) -> bool {
    kill_when(args, || true, ms)
}

/// Starts `lmx args`, waits until `event()` holds (at most a minute), kills it with SIGKILL
/// `ms` milliseconds later unless it finished, and returns whether it was killed. Timing
/// kills from an observed event, not from the start, keeps them where they are meant to land
/// however loaded the machine is (CI runs the tests side by side on 2 cores).
fn kill_when(args: &[&str], event: impl Fn() -> bool, ms: u64) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmx")).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("lmx starts");
    let finished = |child: &mut std::process::Child| child.try_wait().expect("wait").is_some();
    let give_up = Instant::now() + Duration::from_secs(60);
    while !event() {
        if finished(&mut child) {
            return false;
        }
        assert!(Instant::now() < give_up, "lmx {args:?}: the awaited event did not come within a minute");
        std::thread::sleep(Duration::from_millis(2));
    }
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        if finished(&mut child) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    true
}

/// A model folder loads and generates.
fn loads(model: &Path, adapter: Option<&Path>) -> bool {
    let m = path_str(model);
    let mut args = vec!["generate", "--model", &m, "-p", "a b", "-m", "2"];
    let a;
    if let Some(p) = adapter {
        a = path_str(p);
        args.extend(["--adapter-path", &a]);
    }
    let out = lmx(&args);
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.success()
}

/// The visible (not hidden) entries of a folder.
fn visible(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| !n.starts_with('.')).collect()).unwrap_or_default();
    v.sort();
    v
}

/// The hidden temporary outputs in a folder.
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.contains(".partial-")).collect()).unwrap_or_default()
}

#[test]
fn convert_killed_anywhere_leaves_nothing_or_a_complete_model() {
    let dir = temp_dir("kill-convert");
    let model = default_model();
    let mut killed = 0;
    for (i, ms) in [40u64, 120, 250, 400, 600, 900, 1300].iter().enumerate() {
        let out = dir.join(format!("q{i}"));
        let o = path_str(&out);
        killed += usize::from(kill_after(&["convert", "--gguf", &model, "--mlx-path", &o, "-q"], *ms));
        if out.exists() {
            assert!(loads(&out, None), "a killed convert left {} incomplete", out.display());
            continue;
        }
        // The next run into the same place works and removes the killed run's leftovers.
        let again = lmx(&["convert", "--gguf", &model, "--mlx-path", &o, "-q"]);
        assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
        assert!(loads(&out, None));
        assert!(partials(&dir).is_empty(), "stale temporary outputs left: {:?}", partials(&dir));
    }
    assert!(killed >= 3, "the kills must land while converting (only {killed} did)");
}

#[test]
fn lora_and_fuse_killed_anywhere_keep_a_loadable_adapter_folder() {
    let dir = temp_dir("kill-lora");
    let model = tiny_model("kill-lora-model");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data");
    let lines: String = (0..32).map(|i| format!("{{\"text\": \"{}\"}}\n", ["a b c", "b c a", "c a b a"][i % 3])).collect();
    for split in ["train", "valid"] {
        std::fs::write(data.join(format!("{split}.jsonl")), &lines).expect("write");
    }
    let m = path_str(&model);
    let d = path_str(&data);
    let (mut killed, mut saved) = (0, 0);
    // (ms, timed from the first save). Kills timed from the start land before the first save
    // (at iteration 40) or in the steps after it; kills timed from the moment the first
    // weights appear land in the steps after it and in the second save (iteration 80).
    let kills = [(30, false), (80, false), (150, false), (300, false), (0, true), (1, true), (5, true), (20, true), (60, true)];
    for (i, (ms, from_first_save)) in kills.into_iter().enumerate() {
        let ad = dir.join(format!("ad{i}"));
        let a = path_str(&ad);
        let args =
            ["lora", "--model", &m, "--train", "--data", &d, "--adapter-path", &a, "--batch-size", "2", "--num-layers", "2", "--iters", "100000", "--save-every", "40", "--steps-per-eval", "1000000"];
        let weights_exist = || ad.join("adapters.safetensors").exists();
        killed += usize::from(if from_first_save { kill_when(&args, weights_exist, ms) } else { kill_after(&args, ms) });
        let files = visible(&ad);
        // Nothing, or the config with its weights (never a config alone).
        let has = |f: &str| files.iter().any(|x| x == f);
        assert_eq!(has("adapter_config.json"), has("adapters.safetensors"), "inconsistent adapter folder: {files:?}");
        if !has("adapters.safetensors") {
            continue;
        }
        saved += 1;
        assert!(loads(&model, Some(&ad)), "the adapters left by a kill do not load");
        // Training resumes from them, and the resumed run's folder is complete.
        let resumed = dir.join(format!("resumed{i}"));
        let weights = path_str(&ad.join("adapters.safetensors"));
        let out =
            lmx(&["lora", "--model", &m, "--train", "--data", &d, "--adapter-path", &path_str(&resumed), "--batch-size", "2", "--num-layers", "2", "--iters", "2", "--resume-adapter-file", &weights]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Fusing, killed or not, leaves nothing or a model that loads.
        let fused = dir.join(format!("fused{i}"));
        let f = path_str(&fused);
        kill_after(&["fuse", "--model", &m, "--adapter-path", &a, "--save-path", &f], [0, 10, 40, 100][i % 4]);
        if fused.exists() {
            assert!(loads(&fused, None));
        }
    }
    assert!(killed >= 3, "the kills must land while training (only {killed} did)");
    assert!(saved >= 5, "the kills timed from the first save must find its weights (only {saved} did)");
}
