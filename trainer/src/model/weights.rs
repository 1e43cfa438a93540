//! Loading SegFormer weights from safetensors files with HuggingFace key names.
//!
//! Two kinds of file load: a full segmentation checkpoint (`segformer.encoder.*` and
//! `decode_head.*`), or an encoder-only ImageNet checkpoint (`nvidia/mit-bX`: `segformer.encoder.*`
//! plus an ImageNet `classifier.*`, which is dropped) that fills the encoder and leaves the head
//! freshly initialised. Every name and shape is checked before anything is copied: a file that
//! does not fit changes nothing, and the error lists the missing, unexpected and mismatched keys.

use super::{ENCODER_PREFIX, HEAD_PREFIX};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Encoder and head.
    Full,
    /// Encoder only; the head keeps its fresh initialisation.
    EncoderOnly,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub kind: CheckpointKind,
    /// Tensors copied into the model.
    pub loaded: usize,
    /// File entries deliberately skipped (BatchNorm `num_batches_tracked`, an ImageNet classifier).
    pub skipped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{}", mismatch_message(.source_name, .missing, .unexpected, .mismatched))]
    Mismatch {
        source_name: String,
        missing: Vec<String>,
        unexpected: Vec<String>,
        /// (key, shape in the model, shape in the file)
        mismatched: Vec<(String, Vec<i64>, Vec<i64>)>,
    },
}

fn mismatch_message(
    source: &str,
    missing: &[String],
    unexpected: &[String],
    mismatched: &[(String, Vec<i64>, Vec<i64>)],
) -> String {
    const SHOW: usize = 8;
    let list = |v: &[String]| {
        let mut s = v.iter().take(SHOW).cloned().collect::<Vec<_>>().join(", ");
        if v.len() > SHOW {
            s.push_str(&format!(", … ({} in all)", v.len()));
        }
        s
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "missing {} key(s): {}",
            missing.len(),
            list(missing)
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "unexpected {} key(s): {}",
            unexpected.len(),
            list(unexpected)
        ));
    }
    if !mismatched.is_empty() {
        let m: Vec<String> = mismatched
            .iter()
            .map(|(k, model, file)| format!("{k} (model {model:?}, file {file:?})"))
            .collect();
        parts.push(format!("{} shape mismatch(es): {}", m.len(), list(&m)));
    }
    format!(
        "weights {source} do not fit this model: {}",
        parts.join("; ")
    )
}

/// File entries that are never model parameters.
fn always_skipped(key: &str) -> bool {
    key.ends_with(".num_batches_tracked")
}

/// Loads a safetensors file into the model's VarStore (see the module docs).
pub fn load_file(vs: &nn::VarStore, path: &Path) -> Result<LoadReport, WeightsError> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| WeightsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    load_tensors(vs, tensors, &path.display().to_string())
}

/// Loads named tensors into the model's VarStore; `source_name` is used in errors.
pub fn load_tensors(
    vs: &nn::VarStore,
    tensors: Vec<(String, Tensor)>,
    source_name: &str,
) -> Result<LoadReport, WeightsError> {
    let vars = vs.variables();
    let kind = if tensors.iter().any(|(k, _)| k.starts_with(HEAD_PREFIX)) {
        CheckpointKind::Full
    } else {
        CheckpointKind::EncoderOnly
    };
    let mut file: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut skipped = Vec::new();
    for (key, t) in tensors {
        let imagenet_head = kind == CheckpointKind::EncoderOnly && key.starts_with("classifier.");
        if always_skipped(&key) || imagenet_head {
            skipped.push(key);
        } else {
            file.insert(key, t);
        }
    }

    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| !file.contains_key(*k))
        .filter(|k| !(kind == CheckpointKind::EncoderOnly && k.starts_with(HEAD_PREFIX)))
        .cloned()
        .collect();
    missing.sort();
    let unexpected: Vec<String> = file
        .keys()
        .filter(|k| !vars.contains_key(*k))
        .cloned()
        .collect();
    let mut mismatched: Vec<(String, Vec<i64>, Vec<i64>)> = file
        .iter()
        .filter_map(|(k, t)| {
            let v = vars.get(k)?;
            (v.size() != t.size()).then(|| (k.clone(), v.size(), t.size()))
        })
        .collect();
    mismatched.sort();
    if kind == CheckpointKind::EncoderOnly && !file.keys().any(|k| k.starts_with(ENCODER_PREFIX)) {
        // Neither an encoder nor a head: report everything as missing rather than "loading" nothing.
        missing = vars.keys().cloned().collect();
        missing.sort();
    }
    if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
        return Err(WeightsError::Mismatch {
            source_name: source_name.to_string(),
            missing,
            unexpected,
            mismatched,
        });
    }

    let loaded = file.len();
    tch::no_grad(|| {
        for (k, t) in &file {
            if let Some(v) = vars.get(k) {
                let mut v = v.shallow_clone();
                v.copy_(&t.to_kind(v.kind()).to_device(v.device()));
            }
        }
    });
    Ok(LoadReport {
        kind,
        loaded,
        skipped,
    })
}
