//! The TCP collective backend with several ranks in threads, each with its own connection:
//! results are correct and bit-identical on every rank, stale peers are refused, and a dead
//! peer makes the others fail within the timeout instead of hanging.

use segtrain_trainer::collective::tcp::{TcpCollective, TcpRendezvous};
use segtrain_trainer::collective::{Collective, CollectiveError, Timeouts};
use segtrain_trainer::train::Rendezvous;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

fn timeouts(setup_s: u64, step_s: u64) -> Timeouts {
    Timeouts {
        setup: Duration::from_secs(setup_s),
        step: Duration::from_secs(step_s),
    }
}

/// Starts `world` ranks in threads (rank 0 listens on a free port), each running `f` on its
/// own collective.
fn ranks<T: Send + 'static>(
    world: usize,
    token: u64,
    t: Timeouts,
    f: impl Fn(usize, Box<dyn Collective>) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let (rv, addr) = TcpRendezvous::bind("127.0.0.1:0").expect("bind");
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let mut handles: Vec<JoinHandle<T>> = Vec::new();
    let f0 = f.clone();
    handles.push(std::thread::spawn(move || {
        let c = rv.accept(world, token, t).expect("rank 0 accepts");
        f0(0, Box::new(c))
    }));
    for rank in 1..world {
        let (f, addr) = (f.clone(), addr.clone());
        handles.push(std::thread::spawn(move || {
            let c = TcpCollective::connect(&addr, rank, world, token, t).expect("connect");
            f(rank, Box::new(c))
        }));
    }
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.reshape([-1])).expect("f32")
}

#[test]
fn three_ranks_agree_and_are_right() {
    let n = 1000usize;
    // Values whose f32 sum would round differently in different orders.
    let input = move |rank: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((rank * 7919 + i * 104_729) % 1000) as f32 * 0.001_37 + 1e-7 * rank as f32)
            .collect()
    };
    let results = ranks(3, 42, timeouts(20, 20), move |rank, mut c| {
        assert_eq!((c.rank(), c.world()), (rank, 3));
        let mut mean = Tensor::from_slice(&input(rank)).view([10, 100]);
        c.all_reduce_mean(&mut mean).expect("mean");
        let mut sum = Tensor::from_slice(&input(rank)).to_kind(Kind::Double);
        c.all_reduce_sum(&mut sum).expect("sum f64");
        let mut isum = Tensor::from_slice(&[rank as i64 + 1, -(rank as i64), 1i64 << 40]);
        c.all_reduce_sum(&mut isum).expect("sum i64");
        let mut fsum = Tensor::from_slice(&[rank as f32 + 0.5, 1.0]);
        c.all_reduce_sum(&mut fsum).expect("sum f32");
        let mut b = Tensor::from_slice(&[rank as f32; 5]);
        c.broadcast(&mut b, 2).expect("broadcast from 2");
        let mut b0 = Tensor::from_slice(&[rank as u8 + 10; 3]);
        c.broadcast(&mut b0, 0).expect("broadcast u8 from 0");
        c.barrier().expect("barrier");
        let mut empty = Tensor::zeros([0], (Kind::Float, tch::Device::Cpu));
        c.all_reduce_mean(&mut empty).expect("empty");
        (
            f32s(&mean),
            Vec::<f64>::try_from(&sum).expect("f64"),
            Vec::<i64>::try_from(&isum).expect("i64"),
            f32s(&fsum),
            f32s(&b),
            Vec::<u8>::try_from(&b0).expect("u8"),
        )
    });
    let want_mean: Vec<f32> = (0..n)
        .map(|i| ((0..3).map(|r| input(r)[i] as f64).sum::<f64>() / 3.0) as f32)
        .collect();
    let want_sum: Vec<f64> = (0..n)
        .map(|i| (0..3).map(|r| input(r)[i] as f64).sum::<f64>())
        .collect();
    for (rank, r) in results.iter().enumerate() {
        assert_eq!(r.0, want_mean, "rank {rank}: mean");
        assert_eq!(r.1, want_sum, "rank {rank}: f64 sum");
        assert_eq!(r.2, vec![6, -3, 3i64 << 40], "rank {rank}: i64 sum");
        assert_eq!(r.3, vec![4.5, 3.0], "rank {rank}: f32 sum");
        assert_eq!(r.4, vec![2.0; 5], "rank {rank}: broadcast from rank 2");
        assert_eq!(r.5, vec![10u8; 3], "rank {rank}: broadcast from rank 0");
        // Bit-identical on every rank (not just close).
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&r.0), bits(&results[0].0), "rank {rank} vs rank 0");
    }
}

