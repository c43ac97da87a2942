//! `lmx launch`: runs an lmx command as several ranks (`mlx.launch`'s flags and hostfile),
//! started by Open MPI's `mpirun`, which places the processes (here or over ssh), forwards
//! stdin to rank 0 and output back, and stops every rank when one fails or on Ctrl-C. Rank 0
//! alone prints; mpirun's own multi-line notices are condensed into one line naming the rank.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;

/// Flags of `lmx launch`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  lmx launch -n 2 -- generate --prompt \"Hello\"              # 2 ranks here, every layer split between them\n  lmx launch -n 2 -- generate --pipeline --prompt \"Hello\"   # 2 ranks, half of the layers each\n  lmx launch -n 2 -- lora --train --data data/                # data-parallel fine-tuning\n  lmx launch -n 2 --backend nccl -- benchmark                 # 2 GPUs, sums over NCCL (CUDA build)\n  lmx launch --hosts h1,h2 --check -- chat --model /models/m  # are the hosts ready?\n  lmx launch --hostfile hosts.json -- perplexity --data text.txt\n\nMore: docs/DISTRIBUTED.md"
)]
pub struct Args {
    /// Ranks per host (all on this machine unless --hosts or --hostfile).
    #[arg(short = 'n', long = "repeat-hosts", default_value_t = 1)]
    pub repeat_hosts: usize,
    /// Comma-separated hosts to run on (reached over ssh; 127.0.0.1 is this machine).
    #[arg(long, conflicts_with = "hostfile")]
    pub hosts: Option<String>,
    /// mlx.launch's JSON hostfile: a list of {"ssh": host, "ips": [...]}, or an object
    /// {"backend", "envs": ["K=V"], "hosts": [...]}.
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// Collective backend: mpi (Open MPI for every tensor; GPU tensors pass through host
    /// memory) or nccl (NCCL sums GPU tensors GPU to GPU; needs a CUDA build and libnccl).
    #[arg(long)]
    pub backend: Option<String>,
    /// KEY=VALUE set in every rank's environment (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub envs: Vec<String>,
    /// A raw argument for mpirun (repeatable).
    #[arg(long = "mpi-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub mpi_args: Vec<String>,
    /// Working directory of the ranks on remote hosts.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Seconds a rank waits in a collective for the others before naming the one missing
    /// and stopping the job.
    #[arg(long, default_value_t = 20.0)]
    pub timeout: f64,
    /// Show mpirun's own messages whole and the command line it runs.
    #[arg(long)]
    pub verbose: bool,
    /// An argument for ssh when reaching the hosts (repeatable, e.g. --ssh-arg=-i
    /// --ssh-arg=~/.ssh/cluster): used by --check and by mpirun.
    #[arg(long = "ssh-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub ssh_args: Vec<String>,
    /// Check every host instead of running: reachable over ssh, the same lmx build at the
    /// same path, Open MPI installed, and the command's --model readable there.
    #[arg(long)]
    pub check: bool,
    /// Write the hosts (--hosts) as an mlx.launch hostfile to this path (after --check,
    /// only if every host passed), and exit.
    #[arg(long)]
    pub output_hostfile: Option<PathBuf>,
    /// The command: an lmx command and its flags (`generate ...`), or any program.
    #[arg(last = true, required_unless_present_any = ["check", "output_hostfile"], value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The lmx commands that run under launch; any other first word is a program run as-is.
const COMMANDS: &[&str] = &["generate", "chat", "perplexity", "benchmark", "cache-prompt", "convert", "lora", "fuse", "serve"];

/// A host of mlx.launch's hostfile (its `ips` and `rdma` are accepted and not used: Open MPI
/// picks the interfaces).
#[derive(serde::Deserialize)]
struct Host {
    ssh: String,
}

/// mlx.launch's hostfile, either form.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Hostfile {
    List(Vec<Host>),
    Object {
        #[serde(default)]
        backend: Option<String>,
        #[serde(default)]
        envs: Vec<String>,
        hosts: Vec<Host>,
    },
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    anyhow::ensure!(args.repeat_hosts > 0, "-n/--repeat-hosts must be at least 1");
    anyhow::ensure!(args.timeout > 0.0, "--timeout must be a positive number of seconds");
    let (hosts, file_backend, mut envs) = match &args.hostfile {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("--hostfile {}", path.display()))?;
            let hint = "a list of {\"ssh\": \"host\", \"ips\": [...]} or {\"backend\": ..., \"envs\": [...], \"hosts\": [...]}";
            let file: Hostfile = serde_json::from_str(&text).with_context(|| format!("--hostfile {}: expected mlx.launch's format, {hint}", path.display()))?;
            match file {
                Hostfile::List(hosts) => (hosts.into_iter().map(|h| h.ssh).collect(), None, Vec::new()),
                Hostfile::Object { backend, envs, hosts } => (hosts.into_iter().map(|h| h.ssh).collect(), backend, envs),
            }
        }
        None => (args.hosts.as_deref().unwrap_or("127.0.0.1").split(',').map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).collect::<Vec<_>>(), None, Vec::new()),
    };
    anyhow::ensure!(!hosts.is_empty(), "no hosts to run on: --hosts or the hostfile's \"hosts\" is empty");
    let backend = args.backend.clone().or(file_backend).unwrap_or_else(|| "mpi".into());
    anyhow::ensure!(backend == "mpi" || backend == "nccl", "--backend {backend}: lmx launch runs mpi (Open MPI) or nccl (NCCL sums GPU tensors; Open MPI starts the ranks and carries the rest)");
    envs.extend(args.envs.iter().cloned());
    for e in &envs {
        anyhow::ensure!(e.split_once('=').is_some_and(|(k, _)| !k.is_empty()), "--env {e:?}: expected KEY=VALUE");
    }
    if args.check || args.output_hostfile.is_some() {
        return check_and_write(&args, &hosts);
    }
    let local = hosts.iter().all(|h| is_local(h));
    let np = hosts.len() * args.repeat_hosts;
    // mpirun's hostfile: each host with as many slots as ranks it runs.
    let hostfile = if local {
        None
    } else {
        let text: String = hosts.iter().map(|h| format!("{h} slots={}\n", args.repeat_hosts)).collect();
        let path = std::env::temp_dir().join(format!("lmx-launch-hosts-{}", std::process::id()));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Some(path)
    };
    let mut cmd = lmx::dist::mpi::mpirun(np, hostfile.as_deref());
    if let Some(dir) = &args.cwd {
        cmd.arg("-wdir").arg(dir);
    }
    envs.push(format!("LMX_DIST_TIMEOUT={}", args.timeout));
    envs.push(format!("LMX_DIST_BACKEND={backend}"));
    // Rank 0's stdin is mpirun's pipe: tell it whether a person is typing (chat's prompt).
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        envs.push("LMX_STDIN_IS_TERMINAL=1".into());
    }
    for e in &envs {
        cmd.arg("-x").arg(e);
    }
    if !args.ssh_args.is_empty() {
        cmd.args(["--mca", "plm_rsh_args"]).arg(args.ssh_args.join(" "));
    }
    cmd.args(&args.mpi_args);
    if crate::THREADS_CHOSEN.load(std::sync::atomic::Ordering::SeqCst) {
        cmd.env_remove("RAYON_NUM_THREADS");
    }
    cmd.arg("--");
    if COMMANDS.contains(&args.command[0].as_str()) {
        cmd.arg(std::env::current_exe().context("finding the lmx binary to launch")?);
    }
    cmd.args(&args.command);
    if args.verbose {
        eprintln!("[lmx launch] {np} ranks: {cmd:?}");
    }
    cmd.stderr(std::process::Stdio::piped());
    // mpirun starts with the termination signals unblocked (this process blocks them for its
    // signal thread, and a blocked mask survives exec: mpirun would never see the Ctrl-C
    // passed on to it), and ends when lmx launch does, even by SIGKILL, which cannot be
    // passed on (a server left running on its own would hold its port).
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: sigemptyset, sigaddset, pthread_sigmask and prctl are async-signal-safe
        // and touch only the child being started.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::sigaddset(&mut set, s);
                }
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                #[cfg(target_os = "linux")]
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!("mpirun was not found: install Open MPI (Debian/Ubuntu: apt install openmpi-bin) or set LMX_MPIRUN to its path"),
        _ => anyhow::anyhow!("starting mpirun: {e}"),
    })?;
    crate::forward_signals_to(child.id());
    let stderr = child.stderr.take().context("mpirun's stderr")?;
    let summary = relay(stderr, args.verbose);
    let status = child.wait().context("waiting for mpirun");
    crate::forward_signals_to(0);
    let status = status?;
    if let Some(path) = hostfile {
        let _ = std::fs::remove_file(path);
    }
    if status.success() {
        return Ok(0);
    }
    if let Some(line) = summary {
        eprintln!("error: {line}");
    }
    Ok(status.code().unwrap_or(1).max(1))
}

