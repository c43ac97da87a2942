//! A group whose ranks are threads of one process, exchanging tensors through shared memory.
//! It is the reference the real backends are tested against, and lets a test run a sharded
//! model over a world of 2 or 3 without launching processes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use lmx_core::{Result, Tensor};

use crate::{Group, Wait};

#[derive(Debug, Default)]
struct State {
    /// One slot per rank for the collective in progress.
    slots: Vec<Option<Tensor>>,
    /// Ranks arrived at the current barrier, and how many barriers have completed.
    arrived: usize,
    generation: u64,
    /// Point-to-point messages by (src, dst), in order.
    mail: HashMap<(usize, usize), VecDeque<Tensor>>,
    /// Set by [`InProcess::abort`]: every waiting or later call fails instead of hanging.
    aborted: bool,
    /// Splits each rank has made, and the sub-groups made so far by (split number, color).
    splits_made: Vec<u64>,
    sub_groups: HashMap<(u64, usize), Arc<Shared>>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

/// One rank of an in-process group (see [`InProcess::world`]).
#[derive(Debug, Clone)]
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
}

impl InProcess {
    /// The `size` ranks of one group; hand each to its own thread.
    pub fn world(size: usize) -> Vec<InProcess> {
        let state = State { slots: vec![None; size], splits_made: vec![0; size], ..State::default() };
        let shared = Arc::new(Shared { size, state: Mutex::new(state), changed: Condvar::new() });
        (0..size).map(|rank| InProcess { rank, shared: shared.clone() }).collect()
    }

    /// Makes every pending and later collective of the group fail: a rank that hit an error
    /// calls this so that the others do not wait for it forever.
    pub fn abort(&self) {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).aborted = true;
        self.shared.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn aborted() -> lmx_core::Error {
        lmx_core::Error::Msg("in-process group: another rank failed (the group was aborted)".into())
    }

    /// Waits until every rank has arrived (a reusable barrier).
    fn rendezvous<'a>(&'a self, mut state: std::sync::MutexGuard<'a, State>) -> Result<std::sync::MutexGuard<'a, State>> {
        let generation = state.generation;
        state.arrived += 1;
        if state.arrived == self.shared.size {
            state.arrived = 0;
            state.generation += 1;
            self.shared.changed.notify_all();
        }
        while state.generation == generation && !state.aborted {
            state = self.shared.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.aborted {
            return Err(Self::aborted());
        }
        Ok(state)
    }

    /// Every rank's `x`, in rank order: deposit, wait for all, read, wait until all have read
    /// (so the next collective cannot overwrite a slot still being read).
    fn exchange(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut state = self.lock();
        state.slots[self.rank] = Some(x.clone());
        let state = self.rendezvous(state)?;
        let all: Option<Vec<Tensor>> = state.slots.iter().cloned().collect();
        drop(self.rendezvous(state)?);
        all.ok_or_else(|| lmx_core::Error::Msg("in-process group: a rank did not contribute to the collective".into()))
    }
}

impl Group for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_sum(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.exchange(x)?;
        let mut sum = all[0].clone();
        for t in &all[1..] {
            sum = (sum + t)?;
        }
        Ok(sum)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        Tensor::cat(&self.exchange(x)?, dim)
    }

    fn send(&self, x: &Tensor, dst: usize, _wait: Wait) -> Result<()> {
        if dst >= self.size() {
            lmx_core::bail!("send to rank {dst}: the group has {} ranks", self.size());
        }
        self.lock().mail.entry((self.rank, dst)).or_default().push_back(x.clone());
        self.shared.changed.notify_all();
        Ok(())
    }

    fn broadcast(&self, x: Option<&Tensor>, root: usize, _wait: Wait) -> Result<Tensor> {
        if root >= self.size() {
            lmx_core::bail!("broadcast from rank {root}: the group has {} ranks", self.size());
        }
        let empty = Tensor::zeros(0, lmx_core::DType::U8, &lmx_core::Device::Cpu)?;
        let mine = if self.rank == root { x.ok_or_else(|| lmx_core::Error::Msg(format!("broadcast: the root rank {root} has no tensor to send")))? } else { &empty };
        Ok(self.exchange(mine)?.swap_remove(root))
    }