#[test]
fn a_cpu_tensor_that_is_a_view_into_a_larger_buffer_is_updated_in_place() {
    // The trainer reduces the optimizer's flat buffers through shallow clones and narrow views.
    let results = ranks(2, 7, timeouts(20, 20), |rank, mut c| {
        let flat = Tensor::from_slice(&[rank as f32 * 10.0; 8]);
        let mut part = flat.narrow(0, 2, 4);
        c.all_reduce_mean(&mut part)
            .expect("mean of a contiguous view");
        f32s(&flat)
    });
    for (rank, r) in results.iter().enumerate() {
        let keep = rank as f32 * 10.0;
        assert_eq!(
            r,
            &vec![keep, keep, 5.0, 5.0, 5.0, 5.0, keep, keep],
            "rank {rank}"
        );
    }
}

#[test]
fn bad_tensors_are_refused_before_anything_is_sent() {
    let results = ranks(2, 8, timeouts(20, 20), |_, mut c| {
        let mut i32s = Tensor::from_slice(&[1i32, 2]);
        let sum_i32 = c.all_reduce_sum(&mut i32s).is_err();
        let mut f64s = Tensor::from_slice(&[1.0f64]);
        let mean_f64 = c.all_reduce_mean(&mut f64s).is_err();
        let mut nc = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
            .view([2, 2])
            .tr();
        let non_contiguous = c.all_reduce_mean(&mut nc).is_err();
        let mut t = Tensor::from_slice(&[1.0f32]);
        let bad_root = c.broadcast(&mut t, 2).is_err();
        // The communicator still works afterwards.
        let mut ok = Tensor::from_slice(&[2.0f32]);
        c.all_reduce_sum(&mut ok).expect("still usable");
        (sum_i32, mean_f64, non_contiguous, bad_root, f32s(&ok))
    });
    for r in results {
        assert_eq!((r.0, r.1, r.2, r.3), (true, true, true, true));
        assert_eq!(r.4, vec![4.0]);
    }
}

#[test]
fn a_peer_with_another_token_or_world_is_refused_and_the_right_one_still_joins() {
    let t = timeouts(20, 20);
    let (rv, addr) = TcpRendezvous::bind("127.0.0.1:0").expect("bind");
    let root = std::thread::spawn(move || rv.accept(2, 1234, t));
    // A stale rank of another attempt.
    let stale = TcpCollective::connect(&addr, 1, 2, 999, t).expect_err("stale token refused");
    let msg = stale.to_string();
    assert!(
        matches!(stale, CollectiveError::Rendezvous { .. }) && msg.contains("token"),
        "{msg}"
    );
    // A peer that thinks the world is bigger.
    let wrong_world = TcpCollective::connect(&addr, 1, 3, 1234, t).expect_err("world refused");
    assert!(wrong_world.to_string().contains("world"), "{wrong_world}");
    // The right peer joins, and the collective works.
    let mut one = TcpCollective::connect(&addr, 1, 2, 1234, t).expect("right token joins");
    let mut zero = root.join().expect("thread").expect("rank 0 accepts");
    let h = std::thread::spawn(move || {
        let mut x = Tensor::from_slice(&[3.0f32]);
        one.all_reduce_sum(&mut x).expect("sum on 1");
        f32s(&x)
    });
    let mut x = Tensor::from_slice(&[4.0f32]);
    zero.all_reduce_sum(&mut x).expect("sum on 0");
    assert_eq!(f32s(&x), vec![7.0]);
    assert_eq!(h.join().expect("thread"), vec![7.0]);
}

