#!/usr/bin/env bash
# GCE startup script of a segtrain GPU worker VM (create-cluster.sh sets it as the instance's
# startup-script; it runs as root at every boot, and every step is idempotent). Output goes to
# the journal: journalctl -u google-startup-scripts.
#
#   0. the release (metadata segtrain-release), checked against the pinned SHA-256 (metadata
#      segtrain-release-sha256) before anything runs as root: a mismatch installs nothing;
#   1. the NVIDIA driver, unless one of branch >= segtrain-driver-branch (580: CUDA 13) is there
#      (Deep Learning VM images): NVIDIA's CUDA repository for Debian 12, the open kernel modules
#      (package nvidia-open, or metadata segtrain-driver-packages), pinned to that branch;
#   2. PyPI torch==2.11.0 in /opt/segtrain-venv: the libtorch and NVIDIA libraries the worker
#      links (install.sh copies them to /opt/segtrain/lib);
#   3. the release's deploy/install.sh --role worker;
#   4. the CA certificate and a worker token from gs://BUCKET/segtrain/bootstrap/ (the
#      coordinator's startup script puts them there), and the settings in
#      /etc/segtrain/worker.env that come from metadata: SEGTRAIN_COORDINATOR,
#      SEGTRAIN_ADVERTISE_HOST (this VM's internal address), SEGTRAIN_COLLECTIVE_TIMEOUT and the
#      NCCL variables for multi-host training over the VPC (sockets on the primary gVNIC
#      interface, no InfiniBand). Other lines of the file are left as they are;
#   5. segtrain-workers.target: one worker daemon per GPU.
set -euo pipefail

TORCH_VERSION=2.11.0
log() { printf 'segtrain-startup: %s\n' "$*"; }
md() {
    curl -fsS -H 'Metadata-Flavor: Google' \
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1" 2>/dev/null || true
}

bucket=$(md segtrain-bucket)
release=$(md segtrain-release)
release_sha256=$(md segtrain-release-sha256)
coordinator=$(md segtrain-coordinator)
branch=$(md segtrain-driver-branch)
branch=${branch:-580}
packages=$(md segtrain-driver-packages)
packages=${packages:-nvidia-open}
collective_timeout=$(md segtrain-collective-timeout)
collective_timeout=${collective_timeout:-600}
ifname=$(md segtrain-nccl-socket-ifname)
gpus=$(md segtrain-gpus)
if [ -z "$bucket" ] || [ -z "$release" ] || [ -z "$release_sha256" ] || [ -z "$coordinator" ]; then
    log "metadata segtrain-bucket, segtrain-release, segtrain-release-sha256 and segtrain-coordinator are required"
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

# --- 0. the release, checked -------------------------------------------------------------------
# As in startup-coordinator.sh: a startup script is one self-contained metadata value, so the two
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

# --- 1. driver -----------------------------------------------------------------------------------
driver_branch() {
    nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 | cut -d. -f1
}
have=$(driver_branch || true)
if [ -z "$have" ] || [ "$have" -lt "$branch" ]; then
    log "installing the NVIDIA driver, branch $branch (found: ${have:-none})"
    apt-get update -qq
    apt-get install -y -qq "linux-headers-$(uname -r)" curl ca-certificates >/dev/null
    curl -fsSLo /tmp/cuda-keyring.deb \
        https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb
    dpkg -i /tmp/cuda-keyring.deb
    # Keep every NVIDIA driver package on the branch (upgrades stay within it).
    cat >/etc/apt/preferences.d/segtrain-nvidia-driver <<EOF
Package: *nvidia* libcuda* libnvidia* libnvcuvid* cuda-drivers*
Pin: version $branch.*
Pin-Priority: 1001
EOF
    apt-get update -qq
    read -r -a pkgs <<<"$packages"
    apt-get install -y -qq "${pkgs[@]}" >/dev/null
    if ! modprobe nvidia 2>/dev/null || [ -z "$(driver_branch || true)" ]; then
        if [ ! -e /var/lib/segtrain-driver-reboot ]; then
            touch /var/lib/segtrain-driver-reboot
            log "rebooting to load the driver"
            systemctl reboot
            exit 0
        fi
        log "the NVIDIA driver does not load; see dmesg (a Deep Learning VM image with a driver >= $branch avoids this step)"
        exit 1
    fi
    log "driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
