#!/usr/bin/env bash
# Creates a segtrain cluster on Google Cloud with gcloud: a coordinator VM (PostgreSQL on it) and
# N GPU worker VMs, a service account for each side with only what it needs on the bucket (IAM
# conditions on object names: the coordinator reads segtrain/release/ and writes
# segtrain/bootstrap/; the workers read those two and write only under segtrain/checkpoints/,
# their checkpoint_root; both may list names), and firewall rules: the coordinator's gRPC port
# from the workers (and --admin-cidr), and every TCP port between workers (NCCL and the TCP
# collective). Each VM's startup script (startup-coordinator.sh, startup-worker.sh) fetches the
# release from the bucket and checks it against the pinned --release-sha256 before installing
# anything as root, then installs the NVIDIA driver (workers: >= 580, for CUDA 13), PyPI torch's
# libtorch, and the release with deploy/install.sh, and starts the units. Upload a release first
# (your own account writes it; no VM can): deploy/gcp/upload-release.sh --bucket BUCKET prints
# the SHA-256 to pin. Existing resources are left alone, so running it again creates only what
# is missing.
#
#   deploy/gcp/create-cluster.sh --project P --zone Z --bucket B --release-sha256 HEX [options]
#                                [--dry-run]
#
#   --project ID                the Google Cloud project (required)
#   --zone ZONE                 e.g. us-central1-a (required; GPUs of the type must exist there)
#   --bucket NAME               checkpoint bucket, NAME or gs://NAME (required)
#   --release-sha256 HEX        the release tarball's SHA-256, as upload-release.sh printed it
#                               (required): every VM refuses a release that does not match
#   --create-bucket             also create the bucket (in the zone's region)
#   --name NAME                 resource name prefix (default segtrain): NAME-coordinator,
#                               NAME-worker-0.., the NAME-coordinator and NAME-worker service
#                               accounts, NAME-grpc, NAME-nccl
#   --workers N                 GPU VMs (default 1)
#   --worker-machine-type T     default a3-highgpu-8g (a2-highgpu-8g, g2-standard-96, ...)
#   --gpu-type TYPE             default nvidia-h100-80gb (nvidia-a100-80gb, nvidia-l4, ...)
#   --gpus-per-worker N         default 8 (must match the machine type)
#   --coordinator-machine-type T  default e2-standard-4
#   --image-family F            default debian-12 (with --image-project debian-cloud); a Deep
#   --image-project P           Learning VM image with a >= 580 driver skips the driver install
#   --worker-disk-size SIZE     default 200GB (pd-ssd); the coordinator gets 50GB (pd-balanced)
#   --network NET               default "default"
#   --subnet SUBNET             optional
#   --admin-cidr CIDR           who else may reach the coordinator's port (repeatable)
#   --port PORT                 the coordinator's gRPC port (default 50051)
#   --release URL               the release tarball (default gs://BUCKET/segtrain/release/segtrain.tar.gz)
#   --driver-branch N           minimum NVIDIA driver branch (default 580: CUDA 13)
#   --collective-timeout SEC    SEGTRAIN_COLLECTIVE_TIMEOUT on the workers (default 600)
#   --nccl-socket-ifname IF     NCCL_SOCKET_IFNAME (default: the VM's default-route interface)
#   --spot                      Spot VMs for the workers (cheaper; a preempted worker's trainers
#                               checkpoint the current iteration within the notice and the job
#                               restarts without counting it: docs/operations.md, "Spot pools")
#   --dry-run                   print every gcloud command, one per line, shell-quoted, instead
#                               of running it
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
. "$here/common.sh"

zone=
create_bucket=0
name=segtrain
workers=1
worker_type=a3-highgpu-8g
gpu_type=nvidia-h100-80gb
gpus=8
coord_type=e2-standard-4
image_family=debian-12
image_project=debian-cloud
worker_disk=200GB
network=default
subnet=
admin_cidrs=()
port=50051
release=
release_sha256=
driver_branch=580
collective_timeout=600
nccl_ifname=
spot=0

