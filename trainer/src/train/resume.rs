//! Where a rank resumes: the first intact checkpoint of the candidates, else `resume_from`.

use super::TrainOptions;
use crate::train::checkpoint::{self};
use crate::train::remote::{self, RemoteStore};
use crate::train::stop::deterministic;
use anyhow::{bail, Context};
use segtrain_wire::checkpoint_location::{is_remote, local_path};
use std::path::PathBuf;

/// A checkpoint that was loaded and verified, with the newer candidates skipped on the way.
type ResumePoint = (
    String,
    PathBuf,
    checkpoint::Loaded,
    Vec<(u64, String, String)>,
);

/// Where this rank resumes: the first intact checkpoint of `opts.resume_candidates` (its
/// manifest digest must match the recorded one, and every file its manifest digest), else
/// `spec.resume_from`, else nowhere. No intact candidate at all is a deterministic failure.
pub(crate) fn pick_resume_point(opts: &TrainOptions) -> anyhow::Result<Option<ResumePoint>> {
    if opts.resume_candidates.is_empty() {
        let Some(r) = &opts.spec.resume_from else {
            return Ok(None);
        };
        let dir = fetch(opts, r)
            .with_context(|| format!("resume_from: {r}"))
            .map_err(deterministic)?;
        let ck = checkpoint::load(&dir)
            .with_context(|| format!("resume_from: {}", dir.display()))
            .map_err(deterministic)?;
        return Ok(Some((r.clone(), dir, ck, Vec::new())));
    }
    let mut skipped = Vec::new();
    for c in &opts.resume_candidates {
        let loaded = fetch(opts, &c.uri)
            .and_then(|dir| checkpoint::verify_manifest_digest(&dir, &c.sha256).map(|()| dir));
        let (dir, loaded) = match loaded {
            Ok(dir) => {
                let ck = checkpoint::load(&dir);
                (dir, ck)
            }
            Err(e) => (PathBuf::new(), Err(e)),
        };
        let loaded = loaded.and_then(|ck| {
            if ck.manifest.iteration == c.iteration {
                Ok(ck)
            } else {
                bail!(
                    "its manifest says iteration {}, the record says {}",
                    ck.manifest.iteration,
                    c.iteration
                )
            }
        });
        match loaded {
            Ok(ck) => return Ok(Some((c.uri.clone(), dir, ck, skipped))),
            Err(e) => skipped.push((c.iteration, c.uri.clone(), format!("{e:#}"))),
        }
    }
    let why: Vec<String> = skipped
        .iter()
        .map(|(it, uri, e)| format!("iteration {it} ({uri}): {e}"))
        .collect();
    Err(deterministic(anyhow::anyhow!(
        "no intact checkpoint to resume from: {}",
        why.join("; ")
    )))
}

/// A local directory holding the checkpoint at `uri`: the path itself, or a download of an
/// object-store checkpoint into `<checkpoint_dir>/.resume/`.
pub(crate) fn fetch(opts: &TrainOptions, uri: &str) -> anyhow::Result<PathBuf> {
    let from_store = |store: &RemoteStore, path: &object_store::path::Path| {
        let name = path
            .filename()
            .map(str::to_string)
            .unwrap_or_else(|| "checkpoint".to_string());
        let local = opts.checkpoint_dir.join(".resume").join(name);
        remote::download(store, path, &local).map(|()| local)
    };
    if let Some(r) = &opts.checkpoint_remote {
        if let Some(path) = r.store.path_of(uri) {
            return from_store(&r.store, &path);
        }
    }
    if is_remote(uri) {
        let (store, path) = RemoteStore::open(uri)?;
        return from_store(&store, &path);
    }
    local_path("resume_from", uri)
}