fi

# --- 2. torch ------------------------------------------------------------------------------------
venv=/opt/segtrain-venv
find_torch() {
    local d
    for d in "$venv"/lib/python3*/site-packages/torch; do
        if [ -e "$d/lib/libtorch_cuda.so" ]; then
            printf '%s' "$d"
            return
        fi
    done
}
torch_dir=$(find_torch)
if [ -z "$torch_dir" ]; then
    log "installing torch==$TORCH_VERSION into $venv (a few GB)"
    apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
    torch_dir=$(find_torch)
    [ -n "$torch_dir" ] || {
        log "torch==$TORCH_VERSION did not install into $venv"
        exit 1
    }
fi

# --- 3. install ----------------------------------------------------------------------------------
rm -rf "$work/release"
mkdir -p "$work/release"
tar -xzf "$work/release.tar.gz" -C "$work/release" --strip-components=1
"$work/release/deploy/install.sh" --role worker --build-dir "$work/release/bin" --torch-dir "$torch_dir"

# --- 4. bootstrap and settings -------------------------------------------------------------------
bootstrap=gs://$bucket/segtrain/bootstrap
for _ in $(seq 180); do
    if gcloud storage cp "$bootstrap/ca.pem" "$work/ca.pem" >/dev/null 2>&1 &&
        gcloud storage cp "$bootstrap/worker.token" "$work/worker.token" >/dev/null 2>&1; then
        break
    fi
    log "waiting for the coordinator to publish $bootstrap/ca.pem and worker.token"
    sleep 10
done
[ -s "$work/worker.token" ] || {
    log "no worker token in $bootstrap after 30 minutes; is the coordinator VM up?"
    exit 1
}
install -m 0644 "$work/ca.pem" /etc/segtrain/ca.pem
install -m 0640 -g segtrain-worker "$work/worker.token" /etc/segtrain/worker.token
rm -f "$work/worker.token"

# set_env KEY VALUE: KEY=VALUE in worker.env, replacing an earlier line of KEY.
env_file=/etc/segtrain/worker.env
set_env() {
    local tmp
    tmp=$(mktemp "$env_file.XXXXXX")
    grep -v "^$1=" "$env_file" >"$tmp" || true
    printf '%s=%s\n' "$1" "$2" >>"$tmp"
    chmod 0640 "$tmp"
    chgrp segtrain-worker "$tmp"
    mv "$tmp" "$env_file"
}
address=$(curl -fsS -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/network-interfaces/0/ip)
if [ -z "$ifname" ]; then
    ifname=$(ip -o -4 route show to default | awk '{print $5; exit}')
fi
before=$(sha256sum <"$env_file")
set_env SEGTRAIN_COORDINATOR "https://$coordinator"
set_env SEGTRAIN_CA /etc/segtrain/ca.pem
set_env SEGTRAIN_TOKEN_FILE /etc/segtrain/worker.token
set_env SEGTRAIN_ADVERTISE_HOST "$address"
set_env SEGTRAIN_COLLECTIVE_TIMEOUT "$collective_timeout"
# NCCL over TCP sockets on the VPC: plain GCP VMs have no InfiniBand. (A3's GPUDirect-TCPX needs
# extra NICs and NVIDIA's TCPX plugin; see docs/operations.md.)
set_env NCCL_SOCKET_IFNAME "$ifname"
set_env NCCL_IB_DISABLE 1
set_env NCCL_DEBUG WARN

# --- 5. start ------------------------------------------------------------------------------------
systemctl enable segtrain-workers.target
if systemctl is-active --quiet segtrain-workers.target && [ "$(sha256sum <"$env_file")" != "$before" ]; then
    # The units started at boot, before this script changed their settings. (A new release is
    # not restarted into here: upgrade by draining, docs/operations.md.)
    systemctl restart segtrain-workers.target
else
    systemctl start segtrain-workers.target
fi
found=$(nvidia-smi -L | grep -c '^GPU ' || true)
if [ -n "$gpus" ] && [ "$found" != "$gpus" ]; then
    log "warning: nvidia-smi lists $found GPUs, the cluster was created with $gpus per VM"
fi
log "ready: $found GPU workers for $coordinator"
