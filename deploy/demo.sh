#!/usr/bin/env bash
# `make demo`: a throwaway PostgreSQL, the coordinator, and a job submitted, queried, watched and
# canceled through the `segtrain` CLI; then the trainer standalone: a synthetic Cityscapes-layout
# dataset, SegFormer-B0 trained on it on the CPU, evaluated by mIoU, and a prediction from its
# checkpoint. Everything it starts is stopped again on exit; results stay in ./demo-out.
# (Training through the coordinator arrives with the worker daemons; the demo grows with them.)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$repo/target/debug"
work=$(mktemp -d -t segtrain-demo-XXXXXX)
port=${SEGTRAIN_DEMO_PORT:-50051}
export SEGTRAIN_COORDINATOR="http://127.0.0.1:$port"
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cargo build --workspace --bins --quiet --manifest-path "$repo/Cargo.toml"

step "a throwaway PostgreSQL"
"$bin/segtrain-devpg" --url-file "$work/pg.url" >/dev/null &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/pg.url" ] && break; sleep 0.2; done
[ -s "$work/pg.url" ] || { echo "PostgreSQL did not start" >&2; exit 1; }
db=$(cat "$work/pg.url")
echo "$db"

step "the coordinator on 127.0.0.1:$port (log: $work/coordinator.log)"
"$bin/segtrain-coordinator" --listen "127.0.0.1:$port" --database-url "$db" --log-format json \
    2>"$work/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do "$bin/segtrain" workers >/dev/null 2>&1 && break; sleep 0.2; done
run "$bin/segtrain" workers

step "a job file from the template, submitted with overrides"
"$bin/segtrain" job-template > "$work/job.toml"
sed -n '1,12p' "$work/job.toml"; echo "  ..."
run "$bin/segtrain" submit -f "$work/job.toml" --name demo-b0 --world-size 2 --max-iters 2000 \
    --warmup-iters 100 --crop-height 512 --crop-width 512 --idempotency-key demo-1
echo "(the same submit again returns the same job)"
run "$bin/segtrain" submit -f "$work/job.toml" --name demo-b0 --world-size 2 --max-iters 2000 \
    --warmup-iters 100 --crop-height 512 --crop-width 512 --idempotency-key demo-1
job=$("$bin/segtrain" --json list | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["id"])')

step "a bad spec is refused, naming the field"
run "$bin/segtrain" submit -f "$work/job.toml" --crop-height 1000 || true

step "query it"
run "$bin/segtrain" list
run "$bin/segtrain" status "$job"

step "cancel it and watch its history (exit code 3: canceled)"
run "$bin/segtrain" cancel "$job" --reason "demo over"
set +e
run "$bin/segtrain" watch "$job"
echo "watch exit code: $?"
set -e

step "the trainer standalone: synthetic data, SegFormer-B0 on the CPU"
out="$repo/demo-out"
rm -rf "$out" && mkdir -p "$out"
run "$bin/segtrain-worker" synth-data --out "$out/data" --train 48 --val 8 --size 128x64
cat > "$out/train.toml" <<JOB
name = "demo-b0"
dataset_root = "$out/data"
world_size = 1
crop_height = 64
crop_width = 64
batch_per_gpu = 8
max_iters = 120
warmup_iters = 10
base_lr = 0.001
log_interval = 20
eval_interval = 60
checkpoint_interval = 60
eval_mode = "whole"
loader_threads = 2
checkpoint_root = "$out/checkpoints"
JOB
run "$bin/segtrain-worker" train --config "$out/train.toml" --device cpu

step "predict with the final checkpoint"
img=$(find "$out/data/leftImg8bit/val" -name '*.png' | sort | head -n 1)
run "$bin/segtrain-worker" predict --variant b0 --weights "$out/checkpoints/demo-b0/ckpt-00000120/model.safetensors" \
    --input "$img" --out "$out/prediction.png"

step "done"
echo "input image:  $img"
echo "prediction:   $out/prediction.png (Cityscapes colours)"
echo "checkpoints:  $out/checkpoints/demo-b0"
echo "(no workers are registered with the coordinator yet, so submitted jobs wait QUEUED.)"
