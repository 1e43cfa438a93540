//! The command line of the training core: `train` ([`train`]) and the tools ([`tools`]), and
//! the option parsers they share. `segtrain-worker` (the `worker` crate) puts them beside the
//! daemon's command.

pub mod tools;
pub mod train;

use anyhow::{bail, Context};
use tch::Device;

/// Two sides `AxB` of option `flag` in the order given; `form` names them for the error (e.g.
/// "HxW").
pub fn parse_size(flag: &str, s: &str, form: &str) -> anyhow::Result<(i64, i64)> {
    let err = || format!("{flag}: expected {form} such as 1024x1024, got {s:?}");
    let (a, b) = s.split_once(['x', 'X']).with_context(err)?;
    let (a, b): (i64, i64) = (
        a.trim().parse().with_context(err)?,
        b.trim().parse().with_context(err)?,
    );
    if a < 32 || b < 32 || a > 16384 || b > 16384 {
        bail!("{flag}: each side must be in 32..=16384, got {a}x{b}");
    }
    Ok((a, b))
}

pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Ok(Device::Cuda(n)),
            None => bail!("--device: expected cpu, cuda or cuda:N, got {s:?}"),
        },
    }
}

pub fn check_classes(k: i64) -> anyhow::Result<()> {
    if !(1..=254).contains(&k) {
        bail!("--classes: must be in 1..=254, got {k}");
    }
    Ok(())
}

pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