flag() {
    case $1 in
        --zone) value "$@"; zone=$2 ;;
        --create-bucket) create_bucket=1 ;;
        --name) value "$@"; name=$2 ;;
        --workers) value "$@"; workers=$2 ;;
        --worker-machine-type) value "$@"; worker_type=$2 ;;
        --gpu-type) value "$@"; gpu_type=$2 ;;
        --gpus-per-worker) value "$@"; gpus=$2 ;;
        --coordinator-machine-type) value "$@"; coord_type=$2 ;;
        --image-family) value "$@"; image_family=$2 ;;
        --image-project) value "$@"; image_project=$2 ;;
        --worker-disk-size) value "$@"; worker_disk=$2 ;;
        --network) value "$@"; network=$2 ;;
        --subnet) value "$@"; subnet=$2 ;;
        --admin-cidr) value "$@"; admin_cidrs+=("$2") ;;
        --port) value "$@"; port=$2 ;;
        --release) value "$@"; release=$2 ;;
        --release-sha256) value "$@"; release_sha256=$2 ;;
        --driver-branch) value "$@"; driver_branch=$2 ;;
        --collective-timeout) value "$@"; collective_timeout=$2 ;;
        --nccl-socket-ifname) value "$@"; nccl_ifname=$2 ;;
        --spot) spot=1 ;;
        *) return 1 ;;
    esac
}
parse_flags flag "$@"
need --project "$project"
need --zone "$zone"
need --bucket "$bucket"
need --release-sha256 "$release_sha256"
[[ $release_sha256 =~ ^[0-9a-f]{64}$ ]] ||
    die "--release-sha256: 64 lower-case hex digits (upload-release.sh prints it), got $release_sha256"
[[ $name =~ ^[a-z]([-a-z0-9]{0,18}[a-z0-9])?$ ]] ||
    die "--name: lower-case letters, digits and dashes, at most 20 characters, got $name"
# in_range VALUE MIN MAX: VALUE is a whole number within MIN..MAX.
in_range() { [[ $1 =~ ^[0-9]{1,9}$ ]] && (($1 >= $2 && $1 <= $3)); }
in_range "$workers" 1 64 || die "--workers: 1..64, got $workers"
in_range "$gpus" 1 16 || die "--gpus-per-worker: 1..16, got $gpus"
in_range "$port" 1 65535 || die "--port: 1..65535, got $port"
in_range "$driver_branch" 1 9999 || die "--driver-branch: a number such as 580, got $driver_branch"
in_range "$collective_timeout" 1 86400 || die "--collective-timeout: 1..86400 seconds, got $collective_timeout"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone: a zone such as us-central1-a, got $zone"
[ -n "$release" ] || release=gs://$bucket/segtrain/release/segtrain.tar.gz
# Metadata values are comma-separated key=value pairs; keep them free of commas.
for v in "$bucket" "$release" "$nccl_ifname"; do
    [[ $v != *,* ]] || die "a comma in $v: not allowed in instance metadata values"
done

region=$(region_of "$zone")
coordinator_sa=$name-coordinator@$project.iam.gserviceaccount.com
worker_sa=$name-worker@$project.iam.gserviceaccount.com
coordinator=$name-coordinator
coordinator_tag=$name-coordinator
worker_tag=$name-worker
g=(gcloud --project="$project")

# --- APIs, service accounts, bucket access -------------------------------------------------------
run "${g[@]}" services enable compute.googleapis.com iam.googleapis.com storage.googleapis.com
for side in coordinator worker; do
    if ! exists "${g[@]}" iam service-accounts describe "$name-$side@$project.iam.gserviceaccount.com"; then
        run "${g[@]}" iam service-accounts create "$name-$side" \
            --display-name="segtrain $side VMs ($name)"
    fi
done
if ((create_bucket)) && ! exists "${g[@]}" storage buckets describe "gs://$bucket"; then
    run "${g[@]}" storage buckets create "gs://$bucket" --location="$region" --uniform-bucket-level-access
fi
# under TITLE PREFIX...: an IAM condition on object names (the bucket needs uniform bucket-level
# access, which conditions require).
under() {
    local title=$1 expr="" p
    shift
    for p in "$@"; do
        [ -n "$expr" ] && expr+=" || "
        expr+="resource.name.startsWith(\"projects/_/buckets/$bucket/objects/$p\")"
    done
    printf 'expression=%s,title=%s' "$expr" "$title"
}
# grant SA ROLE [CONDITION]: a binding on the bucket; a new service account takes a few seconds
# to be usable in IAM policies.
grant() {
    local cond=()
    [ -n "${3:-}" ] && cond=(--condition="$3")
    for attempt in 1 2 3 4 5 6; do
        if run "${g[@]}" storage buckets add-iam-policy-binding "gs://$bucket" \
            --member="serviceAccount:$1" --role="$2" "${cond[@]}" --format=none; then
            return
        fi
        ((attempt < 6)) || die "cannot grant $1 $2 on gs://$bucket"
        sleep 10
    done
}
# Object names for everyone (the checkpoint backend lists a job's checkpoints).
grant "$coordinator_sa" roles/storage.legacyBucketReader
grant "$worker_sa" roles/storage.legacyBucketReader
# The release: read by both, written by nobody here (the operator's account uploads it).
grant "$coordinator_sa" roles/storage.objectViewer "$(under segtrain-release segtrain/release/)"
# The bootstrap objects (CA, worker token): written by the coordinator, read by the workers.
grant "$coordinator_sa" roles/storage.objectAdmin "$(under segtrain-bootstrap segtrain/bootstrap/)"
grant "$worker_sa" roles/storage.objectViewer "$(under segtrain-release-and-bootstrap segtrain/release/ segtrain/bootstrap/)"
# Checkpoints: the workers write (and retention deletes) under segtrain/checkpoints/ only.
grant "$worker_sa" roles/storage.objectUser "$(under segtrain-checkpoints segtrain/checkpoints/)"

