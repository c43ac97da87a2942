"""Patches a copy of candle-core's backprop.rs (scripts/build-cuda.sh applies it to the copy in
target/cuda-patch) so that a gradient's first contribution is stored as it is, not added to zeros.

candle's backward seeds every gradient slot with `zeros_like` and adds each contribution into
it: per edge of the graph, a memset of the slot and an add kernel that reads the zeros and the
contribution and writes their sum. Most nodes have one consumer, so most of those adds produce
a copy of the contribution. On the H200 these were the largest kernel family of an 8B LoRA
step (session 17: 2,652 adds, 170 of 487 ms). Here a slot starts as a marker (a zero scalar
broadcast to the slot's shape: a view, no allocation, no kernel), and the first contribution
replaces it. The values are the same (0 + g = g; 0 - g = -g). A contribution of another shape or
dtype, or a scatter/index add into the slot, turns the marker into real zeros first, as before.
LMX_GRAD_MARKERS=0 at run time restores candle's zeros.

Usage: python3 scripts/cuda/patch_candle_backprop.py CANDLE_CORE_DIR   (idempotent; exits 1 when
the source no longer has the shapes this patch rewrites, so that a candle upgrade is noticed)
"""
import re
import sys

path = sys.argv[1] + "/src/backprop.rs"
src = open(path).read()
if "lmx_acc" in src:
    sys.exit(0)

HELPERS = r'''

// lmx: gradient slots start as markers (scripts/cuda/patch_candle_backprop.py says why).
thread_local! {
    static LMX_MARKERS: std::cell::RefCell<(std::collections::HashSet<TensorId>, Vec<Tensor>)> = Default::default();
}

fn lmx_markers_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMX_GRAD_MARKERS").map_or(true, |v| v != "0"))
}

/// A new slot for `tensor`'s gradient: a zero scalar of its dtype and device broadcast to its shape.
fn lmx_empty(tensor: &Tensor) -> Result<Tensor> {
    if !lmx_markers_on() {
        return tensor.zeros_like();
    }
    LMX_MARKERS.with(|m| {
        let mut m = m.borrow_mut();
        let zero = match m.1.iter().find(|z| z.dtype() == tensor.dtype() && z.device().same_device(tensor.device())) {
            Some(z) => z.clone(),
            None => {
                let z = Tensor::zeros((), tensor.dtype(), tensor.device())?;
                m.1.push(z.clone());
                z
            }
        };
        let marker = zero.broadcast_as(tensor.shape())?;
        m.0.insert(marker.id());
        Ok(marker)
    })
}

/// Whether `t` is a slot's marker (forgotten once asked: its slot is about to be replaced).
fn lmx_take_marker(t: &Tensor) -> bool {
    LMX_MARKERS.with(|m| m.borrow_mut().0.remove(&t.id()))
}

/// The slot's value as a real tensor (zeros for a marker).
fn lmx_real(sum: &Tensor) -> Result<Tensor> {
    if lmx_take_marker(sum) {
        return sum.zeros_like();
    }
    Ok(sum.clone())
}

/// sum + g, or sum - g with `sub`: g itself (contiguous), or -g, when sum is a marker of g's
/// shape and dtype; real zeros first for a marker of another.
fn lmx_acc(sum: &Tensor, g: &Tensor, sub: bool) -> Result<Tensor> {
    let marker = lmx_take_marker(sum);
    if marker && g.shape() == sum.shape() && g.dtype() == sum.dtype() {
        return if sub { g.neg() } else { g.contiguous() };
    }
    let sum = if marker { sum.zeros_like()? } else { sum.clone() };
    if sub {
        sum.sub(g)
    } else {
        sum.add(g)
    }
}
'''

rules = [
    # The slot's seed.
    (r"let grad = tensor\.zeros_like\(\)\?;", "let grad = lmx_empty(tensor)?;", 1),
    # `*s = s.add(x)?` and `*s = s.sub(x)?` (x possibly nested calls, up to the statement's end).
    (r"\*(\w+) = \1\.add\((.*)\)\?", r"*\1 = lmx_acc(\1, \2, false)?", None),
    (r"\*(\w+) = \1\.sub\((.*)\)\?", r"*\1 = lmx_acc(\1, \2, true)?", None),
    # Scatter and index adds read the slot: real zeros first.
    (r"\*(\w+) = \1\.(scatter_add|index_add)\(", r"*\1 = lmx_real(\1)?.\2(", None),
]
for pattern, repl, want in rules:
    src, n = re.subn(pattern, repl, src)
    if n == 0 or (want is not None and n != want):
        sys.exit(f"patch_candle_backprop: `{pattern}` matched {n} times in {path}; candle changed, revisit the patch")
# Every slot taken with or_insert must now be written through one of the helpers (or assigned).
left = [m.group(0) for m in re.finditer(r"\*(\w+) = \1\.\w+\(", src)]
if left:
    sys.exit(f"patch_candle_backprop: slots still read directly: {left}")
open(path, "w").write(src + HELPERS)
print(f"patched {path}")
