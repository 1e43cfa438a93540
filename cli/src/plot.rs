//! `segtrain plot JOB -o loss.png|loss.svg`: training loss, learning rate and validation mIoU
//! against the iteration, from the job's metric points.

use anyhow::{bail, Context};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
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

/// The finite points of one metric in iteration order. GetMetrics already returns one point per
/// (iteration, name), the newest attempt's where a resumed attempt re-ran iterations.
pub fn series(points: &[pb::MetricPoint], name: &str) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter(|p| p.name == name && p.value.is_finite())
        .map(|p| (p.iteration as f64, p.value))
        .collect()
}

/// A tick step `m * 10^e`, m in {1, 2, 5}: every tick is an integer multiple of it, so a tick is
/// an exact decimal `n * 10^e` with n an integer, and its label is written from (n, e), never from
/// the float's digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub m: i64,
    pub e: i32,
}

impl Step {
    pub fn value(self) -> f64 {
        decimal(self.m, self.e)
    }

    /// The step of the light mesh lines between two ticks: 1 -> 0.2, 2 -> 0.5, 5 -> 1.
    fn light(self) -> Step {
        match self.m {
            1 => Step {
                m: 2,
                e: self.e - 1,
            },
            2 => Step {
                m: 5,
                e: self.e - 1,
            },
            _ => Step { m: 1, e: self.e },
        }
    }
}

/// `n * 10^e` as the nearest f64 (one correctly rounded decimal-to-binary conversion): the tick
/// `3 * 10^-5` is exactly the literal `3e-5`, and `0 * 10^e` is exactly 0.
fn decimal(n: i64, e: i32) -> f64 {
    format!("{n}e{e}").parse().unwrap_or(0.0)
}

/// The ticks of one axis: the nice step, the tick values inside the range (bold mesh lines,
/// labelled) and the light mesh lines between them.
#[derive(Debug, Clone, PartialEq)]
pub struct AxisTicks {
    pub step: Step,
    pub values: Vec<f64>,
    pub light: Vec<f64>,
}

/// The multiples of `step` in `[lo, hi]` (ends included up to a tiny fraction of the step), as
/// integer multipliers of `10^step.e`.
fn multiples(lo: f64, hi: f64, step: Step) -> Vec<i64> {
    let s = step.value();
    let first = (lo / s - 1e-9).ceil() as i64;
    let last = (hi / s + 1e-9).floor() as i64;
    (first..=last).map(|k| k.saturating_mul(step.m)).collect()
}

/// The smallest nice step (1, 2 or 5 times a power of ten) that cuts `span` into at most
/// `max_intervals` intervals; with `integers` the step is at least 1 (an iteration axis).
pub fn nice_step(span: f64, max_intervals: u32, integers: bool) -> Step {
    let max_intervals = f64::from(max_intervals.max(1));
    let raw = span / max_intervals;
    let min_e = if integers { 0 } else { -330 };
    if !(raw.is_finite() && raw > 0.0) {
        return Step { m: 1, e: 0 };
    }
    // log10 may be off by one near a power of ten: try the decades around it, smallest first.
    let e0 = (raw.log10().floor() as i32).clamp(-330, 310);
    ((e0 - 1)..=(e0 + 1))
        .flat_map(|e| [1, 2, 5].map(|m| Step { m, e }))
        .filter(|st| st.e >= min_e)
        .find(|st| span / st.value() <= max_intervals * (1.0 + 1e-9))
        .unwrap_or(Step {
            m: 1,
            e: (e0 + 2).max(min_e),
        })
}

/// Nice ticks for the axis range `[lo, hi]` (hi > lo, both finite; anything else gets no ticks):
/// at most `max_intervals + 1` multiples of a nice step; a tick at zero is exactly 0, so a range
/// starting at float noise such as -1.4e-20 gets the same ticks as one starting at 0.
pub fn axis_ticks(lo: f64, hi: f64, max_intervals: u32, integers: bool) -> AxisTicks {
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return AxisTicks {
            step: Step { m: 1, e: 0 },
            values: vec![],
            light: vec![],
        };
    }
    let step = nice_step(hi - lo, max_intervals, integers);
    let bold = multiples(lo, hi, step);
    let light_step = step.light();
    let light = if integers && light_step.e < 0 {
        vec![]
    } else {
        // Light lines in units of 10^light.e; the bold ones (multiples of the step) left out.
        let per = decimal(1, step.e - light_step.e) as i64;
        multiples(lo, hi, light_step)
            .into_iter()
            .filter(|n| n % (step.m * per) != 0)
            .map(|n| decimal(n, light_step.e))
            .collect()
    };
    AxisTicks {
        step,
        values: bold.into_iter().map(|n| decimal(n, step.e)).collect(),
        light,
    }
}

