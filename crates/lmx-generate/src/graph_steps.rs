//! Decode steps of one sequence replayed as CUDA graphs ([`lmx_core::graph`]).
//!
//! The token and its position go to a fixed device buffer; the model runs with the cache
//! reading the position from there ([`KvCache::set_device_position`]). The first step after
//! the cache's buffers are (re)allocated runs normally with candle's graph cache on (it also
//! loads every kernel), the next is recorded and replayed, and every later one is a replay:
//! one launch instead of hundreds. Logits come back through a fixed buffer and are sampled on
//! the host as before, so every sampler, penalty and constraint works unchanged; when the
//! sequence's next token is greedy and nothing else reads the logits
//! ([`crate::generate::Sequence::device_pick`]), the recorded step ends with the pick on the
//! device and only the token and its log probability cross to the host (`LMX_CUDA_PICK=0`:
//! logits always). Such a step also leaves its pick and the next position in the input
//! buffer, so the next step, whose token is that pick, uploads nothing.
//!
//! If a model's step cannot be recorded (a layer that reads the cache on the host, such as a
//! sliding window shorter than the buffer or latent attention), the step runs normally and
//! the sequence stays on normal steps. `LMX_CUDA_GRAPH=0` turns graphs off.

use crate::generate::Drawn;
use lmx_core::{graph, DType, Result, Tensor};
use lmx_models::{CausalLm, Logits};
use lmx_nn::KvCache;

/// A sequence's recorded decode step and its fixed input and output buffers.
pub(crate) struct GraphSteps {
    /// u32 (2,): the token, then its position.
    io: Tensor,
    /// The last step's f32 logits (1, 1, vocab).
    logits: Option<Tensor>,
    /// The ids the recorded step's greedy pick leaves out, when it picks (see `step`).
    pick: Option<Vec<u32>>,
    /// The last pick: u32 (2,), the token and its log probability's bits.
    picked: Option<Tensor>,
    /// (token, position) the last replay left in `io`: its pick at the next position.
    left: Option<(u32, u32)>,
    /// When the last step returned (`LMX_TRACE_STEPS=1`: the host's time between steps).
    returned: Option<std::time::Instant>,
    graph: Option<graph::Graph>,
    /// A normal step at a device position ran since the buffers were last reallocated.
    warm: bool,
    /// The cache buffers the warm step and the recorded one wrote (by identity): another
    /// sequence's cache, or this one's after it grew, needs a new warm step and recording.
    buffers: Vec<lmx_core::TensorId>,
    /// Recording failed: normal steps from now on.
    off: bool,
}

impl GraphSteps {
    /// Steps for `model`, when its device can record them and the model's steps can be
    /// recorded (on one device, or tensor-parallel over NCCL).
    pub(crate) fn new(model: &dyn CausalLm) -> Option<Self> {
        if !graph::capturable(model.device()) || !model.steps_recordable() {
            return None;
        }
        let io = Tensor::zeros(2, DType::U32, model.device()).ok()?;
        Some(Self { io, logits: None, pick: None, picked: None, left: None, returned: None, graph: None, warm: false, buffers: Vec::new(), off: false })
    }

