#!/usr/bin/env bash
# Runs on the GPU machine (the device tool), from the repository root, with the kit that
# bench/gpu-kit.sh built here carried along (`carry: [".gpu"]`):
#
#   bash bench/gpu-session.sh checks  # doctor, the CUDA/NCCL tests, then e2e: a world-1 NCCL
#                                     # job through the daemon in bf16 (PostgreSQL + coordinator
#                                     # + daemon)
#   bash bench/gpu-session.sh bench   # bench/compare.py: our step vs the PyTorch reference
#   bash bench/gpu-session.sh extra   # A/B rows (head order, map layout), phase and kernel
#                                     # profiles with a Chrome trace, then
#                                     # datawait: the full trainer's data-wait on 2048x1024 PNGs
#
# Each phase fits in one 10-minute call. Logs and tables go to $OUT (they come back); the
# last lines printed are a summary.
set -uo pipefail
phase=${1:?usage: gpu-session.sh checks|e2e|bench|extra|datawait}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-/tmp/segtrain-gpu-out}
mkdir -p "$out"
kit=/tmp/segtrain-kit
if [ ! -x "$kit/bin/segtrain-worker" ]; then
    mkdir -p "$kit"
    # tar needs xz for this; Python's tarfile does not.
    tar -xJf "$repo/.gpu/kit.tar.xz" -C "$kit" 2>/dev/null ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            "$repo/.gpu/kit.tar.xz" "$kit" || exit 1
    chmod -R a+rX "$kit" # PostgreSQL runs as an unprivileged user
fi
site=/opt/torch/.venv/lib/python3.12/site-packages
export LD_LIBRARY_PATH=$site/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export SEGTRAIN_NCCL_LIBRARY=$site/nvidia/nccl/lib/libnccl.so.2
export SEGTRAIN_TEST_FIXTURES=$repo/worker/tests/fixtures
export PATH=$kit/bin:$PATH
export TZ=UTC
summary=()
note() { summary+=("$*"); }

case $phase in
checks)
    nvidia-smi -L | tee "$out/gpu.txt"
    segtrain-worker doctor 2>&1 | tee "$out/doctor.txt"
    for t in "cuda --ignored" "torch_ext" "collective nccl --ignored"; do
        name=${t%% *}
        # shellcheck disable=SC2086 # the test binary's arguments
        if "$kit/tests/"$t --test-threads 1 --nocapture >"$out/test-$name.txt" 2>&1; then
            note "tests $t: $(grep -E '^test result' "$out/test-$name.txt" | tail -n 1)"
        else
            note "tests $t: FAILED (see test-$name.txt)"
        fi
        tail -n 30 "$out/test-$name.txt"
    done
    "$0" e2e
    ;;
e2e)
    # Overridable to try it on a CPU: E2E_DEVICE=cpu (a CPU daemon, fp32).
    if [ "${E2E_DEVICE:-gpu}" = cpu ]; then
        daemon_dev=(--cpu) precision=fp32 crop=128 size=256x128
    else
        daemon_dev=(--gpu 0) precision=bf16 crop=512 size=1024x512
    fi
    # A world-size-1 job through the daemon over NCCL, in bf16: PostgreSQL, the coordinator
    # and one GPU daemon, as on a real host (plaintext on loopback).
    w=$(mktemp -d -t segtrain-e2e-XXXXXX)
    chmod 755 "$w"
    [ -e /usr/share/zoneinfo/UTC ] || { mkdir -p /usr/share/zoneinfo && cp -r "$kit/zoneinfo/." /usr/share/zoneinfo/; }
    id nobody >/dev/null 2>&1 || useradd -r nobody
    pgbins=("$kit"/pg/usr/lib/postgresql/*/bin)
    pgbin=${pgbins[0]}
    SEGTRAIN_PG_BIN=$pgbin SEGTRAIN_PG_USER=nobody LD_LIBRARY_PATH=$kit/pg/lib:$LD_LIBRARY_PATH \
        segtrain-devpg --url-file "$w/pg.url" >"$out/devpg.log" 2>&1 &
    pids=($!)
    trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
    for _ in $(seq 150); do [ -s "$w/pg.url" ] && break; sleep 0.2; done
    db=$(cat "$w/pg.url" 2>/dev/null) || { note "PostgreSQL did not start (devpg.log)"; cat "$out/devpg.log"; }
    export SEGTRAIN_COORDINATOR=http://127.0.0.1:50051
    segtrain-coordinator --listen 127.0.0.1:50051 --database-url "$db" --plaintext --insecure-no-auth \
        2>"$out/coordinator.log" &
    pids+=($!)
    segtrain-worker daemon "${daemon_dev[@]}" --work-dir "$w/daemon" 2>"$out/daemon.log" &
    pids+=($!)
    for _ in $(seq 150); do
        [ "$(segtrain --json workers 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null)" = 1 ] && break
        sleep 0.2
    done
    segtrain workers | tee "$out/workers.txt"
    segtrain-worker synth-data --out "$w/data" --train 32 --val 4 --size "$size" >/dev/null
    segtrain job-template >"$w/job.toml"
    segtrain submit -f "$w/job.toml" --name gpu-nccl-b0 --variant b0 --dataset-root "$w/data" \
        --world-size 1 --batch-per-gpu 8 --crop-height "$crop" --crop-width "$crop" --precision "$precision" \
        --max-iters 60 --warmup-iters 10 --log-interval 10 --eval-interval 60 \
        --checkpoint-interval 30 --loader-threads 8 --checkpoint-root "$w/checkpoints" | tee "$out/submit.txt"
    job=$(segtrain --json list | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["id"])')
    timeout 300 segtrain watch "$job" >"$out/watch.txt" 2>&1
    segtrain status "$job" | tee "$out/status.txt"
    segtrain checkpoints "$job" | tee -a "$out/status.txt"
    cp "$w"/daemon/*/*.log "$out/" 2>/dev/null
    note "job: $(grep -m1 -E 'state' "$out/status.txt")"
    note "daemon log, NCCL:"
    while read -r l; do note "  $l"; done < <(grep -E 'collective ready|rendezvous published' "$out/daemon.log" | head -n 3)
    note "daemon log, progress:"
    while read -r l; do note "  $l"; done < <(grep -E '"progress"|progress' "$out/daemon.log" | head -n 6)
    ;;
bench)
    python3 bench/compare.py --worker "$kit/bin/segtrain-worker" b3:bf16:8 b0:bf16:8 b5:bf16:8 b3:fp32:8 \
        2>&1 | tee "$out/compare.txt"
    note "results appended to $out/results.md"
    ;;
