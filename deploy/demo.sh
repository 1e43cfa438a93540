#!/usr/bin/env bash
# `make demo`: segtrain as a service on one machine: a throwaway PostgreSQL, the coordinator, two
# CPU worker daemons, a synthetic Cityscapes-layout dataset, and a SegFormer-B0 job of world size 2
# trained to completion (gradients averaged over the TCP collective) while `segtrain watch` shows
# it. It ends with the final mIoU, the checkpoints and the loss plot. Everything it starts is
# stopped on exit; results stay in ./demo-out.
#
# It runs as in production: TLS with a private CA made by `segtrain-coordinator certs`, an admin
# token bootstrapped in the database, and a client token (for the CLI and the dashboard) and a
# worker token (for the daemons) created with `segtrain token create`. The web dashboard is on
# https://127.0.0.1:8443 (SEGTRAIN_DEMO_WEB_PORT); with DEMO_KEEP=1 everything keeps running after
# the job until Ctrl-C, so a person can look.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="${CARGO_TARGET_DIR:-$repo/target}/debug"
out="$repo/demo-out"
work=$(mktemp -d -t segtrain-demo-XXXXXX)
port=${SEGTRAIN_DEMO_PORT:-50051}
web_port=${SEGTRAIN_DEMO_WEB_PORT:-8443}
export SEGTRAIN_COORDINATOR="https://127.0.0.1:$port"
# Every segtrain and segtrain-worker command below trusts the demo's private CA.
export SEGTRAIN_CA="$out/certs/ca.pem"
unset SEGTRAIN_TOKEN SEGTRAIN_TOKEN_FILE
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
rm -rf "$out" && mkdir -p "$out"

step "a throwaway PostgreSQL"
"$bin/segtrain-devpg" --url-file "$work/pg.url" >/dev/null &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/pg.url" ] && break; sleep 0.2; done
[ -s "$work/pg.url" ] || { echo "PostgreSQL did not start" >&2; exit 1; }
db=$(cat "$work/pg.url")
echo "$db"

step "TLS certificates: a private CA and a server certificate for localhost and 127.0.0.1"
run "$bin/segtrain-coordinator" certs --out "$out/certs" --host localhost --host 127.0.0.1

step "the first admin token, straight into the database (shown once; only its hash is stored)"
printf '$ %s\n' "segtrain-coordinator token create --database-url \$db --role admin --name demo-admin > $out/admin.token"
(umask 077; "$bin/segtrain-coordinator" token create --database-url "$db" --role admin --name demo-admin \
    >"$out/admin.token")

step "the coordinator on https://127.0.0.1:$port, its dashboard on https://127.0.0.1:$web_port (log: $out/coordinator.log)"
"$bin/segtrain-coordinator" --listen "127.0.0.1:$port" --web-listen "127.0.0.1:$web_port" \
    --database-url "$db" --log-format json \
    --tls-cert "$out/certs/server.pem" --tls-key "$out/certs/server-key.pem" \
    2>"$out/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do "$bin/segtrain" --token-file "$out/admin.token" workers >/dev/null 2>&1 && break; sleep 0.2; done

step "a client token for the CLI and a worker token for the daemons"
for role in client worker; do
    printf '$ %s\n' "segtrain --token-file $out/admin.token token create --role $role --name demo-$role > $out/$role.token"
    (umask 077; "$bin/segtrain" --token-file "$out/admin.token" token create --role "$role" --name "demo-$role" \
        >"$out/$role.token")
done
run "$bin/segtrain" --token-file "$out/admin.token" token list
echo "dashboard: https://127.0.0.1:$web_port/ (sign in with the client token in $out/client.token;"
echo "           the browser will ask you to accept the demo's private CA, $out/certs/ca.pem)"
# From here on the CLI uses the client token.
export SEGTRAIN_TOKEN_FILE="$out/client.token"

step "two CPU worker daemons with the worker token (logs: $out/daemon-*.log)"
for w in a b; do
    "$bin/segtrain-worker" daemon --cpu --host "cpu-$w" --torch-threads 1 --work-dir "$out/work-$w" --log-json true \
        --token-file "$out/worker.token" 2>"$out/daemon-$w.log" &
    pids+=($!)
done
for _ in $(seq 100); do
    [ "$("$bin/segtrain" --json workers | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 2 ] && break
    sleep 0.2
done
run "$bin/segtrain" workers

step "a synthetic dataset in the Cityscapes layout"
run "$bin/segtrain-worker" synth-data --out "$out/data" --train 48 --val 8 --size 128x64

step "a SegFormer-B0 job of world size 2, from a job file with overrides"
"$bin/segtrain" job-template > "$out/job.toml"
run "$bin/segtrain" submit -f "$out/job.toml" --name demo-b0 --dataset-root "$out/data" \
    --world-size 2 --batch-per-gpu 4 --crop-height 64 --crop-width 64 --max-iters 120 \
    --warmup-iters 10 --base-lr 0.001 --log-interval 10 --eval-interval 60 --checkpoint-interval 60 \
    --eval-mode whole --loader-threads 1 --checkpoint-root "$out/checkpoints" --idempotency-key demo-1
job=$("$bin/segtrain" --json list | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["id"])')

step "watch it train (live until it finishes)"
run "$bin/segtrain" watch "$job"

step "results"
run "$bin/segtrain" status "$job"
run "$bin/segtrain" checkpoints "$job"
run "$bin/segtrain" plot "$job" -o "$out/loss.png"
run "$bin/segtrain" export tensorboard "$job" "$out/tensorboard"
miou=$("$bin/segtrain" --json checkpoints "$job" | python3 -c 'import json,sys; c=json.load(sys.stdin); print("%.2f%%" % (100*c[-1]["metrics"].get("miou", float("nan"))))')
last=$("$bin/segtrain" --json checkpoints "$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["uri"])')
run "$bin/segtrain-worker" predict --variant b0 --weights "$last/model.safetensors" \
    --input "$(find "$out/data/leftImg8bit/val" -name '*.png' | sort | head -n 1)" --out "$out/prediction.png"

step "done"
echo "final val mIoU:  $miou"
echo "checkpoints:     $out/checkpoints/$job"
echo "loss plot:       $out/loss.png"
echo "TensorBoard:     tensorboard --logdir $out/tensorboard"
echo "a prediction:    $out/prediction.png"
echo "TLS and tokens:  $out/certs, $out/{admin,client,worker}.token"
echo "dashboard:       https://127.0.0.1:$web_port/#/jobs/$job (token: $out/client.token)"
if [ "${DEMO_KEEP:-0}" = 1 ]; then
    step "DEMO_KEEP=1: the coordinator, the daemons and the dashboard keep running; Ctrl-C stops them"
    # Until a signal: the EXIT trap then stops everything.
    trap 'exit 0' INT TERM
    while :; do sleep 3600 & pids+=($!); wait $!; done
fi
