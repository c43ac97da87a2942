//! `lmx launch` for real: Open MPI's mpirun starts 2 and 3 ranks of this lmx binary on this
//! machine, each holding its shard of the default model: a share of every layer (tensor
//! parallel; SmolLM2-135M's 9 query and 3 key/value heads split unevenly) or a range of its
//! 30 layers (`--pipeline`). Greedy f32 output equals one process's; stdin reaches
//! rank 0; a killed or stopped rank ends the job with one line naming it.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{default_model, lmx, lmx_stdin};

const PROMPT: &str = "Write a haiku about the sea.";

fn launch(n: usize, args: &[&str], stdin: Option<&str>) -> Output {
    let n = n.to_string();
    let mut all = vec!["launch", "-n", &n, "--"];
    all.extend_from_slice(args);
    match stdin {
        Some(text) => lmx_stdin(&all, text),
        None => lmx(&all),
    }
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn tensor_parallel_generation_equals_one_process() {
    let model = default_model();
    let args = ["generate", "--model", &model, "--dtype", "float32", "-p", PROMPT, "-m", "32"];
    let alone = lmx(&args);
    check(&alone, "lmx generate");
    assert!(text(&alone).len() > 40, "too little text: {:?}", text(&alone));
    let pipeline: Vec<&str> = args.iter().copied().chain(["--pipeline"]).collect();
    for (n, args) in [(2, &args[..]), (3, &args[..]), (2, &pipeline[..]), (3, &pipeline[..])] {
        let out = launch(n, args, None);
        check(&out, "lmx launch");
        assert_eq!(text(&out), text(&alone), "{n} ranks generated other text than one process ({args:?})");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.matches("Generation:").count(), 1, "statistics from more than rank 0:\n{stderr}");
        assert!(!stderr.contains("[rank"), "a rank complained:\n{stderr}");
    }
}

#[test]
fn stdin_reaches_rank_0_and_chat_works() {
    let model = default_model();
    let args = ["generate", "--model", &model, "-p", "-", "-m", "12"];
    let alone = lmx_stdin(&args, "What is the capital of France?");
    check(&alone, "lmx generate");
    let out = launch(2, &args, Some("What is the capital of France?"));
    check(&out, "lmx launch generate -p -");
    assert_eq!(text(&out), text(&alone));
    // Two turns of chat: every line is read by rank 0 and given to rank 1.
    let chat = ["chat", "--model", &model, "-m", "12"];
    let turns = "Hi, who are you?\nAnd what can you do?\nq\n";
    let alone = lmx_stdin(&chat, turns);
    check(&alone, "lmx chat");
    let out = launch(2, &chat, Some(turns));
    check(&out, "lmx launch chat");
    assert_eq!(text(&out), text(&alone));
    assert_eq!(text(&out).lines().filter(|l| !l.is_empty()).count(), 2, "expected two replies: {:?}", text(&out));
}

