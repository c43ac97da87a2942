//! Running as one rank of `lmx launch` (Open MPI's `mpirun` started this process).
//!
//! Every rank runs the same command with the same flags and holds its shard of the model.
//! What only rank 0 can know (stdin, a random seed, a file on its disk) is read there and
//! broadcast, so all ranks compute the same thing. Rank 0 alone writes to stdout and stderr;
//! the others write nothing but their own errors, prefixed with their rank.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use lmx::dist::{Group, Wait};
use serde::{de::DeserializeOwned, Serialize};

/// How long ranks wait for each other after loading (a slow disk on one host).
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// The default bound on one collective (`lmx launch --timeout`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

static WORLD: OnceLock<Arc<dyn Group>> = OnceLock::new();
static MPI: OnceLock<Arc<lmx::dist::Mpi>> = OnceLock::new();
/// The real stderr of a rank other than 0 (its fd 2 is /dev/null).
static ERRORS: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Whether `mpirun` (`lmx launch`) started this process as one of several ranks.
pub fn launched() -> bool {
    lmx::dist::mpi::launched()
}

/// This process's rank as `mpirun` set it (0 when not launched).
pub fn env_rank() -> usize {
    std::env::var("OMPI_COMM_WORLD_RANK").ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Before anything runs: ranks other than 0 send stdout and stderr to /dev/null (keeping the
/// real stderr for their errors), and every rank takes its share of this host's cores unless
/// RAYON_NUM_THREADS says otherwise. Call before any thread starts.
pub fn prepare() {
    if !launched() {
        return;
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let local: usize = std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", (cores / local).max(1).to_string());
    }
    if env_rank() == 0 {
        return;
    }
    // A panic says where, on the real stderr, like any other error of this rank.
    std::panic::set_hook(Box::new(|info| report_error(&format!("panic: {info}"))));
    #[cfg(unix)]
    {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: dup and dup2 on the process's own standard descriptors; `saved` takes
        // ownership of the duplicate.
        unsafe {
            let saved = libc::dup(2);
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                libc::dup2(null.as_raw_fd(), 1);
                libc::dup2(null.as_raw_fd(), 2);
            }
            if saved >= 0 {
                let file = std::fs::File::from_raw_fd(saved);
                if let Ok(copy) = file.try_clone() {
                    lmx::dist::mpi::report_errors_to(copy);
                }
                *ERRORS.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
            }
        }
    }
}

/// Prints the error line of the command: plain on rank 0, prefixed with the rank elsewhere;
/// in one write, so that lines of ranks sharing mpirun's stderr do not interleave.
pub fn report_error(line: &str) {
    let mut saved = ERRORS.lock().unwrap_or_else(|e| e.into_inner());
    let _ = match saved.as_mut() {
        Some(f) => f.write_all(format!("[rank {}] error: {line}\n", env_rank()).as_bytes()),
        None => std::io::stderr().write_all(format!("error: {line}\n").as_bytes()),
    };
}

/// Under `lmx launch`, a GPU asked for without an index (`--device auto` finding one, or
/// `cuda`) is this rank's own: the GPU numbered by its rank on this host.
pub fn rank_device(device: lmx::core::Device, spec: &str) -> anyhow::Result<lmx::core::Device> {
    if !launched() || !device.is_cuda() || spec.contains(':') {
        return Ok(device);
    }
    let local: usize = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    lmx::core::parse_device(&format!("cuda:{local}"))
        .with_context(|| format!("rank {} is rank {local} on its host and takes GPU {local}: start at most as many ranks per host as it has GPUs", env_rank()))
}

/// Joins the launched world (Open MPI) for a command that runs sharded.
pub fn join(command: &str) -> anyhow::Result<()> {
    let timeout = match std::env::var("LMX_DIST_TIMEOUT") {
        Ok(s) => Duration::from_secs_f64(s.parse::<f64>().ok().filter(|t| *t > 0.0).with_context(|| format!("LMX_DIST_TIMEOUT={s:?} must be a positive number of seconds"))?),
        Err(_) => DEFAULT_TIMEOUT,
    };
    let mut mpi = lmx::dist::Mpi::world(timeout).with_context(|| format!("lmx {command} under lmx launch"))?;
    if std::env::var("LMX_DIST_BACKEND").as_deref() == Ok("nccl") {
        mpi = mpi.with_nccl().context("lmx launch --backend nccl")?;
    }
    let group = Arc::new(mpi);
    let _ = MPI.set(group.clone());
    let _ = WORLD.set(group);
    Ok(())
}

/// The launched world, when this process is one of its ranks.
pub fn group() -> Option<Arc<dyn Group>> {
    WORLD.get().cloned()
}

/// After the model loaded: waits (up to 10 minutes) until every rank has its shards.
pub fn loaded() -> anyhow::Result<()> {
    if let Some(g) = group() {
        g.barrier(Wait::For(LOAD_TIMEOUT)).context("waiting for the other ranks to load the model")?;
    }
    Ok(())
}

/// The command succeeded on this rank: waits for the others, then ends MPI (a rank still
/// computing is waited for, a stuck one named by the barrier's timeout).
pub fn finish() -> anyhow::Result<()> {
    if let Some(g) = group() {
        g.barrier(Wait::Collective).context("waiting for the other ranks to finish")?;
        if let (Some(mpi), Some(mut err)) =
            (MPI.get(), std::env::var_os("LMX_DIST_VERBOSE").and(ERRORS.lock().unwrap_or_else(|e| e.into_inner()).take().or_else(|| std::fs::OpenOptions::new().write(true).open("/dev/stderr").ok())))
        {
            let (calls, busy) = mpi.stats();
            let _ = writeln!(err, "[rank {}] {calls} collectives, {:.3} s in collectives and transfers", g.rank(), busy.as_secs_f64());
        }
        lmx::dist::mpi::finalize();
    }
    Ok(())
}

/// `read()` run on rank 0 and its result (or its error) given to every rank; just `read()`
/// when not launched. For what only rank 0 can know: stdin, a random seed, its files.
pub fn from_root<T: Serialize + DeserializeOwned>(read: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let Some(g) = group() else { return read() };
    let bytes = if g.rank() == 0 {
        let result = read().map_err(|e| format!("{e:#}"));
        Some(serde_json::to_vec(&result)?)
    } else {
        None
    };
    // Unbounded: rank 0 may be waiting for a person typing.
    let bytes = lmx::dist::broadcast_bytes(&*g, bytes.as_deref(), 0, Wait::Forever)?;
    let result: Result<T, String> = serde_json::from_slice(&bytes).context("decoding what rank 0 sent")?;
    result.map_err(|e| anyhow::anyhow!(e))
}

/// Refuses `flag` under `lmx launch` (it needs the whole model in one process).
pub fn refuse(flag: &str, present: bool) -> anyhow::Result<()> {
    anyhow::ensure!(!(present && group().is_some()), "{flag} does not work under lmx launch yet (each rank holds only its shard of the KV cache); run without launch");
    Ok(())
}
