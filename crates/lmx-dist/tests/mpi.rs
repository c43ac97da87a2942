//! The Open MPI group over real processes: this test binary starts itself under `mpirun`
//! (3 ranks), each rank runs one check and exits non-zero if it fails.

use std::time::{Duration, Instant};

use lmx_core::{DType, Device, Tensor};
use lmx_dist::{broadcast_bytes, Group, Mpi, Wait};

/// Runs test `name` of this binary as `np` MPI ranks with `env`; returns (success, stderr).
fn under_mpirun(name: &str, np: usize, env: &[(&str, &str)]) -> (bool, String, Duration) {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = lmx_dist::mpi::mpirun(np, None);
    for (k, v) in env {
        cmd.arg("-x").arg(format!("{k}={v}"));
    }
    cmd.arg(exe).args([name, "--exact", "--nocapture", "--test-threads", "1"]);
    let start = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("running mpirun: {e} (install Open MPI: apt install openmpi-bin; scripts/test.sh does)"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    (out.status.success(), stderr, start.elapsed())
}

fn rank_of_mpirun() -> bool {
    lmx_dist::mpi::launched()
}

fn world() -> Mpi {
    let secs = std::env::var("LMX_DIST_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    Mpi::world(Duration::from_secs(secs)).expect("MPI world")
}

#[test]
fn collectives_over_three_processes() {
    if !rank_of_mpirun() {
        let (ok, stderr, _) = under_mpirun("collectives_over_three_processes", 3, &[]);
        assert!(ok, "a rank failed:\n{stderr}");
        return;
    }
    let g = world();
    assert_eq!(g.size(), 3);
    let r = g.rank() as f32;
    let cpu = &Device::Cpu;
    // Sums, in f32 and in bf16 (summed in f32, rounded once).
    let x = Tensor::new(&[[r, 10.0 * r], [0.5, -r]], cpu).expect("x");
    assert_eq!(g.all_sum(&x).and_then(|t| t.to_vec2::<f32>()).expect("all_sum"), vec![vec![3.0, 30.0], vec![1.5, -3.0]]);
    let b = g.all_sum(&x.to_dtype(DType::BF16).expect("bf16")).expect("bf16 all_sum");
    assert_eq!(b.dtype(), DType::BF16);
    assert_eq!(b.to_dtype(DType::F32).and_then(|t| t.to_vec2::<f32>()).expect("v"), vec![vec![3.0, 30.0], vec![1.5, -3.0]]);
    // Gather along dim 1, rank r giving r + 1 columns.
    let parts = Tensor::new(vec![r; 2 * (g.rank() + 1)].as_slice(), cpu).and_then(|t| t.reshape((2, g.rank() + 1))).expect("parts");
    let gathered = g.all_gather(&parts, 1).and_then(|t| t.to_vec2::<f32>()).expect("all_gather");
    assert_eq!(gathered, vec![vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]; 2]);
    // Broadcast from rank 1, shape and dtype included.
    let mine = Tensor::arange(0u32, 6, cpu).and_then(|t| t.reshape((3, 2))).expect("arange");
    let got = g.broadcast((g.rank() == 1).then_some(&mine), 1, Wait::Collective).expect("broadcast");
    assert_eq!(got.dims(), &[3, 2]);
    assert_eq!(got.to_vec2::<u32>().expect("v"), mine.to_vec2::<u32>().expect("v"));
    let text = broadcast_bytes(&g, (g.rank() == 0).then_some("héllo".as_bytes()), 0, Wait::Forever).expect("bytes");
    assert_eq!(text, "héllo".as_bytes());
    // A ring of sends, in bf16: each rank sends to the next and receives from the previous.
    let send = (Tensor::ones((2, 3), DType::BF16, cpu).expect("ones") * f64::from(r)).expect("scaled");
    g.send(&send, (g.rank() + 1) % 3, Wait::Collective).expect("send");
    let got = g.recv((g.rank() + 2) % 3, Wait::Collective).expect("recv");
    let prev = ((g.rank() + 2) % 3) as f32;
    assert_eq!(got.dtype(), DType::BF16);
    assert_eq!(got.to_dtype(DType::F32).and_then(|t| t.to_vec2::<f32>()).expect("v"), vec![vec![prev; 3]; 2]);
    g.barrier(Wait::Collective).expect("barrier");
    // Split by parity: ranks 0 and 2 (rank 2 first, by key), and rank 1 alone.
    let sub = g.split(g.rank() % 2, 9 - g.rank()).expect("split");
    let want = if g.rank() % 2 == 0 { (2, 2.0, usize::from(g.rank() == 0)) } else { (1, 1.0, 0) };
    let sum = sub.all_sum(&Tensor::new(&[r], cpu).expect("t")).and_then(|t| t.to_vec1::<f32>()).expect("sub sum");
    assert_eq!((sub.size(), sum[0], sub.rank()), want, "rank {}", g.rank());
    g.barrier(Wait::Collective).expect("barrier");
    lmx_dist::mpi::finalize();
}

/// Rank 2 never joins the first sum: the others wait out the timeout (2 s here), name it,
/// and the whole job ends instead of hanging.
#[test]
fn a_rank_that_does_not_join_is_named_and_the_job_ends() {
    if !rank_of_mpirun() {
        let (ok, stderr, took) = under_mpirun("a_rank_that_does_not_join_is_named_and_the_job_ends", 3, &[("LMX_DIST_TIMEOUT", "2")]);
        assert!(!ok, "the job succeeded although rank 2 never joined");
        assert!(stderr.contains("rank 2 did not join") && stderr.contains("(ranks 0, 1 waited)"), "no error naming rank 2:\n{stderr}");
        assert!(took < Duration::from_secs(20), "the job took {took:?} to end");
        return;
    }
    let g = world();
    if g.rank() == 2 {
        std::thread::sleep(Duration::from_secs(60));
    }
    let x = Tensor::new(&[1f32], &Device::Cpu).expect("x");
    let _ = g.all_sum(&x);
    unreachable!("rank {} finished a sum rank 2 never joined", g.rank());
}