    fn barrier(&self, _wait: Wait) -> Result<()> {
        drop(self.rendezvous(self.lock())?);
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Group>> {
        let mine = Tensor::new(&[color as i64, key as i64], &lmx_core::Device::Cpu)?;
        let all = self.exchange(&mine)?.iter().map(|t| t.to_vec1::<i64>()).collect::<Result<Vec<_>>>()?;
        let mut members: Vec<(i64, usize)> = all.iter().enumerate().filter(|(_, ck)| ck[0] == color as i64).map(|(r, ck)| (ck[1], r)).collect();
        members.sort();
        let rank = members.iter().position(|&(_, r)| r == self.rank).unwrap_or(0);
        let mut state = self.lock();
        let n = state.splits_made[self.rank];
        state.splits_made[self.rank] += 1;
        let size = members.len();
        let shared = state
            .sub_groups
            .entry((n, color))
            .or_insert_with(|| {
                let sub = State { slots: vec![None; size], splits_made: vec![0; size], ..State::default() };
                Arc::new(Shared { size, state: Mutex::new(sub), changed: Condvar::new() })
            })
            .clone();
        Ok(Arc::new(InProcess { rank, shared }))
    }

    fn recv(&self, src: usize, _wait: Wait) -> Result<Tensor> {
        if src >= self.size() {
            lmx_core::bail!("recv from rank {src}: the group has {} ranks", self.size());
        }
        let mut state = self.lock();
        loop {
            if let Some(t) = state.mail.get_mut(&(src, self.rank)).and_then(VecDeque::pop_front) {
                return Ok(t);
            }
            if state.aborted {
                return Err(Self::aborted());
            }
            state = self.shared.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmx_core::{Device, Tensor};

    #[test]
    fn collectives_over_three_threads() -> Result<()> {
        // Per rank: the sum, the gathered parts, what it received.
        type Seen = (Vec<f32>, Vec<f32>, Vec<f32>);
        let results: Vec<Result<Seen>> = std::thread::scope(|s| {
            let handles: Vec<_> = InProcess::world(3)
                .into_iter()
                .map(|g| {
                    s.spawn(move || -> Result<_> {
                        let r = g.rank() as f32;
                        let x = Tensor::new(&[r, 10.0 * r], &Device::Cpu)?;
                        let sum = g.all_sum(&x)?.to_vec1::<f32>()?;
                        // Ranks contribute different lengths: rank r gives r + 1 elements.
                        let parts = Tensor::new(vec![r; g.rank() + 1].as_slice(), &Device::Cpu)?;
                        let gathered = g.all_gather(&parts, 0)?.to_vec1::<f32>()?;
                        // A ring: each rank sends to the next and receives from the previous.
                        g.send(&x, (g.rank() + 1) % 3, Wait::Collective)?;
                        let got = g.recv((g.rank() + 2) % 3, Wait::Collective)?.to_vec1::<f32>()?;
                        Ok((sum, gathered, got))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        for (rank, r) in results.into_iter().enumerate() {
            let (sum, gathered, got) = r?;
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
            let prev = ((rank + 2) % 3) as f32;
            assert_eq!(got, vec![prev, 10.0 * prev]);
        }
        Ok(())
    }

    /// Four ranks split into two groups of two by parity, each summing on its own.
    #[test]
    fn split_makes_independent_sub_groups() -> Result<()> {
        let sums: Vec<Result<(usize, usize, Vec<f32>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = InProcess::world(4)
                .into_iter()
                .map(|g| {
                    s.spawn(move || -> Result<_> {
                        // Keys reversed: the highest world rank of each color ranks first.
                        let sub = g.split(g.rank() % 2, 10 - g.rank())?;
                        let sum = sub.all_sum(&Tensor::new(&[g.rank() as f32], &Device::Cpu)?)?.to_vec1::<f32>()?;
                        Ok((sub.rank(), sub.size(), sum))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        let got: Vec<(usize, usize, Vec<f32>)> = sums.into_iter().collect::<Result<_>>()?;
        assert_eq!(got, vec![(1, 2, vec![2.0]), (1, 2, vec![4.0]), (0, 2, vec![2.0]), (0, 2, vec![4.0])]);
        Ok(())
    }

    /// A rank that fails aborts the group: the others' collectives return an error instead
    /// of waiting forever.
    #[test]
    fn abort_releases_waiting_ranks() {
        let world = InProcess::world(2);
        let (a, b) = (world[0].clone(), world[1].clone());
        let waiter = std::thread::spawn(move || a.all_sum(&Tensor::new(&[1f32], &Device::Cpu).expect("t")).map(|_| ()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        b.abort();
        let err = waiter.join().expect("thread").expect_err("aborted");
        assert!(err.to_string().contains("aborted"), "{err}");
        assert!(b.recv(0, Wait::Collective).is_err());
    }
}