#[test]
fn perplexity_under_launch_equals_one_process() {
    let model = default_model();
    let data = crate::repo_root().join("LICENSE");
    let data = data.to_string_lossy();
    let args = ["perplexity", "--model", &model, "--dtype", "float32", "--data", &data, "--sequence-length", "64", "--num-samples", "3"];
    let alone = lmx(&args);
    check(&alone, "lmx perplexity");
    let out = launch(2, &args, None);
    check(&out, "lmx launch perplexity");
    assert!(text(&alone).starts_with("Perplexity: "), "{}", text(&alone));
    // The default GGUF runs packed: each rank rounds its share of a row-parallel layer's input
    // to int8 on its own, so the two agree within that rounding, not to the last digit.
    let ppl = |t: &str| t.trim_start_matches("Perplexity: ").split(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or_else(|| panic!("no perplexity in {t:?}"));
    let (a, b) = (ppl(&text(&alone)), ppl(&text(&out)));
    assert!((a - b).abs() <= 1e-3 * a, "perplexity {b} under launch, {a} in one process");
}

#[test]
fn commands_that_do_not_shard_are_refused() {
    // Every rank fails the same way; the error is said once.
    let out = launch(3, &["convert", "--hf-path", "x", "--mlx-path", "y"], None);
    crate::assert_clear_error(&out, &["does not run under lmx launch"]);
    let out = launch(2, &["generate", "--model", "no-such-model"], None);
    crate::assert_clear_error(&out, &["no-such-model", "not found"]);
    // NCCL needs a CUDA build: a CPU-only binary says so once.
    if !String::from_utf8_lossy(&lmx(&["--version"]).stdout).contains("CUDA") {
        let model = default_model();
        let out = lmx(&["launch", "-n", "2", "--backend", "nccl", "--", "generate", "--model", &model, "-p", "hi"]);
        crate::assert_clear_error(&out, &["nccl", "--features cuda"]);
    }
    let model = default_model();
    let out = launch(2, &["serve", "--model", &model, "--draft-model", &model], None);
    crate::assert_clear_error(&out, &["--draft-model", "lmx launch"]);
    let out = lmx(&["launch", "--backend", "ring", "--", "generate"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--backend ring"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The pid of rank `rank` of the job whose ranks carry `LMX_TEST_TAG=tag`, once it exists.
fn rank_pid(tag: &str, rank: usize) -> Option<i32> {
    let want = [format!("LMX_TEST_TAG={tag}"), format!("OMPI_COMM_WORLD_RANK={rank}")];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else { continue };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if want.iter().all(|w| vars.contains(&w.as_bytes())) {
            return Some(pid);
        }
    }
    None
}

/// Starts a long generation over 2 ranks, sends `signal` to rank 1 once it is decoding, and
/// returns how long the job took to end after that, and its stderr.
fn signal_rank_1(signal: i32, tag: &str, timeout: &str) -> (Output, Duration) {
    let model = default_model();
    let tag_env = format!("LMX_TEST_TAG={tag}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmx"))
        .args(["launch", "-n", "2", "--timeout", timeout, "--env", &tag_env, "--", "generate", "--model", &model, "-p", "Tell me a long story.", "-m", "100000", "--ignore-eos"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lmx launch starts");
    // Rank 0 prints as it decodes: wait for its first words.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 16];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("the ranks start generating");
    let pid = rank_pid(tag, 1).expect("rank 1's process");
    // SAFETY: sending a signal to a process of this test.
    unsafe { libc::kill(pid, signal) };
    let sent = Instant::now();
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let deadline = sent + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = sent.elapsed();
    if child.try_wait().expect("wait").is_none() {
        let _ = child.kill();
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let out = child.wait_with_output().expect("lmx launch ends");
    let _ = drain.join();
    let _ = std::io::stderr().flush();
    (out, took)
}

#[test]
fn a_killed_rank_ends_the_job_with_its_name() {
    let (out, took) = signal_rank_1(libc::SIGKILL, &format!("kill-{}", std::process::id()), "20");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("ended {took:?} after the kill:\n{stderr}");
    assert!(!out.status.success(), "the job succeeded although rank 1 was killed");
    assert!(took < Duration::from_secs(30), "the job took {took:?} to end");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    assert!(errors[0].contains("rank 1") && errors[0].contains("signal 9"), "{stderr}");
}

#[test]
fn a_stopped_rank_is_named_after_the_timeout() {
    let (out, took) = signal_rank_1(libc::SIGSTOP, &format!("stop-{}", std::process::id()), "3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("ended {took:?} after the stop:\n{stderr}");
    assert!(!out.status.success(), "the job succeeded although rank 1 was stopped");
    assert!(took < Duration::from_secs(30), "the job took {took:?} to end");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    assert!(errors[0].contains("rank 1 did not join") && errors[0].contains("(rank 0 waited)"), "{stderr}");
}

/// The losses an `lmx lora` run reported: ("Train" or "Val", iteration, loss).
fn reported_losses(stderr: &str) -> Vec<(String, String, f64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let (it, rest) = l.strip_prefix("Iter ")?.split_once(": ")?;
            let (kind, value) = rest.split_once(" loss ")?;
            Some((kind.to_string(), it.to_string(), value.split(',').next()?.parse().ok()?))
        })
        .collect()
}

/// `lmx lora` over 2 ranks (each training on half of every batch, gradients summed) reports
/// the losses one process does and writes the same adapters, from rank 0 alone.
#[test]
fn data_parallel_lora_follows_one_process() {
    let model = default_model();
    let data = crate::repo_root().join("tests/fixtures/facts");
    let data = data.to_string_lossy();
    let dirs = [crate::temp_dir("dp-lora-alone"), crate::temp_dir("dp-lora-launch")];
    let adapter_dirs: Vec<String> = dirs.iter().map(|d| d.join("adapters").to_string_lossy().into_owned()).collect();
    let run = |n: usize, adapters: &str| {
        let args = [
            "lora",
            "--model",
            &model,
            "--train",
            "--data",
            &data,
            "--adapter-path",
            adapters,
            "--batch-size",
            "4",
            "--iters",
            "6",
            "--num-layers",
            "2",
            "--steps-per-report",
            "1",
            "--steps-per-eval",
            "3",
            "--val-batches",
            "2",
            "--learning-rate",
            "1e-4",
        ];
        let out = if n == 1 { lmx(&args) } else { launch(n, &args, None) };
        check(&out, "lmx lora");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let alone = reported_losses(&run(1, &adapter_dirs[0]));
    let launched = reported_losses(&run(2, &adapter_dirs[1]));
    assert_eq!(alone.len(), 6 + 3, "{alone:?}");
    assert_eq!(launched.len(), alone.len(), "{launched:?}");
    for (a, b) in alone.iter().zip(&launched) {
        // Printed with 3 decimals: equal up to the last printed digit.
        assert!(a.0 == b.0 && a.1 == b.1 && (a.2 - b.2).abs() <= 1e-3 + 1e-9, "one process {a:?}, 2 ranks {b:?}");
    }
    let read = |dir: &str| lmx::io::safetensors_io::read_safetensors_with_metadata(&std::path::Path::new(dir).join("adapters.safetensors")).map(|(t, _)| t).expect("adapters");
    let (a, b) = (read(&adapter_dirs[0]), read(&adapter_dirs[1]));
    assert_eq!(a.len(), b.len());
    for (key, t) in &a {
        let d = (t - &b[key]).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff");
        assert!(d < 1e-4, "{key}: adapters of 2 ranks differ from one process's by {d}");
    }
    // No half-written or per-rank leftovers: the folder holds what one process writes.
    let names = |dir: &str| {
        let mut v: Vec<String> = std::fs::read_dir(dir).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&adapter_dirs[0]), names(&adapter_dirs[1]));
}

/// Two hosts reached over ssh through an mlx.launch hostfile: network namespaces of this
/// machine, each with its own address and sshd (tests/multihost/run.sh). Skipped, saying so,
/// where namespaces cannot be made (no root).
#[test]
fn two_hosts_over_ssh_through_a_hostfile() {
    let model = default_model();
    let args = ["generate", "--dtype", "float32", "-p", PROMPT, "-m", "24"];
    let mut alone_args = args.to_vec();
    alone_args.extend(["--model", &model]);
    let alone = lmx(&alone_args);
    check(&alone, "lmx generate");
    let out = Command::new(crate::repo_root().join("tests/multihost/run.sh")).arg(env!("CARGO_BIN_EXE_lmx")).arg(&model).args(args).output().expect("tests/multihost/run.sh runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(77) {
        println!("skipped: {stderr}");
        return;
    }
    check(&out, "lmx launch --hostfile over ssh");
    for host in ["10.231.0.2", "10.231.0.3"] {
        assert!(stderr.contains(&format!("{host}: ok (lmx ")) && stderr.contains("model readable"), "the hosts check did not pass {host}:\n{stderr}");
    }
    assert_eq!(text(&out), text(&alone), "two hosts generated other text than one process:\n{stderr}");
}

/// A mixture-of-experts model (the qwen3_moe fixture, 8 experts, with a word for every token
/// id) under `lmx launch`: tensor parallel (every expert's features split) and expert
/// parallel (`--expert-parallel`: whole experts per rank, 4 + 4 or 3 + 3 + 2) generate the
/// same greedy tokens as one process, and so does the fixture as `mlx_lm.convert` wrote it in
/// 4 bits (stacked experts; a 2-rank tensor-parallel split gives one rank all of each
/// expert's 32 features, one quantization group, and the other none).
#[test]
fn moe_models_under_launch_equal_one_process() {
    let fixtures = crate::repo_root().join("tests/fixtures");
    let dir = std::env::temp_dir().join(format!("lmx-launch-moe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let words: Vec<String> = (0..160).map(|i| format!("\"w{i}\": {i}")).collect();
    let tokenizer = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,"model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
        words.join(",")
    );
    for (name, src) in [("hf", fixtures.join("qwen3_moe")), ("mlx-q4", fixtures.join("qwen3_moe_mlx/q4"))] {
        let model = dir.join(name);
        std::fs::create_dir_all(&model).expect("mkdir");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), model.join(f)).expect("copy fixture");
        }
        std::fs::write(model.join("tokenizer.json"), &tokenizer).expect("tokenizer");
        let model = model.to_string_lossy().into_owned();
        let args = ["generate", "--model", &model, "--dtype", "float32", "--ignore-chat-template", "-p", "w1 w7 w42 w3", "-m", "12"];
        let alone = lmx(&args);
        check(&alone, "lmx generate");
        assert!(text(&alone).split_whitespace().count() >= 10, "too little text: {:?}", text(&alone));
        let ep: Vec<&str> = args.iter().copied().chain(["--expert-parallel"]).collect();
        // 3 ranks only in float: the 4-bit fixture's attention (4 heads of 16, groups of 32)
        // cannot be split 3 ways on group boundaries (a clear error, tested elsewhere).
        let runs: &[(usize, &[&str])] = if name == "hf" { &[(2, &args), (2, &ep), (3, &ep)] } else { &[(2, &args), (2, &ep)] };
        for &(n, args) in runs {
            let out = launch(n, args, None);
            check(&out, "lmx launch");
            assert_eq!(text(&out), text(&alone), "{name}: {n} ranks generated other text than one process ({args:?})");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same requests, overlapping the same way, to the server at `url`; their answers and the
/// prompt tokens the repeated prompt found in the prompt cache.
fn serve_workload(url: &str) -> (Vec<String>, u64) {
    use crate::serve::{post, raw_request, sequences};
    use serde_json::json;
    let chat = |content: &str, max: usize| json!({"messages": [{"role": "user", "content": content}], "max_tokens": max, "temperature": 0});
    let answer = |v: &serde_json::Value| v["choices"][0]["message"]["content"].as_str().expect("an answer").to_string();
    let prompts = ["Write a haiku about the sea.", "List three colors.", "What is 2 + 2?", "Name a planet.", "Tell me a joke about cats."];
    // Five at once, of different lengths: sequences join and leave the batch between steps.
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (url, body) = (url.to_string(), chat(p, 6 + 5 * i));
            std::thread::spawn(move || post(&url, "/v1/chat/completions", &body))
        })
        .collect();
    let mut answers: Vec<String> = handles.into_iter().map(|h| answer(&h.join().expect("a client thread"))).collect();
    // A client that leaves mid-answer (EOS banned: it would run 400 tokens).
    let body = json!({"messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 400, "temperature": 0, "stream": true, "logit_bias": {"2": -100}});
    let mut held = raw_request(url, "/v1/chat/completions", &body.to_string());
    let mut first = [0u8; 512];
    std::io::Read::read(&mut held, &mut first).expect("the stream starts");
    drop(held);
    let gone = Instant::now();
    while sequences(url) != 0 {
        assert!(gone.elapsed() < Duration::from_secs(20), "the sequence of a closed connection is still decoding");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The third prompt again (the first two finished first and left the cache, bounded to
    // three): its prefix comes from the prompt cache.
    let again = post(url, "/v1/chat/completions", &chat(prompts[2], 12));
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens");
    answers.push(answer(&again));
    // JSON mode: its grammar lives where the sampling happens.
    let body = json!({"messages": [{"role": "user", "content": "Describe a cat as JSON."}], "max_tokens": 24, "temperature": 0, "response_format": {"type": "json_object"}});
    answers.push(answer(&post(url, "/v1/chat/completions", &body)));
    (answers, cached)
}

#[test]
fn serve_under_launch_answers_as_one_process() {
    let args = ["--dtype", "float32", "--prompt-cache-size", "3", "--prompt-cache-bytes", "30MB"];
    let alone = crate::serve::Server::start(&args);
    let (expected, cached) = serve_workload(&alone.url);
    drop(alone);
    assert!(expected.iter().all(|a| !a.is_empty()), "{expected:?}");
    assert!(cached > 0, "the repeated prompt found nothing in the prompt cache");
    let pipeline: Vec<&str> = args.iter().copied().chain(["--pipeline"]).collect();
    // Four pipeline stages hold 8, 8, 7 and 7 of the 30 layers, so rank 0's caches are the
    // largest: at 9MB it keeps two where ranks 2 and 3 could keep three. They must drop what
    // rank 0 drops, or the repeated prompt would start from another prefix on each rank.
    let uneven = ["--dtype", "float32", "--prompt-cache-size", "3", "--prompt-cache-bytes", "9MB", "--pipeline"];
    for (i, (n, args)) in [("2", &args[..]), ("3", &args[..]), ("2", &pipeline[..]), ("4", &uneven[..])].into_iter().enumerate() {
        let tag = format!("serve-{}-{i}", std::process::id());
        let tag_env = format!("LMX_TEST_TAG={tag}");
        let server = crate::serve::Server::start_under(&["launch", "-n", n, "--env", &tag_env, "--"], args);
        assert_eq!(serve_workload(&server.url).0, expected, "{n} ranks {args:?} answered otherwise than one process");
        // Ctrl-C (SIGTERM) reaches mpirun, which stops the ranks; SIGKILL cannot be passed
        // on, but mpirun learns that its parent died and stops them all the same.
        let how = if i % 2 == 0 { libc::SIGTERM } else { libc::SIGKILL };
        // SAFETY: sending a signal to a process of this test.
        unsafe { libc::kill(server.pid(), how) };
        let sent = Instant::now();
        while rank_pid(&tag, 0).is_some() || rank_pid(&tag, 1).is_some() {
            assert!(sent.elapsed() < Duration::from_secs(20), "the ranks of {n} still serve 20 s after lmx launch got signal {how}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
