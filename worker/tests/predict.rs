//! `segtrain-worker predict` through the binary: tensor and image inputs, mask and logits out,
//! clear errors.

mod common;

use common::{fixture, max_abs_diff, write_b0_weights};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use tch::Tensor;

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_segtrain-worker"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run segtrain-worker")
}

/// The B0 reference fixture and its weights in a fresh temp dir (the path as text): what every
/// predict test that runs the model starts from.
fn b0_in_temp_dir() -> (BTreeMap<String, Tensor>, tempfile::TempDir, String) {
    let fx = fixture("b0.safetensors");
    let dir = tempfile::tempdir().expect("temp dir");
    let weights = utf8(&write_b0_weights(&fx, dir.path()));
    (fx, dir, weights)
}

fn utf8(p: &Path) -> String {
    p.to_str().expect("utf-8").to_string()
}

#[test]
fn predict_on_a_tensor_reproduces_the_reference_logits_and_writes_a_mask() {
    let (fx, dir, weights) = b0_in_temp_dir();
    let input = dir.path().join("input.safetensors");
    Tensor::write_safetensors(
        &[("pixel_values", fx["pixel_values"].shallow_clone())],
        &input,
    )
    .expect("write input");
    let mask = dir.path().join("mask.png");
    let logits = dir.path().join("logits.safetensors");
    let (mask_arg, logits_arg) = (utf8(&mask), utf8(&logits));
    let rest = ["--out", &mask_arg, "--logits", &logits_arg];
    let out = worker(&predict_args(&weights, &utf8(&input), &rest));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let got = Tensor::read_safetensors(&logits).expect("logits file");
    assert_eq!(got[0].0, "logits");
    let d = max_abs_diff(&got[0].1, &fx["logits"]);
    assert!(d <= 1e-4, "logits differ from the reference by {d}");

    let img = image::open(&mask).expect("mask is an image").into_rgb8();
    assert_eq!(img.dimensions(), (128, 64), "mask has the input's size");
    let palette = segtrain_trainer::data::cityscapes::PALETTE;
    assert!(
        img.pixels().all(|p| palette.contains(&p.0)),
        "only Cityscapes colours"
    );
}

/// `predict --variant b0 --weights W --input I` and then `rest`: the command line every predict
/// test starts from.
fn predict_args<'a>(weights: &'a str, input: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "predict",
        "--variant",
        "b0",
        "--weights",
        weights,
        "--input",
        input,
    ];
    args.extend_from_slice(rest);
    args
}

#[test]
fn predict_on_an_image_writes_a_mask_of_its_size() {
    let (_, dir, weights) = b0_in_temp_dir();
    let photo = dir.path().join("street.png");
    let img = image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 128])
    });
    img.save(&photo).expect("write png");
    let mask = dir.path().join("mask.png");
    let (photo, mask_arg) = (utf8(&photo), utf8(&mask));
    let out = worker(&predict_args(&weights, &photo, &["--out", &mask_arg]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        image::open(&mask).expect("mask").into_rgb8().dimensions(),
        (96, 64)
    );
}

#[test]
fn predict_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let photo = dir.path().join("p.png");
    image::RgbImage::new(64, 64).save(&photo).expect("png");
    let photo = photo.to_str().expect("utf-8");
    // (weights, input, the flags after them, what the one error line names)
    let cases: [(&str, &str, &[&str], &str); 4] = [
        (
            "/nope/w.safetensors",
            photo,
            &["--out", "/tmp/x.png"],
            "/nope/w.safetensors",
        ),
        (
            "/nope/w.safetensors",
            "/nope/in.png",
            &["--out", "/tmp/x.png"],
            "/nope/in.png",
        ),
        (
            "w",
            photo,
            &["--out", "x.png", "--device", "tpu"],
            "--device",
        ),
        ("w", photo, &[], "--out"),
    ];
    for (weights, input, rest, needle) in cases {
        let out = worker(&predict_args(weights, input, rest));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{needle}: {err}"
        );
    }
}
