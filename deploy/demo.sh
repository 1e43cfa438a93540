#!/usr/bin/env bash
# `make demo`: a throwaway PostgreSQL, the coordinator, and a job submitted, queried, watched and
# canceled through the `segtrain` CLI. Everything it starts is stopped again on exit.
# (Training itself arrives with the trainer and worker-daemon issues; the demo grows with them.)
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

step "done"
echo "no workers are registered yet, so jobs wait QUEUED; training arrives with the worker issues."
