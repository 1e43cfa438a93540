//! Where a path or URI lies: the one rule behind every "is this inside that root?" question (a
//! checkpoint a worker reports against its job's own directory, `resume_from` against
//! `checkpoint_root`, a spec's paths against the roots an operator allows).
//!
//! `/a/b` and `file:///a/b` are the same local place; `gs://bucket/a/b` is a place in a bucket.
//! Empty and `.` segments are ignored; a `..` segment makes a location lie nowhere (it could
//! climb out of any root), so it is never inside anything.

/// A location as a place: local or in one bucket, and its path segments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place<'a> {
    /// `None`: this machine's file system; `Some(bucket)`: an object store bucket.
    bucket: Option<&'a str>,
    segments: Vec<&'a str>,
}

fn place(v: &str) -> Option<Place<'_>> {
    let (bucket, path) = if let Some(rest) = v.strip_prefix("gs://") {
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return None;
        }
        (Some(bucket), path)
    } else if let Some(p) = v.strip_prefix("file://") {
        (None, p.strip_prefix('/')?)
    } else {
        (None, v.strip_prefix('/')?)
    };
    let mut segments = Vec::new();
    for s in path.split('/') {
        match s {
            "" | "." => {}
            ".." => return None,
            s => segments.push(s),
        }
    }
    Some(Place { bucket, segments })
}

/// Whether `v` has a `..` segment (refused wherever a path is checked against a root).
pub fn has_dot_dot(v: &str) -> bool {
    v.split('/').any(|s| s == "..")
}

/// Checks a root that paths are held to (an operator's allowed root): an absolute path, a
/// `file:///` URI or `gs://bucket[/prefix]`, without `..` segments or control characters.
pub fn check_root(v: &str) -> Result<(), String> {
    if v.chars().any(char::is_control) || has_dot_dot(v) || place(v).is_none() {
        return Err(format!(
            "must be an absolute path, file:///path or gs://bucket[/prefix] without `..` \
             segments or control characters, got {v:?}"
        ));
    }
    Ok(())
}

/// Whether `v` is `root` or lies below it. Both are absolute paths, `file://` URIs or `gs://`
/// URIs; anything else, and anything with a `..` segment, is inside nothing.
pub fn is_within(root: &str, v: &str) -> bool {
    match (place(root), place(v)) {
        (Some(r), Some(p)) => r.bucket == p.bucket && p.segments.starts_with(&r.segments),
        _ => false,
    }
}

/// The directory below `checkpoint_root` of one attempt of a job (one per attempt, so a stale
/// trainer of an earlier attempt can never overwrite or delete the current one's files).
pub fn attempt_subdir(job_id: &str, attempt: u32) -> String {
    format!("{job_id}/attempt-{attempt}")
}

/// `root` joined with `sub` (segments separated by `/`), in `root`'s own form.
pub fn join(root: &str, sub: &str) -> String {
    format!(
        "{}/{}",
        root.trim_end_matches('/'),
        sub.trim_start_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_and_outside() {
        let yes = [
            ("/ckpt", "/ckpt/j/attempt-1/iter_10"),
            ("/ckpt/", "/ckpt"),
            ("/ckpt", "file:///ckpt/j"),
            ("file:///ckpt", "/ckpt//j/./x"),
            ("gs://b/p", "gs://b/p/j/attempt-2"),
            ("gs://b", "gs://b/anything"),
            ("/", "/anything"),
        ];
        for (root, v) in yes {
            assert!(is_within(root, v), "{v} in {root}");
        }
        let no = [
            ("/ckpt", "/ckpt2/j"),
            ("/ckpt/j", "/ckpt/j2/x"),
            ("/ckpt", "/ckpt/../etc/passwd"),
            ("/ckpt", "/ckpt/j/../../etc"),
            ("/ckpt", "gs://ckpt/j"),
            ("gs://b/p", "gs://b2/p/j"),
            ("gs://b/p", "gs://b/pp/j"),
            ("gs://b/p", "/b/p/j"),
            ("/ckpt", "ckpt/j"),
            ("/ckpt", "s3://ckpt/j"),
            ("gs://", "gs://b"),
            ("relative", "relative/x"),
        ];
        for (root, v) in no {
            assert!(!is_within(root, v), "{v} not in {root}");
        }
        assert!(has_dot_dot("/a/../b") && has_dot_dot("..") && !has_dot_dot("/a/..b/c"));
        assert!(check_root("/data/vision").is_ok() && check_root("gs://team-b").is_ok());
        for bad in ["data", "gs://", "/a/../b", "/a\nb", "s3://x"] {
            assert!(check_root(bad).is_err(), "{bad}");
        }
        assert_eq!(join("/ckpt/", "j/attempt-1"), "/ckpt/j/attempt-1");
        assert_eq!(join("gs://b/p", "j"), "gs://b/p/j");
    }
}
