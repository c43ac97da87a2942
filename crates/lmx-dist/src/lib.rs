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
    /// Sends `x` to rank `dst` (returns once it is handed over).
    fn send(&self, x: &Tensor, dst: usize) -> Result<()>;
    /// Receives the next tensor rank `src` sent to this rank, waiting at most as `wait` says.
    fn recv(&self, src: usize, wait: Wait) -> Result<Tensor>;
    /// Rank `root`'s `x` (shape and dtype included) on every rank; the other ranks pass `None`
    /// (or anything: it is ignored). `wait` bounds how long a rank waits for the root.
    fn broadcast(&self, x: Option<&Tensor>, root: usize, wait: Wait) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&self, wait: Wait) -> Result<()>;
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
    fn send(&self, _x: &Tensor, dst: usize) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
