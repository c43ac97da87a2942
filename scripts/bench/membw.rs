//! Single-stream memory read bandwidth, for the decode roofline in scripts/bench/cpu_speed.sh:
//! sums a buffer larger than the caches with 4 independent accumulators (the access pattern
//! of a decode kernel streaming weights). Prints GB/s for 1 and for N threads.
//! Build: rustc -O -C target-cpu=native scripts/bench/membw.rs -o target/membw
//! Usage: target/membw [THREADS]
use std::time::Instant;

fn sum(p: &[u64]) -> u64 {
    let mut a = [0u64; 4];
    for c in p.chunks_exact(4) {
        for j in 0..4 {
            a[j] = a[j].wrapping_add(c[j]);
        }
    }
    a.iter().fold(0, |s, v| s.wrapping_add(*v))
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|v| v.parse().ok()).unwrap_or(1);
    let words = (512 << 20) / 8; // 512 MB per thread
    let bufs: Vec<Vec<u64>> = (0..threads).map(|t| vec![t as u64 + 1; words]).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = bufs.iter().map(|b| s.spawn(move || sum(b))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((threads * words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    println!("{best:.1}");
}