#[test]
fn a_rank_that_never_comes_fails_the_rendezvous_within_the_timeout() {
    let t = timeouts(1, 1);
    let (rv, addr) = TcpRendezvous::bind("127.0.0.1:0").expect("bind");
    let start = Instant::now();
    let e = rv.accept(3, 5, t).expect_err("nobody came");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(
        e.to_string().contains("[1, 2]"),
        "names the missing ranks: {e}"
    );
    // And connecting to a rank 0 that is gone fails too (after retrying for the timeout).
    let start = Instant::now();
    let e = TcpCollective::connect(&addr, 1, 2, 5, t).expect_err("nobody listens");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert!(e.to_string().contains("could not reach rank 0"), "{e}");
}

#[test]
fn a_dead_peer_makes_every_other_rank_fail_instead_of_hanging() {
    // The step timeout is long: the others must notice the closed connection, not time out.
    let start = Instant::now();
    let results = ranks(3, 77, timeouts(20, 60), |rank, mut c| {
        if rank == 2 {
            drop(c); // dies before the first operation
            return None;
        }
        let mut x = Tensor::from_slice(&[1.0f32; 1024]);
        let first = c.all_reduce_mean(&mut x).expect_err("a peer is dead");
        // Once failed, the communicator refuses further work at once.
        let second = c.barrier().expect_err("poisoned");
        assert!(
            matches!(second, CollectiveError::Poisoned { .. }),
            "{second}"
        );
        Some(first.to_string())
    });
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "failed fast: {:?}",
        start.elapsed()
    );
    let r0 = results[0].as_ref().expect("rank 0 result");
    assert!(
        r0.contains("rank 2") && r0.contains("closed"),
        "rank 0 names the dead peer: {r0}"
    );
    let r1 = results[1].as_ref().expect("rank 1 result");
    assert!(r1.contains("rank 0"), "rank 1 hears from rank 0: {r1}");
}