    /// Runs `token` at the cache's next position; the logits of the step, or with `pick`
    /// (the ids to leave out) the token the device picked greedily; None when this step must
    /// run normally (nothing changed then).
    pub(crate) fn step(&mut self, model: &dyn CausalLm, kv: &mut KvCache, token: u32, pick: Option<&[u32]>) -> Result<Option<Drawn>> {
        if self.off {
            return Ok(None);
        }
        if kv.reserve(1)?.is_none() {
            return Ok(None);
        }
        let pick = pick.filter(|_| crate::generate::device_pick_on()).map(<[u32]>::to_vec);
        let buffers = kv.buffer_ids();
        if buffers != self.buffers || pick != self.pick {
            // Another cache, or another sequence's way of drawing: a new warm step and recording.
            self.pick = pick;
            self.graph = None;
            self.warm = false;
            self.buffers = buffers;
        }
        let offset = kv.offset();
        let upload = std::time::Instant::now();
        // A replay's input is already there when the token is its own pick (a greedy sequence's
        // every step): the upload, a synchronous copy, was 2% of an 8B 4-bit token.
        let left = self.left.take();
        if self.graph.is_none() || left != Some((token, offset as u32)) {
            self.io.slice_set(&Tensor::new(&[token, offset as u32], model.device())?, 0, 0)?;
        }
        let start = std::time::Instant::now();
        // On this thread, not the compute pool's: candle keeps the uploads a warm step made
        // per thread, and the step recorded next must find them.
        let ran = self.run(model, kv);
        let issued = start.elapsed();
        if let Err(e) = ran {
            // Back to where the step began; this and every later step run normally.
            kv.set_device_position(None);
            kv.truncate(offset);
            self.off = true;
            self.graph = None;
            if crate::generate::trace_steps() {
                eprintln!("lmx-step: CUDA graph steps off: {e}");
            }
            return Ok(None);
        }
        let out = match (&self.pick, &self.picked, &self.logits) {
            (Some(_), Some(picked), _) => {
                // Tensor-parallel ranks: wait for the replay (its NCCL sums) within the group's timeout.
                model.settle(picked)?;
                let v = picked.to_vec1::<u32>()?;
                if self.graph.is_some() {
                    self.left = Some((v[0], offset as u32 + 1));
                }
                Drawn::Picked { token: v[0], logprob: f32::from_bits(v[1]) }
            }
            (None, _, Some(logits)) => {
                model.settle(logits)?;
                Drawn::Logits(logits.flatten_all()?.to_vec1::<f32>()?)
            }
            _ => return Ok(None),
        };
        if crate::generate::trace_steps() {
            // Also the upload of (token, position) and the host's time since the last step
            // returned (sampling, detokenizing, stop checks): what a token spends off the device.
            let how = if self.graph.is_some() { "graph" } else { "eager" };
            let gap = self.returned.map_or(0.0, |r| (upload - r).as_secs_f64() * 1e3);
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            eprintln!("lmx-step: tokens 1 issue_ms {:.3} wait_ms {:.3} {how} upload_ms {:.3} gap_ms {gap:.3}", ms(issued), ms(start.elapsed() - issued), ms(start - upload));
        }
        self.returned = Some(std::time::Instant::now());
        Ok(Some(out))
    }

    /// Replays the recorded step, or runs the step normally and records the next one.
    fn run(&mut self, model: &dyn CausalLm, kv: &mut KvCache) -> Result<()> {
        if let Some(g) = &self.graph {
            g.launch()?;
            kv.advance(1);
            return Ok(());
        }
        let dev = model.device().clone();
        let token = self.io.narrow(0, 0, 1)?.reshape((1, 1))?;
        kv.set_device_position(Some(self.io.narrow(0, 1, 1)?));
        let ran = if self.warm {
            // Recorded, not run: the launch below runs it.
            let (logits, picked, pick, io) = (self.logits.clone(), self.picked.clone(), self.pick.clone(), self.io.clone());
            let recorded = graph::capture(&dev, || {
                let out = model.forward(&token, kv, Logits::Last)?;
                match &logits {
                    Some(l) => l.slice_set(&out, 0, 0)?,
                    None => lmx_core::bail!("a recorded step without an output buffer"),
                }
                match (&pick, &picked, &logits) {
                    (Some(masked), Some(p), Some(l)) => {
                        p.slice_set(&lmx_core::ops::pick_greedy(l, masked)?, 0, 0)?;
                        // The next step's input: this pick at the next position.
                        let next = Tensor::cat(&[p.narrow(0, 0, 1)?, io.narrow(0, 1, 1)?.affine(1.0, 1.0)?], 0)?;
                        io.slice_set(&next, 0, 0)
                    }
                    (None, _, _) => Ok(()),
                    _ => lmx_core::bail!("a recorded step without a pick buffer"),
                }
            });
            recorded.and_then(|g| {
                g.launch()?;
                self.graph = Some(g);
                Ok(())
            })
        } else {
            graph::warm(&dev, || {
                let out = model.forward(&token, kv, Logits::Last)?;
                match &self.logits {
                    Some(l) if l.dims() == out.dims() => l.slice_set(&out, 0, 0)?,
                    _ => self.logits = Some(out.copy()?),
                }
                if let (Some(masked), Some(l)) = (&self.pick, &self.logits) {
                    let p = lmx_core::ops::pick_greedy(l, masked)?;
                    match &self.picked {
                        Some(b) => b.slice_set(&p, 0, 0)?,
                        None => self.picked = Some(p),
                    }
                }
                self.warm = true;
                Ok(())
            })
        };
        kv.set_device_position(None);
        ran
    }
}
