//! Fixtures shared by the model tests (made by `fixtures/make_parity_fixtures.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// `worker/tests/fixtures/NAME`; `$SEGTRAIN_TEST_FIXTURES` overrides the folder (for prebuilt
/// test binaries run from another checkout, as `bench/gpu-session.sh` does).
pub fn fixture(name: &str) -> BTreeMap<String, Tensor> {
    let dir = std::env::var_os("SEGTRAIN_TEST_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    let path = dir.join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Rebuilds the B0 fixture's exact fp32 HF state dict (w = q * scale) and writes it to
/// `dir/model.safetensors`, as HuggingFace would.
pub fn write_b0_weights(fx: &BTreeMap<String, Tensor>, dir: &Path) -> PathBuf {
    let mut state: Vec<(String, Tensor)> = Vec::new();
    for (k, q) in fx
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("q.")?, t)))
    {
        let t = match fx.get(&format!("scale.{k}")) {
            Some(scale) => q.to_kind(Kind::Float) * scale,
            None => q.shallow_clone(),
        };
        state.push((k.to_string(), t.contiguous()));
    }
    let file = dir.join("model.safetensors");
    Tensor::write_safetensors(&state, &file).expect("write safetensors");
    file
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    f64::try_from((a - b).abs().max()).expect("scalar")
}