#[test]
fn a_silent_peer_times_out() {
    let start = Instant::now();
    let results = ranks(2, 78, timeouts(20, 1), |rank, mut c| {
        if rank == 1 {
            // Alive but never joins the operation.
            std::thread::sleep(Duration::from_secs(4));
            return None;
        }
        let mut x = Tensor::from_slice(&[1.0f32]);
        Some(c.all_reduce_sum(&mut x).expect_err("times out"))
    });
    let e = results[0].as_ref().expect("rank 0 result");
    assert!(
        matches!(e, CollectiveError::Timeout { peer: 1, .. }),
        "a timeout naming rank 1: {e}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn ranks_that_disagree_on_the_operation_fail() {
    let results = ranks(2, 79, timeouts(20, 20), |rank, mut c| {
        let mut x = Tensor::from_slice(&vec![1.0f32; 3 + rank]);
        c.all_reduce_sum(&mut x)
            .expect_err("lengths differ")
            .to_string()
    });
    assert!(results[0].contains("disagree"), "{}", results[0]);
    assert!(results[1].contains("rank 0"), "{}", results[1]);
}

#[test]
fn rendezvous_flags_parse() {
    let p = |s: &str| s.parse::<Rendezvous>();
    assert_eq!(p("single"), Ok(Rendezvous::Single));
    assert_eq!(p("nccl-create"), Ok(Rendezvous::NcclCreate));
    assert_eq!(
        p("tcp-listen:0.0.0.0:0"),
        Ok(Rendezvous::TcpListen {
            bind: "0.0.0.0:0".into()
        })
    );
    assert_eq!(
        p("tcp:10.1.2.3:4000"),
        Ok(Rendezvous::TcpConnect {
            addr: "10.1.2.3:4000".into()
        })
    );
    use base64::Engine;
    let id: [u8; 128] = std::array::from_fn(|i| i as u8);
    let b64 = base64::engine::general_purpose::STANDARD.encode(id);
    assert_eq!(p(&format!("nccl:{b64}")), Ok(Rendezvous::NcclJoin { id }));
    assert!(p("nccl:AAAA").expect_err("short id").contains("128 bytes"));
    assert!(p("tcp:nohost").is_err());
    assert!(p("tcp:host:99999").is_err());
    assert!(p("mpi").expect_err("unknown").contains("tcp-listen"));
}

#[test]
fn nccl_fails_clearly_without_a_gpu() {
    use segtrain_trainer::collective::nccl::NcclCollective;
    if tch::Cuda::is_available() {
        return; // covered by the GPU test below
    }
    let e = NcclCollective::unique_id().expect_err("no GPU here");
    assert!(e.to_string().contains("CUDA device"), "{e}");
    let e = NcclCollective::init([0; 128], 0, 1).expect_err("no GPU here");
    assert!(
        e.to_string().contains("tcp"),
        "points to the CPU backend: {e}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn nccl_world_one_reduces_and_broadcasts_a_cuda_tensor() {
    use segtrain_trainer::collective::nccl::NcclCollective;
    let version = NcclCollective::version().expect("libnccl.so.2 loads");
    assert!(version.starts_with("2."), "{version}");
    let id = NcclCollective::unique_id().expect("unique id");
    assert!(id.iter().any(|&b| b != 0));
    let mut c = NcclCollective::init(id, 0, 1).expect("init world 1");
    assert_eq!((c.rank(), c.world()), (0, 1));
    let dev = tch::Device::Cuda(0);
    let values: Vec<f32> = (0..4096).map(|i| i as f32 * 0.25 - 100.0).collect();
    let mut t = Tensor::from_slice(&values).to_device(dev);
    // Pending kernels on the NULL stream before the collective must be ordered before it.
    let _ = t.g_mul_scalar_(2.0);
    c.all_reduce_mean(&mut t).expect("mean");
    let _ = t.g_mul_scalar_(0.5);
    assert_eq!(f32s(&t.to_device(tch::Device::Cpu)), values);
    let mut s = Tensor::from_slice(&[3i64, -4]).to_device(dev);
    c.all_reduce_sum(&mut s).expect("sum i64");
    assert_eq!(
        Vec::<i64>::try_from(s.to_device(tch::Device::Cpu)).expect("i64"),
        vec![3, -4]
    );
    let mut b = Tensor::from_slice(&[1.5f64, 2.5]).to_device(dev);
    c.broadcast(&mut b, 0).expect("broadcast");
    assert_eq!(
        Vec::<f64>::try_from(b.to_device(tch::Device::Cpu)).expect("f64"),
        vec![1.5, 2.5]
    );
    c.barrier().expect("barrier");
    // Tensors on the host are refused, not crashed on.
    let mut host = Tensor::from_slice(&[1.0f32]);
    assert!(c.all_reduce_mean(&mut host).is_err());
    // The communicator still works after a refused tensor.
    let mut again = Tensor::from_slice(&[7.0f32]).to_device(dev);
    c.all_reduce_mean(&mut again).expect("still usable");
}

#[test]
fn rendezvous_events_are_the_json_the_daemon_reads() {
    use base64::Engine;
    use segtrain_trainer::train::report::event_line;
    use segtrain_trainer::train::TrainEvent;
    let json = |ev: &TrainEvent| -> serde_json::Value {
        serde_json::from_str(&event_line(ev).to_line()).expect("one JSON object")
    };
    let tcp = json(&TrainEvent::Rendezvous {
        tcp_address: Some("127.0.0.1:40123".into()),
        nccl_unique_id: None,
    });
    assert_eq!(
        tcp,
        serde_json::json!({"event": "rendezvous", "tcp_address": "127.0.0.1:40123"})
    );
    let id: Vec<u8> = (0..128).map(|i| (i * 37 % 256) as u8).collect();
    let nccl = json(&TrainEvent::Rendezvous {
        tcp_address: None,
        nccl_unique_id: Some(id.clone()),
    });
    assert_eq!(nccl["event"], "rendezvous");
    assert!(nccl.get("tcp_address").is_none());
    let b64 = nccl["nccl_unique_id"].as_str().expect("base64 string");
    let back = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("standard base64");
    assert_eq!(back, id);
    // And the flag the other ranks get takes it back.
    assert_eq!(
        format!("nccl:{b64}").parse::<Rendezvous>(),
        Ok(Rendezvous::NcclJoin {
            id: id.try_into().expect("128")
        })
    );
}