/// The label of tick value `v` on an axis with tick step `step`: the value rounded to the step's
/// decimal (a value within a millionth of a step of 0 is "0"), written without float noise.
/// Steps from 10^-3 to 10^5 are written plainly with the step's decimals ("0.5", "1.0", "20000");
/// smaller or larger ones in the shortest scientific form ("6e-5", "1.5e-5", "2e6").
pub fn tick_label(v: f64, step: Step) -> String {
    if !v.is_finite() {
        return String::new();
    }
    if v.abs() < step.value() * 1e-6 {
        return "0".into();
    }
    // v = n * 10^e with n an integer (v is a tick, or near one).
    let n = (v / decimal(1, step.e)).round() as i64;
    if n == 0 {
        return "0".into();
    }
    let sign = if n < 0 { "-" } else { "" };
    let digits = n.unsigned_abs().to_string();
    if (-3..=5).contains(&step.e) {
        if step.e >= 0 {
            return format!("{sign}{digits}{}", "0".repeat(step.e as usize));
        }
        let d = (-step.e) as usize;
        let padded = format!("{digits:0>width$}", width = d + 1);
        let (int, frac) = padded.split_at(padded.len() - d);
        return format!("{sign}{int}.{frac}");
    }
    // Scientific: strip n's trailing zeros into the exponent, one digit before the point.
    let trimmed = digits.trim_end_matches('0');
    let exp = step.e + (digits.len() - 1) as i32;
    let (lead, rest) = trimmed.split_at(1);
    if rest.is_empty() {
        format!("{sign}{lead}e{exp}")
    } else {
        format!("{sign}{lead}.{rest}e{exp}")
    }
}

/// The value axis range of a panel: the data's range padded by 5%; a flat series gets a range
/// around its value (half its size, or ±0.5 around 0).
fn value_range(data: &[(f64, f64)]) -> (f64, f64) {
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
        let half = if lo == 0.0 { 0.5 } else { lo.abs() * 0.5 };
        (lo - half, hi + half)
    };
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// A linear f64 axis whose mesh lines are the given ticks (bold, labelled) and light lines, and
/// whose labels are [`tick_label`]s of its step: plotters' own f64 axis places ticks at computed
/// floats and labels them with their noise ("-1.4e-20" for 0).
struct TickedAxis {
    inner: RangedCoordf64,
    ticks: AxisTicks,
}

impl TickedAxis {
    fn new(lo: f64, hi: f64, ticks: AxisTicks) -> TickedAxis {
        TickedAxis {
            inner: (lo..hi).into(),
            ticks,
        }
    }
}

impl Ranged for TickedAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.ticks.light.clone()
        } else {
            self.ticks.values.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }
}

impl ValueFormatter<f64> for TickedAxis {
    fn format_ext(&self, value: &f64) -> String {
        tick_label(*value, self.ticks.step)
    }
}