fn is_local(host: &str) -> bool {
    host == "127.0.0.1" || host == "localhost"
}

/// `--check` and `--output-hostfile`: each host's report on stderr; the hostfile written only
/// when every checked host passed.
fn check_and_write(args: &Args, hosts: &[String]) -> anyhow::Result<i32> {
    if args.check {
        let exe = std::env::current_exe().context("finding the lmx binary")?;
        let model = args.command.iter().position(|a| a == "--model").and_then(|i| args.command.get(i + 1)).cloned();
        let mut failed = 0;
        let mut seen = std::collections::HashSet::new();
        for host in hosts.iter().filter(|h| seen.insert(h.as_str())) {
            match check_host(host, &exe, model.as_deref(), &args.ssh_args) {
                Ok(what) => eprintln!("{host}: ok ({what})"),
                Err(e) => {
                    failed += 1;
                    eprintln!("{host}: {e}");
                }
            }
        }
        if failed > 0 {
            anyhow::bail!("{failed} of {} hosts failed the check", seen.len());
        }
    }
    if let Some(path) = &args.output_hostfile {
        let list: Vec<serde_json::Value> = hosts.iter().map(|h| serde_json::json!({"ssh": h, "ips": if h.parse::<std::net::IpAddr>().is_ok() { vec![h.clone()] } else { vec![] }})).collect();
        let text = serde_json::to_string_pretty(&serde_json::json!({"backend": "mpi", "envs": args.envs, "hosts": list}))?;
        lmx::io::safetensors_io::write_atomic(path, format!("{text}\n").as_bytes()).with_context(|| format!("--output-hostfile {}", path.display()))?;
        eprintln!("Wrote {} ({} hosts)", path.display(), hosts.len());
    }
    Ok(0)
}

