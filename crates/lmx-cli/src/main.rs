//! The `lmx` binary: parses flags (named as in MLX LM) and calls the library. Errors are
//! printed as one chain on stderr with a non-zero exit code; nothing here panics on bad input.

mod alloc;
mod cmd;
mod dist;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(feature = "cuda")]
macro_rules! backend {
    () => {
        "CPU + CUDA"
    };
}
#[cfg(not(feature = "cuda"))]
macro_rules! backend {
    () => {
        "CPU only; build with --features cuda for NVIDIA GPUs"
    };
}
/// The version line: the crate version, the commit it was built from, and the backend.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("LMX_COMMIT"), ", ", backend!(), ")");

/// What `lmx` alone prints: what it is and how to start.
const START: &str = "lmx: run, quantize, fine-tune and chat with LLMs on your own machine (MLX LM's commands and formats, on Linux CPUs and NVIDIA GPUs).

Try:
  lmx generate --prompt \"What is photosynthesis?\"           # the default model, SmolLM2-135M-Instruct
  lmx chat --system-prompt \"You are terse.\"                 # multi-turn chat; q quits, h helps
  lmx convert --hf-path MODEL --mlx-path MODEL-4bit -q      # MLX's 4-bit format
  lmx lora --train --data DATA_DIR --adapter-path adapters  # LoRA fine-tuning with mlx_lm.lora's flags
  lmx serve --port 8080                                     # OpenAI- and Anthropic-compatible API server
  lmx launch -n 2 -- generate --prompt \"Hello\"             # 2 processes, the model split between them

Commands: generate, chat, convert, lora, fuse, serve, perplexity, benchmark, cache-prompt, launch. `lmx help` lists them,
`lmx COMMAND --help` shows a command's flags.";

/// Run, quantize, fine-tune and chat with large language models on your own machine.
#[derive(Parser)]
#[command(name = "lmx", version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (mlx_lm.generate).
    Generate(cmd::generate::Args),
    /// Chat in a terminal, keeping the KV cache across turns (mlx_lm.chat).
    Chat(cmd::chat::Args),
    /// Process a prompt once and save its KV cache to a file for generate --prompt-cache-file
    /// (mlx_lm.cache_prompt).
    CachePrompt(cmd::cache_prompt::Args),
    /// Perplexity of a model on a text file (mlx_lm.perplexity).
    Perplexity(cmd::perplexity::Args),
    /// Measure prompt and generation throughput on random tokens (mlx_lm.benchmark).
    Benchmark(cmd::benchmark::Args),
    /// Convert GGUF to a model folder, cast dtypes, quantize or dequantize (mlx_lm.convert).
    Convert(cmd::convert::Args),
    /// Fine-tune with LoRA, DoRA or full training, also on quantized models (mlx_lm.lora).
    Lora(Box<cmd::lora::Args>),
    /// Fuse trained adapters into a standalone model folder (mlx_lm.fuse).
    Fuse(cmd::fuse::Args),
    /// Run a command as several ranks, here or across machines, the model split between them
    /// (mlx.launch's flags and hostfile; Open MPI starts the processes).
    Launch(cmd::launch::Args),
    /// Serve the model over HTTP: OpenAI chat/completions/Responses and Anthropic Messages,
    /// streaming, tools, JSON-schema output, continuous batching (mlx_lm.server).
    Serve(Box<cmd::serve::Args>),
}

/// glibc's allocator, tuned by `alloc::init` and asking for huge pages (see `alloc`).
#[global_allocator]
static ALLOCATOR: alloc::HugePages = alloc::HugePages;