extra)
    {
        for args in "" "--head concat" "--contiguous-maps" "--head concat --contiguous-maps" \
            "--breakdown --profile $out/trace-b3-bf16.json"; do
            echo "## bench b3 bf16 8 $args"
            # shellcheck disable=SC2086 # the A/B flags
            segtrain-worker bench --variant b3 --batch 8 --crop 1024 --precision bf16 --device cuda $args
        done
        # SyncBN's computation per step, at the recipe's one image per GPU and at 8.
        for batch in 1 8; do
            echo "## bench b3 bf16 $batch --sync-bn"
            segtrain-worker bench --variant b3 --batch "$batch" --crop 1024 --precision bf16 --device cuda --sync-bn
        done
    } 2>&1 | tee "$out/ab.txt"
    gzip -f "$out/trace-b3-bf16.json" # Chrome trace: chrome://tracing or ui.perfetto.dev
    python3 bench/peer_profile.py b3 bf16 8 2>&1 | tee "$out/peer-profile.txt"

    "$0" datawait
    note "A/B rows and the kernel profile: ab.txt; trace: trace-b3-bf16.json.gz; the peer's: peer-profile.txt"
    ;;
datawait)
    # Overridable to try it on a CPU: DW_DEVICE=cpu DW_VARIANT=b0 DW_SIZE=256x128 DW_CROP=128 ...
    dev=${DW_DEVICE:-cuda} variant=${DW_VARIANT:-b3} size=${DW_SIZE:-2048x1024}
    crop=${DW_CROP:-1024} iters=${DW_ITERS:-60} threads=${DW_THREADS:-16} batch=${DW_BATCH:-8}
    # The full trainer on 2048x1024 PNGs with 16 loader threads: data-wait against step time.
    w=$(mktemp -d -t segtrain-dw-XXXXXX)
    segtrain-worker synth-data --out "$w/data" --train 64 --val 0 --size "$size" >/dev/null
    segtrain-worker bench-loader --data "$w/data" --threads "$threads" --batch "$batch" --crop "${crop}x${crop}" --batches 12 | tee "$out/loader.txt"
    segtrain job-template >"$w/job.toml" 2>/dev/null || "$kit/bin/segtrain" job-template >"$w/job.toml"
    python3 - "$w/job.toml" "$w" "$variant" "$batch" "$crop" "$iters" "$threads" "$dev" <<'EOF'
import re, sys
path, w, variant, batch, crop, iters, threads, dev = sys.argv[1:]
s = open(path).read()
def put(key, value):
    global s
    s, n = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", s)
    assert n == 1, key
for k, v in dict(name=f'"data-wait-{variant}"', variant=f'"{variant}"', dataset_root=f'"{w}/data"',
                 world_size=1, batch_per_gpu=batch, crop_height=crop, crop_width=crop,
                 precision='"bf16"' if dev != "cpu" else '"fp32"', max_iters=iters,
                 warmup_iters=10, log_interval=10, eval_interval=100000,
                 checkpoint_interval=100000, loader_threads=threads,
                 checkpoint_root=f'"{w}/checkpoints"').items():
    put(k, v)
open(path, "w").write(s)
EOF
    segtrain-worker train --config "$w/job.toml" --device "$dev" --json >"$out/train-dw.jsonl" 2>"$out/train-dw.log"
    python3 - "$out/train-dw.jsonl" <<'EOF' | tee "$out/data-wait.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
m = [r for r in rows if r.get("event") == "metrics"]
print("| iteration | step ms | data-wait ms | data-wait % | images/s |")
print("|---|---|---|---|---|")
for r in m:
    v = r["values"]
    print(f"| {r['iteration']} | {v['step_ms']:.1f} | {v['data_wait_ms']:.2f} | "
          f"{100 * v['data_wait_ms'] / v['step_ms']:.2f} | {v['images_per_s']:.1f} |")
EOF
    note "loader alone: $(tail -n 1 "$out/loader.txt")"
    note "data-wait (the first interval includes the warm-up):"
    while read -r l; do note "  $l"; done <"$out/data-wait.txt"
    ;;
*)
    echo "usage: gpu-session.sh checks|e2e|bench|extra|datawait" >&2
    exit 2
    ;;
esac

echo
echo "== summary ($phase)"
printf '%s\n' "${summary[@]}"
