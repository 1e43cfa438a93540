#!/usr/bin/env bash
# `make bench-coordinator`: the coordinator under a simulated cluster (segtrain-loadgen), with a
# throwaway PostgreSQL, the coordinator and the generator on this one machine. Appends each
# run's table to bench/results.md.
#
#   bench/coordinator.sh                 # the standard sizes: 1,024 and 10,000 simulated GPUs
#   bench/coordinator.sh 16 2 20 [LABEL] # HOSTS GPUS_PER_HOST JOBS, one run
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
[[ -x $bin/segtrain-loadgen ]] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 2; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

run() {  # HOSTS GPUS JOBS LABEL [TIMEOUT_S]
    local port=$((20000 + RANDOM % 20000))
    "$bin/segtrain-devpg" --url-file "$work/db.url" >/dev/null 2>"$work/pg.log" &
    pids+=($!)
    for _ in $(seq 300); do [[ -s $work/db.url ]] && break; sleep 0.1; done
    local db; db=$(cat "$work/db.url")
    "$bin/segtrain-coordinator" --listen "127.0.0.1:$port" --database-url "$db" --plaintext \
        --insecure-no-auth --log-format json 2>"$work/coordinator-$4.log" &
    pids+=($!)
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
    "$bin/segtrain-loadgen" --coordinator "http://127.0.0.1:$port" --hosts "$1" --gpus-per-host "$2" \
        --jobs "$3" --label "$4" --timeout-s "${5:-900}" --results bench/results.md
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    pids=()
    rm -f "$work/db.url"
}

if (($# >= 3)); then
    run "$1" "$2" "$3" "${4:-custom}"
else
    run 128 8 1000 "1,024 GPUs"
    run 1250 8 1000 "10,000 GPUs" 600
fi