fn main() -> ExitCode {
    dist::prepare();
    // candle asks for the thread count on every matmul and, unless RAYON_NUM_THREADS is set,
    // answers by parsing /proc/cpuinfo (4% of decode time). Fix it once, before any thread
    // starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        THREADS_CHOSEN.store(true, std::sync::atomic::Ordering::SeqCst);
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // LMX_HUGE_PAGES=0 leaves the heap unmarked and glibc's heap padding as it is (to compare).
    alloc::init(std::env::var_os("LMX_HUGE_PAGES").is_none_or(|v| v != "0"));
    remove_temporaries_on_signals();
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        println!("{START}");
        return ExitCode::SUCCESS;
    };
    if let Command::Launch(args) = command {
        return match cmd::launch::run(args) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                eprintln!("error: lmx launch: {}", error_line(&e));
                ExitCode::FAILURE
            }
        };
    }
    let result = run(command).and_then(|()| dist::finish());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            dist::report_error(&error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    if dist::launched() {
        match &command {
            Command::Generate(_) => dist::join("generate")?,
            Command::Chat(_) => dist::join("chat")?,
            Command::Perplexity(_) => dist::join("perplexity")?,
            Command::Benchmark(_) => dist::join("benchmark")?,
            Command::Lora(_) => dist::join("lora")?,
            Command::Serve(_) => dist::join("serve")?,
            _ => anyhow::bail!("this command does not run under lmx launch (generate, chat, perplexity, benchmark, lora and serve do); run it without launch"),
        }
    }
    match command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::CachePrompt(args) => cmd::cache_prompt::run(args),
        Command::Convert(args) => cmd::convert::run(args),
        Command::Benchmark(args) => cmd::benchmark::run(args),
        Command::Perplexity(args) => cmd::perplexity::run(args),
        Command::Lora(args) => cmd::lora::run(*args),
        Command::Fuse(args) => cmd::fuse::run(args),
        Command::Serve(args) => cmd::serve::run(*args),
        Command::Launch(_) => anyhow::bail!("lmx launch cannot run under lmx launch"),
    }
}

/// Whether lmx chose RAYON_NUM_THREADS itself (the user did not set it): `lmx launch` then
/// leaves it to each rank to take its share of its host's cores.
pub static THREADS_CHOSEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The process the signal thread passes Ctrl-C (SIGINT, SIGTERM, SIGHUP) on to, instead of
/// exiting: `lmx launch`'s mpirun, which stops the ranks and then exits itself.
static FORWARD_SIGNALS_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Passes this process's termination signals on to `pid` from now on.
pub fn forward_signals_to(pid: u32) {
    FORWARD_SIGNALS_TO.store(i32::try_from(pid).unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
}

/// An error and its causes on one line, each cause once: a message that already quotes its
/// cause (`{path}: {source}`) is not followed by the cause again.
fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = without_backtrace(&cause.to_string()).to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// Ctrl-C (and SIGTERM, SIGHUP) remove the temporary outputs being written before the process
/// exits: the signals are blocked in every thread (set here, before any other thread starts,
/// and inherited) and one thread waits for them.
fn remove_temporaries_on_signals() {
    #[cfg(unix)]
    // SAFETY: plain libc signal-mask calls on a zeroed, then initialised, sigset_t; no other
    // thread exists yet, so every later thread inherits the mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        let waiter = std::thread::Builder::new().name("lmx-signals".into()).spawn(move || {
            // SAFETY: `set` is initialised and blocked in this thread; `info` is written by
            // sigwaitinfo before it is read.
            let mut info: libc::siginfo_t = std::mem::zeroed();
            while libc::sigwaitinfo(&set, &mut info) > 0 {
                let sig = info.si_signo;
                let child = FORWARD_SIGNALS_TO.load(std::sync::atomic::Ordering::SeqCst);
                if child > 0 {
                    // Ctrl-C at a terminal reaches mpirun too (same process group): pass on
                    // only signals sent to this process alone, or mpirun sees two and stops
                    // waiting for its ranks to end.
                    if info.si_code != libc::SI_KERNEL {
                        libc::kill(child, sig);
                    }
                    continue;
                }
                lmx::io::temp::remove_registered();
                std::process::exit(128 + sig);
            }
        });
        if waiter.is_err() {
            // No waiter: let the signals act as before.
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

/// `text` without a captured backtrace: candle appends one to its errors when RUST_BACKTRACE
/// is set (its frames start at a line `0: ...`), and lmx prints one error line.
fn without_backtrace(text: &str) -> &str {
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        if start > 0 && line.trim_start().starts_with("0: ") {
            return text[..start].trim_end();
        }
        start += line.len();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::without_backtrace;

    #[test]
    fn backtraces_are_cut_from_error_lines() {
        let with = "no CUDA kernel yet\n   0: candle_core::error::Error::bt\n             at src/error.rs:1\n   1: main";
        assert_eq!(without_backtrace(with), "no CUDA kernel yet");
        assert_eq!(without_backtrace("rules.txt:0: bad line"), "rules.txt:0: bad line");
        assert_eq!(without_backtrace("two\nlines"), "two\nlines");
    }
}
