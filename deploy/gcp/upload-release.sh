#!/usr/bin/env bash
# Packs a release (the binaries, deploy/ and docs/operations.md) and uploads it to the bucket,
# where the VMs' startup scripts fetch it: gs://BUCKET/segtrain/release/segtrain.tar.gz unless
# --object says otherwise, and prints its SHA-256: give it to create-cluster.sh
# --release-sha256, which pins it in every VM's metadata (a VM installs nothing else). Run it
# with your own account: the VMs' service accounts may read releases, not write them. Build
# first: cargo build --release --workspace --bins
#
#   deploy/gcp/upload-release.sh --bucket NAME [--project ID] [--build-dir DIR] [--object PATH]
#                                [--dry-run]
#
#   --dry-run  pack nothing and print the gcloud command, shell-quoted, instead of running it
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=SCRIPTDIR/common.sh
. "$here/common.sh"

build_dir=${SEGTRAIN_BUILD_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}
object=segtrain/release/segtrain.tar.gz
flag() {
    case $1 in
        --build-dir) value "$@"; build_dir=$2 ;;
        --object) value "$@"; object=${2#/} ;;
        *) return 1 ;;
    esac
}
parse_flags flag "$@"
need --bucket "$bucket"
g=(gcloud)
[ -n "$project" ] && g+=(--project="$project")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tarball=$tmp/segtrain.tar.gz
if ((dry_run == 0)); then
    for b in segtrain segtrain-coordinator segtrain-worker; do
        [ -x "$build_dir/$b" ] || die "$build_dir/$b not found: cargo build --release --workspace --bins (or --build-dir)"
    done
    stage=$tmp/segtrain
    mkdir -p "$stage/bin" "$stage/docs"
    cp "$build_dir"/segtrain "$build_dir"/segtrain-coordinator "$build_dir"/segtrain-worker "$stage/bin/"
    cp -r "$repo/deploy" "$stage/deploy"
    cp "$repo/docs/operations.md" "$stage/docs/"
    git -C "$repo" describe --always --dirty >"$stage/VERSION" 2>/dev/null || echo unknown >"$stage/VERSION"
    tar -czf "$tarball" -C "$tmp" segtrain
    say "packed $(cat "$stage/VERSION") ($(du -h "$tarball" | cut -f1))"
fi
run "${g[@]}" storage cp "$tarball" "gs://$bucket/$object"
if ((dry_run == 0)); then
    sha=$(sha256sum "$tarball" | cut -d' ' -f1)
    say "release SHA-256 (pin it: create-cluster.sh --release-sha256 $sha):"
    printf '%s\n' "$sha"
fi