# --- firewall ------------------------------------------------------------------------------------
if ! exists "${g[@]}" compute firewall-rules describe "$name-grpc"; then
    sources=(--source-tags="$worker_tag")
    if ((${#admin_cidrs[@]})); then
        sources+=(--source-ranges="$(IFS=,; printf '%s' "${admin_cidrs[*]}")")
    fi
    run "${g[@]}" compute firewall-rules create "$name-grpc" --network="$network" \
        --direction=INGRESS --action=ALLOW --rules="tcp:$port" \
        --target-tags="$coordinator_tag" "${sources[@]}" \
        --description="segtrain: gRPC API of the coordinator (workers and --admin-cidr)"
fi
if ! exists "${g[@]}" compute firewall-rules describe "$name-nccl"; then
    run "${g[@]}" compute firewall-rules create "$name-nccl" --network="$network" \
        --direction=INGRESS --action=ALLOW --rules=tcp,icmp \
        --target-tags="$worker_tag" --source-tags="$worker_tag" \
        --description="segtrain: NCCL and the TCP collective between worker VMs (all TCP ports)"
fi

# --- VMs -----------------------------------------------------------------------------------------
nic=network=$network
[ -n "$subnet" ] && nic+=,subnet=$subnet
metadata=segtrain-bucket=$bucket,segtrain-release=$release,segtrain-release-sha256=$release_sha256
metadata+=,segtrain-port=$port

if ! exists "${g[@]}" compute instances describe "$coordinator" --zone="$zone"; then
    run "${g[@]}" compute instances create "$coordinator" --zone="$zone" \
        --machine-type="$coord_type" \
        --image-family=debian-12 --image-project=debian-cloud \
        --boot-disk-size=50GB --boot-disk-type=pd-balanced \
        --network-interface="$nic" \
        --service-account="$coordinator_sa" --scopes=cloud-platform \
        --tags="$coordinator_tag" \
        --metadata="$metadata" \
        --metadata-from-file=startup-script="$here/startup-coordinator.sh"
fi

worker_metadata=$metadata,segtrain-coordinator=$coordinator:$port,segtrain-driver-branch=$driver_branch
worker_metadata+=,segtrain-collective-timeout=$collective_timeout,segtrain-gpus=$gpus
[ -n "$nccl_ifname" ] && worker_metadata+=,segtrain-nccl-socket-ifname=$nccl_ifname
scheduling=(--maintenance-policy=TERMINATE --restart-on-failure)
if ((spot)); then
    scheduling=(--maintenance-policy=TERMINATE --provisioning-model=SPOT --instance-termination-action=STOP)
fi
for ((i = 0; i < workers; i++)); do
    vm=$name-worker-$i
    if exists "${g[@]}" compute instances describe "$vm" --zone="$zone"; then
        continue
    fi
    run "${g[@]}" compute instances create "$vm" --zone="$zone" \
        --machine-type="$worker_type" \
        --accelerator="type=$gpu_type,count=$gpus" \
        "${scheduling[@]}" \
        --image-family="$image_family" --image-project="$image_project" \
        --boot-disk-size="$worker_disk" --boot-disk-type=pd-ssd \
        --network-interface="$nic,nic-type=GVNIC" \
        --service-account="$worker_sa" --scopes=cloud-platform \
        --tags="$worker_tag" \
        --metadata="$worker_metadata" \
        --metadata-from-file=startup-script="$here/startup-worker.sh"
done

if ((dry_run == 0)); then
    say "created; the VMs set themselves up (several minutes; the workers install the driver and torch)"
    say "checkpoints: checkpoint_root = \"gs://$bucket/segtrain/checkpoints\" (the workers may write nowhere else)"
    say "follow: gcloud compute ssh $coordinator --project=$project --zone=$zone -- sudo journalctl -fu google-startup-scripts"
    say "admin token: gcloud compute ssh $coordinator --project=$project --zone=$zone -- sudo cat /root/segtrain-admin.token"
fi