/// Most intervals between labelled ticks on the value (y) and iteration (x) axes.
const Y_INTERVALS: u32 = 8;
const X_INTERVALS: u32 = 10;

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
    let (y_lo, y_hi) = value_range(data);
    let x_hi = max_iter.max(1.0);
    let y_ticks = axis_ticks(y_lo, y_hi, Y_INTERVALS, false);
    let x_ticks = axis_ticks(0.0, x_hi, X_INTERVALS, true);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        // Room for the label of a tick at the right end of the iteration axis.
        .margin_right(30)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(
            TickedAxis::new(0.0, x_hi, x_ticks),
            TickedAxis::new(y_lo, y_hi, y_ticks),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("iteration")
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

#[cfg(test)]
mod tests {
    use super::*;

    impl AxisTicks {
        fn labels(&self) -> Vec<String> {
            self.values
                .iter()
                .map(|v| tick_label(*v, self.step))
                .collect()
        }
    }

    fn labels(lo: f64, hi: f64, max_intervals: u32, integers: bool) -> Vec<String> {
        axis_ticks(lo, hi, max_intervals, integers).labels()
    }

    #[test]
    fn nice_steps_are_one_two_five_times_a_power_of_ten() {
        assert_eq!(nice_step(6e-5, 8, false), Step { m: 1, e: -5 });
        assert_eq!(nice_step(2.6, 8, false), Step { m: 5, e: -1 });
        assert_eq!(nice_step(1.0, 8, false), Step { m: 2, e: -1 });
        assert_eq!(nice_step(160_000.0, 10, true), Step { m: 2, e: 4 });
        assert_eq!(nice_step(100.0, 10, true), Step { m: 1, e: 1 });
        // An iteration axis never gets a fractional step.
        assert_eq!(nice_step(1.0, 10, true), Step { m: 1, e: 0 });
        assert_eq!(nice_step(3.0, 10, true), Step { m: 1, e: 0 });
    }

    #[test]
    fn lr_axis_ticks_are_exact_decimals_with_clean_labels() {
        let want_values = vec![0.0, 1e-5, 2e-5, 3e-5, 4e-5, 5e-5, 6e-5];
        let want_labels = ["0", "1e-5", "2e-5", "3e-5", "4e-5", "5e-5", "6e-5"];
        let t = axis_ticks(0.0, 6e-5, 8, false);
        assert_eq!(t.step, Step { m: 1, e: -5 });
        assert_eq!(t.values, want_values);
        assert_eq!(t.labels(), want_labels);
        // Float noise at the bottom of the range: the same ticks, the bottom one exactly 0.
        let noisy = axis_ticks(-1.4e-20, 6e-5, 8, false);
        assert_eq!(noisy, t);
        assert_eq!(noisy.values[0].to_bits(), 0.0f64.to_bits(), "+0, not -0");
        // The padded range the lr panel gets from such a series.
        let data = [
            (0.0, 6e-11),
            (80_000.0, 3e-5),
            (150_000.0, 6e-5),
            (160_000.0, -1.4e-20),
        ];
        let (lo, hi) = value_range(&data);
        assert!(lo < -1e-6 && hi > 6e-5);
        assert_eq!(labels(lo, hi, Y_INTERVALS, false), want_labels);
    }

    #[test]
    fn labels_never_show_float_noise() {
        let step = Step { m: 1, e: -5 };
        assert_eq!(tick_label(-1.4e-20, step), "0");
        assert_eq!(tick_label(1.4e-20, step), "0");
        assert_eq!(tick_label(-0.0, step), "0");
        // 3 * 1e-5 in floating point is 3.0000000000000004e-5: the label is still the decimal.
        assert_eq!(tick_label(3.0 * 1e-5, step), "3e-5");
        assert_eq!(tick_label(0.1 + 0.2, Step { m: 1, e: -1 }), "0.3");
        assert_eq!(tick_label(1.5e-5, Step { m: 5, e: -6 }), "1.5e-5");
        assert_eq!(tick_label(-2e-4, Step { m: 1, e: -4 }), "-2e-4");
        assert_eq!(tick_label(2e6, Step { m: 1, e: 6 }), "2e6");
        assert_eq!(tick_label(1.2e7, Step { m: 2, e: 6 }), "1.2e7");
        assert_eq!(tick_label(0.025, Step { m: 5, e: -3 }), "0.025");
        assert_eq!(tick_label(-0.5, Step { m: 5, e: -1 }), "-0.5");
        // Over many ranges: every label reads back as exactly its tick value, and is short.
        let mut ranges = vec![(-1.4e-20, 6e-5), (0.3, 2.9), (-3.1, 7.7), (0.0, 1e-9)];
        for i in 1..200 {
            let x = i as f64;
            ranges.push((
                (x * 0.37).sin() * 10f64.powi(i % 9 - 4),
                x * 1.3e-3 * (i as f64),
            ));
            ranges.push((-x * 1.7e-7, x * 2.3e-7));
            ranges.push((x * 0.01, x * 0.01 + 0.123 * x));
        }
        for (lo, hi) in ranges {
            if hi <= lo {
                continue;
            }
            let t = axis_ticks(lo, hi, Y_INTERVALS, false);
            assert!(
                (2..=(Y_INTERVALS as usize + 1)).contains(&t.values.len()),
                "[{lo:e}, {hi:e}]: {:?}",
                t.values
            );
            for (v, label) in t.values.iter().zip(t.labels()) {
                assert!(*v >= lo - t.step.value() * 1e-6 && *v <= hi + t.step.value() * 1e-6);
                let back: f64 = label.parse().expect("a label is a number");
                assert_eq!(back, *v, "[{lo:e}, {hi:e}]: label {label} of tick {v:e}");
                assert!(label.len() <= 8, "[{lo:e}, {hi:e}]: label {label}");
                assert!(
                    !label.contains("e-2") && !label.contains("00000000"),
                    "{label}"
                );
            }
        }
    }

    #[test]
    fn loss_and_miou_axes_get_plain_decimals() {
        assert_eq!(
            labels(0.3, 2.9, Y_INTERVALS, false),
            ["0.5", "1.0", "1.5", "2.0", "2.5"]
        );
        assert_eq!(
            labels(-0.05, 1.05, Y_INTERVALS, false),
            ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
        );
        assert_eq!(
            labels(0.031, 0.047, Y_INTERVALS, false),
            ["0.032", "0.034", "0.036", "0.038", "0.040", "0.042", "0.044", "0.046"]
        );
    }

    #[test]
    fn iteration_axis_gets_integer_ticks() {
        assert_eq!(
            labels(0.0, 160_000.0, X_INTERVALS, true),
            ["0", "20000", "40000", "60000", "80000", "100000", "120000", "140000", "160000"]
        );
        assert_eq!(labels(0.0, 1.0, X_INTERVALS, true), ["0", "1"]);
        assert_eq!(
            labels(0.0, 40.0, X_INTERVALS, true),
            ["0", "5", "10", "15", "20", "25", "30", "35", "40"]
        );
        assert!(axis_ticks(0.0, 3.0, X_INTERVALS, true).light.is_empty());
    }

    #[test]
    fn light_lines_fall_between_the_ticks() {
        let t = axis_ticks(0.0, 6e-5, 8, false);
        assert_eq!(t.light.len(), 6 * 4, "four light lines between two ticks");
        assert!(t.light.iter().all(|v| !t.values.contains(v)));
        assert_eq!(t.light[0], 2e-6);
        // Step 0.5: light lines every 0.1; step 0.2: every 0.05.
        let half = axis_ticks(0.0, 1.0, 2, false);
        assert_eq!(half.step, Step { m: 5, e: -1 });
        assert_eq!(half.light, vec![0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]);
        let fifth = axis_ticks(0.0, 0.4, 2, false);
        assert_eq!(fifth.step, Step { m: 2, e: -1 });
        assert_eq!(fifth.light, vec![0.05, 0.1, 0.15, 0.25, 0.3, 0.35]);
    }

    #[test]
    fn degenerate_ranges() {
        assert!(axis_ticks(1.0, 1.0, 8, false).values.is_empty());
        assert!(axis_ticks(f64::NAN, 1.0, 8, false).values.is_empty());
        assert!(axis_ticks(0.0, f64::INFINITY, 8, false).values.is_empty());
        // A flat series gets a range around its value, with ticks that read as that value.
        let (lo, hi) = value_range(&[(0.0, 6e-5), (10.0, 6e-5)]);
        assert!(labels(lo, hi, Y_INTERVALS, false).contains(&"6e-5".to_string()));
        let (lo, hi) = value_range(&[]);
        assert_eq!(labels(lo, hi, Y_INTERVALS, false)[0], "0");
    }

    /// The drawn plot (SVG: its text is in the file) labels the lr axis with the clean ticks.
    #[test]
    fn drawn_svg_has_clean_axis_labels() {
        if register_font().is_err() {
            eprintln!("skipped: no font for the plot's text (fonts-dejavu-core)");
            return;
        }
        let point = |iteration: u64, name: &str, value: f64| pb::MetricPoint {
            attempt: 1,
            iteration,
            name: name.into(),
            value,
        };
        let mut points = Vec::new();
        for i in 0..=16u64 {
            let it = i * 10_000;
            let lr = if i == 16 {
                -1.4e-20
            } else {
                6e-5 * (1.0 - i as f64 / 16.0)
            };
            points.push(point(it, "lr", lr));
            points.push(point(it, "loss", 2.9 - 2.6 * i as f64 / 16.0));
        }
        points.push(point(80_000, "miou", 0.41));
        points.push(point(160_000, "miou", 0.63));
        let mut svg = String::new();
        draw(
            SVGBackend::with_string(&mut svg, (1000, 900)).into_drawing_area(),
            "job-1",
            &points,
        )
        .expect("draw");
        let texts: Vec<&str> = svg
            .split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>').and_then(|(_, r)| r.split_once("</text>")))
            .map(|(text, _)| text.trim())
            .collect();
        for want in [
            "0", "1e-5", "3e-5", "6e-5", "0.5", "1.0", "2.5", "20000", "160000",
        ] {
            assert!(texts.contains(&want), "no label {want:?} in {texts:?}");
        }
        assert!(
            texts
                .iter()
                .all(|t| !t.contains("e-20") && !t.contains("e-1")),
            "{texts:?}"
        );
    }
}
