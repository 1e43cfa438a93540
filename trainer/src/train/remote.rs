//! Checkpoints in an object store: `gs://bucket/prefix` (Google Cloud Storage through
//! `object_store`; credentials from the environment, e.g. the VM's service account), and, in
//! tests, `object_store`'s in-memory and local-filesystem backends.
//!
//! Local paths (and gcsfuse mounts) do not come here: they are written in place by
//! [`super::checkpoint::save`] (temp directory, fsync, rename).
//!
//! A checkpoint is the objects `<dir>/ckpt-<iteration>/{model,optimizer}.safetensors` and
//! `manifest.json`. The trainer writes it locally first (the staging copy), then uploads the
//! tensor files and the manifest **last**: the manifest's presence is what makes a checkpoint
//! visible to listing and retention, and the coordinator only marks it COMPLETE after the upload
//! (with the manifest's sha256), so a partial upload is never resumed from. Resuming downloads
//! the objects into a local directory and verifies every digest there.

use super::checkpoint::{self, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE};
use anyhow::{bail, Context};
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::path::Path;
use std::sync::Arc;

/// An object store and the URI prefix its paths are written under (`gs://bucket`,
/// `memory://`, ...).
#[derive(Clone, Debug)]
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    base: String,
}

/// A directory in a store: where one attempt's checkpoints go.
#[derive(Clone, Debug)]
pub struct RemoteDir {
    pub store: RemoteStore,
    pub path: ObjPath,
}

impl RemoteStore {
    /// A store from an existing `object_store` backend; `base` is the URI its root has, e.g.
    /// `memory://test` (paths are appended after a `/`).
    pub fn new(store: Arc<dyn ObjectStore>, base: impl Into<String>) -> RemoteStore {
        RemoteStore {
            store,
            base: base.into().trim_end_matches('/').to_string(),
        }
    }

    /// Opens the store of a `gs://bucket/prefix` URI and returns it with the path part.
    pub fn open(uri: &str) -> anyhow::Result<(RemoteStore, ObjPath)> {
        let Some(rest) = uri.strip_prefix("gs://") else {
            bail!("{uri}: not an object-store URI; expected gs://bucket/prefix");
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("{uri}: no bucket; expected gs://bucket/prefix");
        }
        let gcs = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(bucket)
            .build()
            .with_context(|| format!("{uri}: cannot open the Google Cloud Storage bucket"))?;
        let store = RemoteStore::new(Arc::new(gcs), format!("gs://{bucket}"));
        let path = ObjPath::parse(prefix).with_context(|| format!("{uri}: bad object path"))?;
        Ok((store, path))
    }

    /// The URI of a path in this store.
    pub fn uri(&self, path: &ObjPath) -> String {
        format!("{}/{}", self.base, path)
    }

    /// The path of a URI in this store (`None`: another store).
    pub fn path_of(&self, uri: &str) -> Option<ObjPath> {
        let rest = uri.strip_prefix(&self.base)?.strip_prefix('/')?;
        ObjPath::parse(rest).ok()
    }
}

/// Runs one store operation to completion from the (synchronous) trainer.
fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime for the object store")?
        .block_on(f)
}

impl RemoteDir {
    pub fn uri(&self) -> String {
        self.store.uri(&self.path)
    }

    /// Uploads the local checkpoint `local` as `<dir>/<its name>`, the manifest last. Returns
    /// its URI.
    pub fn upload(&self, local: &Path) -> anyhow::Result<String> {
        let name = local
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: not a checkpoint directory", local.display()))?;
        let dest = self.path.clone().join(name);
        block_on(async {
            for file in [MODEL_FILE, OPTIMIZER_FILE, MANIFEST_FILE] {
                let bytes = tokio::fs::read(local.join(file))
                    .await
                    .with_context(|| format!("cannot read {}", local.join(file).display()))?;
                let to = dest.clone().join(file);
                self.store
                    .store
                    .put(&to, PutPayload::from(bytes))
                    .await
                    .with_context(|| format!("cannot upload {}", self.store.uri(&to)))?;
            }
            Ok(())
        })?;
        Ok(self.store.uri(&dest))
    }

    /// Checkpoints (with a manifest) of this attempt, as (iteration, attempt, path): never
    /// another attempt's (see [`checkpoint::retain`] for why).
    pub fn list_job(&self) -> anyhow::Result<Vec<(u64, u32, ObjPath)>> {
        let parts: Vec<String> = self.path.parts().map(|p| p.as_ref().to_string()).collect();
        let mine = parts
            .last()
            .and_then(|p| p.strip_prefix("attempt-"))
            .and_then(|k| k.parse::<u32>().ok());
        let (job, mine) = match mine {
            Some(k) => (
                ObjPath::from_iter(parts[..parts.len() - 1].iter().map(String::as_str)),
                k,
            ),
            None => (self.path.clone(), 0),
        };
        let metas: Vec<object_store::ObjectMeta> = block_on(async {
            self.store
                .store
                .list(Some(&job))
                .try_collect()
                .await
                .with_context(|| format!("cannot list {}", self.store.uri(&job)))
        })?;
        let mut out = Vec::new();
        for m in metas {
            let p: Vec<String> = m.location.parts().map(|p| p.as_ref().to_string()).collect();
            // .../[attempt-<k>/]ckpt-<iteration>/manifest.json
            if p.last().map(String::as_str) != Some(MANIFEST_FILE) || p.len() < 2 {
                continue;
            }
            let Some(it) = p[p.len() - 2]
                .strip_prefix("ckpt-")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let attempt = if p.len() >= 3 {
                p[p.len() - 3]
                    .strip_prefix("attempt-")
                    .and_then(|s| s.parse::<u32>().ok())
            } else {
                None
            };
            let attempt = match (attempt, mine) {
                (Some(a), _) if a == mine => a,
                (Some(_), _) => continue, // another attempt's: never touched
                (None, 0) => 0,
                (None, _) => continue,
            };
            let dir = ObjPath::from_iter(p[..p.len() - 1].iter().map(String::as_str));
            out.push((it, attempt, dir));
        }
        Ok(out)
    }

