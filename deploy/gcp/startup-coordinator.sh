#!/usr/bin/env bash
# GCE startup script of the segtrain coordinator VM (create-cluster.sh sets it as the instance's
# startup-script; it runs as root at every boot, and every step is idempotent). Output goes to
# the journal: journalctl -u google-startup-scripts.
#
#   1. fetches the release (instance metadata segtrain-release, a gs:// tarball made by
#      upload-release.sh), checks it against the pinned SHA-256 (metadata
#      segtrain-release-sha256; a mismatch installs nothing), and runs its deploy/install.sh
#      --role coordinator: the binaries, the unit, a local PostgreSQL database and role, and a
#      TLS certificate for this VM's names;
#   2. starts segtrain-coordinator.service;
#   3. bootstraps the cluster once: an admin token in /root/segtrain-admin.token, and a worker
#      token and the CA certificate in gs://BUCKET/segtrain/bootstrap/, where the worker VMs'
#      startup scripts fetch them (only this project's service accounts and owners can read the
#      bucket; revoke the token with `segtrain token revoke` and delete the objects to rotate).
set -euo pipefail

log() { printf 'segtrain-startup: %s\n' "$*"; }
md() {
    curl -fsS -H 'Metadata-Flavor: Google' \
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1" 2>/dev/null || true
}

bucket=$(md segtrain-bucket)
release=$(md segtrain-release)
release_sha256=$(md segtrain-release-sha256)
port=$(md segtrain-port)
port=${port:-50051}
if [ -z "$bucket" ] || [ -z "$release" ] || [ -z "$release_sha256" ]; then
    log "metadata segtrain-bucket, segtrain-release and segtrain-release-sha256 are required"
    exit 1
fi

# --- 1. release, checked, and install ------------------------------------------------------------
# As in startup-worker.sh: a startup script is one self-contained metadata value, so the two
# cannot share a library.
work=${SEGTRAIN_STARTUP_CACHE:-/var/cache/segtrain}
mkdir -p "$work"
log "fetching $release"
gcloud storage cp "$release" "$work/release.tar.gz"
got=$(sha256sum "$work/release.tar.gz" | cut -d' ' -f1)
if [ "$got" != "$release_sha256" ]; then
    log "the release's SHA-256 is $got, not the pinned $release_sha256 (metadata segtrain-release-sha256): not installing it"
    rm -f "$work/release.tar.gz"
    exit 1
fi
log "release verified (SHA-256 $got)"
rm -rf "$work/release"
mkdir -p "$work/release"
tar -xzf "$work/release.tar.gz" -C "$work/release" --strip-components=1
"$work/release/deploy/install.sh" --role coordinator --build-dir "$work/release/bin" \
    --tls-host "$(hostname)" --tls-host "$(hostname -f)"

env_file=/etc/segtrain/coordinator.env
if ! grep -q "^SEGTRAIN_LISTEN=0.0.0.0:$port\$" "$env_file"; then
    sed -i "s/^SEGTRAIN_LISTEN=.*/SEGTRAIN_LISTEN=0.0.0.0:$port/" "$env_file"
fi

# --- 2. start ------------------------------------------------------------------------------------
systemctl enable --now segtrain-coordinator.service

# --- 3. bootstrap tokens -------------------------------------------------------------------------
url=$(sed -n 's/^SEGTRAIN_DATABASE_URL=//p' "$env_file" | tail -n 1)
token() {
    runuser -u segtrain -- /opt/segtrain/bin/segtrain-coordinator token create \
        --database-url "$url" --role "$1" --name "$2"
}
if [ ! -s /root/segtrain-admin.token ]; then
    (umask 077 && token admin "gcp-admin" >/root/segtrain-admin.token)
    log "wrote /root/segtrain-admin.token"
fi
bootstrap=gs://$bucket/segtrain/bootstrap
if ! gcloud storage ls "$bootstrap/worker.token" >/dev/null 2>&1; then
    (umask 077 && token worker "gcp-workers" >"$work/worker.token")
    gcloud storage cp "$work/worker.token" "$bootstrap/worker.token"
    rm -f "$work/worker.token"
    log "uploaded a worker token to $bootstrap/worker.token"
fi
gcloud storage cp /etc/segtrain/tls/ca.pem "$bootstrap/ca.pem"
log "ready: $(hostname):$port"
