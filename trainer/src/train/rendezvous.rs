//! Joining the other ranks ([`connect`]) and starting from rank 0's state ([`sync_start`]).

use super::events::CollectiveReady;
use super::{EventSink, Rendezvous, TrainEvent, TrainOptions};
use crate::collective::nccl::NcclCollective;
use crate::collective::tcp::{TcpCollective, TcpRendezvous};
use crate::collective::{Collective, Single};
use crate::data::SamplerState;
use crate::optim::FlatAdamW;
use crate::train::buffers::Buffers;
use anyhow::bail;
use tch::{nn, Device, Tensor};

/// Joins the other ranks as `opts.rendezvous` says. Rank 0 reports its endpoint through `sink`
/// before it waits for them.
pub(crate) fn connect(
    opts: &TrainOptions,
    sink: &mut dyn EventSink,
) -> anyhow::Result<Box<dyn Collective>> {
    let (rank, world, token, timeouts) = (opts.rank, opts.world, opts.token, opts.timeouts);
    if world == 0 || rank >= world {
        bail!("rank {rank} is not a rank of a world of {world} (ranks are 0..{world})");
    }
    let cuda_ordinal = || match opts.device {
        Device::Cuda(n) => Ok(n),
        d => Err(anyhow::anyhow!(
            "rendezvous {:?}: NCCL needs a CUDA device, this rank runs on {d:?}; CPU ranks use \
             tcp-listen:HOST:PORT / tcp:HOST:PORT",
            opts.rendezvous
        )),
    };
    let nccl_ready = |ordinal: usize| {
        TrainEvent::Collective(CollectiveReady {
            backend: "nccl".into(),
            detail: format!(
                "NCCL {} ({}), rank {rank} of {world} on cuda:{ordinal}",
                NcclCollective::version().unwrap_or_else(|e| e.to_string()),
                crate::collective::nccl::library_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        })
    };
    let comm: Box<dyn Collective> = match (&opts.rendezvous, rank) {
        (Rendezvous::Single, _) if world == 1 => Box::new(Single),
        (Rendezvous::Single, _) => bail!(
            "world {world} needs a rendezvous: rank 0 tcp-listen:HOST:PORT or nccl-create, \
             the others tcp:HOST:PORT or nccl:<id>"
        ),
        // NCCL with a world of 1 is allowed (GPU daemons always use NCCL); TCP is not.
        (rv, _) if world == 1 && *rv != Rendezvous::NcclCreate => {
            bail!("rendezvous {rv:?}: a world of 1 has nobody to meet; use single or nccl-create")
        }
        (Rendezvous::TcpListen { bind }, 0) => {
            let (listener, addr) = TcpRendezvous::bind(bind)?;
            sink.event(&TrainEvent::Rendezvous {
                tcp_address: Some(addr),
                nccl_unique_id: None,
            });
            Box::new(listener.accept(world, token, timeouts)?)
        }
        (Rendezvous::TcpConnect { addr }, r) if r > 0 => {
            Box::new(TcpCollective::connect(addr, r, world, token, timeouts)?)
        }
        (Rendezvous::NcclCreate, 0) => {
            let ordinal = cuda_ordinal()?;
            let id = NcclCollective::unique_id()?;
            sink.event(&TrainEvent::Rendezvous {
                tcp_address: None,
                nccl_unique_id: Some(id.to_vec()),
            });
            let comm = NcclCollective::init_on(id, 0, world, ordinal, timeouts)?;
            sink.event(&nccl_ready(ordinal));
            Box::new(comm)
        }
        (Rendezvous::NcclJoin { id }, r) if r > 0 => {
            let ordinal = cuda_ordinal()?;
            let comm = NcclCollective::init_on(*id, r, world, ordinal, timeouts)?;
            sink.event(&nccl_ready(ordinal));
            Box::new(comm)
        }
        (rv, r) => bail!(
            "rank {r} cannot use rendezvous {rv:?}: rank 0 uses tcp-listen:HOST:PORT or \
             nccl-create, ranks 1.. use tcp:HOST:PORT or nccl:<id>"
        ),
    };
    Ok(comm)
}

/// Makes every rank start from rank 0's state: checks that all ranks resumed at the same point
/// with the same accumulation, then broadcasts the parameters, the BatchNorm buffers and the
/// optimizer moments. The sampler state is the global stream position, the same on every rank
/// (and for every world size) at the iteration boundary a checkpoint is taken at; a rank started
/// with another `--accumulate-steps` would draw other micro-batches and call the collectives a
/// different number of times, so it is refused here rather than hanging later.
pub(crate) fn sync_start(
    comm: &mut dyn Collective,
    vs: &nn::VarStore,
    opt: &FlatAdamW,
    start: u64,
    sampler: SamplerState,
    accumulate_steps: u32,
    device: Device,
) -> anyhow::Result<()> {
    let mine = [
        start as i64,
        opt.steps() as i64,
        sampler.epoch as i64,
        sampler.position as i64,
        i64::from(accumulate_steps),
        opt.num_params(),
    ];
    let mut theirs = Tensor::from_slice(&mine).to_device(device);
    comm.broadcast(&mut theirs, 0)?;
    let theirs = Vec::<i64>::try_from(theirs.to_device(Device::Cpu))?;
    if theirs != mine {
        bail!(
            "rank {} does not start where rank 0 does: (iteration, optimizer steps, epoch, \
             sampler position, accumulate steps, parameters) = {mine:?} here, {theirs:?} on rank \
             0; every rank must resume from the same checkpoint with the same --accumulate-steps",
            comm.rank()
        );
    }
    let mut params = opt.params().shallow_clone();
    comm.broadcast(&mut params, 0)?;
    for (_, mut t) in opt.state_tensors() {
        comm.broadcast(&mut t, 0)?;
    }
    Buffers::of(vs).broadcast(comm, 0)
}