/// One host: the lmx at this binary's path answers with this build's version, Open MPI's
/// daemon is on its PATH, and `model` (a path) is readable. Returns what was found.
fn check_host(host: &str, exe: &std::path::Path, model: Option<&str>, ssh_args: &[String]) -> anyhow::Result<String> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let exe_s = exe.to_string_lossy();
    // Open MPI 4's daemon is orted, 5's prted.
    let mut script = format!("{} --version 2>&1; (command -v orted || command -v prted) >/dev/null && echo LMX_MPI_OK", quote(&exe_s));
    let local_model = model.filter(|m| std::path::Path::new(m).exists());
    if let Some(m) = local_model {
        script.push_str(&format!("; [ -r {} ] && echo LMX_MODEL_OK", quote(m)));
    }
    let output = if is_local(host) {
        std::process::Command::new("sh").arg("-c").arg(&script).output()
    } else {
        std::process::Command::new("ssh").args(ssh_args).args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, &script]).output()
    }
    .context("running ssh")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.lines().next().unwrap_or("").trim().to_string();
    let want = format!("lmx {}", crate::VERSION);
    if version.is_empty() {
        let err = String::from_utf8_lossy(&output.stderr);
        anyhow::bail!("not reachable, or no lmx at {exe_s}: {}", err.lines().last().unwrap_or("no answer").trim());
    }
    anyhow::ensure!(version == want, "{exe_s} is `{version}`, not this build's `{want}`: install the same lmx there");
    anyhow::ensure!(text.contains("LMX_MPI_OK"), "Open MPI is not installed (no orted or prted on the PATH of a non-interactive shell): apt install openmpi-bin");
    let mut found = format!("{version}, Open MPI");
    if let Some(m) = local_model {
        anyhow::ensure!(text.contains("LMX_MODEL_OK"), "--model {m} is not readable there: copy it to the same path");
        found.push_str(", model readable");
    }
    Ok(found)
}

/// Copies mpirun's stderr to ours, line by line. Its notices (blocks between lines of
/// dashes) are condensed: a rank killed by a signal becomes one line (returned, printed once
/// the job is over), notices about a rank that failed and already said why are dropped, and
/// others pass through whole; an error line several ranks print is printed once. `verbose`
/// passes everything through.
fn relay(stderr: impl std::io::Read, verbose: bool) -> Option<String> {
    relay_to(std::io::BufReader::new(stderr), &mut std::io::stderr(), verbose)
}

