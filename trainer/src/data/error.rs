//! The data pipeline's error type. Every variant that concerns a file names its path, so a
//! message alone tells the user which file of a 5000-image dataset to look at.

use std::path::PathBuf;

/// What the expected dataset layout looks like, for messages about a missing or empty dataset.
pub const EXPECTED_LAYOUT: &str = "<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png with \
     <root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png or <name>_gtFine_labelIds.png";

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset root {root} does not exist or is not a directory; expected the Cityscapes layout {EXPECTED_LAYOUT}")]
    MissingRoot { root: PathBuf },

    #[error("split directory {dir} does not exist (split '{split}'); expected the Cityscapes layout {EXPECTED_LAYOUT}")]
    MissingSplit { dir: PathBuf, split: String },

    #[error("no images found under {dir}; expected {EXPECTED_LAYOUT}")]
    NoImages { dir: PathBuf },

    #[error("missing label for {image}: expected {train_ids} or {label_ids}")]
    MissingLabel {
        image: PathBuf,
        train_ids: PathBuf,
        label_ids: PathBuf,
    },

    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot decode {path}: {message}")]
    Decode { path: PathBuf, message: String },

    #[error("cannot write {path}: {message}")]
    Encode { path: PathBuf, message: String },

    #[error(
        "size mismatch: image {image} is {image_w}x{image_h} but its label {label} is {label_w}x{label_h}"
    )]
    SizeMismatch {
        image: PathBuf,
        image_w: usize,
        image_h: usize,
        label: PathBuf,
        label_w: usize,
        label_h: usize,
    },

    #[error("label map {path} is {found}; expected an 8-bit single-channel (grayscale) PNG of class ids")]
    LabelFormat { path: PathBuf, found: String },

    #[error(
        "label map {path} holds value {value}, which is not a trainId (0..18) nor 255 (ignore)"
    )]
    LabelValue { path: PathBuf, value: u8 },

    #[error("invalid data configuration: {0}")]
    Config(String),

    #[error("loader worker failed: {0}")]
    Worker(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
