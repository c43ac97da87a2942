//! lmx-dist: the collectives tensor- and pipeline-parallel layers use.
//!
//! A [`Group`] is the set of processes (ranks) that share one model. Layers call it to sum the
//! partial outputs of row-parallel products (`all_sum`), gather column-parallel outputs
//! (`all_gather`) and pass activations between pipeline stages (`send`, `recv`). Backends:
//! [`Single`] (a world of one: every collective is the identity), [`InProcess`] (ranks are
//! threads of one process; tests run worlds of 2 and 3 with it), [`Mpi`] (Open MPI: the
//! processes `mpirun` / `lmx launch` started; every collective bounded by a timeout).

mod in_process;
pub mod mpi;

pub use in_process::InProcess;
pub use mpi::Mpi;

use lmx_core::{Result, Tensor};

/// The ranks sharing one model, and the collectives between them. Every rank of a group must
/// call the same collectives in the same order with tensors of the same shape.
pub trait Group: Send + Sync + std::fmt::Debug {
    /// This process's index, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// The element-wise sum of `x` over all ranks, returned on every rank. Every rank sums in
    /// rank order, so all ranks hold bit-identical results.
    fn all_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// The ranks' `x` concatenated along `dim` in rank order (shapes may differ along `dim`).
    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor>;
    /// Sends `x` to rank `dst`; returns once it is handed over, waiting (for a large tensor,
    /// until `dst` receives it) at most as `wait` says.
    fn send(&self, x: &Tensor, dst: usize, wait: Wait) -> Result<()>;
    /// Receives the next tensor rank `src` sent to this rank, waiting at most as `wait` says.
    fn recv(&self, src: usize, wait: Wait) -> Result<Tensor>;
    /// Rank `root`'s `x` (shape and dtype included) on every rank; the other ranks pass `None`
    /// (or anything: it is ignored). `wait` bounds how long a rank waits for the root.
    fn broadcast(&self, x: Option<&Tensor>, root: usize, wait: Wait) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&self, wait: Wait) -> Result<()>;
    /// Returns once the device work that produced `x` (collectives included) is done, within
    /// the group's timeout. Where collectives run asynchronously (NCCL on a GPU), this is
    /// where a peer that never joins a sum is caught and named. A no-op elsewhere.
    fn settle(&self, _x: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Whether `all_sum` of GPU tensors can be recorded into a CUDA graph (NCCL on the
    /// device's own stream): decode steps of tensor-parallel ranks are then replayed as graphs.
    fn capturable(&self) -> bool {
        false
    }
    /// Sub-groups: the ranks passing the same `color` form one, ranked by `key` (then by
    /// their rank here). Every rank calls it; e.g. tensor parallel within a host and data
    /// parallel across hosts.
    fn split(&self, color: usize, key: usize) -> Result<std::sync::Arc<dyn Group>>;
}

/// How long a collective waits for the other ranks before it declares one of them stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The group's timeout (`lmx launch --timeout`): the ranks are computing the same thing
    /// and arrive within moments of each other.
    Collective,
    /// This long (e.g. while every rank loads its shards).
    For(std::time::Duration),
    /// No bound: the root is waiting for a person (the next chat message). A rank that dies
    /// still ends the job (the launcher stops the others).
    Forever,
}

/// Rank `root`'s bytes on every rank (the others pass `None`).
pub fn broadcast_bytes(group: &dyn Group, data: Option<&[u8]>, root: usize, wait: Wait) -> Result<Vec<u8>> {
    let x = match (group.rank() == root, data) {
        (true, Some(d)) => Some(Tensor::from_slice(d, d.len(), &lmx_core::Device::Cpu)?),
        (true, None) => lmx_core::bail!("broadcast: the root rank {root} has nothing to send"),
        (false, _) => None,
    };
    group.broadcast(x.as_ref(), root, wait)?.to_vec1::<u8>()
}

/// A world of one process: collectives are the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Group for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn all_gather(&self, x: &Tensor, _dim: usize) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn send(&self, _x: &Tensor, dst: usize, _wait: Wait) -> Result<()> {
        lmx_core::bail!("send to rank {dst}: a single-process group has no other rank")
    }
    fn recv(&self, src: usize, _wait: Wait) -> Result<Tensor> {
        lmx_core::bail!("recv from rank {src}: a single-process group has no other rank")
    }
    fn broadcast(&self, x: Option<&Tensor>, root: usize, _wait: Wait) -> Result<Tensor> {
        match (root, x) {
            (0, Some(x)) => Ok(x.clone()),
            _ => lmx_core::bail!("broadcast from rank {root}: a single-process group has only rank 0, which must pass its tensor"),
        }
    }
    fn barrier(&self, _wait: Wait) -> Result<()> {
        Ok(())
    }
    fn split(&self, _color: usize, _key: usize) -> Result<std::sync::Arc<dyn Group>> {
        Ok(std::sync::Arc::new(Single))
    }
}

