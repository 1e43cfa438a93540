//! `segtrain plot JOB -o loss.png|loss.svg`: training loss, learning rate and validation mIoU
//! against the iteration, from the job's metric points.

use anyhow::{bail, Context};
use plotters::coord::Shift;
use plotters::prelude::*;
use segtrain_proto::v1 as pb;
use std::path::Path;

/// Where the text font comes from (Debian's fonts-dejavu-core, installed by `make setup`).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let from_env = std::env::var("SEGTRAIN_FONT").ok();
    let path = from_env
        .iter()
        .map(String::as_str)
        .chain(FONT_PATHS.iter().copied())
        .find(|p| Path::new(p).exists())
        .context("no font for the plot's text: install fonts-dejavu-core, or set SEGTRAIN_FONT to a .ttf file")?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read font {path}"))?;
    // plotters keeps the font for the life of the process.
    let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, leaked)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable TrueType font"))?;
    Ok(())
}

/// The series of one metric, by iteration (the newest attempt wins where attempts overlap).
pub fn series(points: &[pb::MetricPoint], name: &str) -> Vec<(f64, f64)> {
    let mut by_iter = std::collections::BTreeMap::new();
    for p in points
        .iter()
        .filter(|p| p.name == name && p.value.is_finite())
    {
        by_iter.insert(p.iteration, (p.attempt, p.value));
    }
    by_iter
        .into_iter()
        .map(|(i, (_, v))| (i as f64, v))
        .collect()
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    data: &[(f64, f64)],
    max_iter: f64,
    colour: RGBColor,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (lo, hi) = data
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, v)| {
            (a.min(*v), b.max(*v))
        });
    let (lo, hi) = if data.is_empty() {
        (0.0, 1.0)
    } else if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    };
    let pad = (hi - lo) * 0.05;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_iter.max(1.0), (lo - pad)..(hi + pad))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("iteration")
        .y_label_formatter(&|v| {
            if v.abs() < 1e-2 && *v != 0.0 {
                format!("{v:.1e}")
            } else {
                format!("{v:.3}")
            }
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(data.iter().copied(), &colour))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if data.len() < 30 {
        chart
            .draw_series(data.iter().map(|p| Circle::new(*p, 3, colour.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    job: &str,
    points: &[pb::MetricPoint],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let max_iter = points.iter().map(|p| p.iteration).max().unwrap_or(1) as f64;
    let root = root
        .titled(&format!("job {job}"), ("sans-serif", 22))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let parts = root.split_evenly((3, 1));
    panel(
        &parts[0],
        "training loss",
        &series(points, "loss"),
        max_iter,
        RED,
    )?;
    panel(
        &parts[1],
        "learning rate (encoder)",
        &series(points, "lr"),
        max_iter,
        BLUE,
    )?;
    panel(
        &parts[2],
        "validation mIoU",
        &series(points, "miou"),
        max_iter,
        GREEN,
    )?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Draws the job's curves to `out` (.png or .svg).
pub fn plot(job: &str, points: &[pb::MetricPoint], out: &Path) -> anyhow::Result<()> {
    if points.is_empty() {
        bail!("job {job} has no metrics yet; nothing to plot");
    }
    register_font()?;
    match out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => draw(
            BitMapBackend::new(out, (1000, 900)).into_drawing_area(),
            job,
            points,
        ),
        Some("svg") => draw(
            SVGBackend::new(out, (1000, 900)).into_drawing_area(),
            job,
            points,
        ),
        _ => bail!(
            "-o: the plot is written as .png or .svg, got {}",
            out.display()
        ),
    }
    .with_context(|| format!("cannot draw {}", out.display()))
}
