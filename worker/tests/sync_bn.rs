//! SyncBN over two ranks (threads, the real TCP collective) against plain BatchNorm over the
//! whole batch in one process: the same output, running statistics and gradients, with the
//! gradient of the ranks' mean loss as data parallelism averages it.

use segtrain_trainer::collective::tcp::{TcpCollective, TcpRendezvous};
use segtrain_trainer::collective::{Collective, Timeouts};
use segtrain_trainer::model::sync_bn;
use std::time::Duration;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

const C: i64 = 3;

fn bn(vs: &nn::VarStore) -> nn::BatchNorm {
    nn::batch_norm2d(
        vs.root() / "bn",
        C,
        nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.5),
            bs_init: nn::Init::Const(0.25),
            ..Default::default()
        },
    )
}

/// A loss of one image's normalised map that is not symmetric in its elements.
fn image_loss(y: &Tensor, w: &Tensor) -> Tensor {
    (y * w).sum(Kind::Float) + (y.square() * 0.5).sum(Kind::Float)
}

struct Out {
    y: Tensor,
    x_grad: Tensor,
    ws_grad: Tensor,
    bs_grad: Tensor,
    running: Tensor,
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).expect("scalar")
}

#[test]
fn sync_bn_on_two_ranks_is_batch_norm_on_their_whole_batch() {
    tch::manual_seed(3);
    let opts = (Kind::Float, Device::Cpu);
    // Two images with different statistics, one per rank.
    let x = Tensor::cat(
        &[
            Tensor::randn([1, C, 6, 5], opts) * 2.0 + 1.0,
            Tensor::randn([1, C, 6, 5], opts) * 0.5 - 0.7,
        ],
        0,
    );
    let w = Tensor::randn([2, C, 6, 5], opts);

    // One process, the whole batch: the mean of the two images' losses.
    let whole = {
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = bn(&vs);
        let xg = x.copy().set_requires_grad(true);
        let y = bn.forward_t(&xg, true);
        let loss = (image_loss(&y.get(0), &w.get(0)) + image_loss(&y.get(1), &w.get(1))) / 2.0;
        loss.backward();
        Out {
            y: y.detach(),
            x_grad: xg.grad(),
            ws_grad: bn.ws.as_ref().expect("affine").grad(),
            bs_grad: bn.bs.as_ref().expect("affine").grad(),
            running: Tensor::cat(&[&bn.running_mean, &bn.running_var], 0),
        }
    };

    // Two ranks, one image each.
    let t = Timeouts {
        setup: Duration::from_secs(30),
        step: Duration::from_secs(30),
    };
    let (rv, addr) = TcpRendezvous::bind("127.0.0.1:0").expect("bind");
    let inputs: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
        .map(|r| {
            let f = |t: Tensor| Vec::<f32>::try_from(t.reshape([-1])).expect("f32");
            (f(x.get(r)), f(w.get(r)))
        })
        .collect();
    let run = move |_rank: usize, mut comm: Box<dyn Collective>, (xr, wr): (Vec<f32>, Vec<f32>)| {
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = bn(&vs);
        let xg = Tensor::from_slice(&xr)
            .view([1, C, 6, 5])
            .set_requires_grad(true);
        let wr = Tensor::from_slice(&wr).view([C, 6, 5]);
        let mut sum = |t: &mut Tensor| -> anyhow::Result<()> { Ok(comm.all_reduce_sum(t)?) };
        let (y, tape) = sync_bn::forward(&bn, &xg, 1e-5, 0.1, &mut sum).expect("forward");
        let loss = image_loss(&y.get(0), &wr);
        tape.backward(&loss, &mut sum).expect("backward");
        // What data parallelism does to parameter gradients: the mean over ranks.
        let mut ws = bn.ws.as_ref().expect("affine").grad();
        let mut bs = bn.bs.as_ref().expect("affine").grad();
        comm.all_reduce_mean(&mut ws).expect("mean");
        comm.all_reduce_mean(&mut bs).expect("mean");

        let f = |t: &Tensor| Vec::<f32>::try_from(t.reshape([-1])).expect("f32");
        (
            f(&y.detach()),
            // The gradient of the mean loss with respect to this rank's image.
            f(&(xg.grad() / 2.0)),
            f(&ws),
            f(&bs),
            f(&Tensor::cat(&[&bn.running_mean, &bn.running_var], 0)),
        )
    };
    let (run0, in0) = (run, inputs[0].clone());
    let h0 =
        std::thread::spawn(move || run0(0, Box::new(rv.accept(2, 7, t).expect("accept")), in0));
    let in1 = inputs[1].clone();
    let h1 = std::thread::spawn(move || {
        run(
            1,
            Box::new(TcpCollective::connect(&addr, 1, 2, 7, t).expect("connect")),
            in1,
        )
    });
    let (r0, r1) = (h0.join().expect("rank 0"), h1.join().expect("rank 1"));
    let t = |v: &Vec<f32>| Tensor::from_slice(v);
    let two = Out {
        y: Tensor::cat(&[t(&r0.0), t(&r1.0)], 0).view([2, C, 6, 5]),
        x_grad: Tensor::cat(&[t(&r0.1), t(&r1.1)], 0).view([2, C, 6, 5]),
        ws_grad: t(&r0.2),
        bs_grad: t(&r0.3),
        running: t(&r0.4),
    };
    // Both ranks hold the same statistics and parameter gradients.
    assert_eq!(r0.2, r1.2);
    assert_eq!(r0.4, r1.4, "running statistics are the same on both ranks");

    for (what, a, b, tol) in [
        ("output", &whole.y, &two.y, 1e-5),
        ("input gradient", &whole.x_grad, &two.x_grad, 1e-5),
        ("weight gradient", &whole.ws_grad, &two.ws_grad, 1e-4),
        ("bias gradient", &whole.bs_grad, &two.bs_grad, 1e-4),
        ("running statistics", &whole.running, &two.running, 1e-6),
    ] {
        let d = max_diff(a, b);
        assert!(
            d <= tol,
            "{what}: max abs diff {d:e}\nwhole batch {a}\ntwo ranks {b}"
        );
    }
}
