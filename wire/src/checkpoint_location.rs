//! Where a run's checkpoints go: the spec's `checkpoint_root` (an absolute path, a `file://`
//! URI or a `gs://` object-store prefix) and a directory below it, the job name for a standalone
//! `train`, `<job id>/attempt-<n>` for a rank started by a daemon (one directory per attempt, so
//! a stale trainer of an earlier attempt can never overwrite or delete the current one's files).

use anyhow::bail;
use std::path::PathBuf;

/// A checkpoint location resolved from `checkpoint_root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointLocation {
    /// A directory on this machine (or a gcsfuse mount): written in place.
    Local(PathBuf),
    /// An object-store directory (`gs://bucket/prefix/...`): written to a local staging
    /// directory first, then uploaded, so that any node can resume from it.
    Remote(String),
}

/// A checkpoint a restarted attempt may resume from, with the manifest digest recorded when it
/// completed. The daemon writes a JSON list of these (newest first) for `train
/// --resume-candidates`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumeCandidate {
    pub uri: String,
    pub iteration: u64,
    pub sha256: String,
}

/// Whether a checkpoint location is an object-store URI (not a local path).
pub fn is_remote(uri: &str) -> bool {
    uri.starts_with("gs://")
}

/// A local checkpoint location: an absolute path or a `file://` URI. `field` names the spec
/// field or flag the location came from, for the error.
pub fn local_path(field: &str, uri: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if is_remote(uri) {
        bail!("{field}: {uri} is an object-store URI, not a local path");
    }
    Ok(PathBuf::from(uri))
}

/// The directory `subdir` below `checkpoint_root`.
pub fn locate(checkpoint_root: &str, subdir: &str) -> anyhow::Result<CheckpointLocation> {
    Ok(if is_remote(checkpoint_root) {
        CheckpointLocation::Remote(format!(
            "{}/{subdir}",
            checkpoint_root.trim_end_matches('/')
        ))
    } else {
        CheckpointLocation::Local(local_path("checkpoint_root", checkpoint_root)?.join(subdir))
    })
}

pub use segtrain_spec::location::attempt_subdir;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_below_a_root() {
        assert_eq!(
            locate("/ckpt", &attempt_subdir("j1", 2)).unwrap(),
            CheckpointLocation::Local(PathBuf::from("/ckpt/j1/attempt-2"))
        );
        assert_eq!(
            locate("file:///ckpt", "name").unwrap(),
            CheckpointLocation::Local(PathBuf::from("/ckpt/name"))
        );
        assert_eq!(
            locate("gs://b/p/", "name").unwrap(),
            CheckpointLocation::Remote("gs://b/p/name".to_string())
        );
        assert!(is_remote("gs://bucket/prefix"));
        assert!(!is_remote("file:///var/lib/segtrain"));
        let err = local_path("--checkpoint-dir", "gs://b").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("--checkpoint-dir: gs://b is an object-store URI"));
    }
}