/// The contiguous part `[start, end)` of `0..total` that `rank` of `size` holds when `total`
/// is cut into pieces of `unit` (the last unit may be partial) spread as evenly as possible:
/// the first `n_units % size` ranks hold one unit more. `total = 9, unit = 1` over 2 ranks is
/// 0..5 and 5..9.
pub fn split_range(total: usize, unit: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let unit = unit.max(1);
    let n_units = total.div_ceil(unit);
    let (base, extra) = (n_units / size, n_units % size);
    let first = rank * base + rank.min(extra);
    let count = base + usize::from(rank < extra);
    (first * unit).min(total)..((first + count) * unit).min(total)
}

/// This process's share of its host's memory, in GiB: the host's total memory over the
/// ranks `mpirun` started on it (all of it when not launched; 1 where /proc is unavailable).
/// Pipeline stages get layers in proportion to it.
pub fn memory_share() -> f64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().trim_end_matches("kB").trim().parse::<f64>().ok()));
    let local: f64 = std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok().and_then(|s| s.parse().ok()).filter(|n: &f64| *n >= 1.0).unwrap_or(1.0);
    total_kib.map_or(1.0, |k| k / (1024.0 * 1024.0) / local)
}

/// `0..total` cut into one contiguous range per weight, sizes proportional to the weights
/// (largest remainders rounded up), every range at least one unit when `total` allows: the
/// layers of pipeline stages on hosts of different memory.
pub fn proportional_ranges(total: usize, weights: &[f64]) -> Vec<std::ops::Range<usize>> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let sum: f64 = weights.iter().map(|w| w.max(0.0)).sum();
    let shares: Vec<f64> = if sum > 0.0 { weights.iter().map(|w| w.max(0.0) / sum * total as f64).collect() } else { vec![total as f64 / n as f64; n] };
    let mut counts: Vec<usize> = shares.iter().map(|s| s.floor() as usize).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| (shares[b] - shares[b].floor()).total_cmp(&(shares[a] - shares[a].floor())).then(a.cmp(&b)));
    let mut left = total - counts.iter().sum::<usize>();
    for &i in order.iter().cycle().take(n * 2) {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    // Every stage gets a unit, taken from the largest.
    while total >= n && counts.contains(&0) {
        let (small, big) = (counts.iter().position(|&c| c == 0).unwrap_or(0), (0..n).max_by_key(|&i| counts[i]).unwrap_or(0));
        counts[big] -= 1;
        counts[small] += 1;
    }
    let mut start = 0;
    counts
        .into_iter()
        .map(|c| {
            let r = start..start + c;
            start += c;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_ranges_follow_the_weights() {
        assert_eq!(proportional_ranges(30, &[1.0, 1.0]), vec![0..15, 15..30]);
        assert_eq!(proportional_ranges(30, &[64.0, 32.0]), vec![0..20, 20..30]);
        assert_eq!(proportional_ranges(10, &[1.0, 1.0, 1.0]), vec![0..4, 4..7, 7..10]);
        assert_eq!(proportional_ranges(4, &[100.0, 1.0, 1.0]), vec![0..2, 2..3, 3..4]);
        assert_eq!(proportional_ranges(5, &[0.0, 0.0]), vec![0..3, 3..5]);
        for (total, w) in [(80, vec![3.0, 5.0, 7.0]), (7, vec![1.0, 2.0]), (2, vec![1.0, 9.0])] {
            let r = proportional_ranges(total, &w);
            assert_eq!(r.last().map(|r| r.end), Some(total));
            assert!(r.windows(2).all(|p| p[0].end == p[1].start) && r.iter().all(|r| !r.is_empty()), "{r:?}");
        }
    }

    #[test]
    fn ranges_cover_everything_once_and_balance() {
        assert_eq!(split_range(9, 1, 0, 2), 0..5);
        assert_eq!(split_range(9, 1, 1, 2), 5..9);
        assert_eq!(split_range(4, 1, 2, 3), 3..4);
        assert_eq!(split_range(1536, 64, 1, 2), 768..1536);
        // 3 groups of 64 over 2 ranks: 2 + 1 groups.
        assert_eq!(split_range(192, 64, 0, 2), 0..128);
        for (total, unit, size) in [(10, 3, 3), (7, 1, 4), (96, 32, 3), (5, 1, 8)] {
            let mut next = 0;
            for rank in 0..size {
                let r = split_range(total, unit, rank, size);
                assert_eq!(r.start, next, "{total} {unit} {size}");
                next = r.end;
            }
            assert_eq!(next, total);
        }
    }
}
