#!/usr/bin/env bash
# Deletes what create-cluster.sh made: the VMs, the firewall rules, the service accounts and their
# bindings on the bucket. The bucket and its checkpoints stay (delete them yourself).
#
#   deploy/gcp/delete-cluster.sh --project P --zone Z --bucket B [--name NAME] [--workers N]
#                                [--dry-run]
#
#   --workers N  how many worker VMs to delete (default: every NAME-worker-* in the zone;
#                with --dry-run, 1 unless given)
#   --dry-run    print every gcloud command, one per line, shell-quoted, instead of running it
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
. "$here/common.sh"

zone=
name=segtrain
workers=
flag() {
    case $1 in
        --zone) value "$@"; zone=$2 ;;
        --name) value "$@"; name=$2 ;;
        --workers) value "$@"; workers=$2 ;;
        *) return 1 ;;
    esac
}
parse_flags flag "$@"
need --project "$project"
need --zone "$zone"
need --bucket "$bucket"
if [ -n "$workers" ] && ! [[ $workers =~ ^[0-9]{1,3}$ ]]; then
    die "--workers: a number, got $workers"
fi
g=(gcloud --project="$project")

vms=()
if [ -n "$workers" ] || ((dry_run)); then
    for ((i = 0; i < ${workers:-1}; i++)); do
        vms+=("$name-worker-$i")
    done
else
    mapfile -t vms < <("${g[@]}" compute instances list --zones="$zone" \
        --filter="name ~ ^$name-worker-[0-9]+\$" --format='value(name)')
fi
vms+=("$name-coordinator")
run "${g[@]}" compute instances delete "${vms[@]}" --zone="$zone" --quiet
run "${g[@]}" compute firewall-rules delete "$name-grpc" "$name-nccl" --quiet
for side in coordinator worker; do
    sa=$name-$side@$project.iam.gserviceaccount.com
    for role in legacyBucketReader objectViewer objectAdmin objectUser; do
        # --all: every binding of the role for the account, with whatever condition.
        run "${g[@]}" storage buckets remove-iam-policy-binding "gs://$bucket" \
            --member="serviceAccount:$sa" --role="roles/storage.$role" --all --format=none ||
            true
    done
    run "${g[@]}" iam service-accounts delete "$sa" --quiet
done
say "kept gs://$bucket (checkpoints, and segtrain/bootstrap with the worker token: delete it too)"