    /// Keeps the newest `keep_last` checkpoints (and the best) of the job, deleting the rest
    /// from the store, manifest first (so a half-deleted checkpoint is never listed). Returns
    /// the URIs deleted.
    pub fn retain(
        &self,
        keep_last: usize,
        best_iteration: Option<u64>,
    ) -> anyhow::Result<Vec<String>> {
        let doomed = checkpoint::retention(self.list_job()?, keep_last, best_iteration);
        let mut deleted = Vec::new();
        for dir in doomed {
            block_on(async {
                for file in [MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE] {
                    let p = dir.clone().join(file);
                    match self.store.store.delete(&p).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("cannot delete {}", self.store.uri(&p)))
                        }
                    }
                }
                Ok(())
            })?;
            deleted.push(self.store.uri(&dir));
        }
        Ok(deleted)
    }
}

/// Downloads one object (pretrained weights: `pretrained = "gs://bucket/mit_b2.safetensors"`)
/// into the local file `dest`, as checkpoints are fetched. An object that does not exist, or
/// that this host may not read, is a deterministic failure (a restart would not find it
/// either); anything else (the network, the service) is worth a restart.
pub fn fetch(store: &RemoteStore, path: &ObjPath, dest: &Path) -> anyhow::Result<()> {
    let uri = store.uri(path);
    let got = block_on(async {
        let r = store.store.get(path).await;
        match r {
            Ok(r) => Ok(Ok(r.bytes().await)),
            Err(e) => Ok(Err(e)),
        }
    })?;
    let bytes = match got {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(e).with_context(|| format!("cannot download {uri}")),
        Err(
            e @ (object_store::Error::NotFound { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }),
        ) => {
            return Err(super::stop::deterministic(
                anyhow::Error::new(e).context(format!("{uri} cannot be read")),
            ))
        }
        Err(e) => return Err(e).with_context(|| format!("cannot download {uri}")),
    };
    std::fs::write(dest, &bytes).with_context(|| format!("cannot write {}", dest.display()))
}

/// Downloads the checkpoint at `path` of `store` into the local directory `local` (replacing
/// it), manifest first; the caller verifies it ([`checkpoint::load`]).
pub fn download(store: &RemoteStore, path: &ObjPath, local: &Path) -> anyhow::Result<()> {
    if local.exists() {
        std::fs::remove_dir_all(local)
            .with_context(|| format!("cannot replace {}", local.display()))?;
    }
    std::fs::create_dir_all(local).with_context(|| format!("cannot create {}", local.display()))?;
    block_on(async {
        for file in [MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE] {
            let from = path.clone().join(file);
            let bytes = store
                .store
                .get(&from)
                .await
                .with_context(|| format!("cannot download {}", store.uri(&from)))?
                .bytes()
                .await
                .with_context(|| format!("cannot download {}", store.uri(&from)))?;
            tokio::fs::write(local.join(file), &bytes)
                .await
                .with_context(|| format!("cannot write {}", local.join(file).display()))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_map_to_store_paths_and_back() {
        let store = RemoteStore::new(
            Arc::new(object_store::memory::InMemory::new()),
            "memory://b/",
        );
        let p = ObjPath::from("jobs/j1/attempt-2/ckpt-00000004");
        assert_eq!(store.uri(&p), "memory://b/jobs/j1/attempt-2/ckpt-00000004");
        assert_eq!(store.path_of(&store.uri(&p)), Some(p));
        assert_eq!(store.path_of("memory://other/x"), None);
        assert_eq!(store.path_of("/local/path"), None);
    }

    #[test]
    fn an_object_is_fetched_and_a_missing_one_fails_deterministically() {
        let mem: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let store = RemoteStore::new(mem.clone(), "memory://w");
        let path = ObjPath::from("mit/b0.safetensors");
        block_on(async {
            mem.put(&path, PutPayload::from(vec![1u8, 2, 3]))
                .await
                .map_err(anyhow::Error::from)
        })
        .expect("put");
        let dir = tempfile::tempdir().expect("temp dir");
        let dest = dir.path().join("w.safetensors");
        fetch(&store, &path, &dest).expect("fetched");
        assert_eq!(std::fs::read(&dest).expect("read"), [1, 2, 3]);
        let e = fetch(&store, &ObjPath::from("mit/none"), &dest).expect_err("missing");
        assert!(super::super::stop::is_deterministic(&e), "{e:#}");
        assert!(format!("{e:#}").contains("memory://w/mit/none"), "{e:#}");
    }

    #[test]
    fn bad_gs_uris_are_refused_naming_them() {
        for (uri, needle) in [
            ("gs://", "no bucket"),
            ("gs:///prefix", "no bucket"),
            ("s3://bucket/x", "expected gs://bucket/prefix"),
        ] {
            let e = RemoteStore::open(uri).expect_err(uri);
            let msg = format!("{e:#}");
            assert!(msg.contains(uri) && msg.contains(needle), "{msg}");
        }
    }
}