fn relay_to(input: impl BufRead, out: &mut impl Write, verbose: bool) -> Option<String> {
    let mut block: Option<Vec<String>> = None;
    let mut summary = None;
    // Ranks that fail the same way (a bad flag, a missing file) say so once, as rank 0.
    let mut errors = std::collections::HashSet::new();
    let mut deferred: Vec<String> = Vec::new();
    for line in input.lines() {
        let Ok(line) = line else { break };
        let rule = line.len() > 20 && line.chars().all(|c| c == '-');
        if verbose {
            let _ = writeln!(out, "{line}");
            continue;
        }
        match (&mut block, rule) {
            (None, true) => block = Some(Vec::new()),
            // A known harmless complaint of Open MPI 4 when a job is aborted.
            (None, false) if line.contains("ORTE_ERROR_LOG: Data unpack would read past end of buffer") => {}
            (None, false) => match line.strip_prefix("[rank ").and_then(|l| l.split_once("] error: ")) {
                // Another rank's error: said at the end, unless rank 0 said the same.
                Some((_, e)) => {
                    if errors.insert(e.to_string()) {
                        deferred.push(line);
                    }
                }
                None => {
                    if let Some(e) = line.strip_prefix("error: ") {
                        errors.insert(e.to_string());
                        deferred.retain(|d| !d.ends_with(&format!("] error: {e}")));
                    }
                    let _ = writeln!(out, "{line}");
                }
            },
            (Some(lines), false) => lines.push(line),
            (Some(lines), true) => {
                let text = lines.join("\n");
                match condense(&text) {
                    Notice::Summary(s) => summary = summary.or(Some(s)),
                    // Dropped only when a rank said why it failed.
                    Notice::Drop if !errors.is_empty() => {}
                    Notice::Drop | Notice::Keep => {
                        let _ = writeln!(out, "{text}");
                    }
                }
                block = None;
            }
        }
    }
    if let Some(lines) = block {
        let _ = writeln!(out, "{}", lines.join("\n"));
    }
    for line in deferred {
        let _ = writeln!(out, "{line}");
    }
    summary
}

enum Notice {
    Summary(String),
    Drop,
    Keep,
}

/// What to make of one of mpirun's notices.
fn condense(text: &str) -> Notice {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // "mpirun noticed that process rank 1 with PID 123 on node h exited on signal 9 (Killed)."
    if let Some(at) = flat.find("noticed that process rank ") {
        let rest = &flat[at + "noticed that process rank ".len()..];
        let rank = rest.split(' ').next().unwrap_or("?");
        let how = rest.find("exited on").map_or("exited", |i| rest[i..].trim_end_matches('.'));
        let node = rest.find("on node ").map(|i| rest[i + 8..].split(' ').next().unwrap_or("?")).unwrap_or("?");
        return Notice::Summary(format!("rank {rank} (on {node}) {how}; lmx launch stopped the other ranks"));
    }
    // Our own timeout already printed its error before calling MPI_Abort; a rank that
    // returned an error printed it; mpirun's follow-ups say the same again.
    if flat.contains("MPI_ABORT was invoked") || flat.contains("returned a non-zero exit code") || flat.contains("exited with non-zero status") {
        return Notice::Drop;
    }
    Notice::Keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpirun_notices_become_one_line() {
        let killed = "mpirun noticed that process rank 1 with PID 0 on node dev exited on signal 9 (Killed).";
        match condense(killed) {
            Notice::Summary(s) => assert_eq!(s, "rank 1 (on dev) exited on signal 9 (Killed); lmx launch stopped the other ranks"),
            _ => panic!("not summarized"),
        }
        assert!(matches!(condense("MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD\nwith errorcode 3."), Notice::Drop));
        assert!(matches!(condense("There are not enough slots available in the system"), Notice::Keep));
    }

    #[test]
    fn an_error_every_rank_prints_is_said_once_as_rank_0() {
        let relayed = |text: &str| {
            let mut out = Vec::new();
            relay_to(text.as_bytes(), &mut out, false);
            String::from_utf8(out).expect("utf-8")
        };
        let rule = "-".repeat(74);
        for text in [
            format!("[rank 1] error: no model\nerror: no model\n{rule}\nPrimary job terminated normally, but 1 process returned\na non-zero exit code.\n{rule}\n"),
            "error: no model\n[rank 1] error: no model\n[rank 2] error: no model\n".to_string(),
        ] {
            assert_eq!(relayed(&text), "error: no model\n");
        }
        // Errors of other ranks alone are kept, once each, after the rest.
        assert_eq!(relayed("[rank 2] error: disk full\nwarning\n[rank 1] error: disk full\n"), "warning\n[rank 2] error: disk full\n");
    }

    #[test]
    fn both_hostfile_forms_parse() {
        let list: Hostfile = serde_json::from_str(r#"[{"ssh": "h1", "ips": ["10.0.0.1"]}, {"ssh": "h2"}]"#).expect("list");
        assert!(matches!(list, Hostfile::List(h) if h.len() == 2 && h[1].ssh == "h2"));
        let object: Hostfile = serde_json::from_str(r#"{"backend": "mpi", "envs": ["A=1"], "hosts": [{"ssh": "h1", "ips": []}]}"#).expect("object");
        assert!(matches!(object, Hostfile::Object { backend: Some(b), envs, hosts } if b == "mpi" && envs == ["A=1"] && hosts.len() == 1));
    }
}
